"""The measurement registry (``measurements``) against what the product really writes: every column
and ``exam.json`` field of a screened phantom is declared, nothing declared is absent from the
files, every quantity has a known unit and a code, and ``docs/outputs.md`` is the generated text."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from VertebralFractureScreenLib.model import features
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.report import measurements as ms
from VertebralFractureScreenLib.cli import main
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom

REPO = Path(__file__).resolve().parent.parent
SPEC = PhantomSpec(levels=lv.parse_level_range("T12-S1"), spacing=(3.0, 3.0, 3.0), fov="body", supersampling=1,
                   fractures=(Fracture.parse("L1:wedge:0.35"),), noise_hu=10.0, contrast=True, seed=3)


@pytest.fixture(scope="module")
def screened(tmp_path_factory) -> Path:
    files = write_phantom(SPEC, tmp_path_factory.mktemp("phantom"))
    out = tmp_path_factory.mktemp("screen") / "exam"
    assert main(["screen", str(files["ct"]), "--seg", str(files["total"]), "--body-seg", str(files["vertebrae_body"]),
                 "--out", str(out), "--model", "demo", "--no-qc"]) == 0
    return out


def header(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return next(csv.reader(handle))


def leaf_paths(value, prefix: str = "") -> set[str]:
    """Dotted paths of an exam.json's fields; a dict keyed by levels, muscles or stages is one
    field with a placeholder, and the free-form objects (``grading``, provenance...) are leaves."""
    if prefix in ("grading", "model.provenance", "bone.excluded_lumbar", "level_check.not_checked",
                  "level_check.rib_levels") or not isinstance(value, dict) or not value:
        return {prefix}
    paths = set()
    for key, item in value.items():
        if key in lv.LEVEL_INDEX:
            key = "<level>"
        elif prefix == "muscle.lumbar":
            key = "<muscle>"
        elif prefix == "timings_s":
            key = "<stage>"
        paths |= leaf_paths(item, f"{prefix}.{key}" if prefix else key)
    return paths


def test_csv_headers_are_the_registry(screened):
    assert header(screened / "vertebrae.csv") == list(ms.keys(ms.VERTEBRA_TABLE))
    assert header(screened / "muscles.csv") == list(ms.keys(ms.MUSCLE_TABLE))
    assert features.FEATURE_NAMES == ms.keys(ms.FEATURE_TABLE)


def test_every_exam_json_field_is_declared(screened):
    written = leaf_paths(json.loads((screened / "exam.json").read_text()))
    declared = set(ms.keys(ms.EXAM_FIELDS))
    assert written - declared == set(), "exam.json fields missing from measurements.EXAM_FIELDS"
    assert declared - written == set(), "declared in measurements.EXAM_FIELDS but never written"


def test_every_quantity_has_unit_code_and_words():
    for name, table in ms.TABLES.items():
        assert len(set(ms.keys(table))) == len(table), f"a key twice in {name}"
        for q in table:
            assert q.unit in ms.UNITS and q.kind in ms.KINDS and q.title and q.description, q
            if q.kind in ("number", "integer"):
                assert q.code is not None and re.fullmatch(r"[0-9A-Za-z_]+", q.code.value), q
            if q.unit == "[hnsf'U]" and not q.key.endswith("threshold_hu"):
                assert q.code == ms.ATTENUATION and q.derivation is not None, q


def test_heights_are_three_distinct_quantities():
    """Slicer's reader (dcmqi) drops modifiers: Ha, Hm and Hp need their own concept codes."""
    table = ms.by_key(ms.VERTEBRA_TABLE)
    assert len({table[k].code for k in ("ha_mm", "hm_mm", "hp_mm")}) == 3


def test_outputs_reference_is_current():
    path = REPO / "docs" / "outputs.md"
    assert path.read_text() == ms.outputs_reference(), (
        "docs/outputs.md is stale: python -m VertebralFractureScreenLib.report.measurements > docs/outputs.md")


def flags_in_the_code() -> set[str]:
    """Flag names the measuring modules append: constants as they are, f-strings as a regex."""
    import ast

    lib = REPO / "VertebralFractureScreen" / "VertebralFractureScreenLib"
    found = set()
    for path in lib.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("append", "extend")):
                continue
            owner = node.func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name not in ("flags", "reasons"):
                continue
            inside_fstrings = {id(part) for value in ast.walk(node) if isinstance(value, ast.JoinedStr)
                               for part in ast.walk(value)}
            for value in ast.walk(node):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and id(value) not in inside_fstrings:
                    found.add(re.escape(value.value))
                elif isinstance(value, ast.JoinedStr):
                    found.add("".join(re.escape(part.value) if isinstance(part, ast.Constant) else ".+"
                                      for part in value.values))
    return found


def test_every_flag_the_code_sets_is_explained():
    declared = [re.sub(r"<[a-z]+>", "L1", flag) for flag in ms.FLAGS]
    unexplained = sorted(pattern for pattern in flags_in_the_code()
                         if not any(re.fullmatch(pattern, flag) for flag in declared))
    assert not unexplained, f"flags set in the code but missing from measurements.FLAGS: {unexplained}"
