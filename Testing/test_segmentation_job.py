"""Segmentation in a child process (``segmentation_job``), as the Slicer module runs it.

The jobs run TotalSegmentator's real inference path offline, as ``test_segmentation.py`` does:
tiny fake nnU-Net checkpoints in a temporary ``TOTALSEG_WEIGHTS_PATH`` (every voxel predicted as
L1), a temporary ``TOTALSEG_HOME_DIR``, and an HTTP(S) proxy that records every connection
attempt. That environment is handed to the child through ``SegmentationJob(env=...)``.

Every wait is bounded: a job that does not end within ``JOB_LIMIT_S`` is cancelled and the test
fails saying so. Timing bounds are generous liveness bounds (the suite runs on a loaded machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureScreenLib import errors, levels
from VertebralFractureScreenLib.segment import totalsegmentator as segmentation
from VertebralFractureScreenLib.errors import DependencyError, InputError, SegmentationError, VFSError
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap, write_volume
from VertebralFractureScreenLib.segment.job import SegmentationCancelled, SegmentationJob, remove_half_made, main, run_job

import fake_totalseg_weights as fake  # Testing/ is on sys.path under pytest
from totalseg_offline import needs_totalsegmentator, offline_env, phantom_ct

L1 = levels.TOTAL_VERTEBRA_IDS["L1"]  # what the fake 3 mm `total` model predicts everywhere
AORTA = levels.TOTAL_AORTA  # what the fake 6 mm crop model predicts everywhere

JOB_LIMIT_S = 300.0
"""Longest a job may run here (one fast run takes about 20 s on an idle 2-core machine)."""

CANCEL_LIMIT_S = 15.0
"""Longest from the cancel request until ``run_job`` raises and every process is gone."""

posix_only = pytest.mark.skipif(os.name != "posix", reason="checks POSIX process groups")


def _run(job: SegmentationJob, *, cancelled=None, **callbacks):
    """``run_job`` with a deadline: a job still running after JOB_LIMIT_S is cancelled and fails the test."""
    deadline = time.monotonic() + JOB_LIMIT_S
    overdue = []

    def stop() -> bool:
        if time.monotonic() > deadline:
            overdue.append(True)
            return True
        return bool(cancelled and cancelled())

    try:
        return run_job(job, cancelled=stop, **callbacks)
    except SegmentationCancelled:
        if overdue:
            pytest.fail(f"the segmentation job did not end within {JOB_LIMIT_S:.0f} s")
        raise


def _live_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of a process group, from /proc, or from killpg."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_until(condition, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit_s:.0f} s")
        time.sleep(0.05)


def _one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


@pytest.fixture(scope="module")
def offline(tmp_path_factory, trap):
    """Fake `total` fast weights (with the crop model), an empty TotalSegmentator home, a phantom
    CT as NIfTI (as the Slicer module writes it), and the child's environment."""
    root = tmp_path_factory.mktemp("totalseg_job")
    weights, home = root / "weights", root / "home"
    fake.write_fake_total_fast_weights(weights, label=L1, crop_label=AORTA)
    home.mkdir()
    ct_path = root / "ct.nii.gz"
    write_volume(ct_path, phantom_ct("RAS"))
    return {"root": root, "weights": weights, "home": home, "ct": ct_path, "env": offline_env(weights, home, trap)}


def _assert_nothing_half_made(out: Path) -> None:
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"left in the output folder: {left}"


