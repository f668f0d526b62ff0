"""Cohort faults (issue 26): the exit status when exams failed (``--allow-failures``), failures of
the environment (disk full, permissions, memory, a killed worker) told apart from failures of the
input and retried by a plain re-run, no traceback when the disk is full, repeated exam IDs and
columns in a manifest, non-ASCII or unusable file names in a folder cohort, an input file that
may not be read, and Ctrl-C during a run with local Dask workers.

The environment's failures are acted out through ``cohort.writes.fault_hook`` (the engine's documented
test seam: it raises ``OSError(ENOSPC)`` and friends at the write points), by making ``os.fsync``
fail with ENOSPC (so every atomic write of the real writer fails as on a full disk), and, where
this process may mount one (root with CAP_SYS_ADMIN), on a genuinely full tmpfs."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from test_cohort import finished_markers, needs_dask, read_csv, touch

from VertebralFractureScreenLib import cohort
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.cli import EXIT_INTERRUPTED, main
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.phantom.render import PhantomSpec, write_phantom

SMALL = PhantomSpec(levels=lv.parse_level_range("T12-L3"), spacing=(3.0, 3.0, 3.0), fov="body", supersampling=1,
                    noise_hu=10.0, seed=5)
LEVELS = ["--levels", "T12-L3", "--no-qc"]
SETTINGS = cohort.CohortSettings(qc=False, levels=lv.parse_level_range("T12-L3"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A small phantom (T12–L3, 3 mm, about 5 s to make, under 1 s to screen)."""
    return write_phantom(SMALL, tmp_path_factory.mktemp("small-phantom"))


