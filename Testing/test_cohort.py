"""Cohort screening (``cohort.run_cohort``, ``vfscreen cohort``): finding exams in a folder or a
manifest, features against phantom truth, failures recorded without stopping the run, re-runs
that change nothing, SIGKILL at any moment followed by a re-run, and a real Dask distributed
cluster (scheduler and workers as separate processes on loopback)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from VertebralFractureScreenLib import cohort
from VertebralFractureScreenLib.model import features
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.cli import main
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom

FRACTURED = PhantomSpec(levels=lv.parse_level_range("T12-S1"), spacing=(3.0, 3.0, 3.0), fov="body", supersampling=3,
                        fractures=(Fracture.parse("L1:wedge:0.3"),), noise_hu=10.0, seed=5, trabecular_hu=95.0)
NORMAL = PhantomSpec(levels=lv.parse_level_range("T12-S1"), spacing=(3.0, 3.0, 3.0), fov="body", supersampling=3,
                     noise_hu=10.0, seed=6, trabecular_hu=180.0, contrast=True)

HAVE_DASK = __import__("importlib").util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="Dask distributed is not installed (extra 'cohort')")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cohort-phantoms")
    return {"fractured": write_phantom(FRACTURED, root / "fractured"), "normal": write_phantom(NORMAL, root / "normal")}


def truth_of(paths) -> dict:
    return json.loads(paths["truth"].read_text())


@pytest.fixture(scope="module")
def manifest(phantoms, tmp_path_factory) -> Path:
    """A manifest with relative paths, clinical and label columns, a broken CT and a missing one."""
    root = tmp_path_factory.mktemp("cohort-inputs")
    for name, paths in phantoms.items():
        shutil.copy(paths["ct"], root / f"{name}.nii.gz")
        shutil.copy(paths["total"], root / f"{name}_total.nii.gz")
    shutil.copy(phantoms["fractured"]["vertebrae_body"], root / "fractured_body.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"this is not an image")
    rows = [
        ["exam_id", "ct", "seg", "body_seg", "age", "sex", "fracture"],
        ["F1", "fractured.nii.gz", "fractured_total.nii.gz", "fractured_body.nii.gz", "71", "F", "1"],
        ["N1", "normal.nii.gz", "normal_total.nii.gz", "", "64", "M", "0"],
        ["B1", "broken.nii.gz", "normal_total.nii.gz", "", "80", "F", "1"],
        ["M1", "missing.nii.gz", "normal_total.nii.gz", "", "", "", "0"],
    ]
    path = root / "manifest.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort_run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort-out") / "run"
    summary = cohort.run_cohort(manifest, out, settings=cohort.CohortSettings(levels=lv.parse_level_range("T12-L5")))
    return {"out": out, "summary": summary}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file under ``root`` (except the log and summary)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in (cohort.LOG_FILE, cohort.SUMMARY_FILE):
            digest[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return digest


# ------------------------------------------------------------------------------------------------
# Finding exams
# ------------------------------------------------------------------------------------------------


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_rule_pairs_cts_with_their_segmentations(tmp_path):
    touch(tmp_path / "a.nii.gz")
    touch(tmp_path / "a_seg.nii.gz")
    touch(tmp_path / "a_body.nii.gz")
    touch(tmp_path / "b.nrrd")
    touch(tmp_path / "b.seg.nrrd")
    touch(tmp_path / "c.mha")
    touch(tmp_path / "c_total.nii")
    touch(tmp_path / "c_vertebrae_body.nii.gz")
    touch(tmp_path / "d.nii.gz")  # no segmentation: TotalSegmentator will segment it
    touch(tmp_path / "orphan_seg.nii.gz")  # a segmentation without its CT is ignored
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.nii.gz")
    touch(tmp_path / "series1" / "IM0001", b"\0" * 128 + b"DICM" + b"\0" * 16)  # a DICOM series folder
    touch(tmp_path / "other" / "x.txt")  # a folder that is no DICOM series
    exams = {e.exam_id: e for e in cohort.find_exams(tmp_path)}
    assert sorted(exams) == ["a", "b", "c", "d", "series1"]
    assert Path(exams["a"].seg).name == "a_seg.nii.gz" and Path(exams["a"].body_seg).name == "a_body.nii.gz"
    assert Path(exams["b"].seg).name == "b.seg.nrrd" and exams["b"].body_seg is None
    assert Path(exams["c"].seg).name == "c_total.nii" and Path(exams["c"].body_seg).name == "c_vertebrae_body.nii.gz"
    assert exams["d"].seg is None
    assert Path(exams["series1"].ct).name == "series1" and exams["series1"].seg is None
    assert all(Path(e.ct).is_absolute() for e in exams.values())


@pytest.mark.parametrize("files, words", [
    ((), "no exam found"),
    (("a.nii.gz", "a_seg.nii.gz", "a_total.nii.gz"), "two files give the seg of exam a"),
    (("-a.nii.gz",), "cannot name a folder"),
])
def test_folder_problems_are_one_sentence(tmp_path, files, words):
    for name in files:
        touch(tmp_path / name)
    with pytest.raises(InputError, match=words):
        cohort.find_exams(tmp_path)


def test_one_dicom_series_or_a_missing_path_is_not_a_cohort(tmp_path):
    touch(tmp_path / "IM1", b"\0" * 128 + b"DICM")
    with pytest.raises(InputError, match="is one DICOM series"):
        cohort.find_exams(tmp_path)
    with pytest.raises(InputError, match="do not exist"):
        cohort.find_exams(tmp_path / "nowhere")
    touch(tmp_path / "list.txt")
    with pytest.raises(InputError, match="folder of exams or a CSV manifest"):
        cohort.find_exams(tmp_path / "list.txt")


def test_manifest_resolves_paths_and_passes_columns_through(manifest):
    exams = cohort.find_exams(manifest)
    assert [e.exam_id for e in exams] == ["F1", "N1", "B1", "M1"]
    f1 = exams[0]
    assert Path(f1.ct) == manifest.parent / "fractured.nii.gz" and Path(f1.body_seg).name == "fractured_body.nii.gz"
    assert exams[1].body_seg is None
    assert dict(f1.columns) == {"age": "71", "sex": "F", "fracture": "1"}


@pytest.mark.parametrize("text, words", [
    ("exam_id,seg\nx,y.nii.gz\n", "has no 'ct' column"),
    ("exam_id,ct\nx,a.nii.gz\nx,b.nii.gz\n", "repeats exam ID x in lines 2 and 3"),
    ("ct,labels\na.nii.gz,other\n", "labels must be totalsegmentator or verse"),
    ("ct\n", "lists no exam"),
    ("exam_id,ct\n../up,a.nii.gz\n", "cannot name a folder"),
])
def test_manifest_problems_are_one_sentence(tmp_path, text, words):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=words):
        cohort.find_exams(path)


# ------------------------------------------------------------------------------------------------
# A run in this process
# ------------------------------------------------------------------------------------------------


def test_every_exam_gets_its_folder_or_its_error(cohort_run):
    out, summary = cohort_run["out"], cohort_run["summary"]
    assert (summary.exams, summary.done, summary.failed, summary.unfinished) == (4, 2, 2, 0)
    for exam_id in ("F1", "N1"):
        folder = cohort.exam_folder(out, exam_id)
        assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {
            "vertebrae.csv", "muscles.csv", "exam.json", "qc.png"}
    errors = {row["exam_id"]: row for row in read_csv(out / cohort.ERRORS_FILE)}
    assert sorted(errors) == ["B1", "M1"] and {row["kind"] for row in errors.values()} == {"input"}
    assert errors["B1"]["stage"] == "input" and "broken.nii.gz" in errors["B1"]["reason"]
    assert errors["M1"]["stage"] == "input" and "missing.nii.gz" in errors["M1"]["reason"]
    assert "\n" not in errors["B1"]["reason"] and "Traceback" not in errors["B1"]["reason"]
    written = json.loads((out / cohort.SUMMARY_FILE).read_text())
    assert written["done"] == 2 and written["failed"] == 2 and written["this_run"]["screened"] == 2
    log_text = (out / cohort.LOG_FILE).read_text()
    assert "F1 done" in log_text and "B1 failed (input)" in log_text


def test_features_match_the_phantoms_truth(cohort_run, phantoms):
    rows = {row["exam_id"]: row for row in read_csv(cohort_run["out"] / cohort.FEATURES_FILE)}
    assert list(rows) == ["F1", "N1"]
    header = list(rows["F1"])
    assert header[:4] == ["exam_id", "age", "sex", "fracture"]
    assert header[4:] == ["features_version", *features.FEATURE_NAMES]
    assert rows["F1"]["age"] == "71" and rows["N1"]["sex"] == "M" and rows["F1"]["fracture"] == "1"
    for exam_id, name in (("F1", "fractured"), ("N1", "normal")):
        truth, row = truth_of(phantoms[name]), rows[exam_id]
        graded = [v for v in truth["vertebrae"] if v["complete"] and v["level"] != "S1"]
        assert float(row["max_genant_grade"]) == max(v["genant_grade"] for v in graded)
        assert float(row["fractured_count"]) == sum(v["genant_grade"] >= 1 for v in graded)
        # The truth's loss is the deformation; the SPEC's loss of a normal vertebra also holds its
        # physiological wedging (up to ~0.1 here), so only the fracture's loss is compared.
        if exam_id == "F1":
            assert float(row["max_height_loss"]) == pytest.approx(0.30, abs=0.07)  # 3 mm voxels
        else:
            assert float(row["max_height_loss"]) < 0.2
        true_hu = {v["level"]: v["trabecular_hu"] for v in truth["vertebrae"]}
        assert float(row["hu_L3"]) == pytest.approx(true_hu["L3"], abs=4)
        assert row["hu_T4"] == ""  # not in the field of view: missing, not zero
    assert float(rows["F1"]["l1_hu"]) == pytest.approx(95, abs=5) and float(rows["N1"]["l1_hu"]) == pytest.approx(180, abs=5)
    assert rows["F1"]["contrast_enhanced"] == "0" and rows["N1"]["contrast_enhanced"] == "1"
    # Muscle volume per cm of lumbar spine: the truth's L1–L5 volume over its slab's arc length.
    truth = truth_of(phantoms["normal"])
    lumbar = [m for m in truth["muscles"] if m["level"] == "lumbar"]
    length_cm = (lumbar[0]["slab_mm"][1] - lumbar[0]["slab_mm"][0]) / 10
    for group in ("autochthon", "iliopsoas"):
        volume = sum(m["volume_ml"] for m in lumbar if m["muscle"].startswith(group))
        assert float(rows["N1"][f"{group}_volume_ml_per_cm"]) == pytest.approx(volume / length_cm, rel=0.12)


def test_lumbar_length_follows_the_spine_curve(cohort_run, phantoms):
    exam = json.loads((cohort.exam_folder(cohort_run["out"], "N1") / "exam.json").read_text())
    truth = truth_of(phantoms["normal"])
    slab = next(m for m in truth["muscles"] if m["level"] == "lumbar")["slab_mm"]
    assert exam["muscle"]["lumbar_length_mm"] == pytest.approx(slab[1] - slab[0], rel=0.02)


def test_missing_values_stay_missing():
    values = features.exam_features({"bone": {"l1_hu": None}, "contrast": {"aorta_hu": None}}, [
        {"level": "L1", "complete": False, "genant_grade": None, "height_loss": math.nan, "trabecular_hu_mean": 120.0}])
    assert values["graded_count"] == 0
    for name in ("max_genant_grade", "fractured_count", "l1_hu", "hu_L1", "aorta_hu", "contrast_enhanced",
                 "autochthon_volume_ml_per_cm"):
        assert math.isnan(values[name]), name


def test_a_finished_cohort_reruns_in_seconds_and_changes_nothing(cohort_run, manifest):
    out = cohort_run["out"]
    before = tree_digest(out)
    started = time.perf_counter()
    summary = cohort.run_cohort(manifest, out, settings=cohort.CohortSettings(levels=lv.parse_level_range("T12-L5")))
    assert time.perf_counter() - started < 5
    assert (summary.screened_now, summary.failed_now, summary.skipped_now) == (0, 0, 4)
    assert tree_digest(out) == before


def test_retry_failed_screens_a_repaired_exam(cohort_run, manifest, phantoms, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cohort_run["out"], out)
    inputs = tmp_path / "inputs"
    shutil.copytree(manifest.parent, inputs)
    shutil.copy(phantoms["normal"]["ct"], inputs / "missing.nii.gz")
    settings = cohort.CohortSettings(levels=lv.parse_level_range("T12-L5"))
    assert cohort.run_cohort(inputs / "manifest.csv", out, settings=settings).screened_now == 0  # failed stays failed
    summary = cohort.run_cohort(inputs / "manifest.csv", out, settings=settings, retry_failed=True)
    assert (summary.screened_now, summary.failed_now, summary.done) == (1, 1, 3)
    assert not (cohort.exam_folder(out, "M1") / cohort.ERROR_FILE).exists()
    assert [row["exam_id"] for row in read_csv(out / cohort.ERRORS_FILE)] == ["B1"]
    assert [row["exam_id"] for row in read_csv(out / cohort.FEATURES_FILE)] == ["F1", "N1", "M1"]


def test_inputs_are_not_modified(cohort_run, manifest):
    assert sorted(p.name for p in manifest.parent.iterdir()) == sorted([
        "manifest.csv", "fractured.nii.gz", "fractured_total.nii.gz", "fractured_body.nii.gz", "normal.nii.gz",
        "normal_total.nii.gz", "broken.nii.gz"])


def test_cohort_applies_a_model_to_every_exam(manifest, tmp_path):
    summary = cohort.run_cohort(manifest, tmp_path / "out", settings=cohort.CohortSettings(qc=False, model="demo"))
    assert summary.done == 2
    for exam_id in ("F1", "N1"):
        exam = json.loads((cohort.exam_folder(tmp_path / "out", exam_id) / "exam.json").read_text())
        assert exam["model"]["demonstration"] is True and 0 <= exam["model"]["probability"] <= 1
    predictions = {row["exam_id"]: row for row in read_csv(tmp_path / "out" / cohort.PREDICTIONS_FILE)}
    assert list(predictions) == ["F1", "N1"] and predictions["F1"]["demonstration"] == "true"
    assert float(predictions["N1"]["probability"]) == pytest.approx(
        json.loads((cohort.exam_folder(tmp_path / "out", "N1") / "exam.json").read_text())["model"]["probability"], abs=1e-5)
    with pytest.raises(InputError, match="cannot read the model file"):
        cohort.run_cohort(manifest, tmp_path / "out2", settings=cohort.CohortSettings(model=str(tmp_path / "no.json")))
    assert not (tmp_path / "out2").exists()


def test_cancel_stops_between_exams(manifest, tmp_path):
    seen = []
    summary = cohort.run_cohort(manifest, tmp_path / "out", progress=seen.append, cancel=lambda: len(seen) >= 1,
                                settings=cohort.CohortSettings(qc=False))
    assert summary.screened_now + summary.failed_now == 1 and summary.unfinished == 3
    assert len(read_csv(tmp_path / "out" / cohort.FEATURES_FILE)) == 1


def test_cli_cohort_and_its_one_sentence_errors(manifest, tmp_path, capsys):
    assert main(["cohort", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert main(["cohort", str(manifest), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["cohort", str(manifest), "--out", str(tmp_path / "o"), "--segment-resources", "GPU"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    assert main(["cohort", str(manifest), "--out", str(tmp_path / "o"), "--no-qc", "--levels", "T12-L5"]) == 1
    captured = capsys.readouterr()
    assert "4 exams: 2 done, 2 failed" in captured.out and "[4/4]" in captured.err
    assert "2 of 4 exams failed" in captured.err and "--allow-failures" in captured.err
    assert main(["cohort", str(manifest), "--out", str(tmp_path / "o"), "--no-qc", "--levels", "T12-L5",
                 "--allow-failures"]) == 0  # the failures recorded before are allowed too
    assert "4 exams: 2 done, 2 failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Parallel, killed and distributed runs
# ------------------------------------------------------------------------------------------------


@needs_dask
def test_local_workers_give_the_same_features(cohort_run, manifest, tmp_path):
    out = tmp_path / "parallel"
    summary = cohort.run_cohort(manifest, out, workers=2, settings=cohort.CohortSettings(levels=lv.parse_level_range("T12-L5")))
    assert (summary.done, summary.failed) == (2, 2)
    assert len(summary.peak_rss_mib_per_worker) == 2  # two worker processes shared the exams
    assert (out / cohort.FEATURES_FILE).read_text() == (cohort_run["out"] / cohort.FEATURES_FILE).read_text()
    assert (out / cohort.ERRORS_FILE).read_text() == (cohort_run["out"] / cohort.ERRORS_FILE).read_text()


def copies_of(phantoms, root: Path, count: int) -> Path:
    root.mkdir()
    for number in range(count):
        shutil.copy(phantoms["fractured"]["ct"], root / f"exam{number:02d}.nii.gz")
        shutil.copy(phantoms["fractured"]["total"], root / f"exam{number:02d}_seg.nii.gz")
    return root


def finished_markers(out: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of every finished exam's ``exam.json``."""
    markers = {}
    for path in (out / cohort.EXAMS_FOLDER).glob(f"*/{cohort.FINISHED_FILE}"):
        stat = path.stat()
        markers[path.parent.name] = (stat.st_ino, stat.st_mtime_ns)
    return markers


