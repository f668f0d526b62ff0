"""The results folder (``report/exam_folder``): written so that it never looks finished before it
is, and read back as the values screening produced, so that a cohort's features rebuilt from its
folders equal those computed in memory."""

from __future__ import annotations

import math

import pytest

from VertebralFractureScreenLib.exam.screening import screen_exam
from VertebralFractureScreenLib.model.features import exam_features, features_from_folder
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom
from VertebralFractureScreenLib.report import exam_folder as ef


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    phantom = make_phantom(PhantomSpec(levels=("T12", "L1", "L2", "L3", "L4"), spacing=(1.5, 1.5, 2.0),
                                       supersampling=1, fractures=(Fracture.parse("L2:wedge:0.3"),)))
    from VertebralFractureScreenLib.io.volume import Volume

    ct = Volume(phantom.ct, phantom.ijk_to_ras)
    result = screen_exam(ct, seg=Volume(phantom.total, phantom.ijk_to_ras), exam_id="-phantom")
    out = tmp_path_factory.mktemp("exam")
    result.write(out, qc=False)
    return result, out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=6e-5)
    return a == b


def test_a_finished_folder_reads_back_as_the_values_screening_produced(screened):
    result, out = screened
    finished = ef.read_finished(out)
    assert finished.exam["exam_id"] == "-phantom"
    assert len(finished.vertebrae) == len(result.vertebrae)
    for written, read in zip(result.vertebrae, finished.vertebrae):
        for key, value in written.items():
            value = list(value) if isinstance(value, tuple) else value
            assert _same(float(value) if isinstance(value, int) and not isinstance(value, bool)
                         and isinstance(read[key], float) else value, read[key]), (written["level"], key)
    # The exam ID that starts like a formula was neutralised in the CSV and reads back as given.
    assert {row["exam_id"] for row in finished.vertebrae} == {"-phantom"}
    in_memory = exam_features(result.exam, result.vertebrae)
    from_folder = features_from_folder(out)
    assert set(in_memory) == set(from_folder)
    assert all(_same(in_memory[k], from_folder[k]) for k in in_memory)
    assert from_folder["max_genant_grade"] == 2.0


def test_cells_read_back_by_their_declared_kind():
    assert math.isnan(ef.parse_cell("", "number")) and ef.parse_cell("12.5", "number") == 12.5
    assert math.isnan(ef.parse_cell("abc", "number"))
    assert ef.parse_cell("", "integer") is None and ef.parse_cell("3", "integer") == 3
    assert ef.parse_cell("true", "boolean") is True and ef.parse_cell("false", "boolean") is False
    assert ef.parse_cell("", "boolean") is None
    assert ef.parse_cell("a;b", "list") == ["a", "b"] and ef.parse_cell("", "list") == []
    assert ef.parse_cell("'=1+2", "text") == "=1+2" and ef.parse_cell("'quoted", "text") == "'quoted"


def test_publish_moves_exam_json_last_and_removes_a_stale_optional_file(tmp_path):
    (tmp_path / "qc.png").write_bytes(b"old picture")
    (tmp_path / "exam.json").write_text("{}")
    seen = []

    def write(staging):
        seen.append(ef.exam_state(tmp_path))  # the old results still stand while the new are written
        for name in ("vertebrae.csv", "muscles.csv", "exam.json"):
            (staging / name).write_text(name)

    written = ef.publish(tmp_path, write)
    assert seen == ["done"] and list(written) == ["vertebrae.csv", "muscles.csv", "exam.json"]
    assert not (tmp_path / "qc.png").exists() and (tmp_path / "exam.json").read_text() == "exam.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exam.json", "muscles.csv", "vertebrae.csv"]


def test_a_failed_write_leaves_no_staging_and_the_old_results(tmp_path):
    (tmp_path / "exam.json").write_text("{}")

    def write(staging):
        (staging / "vertebrae.csv").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ef.publish(tmp_path, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exam.json"]
    ef.remove_leftovers(tmp_path)
    assert ef.exam_state(tmp_path) == "done"