# ------------------------------------------------------------------------------------------------
# With TotalSegmentator in the child
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_totalsegmentator
def test_a_job_segments_in_a_child_process_while_the_caller_stays_responsive(offline, trap, tmp_path):
    out = tmp_path / "out"
    job = SegmentationJob(offline["ct"], out, quality="fast", device="cpu", env=offline["env"])
    lines, running_at_events = [], []
    before = len(trap.requests)
    result = _run(job, log=lines.append, process_events=lambda: running_at_events.append(job.running))

    assert job.returncode == 0 and job.process.pid != os.getpid()
    assert lines[0].startswith(f"Segmenting {offline['ct']} with TotalSegmentator (quality fast"), lines
    assert any(line.startswith("Segmentation done") for line in lines), lines
    assert not any(line.startswith("VFS-") for line in lines)  # the protocol line is not log
    assert running_at_events.count(True) >= 10  # called all along while the child ran
    # The label map is what the fake 3 mm model predicts, on the CT's grid.
    total = read_labelmap(result.total_path)
    assert result.total_path == out / segmentation.TOTAL_FILE
    assert total.same_grid(read_ct(offline["ct"]), tol=1e-3)
    assert np.all(total.array == L1)
    assert result.present == ("vertebrae_L1",) and result.quality == "fast" and not result.reused
    assert result.body_path is None and result.manifest_path == out / segmentation.MANIFEST_FILE
    assert isinstance(result.classes, tuple) and "vertebrae_L1" in result.classes
    assert sorted(p.name for p in out.iterdir()) == sorted([segmentation.TOTAL_FILE, segmentation.MANIFEST_FILE])
    assert not job.temp_dir.exists()  # the child's TMPDIR (TotalSegmentator's nnunet_tmp_*) is gone
    assert json.loads((offline["home"] / "config.json").read_text())["send_usage_stats"] is False
    assert trap.requests[before:] == []  # nothing tried to reach the network


@needs_totalsegmentator
@posix_only
def test_cancel_stops_the_child_and_its_workers_and_leaves_nothing_half_made(offline, tmp_path):
    """``cancelled()`` turns true once the child has logged and nnU-Net's workers are running."""
    out = tmp_path / "out"
    job = SegmentationJob(offline["ct"], out, quality="fast", env=offline["env"])
    lines, asked, members = [], [], []

    def cancelled() -> bool:
        if not asked and lines:
            group = _live_members(job.process.pid)
            if len(group) > 1 or not os.path.isdir("/proc/self"):  # the child and its workers
                members.extend(group)
                asked.append(time.monotonic())
        return bool(asked)

    try:
        _run(job, log=lines.append, cancelled=cancelled)
    except SegmentationCancelled as error:
        caught = error
    else:
        pytest.fail("the job ended before nnU-Net started a worker process: nothing to cancel")
    elapsed = time.monotonic() - asked[0]

    assert elapsed < CANCEL_LIMIT_S, f"cancelling took {elapsed:.1f} s"
    _one_sentence(str(caught))
    assert not isinstance(caught, SegmentationError)  # a cancel is not a failure
    assert job.returncode is not None and job.returncode < 0  # killed by a signal
    assert _live_members(job.process.pid) == []
    assert [pid for pid in members if _alive(pid)] == []
    _assert_nothing_half_made(out)  # no total.nii.gz, no manifest, no hidden temporary
    assert not job.temp_dir.exists()
    with pytest.raises(SegmentationCancelled):
        job.result()


@needs_totalsegmentator
@posix_only
def test_the_child_stops_its_workers_when_the_gui_process_is_gone(offline, tmp_path):
    """The job holds the child's stdin; when it closes (Slicer crashed or was killed), the child
    kills its process group instead of computing on as an orphan."""
    out = tmp_path / "out"
    job = SegmentationJob(offline["ct"], out, quality="fast", env=offline["env"])
    job.start()
    try:
        def workers_started() -> bool:
            job.poll()  # the log is not needed here
            return not job.running or len(_live_members(job.process.pid)) > 1

        _wait_until(workers_started, JOB_LIMIT_S, "nnU-Net starting its workers")
        assert job.running, "the job ended before nnU-Net started a worker process"
        job.process.stdin.close()
        _wait_until(lambda: not _live_members(job.process.pid), CANCEL_LIMIT_S, "the child's group ending")
        _wait_until(lambda: not job.running, CANCEL_LIMIT_S, "the job noticing its end")
    finally:
        job.cancel()
    assert job.returncode == -9
    with pytest.raises(SegmentationError, match="TotalSegmentator stopped") as caught:
        job.result()
    _one_sentence(str(caught.value))
    _assert_nothing_half_made(out)
    assert not job.temp_dir.exists()


