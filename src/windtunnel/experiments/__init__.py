"""Paper reproductions: each file composes library calls into one experiment (SPEC §10)."""
