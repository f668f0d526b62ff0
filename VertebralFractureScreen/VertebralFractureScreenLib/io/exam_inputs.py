"""One exam's inputs, read and checked before any measurement (SPEC §5, §6).

:func:`load_exam` takes the CT and its segmentations as paths (anything :mod:`.io.images` reads) or
as in-memory :class:`.io.volume.Volume` objects, brings the label maps onto the CT grid and
checks that the exam can be screened. Every problem is an :class:`~.errors.InputError` with one
sentence that says what is wrong and, where there is one, what to do; nothing is written and the
inputs are never modified.

Checks, in order:

* the CT is a 3-D volume (``io.images`` refuses anything else), not empty or constant, with voxel
  sizes between ``io.volume.MIN_VOXEL_SIZE_MM`` and ``MAX_VOXEL_SIZE_MM`` (``io``
  checks files; this also covers volumes given in memory);
* it looks like a CT in Hounsfield units: some voxels between −1100 and −100 HU (fat or air: every
  body CT has them; a normalised or MR image has none), and at most 1 % of them above 3000 HU (metal
  is local; an image stored in other units is not). Padding below −1100 HU (−2048, −3024 outside
  the reconstruction circle) is ignored;
* the segmentation overlaps the CT (``io.images`` refuses a grid that does not) and holds vertebra
  labels of the chosen convention;
* the vertebrae are in anatomical order: the centroids of consecutive levels run from cranial to
  caudal. A label map in another convention (VerSe ids read as TotalSegmentator ones, or the
  reverse) fails here or in the previous check, and the sentence says to try the other
  ``--labels``;
* a ``vertebrae_body`` map holds only bodies (1) and discs (2): a multi-label map given in its
  place is refused. (The map is read before the segmentation, to be kept as the box of its
  labels, so a ``vertebrae_body`` file that cannot be read at all is reported first.)

Whether each vertebra's mask lies on the CT's bone is checked by the morphometry
(``morphometry.bone_edge_contrast``), where each vertebra is cropped anyway.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import read_ct, read_labelmap, resample_labelmap
from .labels import LabelMapWarning
from .volume import MAX_VOXEL_SIZE_MM, MIN_VOXEL_SIZE_MM, Volume, plausible_voxel_sizes
from .. import levels as lv
from ..errors import InputError
from ..geometry import BoxedLabels, find_label_boxes, mask_centroid_ras

HU_AIR_FAT_RANGE = (-1100.0, -100.0)
"""HU of voxels that every body CT has somewhere (air and fat)."""
HU_PADDING_BELOW = -1100.0
"""Values below this are treated as padding outside the reconstruction, not as anatomy."""
HU_IMPLAUSIBLY_HIGH = 3000.0
MAX_HIGH_FRACTION = 0.01
MIN_ORDERED_FRACTION = 0.8
"""Share of consecutive vertebra pairs that must run cranial → caudal along the patient's axis."""


@dataclass
class ExamInputs:
    """The CT and its label maps on the CT's grid.

    ``labels``: vertebra (and muscle, aorta, cord) labels in ``convention``; ``body_labels``: the
    optional ``vertebrae_body`` map (1 = bodies, 2 = discs) on the CT's grid, held as the box that
    holds its labels (:class:`.geometry.BoxedLabels`: indexed as the whole map); ``sources``: where
    each came from (a path, or ``"in memory"``); ``warnings``: problems that did not stop reading."""

    ct: Volume
    labels: Volume
    body_labels: BoxedLabels | None
    convention: str
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    label_boxes: list | None = None
    """Each label's bounding box (:func:`.geometry.find_label_boxes`, as ``ndimage.find_objects``),
    found once for all steps."""
    label_grid: tuple | None = None
    """The segmentation's own grid ``(ijk_to_ras, shape)`` when it was resampled onto the CT's:
    a structure cut by its extent is cut by the field of view too."""


def _source(value) -> str:
    return "in memory" if isinstance(value, Volume) else str(Path(value).expanduser())


def read_ct_checked(ct, series_uid: str | None = None) -> Volume:
    """The CT as a :class:`.io.volume.Volume`, checked by :func:`check_ct`."""
    volume = ct if isinstance(ct, Volume) else read_ct(ct, series_uid=series_uid)
    check_ct(volume, _source(ct))
    return volume


