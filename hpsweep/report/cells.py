"""How one value is shown in a report file: shortened, then made inert for where it goes.

Hparam keys and values, reasons and names come from users and trainers; in leaderboard.md they
must not inject HTML, images or links nor break the table, and in leaderboard.csv they must not
run as spreadsheet formulas. ``leaderboard.json`` keeps every value whole (it is data, not a view).
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from hpsweep.limits import cut_at_word

__all__ = ["VALUE_CHARS", "csv_cell", "md", "short_text"]

VALUE_CHARS = 200  # a value longer than this is cut, with an ellipsis, in md, csv and plot labels
ELLIPSIS = "…"

# Characters that mean something in a markdown table cell (``|`` ends the cell) or start markup
# (emphasis, code, links and images); the backslash first, so escapes added here stay escapes.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]!|~])")
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def short_text(value: Any, limit: int = VALUE_CHARS) -> str:
    """``value`` as text of at most ``limit`` characters (cut with an ellipsis): cheap for any size.

    A value ``str`` refuses (an integer beyond Python's digit limit, a list nested past the
    recursion limit) is named by its type instead of failing the report.
    """
    try:
        text = value if isinstance(value, str) else str(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__} too large to show>"
    return cut_at_word(text, limit)


def md(value: Any, limit: int = VALUE_CHARS, code: bool = False) -> str:
    """``value`` for a markdown table cell or header line: one line, at most ``limit`` characters.

    Plain text: HTML is escaped (``<``, ``>``, ``&``) and markdown specials get a backslash, so no
    tag, image, link or emphasis can be injected and ``|`` never splits the cell. ``code``: a code
    span (where markdown and HTML are already literal) whose fence is longer than any run of
    backticks inside, so the value cannot close it early.
    """
    text = " ".join(short_text(value, limit).split())  # newlines and tabs: one space
    if not code:
        return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    text = text.replace("|", "\\|")  # GFM splits table cells on | even inside code spans
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def csv_cell(value: Any, limit: int = VALUE_CHARS) -> Any:
    """``value`` for a CSV cell: numbers stay numbers; text is shortened and, when a spreadsheet
    would read it as a formula (it starts with ``= + - @``, a tab or a CR), prefixed with ``'``
    (the OWASP CSV-injection rule). Text that is just a number (``-0.5``) is left as it is; line
    breaks become ``\\n`` (which the CSV writer quotes)."""
    if value is None or isinstance(value, bool | float):
        return value
    text = short_text(value, limit)
    if isinstance(value, int) and not text.endswith(ELLIPSIS) and not text.startswith("<"):
        return value  # digits, whole
    if text.startswith(_CSV_FORMULA_START) and not _is_number_text(text):
        text = "'" + text
    # A bare CR is no line end to pandas' writer (it is left unquoted) but is one to spreadsheets.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _is_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
