"""The one way command-line code makes a rich console.

Why: piped to a file (``make demo > log``) rich assumes 80 columns and squeezes wide tables into
"ki…", "re…", "st…". When stdout is not a terminal (and ``$COLUMNS`` does not say otherwise),
the console gets :data:`LOG_WIDTH` columns, so tables keep their column names and figures in
a log. Library code does not print; only CLIs call this.
"""

from __future__ import annotations

import os

from rich.console import Console

LOG_WIDTH = 160


def make_console(*, min_width: int = 0) -> Console:
    """A console at least ``min_width`` wide; :data:`LOG_WIDTH` wide when writing to a file."""
    console = Console()
    width = console.width
    if not console.is_terminal and "COLUMNS" not in os.environ:
        width = max(width, LOG_WIDTH)
    if width != console.width or min_width > width:
        console = Console(width=max(width, min_width))
    return console
