"""Lesions and hardware: what makes a vertebra's osteoporotic reading wrong (issue 28, point 2).

A vertebral body holding a sclerotic or lytic lesion, bone cement or pedicle screws has a trabecular
HU (and often a shape) that says nothing about osteoporosis. :func:`find_lesions` recognises them
per vertebra, so that screening can flag such a vertebra instead of grading it as osteoporosis.

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the vertebra label map
(``totalsegmentator`` or ``verse`` ids), optionally the ``vertebrae_body`` map (1 = bodies), the
grid's 4x4 IJK→RAS matrix (mm) and the morphometry (:func:`.morphometry.measure_heights`) of every
vertebra present, whose frames, walls and endplates place everything below. Each vertebra is worked
on in a crop of its label box grown by :data:`METAL_REACH_MM`, never on the whole volume; every
distance is in mm, so the rules do not depend on the voxel size.

**Hardware** (checked first; an instrumented vertebra's lesions are not assessed, flag
``lesions_not_assessed``: cement or metal and its streaks decide its HU):

* *Metal*: voxels at :data:`METAL_HU` or above, within 71 HU of the 12-bit CT's ceiling of 3071 HU
  to which titanium and steel saturate (extended-scale reconstructions read them higher still).
  Counted are the vertebra's own voxels and unlabelled ones behind its posterior wall, at the
  height of its body (screw heads stand behind the bone, unlabelled).
* ``screws``: at least :data:`SCREW_MIN_ML` of that metal outside the body (the pedicles, the
  heads); a 6 mm screw holds about 0.4 ml in a 15 mm pedicle.
* ``cement``: at least :data:`CEMENT_MIN_ML` of the body at :data:`CEMENT_HU` or above, most of it
  below :data:`METAL_HU` (PMMA with its barium or zirconia opacifier reads thousands of HU). 1500 HU
  is above trabecular bone of any adult and above the mean of bone islands (enostoses: mean
  1190 ± 239 HU, maximum 1323 ± 234 HU; Ulano et al., AJR 2016;207:362), so only a large, dense
  bone island could pass for cement, and 0.5 ml is a fraction of a vertebroplasty's filling.
  A body whose dense part is mostly metal holds screws (or a metal implant) instead.

**Where lesions are looked for: the core.** The body (the ``vertebrae_body`` map's body within
the vertebra's label, else the vertebra in front of its posterior wall) less a shell: every voxel
whole at least :data:`WALL_MARGIN_MM` inside the body's outer surface (a healthy vertebra's
cortex, about 1 mm, is dense everywhere, and its partial volume reaches a voxel further), and at
least :data:`ENDPLATE_MARGIN_MM` from the endplates (the compacted trabeculae under a fractured
endplate are dense and must not look sclerotic). "Whole" allows the voxel's own extent and
where a surface found on that grid may lie (:data:`.trabecular_roi.SURFACE_UNCERTAINTY`): the
wall clearance is an erosion by an ellipsoid of semi-axes ``margin + 1.25 × voxel size`` per grid
axis, the endplate clearance a probe of the body mask ``margin + 0.75 × voxel extent`` above and
below each voxel along the vertebra's own cranio-caudal axis (so a depressed endplate is
followed). The core's median HU (``core_hu``) is what the diffuse rule and the other vertebrae
compare; its robust SD (1.4826 × MAD, at least 1 HU) the noise (``noise_hu``). A core under
:data:`MIN_CORE_ML` is not assessed (``lesions_not_assessed``: small thoracic bodies at 3 mm,
severe crushes).

**Diffuse lesions**, against the exam's other vertebrae (``reference``: the quartiles of the core
HU of the other thoracic and lumbar vertebrae assessed, at least :data:`MIN_REFERENCE_VERTEBRAE` of
them; a diffuse lesion must stand out from three quarters of them, so that other abnormal bodies
do not make a normal one look abnormal: five fractured bodies of eight with compacted cores of
340 HU made two 90 HU bodies "lytic" against their median):

* ``sclerotic``: the core's median at least :data:`DIFFUSE_SCLEROTIC_HU` *and* at least
  :data:`DIFFUSE_EXCESS_HU` above the third quartile, or at least :data:`CERTAIN_SCLEROTIC_HU`
  whatever the reference (or without one). Adults' L1 trabecular bone reads 226 ± 44 HU under
  30 years and falls 2.5 HU a year (Jang et al., Radiology 2019;291:360, 20 374 CTs, contrast
  changing it little), so 350 HU is 2.8 SDs above the densest age group; osteoblastic
  metastases read 654 ± 176 HU (Ulano et al. 2016). Contrast (10–30 HU) and the spine's own
  gradient (T4 to L5, about 65 HU on the phantoms) stay far below 150 HU.
* ``lytic``: the core's median at least :data:`DIFFUSE_DEFICIT_HU` below the first quartile *and* at
  most :data:`LYTIC_MAX_HU` (a body of soft-tissue density). Never without a reference: one
  vertebra alone cannot tell a lytic body from severe osteoporosis.

**Focal lesions**, against the body's own bone, in the core less its posterior fifth
(:data:`.trabecular_roi.POSTERIOR_EXCLUDED`: the basivertebral vein, low-density or, with
contrast, enhancing). The body's own bone is a peak of the histogram of its smoothed HU, the one
nearest to the other vertebrae's median (:func:`_bone_hu`): the median where the bone is uniform, and
still the bone where a large lesion fills much of a small core. The core's HU are smoothed at
each of :data:`SMOOTHING_MM` (Gaussian SDs; a normalised convolution within the region, so
nothing outside it leaks in): the fine scale keeps a 5 mm lesion's contrast at 1 mm voxels (99 %
at its centre; 90 % with 1 mm), the coarse one averages 3 mm voxels' noise. At each scale a voxel
seeds a lesion when its departure from the bone is at least :data:`DETECTION_SDS` times the
noise of its smoothed value: the kernel's own noise gain at that voxel times ``noise_hu``, or
times more where the smoothed HU spread more on the side away from the lesion looked for
(:func:`_noise_per_gain`; noise correlated between voxels, as a soft kernel makes it, and
texture average out less than white noise: with the white-noise gain alone, soft-kernel
0.7x0.7x3 mm spines at 30 HU got lytic false flags). White noise departs that far once in 10⁹
voxels. The voxel must also be

* ``sclerotic``: at least :data:`SCLEROTIC_MIN_HU` and :data:`SCLEROTIC_MIN_EXCESS_HU` above
  the bone: above young adults' trabecular bone (226 + 2 × 44 HU) and about where
  osteoblastic metastases begin (654 − 2 × 176 HU, Ulano et al. 2016), and far above noise and
  texture (the attenuation ROI calls 150 HU a focal outlier);
* ``lytic``: at least :data:`LYTIC_MIN_DROP_HU` below the bone *and* at most
  :data:`LYTIC_MAX_HU`: of soft-tissue density or below (lytic metastases and myeloma replace bone
  by tissue of 20–60 HU, haemangiomas and fat lower). In osteoporotic bone of 50–100 HU a
  soft-tissue lesion therefore stays unseen (the two are alike), and an osteoporotic body never
  looks lytic.

Each seed grows to its lesion: the connected voxels departing by at least half the seed's peak
departure (the lesion's half-contrast outline) at the scale that found it; the fine scale's
lesions are taken first, and a coarse one touching them is the same lesion. A lesion counts from
:data:`MIN_LESION_ML` (the half-contrast region of a 5 mm sphere at 1 mm voxels keeps
0.04–0.05 ml); ``lesion_volume_ml`` and ``lesion_hu`` (its voxels' mean HU, partial volume included)
are the largest lesion's, a diffuse lesion's the core's.

**Not seen**: lesions in the cortex, under the endplates, in the posterior fifth of the body or in
the posterior elements; lesions under about 5 mm (and 5–10 mm ones at 3 mm voxels); soft-tissue
lesions in osteoporotic bone; lesions of an instrumented vertebra; metal artefacts' streaks.
A bone island is a sclerotic lesion here (as the attenuation ROI leaves it out): the flag says the
reading is not osteoporosis's, not what the lesion is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import find_label_boxes, mask_box, voxel_extent_along, voxel_spacing, voxel_volume_ml
from .frames import local_coordinate
from .trabecular_roi import POSTERIOR_EXCLUDED, SURFACE_UNCERTAINTY, _body_limits, body_voxels

LESION_KINDS = ("sclerotic", "lytic")
HARDWARE_KINDS = ("cement", "screws")

METAL_HU = 3000.0
"""Metal (HU): within 71 HU of the 12-bit CT's ceiling, 3071 HU, where titanium and steel saturate."""
SCREW_MIN_ML = 0.1
"""Metal outside the body (ml) that makes ``screws``: a quarter of one 6 mm screw's pedicle part."""
CEMENT_HU = 1500.0
"""Bone cement (HU): above any trabecular bone and the mean of bone islands (1190 ± 239 HU)."""
CEMENT_MIN_ML = 0.5
"""Body volume (ml) at :data:`CEMENT_HU` or above that makes ``cement``."""
METAL_REACH_MM = 15.0
"""How far beyond the vertebra's label box (mm) unlabelled metal is looked for: a screw head
stands 10 mm proud of the bone and is 10 mm wide."""