EXAMS = 12


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=needs_dask)])
def test_sigkill_at_any_moment_then_rerun_does_every_exam_exactly_once(phantoms, tmp_path, workers):
    inputs = copies_of(phantoms, tmp_path / "in", EXAMS)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "VertebralFractureScreenLib.cli", "cohort", str(inputs), "--out", str(out),
               "--workers", str(workers), "--levels", "T12-L5"]
    rng = random.Random(workers)
    seen: dict[str, tuple[int, int]] = {}
    kills_mid_cohort = 0
    for round_number in range(5):
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if round_number == 0:
            time.sleep(0.3)  # during start-up, before any exam
        else:  # after one to three more exams have finished, at a random moment of the next ones
            target = len(finished_markers(out)) + rng.randint(1, 3)
            deadline = time.monotonic() + 120
            while run.poll() is None and len(finished_markers(out)) < target and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the whole run: the command and its worker processes
        run.wait()
        markers = finished_markers(out)
        assert all(markers[exam] == marker for exam, marker in seen.items()), "a finished exam was screened again"
        kills_mid_cohort += run.returncode == -signal.SIGKILL and 0 < len(markers) < EXAMS
        seen = markers
        if run.returncode == 0:
            break
    assert kills_mid_cohort >= 2, "fewer than two runs were killed half-way through the cohort"
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    markers = finished_markers(out)
    assert sorted(markers) == [f"exam{n:02d}" for n in range(EXAMS)]
    assert all(markers[exam] == marker for exam, marker in seen.items())
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".vfscreen-partial") or ".tmp-" in p.name]
    assert leftovers == []
    for path in out.rglob("exam.json"):
        json.loads(path.read_text())
    rows = read_csv(out / cohort.FEATURES_FILE)
    assert [row["exam_id"] for row in rows] == sorted(markers)
    assert read_csv(out / cohort.ERRORS_FILE) == []
    done_lines = [line.split()[3] for line in (out / cohort.LOG_FILE).read_text().splitlines() if " done in " in line]
    assert all(done_lines.count(exam) <= 1 for exam in markers)