@needs_totalsegmentator
def test_missing_weights_are_one_sentence_from_the_child_and_nothing_is_fetched(trap, tmp_path):
    weights, home, out = tmp_path / "weights", tmp_path / "home", tmp_path / "out"
    weights.mkdir()
    ct_path = tmp_path / "ct.nii.gz"
    write_volume(ct_path, phantom_ct("RAS"))
    before = len(trap.requests)
    job = SegmentationJob(ct_path, out, quality="fast", env=offline_env(weights, home, trap))
    with pytest.raises(DependencyError) as caught:
        _run(job)
    message = str(caught.value)
    _one_sentence(message)
    assert "totalseg_download_weights -t total_fast" in message and str(weights) in message
    assert "TOTALSEG_WEIGHTS_PATH" in message
    assert type(caught.value) is getattr(errors, type(caught.value).__name__)  # the child's own class
    assert job.returncode == 2
    _assert_nothing_half_made(out)
    assert list(weights.iterdir()) == [] and not home.exists()  # nothing downloaded or configured
    assert trap.requests[before:] == []


# ------------------------------------------------------------------------------------------------
# Without TotalSegmentator (the child fails before it needs it)
# ------------------------------------------------------------------------------------------------


def test_a_missing_ct_is_an_input_error_from_the_child(tmp_path):
    job = SegmentationJob(tmp_path / "absent.nii.gz", tmp_path / "out", quality="fast")
    lines = []
    with pytest.raises(InputError, match="not found") as caught:
        _run(job, log=lines.append)
    _one_sentence(str(caught.value))
    with pytest.raises(InputError) as in_process:
        segmentation.segment_ct(tmp_path / "absent.nii.gz", tmp_path / "out", quality="fast")
    assert str(caught.value) == str(in_process.value)  # the library's own sentence, unchanged
    assert job.returncode == 2
    assert lines and lines[0].startswith("Segmenting ")  # its log still reached the caller
    assert not job.temp_dir.exists()