WALL_MARGIN_MM = 2.0
"""Clearance (mm) of the core from the body's outer surface: the 1 mm cortex and 1 mm more."""
ENDPLATE_MARGIN_MM = 4.0
"""Clearance (mm) of the core from the endplates: the compacted trabeculae under a fractured one."""
MIN_CORE_ML = 0.5
"""A smaller core is not assessed (``lesions_not_assessed``)."""
MIN_REFERENCE_VERTEBRAE = 2
"""Other assessed vertebrae needed for the exam's reference HU (diffuse lesions)."""

DIFFUSE_SCLEROTIC_HU = 350.0
"""A core median at least this (HU), and :data:`DIFFUSE_EXCESS_HU` above the other vertebrae's
third quartile, is a diffuse sclerotic lesion: 2.8 SDs above young adults' L1 (226 ± 44 HU, Jang et al. 2019)."""
DIFFUSE_EXCESS_HU = 150.0
"""... above the exam's other vertebrae (HU): more than contrast and the spine's own gradient."""
CERTAIN_SCLEROTIC_HU = 500.0
"""A core median at least this (HU) is sclerotic whatever the other vertebrae read: 6 SDs above
young adults' L1 (a spine sclerotic throughout)."""
DIFFUSE_DEFICIT_HU = 100.0
"""A core median this far (HU) below the other vertebrae's first quartile, and at most
:data:`LYTIC_MAX_HU`, is a diffuse lytic lesion."""

