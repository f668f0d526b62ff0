"""Segmenting a CT with TotalSegmentator, for screening (SPEC §1 step 1).

:func:`segment_ct` runs TotalSegmentator through its Python API (``totalsegmentator.python_api``):

* task ``total`` with a ``roi_subset`` of the classes screening needs (:data:`SCREENING_CLASSES`:
  vertebrae T1–S1, sacrum, spinal cord, autochthonous back muscles, iliopsoas, aorta, vena cava,
  portal vein). With a
  ``roi_subset`` TotalSegmentator first runs its coarse 6 mm ``total`` model to crop the CT around
  those classes, then its ``total`` model(s) on the crop: ``quality="fast"`` is the 3 mm model
  (dataset 297), ``"normal"`` the 1.5 mm models, only the parts holding the requested classes
  (datasets 292 vertebrae, 293 aorta and veins, 294 muscles and cord). The output keeps TotalSegmentator's
  ``total`` label ids (SPEC §3) and holds only the requested classes.
* optionally (``body=True``) the open ``vertebrae_body`` task (dataset 305, 1.5 mm, no licence):
  1 = vertebral bodies, 2 = intervertebral discs.

Results are written into ``out_dir`` beside the screening results: :data:`TOTAL_FILE`,
:data:`BODY_FILE` and :data:`MANIFEST_FILE`, a small JSON file that says how they were produced
(TotalSegmentator, nnU-Net and PyTorch versions, task, quality, ``roi_subset``, datasets, time) and
for which CT (a SHA-256 of its voxels and grid). Every file is written atomically and the manifest
last, so a file named in the manifest is complete. A later call with the same CT and settings
reuses them instead of segmenting again; a changed CT or setting segments again.

The label maps are written on the CT's own grid, exactly as :func:`.io.images.read_ct` reads it:
the CT is handed to TotalSegmentator as an in-memory NIfTI image built from that array and matrix
(any format :func:`.io.images.read_ct` reads works, DICOM and NRRD included), and its answer,
which TotalSegmentator returns on the input's voxel grid, is written back with the same matrix.

Usage statistics: TotalSegmentator sends anonymous usage statistics unless its ``config.json``
(``~/.totalsegmentator``, or ``TOTALSEG_HOME_DIR``) says ``"send_usage_stats": false``. Unless
``usage_statistics=True`` is given, :func:`segment_ct` writes that setting before running, so nothing
is sent (the setting stays in that file, as TotalSegmentator's own opt-out does).

Weights: TotalSegmentator keeps them in ``TOTALSEG_WEIGHTS_PATH`` (default
``~/.totalsegmentator/nnunet/results``) and downloads missing ones from the internet on first use.
Here that only happens with ``download=True``: by default missing weights raise
:class:`~.errors.DependencyError` with one sentence saying how to get them, before anything runs.

nnU-Net starts its worker processes with multiprocessing's *spawn* method: a script that calls
:func:`segment_ct` must guard its top level with ``if __name__ == "__main__":``, and it cannot run
inside a daemonic process (e.g. a ``multiprocessing.Pool`` worker).

TotalSegmentator, nnU-Net and PyTorch are optional: install them with the ``segment`` extra
(``vfscreen setup-segmentation`` installs them and the weights); they are imported only when a CT
is segmented.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import levels
from ..errors import DependencyError, InputError, SegmentationError, WeightsMissingError
from ..io.files import atomic_write_text
from ..io.images import read_ct, write_volume
from ..io.volume import Volume

__all__ = [
    "SCREENING_CLASSES",
    "QUALITIES",
    "TOTAL_FILE",
    "BODY_FILE",
    "MANIFEST_FILE",
    "SegmentationResult",
    "segment_ct",
]

SCREENING_CLASSES: tuple[str, ...] = (
    tuple(f"vertebrae_{level}" for level in levels.LEVELS[levels.LEVEL_INDEX["T1"]:])
    + ("sacrum", "spinal_cord", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
       "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein")
)
"""TotalSegmentator ``total`` classes that screening needs (the default ``roi_subset``). The vena cava
and portal vein (for the contrast phase) come from the aorta's model part at no extra cost; the
kidneys and ribs would each add a model part at ``normal`` quality and are left out: the phase and
the level check use them when a given segmentation holds them, and screening asks for the ribs
with ``segment_ribs`` (:data:`RIB_CLASSES`)."""

RIB_CLASSES: tuple[str, ...] = tuple(levels.TOTAL_CLASS_NAMES[label] for label in sorted(levels.TOTAL_RIB_IDS.values()))
"""The 24 rib classes, for the level check's rib evidence (``segment_ribs``): at ``normal``
quality they add TotalSegmentator's ribs model part, and with either quality the crop around the
requested classes grows to the rib cage."""

QUALITIES: tuple[str, ...] = ("fast", "normal")
"""``fast``: TotalSegmentator's 3 mm model; ``normal``: its 1.5 mm models (slower, finer)."""