def exam_files(small, folder: Path, *names: str) -> Path:
    """A folder cohort: for each name, the phantom CT and its segmentation (``<name>_total``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(small["ct"], folder / f"{name}.nii.gz")
        shutil.copy(small["total"], folder / f"{name}_total.nii.gz")
    return folder


def mixed(small, folder: Path) -> Path:
    """Exam ``a`` (good) and exam ``broken`` (not an image)."""
    exam_files(small, folder, "a")
    touch(folder / "broken.nii.gz", b"this is not an image")
    return folder


def errors_of(out: Path) -> dict[str, dict]:
    return {row["exam_id"]: row for row in read_csv(out / cohort.ERRORS_FILE)}


@pytest.fixture
def hook(monkeypatch):
    """``cohort.writes.fault_hook`` raising ``faults[(point, exam_id)]`` (or ``faults[point]``)."""
    faults: dict = {}

    def fault(point, exam_id):
        error = faults.get((point, exam_id), faults.get(point))
        if error is not None:
            raise error

    monkeypatch.setattr(cohort.writes, "fault_hook", fault)
    return faults


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------------
# 1. Exit status
# ------------------------------------------------------------------------------------------------


def test_failed_exams_exit_1_unless_failures_are_allowed(small, tmp_path, capsys):
    inputs, out = mixed(small, tmp_path / "in"), tmp_path / "out"
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 1
    err = capsys.readouterr().err
    assert "vfscreen: 1 of 2 exams failed (see" in err and "--allow-failures" in err and "Traceback" not in err
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 1  # recorded before: still a failure
    assert "1 of 2 exams failed" in capsys.readouterr().err
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS, "--allow-failures"]) == 0
    assert "vfscreen:" not in capsys.readouterr().err  # no message: the allowed failure is in errors.csv
    good = exam_files(small, tmp_path / "good", "a")
    assert main(["cohort", str(good), "--out", str(tmp_path / "good-out"), *LEVELS]) == 0


# ------------------------------------------------------------------------------------------------
# 2. Failures of the environment
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    pytest.param(enospc(), id="ENOSPC"),
    pytest.param(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), id="EDQUOT"),
    pytest.param(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/out/exams/a/exam.json"), id="EACCES"),
    pytest.param(PermissionError(errno.EPERM, os.strerror(errno.EPERM)), id="EPERM"),
    pytest.param(OSError(errno.EROFS, os.strerror(errno.EROFS)), id="EROFS"),
    pytest.param(MemoryError(), id="MemoryError"),
])
def test_environment_failures_are_not_the_inputs_and_a_rerun_retries_them(small, tmp_path, hook, capsys, error):
    inputs, out = mixed(small, tmp_path / "in"), tmp_path / "out"
    hook[("exam", "a")] = error
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS, "--allow-failures"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 exams failed because of the environment" in err and "Traceback" not in err
    errors = errors_of(out)
    assert errors["a"]["kind"] == "environment" and errors["broken"]["kind"] == "input"
    assert json.loads((cohort.exam_folder(out, "a") / cohort.ERROR_FILE).read_text())["kind"] == "environment"
    summary = json.loads((out / cohort.SUMMARY_FILE).read_text())
    assert (summary["failed"], summary["failed_environment"]) == (2, 1)
    hook.clear()  # space freed: a plain re-run screens a again and skips broken
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)
    assert (summary.screened_now, summary.failed_now, summary.skipped_now, summary.done) == (1, 0, 1, 1)
    assert list(errors_of(out)) == ["broken"] and not (cohort.exam_folder(out, "a") / cohort.ERROR_FILE).exists()


def test_a_full_disk_inside_the_real_writer_is_an_environment_failure(small, tmp_path, monkeypatch):
    """ENOSPC from the atomic writer comes back as a one-sentence InputError ('cannot write ...'):
    still the environment, not the exam's input."""
    inputs, out = exam_files(small, tmp_path / "in", "a", "b"), tmp_path / "out"
    real_replace, calls = os.replace, []

    def full_for_b(source, target, *args, **kwargs):  # b's files cannot be written, the rest can
        if f"{os.sep}b{os.sep}" in str(target) and not str(target).endswith(cohort.ERROR_FILE):
            calls.append(target)
            raise enospc()
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_for_b)
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)
    assert calls and (summary.done, summary.failed, summary.failed_environment) == (1, 1, 1)
    row = errors_of(out)["b"]
    assert row["kind"] == "environment" and "No space left on device" in row["reason"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nothing half-written
    monkeypatch.setattr(os, "replace", real_replace)
    assert cohort.run_cohort(inputs, out, settings=SETTINGS).screened_now == 1


def test_a_failure_without_its_error_json_is_still_listed_and_retried(small, tmp_path, hook):
    inputs, out = exam_files(small, tmp_path / "in", "a", "b"), tmp_path / "out"
    hook[("exam", "b")] = enospc()
    hook[("error", "b")] = enospc()  # the disk is full: even error.json cannot be written
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)
    assert (summary.done, summary.failed_now, summary.failed, summary.failed_environment) == (1, 1, 1, 1)
    assert not (cohort.exam_folder(out, "b") / cohort.ERROR_FILE).exists()
    assert errors_of(out)["b"]["kind"] == "environment"
    assert "b failed" in (out / cohort.LOG_FILE).read_text()
    hook.clear()
    assert cohort.run_cohort(inputs, out, settings=SETTINGS).screened_now == 1 and errors_of(out) == {}


def test_a_killed_worker_and_wrapped_disk_errors_are_the_environment(tmp_path):
    class KilledWorker(Exception):  # distributed.KilledWorker, by name as the engine tells it
        pass

    def wrapped(cause):
        try:
            try:
                raise cause
            except OSError:
                raise InputError("cannot write x: No space left on device") from None
        except InputError as error:
            return error

    assert cohort._kind_of(KilledWorker("exam-a")) == "environment"
    assert cohort._kind_of(wrapped(enospc())) == "environment"
    assert cohort._kind_of(wrapped(FileNotFoundError(errno.ENOENT, "No such file"))) == "input"
    assert cohort._kind_of(InputError("cannot read CT file x: corrupt")) == "input"
    # A cluster task that never returned: recorded as the environment's failure.
    exam = cohort.CohortExam("a", str(tmp_path / "a.nii.gz"))
    outcome = cohort._worker_failure(exam, tmp_path / "out", "its worker died (KilledWorker: out of memory or killed)")
    assert (outcome.status, outcome.kind, outcome.recorded) == ("failed", "environment", True)
    assert cohort._to_screen(cohort.exam_folder(tmp_path / "out", "a"), retry_failed=False)