SMOOTHING_MM = (0.7, 2.5)
"""Gaussian SDs (mm) of the two scales at which focal lesions are looked for."""
DETECTION_SDS = 6.0
"""A seed departs from the body's bone by at least this many SDs of its smoothed noise."""
SCLEROTIC_MIN_HU = 300.0
"""A sclerotic seed reads at least this (HU): above young adults' trabecular bone (226 + 2 × 44)
and about where osteoblastic metastases begin (654 − 2 × 176 HU, Ulano et al. 2016)."""
SCLEROTIC_MIN_EXCESS_HU = 150.0
"""... and at least this (HU) above the body's own bone (what the attenuation ROI calls a focal
outlier, :data:`.attenuation.FOCAL_LESION_MIN_HU`)."""
LYTIC_MIN_DROP_HU = 60.0
"""A lytic seed reads at least this (HU) below the body's own bone ..."""
LYTIC_MAX_HU = 100.0
"""... and at most this (HU): soft-tissue density or below."""
MIN_LESION_ML = 0.03
"""A focal lesion's half-contrast region must hold at least this (ml; a 3.9 mm sphere)."""


@dataclass(frozen=True)
class VertebraLesions:
    """What may make one vertebra's osteoporotic reading wrong (definitions in the module docstring).

    ``suspected_lesion``: ``"sclerotic"``, ``"lytic"`` or None, ``focal`` or ``diffuse``;
    ``lesion_volume_ml`` its volume (the half-contrast region of a focal lesion, the assessed core of
    a diffuse one), ``lesion_hu`` its mean HU (NaN without a lesion). ``instrumented``: ``"cement"``,
    ``"screws"`` or None; ``metal_voxels`` the vertebra's voxels at :data:`METAL_HU` or above (screw
    heads behind it included), ``cement_ml`` its body's volume at cement density below metal's.
    ``core_hu``, ``core_ml``, ``noise_hu``: median HU, volume and robust noise SD of the assessed
    core (NaN / 0 when not assessed). ``flags``: ``suspected_lesion``, ``instrumented``,
    ``lesions_not_assessed`` (no frame, core under :data:`MIN_CORE_ML`, or instrumented)."""

    level: str
    label: int
    suspected_lesion: str | None = None
    focal: bool = False
    diffuse: bool = False
    lesion_volume_ml: float = float("nan")
    lesion_hu: float = float("nan")
    instrumented: str | None = None
    metal_voxels: int = 0
    cement_ml: float = 0.0
    core_hu: float = float("nan")
    core_ml: float = 0.0
    noise_hu: float = float("nan")
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["flags"] = list(self.flags)
        return out


