"""Figures and reports built from run directories (never from the training stack)."""
