"""Segmenting a CT in a child process, so that a GUI (3D Slicer) stays responsive.

In the GUI process, :func:`.segmentation.segment_ct` (minutes, with nnU-Net's worker processes)
would freeze the window and could not be stopped. A :class:`SegmentationJob` runs it in a child
Python (Slicer's ``PythonSlicer``, or any Python with TotalSegmentator) that the GUI thread polls
(:func:`run_job`). The child leads a process group that a cancel stops whole, and its last line,
``VFS-RESULT <json>`` or ``VFS-ERROR <class> <sentence>``, lets the job return the result or raise
the child's error class with its one sentence, never a traceback. Nothing half-made is left behind.

Child: ``python -m VertebralFractureScreenLib.segment.job CT OUT --quality fast --device cpu [--body]
[--download]`` exits 0, 2 for a :class:`.errors.VFSError`, 1 otherwise. No Qt or Slicer import; Python 3.9+.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from .. import errors
from . import totalsegmentator as segmentation
from ..errors import DependencyError, InputError, SegmentationError, VFSError

__all__ = ["SegmentationCancelled", "SegmentationJob", "run_job", "remove_half_made", "main"]

RESULT_TAG, ERROR_TAG = "VFS-RESULT ", "VFS-ERROR "
CANCELLED = "The segmentation was cancelled before it finished."
_OUTPUTS = (segmentation.TOTAL_FILE, segmentation.BODY_FILE)
_POSIX = os.name == "posix"


class SegmentationCancelled(errors.VFSError):
    """The user cancelled the segmentation (not a failure: ``except SegmentationError`` misses it)."""


class SegmentationJob:
    """One :func:`.segmentation.segment_ct` run in a child process (see the module docstring).
    ``env`` adds variables to this process's environment for the child (None removes one); the
    folder holding this package goes first on the child's ``PYTHONPATH``, so any Python finds it."""

    def __init__(self, ct_path, out_dir, *, quality: str = "normal", device: str = "cpu", body: bool = False,
                 download: bool = False, python: str | None = None, env: dict | None = None):
        self.ct_path, self.out_dir = Path(ct_path), Path(out_dir)
        self.quality, self.device, self.body, self.download = quality, device, bool(body), bool(download)
        self.python, self.extra_env = python or sys.executable, dict(env or {})
        self.process: subprocess.Popen | None = None
        self.temp_dir: Path | None = None  # the child's TMPDIR, deleted when the job ends
        self.cancelled, self._finished = False, False
        self._lines: queue.Queue = queue.Queue()
        self._final = ""  # the child's VFS-RESULT / VFS-ERROR line
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the child; returns at once."""
        if self.process is not None:
            raise RuntimeError("this segmentation job was already started")
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vfs-segmentation-"))
        env = {key: str(value) for key, value in {**os.environ, **self.extra_env}.items() if value is not None}
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
                   **{name: str(self.temp_dir) for name in ("TMPDIR", "TEMP", "TMP")})
        command = [self.python, "-u", "-m", __name__, str(self.ct_path), str(self.out_dir), "--quality",
                   self.quality, "--device", self.device, "--stop-with-stdin"]
        command += ["--body"] * self.body + ["--download"] * self.download
        options = {"start_new_session": True} if _POSIX else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, env=env, **options)
        except OSError as error:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise DependencyError(f"cannot start the Python {self.python} to segment the CT: "
                                  f"{error.strerror or error}.") from None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            for line in raw.decode("utf-8", "replace").splitlines():  # also splits at a bare \r
                tag = max(line.find(RESULT_TAG), line.find(ERROR_TAG))
                if tag >= 0:  # a worker may have left half a line before it
                    self._final = line[tag:]
                elif line.strip():
                    self._lines.put(line.rstrip())
        stream.close()
        self._lines.put(None)

    def poll(self, timeout_s: float = 0.0) -> list[str]:
        """The child's new log lines; waits up to ``timeout_s`` for the first (0: never waits)."""
        lines = []
        with contextlib.suppress(queue.Empty):
            lines.append(self._lines.get(timeout=timeout_s) if timeout_s > 0 else self._lines.get_nowait())
            while True:
                lines.append(self._lines.get_nowait())
        return [line for line in lines if line is not None]  # None marks the end of the output

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the child has ended (its last lines may still wait for :meth:`poll`)."""
        if self.process is not None and not self._finished and self.process.poll() is not None:
            self._finish()  # the child has just been seen to end
        return self.process is not None and not self._finished

    @property
    def returncode(self) -> int | None:
        """The child's exit status: None while it runs, negative when a signal killed it (POSIX)."""
        return None if self.process is None else self.process.poll()

    def cancel(self, timeout_s: float = 10.0) -> bool:
        """Stop the child and every process it started, waiting up to ``timeout_s`` (True when all are
        gone); :meth:`result` then raises :class:`SegmentationCancelled`. An ended job keeps its outcome."""
        if not self.running:
            return True
        self.cancelled = True
        deadline = time.monotonic() + timeout_s
        _kill_group(self.process, hard=False)
        gone = _wait_group(self.process, min(deadline, time.monotonic() + min(3.0, timeout_s / 2)))
        if not gone:
            _kill_group(self.process, hard=True)
            gone = _wait_group(self.process, deadline)
        return not self.running and gone  # `running` also tidies up after the ended child

    def result(self) -> segmentation.SegmentationResult:
        """The child's :class:`.segmentation.SegmentationResult`, or its error (same class, one
        sentence). Call it once :attr:`running` is False."""
        if self.process is None or self.running:
            raise RuntimeError("the segmentation job has not finished")
        if self.cancelled:
            raise SegmentationCancelled(CANCELLED)
        final, code = self._final, self.process.returncode
        if code == 0 and final.startswith(RESULT_TAG):
            data = json.loads(final[len(RESULT_TAG):])
            data.update(total_path=Path(data["total_path"]), manifest_path=Path(data["manifest_path"]),
                        body_path=Path(data["body_path"]) if data["body_path"] else None,
                        classes=tuple(data["classes"]), present=tuple(data["present"]))
            return segmentation.SegmentationResult(**data)
        if final.startswith(ERROR_TAG):
            name, _, sentence = final[len(ERROR_TAG):].partition(" ")
            if code == 2:
                cls = getattr(errors, name, None)
                raise (cls if isinstance(cls, type) and issubclass(cls, VFSError) else SegmentationError)(sentence)
            raise SegmentationError(f"TotalSegmentator stopped: {sentence.rstrip('.')}.")
        how = f"was killed by signal {-code}" if code < 0 else f"ended with exit code {code}"
        raise SegmentationError(f"TotalSegmentator stopped: its process {how} without a result.")

    def _finish(self) -> None:
        """Once the child has ended: collect its output (killing descendants that still hold the pipe),
        delete its TMPDIR (TotalSegmentator's temporary files) and, unless it succeeded, what it left half-made."""
        self._finished = True
        self._reader.join(5.0)
        if self._reader.is_alive():
            _kill_group(self.process, hard=True)
            self._reader.join(5.0)
        self.process.stdin.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.cancelled or self.process.returncode != 0:
            remove_half_made(self.out_dir)


