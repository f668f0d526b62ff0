"""Which series of a study is screened: the rules, as pure functions on header dicts.

A series' header is a dict of DICOM keywords → plain values (text, numbers, lists), as
:mod:`.connection` builds it from a QIDO-RS or C-FIND answer: the series' own attributes
(``SeriesInstanceUID``, ``Modality``, ``SeriesNumber``, ``SeriesDescription``,
``NumberOfSeriesRelatedInstances``) and those of one of its images (``ImageType``,
``ImageOrientationPatient``, ``ConvolutionKernel``, ``SliceThickness``).

A series can be screened when (:func:`refusal`):

1. its Modality is ``CT``;
2. it is not a localizer (scout): ``LOCALIZER`` is not among its ImageType values;
3. it is axial: the normal of its image plane (the cross product of ImageOrientationPatient's row
   and column directions) lies within :data:`AXIAL_TOLERANCE_DEG` (10°) of the patient's
   cranio-caudal axis; reformats (sagittal, coronal) are left out because TotalSegmentator and
   the level check expect the acquired axial stack;
4. it has at least ``min_slices`` images (:data:`MIN_SLICES`, 20: at 3 mm, 60 mm hold about two
   vertebrae, the least a screening can grade).

Of those, the first after sorting by (:func:`preference`):

1. the reconstruction kernel: soft tissue first, then unknown kernels, bone and lung kernels last
   (:func:`kernel_class`). Sharp kernels raise the noise of trabecular HU and move thin edges;
   the published HU thresholds were measured on soft-tissue kernels;
2. the thinnest slices (SliceThickness; missing counts as thickest): endplates are sharper;
3. the most images (the longest coverage);
4. then the lowest SeriesNumber and the SeriesInstanceUID (as text), so the choice never depends
   on the order in which the PACS lists the series.
"""

from __future__ import annotations

import math
import re

from .config import PacsError

MIN_SLICES = 20
"""Fewest images of a screenable series (rule 4 of the module docstring)."""
AXIAL_TOLERANCE_DEG = 10.0
"""Largest angle (degrees) between an axial series' slice normal and the cranio-caudal axis."""
KERNEL_ORDER = ("soft", "unknown", "sharp")

_SHARP_WORDS = re.compile(r"BONE|LUNG|PULMO|EDGE|SHARP|DETAIL|KNOCHEN|LUNGE|OSTEO|\bYC\b|\bYD\b|HIGH.?RES|\bHR\b|\bL\b|"
                          r"\bE\b|\bD\b|\bYE\b|\bYF\b")
_SOFT_WORDS = re.compile(r"SOFT|STANDARD|STND|WEICHTEIL|WEICHT|MEDIASTIN|ABDOM|BODY|SMOOTH|BRAIN|\bA\b|\bB\b|\bC\b|"
                         r"\bUB\b|\bYA\b|\bYB\b|FC0\d|FC1\d")
_SIEMENS_KERNEL = re.compile(r"^(B|BR|BF|BV|BL|I|J|Q|HR|BS)(\d{2})[A-Z]?$")
"""Siemens kernels (B30f, Br38, I26f, Bl57...): the two digits are the sharpness; 50 and above is
sharp, and ``Bl``, ``Hr`` (lung, high resolution) are sharp at every number."""
_CANON_LUNG = re.compile(r"^FC(5\d|8\d)$")


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _kernel_parts(value) -> list[str]:
    parts = value if isinstance(value, (list, tuple)) else [value] if value else []
    return [str(p).strip().upper() for p in parts if str(p).strip()]


def kernel_class(kernel, description=None) -> str:
    """``soft``, ``sharp`` (bone or lung) or ``unknown``: from ConvolutionKernel (any of its
    values), else from the SeriesDescription's words.

    Siemens names (``B30f``, ``Br40``, ``I31f``: sharpness 10-49 soft, 50 and above sharp; ``Bl``
    and ``Hr`` lung) are read by number; GE (``STANDARD``, ``SOFT``; ``BONE``, ``LUNG``,
    ``EDGE``, ``DETAIL``), Philips (``A``, ``B``, ``C``, ``UB``; ``D``, ``E``, ``L``, ``YC``..),
    Canon (``FC0x``, ``FC1x``; ``FC5x``, ``FC8x``) and words (``bone``, ``lung``, ``weichteil``,
    ``mediastinum``) by name. A kernel that names nothing known is ``unknown``."""
    for part in _kernel_parts(kernel):
        siemens = _SIEMENS_KERNEL.match(part)
        if siemens:
            return "sharp" if siemens.group(1) in ("BL", "HR") or int(siemens.group(2)) >= 50 else "soft"
        if _CANON_LUNG.match(part) or _SHARP_WORDS.search(part):
            return "sharp"
        if _SOFT_WORDS.search(part):
            return "soft"
    words = _text(description).upper()
    if re.search(r"BONE|LUNG|PULMO|KNOCHEN|LUNGE|SHARP|EDGE", words):
        return "sharp"
    if re.search(r"SOFT|WEICHTEIL|MEDIASTIN|STANDARD", words):
        return "soft"
    return "unknown"