def test_an_unexpected_crash_is_one_sentence_and_its_traceback_goes_to_the_log(tmp_path):
    """A bug in the child (here a ``segment_ct`` replaced by a ``sitecustomize`` module on the
    child's PYTHONPATH) exits 1; the job says "TotalSegmentator stopped" in one sentence."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import VertebralFractureScreenLib.segment.totalsegmentator as s\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('simulated crash\\non two lines')\n"
        "s.segment_ct = broken\n", encoding="utf-8")
    job = SegmentationJob(tmp_path / "ct.nii.gz", tmp_path / "out", env={"PYTHONPATH": str(site)})
    lines = []
    with pytest.raises(SegmentationError) as caught:
        _run(job, log=lines.append)
    assert str(caught.value) == "TotalSegmentator stopped: RuntimeError: simulated crash on two lines."
    assert job.returncode == 1
    assert any(line.startswith("Traceback") for line in lines), lines


def _busy_child_env(tmp_path) -> dict:
    """Environment whose ``sitecustomize`` makes the child's ``segment_ct`` start a long-lived
    process of its own (as nnU-Net starts workers, but one that never ends by itself), log its
    pid, and compute for ten minutes: only stopping the whole process group ends them in time."""
    site = tmp_path / "busy_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import subprocess, sys, time\n"
        "import VertebralFractureScreenLib.segment.totalsegmentator as s\n"
        "def busy(*args, **kwargs):\n"
        "    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "    print('worker', worker.pid, flush=True)\n"
        "    time.sleep(600)\n"
        "s.segment_ct = busy\n", encoding="utf-8")
    return {"PYTHONPATH": str(site)}


def _worker_pid(lines) -> int | None:
    pids = [int(line.split()[1]) for line in lines if line.startswith("worker ")]
    return pids[0] if pids else None


@posix_only
def test_cancel_also_stops_a_descendant_that_would_outlive_the_child(tmp_path):
    out = tmp_path / "out"
    job = SegmentationJob(tmp_path / "ct.nii.gz", out, env=_busy_child_env(tmp_path))
    lines, asked = [], []

    def cancelled() -> bool:
        if not asked and _worker_pid(lines):
            asked.append(time.monotonic())
        return bool(asked)

    with pytest.raises(SegmentationCancelled):
        _run(job, log=lines.append, cancelled=cancelled)
    assert time.monotonic() - asked[0] < CANCEL_LIMIT_S
    assert not _alive(_worker_pid(lines)) and _live_members(job.process.pid) == []
    assert job.returncode == -15  # SIGTERM was enough
    _assert_nothing_half_made(out)


@posix_only
def test_closing_the_child_s_stdin_stops_a_descendant_that_would_outlive_it(tmp_path):
    job = SegmentationJob(tmp_path / "ct.nii.gz", tmp_path / "out", env=_busy_child_env(tmp_path))
    lines = []
    job.start()
    try:
        _wait_until(lambda: lines.extend(job.poll(0.05)) or _worker_pid(lines), 60, "the child logging its worker")
        job.process.stdin.close()  # as when the GUI process dies
        _wait_until(lambda: not _live_members(job.process.pid), CANCEL_LIMIT_S, "the child's group ending")
    finally:
        job.cancel()
    assert not _alive(_worker_pid(lines)) and job.returncode == -9


def test_a_python_that_cannot_start_is_a_dependency_error(tmp_path):
    job = SegmentationJob(tmp_path / "ct.nii.gz", tmp_path / "out", python=str(tmp_path / "no-python"))
    with pytest.raises(DependencyError, match="cannot start the Python") as caught:
        job.start()
    _one_sentence(str(caught.value))
    assert not job.running and not job.temp_dir.exists()
    assert job.cancel() is True  # nothing to stop


def test_the_child_reports_errors_as_one_machine_readable_last_line(tmp_path, capsys):
    assert main(["only-a-ct"]) == 2
    assert capsys.readouterr().out.splitlines()[-1].startswith("VFS-ERROR InputError segmentation_job: ")
    assert main([str(tmp_path / "absent.nii.gz"), str(tmp_path / "out"), "--quality", "best"]) == 2
    assert capsys.readouterr().out.splitlines()[-1].startswith("VFS-ERROR InputError unknown segmentation quality")


def test_result_before_the_end_is_a_programming_error(tmp_path):
    with pytest.raises(RuntimeError, match="not finished"):
        SegmentationJob(tmp_path / "ct.nii.gz", tmp_path / "out").result()


def test_half_made_files_are_removed_and_complete_ones_kept(tmp_path):
    """After a failure: hidden temporaries of interrupted atomic writes go, and so does a label map
    that the manifest does not name (segment_ct would not reuse it); named files and others stay."""
    manifest = {"format": segmentation.MANIFEST_FORMAT, "ct": {"fingerprint": "x"},
                "total": {"file": segmentation.TOTAL_FILE}, "vertebrae_body": None}
    (tmp_path / segmentation.MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    for name in (segmentation.TOTAL_FILE, segmentation.BODY_FILE, ".total.tmp-0a1b2c.nii.gz",
                 ".segmentation.tmp-3d4e5f.json", ".vertebrae_body.tmp-9a8b7c.nii.gz", "ct.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    remove_half_made(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [segmentation.MANIFEST_FILE, segmentation.TOTAL_FILE, "ct.nii.gz"])
    (tmp_path / segmentation.MANIFEST_FILE).unlink()  # no manifest: no label map is complete
    remove_half_made(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
    remove_half_made(tmp_path / "absent")  # a folder the child never made


def test_vfs_errors_cross_the_process_boundary_by_class_name():
    """Every error class the child may report is a VFSError that errors.py defines."""
    for cls in (InputError, DependencyError, SegmentationError):
        assert issubclass(cls, VFSError) and getattr(errors, cls.__name__) is cls
    assert issubclass(SegmentationCancelled, VFSError) and not issubclass(SegmentationCancelled, SegmentationError)