@dataclass
class _Examined:
    """One vertebra's hardware and core, before the exam's reference is known."""

    level: str
    label: int
    hardware: str | None = None
    metal_voxels: int = 0
    cement_ml: float = 0.0
    values: np.ndarray | None = None  # CT (float32) on the core's box
    core: np.ndarray | None = None
    focal: np.ndarray | None = None  # the core less its posterior fifth
    core_hu: float = float("nan")
    core_ml: float = 0.0
    noise_hu: float = float("nan")

    @property
    def assessed(self) -> bool:
        return self.hardware is None and self.core is not None and self.core_ml >= MIN_CORE_ML


def find_lesions(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    heights: Sequence,
    *,
    body_labels: np.ndarray | None = None,
    label_boxes: list | None = None,
    convention: str = "totalsegmentator",
) -> list[VertebraLesions]:
    """Lesions and hardware of every vertebra in ``heights`` (same order; definitions in the
    module docstring).

    ``ct``: HU ``[k, j, i]``; ``labels``: the vertebra label map the morphometry was measured on
    (ids of ``convention``); ``ijk_to_ras``: the grid (mm); ``heights``: the
    :class:`~.body.VertebraHeights` of every vertebra present (the others are the reference of
    diffuse lesions); ``body_labels``: optional ``vertebrae_body`` map; ``label_boxes``:
    ``geometry.find_label_boxes(labels)`` when the caller has it (one pass over the volume fewer)."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    max_label = max([*lv.vertebra_ids(convention).values(), *(int(h.label) for h in heights)])  # L6, T13 too
    if label_boxes is None or len(label_boxes) < max_label:
        label_boxes = find_label_boxes(labels, max_label)
    examined = [_examine(h, ct, labels, ijk_to_ras, body_labels, label_boxes) for h in heights]
    spacing_kji = voxel_spacing(ijk_to_ras)[::-1]
    voxel_ml = voxel_volume_ml(ijk_to_ras)
    return [_judge(e, _reference(examined, e), spacing_kji, voxel_ml) for e in examined]


def _examine(h, ct, labels, ijk_to_ras, body_labels, label_boxes) -> _Examined:
    """The vertebra's hardware and, when it has none, its core with the core's HU statistics."""
    label = int(h.label)
    result = _Examined(h.level, label)
    box = label_boxes[label - 1] if 0 < label <= len(label_boxes) else None
    if h.frame is None or box is None:
        return result

    body_mask = functools.partial(body_voxels, labels, label, body_labels)
    limits, _ = _body_limits(h, ijk_to_ras, labels.shape, body_mask)
    if limits is None:
        return result
    box_to_ras = _crop_to_ras(ijk_to_ras, box)
    if body_labels is not None:
        body = body_mask(box)
    else:
        body = (labels[box] == label) & (local_coordinate(h.frame, box_to_ras, labels[box].shape, 1) >= limits.v_post)
    ct_box = ct[box]
    result.hardware, result.metal_voxels, result.cement_ml = _hardware(
        ct, labels, body_labels, box, body, ct_box, label, h.frame, limits, ijk_to_ras)
    if result.hardware is not None or not body.any():
        return result
    core_box, core, focal = _core(body, box_to_ras, limits, h.frame, ijk_to_ras)
    values = ct_box[core_box].astype(np.float32)
    if core.any():
        inside = values[core]
        result.core_hu = float(np.median(inside))
        result.noise_hu = max(1.0, 1.4826 * float(np.median(np.abs(inside - result.core_hu))))
        result.core_ml = float(inside.size) * voxel_volume_ml(ijk_to_ras)
        result.values, result.core, result.focal = values, core, focal
    return result


def _crop_to_ras(ijk_to_ras: np.ndarray, slices) -> np.ndarray:
    """IJK→RAS of a crop (``slices`` along ``k, j, i``) of a grid."""
    out = np.array(ijk_to_ras, dtype=float)
    out[:3, 3] += out[:3, :3] @ np.array([slices[2].start, slices[1].start, slices[0].start], dtype=float)
    return out


def _hardware(ct, labels, body_labels, box, body, ct_box, label, frame, limits,
              ijk_to_ras) -> tuple[str | None, int, float]:
    """``(kind, metal voxels, cement ml)`` of one vertebra (rules in the module docstring).
    ``box``: its label box, ``body`` and ``ct_box`` its body and the CT there. When the box holds
    metal (a screw's shaft is labelled as its vertebra), it is looked for in the box grown by
    :data:`METAL_REACH_MM` (the heads) and placed in the vertebra's frame."""
    voxel_ml = voxel_volume_ml(ijk_to_ras)
    metal_box = ct_box >= METAL_HU
    dense = body & (ct_box >= CEMENT_HU)
    dense_count = int(np.count_nonzero(dense))
    metal_in_body = int(np.count_nonzero(dense & metal_box))
    metal_count, outside_ml = 0, 0.0
    if metal_box.any():  # a screw's shaft lies in the label box; only then are its head's voxels looked for
        grow = np.ceil(METAL_REACH_MM / voxel_spacing(ijk_to_ras)).astype(np.intp)[::-1]  # (k, j, i)
        crop = tuple(slice(max(0, s.start - g), min(n, s.stop + g)) for s, g, n in zip(box, grow, labels.shape))
        index = np.nonzero(ct[crop] >= METAL_HU)
        crop_to_ras = _crop_to_ras(ijk_to_ras, crop)
        ijk = np.stack(index[::-1], axis=1).astype(float)
        local = frame.to_local(ijk @ crop_to_ras[:3, :3].T + crop_to_ras[:3, 3])
        owner = labels[crop][index]
        in_body = (owner == label) & (body_labels[crop][index] == lv.BODY_LABEL if body_labels is not None
                                      else local[:, 1] >= limits.v_post)
        stray = ((owner == 0) & (local[:, 1] < limits.v_post) & (local[:, 2] >= limits.bottom_knots.min())
                 & (local[:, 2] <= limits.top_knots.max()))  # unlabelled, behind the body, at its height
        mine = (owner == label) | stray
        metal_count = int(np.count_nonzero(mine))
        outside_ml = np.count_nonzero(mine & ~in_body) * voxel_ml
    kind = None
    if outside_ml >= SCREW_MIN_ML:
        kind = "screws"
    elif dense_count * voxel_ml >= CEMENT_MIN_ML:
        kind = "cement" if metal_in_body <= 0.5 * dense_count else "screws"
    elif metal_in_body * voxel_ml >= SCREW_MIN_ML:
        kind = "screws"
    return kind, metal_count, float((dense_count - metal_in_body) * voxel_ml)


def _core(body, box_to_ras, limits, frame, ijk_to_ras) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """The body's core on the body's box (slices of ``body``'s array, whose IJK→RAS is
    ``box_to_ras``): ``(box, core, focal)``, ``focal`` the core less the body's posterior fifth
    (clearances in the module docstring)."""
    box = mask_box(body)
    inside = body[box]
    spacing_kji = voxel_spacing(ijk_to_ras)[::-1]
    radii = WALL_MARGIN_MM + (1.0 + 0.5 * SURFACE_UNCERTAINTY) * spacing_kji
    # Ellipsoid erosion: no voxel centre outside the body within the semi-axes ``radii``.
    scaled = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing_kji / radii)[1:-1, 1:-1, 1:-1]
    core = scaled >= 1.0
    if core.any():
        clear = ENDPLATE_MARGIN_MM + (0.5 + 0.5 * SURFACE_UNCERTAINTY) * voxel_extent_along(frame.cc, ijk_to_ras)
        step_kji = (np.linalg.solve(ijk_to_ras[:3, :3], frame.cc) * clear)[::-1]
        index = np.nonzero(core)
        points = np.stack(index).astype(float)
        occupancy = inside.astype(np.float32)
        keep = np.ones(len(index[0]), dtype=bool)
        for sign in (1.0, -1.0):
            probe = ndimage.map_coordinates(occupancy, points + sign * step_kji[:, None], order=1, mode="constant",
                                            cval=0.0, prefilter=False)
            keep &= probe >= 0.5
        core[tuple(axis[~keep] for axis in index)] = False
    v = local_coordinate(frame, _crop_to_ras(box_to_ras, box), inside.shape, 1)
    posterior = limits.v_post + POSTERIOR_EXCLUDED * (limits.v_ant - limits.v_post)
    return box, core, core & (v >= posterior)


