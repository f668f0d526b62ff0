"""Result records as text: CSV tables and JSON-ready values (numpy types, NaN → empty or null).

Every table and JSON file the library writes (``vertebrae.csv``, ``muscles.csv``, ``exam.json``,
the cohort tables, model files) goes through these two functions, so the same value is written
the same way everywhere.
"""

from __future__ import annotations

import csv
import io
import math
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


def csv_text(columns: Sequence[str], rows: Iterable[dict], cell: Callable = csv_cell) -> str:
    """A CSV table (header and one line per row, ``\\n`` line ends); ``cell`` formats each value
    (missing keys are None)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: cell(row.get(key)) for key in columns})
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
