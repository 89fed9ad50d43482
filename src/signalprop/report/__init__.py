"""Reports: figures drawn from records (:mod:`.figures`), self-contained HTML helpers
(:mod:`.html`) and the doctor's page (:mod:`.doctor_page`)."""

from signalprop.report.figures import FIGURES, available, can_draw, requires
from signalprop.report.html import (
    figure_to_base64,
    figure_to_data_uri,
    render,
    render_page,
    render_string,
    write_page,
)

__all__ = [
    "FIGURES",
    "available",
    "can_draw",
    "figure_to_base64",
    "figure_to_data_uri",
    "render",
    "render_page",
    "render_string",
    "requires",
    "write_page",
]