def _reference(examined: list[_Examined], this: _Examined) -> tuple[float, float, float] | None:
    """The exam's reference HU for ``this`` vertebra: the first quartile, median and third quartile
    of the core HU of the other assessed thoracic and lumbar vertebrae; None with fewer than
    :data:`MIN_REFERENCE_VERTEBRAE`."""
    others = [e.core_hu for e in examined if e is not this and e.assessed and e.level[0] in "TL"]
    if len(others) < MIN_REFERENCE_VERTEBRAE:
        return None
    return tuple(float(q) for q in np.percentile(others, [25, 50, 75]))


def _judge(e: _Examined, reference: tuple[float, float, float] | None, spacing_kji: np.ndarray,
           voxel_ml: float) -> VertebraLesions:
    """The vertebra's result from its examination and the exam's reference HU."""
    common = dict(level=e.level, label=e.label, instrumented=e.hardware, metal_voxels=e.metal_voxels,
                  cement_ml=e.cement_ml, core_hu=e.core_hu, core_ml=e.core_ml, noise_hu=e.noise_hu)
    if e.hardware is not None:
        return VertebraLesions(**common, flags=("instrumented", "lesions_not_assessed"))
    if not e.assessed:
        return VertebraLesions(**common, flags=("lesions_not_assessed",))
    kind = _diffuse(e.core_hu, reference)
    if kind is not None:
        return VertebraLesions(**common, suspected_lesion=kind, diffuse=True, lesion_volume_ml=e.core_ml,
                               lesion_hu=e.core_hu, flags=("suspected_lesion",))
    found = _focal_lesion(e.values, e.focal, e.noise_hu, None if reference is None else reference[1], spacing_kji,
                          voxel_ml)
    if found is None:
        return VertebraLesions(**common)
    kind, volume, hu = found
    return VertebraLesions(**common, suspected_lesion=kind, focal=True, lesion_volume_ml=volume, lesion_hu=hu,
                           flags=("suspected_lesion",))