def test_error_json_of_earlier_versions_keeps_its_meaning(tmp_path):
    folder = tmp_path / "exams" / "x"
    folder.mkdir(parents=True)
    (folder / cohort.ERROR_FILE).write_text(json.dumps({"stage": "input", "reason": "bad"}))
    assert not cohort._to_screen(folder, retry_failed=False) and cohort._to_screen(folder, retry_failed=True)
    (folder / cohort.ERROR_FILE).write_text(json.dumps({"stage": "worker", "reason": "its worker died"}))
    assert cohort._to_screen(folder, retry_failed=False)


# ------------------------------------------------------------------------------------------------
# 3. A full disk: one sentence, no traceback
# ------------------------------------------------------------------------------------------------


def test_zero_bytes_free_ends_with_one_sentence(small, tmp_path, hook, monkeypatch, capsys):
    inputs, out = mixed(small, tmp_path / "in"), tmp_path / "out"

    def no_space(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", no_space)  # every atomic write fails, as with 0 bytes free
    hook["log"] = enospc()  # and every line of cohort.log
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "Logging error" not in err
    assert last.startswith("vfscreen: cannot write the cohort's tables") or last.startswith("vfscreen: cannot write")
    assert "No space left on device" in last and "running the same command again" in last
    assert [p.name for p in out.iterdir() if p.is_file()] == [cohort.LOG_FILE]  # no table, no summary
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not cohort.log.handlers  # the log file is let go even when the run ends in an error
    monkeypatch.undo()
    cohort.writes.fault_hook = None
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS, "--allow-failures"]) == 0  # space again
    assert sorted(errors_of(out)) == ["broken"]


@pytest.mark.parametrize("point", ["tables", "summary"])
def test_tables_or_summary_that_cannot_be_written_are_one_sentence(small, tmp_path, hook, capsys, point):
    inputs, out = exam_files(small, tmp_path / "in", "a"), tmp_path / "out"
    hook[point] = enospc()
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].count("vfscreen:") == 1
    assert "No space left on device" in err
    assert (cohort.exam_folder(out, "a") / cohort.FINISHED_FILE).is_file()  # the finished exam is kept
    hook.clear()
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)
    assert (summary.screened_now, summary.done) == (0, 1) and len(read_csv(out / cohort.FEATURES_FILE)) == 1


