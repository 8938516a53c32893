"""Reports built from a run directory alone (never from the training stack)."""

from windtunnel.reports.html import PAPER_NUMBERS, build_report, draw_lag_response

__all__ = ["PAPER_NUMBERS", "build_report", "draw_lag_response"]
