"""A cohort's exams and their IDs: found in a folder, read from a CSV manifest or taken from a list
of CT files, each with an exam ID that can name its folder.

Inputs (:func:`find_exams`):

* a **folder**: every CT image file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``,
  ``.mhd``) directly in it is one exam, and so is every sub-folder that holds a DICOM series; the
  exam ID is the file's name without its suffix (or the sub-folder's name), in Unicode NFC form.
  Exam IDs follow the one rule of :func:`checked_exam_id` (:data:`EXAM_ID_RULE`; the same rule as
  ``vfscreen screen --exam-id``) and are unique ignoring case and Unicode form (their folders must be
  distinct on every file system). Segmentations are found by name beside it: ``<exam>_seg`` or
  ``<exam>_total`` (TotalSegmentator ``total`` ids) or ``<exam>.seg.nrrd`` (a Slicer
  segmentation), and ``<exam>_body`` or ``<exam>_vertebrae_body`` (the ``vertebrae_body`` map),
  with any of the image suffixes. Such files are never exams themselves. Exams without a
  segmentation are segmented by TotalSegmentator.
* a **CSV manifest** with a ``ct`` column and optional ``exam_id``, ``seg``, ``body_seg``,
  ``labels`` (``totalsegmentator`` / ``verse``) and ``series`` columns; relative paths are relative
  to the manifest's folder. Every other column (a label, ``age``, ``sex``...) is passed through
  to ``features.csv``. A manifest that repeats a column or an exam ID (ignoring case and Unicode
  form) is refused with one sentence naming them.
* a **list of CT files** or DICOM folders (:func:`exams_from_files`), their segmentations found
  beside them by the folder rule's names.

A folder exam whose file name cannot be an exam ID is kept with the reason in
:attr:`CohortExam.refused` (the run records it as an input failure and screens the others);
everywhere else such a name is refused at once.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError
from ..exam.screening import exam_id_of
from ..io.files import IMAGE_SUFFIXES, split_image_suffix
from .writes import log

SEG_SUFFIXES = ("_seg", "_total")
BODY_SUFFIXES = ("_vertebrae_body", "_body")
MANIFEST_COLUMNS = ("exam_id", "ct", "seg", "body_seg", "labels", "series")
"""Manifest columns read by the engine; every other column is passed through to ``features.csv``."""
EXAM_ID_MAX_BYTES = 200
"""The longest exam ID, in bytes of UTF-8 (file systems allow 255 per name; the rest is for
suffixes such as ``_vfscreen`` and the writers' hidden temporary names)."""
EXAM_ID_RULE = (f"letters and digits of any script, . _ + - and single inner spaces, starting with a letter or digit, "
                f"not ending with '.' or a space, at most {EXAM_ID_MAX_BYTES} bytes, and not a Windows device name such "
                f"as CON or NUL")
"""The exam-ID rule in words, as the refusals say it (see :func:`checked_exam_id`)."""
_WINDOWS_DEVICES = frozenset(["con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt")
                                                              for n in range(1, 10))])


@dataclass(frozen=True)
class CohortExam:
    """One exam of a cohort: its ID, CT (file or DICOM folder) and optional segmentations
    (paths as text), label convention (None: the cohort's), DICOM series, and the manifest's
    pass-through ``columns`` as ``(name, value)`` pairs. ``refused``: why a folder exam cannot
    be screened (its name cannot be an exam ID): it is then recorded as an input failure, with
    no folder of its own, and never screened."""

    exam_id: str
    ct: str
    seg: str | None = None
    body_seg: str | None = None
    convention: str | None = None
    series_uid: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    refused: str | None = None


def _role(stem: str, suffix: str) -> tuple[str, str]:
    """``(role, exam stem)`` of an image file: role ``ct``, ``seg`` or ``body_seg``."""
    if suffix == ".seg.nrrd":
        return "seg", stem
    lower = stem.lower()
    for role, endings in (("body_seg", BODY_SUFFIXES), ("seg", SEG_SUFFIXES)):
        for ending in endings:
            if lower.endswith(ending) and len(stem) > len(ending):
                return role, stem[: -len(ending)]
    return "ct", stem