def test_a_genuinely_full_file_system(small, tmp_path):
    """On a full tmpfs (needs the right to mount one: skipped elsewhere), in a process of its own."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(filler)
        inputs = mixed(small, tmp_path / "in")
        run = subprocess.run([sys.executable, "-m", "VertebralFractureScreenLib.cli", "cohort", str(inputs),
                              "--out", str(mount / "out"), *LEVELS], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and "Logging error" not in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("vfscreen: cannot write")
        assert "No space left on device" in run.stderr
        (mount / "filler").unlink()
        run = subprocess.run([sys.executable, "-m", "VertebralFractureScreenLib.cli", "cohort", str(inputs),
                              "--out", str(mount / "out"), *LEVELS, "--allow-failures"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert sorted(errors_of(mount / "out")) == ["broken"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------------------------------------
# 4. Repeated exam IDs and columns in a manifest
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("exam_id,ct,exam_id\nA,a.nii.gz,B\n", "has the column exam_id more than once"),
    ("exam_id,ct\nA,a.nii.gz\nB,b.nii.gz\nA,c.nii.gz\nb,d.nii.gz\n",
     "repeats exam IDs A in lines 2 and 4; B / b in lines 3 and 5"),
    ("ct\nx/a.nii.gz\ny/a.nii.gz\n", "repeats exam ID a in lines 2 and 3"),
    (f"exam_id,ct\n{unicodedata.normalize('NFC', 'Jürgen')},a.nii.gz\n{unicodedata.normalize('NFD', 'Jürgen')},"
     "b.nii.gz\n", "repeats exam ID Jürgen in lines 2 and 3"),
    ("exam_id,ct\nA,a.nii.gz,extra\n", "line 2 of the manifest .* has more cells than its header"),
])
def test_a_manifest_that_repeats_ids_or_columns_is_refused(tmp_path, capsys, text, words):
    path = tmp_path / "m.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=words):
        cohort.find_exams(path)
    assert main(["cohort", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------------------
# 5. Non-ASCII and unusable file names in a folder
# ------------------------------------------------------------------------------------------------


def test_non_ascii_names_are_exams_and_one_bad_name_refuses_only_itself(small, tmp_path, capsys):
    inputs = exam_files(small, tmp_path / "in", "a", "müller", unicodedata.normalize("NFD", "çelik"), "-bad")
    undecodable = os.fsencode(str(inputs)) + b"/\xff\xfeexam.nii.gz"  # not UTF-8: no usable exam ID
    with open(undecodable, "wb") as handle:
        handle.write(small["ct"].read_bytes())
    out = tmp_path / "out"
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 1
    captured = capsys.readouterr()
    assert "5 exams: 3 done, 2 failed" in captured.out and "Traceback" not in captured.err
    features = [row["exam_id"] for row in read_csv(out / cohort.FEATURES_FILE)]
    assert features == ["a", "çelik", "müller"]  # in file name order; NFC: the same ID whatever form the file system gives
    assert (cohort.exam_folder(out, "müller") / cohort.FINISHED_FILE).is_file()
    errors = errors_of(out)
    assert set(errors) == {"'-bad", "\ufffd\ufffdexam"}  # '-bad: a leading - is quoted in CSV cells (formula guard)
    assert all(row["kind"] == "input" and "cannot name a folder" in row["reason"] for row in errors.values())
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)  # a re-run changes nothing
    assert (summary.screened_now, summary.failed_now, summary.skipped_now) == (0, 0, 5)
    exam = json.loads((cohort.exam_folder(out, "müller") / cohort.FINISHED_FILE).read_text())
    assert exam["exam_id"] == "müller"


def test_a_folder_whose_only_exam_has_a_bad_name_is_one_sentence(tmp_path):
    touch(tmp_path / "-a.nii.gz")
    with pytest.raises(InputError, match="cannot name a folder"):
        cohort.find_exams(tmp_path)
    touch(tmp_path / "A.nii.gz")
    touch(tmp_path / "a.nii.gz")
    touch(tmp_path / "b.nii.gz")
    exams = {e.exam_id: e for e in cohort.find_exams(tmp_path)}  # A and a would share a folder on macOS
    assert {name for name, e in exams.items() if e.refused} == {"-a", "A", "a"}
    assert "differ only in case" in exams["A"].refused and exams["b"].refused is None


def test_a_rerun_with_a_new_model_predicts_without_screening_again(small, tmp_path):
    """A finished cohort re-run with ``--model demo``: predictions.csv holds the demo model's
    output for every finished exam, and no exam folder is written again (issue 26)."""
    inputs = exam_files(small, tmp_path / "in", "a", "b")
    out = tmp_path / "out"
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 0
    assert not (out / cohort.PREDICTIONS_FILE).exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / cohort.EXAMS_FOLDER).rglob("*") if p.is_file()}
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS, "--model", "demo"]) == 0
    rows = read_csv(out / cohort.PREDICTIONS_FILE)
    assert sorted(r["exam_id"] for r in rows) == ["a", "b"]
    assert all(r["demonstration"] == "true" and 0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


# ------------------------------------------------------------------------------------------------
# 6. An input file that may not be read
# ------------------------------------------------------------------------------------------------


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "VertebralFractureScreenLib.cli", *args]


def without_root_powers(command: list[str]) -> list[str]:
    """``command`` as it runs for a user whom file permissions bind: as root, with the
    capabilities that override them dropped (``setpriv``); skips the test where that is impossible."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which reads any file, and setpriv (to give that up) is not installed")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *command]


