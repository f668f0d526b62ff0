"""Result records as text: CSV tables and JSON-ready values (numpy types, NaN → empty or null).

Every table and JSON file the library writes (``vertebrae.csv``, ``muscles.csv``, ``exam.json``,
the cohort tables, model files) goes through these two functions, so the same value is written
the same way everywhere.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np


def csv_cell(value):
    """A value as a cell of the SPEC §5 tables: empty for None and NaN, ``true``/``false``, floats
    to 4 decimals without trailing zeros, lists joined by ``;``."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{float(value):.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return value


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection")."""
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def neutralised(text: str) -> str:
    """``text`` safe from formula injection: prefixed with a single quote ``'`` when it starts with
    one of :data:`FORMULA_TRIGGERS`, unless the whole text is a plain decimal number (``-12.5``,
    ``+3``, ``1e-4``: a spreadsheet reads it as that number, never as a formula). Carriage returns
    then become line feeds: Python's CSV writer quotes a cell with a line feed but not one with a
    lone carriage return, which a spreadsheet would take as the start of a new row (and of a new,
    unneutralised cell)."""
    if text.startswith(FORMULA_TRIGGERS) and not _PLAIN_NUMBER.fullmatch(text):
        text = "'" + text
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def csv_text(columns: Sequence[str], rows: Iterable[dict], cell: Callable = csv_cell) -> str:
    """A CSV table (header and one line per row, ``\\n`` line ends); ``cell`` formats each value
    (missing keys are None).

    Text is neutralised against CSV (formula) injection as OWASP advises: a column name, or a cell
    whose value is text (``str``, or a list or tuple joined by ``;``: exam IDs, flags, the columns a
    cohort manifest passes through), that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return gets a single quote ``'`` in front (see :func:`neutralised`), so a spreadsheet
    shows it as text instead of running it, and a carriage return in such text becomes a line feed
    (so that the cell is quoted). Numbers (ints, floats, numpy numbers, negative ones included) and
    text that is a plain decimal number are written unchanged and stay numbers.
    Whoever reads such a cell back gets the quote with it (``'=1+2``): no column this software
    reads back as a number can start with those characters except a plain number.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writerow({key: neutralised(str(key)) for key in columns})
    for row in rows:
        line = {}
        for key in columns:
            value = row.get(key)
            text = cell(value)
            if isinstance(value, (str, list, tuple)) and isinstance(text, str):
                text = neutralised(text)
            line[key] = text
        writer.writerow(line)
    return buffer.getvalue()


def jsonable(value):
    """Plain JSON types; numpy arrays become lists, NaN and infinities null, paths text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    return value