TOTAL_FILE = "total.nii.gz"
BODY_FILE = "vertebrae_body.nii.gz"
MANIFEST_FILE = "segmentation.json"
MANIFEST_FORMAT = "vfscreen-segmentation/1"

INSTALL_COMMAND = "vfscreen setup-segmentation"
"""The one command that installs PyTorch, TotalSegmentator and its weights (:mod:`.segmentation_setup`)."""

_DEVICE_PATTERN = re.compile(r"cpu|mps|gpu(?::\d+)?")


@dataclass(frozen=True)
class SegmentationResult:
    """What :func:`segment_ct` produced (or found from an earlier run).

    Attributes:
        total_path: multi-label NIfTI with TotalSegmentator ``total`` ids, on the CT's grid.
        body_path: ``vertebrae_body`` NIfTI (1 = bodies, 2 = discs) when ``body=True``, else None.
        manifest_path: the JSON file describing how the files were produced.
        quality: ``"fast"`` or ``"normal"``.
        classes: the ``roi_subset`` (class names), in ``total`` id order.
        present: the classes of ``classes`` found in the CT (at least one voxel), in id order.
        reused: True when nothing was segmented in this call (all files came from an earlier run).
        seconds: time spent segmenting in this call (0 when reused).
        totalsegmentator_version: version of TotalSegmentator that produced ``total_path``.
    """

    total_path: Path
    body_path: Path | None
    manifest_path: Path
    quality: str
    classes: tuple[str, ...]
    present: tuple[str, ...]
    reused: bool
    seconds: float
    totalsegmentator_version: str


# ------------------------------------------------------------------------------------------------
# TotalSegmentator, loaded on demand
# ------------------------------------------------------------------------------------------------