def _start(command, env, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


@pytest.mark.slow
@needs_dask
def test_distributed_cluster_with_a_gpu_worker_for_segmentation(phantoms, tmp_path):
    """A real ``dask scheduler`` and two ``dask worker`` processes on loopback; one worker offers
    the resource GPU=1 and gets every TotalSegmentator task, the measurement runs anywhere."""
    pytest.importorskip("totalsegmentator")
    sys.path.insert(0, str(Path(__file__).parent))
    import fake_totalseg_weights as fake

    weights, home = tmp_path / "weights", tmp_path / "home"
    fake.write_fake_total_fast_weights(weights, label=lv.TOTAL_VERTEBRA_IDS["L1"], crop_label=lv.TOTAL_AORTA)
    home.mkdir()
    env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(weights), "TOTALSEG_HOME_DIR": str(home),
           "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    inputs = copies_of(phantoms, tmp_path / "in", 3)
    from VertebralFractureScreenLib.phantom import render as ph
    from VertebralFractureScreenLib.io.images import write_volume
    from VertebralFractureScreenLib.io.volume import Volume

    small = ph.make_phantom(ph.PhantomSpec(levels=("L1",), spacing=(3.0, 3.0, 3.0), noise_hu=20.0, supersampling=1))
    write_volume(inputs / "unsegmented.nii.gz", Volume(small.ct, small.ijk_to_ras))

    scheduler_file = tmp_path / "scheduler.json"
    processes = []
    try:
        processes.append(_start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                env, tmp_path / "scheduler.log"))
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), (tmp_path / "scheduler.log").read_text()
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                  "--nthreads", "1", "--no-dashboard", "--no-nanny", "--host", "127.0.0.1"]
        gpu_worker = _start(worker + ["--resources", "GPU=1"], env, tmp_path / "gpu-worker.log")
        cpu_worker = _start(worker, env, tmp_path / "cpu-worker.log")
        processes += [gpu_worker, cpu_worker]
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "out"
        # In its own process with a time limit: a hung worker fails the test instead of stopping CI.
        run = subprocess.run([sys.executable, "-m", "VertebralFractureScreenLib.cli", "cohort", str(inputs), "--out",
                              str(out), "--scheduler", address, "--quality", "fast", "--segment-resources", "GPU=1",
                              "--levels", "T12-L5"], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr + (out / cohort.LOG_FILE).read_text()
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    summary = json.loads((out / cohort.SUMMARY_FILE).read_text())
    assert (summary["done"], summary["failed"]) == (4, 0), (out / cohort.ERRORS_FILE).read_text()
    log_text = (out / cohort.LOG_FILE).read_text()
    line = next(line for line in log_text.splitlines() if "unsegmented done" in line)
    assert line.endswith(f"(segmented on {socket.gethostname()}:{gpu_worker.pid})")
    exam = json.loads((cohort.exam_folder(out, "unsegmented") / "exam.json").read_text())
    assert exam["inputs"]["segmented_by"].startswith("TotalSegmentator") and "reused" in exam["inputs"]["segmented_by"]
    assert [row["exam_id"] for row in read_csv(out / cohort.FEATURES_FILE)] == [
        "exam00", "exam01", "exam02", "unsegmented"]


def test_a_list_of_ct_files_finds_their_segmentations(tmp_path):
    touch(tmp_path / "a" / "x.nii.gz")
    touch(tmp_path / "a" / "x_total.nii.gz")
    touch(tmp_path / "a" / "x_vertebrae_body.nii.gz")
    touch(tmp_path / "a" / "xy.nii.gz")
    touch(tmp_path / "b" / "y.nrrd")
    exams = cohort.exams_from_files([tmp_path / "a" / "x.nii.gz", tmp_path / "a" / "xy.nii.gz", tmp_path / "b" / "y.nrrd"])
    assert [e.exam_id for e in exams] == ["x", "xy", "y"]
    assert Path(exams[0].seg).name == "x_total.nii.gz" and Path(exams[0].body_seg).name == "x_vertebrae_body.nii.gz"
    assert exams[1].seg is None and exams[2].seg is None
    touch(tmp_path / "c" / "x.nii.gz")
    with pytest.raises(InputError, match="several CTs have the exam ID x"):
        cohort.exams_from_files([tmp_path / "a" / "x.nii.gz", tmp_path / "c" / "x.nii.gz"])
    with pytest.raises(InputError, match="does not exist"):
        cohort.exams_from_files([tmp_path / "none.nii.gz"])


def test_a_dicom_series_folder_is_an_exam(example_data, tmp_path):
    """The shared example's DICOM series (20 slices, T11–T12) with its segmentation, by the folder
    rule: the series folder is the exam, ``<folder>_seg.nii.gz`` beside it its segmentation."""
    inputs = tmp_path / "in"
    shutil.copytree(example_data / "example_ct_dicom", inputs / "dicom_exam")
    shutil.copy(example_data / "example_seg_dicom.nii.gz", inputs / "dicom_exam_seg.nii.gz")
    exams = cohort.find_exams(inputs)
    assert [(e.exam_id, Path(e.seg).name) for e in exams] == [("dicom_exam", "dicom_exam_seg.nii.gz")]
    summary = cohort.run_cohort(inputs, tmp_path / "out", settings=cohort.CohortSettings(qc=False))
    assert (summary.done, summary.failed) == (1, 0), (tmp_path / "out" / cohort.ERRORS_FILE).read_text()
    exam = json.loads((cohort.exam_folder(tmp_path / "out", "dicom_exam") / "exam.json").read_text())
    assert set(exam["levels_present"]) <= {"T11", "T12", "L1"} and exam["levels_complete"] == []  # cut by the FOV
    row = read_csv(tmp_path / "out" / cohort.FEATURES_FILE)[0]
    assert row["exam_id"] == "dicom_exam" and row["graded_count"] == "0" and row["max_genant_grade"] == ""


def test_the_rate_counts_screened_exams_and_the_summary_repeats_the_last_line():
    """A failure that takes a millisecond is no throughput: no rate before the first screened exam,
    and the summary's rate is the one the last progress line showed."""
    state = cohort.CohortProgress(total=3, started=100.0)
    state.failed = 1
    assert "exams/min" not in state.line()
    state.done, state.last_done_at = 2, 130.0  # two screened in 30 s
    assert " · 4.0 exams/min" in state.line()
    summary = cohort.CohortSummary(exams=3, done=2, failed=1, unfinished=0, screened_now=2, failed_now=1,
                                   skipped_now=0, seconds=31.5, workers="in-process",
                                   screening_seconds=state.last_done_at - state.started)
    assert summary.exams_per_minute == state.exams_per_minute() == 4.0
    assert ", 4.0 exams/min" in summary.text() and summary.to_dict()["this_run"]["exams_per_minute"] == 4.0


def test_a_usage_error_names_the_program_once(capsys):
    from VertebralFractureScreenLib.cli import main

    assert main(["screen", "ct.nii.gz", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("vfscreen") == 2 and err.startswith("vfscreen: unrecognized arguments: --bogus"), err
