"""Paper reproductions: each file composes library calls into one experiment (docs/theory.md §10)."""