def test_an_unreadable_ct_is_an_environment_failure_and_a_rerun_screens_it(small, tmp_path):
    """A CT that exists but may not be read (chmod 000) is a permission problem the user fixes
    without changing the exam: kind ``environment``, its reason the permission error (not the
    reader's "corrupt or truncated"), and a plain re-run screens it once it may be read."""
    inputs, out = exam_files(small, tmp_path / "in", "a", "b"), tmp_path / "out"
    ct = inputs / "b.nii.gz"
    ct.chmod(0)
    try:
        probe = subprocess.run(without_root_powers([sys.executable, "-c", f"open({str(ct)!r}, 'rb')"]),
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 or "PermissionError" not in probe.stderr:
            pytest.skip(f"this process reads a chmod 000 file anyway ({probe.stderr.strip()[-200:] or 'read'})")
        run = subprocess.run(without_root_powers(cli_command("cohort", str(inputs), "--out", str(out), *LEVELS)),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr
        assert "1 of 2 exams failed because of the environment" in run.stderr.splitlines()[-1]
        errors = errors_of(out)
        assert list(errors) == ["b"] and errors["b"]["kind"] == "environment"
        assert errors["b"]["reason"] == f"Permission denied ({ct})."
    finally:
        ct.chmod(0o644)
    summary = cohort.run_cohort(inputs, out, settings=SETTINGS)  # readable again: a plain re-run screens it
    assert (summary.screened_now, summary.skipped_now, summary.done, summary.failed) == (1, 1, 2, 0)
    assert errors_of(out) == {}


def test_a_permission_error_behind_a_reader_s_sentence_is_the_environment(tmp_path, monkeypatch):
    """The kind and reason without needing an unreadable file: a reader that turned the
    PermissionError into its own sentence (kept as the context), and one that kept nothing (the
    file is then found unreadable)."""
    exam = cohort.CohortExam("b", str(touch(tmp_path / "b.nii.gz")), str(touch(tmp_path / "b_total.nii.gz")))
    folder = tmp_path / "out"
    folder.mkdir()
    try:
        try:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), exam.ct)
        except OSError:
            raise InputError(f"cannot read CT file {exam.ct}: the file is corrupt or truncated") from None
    except InputError as error:
        wrapped = error
    assert cohort._environment_failure(wrapped, exam, folder) == ("environment", f"Permission denied ({exam.ct}).")
    unexplained = InputError(f"cannot read segmentation file {exam.seg}: ITK cannot open it")
    assert cohort._environment_failure(unexplained, exam, folder) == ("input", str(unexplained))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != exam.seg and real_access(path, mode))
    assert cohort._environment_failure(unexplained, exam, folder) == ("environment", f"Permission denied ({exam.seg}).")


# ------------------------------------------------------------------------------------------------
# 7. Ctrl-C during a run with local Dask workers
# ------------------------------------------------------------------------------------------------

PROGRESS_LINE = re.compile(r"\[\s*\d+/\d+\] .*")
INTERRUPTED = ("vfscreen: interrupted; the finished exams are kept, and running the same command again screens "
               "the others.")


