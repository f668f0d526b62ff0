"""Segmentation by TotalSegmentator (``segmentation.segment_ct``), tested offline.

The integration tests run TotalSegmentator's real inference path (its Python API, nnU-Net v2
preprocessing, sliding-window prediction and export, its cropping for ``roi_subset``, resampling
back to the CT) with tiny randomly initialised checkpoints written into a temporary weights folder
(``fake_totalseg_weights``): their segmentation heads predict one known label everywhere, so the
expected output is exact. ``TOTALSEG_WEIGHTS_PATH`` and ``TOTALSEG_HOME_DIR`` point into temporary
folders, so the user's own TotalSegmentator weights and config are never touched, and the HTTP(S)
proxy points at a local socket that records every connection attempt, so anything that would
phone home is caught here instead of reaching the network.

They skip, with the reason, when TotalSegmentator, nnU-Net or PyTorch is not installed (the
``segment`` extra); CI installs it, so there they run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureScreenLib import levels
from VertebralFractureScreenLib.segment import totalsegmentator as segmentation
from VertebralFractureScreenLib.errors import DependencyError, InputError, VFSError
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap, write_volume
from VertebralFractureScreenLib.io.volume import Volume

import fake_totalseg_weights as fake  # Testing/ is on sys.path under pytest, as for mrml_support
from totalseg_offline import needs_totalsegmentator, phantom_ct, set_offline_environment

L1 = levels.TOTAL_VERTEBRA_IDS["L1"]  # what the fake 3 mm `total` model predicts everywhere
AORTA = levels.TOTAL_AORTA  # what the fake 6 mm crop model predicts everywhere
BODY = levels.BODY_LABEL  # what the fake vertebrae_body model predicts everywhere


@pytest.fixture(scope="module")
def offline(tmp_path_factory, trap):
    """Fake weights for `total` (fast, with the crop model) and `vertebrae_body`, an empty
    TotalSegmentator home (as on a fresh machine) and the connection trap as proxy."""
    root = tmp_path_factory.mktemp("totalseg")
    weights, home = root / "weights", root / "home"
    fake.write_fake_total_fast_weights(weights, label=L1, crop_label=AORTA)
    fake.write_fake_vertebrae_body_weights(weights, label=BODY)
    home.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_offline_environment(monkeypatch, weights, home, trap)
        yield {"root": root, "weights": weights, "home": home}


@pytest.fixture(scope="module")
def screened(offline, trap):
    """One `fast` run with the `vertebrae_body` task on an NRRD CT on an oblique grid (the CT
    goes through our reader, as DICOM would), with the default classes and settings."""
    ct_path = offline["root"] / "ct.nrrd"
    write_volume(ct_path, phantom_ct("oblique"))
    out = offline["root"] / "screen"
    result = segmentation.segment_ct(ct_path, out, quality="fast", body=True)
    return {"ct_path": ct_path, "out": out, "result": result, "requests": list(trap.requests),
            "config": json.loads((offline["home"] / "config.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def subset_run(screened, offline, trap):
    """A run that asks only for the aorta and the cord on a NIfTI CT: the crop model finds the
    aorta, the 3 mm model predicts L1 everywhere, and TotalSegmentator must drop it. Usage
    statistics are switched on here, to see that the switch really controls the sending."""
    ct_path = offline["root"] / "ct_lps.nii.gz"
    write_volume(ct_path, phantom_ct("LPS"))
    out = offline["root"] / "subset"
    before = len(trap.requests)
    result = segmentation.segment_ct(ct_path, out, quality="fast", classes=("spinal_cord", "aorta"),
                                     usage_statistics=True)
    return {"ct_path": ct_path, "out": out, "result": result, "requests": trap.requests[before:],
            "config": json.loads((offline["home"] / "config.json").read_text(encoding="utf-8"))}


# ------------------------------------------------------------------------------------------------
# Without TotalSegmentator
# ------------------------------------------------------------------------------------------------


def test_screening_classes_are_the_issue_s_total_classes():
    names = set(levels.TOTAL_CLASS_NAMES.values())
    assert set(segmentation.SCREENING_CLASSES) <= names
    expected_levels = levels.LEVELS[levels.LEVEL_INDEX["T1"]:]
    assert {f"vertebrae_{level}" for level in expected_levels} <= set(segmentation.SCREENING_CLASSES)
    assert not any(name.startswith("vertebrae_C") for name in segmentation.SCREENING_CLASSES)
    for name in ("sacrum", "spinal_cord", "aorta", *levels.MUSCLE_NAMES):
        assert name in segmentation.SCREENING_CLASSES


@pytest.fixture
def tiny_ct(tmp_path) -> Path:
    path = tmp_path / "ct.nii.gz"
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 400, (6, 8, 7)).astype(np.int16)
    write_volume(path, Volume(array, np.diag([2.0, 2.0, 3.0, 1.0])))
    return path


def test_missing_totalsegmentator_is_one_sentence_saying_how_to_install(tiny_ct, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # makes `import totalsegmentator` fail
    with pytest.raises(DependencyError) as caught:
        segmentation.segment_ct(tiny_ct, tmp_path / "out", quality="fast")
    message = str(caught.value)
    assert "vfscreen setup-segmentation" in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert not (tmp_path / "out" / segmentation.TOTAL_FILE).exists()


@pytest.mark.parametrize("options, words", [({"quality": "best"}, "quality"), ({"device": "cuda"}, "device"),
                                            ({"device": "gpu:x"}, "device")])
def test_unknown_quality_or_device_is_an_input_error(tiny_ct, tmp_path, options, words):
    with pytest.raises(InputError, match=words):
        segmentation.segment_ct(tiny_ct, tmp_path / "out", **options)


def test_bad_ct_or_output_folder_is_an_input_error(tiny_ct, tmp_path):
    with pytest.raises(InputError, match="not found"):
        segmentation.segment_ct(tmp_path / "absent.nii.gz", tmp_path / "out")
    with pytest.raises(InputError, match="is a file"):
        segmentation.segment_ct(tiny_ct, tiny_ct)


# ------------------------------------------------------------------------------------------------
# With TotalSegmentator, without inference
# ------------------------------------------------------------------------------------------------


@needs_totalsegmentator
def test_our_label_ids_are_totalsegmentator_s():
    from totalsegmentator.map_to_binary import class_map

    for label, name in levels.TOTAL_CLASS_NAMES.items():
        assert class_map["total"][label] == name
    assert class_map["vertebrae_body"] == {levels.BODY_LABEL: "vertebrae_body",
                                           levels.DISC_LABEL: "intervertebral_discs"}


@needs_totalsegmentator
def test_vertebrae_body_is_an_open_task():
    from totalsegmentator.registry import requires_license

    assert not requires_license("vertebrae_body") and not requires_license("total")


@needs_totalsegmentator
@pytest.mark.parametrize("quality, body, command, datasets, not_needed", [
    ("fast", False, "totalseg_download_weights -t total_fast", ("Dataset297_", "Dataset298_"), ("Dataset305_",)),
    ("normal", True, "totalseg_download_weights -t total && totalseg_download_weights -t vertebrae_body",
     ("Dataset291_", "Dataset292_", "Dataset295_", "Dataset298_", "Dataset305_"), ("Dataset297_",)),
])
def test_missing_weights_are_one_sentence_saying_how_to_get_them(tiny_ct, tmp_path, monkeypatch, quality, body,
                                                                 command, datasets, not_needed):
    weights, home = tmp_path / "weights", tmp_path / "home"
    weights.mkdir()
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    with pytest.raises(DependencyError) as caught:
        segmentation.segment_ct(tiny_ct, tmp_path / "out", quality=quality, body=body)
    message = str(caught.value)
    assert command in message and str(weights) in message and "TOTALSEG_WEIGHTS_PATH" in message
    assert all(name in message for name in datasets) and not any(name in message for name in not_needed)
    assert "\n" not in message
    assert list(weights.iterdir()) == []  # nothing was downloaded or created
    assert not home.exists()  # TotalSegmentator's config was not even created


@needs_totalsegmentator
def test_gpu_without_cuda_is_one_clear_sentence(tiny_ct, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(InputError, match="no CUDA GPU") as caught:
        segmentation.segment_ct(tiny_ct, tmp_path / "out", device="gpu")
    assert "use the device cpu" in str(caught.value)


@needs_totalsegmentator
def test_unknown_class_is_a_programming_error(tiny_ct, tmp_path):
    with pytest.raises(ValueError, match="vertebrae_L9"):
        segmentation.segment_ct(tiny_ct, tmp_path / "out", classes=("vertebrae_L9",))


# ------------------------------------------------------------------------------------------------
# TotalSegmentator's real inference path, with the fake checkpoints
# ------------------------------------------------------------------------------------------------


@needs_totalsegmentator
def test_total_map_has_the_model_s_label_on_the_ct_grid(screened):
    result = screened["result"]
    ct = read_ct(screened["ct_path"])
    total = read_labelmap(result.total_path)
    assert result.total_path == screened["out"] / segmentation.TOTAL_FILE
    assert total.same_grid(ct, tol=1e-3)  # oblique grid, written as NIfTI
    assert total.array.dtype == np.uint8
    assert np.all(total.array == L1)  # the 3 mm model's answer, in `total` ids (not roi_subset order)
    assert result.present == ("vertebrae_L1",)
    assert result.quality == "fast" and not result.reused and result.seconds > 0


@needs_totalsegmentator
def test_vertebrae_body_map_is_written_beside_it(screened):
    result = screened["result"]
    body = read_labelmap(result.body_path)
    assert result.body_path == screened["out"] / segmentation.BODY_FILE
    assert body.same_grid(read_ct(screened["ct_path"]), tol=1e-3)
    assert np.all(body.array == BODY)


@needs_totalsegmentator
def test_manifest_says_how_the_segmentation_was_made(screened):
    result = screened["result"]
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert manifest["format"] == segmentation.MANIFEST_FORMAT
    assert manifest["ct"]["source"] == str(screened["ct_path"].resolve())
    assert manifest["ct"]["fingerprint"].startswith("sha256:")
    total, body = manifest["total"], manifest["vertebrae_body"]
    assert total["task"] == "total" and total["quality"] == "fast" and total["file"] == segmentation.TOTAL_FILE
    ids = {name: label for label, name in levels.TOTAL_CLASS_NAMES.items()}
    assert total["roi_subset"] == sorted(segmentation.SCREENING_CLASSES, key=ids.__getitem__)
    assert list(result.classes) == total["roi_subset"]
    assert total["labels"] == {str(ids[name]): name for name in total["roi_subset"]}
    assert total["datasets"] == [fake.dataset_folder(297), fake.dataset_folder(298)]
    assert body["task"] == "vertebrae_body" and body["datasets"] == [fake.dataset_folder(305)]
    assert body["present"] == ["vertebrae_body"]
    import totalsegmentator  # noqa: F401  (installed: the version is recorded)
    from importlib.metadata import version
    assert total["totalsegmentator_version"] == version("TotalSegmentator") == result.totalsegmentator_version
    assert total["nnunetv2_version"] == version("nnunetv2") and total["torch_version"] == version("torch")
    assert total["usage_statistics"] is False


@needs_totalsegmentator
def test_usage_statistics_are_off_by_default_and_nothing_phones_home(screened):
    config = screened["config"]
    assert config["send_usage_stats"] is False
    assert config["prediction_counter"] == 2  # TotalSegmentator ran twice (total, vertebrae_body) ...
    assert screened["requests"] == []  # ... and tried no connection at all


@needs_totalsegmentator
def test_a_repeated_run_reuses_the_segmentation(screened):
    out = screened["out"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = segmentation.segment_ct(screened["ct_path"], out, quality="fast", body=True)
    assert again.reused and again.seconds == 0
    assert (again.total_path, again.body_path, again.present) == (screened["result"].total_path,
                                                                 screened["result"].body_path, ("vertebrae_L1",))
    # the same voxels given as a Volume are the same CT; without body the body map is not returned
    volume = read_ct(screened["ct_path"])
    without_body = segmentation.segment_ct(volume, out, quality="fast")
    assert without_body.reused and without_body.body_path is None
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


@needs_totalsegmentator
def test_another_ct_or_quality_is_segmented_again(screened, tmp_path, monkeypatch):
    """A changed CT or quality is not served from the old files: with no weights available the
    call must ask for them (it would have returned at once had it reused)."""
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))  # empty: nothing can run
    out = screened["out"]
    volume = read_ct(screened["ct_path"])
    changed = Volume(volume.array.copy(), volume.ijk_to_ras)
    changed.array[0, 0, 0] += 1
    with pytest.raises(DependencyError, match="total_fast"):
        segmentation.segment_ct(changed, out, quality="fast")
    with pytest.raises(DependencyError, match="-t total`"):
        segmentation.segment_ct(volume, out, quality="normal")
    with pytest.raises(DependencyError, match="total_fast"):
        segmentation.segment_ct(volume, out, quality="fast", reuse=False)
    assert segmentation.segment_ct(volume, out, quality="fast").reused  # the files are still intact


@needs_totalsegmentator
def test_roi_subset_keeps_only_the_requested_classes(subset_run):
    result = subset_run["result"]
    total = read_labelmap(result.total_path)
    assert total.same_grid(read_ct(subset_run["ct_path"]), tol=1e-3)
    assert np.all(total.array == 0)  # the model said L1 everywhere, which was not asked for
    assert result.classes == ("aorta", "spinal_cord") and result.present == ()
    assert result.body_path is None and not (subset_run["out"] / segmentation.BODY_FILE).exists()
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert manifest["total"]["labels"] == {str(AORTA): "aorta", str(levels.TOTAL_SPINAL_CORD): "spinal_cord"}
    assert manifest["vertebrae_body"] is None


@needs_totalsegmentator
def test_usage_statistics_switch_controls_the_sending(subset_run):
    assert subset_run["config"]["send_usage_stats"] is True
    assert any("stats.totalsegmentator.com" in line for line in subset_run["requests"]), subset_run["requests"]


@needs_totalsegmentator
def test_failed_download_is_one_sentence(subset_run, offline, trap, tmp_path):
    """With downloads allowed, TotalSegmentator tries to fetch the missing 1.5 mm models; here the
    attempt reaches only the local trap, and the failure becomes one sentence."""
    before = len(trap.requests)
    with pytest.raises(DependencyError) as caught:
        segmentation.segment_ct(subset_run["ct_path"], tmp_path / "out", quality="normal", download=True)
    message = str(caught.value)
    assert "could not download" in message and "totalseg_download_weights -t total" in message
    assert "\n" not in message
    assert any("github.com" in line for line in trap.requests[before:]), trap.requests[before:]
    assert not list(offline["weights"].glob("*.zip"))


def test_vfs_errors_are_the_cli_s_one_sentence_errors():
    from VertebralFractureScreenLib.errors import SegmentationError

    assert issubclass(DependencyError, VFSError) and issubclass(SegmentationError, VFSError)


@pytest.mark.slow
@needs_totalsegmentator
def test_vfscreen_screen_without_seg_segments_then_screens(offline, trap, tmp_path, capsys):
    """``vfscreen screen CT`` with no ``--seg``: TotalSegmentator segments (the fake model calls
    every voxel L1), the label maps are kept under OUT/segmentation/ and the screening runs on
    them: a vertebra filling the whole field of view is reported incomplete, never graded."""
    from VertebralFractureScreenLib.cli import main

    ct_path = tmp_path / "ct.nii.gz"
    write_volume(ct_path, phantom_ct("RAS"))
    out = tmp_path / "out"
    requests_before = len(trap.requests)
    assert main(["screen", str(ct_path), "--out", str(out), "--quality", "fast", "--body"]) == 0, capsys.readouterr().err
    assert (out / "segmentation" / segmentation.TOTAL_FILE).exists()
    exam = json.loads((out / "exam.json").read_text())
    assert exam["inputs"]["segmented_by"].startswith("TotalSegmentator")
    assert exam["levels_present"] == ["L1"] and exam["levels_complete"] == []
    assert exam["fracture"]["max_grade"] is None
    rows = (out / "vertebrae.csv").read_text().splitlines()
    assert rows[1].split(",")[1:3] == ["L1", "false"]
    # A second run reuses the segmentation instead of segmenting again.
    assert main(["screen", str(ct_path), "--out", str(out), "--quality", "fast", "--body"]) == 0
    assert "reused" in json.loads((out / "exam.json").read_text())["inputs"]["segmented_by"]
    assert trap.requests[requests_before:] == []  # statistics off: nothing tried to reach the network


def test_totalsegmentator_runs_off_the_main_thread_use_spawn():
    """A Dask worker runs tasks in a thread; nnU-Net's pools forked from there can deadlock, so
    the run switches to forkserver there (and only there) and restores the start method afterwards."""
    import multiprocessing
    import threading

    seen = {}
    before = multiprocessing.get_start_method(allow_none=True)
    with segmentation.no_fork_off_the_main_thread():
        seen["main"] = multiprocessing.get_start_method(allow_none=True)

    def in_thread():
        with segmentation.no_fork_off_the_main_thread():
            seen["thread"] = multiprocessing.get_start_method()
        seen["after"] = multiprocessing.get_start_method(allow_none=True)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen["main"] == before and seen["thread"] == "forkserver" and seen["after"] == before


@pytest.mark.slow
@needs_totalsegmentator
def test_segment_ribs_asks_totalsegmentator_for_the_ribs_too(offline, trap, tmp_path, capsys):
    """``--segment-ribs``: the 24 rib classes join the ``roi_subset`` (the manifest says so), and
    at ``normal`` quality the ribs' model part joins the models that run."""
    from VertebralFractureScreenLib.cli import main
    from VertebralFractureScreenLib.segment import totalsegmentator as ts_module

    ct_path = tmp_path / "ct.nii.gz"
    write_volume(ct_path, phantom_ct("RAS"))
    out = tmp_path / "out"
    assert main(["screen", str(ct_path), "--out", str(out), "--quality", "fast", "--segment-ribs"]) == 0, \
        capsys.readouterr().err
    manifest = json.loads((out / "segmentation" / segmentation.MANIFEST_FILE).read_text())
    subset = set(manifest["total"]["roi_subset"])
    assert set(ts_module.RIB_CLASSES) <= subset and set(segmentation.SCREENING_CLASSES) <= subset
    assert len(ts_module.RIB_CLASSES) == 24 and "rib_left_1" in ts_module.RIB_CLASSES
    ts = ts_module._load_totalsegmentator()
    plain = ts_module._datasets(ts, "total", "normal", segmentation.SCREENING_CLASSES, loaded_only=True)
    ribbed = ts_module._datasets(ts, "total", "normal", segmentation.SCREENING_CLASSES + ts_module.RIB_CLASSES,
                                 loaded_only=True)
    assert len(ribbed) == len(plain) + 1