def _diffuse(core_hu: float, reference: tuple[float, float, float] | None) -> str | None:
    """``"sclerotic"``, ``"lytic"`` or None: a diffuse lesion by the core's median HU against the
    other vertebrae's quartiles (:func:`_reference`): above the third, below the first."""
    if core_hu >= CERTAIN_SCLEROTIC_HU or (
            core_hu >= DIFFUSE_SCLEROTIC_HU and (reference is None or core_hu >= reference[2] + DIFFUSE_EXCESS_HU)):
        return "sclerotic"
    if reference is not None and core_hu <= min(reference[0] - DIFFUSE_DEFICIT_HU, LYTIC_MAX_HU):
        return "lytic"
    return None


def _focal_lesion(values, focal, noise_hu, reference, spacing_kji, voxel_ml) -> tuple[str, float, float] | None:
    """``(kind, volume ml, mean HU)`` of the largest focal lesion in ``focal`` (a mask on the box of
    ``values``, the CT), None without one (rules in the module docstring)."""
    box = mask_box(focal)
    if box is None:
        return None
    values, focal = values[box], focal[box]  # exact: voxels outside ``focal`` weigh nothing
    scales = [_smooth(values, focal, scale / spacing_kji) for scale in SMOOTHING_MM]
    bone = _bone_hu(scales[-1][0], noise_hu * scales[-1][1], focal, reference)
    taken = np.zeros_like(focal)
    best = None
    for smooth, gain in scales:
        for kind, sign in (("sclerotic", 1.0), ("lytic", -1.0)):
            contrast = sign * (smooth - bone)
            if kind == "sclerotic":
                beyond = smooth >= max(SCLEROTIC_MIN_HU, bone + SCLEROTIC_MIN_EXCESS_HU)
            else:
                beyond = smooth <= min(LYTIC_MAX_HU, bone - LYTIC_MIN_DROP_HU)
            noise = gain * _noise_per_gain(contrast, gain, focal, noise_hu)
            seeds = focal & beyond & (contrast >= DETECTION_SDS * noise)
            if not seeds.any():
                continue
            for region in _grown(seeds, contrast, focal, taken):
                taken |= region
                volume = float(np.count_nonzero(region)) * voxel_ml
                if volume >= MIN_LESION_ML and (best is None or volume > best[1]):
                    best = (kind, volume, float(values[region].mean()))
    return best