@needs_dask
def test_ctrl_c_with_local_workers_is_one_sentence_and_a_rerun_resumes(small, tmp_path):
    """SIGINT to the whole process group (as a terminal's Ctrl-C sends it, to Dask's worker
    processes too) once the first exam has started: exit 130, one sentence on stderr beside the
    progress lines, no traceback from any process, no staging leftovers; a re-run keeps the
    finished exams and screens the others."""
    names = [f"e{n}" for n in range(5)]
    inputs, out = exam_files(small, tmp_path / "in", *names), tmp_path / "out"
    # A terminal's foreground job gets SIGINT's default action; a shell's background job (CI started
    # with `&`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt: restore it.
    run = subprocess.Popen(cli_command("cohort", str(inputs), "--out", str(out), "--workers", "2", *LEVELS),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while run.poll() is None and not list(out.glob(f"{cohort.EXAMS_FOLDER}/*/.lock")):  # an exam has started
            assert time.monotonic() < deadline, "no exam started within 120 s"
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == EXIT_INTERRUPTED, err
    assert [line for line in err.splitlines() if not PROGRESS_LINE.fullmatch(line)] == [INTERRUPTED], err
    assert not any(word in err for word in ("Traceback", "Exception ignored", "distributed", "Warning"))
    assert [p for p in out.rglob("*") if p.name.startswith(".vfscreen-partial") or ".tmp-" in p.name] == []
    finished = finished_markers(out)
    assert len(finished) < len(names)  # stopped half-way
    assert "run interrupted" in (out / cohort.LOG_FILE).read_text()
    assert main(["cohort", str(inputs), "--out", str(out), *LEVELS]) == 0  # the re-run completes
    markers = finished_markers(out)
    assert sorted(markers) == names and all(markers[name] == finished[name] for name in finished)
    assert [row["exam_id"] for row in read_csv(out / cohort.FEATURES_FILE)] == names and errors_of(out) == {}


def test_the_staging_leftovers_of_stopped_workers_are_removed_unless_a_process_holds_the_exam(tmp_path):
    exams = [cohort.CohortExam(name, str(tmp_path / f"{name}.nii.gz")) for name in ("a", "b", "never")]
    for name in ("a", "b"):
        folder = cohort.exam_folder(tmp_path, name)
        touch(folder / ".vfscreen-partial-x1" / "exam.json")
        touch(folder / ".vertebrae.tmp-0a1b.csv")
        touch(folder / ".lock")
    with open(cohort.exam_folder(tmp_path, "b") / ".lock", "rb") as held:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_EX)  # b: still screened by some process
        cohort._remove_interrupted_leftovers(exams, tmp_path)
    assert sorted(p.name for p in cohort.exam_folder(tmp_path, "a").iterdir()) == [".lock"]
    assert len(list(cohort.exam_folder(tmp_path, "b").iterdir())) == 3
    assert not cohort.exam_folder(tmp_path, "never").exists()


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks on this platform")
def test_a_ctrl_c_while_a_local_cluster_starts_is_held_until_it_has_started():
    """The threads started while the cluster starts (which start its worker processes) inherit a
    blocked SIGINT, and a Ctrl-C meanwhile is raised once the start is over."""
    handler = signal.getsignal(signal.SIGINT)
    seen = {}
    with pytest.raises(KeyboardInterrupt):
        with cohort._sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # without the hold, KeyboardInterrupt here
            thread = threading.Thread(target=lambda: seen.update(mask=signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            thread.start()
            thread.join()
            seen["started"] = True
    assert seen["started"] and signal.SIGINT in seen["mask"]
    assert signal.getsignal(signal.SIGINT) is handler and signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_read_only_output_folder_that_exists_is_named_as_such(small, tmp_path):
    """Not "cannot create" a folder that is there: the sentence says it cannot be written into."""
    inputs, out = exam_files(small, tmp_path / "in", "a"), tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        run = subprocess.run(without_root_powers(cli_command("cohort", str(inputs), "--out", str(out), *LEVELS)),
                             capture_output=True, text=True, timeout=120)
        if run.returncode == 0:
            pytest.skip("this process writes into a read-only folder anyway")
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.strip() == f"vfscreen: cannot write into the output folder {out}: Permission denied."
    finally:
        out.chmod(0o755)