def find_exams(inputs) -> list[CohortExam]:
    """The exams of a folder or a CSV manifest (rules in the module docstring), sorted by exam ID
    for a folder and in row order for a manifest.

    Raises:
        InputError: the inputs do not exist, hold no exam, or a manifest is malformed (missing
            ``ct`` column, empty or unsafe or duplicate exam IDs).
    """
    path = Path(inputs).expanduser().absolute()  # workers in other folders (or machines) need absolute paths
    if not path.exists():
        raise InputError(f"cohort inputs {path} do not exist.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"cohort inputs must be a folder of exams or a CSV manifest, not {path.name}.")
        return read_manifest(path)
    from ..io.dicom import is_dicom_folder

    if is_dicom_folder(path):
        raise InputError(f"{path} is one DICOM series: give the folder that holds the exams' series folders, "
                         "or screen it with 'vfscreen screen'.")
    found: dict[str, dict[str, str]] = {}
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if is_dicom_folder(entry.path):
                    found.setdefault(entry.name, {})["ct"] = entry.path
                continue
            parts = split_image_suffix(entry.name)
            if parts is None:
                continue
            role, stem = _role(*parts)
            slot = found.setdefault(stem, {})
            if role in slot:
                raise InputError(f"two files give the {role.replace('_', ' ')} of exam {stem}: "
                                 f"{Path(slot[role]).name} and {entry.name}; keep one or use a CSV manifest.")
            slot[role] = entry.path
    exams = []
    for stem, files in sorted(found.items()):
        if "ct" not in files:
            log.warning("no CT for the segmentation %s: ignored",
                        ", ".join(_printable(Path(p).name) for p in files.values()))
            continue
        try:  # one exam whose name cannot be an exam ID is refused alone: the others are screened
            exam_id, refused = checked_exam_id(stem), None
        except InputError:
            exam_id = _printable(stem)
            refused = (f"its exam ID {exam_id!r} (from {_printable(Path(files['ct']).name)!r}) cannot name a "
                       f"folder: rename it; an exam ID is {EXAM_ID_RULE}.")
        exams.append(CohortExam(exam_id, files["ct"], files.get("seg"), files.get("body_seg"), refused=refused))
    for group in _colliding([e for e in exams if e.refused is None]):
        names = ", ".join(sorted(Path(e.ct).name for e in group))
        exams = [replace(e, refused=f"the exams {names} differ only in case or Unicode form, and so would their "
                                    "folders on macOS and Windows: rename all but one.") if e in group else e
                 for e in exams]
    if not exams:
        raise InputError(f"no exam found in {path}: expected CT images ({', '.join(IMAGE_SUFFIXES)}) or DICOM "
                         "series folders, or give a CSV manifest.")
    if all(e.refused for e in exams):
        more = f" (and {len(exams) - 1} more)" if len(exams) > 1 else ""
        raise InputError(f"no exam in {path} can be screened{more}: {exams[0].refused}")
    return exams


def _printable(text: str) -> str:
    """``text`` for a table or a message: undecodable bytes of a file name become U+FFFD and
    control characters ``?``."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


def _folded(exam_id: str) -> str:
    """The key under which two exam IDs name the same folder on some file system (case and
    Unicode form ignored, as on macOS and Windows)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", exam_id).casefold())


def _colliding(exams: Iterable[CohortExam]) -> list[list[CohortExam]]:
    """Groups of exams whose IDs name the same folder on some file system (:func:`_folded`)."""
    groups: dict[str, list[CohortExam]] = {}
    for exam in exams:
        groups.setdefault(_folded(exam.exam_id), []).append(exam)
    return [group for group in groups.values() if len(group) > 1]


def exams_from_files(cts: Sequence) -> list[CohortExam]:
    """Exams from a list of CT files or DICOM folders (e.g. picked in Slicer); each one's
    segmentations are found beside it by the folder rule's names (``<exam>_seg``, ``<exam>_total``,
    ``<exam>.seg.nrrd``, ``<exam>_body``, ``<exam>_vertebrae_body``).

    Raises:
        InputError: a CT does not exist, or two CTs have the same exam ID.
    """
    exams = []
    for ct in cts:
        path = Path(ct).expanduser().absolute()
        if not path.exists():
            raise InputError(f"CT {path} does not exist.")
        stem = path.name if path.is_dir() else exam_id_of(path)
        found: dict[str, str] = {}
        for sibling in sorted(path.parent.iterdir()):
            sibling_parts = split_image_suffix(sibling.name) if sibling.is_file() else None
            if sibling_parts is None or sibling == path:
                continue
            role, sibling_stem = _role(*sibling_parts)
            if sibling_stem == stem and role != "ct":
                found.setdefault(role, str(sibling))
        exams.append(CohortExam(checked_exam_id(stem, hint=f" ({path})"), str(path), found.get("seg"),
                                found.get("body_seg")))
    duplicates = sorted(group[0].exam_id for group in _colliding(exams))
    if duplicates:
        raise InputError(f"several CTs have the exam ID {', '.join(duplicates)} (ignoring case and Unicode form); "
                         "rename them or use a CSV manifest.")
    return exams


def checked_exam_id(text: str, what: str = "exam ID", hint: str = "") -> str:
    """``text`` in Unicode NFC form when it can be an exam ID, else a one-sentence
    :class:`.errors.InputError` (``"{what} {text!r} is not a plain name, so it cannot name a
    folder: ...{hint}."``).

    The one rule for every exam ID: ``vfscreen screen --exam-id`` (and the ID taken from the CT's
    file name when it names the default output folder), the IDs of a folder cohort, of a manifest
    and of a list of CT files. An exam ID names a folder and a cell of every table, so it is one
    plain name that every file system (Linux, macOS, Windows) keeps as it is:

    * letters and digits of any script (with the combining marks of its letters), ``. _ + -`` and
      single spaces between them (``CT abdomen``: file names have them);
      non-ASCII names are exam IDs (``müller``, ``東京``), in NFC form, so that a name is the same ID
      whichever Unicode form the file system reports;
    * starting with a letter or digit: never empty, ``.`` or ``..``, hidden (``.x``), an option
      (``-x``) or a spreadsheet formula (``=x``, ``+x``, ``@x``);
    * not ending with ``.`` or a space (Windows drops them) and not a Windows device name (``CON``, ``PRN``,
      ``AUX``, ``NUL``, ``COM1``-``COM9``, ``LPT1``-``LPT9``, also before a ``.``);
    * at most :data:`EXAM_ID_MAX_BYTES` (200) bytes in UTF-8.

    Hence no path separator (``/``, ``\\``), tab or double space, control character, undecodable byte of a file
    name or character that some file system forbids (``: * ? " < > |``). Within one cohort the
    IDs must also differ in more than case and Unicode form (their folders would be one on macOS
    and Windows)."""
    normal = unicodedata.normalize("NFC", text)
    plain = (normal[:1].isalnum() and not normal.endswith((".", " ")) and "  " not in normal
             and all(c.isalnum() or c in "._+- " or unicodedata.category(c).startswith("M") for c in normal)
             and normal.split(".")[0].casefold() not in _WINDOWS_DEVICES)
    if not plain or len(normal.encode("utf-8")) > EXAM_ID_MAX_BYTES:
        raise InputError(f"{what} {text!r} is not a plain name, so it cannot name a folder: an exam ID is "
                         f"{EXAM_ID_RULE}{hint}.")
    return normal


def read_manifest(path) -> list[CohortExam]:
    """The exams of a CSV manifest (see the module docstring)."""
    path = Path(path).expanduser().absolute()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns = [c.strip() for c in next(reader, [])]
            lines = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the manifest {path}: {getattr(error, 'strerror', None) or error}.") from None
    repeated = sorted(name for name, count in Counter(c for c in columns if c).items() if count > 1)
    if repeated:  # a dict of the row would silently keep the last one
        raise InputError(f"the manifest {path} has the column{'s' if len(repeated) > 1 else ''} "
                         f"{', '.join(_printable(c) for c in repeated)} more than once: keep one of each.")
    if "ct" not in columns:
        raise InputError(f"the manifest {path} has no 'ct' column (columns: {', '.join(columns) or 'none'}).")
    rows = []
    for number, cells in enumerate(lines, start=2):
        if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns):]):
            raise InputError(f"line {number} of the manifest {path} has more cells than its header has columns.")
        rows.append({name: cell.strip() for name, cell in zip(columns, cells) if name})
    base = path.parent
    passthrough = [c for c in columns if c not in MANIFEST_COLUMNS and c]
    exams, seen = [], {}
    for number, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        if not row.get("ct"):
            raise InputError(f"the manifest {path} has no CT in line {number}.")

        def resolve(text):
            return None if not text else str((base / Path(text).expanduser()))

        ct = resolve(row["ct"])
        exam_id = checked_exam_id(row.get("exam_id") or exam_id_of(ct), hint=f" (line {number} of {path})")
        seen.setdefault(_folded(exam_id), []).append((exam_id, number))
        convention = row.get("labels") or None
        if convention not in (None, "totalsegmentator", "verse"):
            raise InputError(f"line {number} of {path}: labels must be totalsegmentator or verse, not {convention!r}.")
        exams.append(CohortExam(exam_id, ct, resolve(row.get("seg")), resolve(row.get("body_seg")), convention,
                                row.get("series") or None, tuple((c, row.get(c, "")) for c in passthrough)))
    repeated_ids = [places for places in seen.values() if len(places) > 1]
    if repeated_ids:
        def where(places):
            names = " / ".join(dict.fromkeys(name for name, _ in places))
            numbers = [str(number) for _, number in places]
            return f"{names} in lines {', '.join(numbers[:-1])} and {numbers[-1]}"

        raise InputError(f"the manifest {path} repeats exam ID{'s' if len(repeated_ids) > 1 else ''} "
                         f"{'; '.join(where(p) for p in repeated_ids)} (ignoring case and Unicode form): "
                         "exam IDs must be unique.")
    if not exams:
        raise InputError(f"the manifest {path} lists no exam.")
    return exams