def _load_totalsegmentator() -> SimpleNamespace:
    """Import TotalSegmentator and what it needs; a missing piece raises one sentence."""
    try:
        import nibabel
        import nnunetv2  # noqa: F401  (TotalSegmentator imports it only when predicting)
        import torch
        import totalsegmentator  # noqa: F401
        from totalsegmentator import config, map_tasks_config, map_to_binary, python_api
    except (ImportError, OSError) as error:  # OSError: a PyTorch build whose native libraries fail
        name = getattr(error, "name", None)
        reason = f"{name} is not installed" if isinstance(error, ImportError) and name else str(error).rstrip(".")
        raise DependencyError(
            f"Segmenting a CT needs TotalSegmentator, which cannot be loaded here ({reason}): install it with "
            f"`{INSTALL_COMMAND}` (with internet access; `--torch cu126` for a CUDA build, `--dry-run` to see "
            "the commands), "
            "or give an existing segmentation instead."
        ) from None
    return SimpleNamespace(
        run=python_api.totalsegmentator,
        config=config,
        tasks=map_tasks_config.TASK_CONFIGS,
        weights=map_tasks_config.TASK_ID_WEIGHTS_CONFIGS,
        class_map=map_to_binary.class_map,
        parts=map_to_binary.class_map_5_parts,
        part_of_dataset=map_to_binary.map_taskid_to_partname_ct,
        nibabel=nibabel,
        torch=torch,
        versions={name: _version(name) for name in ("TotalSegmentator", "nnunetv2", "torch")},
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_device(device: str, torch) -> None:
    if device.startswith("gpu"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device {device!r} was asked for but PyTorch {torch.__version__} sees no CUDA GPU on this "
                "machine; use the device cpu, or install a CUDA build of PyTorch."
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for but PyTorch sees no Apple GPU here; use the device cpu.")


def _datasets(ts, task: str, quality: str, classes, loaded_only: bool = False) -> list[int]:
    """TotalSegmentator dataset ids whose weights a run needs: all those it checks (and would
    download), or with ``loaded_only`` those whose models actually run."""
    if task == "vertebrae_body":
        return [int(ts.tasks["vertebrae_body"]["task_id"])]
    modes = ts.tasks["total"]["sub_modes"]
    ids = modes["fast" if quality == "fast" else "default"]["task_id"]
    if not isinstance(ids, list):
        ids = [ids]
    elif loaded_only:  # one model per part; TotalSegmentator checks all five but runs only those
        ids = [tid for tid in ids if set(ts.parts[ts.part_of_dataset[tid]].values()) & set(classes)]
    # With a roi_subset, TotalSegmentator crops with its 6 mm `total` model first (the "fastest"
    # model; python_api hard-codes its id, 298).
    return sorted({int(modes["fastest"]["task_id"]), *map(int, ids)})


def _weights_folder(ts, dataset_id: int) -> tuple[str, Path]:
    info = ts.weights[dataset_id]
    relative = Path(info["rel_path"]) / info["foldername"] if info.get("rel_path") else Path(info["foldername"])
    return info["foldername"], Path(ts.config.get_weights_dir()) / relative


def _missing_weights(ts, plan: list[tuple[str, list[int]]], quality: str) -> tuple[list[str], list[str]]:
    """Dataset folders absent from the weights folder (TotalSegmentator downloads a dataset whose
    folder is absent), and the ``totalseg_download_weights`` commands that fetch them."""
    missing, commands = [], []
    for task, ids in plan:
        absent = []
        for dataset_id in ids:
            name, folder = _weights_folder(ts, dataset_id)
            if not folder.is_dir() or next(folder.rglob("checkpoint_final.pth"), None) is None:
                absent.append(name)
        if absent:
            missing += absent
            download_task = "vertebrae_body" if task == "vertebrae_body" else (
                "total_fast" if quality == "fast" else "total")
            commands.append(f"totalseg_download_weights -t {download_task}")
    return missing, commands


def _weights_sentence(ts, missing: list[str], commands: list[str], download_failed: bool) -> str:
    root = Path(ts.config.get_weights_dir())
    how = (f"run `{INSTALL_COMMAND}` with internet access (or, on another computer, `{' && '.join(commands)}` and "
           "copy its ~/.totalsegmentator/nnunet/results folder there)")
    if download_failed:
        return (f"TotalSegmentator could not download its model weights into {root} (missing {', '.join(missing)}): "
                f"{how}, or set TOTALSEG_WEIGHTS_PATH to a folder that holds them.")
    return (f"TotalSegmentator's model weights are not in {root} (missing {', '.join(missing)}): {how}, "
            "set TOTALSEG_WEIGHTS_PATH to a folder that holds them, or allow downloading them.")


def _configure_usage_statistics(ts, enabled: bool) -> None:
    """Write TotalSegmentator's own usage-statistics switch (its config.json) before it runs."""
    ts.config.setup_totalseg()  # creates config.json (with statistics on) when there is none yet
    if ts.config.get_config_key("send_usage_stats") is not bool(enabled):
        ts.config.set_config_key("send_usage_stats", bool(enabled))
    if not ts.config.get_config_key("statistics_disclaimer_shown"):
        ts.config.set_config_key("statistics_disclaimer_shown", True)  # it would print one on every run


def _check_nnunet_paths(ts) -> None:
    """nnU-Net reads its model folder from the environment once, when first imported; a process
    that imported it before the weights folder changed would silently use the old one."""
    paths = sys.modules.get("nnunetv2.paths")
    if paths is None:
        return
    loaded = getattr(paths, "nnUNet_results", None)
    wanted = Path(ts.config.get_weights_dir())
    if loaded is None or Path(loaded).resolve() != wanted.resolve():
        raise SegmentationError(
            f"nnU-Net was loaded in this Python process with the model folder {loaded}, but TotalSegmentator's "
            f"weights folder is now {wanted}; nnU-Net reads it only once, so segment in a new process."
        )


@contextlib.contextmanager
def no_fork_off_the_main_thread():
    """nnU-Net starts some multiprocessing pools with the default start method, which is ``fork``
    on Linux. Forked from a thread other than the main thread (a Dask worker runs its tasks in
    one), a child can inherit a lock that another thread held and wait on it for ever: a cluster
    worker hung so in nnU-Net's ``create_lists_from_splitted_dataset_folder``. Off the main
    thread, the run uses ``forkserver`` instead (children forked from a single-threaded server);
    the previous start method is restored afterwards."""
    if threading.current_thread() is threading.main_thread() or sys.platform == "win32":
        yield
        return
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(previous, force=True)


def _predict(ts, image, task: str, *, fast: bool, roi_subset, device: str, download_hint: str):
    """Run TotalSegmentator on an in-memory NIfTI image; return the label array on its grid."""
    import requests  # a TotalSegmentator dependency

    options = dict(ml=True, task=task, fast=fast, roi_subset=list(roi_subset) if roi_subset else None,
                   device=device, quiet=True, nr_thr_resamp=1, nr_thr_saving=1)
    try:
        with contextlib.redirect_stdout(sys.stderr), no_fork_off_the_main_thread():  # keep stdout for results
            result = ts.run(image, None, **options)
    except SystemExit as stop:
        raise SegmentationError(f"TotalSegmentator stopped ({stop.code}) while running its {task} task.") from None
    except MemoryError:
        raise SegmentationError(f"TotalSegmentator ran out of memory in its {task} task; use the fast quality, "
                                "a machine with more memory, or a GPU.") from None
    except requests.RequestException as error:
        raise DependencyError(download_hint or f"TotalSegmentator could not reach the internet: {error}.") from None
    except RuntimeError as error:
        if isinstance(error, getattr(ts.torch.cuda, "OutOfMemoryError", ())):
            raise SegmentationError(f"The GPU ran out of memory in TotalSegmentator's {task} task; use the device "
                                    "cpu or the fast quality.") from None
        if "Background workers died" in str(error):
            raise SegmentationError(
                "nnU-Net's worker processes died: memory ran out, or the calling script lacks an "
                "`if __name__ == \"__main__\":` guard (nnU-Net starts its workers with the spawn method)."
            ) from None
        raise
    labels = np.asanyarray(result.dataobj)
    if labels.ndim != 3:
        raise SegmentationError(f"TotalSegmentator's {task} output is not a 3-D label map.")
    return np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8, copy=False)


# ------------------------------------------------------------------------------------------------
# Manifest and reuse
# ------------------------------------------------------------------------------------------------


def _fingerprint(volume: Volume) -> str:
    """SHA-256 of the CT's voxels, type, shape and grid (to 1e-4 mm)."""
    digest = hashlib.sha256()
    grid = (np.round(volume.ijk_to_ras, 4) + 0.0).tolist()  # + 0.0: no negative zeros
    digest.update(json.dumps({"shape": volume.shape, "dtype": volume.array.dtype.str, "ijk_to_ras": grid}).encode())
    array = volume.array
    step = max(1, 8_000_000 // max(1, array[0].nbytes))
    for k in range(0, array.shape[0], step):
        digest.update(np.ascontiguousarray(array[k:k + step]).data)
    return "sha256:" + digest.hexdigest()


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def _write_json_atomically(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _entry_usable(entry, out_dir: Path, **expected) -> bool:
    if not isinstance(entry, dict) or not (out_dir / str(entry.get("file", ""))).is_file():
        return False
    return all(entry.get(key) == value for key, value in expected.items())


def _label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxel count of every uint8 label value."""
    counts = np.zeros(256, dtype=np.int64)
    flat = labels.reshape(-1)
    for start in range(0, flat.size, 50_000_000):  # bounds the temporary memory of bincount
        counts += np.bincount(flat[start:start + 50_000_000], minlength=256)
    return counts


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def segment_ct(ct, out_dir, *, quality: str = "normal", device: str = "cpu", body: bool = False,
               usage_statistics: bool = False, reuse: bool = True, download: bool = False,
               classes=SCREENING_CLASSES, series_uid: str | None = None) -> SegmentationResult:
    """Segment a CT with TotalSegmentator and write the label maps into ``out_dir``.

    Args:
        ct: the CT: a path :func:`.io.images.read_ct` reads (NIfTI, NRRD, MetaImage, DICOM series
            folder) or a :class:`.io.volume.Volume` already read.
        out_dir: folder for :data:`TOTAL_FILE`, :data:`BODY_FILE` and :data:`MANIFEST_FILE`
            (created when absent).
        quality: ``"fast"`` (3 mm model) or ``"normal"`` (1.5 mm models).
        device: ``"cpu"``, ``"gpu"``, ``"gpu:N"`` (CUDA device N) or ``"mps"``.
        body: also run the ``vertebrae_body`` task (bodies and discs).
        usage_statistics: let TotalSegmentator send its anonymous usage statistics (off by default).
        reuse: use the files of an earlier run for the same CT and settings instead of segmenting.
        download: let TotalSegmentator download missing model weights (needs internet access).
        classes: TotalSegmentator ``total`` class names to segment (the ``roi_subset``).
        series_uid: SeriesInstanceUID when ``ct`` is a DICOM folder with several series.

    Returns:
        A :class:`SegmentationResult`.

    Raises:
        InputError: unreadable CT, unusable ``out_dir``, an unknown quality or device, or a device
            this machine does not have (e.g. ``gpu`` without CUDA).
        DependencyError: TotalSegmentator (or nnU-Net, PyTorch) is not installed, or its model
            weights are missing (the sentence says how to get them).
        SegmentationError: TotalSegmentator failed (out of memory, worker processes died, it
            stopped) or returned a label map that does not fit the CT.
        ValueError: ``classes`` is empty or names a class that the ``total`` task does not have.
    """
    classes = _checked_request(quality, device, classes)
    out_dir = _output_folder(out_dir)
    volume = ct if isinstance(ct, Volume) else read_ct(ct, series_uid=series_uid)
    source = None if isinstance(ct, Volume) else str(Path(ct).expanduser().resolve())
    fingerprint = _fingerprint(volume)
    previous, total_entry, body_entry = _reusable_entries(out_dir, fingerprint, quality, classes, reuse)
    if total_entry is not None and (body_entry is not None or not body):
        return _result(total_entry, body_entry if body else None, out_dir, reused=True, seconds=0.0)

    ts = _load_totalsegmentator()
    classes = _in_label_order(ts, classes)
    _check_device(device, ts.torch)
    plan = []
    if total_entry is None:
        plan.append(("total", _datasets(ts, "total", quality, classes)))
    if body and body_entry is None:
        plan.append(("vertebrae_body", _datasets(ts, "vertebrae_body", quality, classes)))
    download_hint = _download_hint(ts, plan, quality, download)
    _configure_usage_statistics(ts, usage_statistics)
    _check_nnunet_paths(ts)

    manifest = {
        "format": MANIFEST_FORMAT,
        "ct": {"fingerprint": fingerprint, "source": source, "shape_kji": list(volume.shape),
               "spacing_mm": [round(float(s), 6) for s in volume.spacing]},
        "total": total_entry,
        "vertebrae_body": body_entry,
    }
    _retire_previous(out_dir, previous, manifest)
    image = ts.nibabel.Nifti1Image(volume.array.transpose(2, 1, 0), np.array(volume.ijk_to_ras))
    started = time.perf_counter()
    run = dict(quality=quality, classes=classes, device=device, usage_statistics=usage_statistics,
               download_hint=download_hint)
    for task, _ in plan:
        manifest["total" if task == "total" else "vertebrae_body"] = _segment_task(ts, image, volume, task,
                                                                                   out_dir, **run)
        _write_json_atomically(out_dir / MANIFEST_FILE, manifest)
    return _result(manifest["total"], manifest["vertebrae_body"] if body else None, out_dir, reused=False,
                   seconds=time.perf_counter() - started)


def _checked_request(quality: str, device: str, classes) -> tuple[str, ...]:
    """The requested classes, without repeats (one class name alone allowed), after refusing an
    unknown quality or device and an empty class list: before the CT is read, so a typo costs
    nothing."""
    if quality not in QUALITIES:
        raise InputError(f"unknown segmentation quality {quality!r}; use one of {', '.join(QUALITIES)}.")
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise InputError(f"unknown device {device!r}; use cpu, gpu, gpu:N or mps.")
    classes = tuple(dict.fromkeys((classes,) if isinstance(classes, str) else classes))
    if not classes:
        raise ValueError("classes must name at least one TotalSegmentator class")
    return classes


def _output_folder(out_dir) -> Path:
    """``out_dir`` as a folder that exists (created with its parents); one sentence when it is a
    file or cannot be created."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"cannot write the segmentation into {out_dir}: it is a file, not a folder.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder {out_dir}: {error.strerror or error}.") from None
    return out_dir


def _reusable_entries(out_dir: Path, fingerprint: str, quality: str, classes: tuple[str, ...],
                      reuse: bool) -> tuple[dict | None, dict | None, dict | None]:
    """(the manifest of an earlier run for this CT, its ``total`` entry, its ``vertebrae_body``
    entry): each None unless ``reuse`` is on and, for an entry, its file exists and it was made
    with the same settings (quality and ``roi_subset`` for ``total``). The manifest names the CT by
    its :func:`_fingerprint`, so a changed CT is segmented again."""
    previous = _read_manifest(out_dir / MANIFEST_FILE) if reuse else None
    if previous is not None and (previous.get("ct") or {}).get("fingerprint") != fingerprint:
        previous = None
    total_entry = (previous or {}).get("total")
    body_entry = (previous or {}).get("vertebrae_body")
    if not _entry_usable(total_entry, out_dir, task="total", quality=quality):
        total_entry = None
    if not _entry_usable(body_entry, out_dir, task="vertebrae_body"):
        body_entry = None
    if total_entry is not None:  # same CT and quality: the roi_subset must match too
        if sorted(total_entry.get("roi_subset") or []) != sorted(classes):
            total_entry = None
    return previous, total_entry, body_entry


def _in_label_order(ts, classes: tuple[str, ...]) -> tuple[str, ...]:
    """The classes sorted by their ``total`` label id; ValueError naming those the ``total`` task
    does not have."""
    order = _total_label_ids(ts)
    unknown = sorted(set(classes) - set(order))
    if unknown:
        raise ValueError(f"not TotalSegmentator 'total' classes: {', '.join(unknown)}")
    return tuple(sorted(classes, key=order.__getitem__))


def _total_label_ids(ts) -> dict[str, int]:
    """Class name → label id of TotalSegmentator's ``total`` task (the ids its output holds)."""
    return {name: label for label, name in ts.class_map["total"].items()}


def _download_hint(ts, plan: list[tuple[str, list[int]]], quality: str, download: bool) -> str:
    """The sentence to raise if downloading the missing weights of ``plan`` fails ("" when none is
    missing); without ``download``, missing weights raise :class:`WeightsMissingError` now,
    before anything runs (TotalSegmentator would fetch them from the internet)."""
    missing, commands = _missing_weights(ts, plan, quality)
    if missing and not download:
        raise WeightsMissingError(_weights_sentence(ts, missing, commands, download_failed=False))
    return _weights_sentence(ts, missing, commands, download_failed=True) if missing else ""


def _retire_previous(out_dir: Path, previous: dict | None, manifest: dict) -> None:
    """Before segmenting: remove the files of another CT, or, when the ``total`` map is about to be
    replaced, write ``manifest`` (which no longer describes it), so that the manifest never names
    a file being rewritten."""
    if previous is None:  # nothing here belongs to this CT any more
        for stale in (out_dir / MANIFEST_FILE, out_dir / TOTAL_FILE, out_dir / BODY_FILE):
            _remove(stale)
    elif manifest["total"] is None:  # the old total map is about to be replaced: stop describing it
        _write_json_atomically(out_dir / MANIFEST_FILE, manifest)


def _segment_task(ts, image, volume: Volume, task: str, out_dir: Path, *, quality: str, classes: tuple[str, ...],
                  device: str, usage_statistics: bool, download_hint: str) -> dict:
    """Run one task (``total`` or ``vertebrae_body``) on the CT's NIfTI ``image``, check its label
    map (the CT's shape, only the labels asked for), write it on the CT's grid and return its
    manifest entry."""
    step_start = time.perf_counter()
    if task == "total":
        labels = _predict(ts, image, "total", fast=quality == "fast", roi_subset=classes, device=device,
                          download_hint=download_hint)
        order = _total_label_ids(ts)
        names, path = {order[name]: name for name in classes}, out_dir / TOTAL_FILE
    else:
        labels = _predict(ts, image, "vertebrae_body", fast=False, roi_subset=None, device=device,
                          download_hint=download_hint)
        names, path = dict(ts.class_map["vertebrae_body"]), out_dir / BODY_FILE
    if labels.shape != volume.shape:
        raise SegmentationError(f"TotalSegmentator's {task} output has the shape {labels.shape[::-1]} (i, j, k), "
                                f"not the CT's {volume.shape[::-1]}.")
    counts = _label_counts(labels)
    extra = [label for label in np.flatnonzero(counts).tolist() if label and label not in names]
    if extra:
        raise SegmentationError(f"TotalSegmentator's {task} output holds labels it was not asked for: {extra}.")
    write_volume(path, Volume(labels, volume.ijk_to_ras))
    return {
        "file": path.name,
        "task": task,
        "quality": quality if task == "total" else "normal",  # vertebrae_body has one model (1.5 mm)
        "roi_subset": list(classes) if task == "total" else None,
        "labels": {str(label): name for label, name in sorted(names.items())},
        "present": [names[label] for label in sorted(names) if counts[label] > 0],
        "datasets": [_weights_folder(ts, dataset_id)[0]
                     for dataset_id in _datasets(ts, task, quality, classes, loaded_only=True)],
        "device": device,
        "seconds": round(time.perf_counter() - step_start, 2),
        "totalsegmentator_version": ts.versions["TotalSegmentator"],
        "nnunetv2_version": ts.versions["nnunetv2"],
        "torch_version": ts.versions["torch"],
        "usage_statistics": bool(usage_statistics),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _result(total: dict, body: dict | None, out_dir: Path, *, reused: bool, seconds: float) -> SegmentationResult:
    return SegmentationResult(
        total_path=out_dir / total["file"],
        body_path=(out_dir / body["file"]) if body else None,
        manifest_path=out_dir / MANIFEST_FILE,
        quality=total["quality"],
        classes=tuple(total["roi_subset"]),
        present=tuple(total.get("present") or ()),
        reused=reused,
        seconds=round(seconds, 2),
        totalsegmentator_version=str(total.get("totalsegmentator_version", "unknown")),
    )
