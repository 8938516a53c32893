"""Reports built from a run directory alone (never from the training stack)."""

from windtunnel.paper_numbers import PAPER_NUMBERS
from windtunnel.reports.html import (
    GEOMETRY_VARIANT_HEADER,
    PAPER_ROWS,
    build_report,
    draw_lag_response,
    geometry_variant_reasons,
    geometry_variant_rows,
    paper_table_rows,
)

__all__ = ["GEOMETRY_VARIANT_HEADER", "PAPER_NUMBERS", "PAPER_ROWS", "build_report", "draw_lag_response", "geometry_variant_reasons",
           "geometry_variant_rows", "paper_table_rows"]