def _noise_per_gain(contrast, gain, focal, noise_hu: float) -> float:
    """The noise SD (HU) that, times a voxel's kernel gain, is the SD of its smoothed value: the
    white noise's ``noise_hu``, or more where the smoothed HU spread more about the bone (noise
    correlated between neighbouring voxels, as a soft kernel makes it, and texture average out
    less than white noise). The spread is read on the side away from the lesion looked for (the
    voxels whose ``contrast``, the departure towards the lesion, is negative: their median
    distance is 0.6745 SDs), over the median gain: a lesion, however large, and the blur around
    it lie on the other side."""
    away = -contrast[focal & (contrast < 0)]
    if away.size < 10:
        return noise_hu
    spread = float(np.median(away)) / 0.6745
    return max(noise_hu, spread / max(float(np.median(gain[focal])), 1e-6))


def _bone_hu(smooth, noise, focal, reference: float | None) -> float:
    """The body's own bone (HU) from the coarse-smoothed HU in ``focal``: a peak of their histogram
    (1 HU bins, smoothed by the smoothed noise's SD ``noise``, at least 2 HU), of the peaks at least a tenth
    as high as the highest the one nearest to the exam's ``reference`` (the highest without one).
    Where the bone is uniform that is its median; where a lesion fills much of a small core it is
    still the bone's (the median moves towards the lesion, and the highest peak may be the
    lesion's: a 40 HU lesion of 18 mm filled most of a T10 core of 110 HU bone)."""
    inside = smooth[focal]
    lo, hi = np.floor(inside.min()), np.ceil(inside.max()) + 1.0
    counts, edges = np.histogram(inside, bins=np.arange(lo, hi + 1.0))
    width = max(2.0, float(np.median(noise[focal])))
    density = ndimage.gaussian_filter1d(counts.astype(float), width, mode="constant")
    padded = np.pad(density, 1)
    peaks = np.flatnonzero((density >= padded[:-2]) & (density > padded[2:]) & (density >= 0.1 * density.max()))
    centres = 0.5 * (edges[peaks] + edges[peaks + 1])
    if reference is None:
        return float(centres[np.argmax(density[peaks])])
    return float(centres[np.argmin(np.abs(centres - reference))])


def _grown(seeds, contrast, region, taken):
    """Each seed component not touching ``taken`` grown to the connected voxels of ``region`` whose
    ``contrast`` is at least half the component's peak (a generator of masks)."""
    parts, count = ndimage.label(seeds, structure=np.ones((3, 3, 3)))
    for index in range(1, count + 1):
        component = parts == index
        if (component & taken).any():
            continue
        peak = np.unravel_index(np.argmax(np.where(component, contrast, -np.inf)), contrast.shape)
        above, _ = ndimage.label(region & (contrast >= 0.5 * contrast[peak]), structure=np.ones((3, 3, 3)))
        yield above == above[peak]


def _smooth(values: np.ndarray, mask: np.ndarray, sigma_voxels) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian normalised convolution of ``values`` within ``mask`` (SDs in voxels per axis) and
    each voxel's noise gain: the SD of its smoothed value per unit SD of white noise in the
    voxels, ``sqrt(Σ w²) / Σ w`` over the kernel's weights inside the mask. NaN outside reach."""
    kernels = [_gaussian(s) for s in sigma_voxels]
    weight = mask.astype(np.float32)
    total = _separable(weight, kernels)
    squares = _separable(weight, [k * k for k in kernels])
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = _separable(np.where(mask, values, 0.0).astype(np.float32), kernels) / total
        gain = np.sqrt(squares) / total
    return smooth, gain


def _gaussian(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian weights of SD ``sigma`` (voxels), out to 3 SDs (at least one voxel)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _separable(array: np.ndarray, kernels) -> np.ndarray:
    """``array`` correlated with one 1-D kernel per axis, zero outside."""
    out = array
    for axis, kernel in enumerate(kernels):
        out = ndimage.correlate1d(out, kernel, axis=axis, mode="constant", cval=0.0)
    return out