def _kill_group(process: subprocess.Popen, hard: bool) -> None:
    """POSIX: send the child's whole group SIGTERM, or SIGKILL when ``hard``; Windows: end its tree."""
    if not _POSIX:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)


def _wait_group(process: subprocess.Popen, deadline: float) -> bool:
    """Wait until the child has ended and (POSIX) its group has no live member; True if so in time."""
    while process.poll() is None or (_POSIX and _group_alive(process.pid)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group lives (where /proc tells, a zombie that init never reaps does not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not os.path.isdir("/proc/self"):
        return True
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def remove_half_made(out_dir: Path) -> None:
    """Delete the hidden temporaries of interrupted atomic writes of the segmentation files, and
    label maps that the manifest (written last) does not name, as ``segment_ct`` itself deletes
    them before segmenting; the files of an earlier complete run stay usable."""
    named = set()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        manifest = json.loads((out_dir / segmentation.MANIFEST_FILE).read_text(encoding="utf-8"))
        named = {entry.get("file") for entry in manifest.values() if isinstance(entry, dict)}
    prefixes = tuple(f".{name.split('.')[0]}.tmp-" for name in (*_OUTPUTS, segmentation.MANIFEST_FILE))
    for path in out_dir.iterdir() if out_dir.is_dir() else ():
        if (path.name in _OUTPUTS and path.name not in named) or path.name.startswith(prefixes):
            with contextlib.suppress(OSError):
                path.unlink()


def run_job(job: SegmentationJob, *, process_events=None, cancelled=None, log=None,
            poll_interval_s: float = 0.1) -> segmentation.SegmentationResult:
    """Run ``job`` to its end from the caller's (GUI) thread: pass each log line to ``log``, call
    ``process_events()`` (in Slicer: the application's ``processEvents``) at least every ``poll_interval_s``,
    and when ``cancelled()`` is true cancel the job and raise :class:`SegmentationCancelled`.
    Returns :meth:`SegmentationJob.result`; an exception in a callback cancels the job too."""
    log, process_events, cancelled = (f or (lambda *_: None) for f in (log, process_events, cancelled))
    if job.process is None:
        job.start()
    try:
        while True:
            for line in job.poll(poll_interval_s):
                log(line)
            process_events()
            if cancelled():
                job.cancel()
                raise SegmentationCancelled(CANCELLED)
            if not job.running:
                break
    except BaseException:
        job.cancel()
        raise
    for line in job.poll():
        log(line)
    return job.result()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(f"segmentation_job: {message}.")


def _stop_group_when_stdin_closes() -> None:
    """The job holds our stdin open: end of file means the GUI process is gone, so end our group
    (Windows: ourselves). The raw descriptor is read because a thread blocked in ``sys.stdin`` holds
    its lock, and a worker that nnU-Net forks would hang for ever closing its copy of ``sys.stdin``."""
    while os.read(0, 65536):
        pass
    if _POSIX and os.getpgid(0) == os.getpid():  # we lead the group that the job started
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(3)


def main(argv=None) -> int:
    """The child: segment, print progress lines, end with one VFS-RESULT or VFS-ERROR line."""
    def last_line(tag: str, text: str) -> None:  # one line, after any half-written one
        print(f"\n{tag}{' '.join(str(text).split())}", flush=True)

    try:
        parser = _Parser(prog="segmentation_job")
        parser.add_argument("ct")
        parser.add_argument("out")
        for option, default in (("--quality", "normal"), ("--device", "cpu")):
            parser.add_argument(option, default=default)
        for flag in ("--body", "--download", "--stop-with-stdin"):
            parser.add_argument(flag, action="store_true")
        args = parser.parse_args(argv)
        if args.stop_with_stdin:
            threading.Thread(target=_stop_group_when_stdin_closes, daemon=True).start()
        print(f"Segmenting {args.ct} with TotalSegmentator (quality {args.quality}, device {args.device}"
              f"{', with vertebral bodies' if args.body else ''}) into {args.out}", flush=True)
        result = segmentation.segment_ct(args.ct, args.out, quality=args.quality, device=args.device,
                                         body=args.body, download=args.download)
        print(f"Segmentation {'reused' if result.reused else 'done'} in {result.seconds:.1f} s: "
              f"{len(result.present)} of {len(result.classes)} classes found", flush=True)
        data = {key: str(value) if isinstance(value, Path) else value for key, value in vars(result).items()}
        last_line(RESULT_TAG, json.dumps(data))
        return 0
    except VFSError as error:
        last_line(ERROR_TAG, f"{type(error).__name__} {error}")
        return 2
    except Exception as error:  # noqa: BLE001  (one line; the traceback goes to the log above it)
        traceback.print_exc(file=sys.stdout)
        last_line(ERROR_TAG, f"{type(error).__name__} {type(error).__name__}: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