def check_ct(volume: Volume, name: str = "CT") -> None:
    """Refuse an empty or constant volume and one whose values are obviously not HU."""
    array = volume.array
    if array.ndim != 3:
        raise InputError(f"{name} is not a 3-D volume (shape {array.shape})")
    if array.size == 0:
        raise InputError(f"{name} is empty")
    spacing = [float(v) for v in volume.spacing]
    if not plausible_voxel_sizes(spacing):
        # files are checked by io already; this catches volumes given in memory (3D Slicer)
        raise InputError(f"{name} has an invalid voxel spacing ({', '.join(f'{v:g}' for v in spacing)} mm); each "
                         f"voxel size must be between {MIN_VOXEL_SIZE_MM:g} and "
                         f"{MAX_VOXEL_SIZE_MM:g} mm")
    # A strided sample keeps the check cheap on 512x512x1000 volumes (about 1/64 of the voxels).
    step = tuple(max(1, n // 128) for n in array.shape)
    sample = np.asarray(array[::step[0], ::step[1], ::step[2]], dtype=np.float32)
    if not np.isfinite(sample).all():
        raise InputError(f"{name} contains NaN or infinite values, so it is not a CT in Hounsfield units")
    lo, hi = float(array.min()), float(array.max())  # NaN anywhere makes them NaN: no voxel escapes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{name} contains NaN or infinite values, so it is not a CT in Hounsfield units")
    if lo == hi:
        raise InputError(f"{name} is constant ({lo:g} everywhere): there is no image to screen")
    anatomy = sample[sample >= HU_PADDING_BELOW]
    if anatomy.size == 0:
        raise InputError(f"{name} has no value above {HU_PADDING_BELOW:g}: it is not a CT in Hounsfield units")
    air_or_fat = np.count_nonzero((anatomy >= HU_AIR_FAT_RANGE[0]) & (anatomy <= HU_AIR_FAT_RANGE[1]))
    high = np.count_nonzero(anatomy > HU_IMPLAUSIBLY_HIGH) / anatomy.size
    if air_or_fat == 0 or high > MAX_HIGH_FRACTION:
        raise InputError(
            f"{name} does not look like a CT in Hounsfield units (values {lo:g} to {hi:g}, "
            f"{'no fat or air' if air_or_fat == 0 else f'{100 * high:.0f} % of voxels above {HU_IMPLAUSIBLY_HIGH:g}'}); "
            "give the CT itself, with its rescale slope and intercept applied")


def _labels_on_grid(value, reference: Volume, convention: str, what: str,
                    messages: list[str]) -> tuple[Volume, tuple | None]:
    """The label map on the CT's grid, and its own grid ``(ijk_to_ras, shape)`` when it had to be
    resampled (None when it was on the CT's): where that grid ends, nothing is known."""
    if isinstance(value, np.ndarray):
        value = Volume(value, reference.ijk_to_ras)
    if not isinstance(value, Volume):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LabelMapWarning)
            value = read_labelmap(value, None, convention=convention)
        messages.extend(str(w.message) for w in caught if issubclass(w.category, LabelMapWarning))
    elif np.issubdtype(value.array.dtype, np.floating) or value.array.ndim != 3:
        raise InputError(f"the {what} must be a 3-D integer label map")
    if value.same_grid(reference, tol=1e-4):
        return Volume(value.array, reference.ijk_to_ras), None
    own_grid = (np.array(value.ijk_to_ras, dtype=float), tuple(int(n) for n in value.array.shape))
    return resample_labelmap(value, reference, name=what), own_grid


def check_vertebrae(labels: Volume, convention: str, name: str = "segmentation",
                    label_boxes: list | None = None, named_segments: bool = False) -> list[str]:
    """The vertebra levels present (cranial to caudal); refuses a map without vertebra labels or
    whose vertebrae are not in anatomical order (the sign of a wrong label convention).
    ``label_boxes``: ``ndimage.find_objects(labels.array)`` when known. ``named_segments``: the
    map came from a Slicer segmentation (``.seg.nrrd``), whose segments are matched by their IDs
    and terminology (``io.labels.segment_structure``), not by label values: the advice then is
    about naming them, since ``--labels`` changes nothing there."""
    other = "verse" if convention == "totalsegmentator" else "totalsegmentator"
    ids = lv.vertebra_ids(convention)
    by_label = {label: level for level, label in ids.items()}
    objects = (label_boxes if label_boxes is not None and len(label_boxes) >= max(ids.values())
               else find_label_boxes(labels.array, max(ids.values())))
    present = [by_label[label] for label, box in enumerate(objects, start=1) if box is not None and label in by_label]
    if not present and named_segments:
        raise InputError(f"none of the segments of the {name} is recognised as a vertebra: give them "
                         "TotalSegmentator's segment IDs (vertebrae_L1 …) or a vertebra terminology "
                         "(e.g. SNOMED CT 'L1 vertebra')")
    if not present:
        raise InputError(f"the {name} has no vertebra labels in the {convention} convention; "
                         f"check that it is a spine segmentation, or try --labels {other}")
    present.sort(key=lv.level_position)
    if len(present) >= 3:
        # Centroids along the patient's superior axis (RAS z): consecutive levels must descend.
        superior = []
        for level in present:
            box = objects[ids[level] - 1]
            origin_ijk = [box[2].start, box[1].start, box[0].start]
            superior.append(mask_centroid_ras(labels.array[box] == ids[level], labels.ijk_to_ras, origin_ijk)[2])
        descending = np.mean(np.diff(superior) < 0)
        if descending < MIN_ORDERED_FRACTION and (1.0 - descending) < MIN_ORDERED_FRACTION:
            raise InputError(f"the vertebra labels of the {name} are not in anatomical order for the "
                             f"{convention} convention; try --labels {other}")
    return present


def load_exam(ct, seg, body_seg=None, *, convention: str = "totalsegmentator",
              series_uid: str | None = None) -> ExamInputs:
    """Read and check one exam.

    Args:
        ct: CT path (NIfTI, NRRD, MetaImage, DICOM folder or file) or :class:`.io.volume.Volume` in HU.
        seg: vertebra segmentation: a path, a Volume, or an integer array on the CT's grid.
        body_seg: optional ``vertebrae_body`` map (1 = bodies, 2 = discs), same forms as ``seg``.
        convention: label ids of ``seg``: ``totalsegmentator`` or ``verse``.
        series_uid: the DICOM series to read when the CT folder holds several.

    Raises:
        InputError: with one sentence, for every problem listed in the module docstring.
    """
    if convention not in ("totalsegmentator", "verse"):
        raise InputError(f"unknown label convention {convention!r}; use totalsegmentator or verse")
    volume = read_ct_checked(ct, series_uid)
    messages: list[str] = []
    body_messages: list[str] = []
    # The vertebrae_body map is read before the segmentation and kept as the box of its labels: the
    # two maps are never whole in memory together (with the CT, that set a screening's peak).
    body = None
    if body_seg is not None:
        whole = _labels_on_grid(body_seg, volume, "vertebrae_body", "vertebrae_body segmentation", body_messages)[0]
        body = BoxedLabels.of(whole.array)
        del whole
    labels, label_grid = _labels_on_grid(seg, volume, convention, "segmentation", messages)
    messages += body_messages
    # Each label's bounding box, once: the checks, the morphometry, the aorta and the muscles use it.
    boxes = find_label_boxes(labels.array, _BOX_LABELS[convention])
    named = isinstance(seg, (str, Path)) and str(seg).lower().endswith((".seg.nrrd", ".seg.nhdr"))
    check_vertebrae(labels, convention, label_boxes=boxes, named_segments=named)
    # The box holds every labelled voxel: its largest label and its bodies are the whole map's.
    if body is not None and int(body.array.max(initial=0)) > lv.DISC_LABEL:
        raise InputError(f"the vertebrae_body segmentation holds labels up to {int(body.array.max())}, but a "
                         f"vertebrae_body map has only {lv.BODY_LABEL} (bodies) and {lv.DISC_LABEL} (discs): is it "
                         "a multi-label map such as TotalSegmentator's total? give that one as the segmentation")
    if body is not None and not _contains(body.array, lv.BODY_LABEL):
        messages.append("the vertebrae_body segmentation has no vertebral body (label 1); bodies are separated "
                        "by shape instead")
        body = None
    sources = {"ct": _source(ct), "segmentation": "in memory" if isinstance(seg, np.ndarray) else _source(seg)}
    if body_seg is not None:
        sources["vertebrae_body"] = "in memory" if isinstance(body_seg, np.ndarray) else _source(body_seg)
    return ExamInputs(volume, labels, body, convention, sources, messages, boxes, label_grid)


_BOX_LABELS = {"totalsegmentator": max(lv.TOTAL_ILIOPSOAS_RIGHT, lv.TOTAL_AORTA, *lv.TOTAL_RIB_IDS.values(),
                                       *lv.vertebra_ids("totalsegmentator").values()),
               "verse": max(*lv.vertebra_ids("verse").values(), *lv.VERSE_EXTRA_IDS)}
"""Largest label whose bounding box a screening uses, per convention (the ribs and VerSe's
transitional vertebrae for the level check)."""


def _contains(array: np.ndarray, label: int) -> bool:
    """Whether ``label`` occurs, scanning slabs of slices and stopping at the first hit (no
    whole-volume temporary)."""
    step = max(1, 4_000_000 // max(1, array.shape[1] * array.shape[2]))
    return any(np.any(array[k:k + step] == label) for k in range(0, array.shape[0], step))