def _numbers(value) -> list[float] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split("\\")
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def slice_normal_angle(orientation) -> float | None:
    """Degrees between the image plane's normal and the cranio-caudal axis, from
    ImageOrientationPatient (6 direction cosines); None when it is missing or malformed."""
    values = _numbers(orientation)
    if values is None or len(values) != 6:
        return None
    row, column = values[:3], values[3:]
    normal = (row[1] * column[2] - row[2] * column[1], row[2] * column[0] - row[0] * column[2],
              row[0] * column[1] - row[1] * column[0])
    length = math.sqrt(sum(c * c for c in normal))
    if length < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / length)))


def instance_count(header: dict) -> int | None:
    """The series' number of images (NumberOfSeriesRelatedInstances), or None when unknown."""
    numbers = _numbers(header.get("NumberOfSeriesRelatedInstances"))
    return int(numbers[0]) if numbers else None


def slice_thickness(header: dict) -> float | None:
    numbers = _numbers(header.get("SliceThickness"))
    return numbers[0] if numbers and numbers[0] > 0 else None


def refusal(header: dict, min_slices: int = MIN_SLICES) -> str | None:
    """Why this series cannot be screened (rules 1-4 of the module docstring), or None."""
    modality = _text(header.get("Modality")).strip().upper()
    if modality != "CT":
        return f"its modality is {modality or 'not given'}, not CT"
    if "LOCALIZER" in _text(header.get("ImageType")).upper():
        return "it is a localizer (scout)"
    angle = slice_normal_angle(header.get("ImageOrientationPatient"))
    if angle is None:
        return "its ImageOrientationPatient is missing or malformed"
    if angle > AXIAL_TOLERANCE_DEG:
        return f"it is not axial (its slices are {angle:.0f}° from axial)"
    count = instance_count(header)
    if count is None or count < min_slices:
        return f"it has {count if count is not None else 'an unknown number of'} images, fewer than {min_slices}"
    return None


def preference(header: dict) -> tuple:
    """The sort key of a screenable series: smaller is preferred (module docstring)."""
    kernel = kernel_class(header.get("ConvolutionKernel"), header.get("SeriesDescription"))
    thickness = slice_thickness(header)
    numbers = _numbers(header.get("SeriesNumber"))
    return (KERNEL_ORDER.index(kernel), thickness if thickness is not None else math.inf,
            -(instance_count(header) or 0), numbers[0] if numbers else math.inf,
            _text(header.get("SeriesInstanceUID")))


def choose_series(headers: list[dict], min_slices: int = MIN_SLICES, study: str = "the study") -> dict:
    """The header of the series to screen (module docstring).

    Raises:
        PacsError: no series can be screened; the sentence gives each series' reason (at most
            five, then how many more).
    """
    refusals = []
    screenable = []
    for header in headers:
        why = refusal(header, min_slices)
        if why is None:
            screenable.append(header)
        else:
            refusals.append(f"series {_text(header.get('SeriesNumber')) or _text(header.get('SeriesInstanceUID'))}: "
                            f"{why}")
    if screenable:
        return min(screenable, key=preference)
    if not refusals:
        raise PacsError(f"{study} has no series in the PACS.")
    more = f"; and {len(refusals) - 5} more" if len(refusals) > 5 else ""
    raise PacsError(f"{study} has no CT series to screen ({'; '.join(refusals[:5])}{more}).")


def describe(header: dict) -> str:
    """The series in a few words for the summary line."""
    kernel = _kernel_parts(header.get("ConvolutionKernel"))
    thickness = slice_thickness(header)
    return (f"series {_text(header.get('SeriesNumber')) or '?'} '{_text(header.get('SeriesDescription'))}' "
            f"({instance_count(header)} images, {f'{thickness:g} mm' if thickness else 'thickness unknown'}, "
            f"kernel {kernel[0] if kernel else 'unknown'} "
            f"[{kernel_class(header.get('ConvolutionKernel'), header.get('SeriesDescription'))}])")
