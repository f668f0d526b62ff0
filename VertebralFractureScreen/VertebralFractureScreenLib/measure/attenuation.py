"""Bone attenuation: trabecular ROI per vertebral body, the exam's bone summary, contrast (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, a vertebra label map
(``totalsegmentator`` or ``verse`` ids), optionally the ``vertebrae_body`` map (1 = bodies), the
grid's 4x4 IJK→RAS matrix (mm), and the morphometry of the vertebrae
(:func:`.morphometry.measure_heights`), whose frames and endplate points place the ROI. Every
limit is a distance in millimetres in the vertebra's own frame, so the ROI does not depend on how
the anatomy lies on the voxel grid.

**Trabecular ROI** (:func:`measure_trabecular`). In the vertebra's frame (``u`` left-right,
``v`` antero-posterior, positive anterior, ``w`` cranio-caudal; mm) the body's anterior and
posterior walls ``v_ant``, ``v_post`` and its superior and inferior endplates ``top(v)``,
``bottom(v)`` come from the morphometry's height lines (Ha, Hm, Hp at 15/50/85 % of the depth;
the endplates are piecewise linear in ``v`` through those three points, extended linearly to the
walls). A voxel belongs to the ROI when it lies in the body mask and

* its centre is in the central half of the body height: ``bottom + H/4 <= w <= top - H/4`` with
  ``H = top(v) - bottom(v)``;
* it is at least ``margin_mm`` (3 mm) from the endplates, the anterior wall and the body's outline
  (lateral walls); the posterior fifth of the depth is excluded (basivertebral vein).

"At least 3 mm" holds for the whole voxel, not its centre, and allows for where the surface really
is: each clearance is ``margin_mm`` plus half the voxel's footprint along the surface normal (its
own extent) plus :data:`SURFACE_UNCERTAINTY` of that again (where a surface found on that grid may
really lie). With 3 mm slices the ROI keeps ``3 + 1.5 + 0.75`` mm from the endplates; it shrinks
rather than reaching the cortex, and ``roi_small`` says when fewer than :data:`ROI_MIN_VOXELS`
voxels or :data:`ROI_MIN_ML` ml remain (small thoracic bodies at 3 mm). The endplates are also
checked on the mask: the body must still be there ``clearance`` above and below each ROI voxel (a
depressed endplate can dip between the three measured points). The lateral outline is
the body's cross-section over the central half of its height (the mask's interpolated occupancy,
on a 0.5 mm grid in the ``u, v`` plane, each column sampled between its own endplates); its
distance map gives the lateral clearance, so kidney-shaped, wedged and small thoracic bodies are
handled alike.

Focal lesions inside the ROI are left out, as a reader placing the ROI by hand would avoid them
(Pickhardt et al. 2013): voxels departing from the ROI's median by more than
:data:`FOCAL_LESION_SDS` robust standard deviations (1.4826 × the median absolute deviation), and
at least :data:`FOCAL_LESION_MIN_HU`, with the face-neighbouring ROI voxels around them (the
lesion's partial-volume rim). A bone island (compact bone, hundreds of HU) or a haemangioma's fat
would otherwise move the mean: in TotalSegmentator's example CT a 13-voxel bone island (300–770
HU at 3 mm) raised L1's mean from 96 to 123 HU, across the 110 HU category threshold. Diffuse
changes (the osteoporotic fall itself, texture, noise: 5 robust SDs of Gaussian noise occur once
in a few million voxels) are not outliers of the ROI's own distribution and stay. The ROI is then
flagged ``focal_lesion_excluded``.

**Bone summary** (:func:`bone_summary`). Opportunistic category from L1 (Pickhardt et al., Ann
Intern Med 2013;158:588): ``<= 110`` HU ``osteoporosis-likely``, ``110 < HU <= 160``
``low-bone-density-possible``, ``> 160`` HU ``normal``. When L1 is missing, incomplete, fractured
or its ROI too small, the nearest complete non-fractured lumbar vertebra is used and a warning
says so. The lumbar mean is the mean of the per-level ROI means of the complete, non-fractured
L1–L5 vertebrae (each level counts once, whatever its ROI size). Each ROI mean carries its
standard error (``mean_hu_se``, the ROI's SD over the square root of its voxels); when the L1 HU
lies within :data:`CATEGORY_UNCERTAIN_SES` standard errors of a category threshold, the summary is
``category_uncertain`` with a warning. It matters at thick slices: on the attenuation benchmark's
3 mm spines (ROIs of 38–300 voxels) the standard errors at 20 HU noise are 1–3 HU.

**Contrast** (:func:`measure_contrast`). Mean HU of the aorta's central lumen (TotalSegmentator
id 52): voxels whose centre is at least :data:`AORTA_CORE_MM` plus one voxel spacing from the
mask's outline, so partial volume with the wall and the surrounding fat does not bias it;
``contrast_enhanced`` when above 150 HU. HU metrics are reported as measured with the flag beside
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import distance_transform_edt, find_label_boxes, ras_to_ijk_points, voxel_extent_along, voxel_spacing, voxel_volume_ml

ROI_MARGIN_MM = 3.0
"""Minimum distance (mm) of the ROI from the cortical surface and the endplates (SPEC §4)."""

POSTERIOR_EXCLUDED = 0.2
"""Fraction of the body depth excluded at the posterior wall (basivertebral vein)."""

ROI_MIN_VOXELS = 30
ROI_MIN_ML = 0.3
"""Below either, the ROI is flagged ``roi_small`` and not used for the exam's bone summary."""

SURFACE_UNCERTAINTY = 0.5
"""How far a surface found on the grid (the morphometry's endplates and walls, the mask's
outline) may lie from the true one, as a fraction of half the voxel's footprint along its normal;
the clearances allow for it on top of the voxel's own half-footprint. On the phantom suite (1 mm
to 3 mm voxels, rotated, fractured) every ROI voxel stayed at least 3.3 mm from the true surface
with 0.5; with 0 some came within 2.7 mm."""

OUTLINE_STEP_MM = 0.5
"""Grid step (mm) of the body's cross-section used for the lateral clearance."""

CATEGORY_THRESHOLDS_HU = (110.0, 160.0)
"""Pickhardt et al. 2013: L1 trabecular HU ``<= 110`` osteoporosis likely, ``> 160`` normal."""

CATEGORIES = ("osteoporosis-likely", "low-bone-density-possible", "normal")

CATEGORY_UNCERTAIN_SES = 2.0
"""The opportunistic category is ``category_uncertain`` when the L1 HU lowered and raised by this
many standard errors of its ROI mean falls in different categories (as the grading's
``grade_uncertain`` moves the height losses by two SDs). A 3 mm ROI of a hundred voxels at 20 HU
noise has a standard error of 2 HU: its category is open within 4 HU of 110 or 160 HU."""

FOCAL_LESION_SDS = 5.0
"""ROI voxels further than this many robust standard deviations from the ROI's median HU are a
focal lesion's and left out (with their face neighbours in the ROI)."""

FOCAL_LESION_MIN_HU = 150.0
"""... and further than this (HU): in bone of uniform density (a noise-free phantom, a smooth
reconstruction) the robust SD is near 0, and a departure of a few HU is no lesion. 150 HU is
less than a bone island's excess over trabecular bone and a haemangioma's deficit."""

AORTA_CORE_MM = 2.0
"""The aorta's central region keeps voxels at least this far (plus one voxel spacing) inside."""

CONTRAST_THRESHOLD_HU = 150.0
"""Aorta mean HU above which the exam is ``contrast_enhanced`` (SPEC §4)."""

_AORTA_MIN_CORE_VOXELS = 10


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class TrabecularROI:
    """Trabecular ROI of one vertebral body. HU statistics of the CT inside the ROI (NaN when the
    ROI is empty); ``voxels`` its voxel count and ``volume_ml`` its volume; ``centre_ras`` its
    centroid (RAS mm, None when empty).

    ``complete`` copies the morphometry (a vertebra cut by the field of view or implausible is
    measured but not complete); ``fractured`` is True for Genant grade >= 1, False for grade 0,
    None when no grade was given or the vertebra was not graded.

    ``flags``: ``fractured``, ``incomplete_vertebra``, ``not_measured`` (no morphometry frame:
    no ROI), ``roi_limits_from_mask`` (no height lines: walls and endplates from the mask's
    extent), ``roi_small`` (fewer than :data:`ROI_MIN_VOXELS` voxels or :data:`ROI_MIN_ML` ml),
    ``roi_empty``, ``focal_lesion_excluded`` (voxels of a focal lesion left out; the statistics,
    ``voxels`` and ``volume_ml`` are those of the rest).

    ``mean_hu_se``: standard error of ``mean_hu`` (HU), ``sd_hu / sqrt(voxels)`` (NaN below two
    voxels): how far another placement of the ROI in the same bone, or another noise draw, would
    move the mean. It treats the voxels as independent; a reconstruction kernel that correlates
    neighbouring voxels' noise makes the true error larger, so it is a lower bound."""

    level: str
    label: int
    mean_hu: float = float("nan")
    median_hu: float = float("nan")
    sd_hu: float = float("nan")
    mean_hu_se: float = float("nan")
    voxels: int = 0
    volume_ml: float = 0.0
    complete: bool = False
    fractured: bool | None = None
    centre_ras: tuple[float, float, float] | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Whether this ROI may stand for its level in the exam's bone summary: complete vertebra,
        not fractured, ROI not small."""
        return (self.complete and self.fractured is not True and self.voxels >= ROI_MIN_VOXELS
                and "roi_small" not in self.flags)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BoneSummary:
    """Bone attenuation of one exam (SPEC §4, §5 ``exam.json``).

    ``l1_hu``: trabecular HU of the level used for the opportunistic category, ``l1_level`` that
    level (``"L1"`` unless L1 could not be used), ``category`` one of :data:`CATEGORIES` (None
    without a usable lumbar vertebra); ``lumbar_mean_hu`` the mean over ``lumbar_levels`` (the
    complete, non-fractured L1–L5 with a usable ROI), ``excluded_lumbar`` level → reason for the
    lumbar levels left out; ``per_level_hu`` the ROI mean of every measured vertebra, as measured
    (flagged ones included); ``contrast_enhanced`` copied from the contrast result when given.
    ``l1_hu_se`` the standard error of ``l1_hu`` (:attr:`TrabecularROI.mean_hu_se`);
    ``category_uncertain`` True when ``l1_hu`` lowered and raised by :data:`CATEGORY_UNCERTAIN_SES`
    standard errors falls in different categories (the ROI's noise leaves the category open; a
    warning says so), False when it does not, None without a category."""

    l1_hu: float | None = None
    l1_hu_se: float | None = None
    l1_level: str | None = None
    category: str | None = None
    category_uncertain: bool | None = None
    lumbar_mean_hu: float | None = None
    lumbar_levels: list[str] = field(default_factory=list)
    excluded_lumbar: dict[str, str] = field(default_factory=dict)
    per_level_hu: dict[str, float] = field(default_factory=dict)
    contrast_enhanced: bool | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ContrastResult:
    """Contrast phase of one exam: ``aorta_hu`` mean HU of the aorta's central lumen (None without
    an aorta label), ``aorta_voxels`` voxels averaged, ``contrast_enhanced`` ``aorta_hu > 150``
    (None when unknown), ``warnings``."""

    aorta_hu: float | None = None
    aorta_voxels: int = 0
    contrast_enhanced: bool | None = None
    threshold_hu: float = CONTRAST_THRESHOLD_HU
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Geometry helpers
# ------------------------------------------------------------------------------------------------


def _crop_around(ras_points: np.ndarray, ijk_to_ras: np.ndarray, shape_kji, pad: int = 1):
    """Slices ``(k, j, i)`` of the voxels whose centres can lie in the box spanned by
    ``ras_points`` (plus ``pad`` voxels), clipped to the grid, and the crop's IJK→RAS; None when
    the box misses the grid."""
    ijk = ras_to_ijk_points(ijk_to_ras, ras_points)
    size = np.array(shape_kji[::-1])
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - pad, 0, size)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + pad + 1, 0, size)
    if np.any(hi <= lo):
        return None, None
    crop_to_ras = np.asarray(ijk_to_ras, dtype=float).copy()
    crop_to_ras[:3, 3] += crop_to_ras[:3, :3] @ lo
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), crop_to_ras


def _axis_coordinate(row: np.ndarray, origin: np.ndarray, crop_to_ras: np.ndarray, shape_kji) -> np.ndarray:
    """``row · (x - origin)`` (mm, float32) at every voxel centre ``x`` of a crop, ``(k, j, i)``."""
    steps = (row @ crop_to_ras[:3, :3]).astype(np.float32)
    nk, nj, ni = shape_kji
    offset = np.float32(row @ (crop_to_ras[:3, 3] - origin))
    return ((np.arange(ni, dtype=np.float32) * steps[0])[None, None, :]
            + (np.arange(nj, dtype=np.float32) * steps[1])[None, :, None]
            + (np.arange(nk, dtype=np.float32) * steps[2] + offset)[:, None, None])


def _linear_through(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear function through knots ``(xs, ys)`` (``xs`` increasing), continued
    linearly beyond the first and last knots."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xs, ys)
    left, right = x < xs[0], x > xs[-1]
    if left.any():
        y[left] = ys[0] + (x[left] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if right.any():
        y[right] = ys[-1] + (x[right] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return y


@dataclass
class _BodyLimits:
    """Walls and endplates of a body in its frame (mm): ``v_ant``, ``v_post``, the lateral
    centre ``u_mid`` and ``width``, and the endplates as knots ``(v_knots, top_knots,
    bottom_knots)`` with ``v_knots`` increasing."""

    u_mid: float
    width: float
    v_ant: float
    v_post: float
    v_knots: np.ndarray
    top_knots: np.ndarray
    bottom_knots: np.ndarray

    def top(self, v):
        return _linear_through(v, self.v_knots, self.top_knots)

    def bottom(self, v):
        return _linear_through(v, self.v_knots, self.bottom_knots)


def _limits_from_lines(heights) -> _BodyLimits | None:
    """Body limits from the morphometry's height lines (all of Ha, Hm, Hp needed)."""
    lines = heights.height_lines_ras or {}
    if not all(key in lines for key in ("ha", "hm", "hp")):
        return None
    frame = heights.frame
    top = {key: frame.to_local(np.asarray(lines[key][0], dtype=float)[None])[0] for key in ("ha", "hm", "hp")}
    bottom = {key: frame.to_local(np.asarray(lines[key][1], dtype=float)[None])[0] for key in ("ha", "hm", "hp")}
    v_ha, v_hm, v_hp = top["ha"][1], top["hm"][1], top["hp"][1]
    if not (np.isfinite([v_ha, v_hm, v_hp]).all() and v_hp < v_hm < v_ha):
        return None
    depth = (v_ha - v_hp) / 0.70
    width = heights.width_mm if np.isfinite(heights.width_mm) and heights.width_mm > 0 else depth * 1.4
    order = ("hp", "hm", "ha")
    return _BodyLimits(
        u_mid=float(top["hm"][0]), width=float(width), v_ant=float(v_ha + 0.15 * depth),
        v_post=float(v_hp - 0.15 * depth), v_knots=np.array([top[k][1] for k in order]),
        top_knots=np.array([top[k][2] for k in order]), bottom_knots=np.array([bottom[k][2] for k in order]))


def _limits_from_mask(frame, mask: np.ndarray, crop_to_ras: np.ndarray) -> _BodyLimits | None:
    """Body limits from the mask alone (robust percentiles of its voxels' local coordinates)."""
    if mask.sum() < 20:
        return None
    index = np.nonzero(mask)
    ijk = np.stack([index[2], index[1], index[0]], axis=1).astype(float)
    local = frame.to_local(ijk @ crop_to_ras[:3, :3].T + crop_to_ras[:3, 3])
    u_lo, u_hi = np.percentile(local[:, 0], [1, 99])
    v_lo, v_hi = np.percentile(local[:, 1], [1, 99])
    central = np.abs(local[:, 0] - 0.5 * (u_lo + u_hi)) <= 0.15 * (u_hi - u_lo)
    w = local[central, 2] if central.sum() >= 10 else local[:, 2]
    w_lo, w_hi = np.percentile(w, [1, 99])
    depth = v_hi - v_lo
    knots = v_hi - np.array([0.85, 0.50, 0.15]) * depth
    return _BodyLimits(float(0.5 * (u_lo + u_hi)), float(u_hi - u_lo), float(v_hi), float(v_lo), knots,
                       np.full(3, w_hi), np.full(3, w_lo))


def _in_plane_half_footprint(frame, ijk_to_ras: np.ndarray) -> float:
    """Largest half-footprint (mm) of a voxel along any direction in the frame's ``u, v`` plane."""
    angles = np.linspace(0.0, np.pi, 37)
    directions = np.cos(angles)[:, None] * frame.lr[None, :] + np.sin(angles)[:, None] * frame.ap[None, :]
    edges = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    return 0.5 * float(np.abs(directions @ edges).sum(axis=1).max())


# ------------------------------------------------------------------------------------------------
# Trabecular ROI
# ------------------------------------------------------------------------------------------------


def _grade_lookup(grades) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for grade in grades or ():
        level = grade["level"] if isinstance(grade, Mapping) else grade.level
        value = grade["genant_grade"] if isinstance(grade, Mapping) else grade.genant_grade
        out[str(level).upper()] = None if value is None else bool(value >= 1)
    return out


def trabecular_roi_mask(
    heights,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    label: int | None = None,
    body_labels: np.ndarray | None = None,
    margin_mm: float = ROI_MARGIN_MM,
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None, list[str]]:
    """The trabecular ROI of one vertebra as a boolean mask on a crop of the grid.

    ``heights``: the vertebra's :class:`~.morphometry.VertebraHeights` (its frame and height lines
    place the ROI); ``labels``: vertebra label map; ``label``: its id (default ``heights.label``);
    ``body_labels``: optional ``vertebrae_body`` map. Returns ``(slices, mask, flags)`` where
    ``mask`` has the shape of ``labels[slices]``; ``(None, None, flags)`` when there is no ROI.
    Definition in the module docstring."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    label = heights.label if label is None else label
    flags: list[str] = []
    frame = heights.frame
    if frame is None:
        return None, None, ["not_measured"]
    shape = labels.shape
    spacing = voxel_spacing(ijk_to_ras)

    def body_mask(slices):
        mask = labels[slices] == label
        if body_labels is not None:
            mask &= body_labels[slices] == lv.BODY_LABEL
        return mask

    limits = _limits_from_lines(heights)
    if limits is None:
        reach = 45.0
        corners = frame.to_ras(np.array([[a, b, c] for a in (-reach, reach) for b in (-reach, reach)
                                         for c in (-reach, reach)]))
        slices, crop_to_ras = _crop_around(corners, ijk_to_ras, shape)
        limits = None if slices is None else _limits_from_mask(frame, body_mask(slices), crop_to_ras)
        if limits is None:
            return None, None, ["roi_empty"]
        flags.append("roi_limits_from_mask")

    # Clearances (mm): the margin plus half the voxel's footprint along the surface normal (its own
    # extent) plus SURFACE_UNCERTAINTY of that (where a surface found on this grid may really be).
    allowance = 0.5 + 0.5 * SURFACE_UNCERTAINTY
    clear_w = margin_mm + allowance * voxel_extent_along(frame.cc, ijk_to_ras)
    clear_v = margin_mm + allowance * voxel_extent_along(frame.ap, ijk_to_ras)
    clear_uv = margin_mm + 2.0 * allowance * _in_plane_half_footprint(frame, ijk_to_ras)
    depth = limits.v_ant - limits.v_post
    v_lo = limits.v_post + max(POSTERIOR_EXCLUDED * depth, clear_v)
    v_hi = limits.v_ant - clear_v
    if not v_hi > v_lo:
        return None, None, flags + ["roi_empty"]
    v_samples = np.linspace(v_lo, v_hi, 25)
    top, bottom = limits.top(v_samples), limits.bottom(v_samples)
    quarter = 0.25 * (top - bottom)
    w_hi_all = top - np.maximum(quarter, clear_w)
    w_lo_all = bottom + np.maximum(quarter, clear_w)
    if not np.any(w_hi_all >= w_lo_all):
        return None, None, flags + ["roi_empty"]
    w_lo, w_hi = float(w_lo_all.min()), float(w_hi_all.max())

    # One crop holds the body's cross-section over the ROI's heights, with room for its outline.
    pad = 2.0 + float(spacing.max())
    half_width = 0.5 * limits.width + pad
    s_w = voxel_extent_along(frame.cc, ijk_to_ras)
    v_samples = np.linspace(limits.v_post - pad, limits.v_ant + pad, 25)
    tops, bottoms = limits.top(v_samples), limits.bottom(v_samples)
    centre_band = (0.25 * tops + 0.75 * bottoms, 0.75 * tops + 0.25 * bottoms)
    w_a = min(w_lo - clear_w, float(centre_band[0].min())) - s_w
    w_b = max(w_hi + clear_w, float(centre_band[1].max())) + s_w
    u_a, u_b = limits.u_mid - half_width, limits.u_mid + half_width
    v_a, v_b = limits.v_post - pad, limits.v_ant + pad
    corners = frame.to_ras(np.array([[u, v, w] for u in (u_a, u_b) for v in (v_a, v_b) for w in (w_a, w_b)]))
    slices, crop_to_ras = _crop_around(corners, ijk_to_ras, shape)
    if slices is None:
        return None, None, flags + ["roi_empty"]
    mask = body_mask(slices)
    if not mask.any():
        return None, None, flags + ["roi_empty"]

    # Lateral clearance: distance map of the body's cross-section, on a fine grid in the u, v plane.
    # A column counts as inside when the body is there over the whole central half of its height
    # (which follows a wedged or depressed endplate), so the endplates do not pass for walls.
    step = OUTLINE_STEP_MM
    us = np.arange(u_a, u_b + 0.5 * step, step)
    vs = np.arange(v_a, v_b + 0.5 * step, step)
    uu, vv = np.meshgrid(us, vs, indexing="ij")
    mid = 0.5 * (limits.top(vv.ravel()) + limits.bottom(vv.ravel()))
    quarter_uv = 0.25 * (limits.top(vv.ravel()) - limits.bottom(vv.ravel()))
    n_w = max(3, int(np.ceil(2.0 * float(np.max(quarter_uv)) / max(1.0, 0.5 * s_w))) + 1)
    plane = np.stack([uu.ravel(), vv.ravel(), np.zeros(uu.size)], axis=1)
    ras_to_crop = np.linalg.inv(crop_to_ras)
    mask_f = mask.astype(np.float32)
    section = None
    for t in np.linspace(-1.0, 1.0, n_w):
        plane[:, 2] = mid + t * quarter_uv
        ijk = frame.to_ras(plane) @ ras_to_crop[:3, :3].T + ras_to_crop[:3, 3]
        occupancy = ndimage.map_coordinates(mask_f, ijk[:, ::-1].T, order=1, mode="constant", cval=0.0,
                                            prefilter=False)
        inside = occupancy.reshape(uu.shape) >= 0.5
        section = inside if section is None else section & inside
    parts, count = ndimage.label(section)
    if count == 0:
        return None, None, flags + ["roi_empty"]
    centre_index = (int(round((limits.u_mid - u_a) / step)), int(round((0.5 * (v_lo + v_hi) - v_a) / step)))
    keep = parts[centre_index]
    if keep == 0:
        keep = int(np.argmax(ndimage.sum_labels(section, parts, np.arange(1, count + 1)))) + 1
    section = np.pad(parts == keep, 1)
    outline_distance = ndimage.distance_transform_edt(section, sampling=step) - 0.5 * step

    # Candidate voxels: body mask and AP range first (cheap), the rest on those voxels only.
    origin = frame.centre
    v = _axis_coordinate(frame.ap, origin, crop_to_ras, mask.shape)
    candidate = mask & (v >= v_lo) & (v <= v_hi)
    index = np.nonzero(candidate)
    if not len(index[0]):
        return None, None, flags + ["roi_empty"]
    ijk = np.stack([index[2], index[1], index[0]], axis=1).astype(float)
    local = frame.to_local(ijk @ crop_to_ras[:3, :3].T + crop_to_ras[:3, 3])
    top_v, bottom_v = limits.top(local[:, 1]), limits.bottom(local[:, 1])
    quarter_v = 0.25 * (top_v - bottom_v)
    reach_w = np.maximum(quarter_v, clear_w)
    keep = (local[:, 2] <= top_v - reach_w) & (local[:, 2] >= bottom_v + reach_w)
    grid_u = (local[:, 0] - u_a) / step + 1.0  # +1: the pad
    grid_v = (local[:, 1] - v_a) / step + 1.0
    lateral = ndimage.map_coordinates(outline_distance, np.stack([grid_u, grid_v]), order=1, mode="constant",
                                      cval=0.0, prefilter=False)
    keep &= lateral >= clear_uv
    # The endplates between the height lines: the body mask must still be there ``clear_w`` above
    # and below the voxel (a depressed endplate can dip below the line through its three points).
    for sign in (1.0, -1.0):
        probe = local[keep].copy()
        probe[:, 2] += sign * clear_w
        probe_ijk = frame.to_ras(probe) @ ras_to_crop[:3, :3].T + ras_to_crop[:3, 3]
        occupancy = ndimage.map_coordinates(mask_f, probe_ijk[:, ::-1].T, order=1, mode="constant", cval=0.0,
                                            prefilter=False)
        keep[np.flatnonzero(keep)[occupancy < 0.5]] = False
    roi = np.zeros(mask.shape, dtype=bool)
    roi[tuple(axis[keep] for axis in index)] = True
    return slices, roi, flags


def measure_trabecular(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    heights: Sequence,
    *,
    body_labels: np.ndarray | None = None,
    grades: Sequence | None = None,
    margin_mm: float = ROI_MARGIN_MM,
) -> list[TrabecularROI]:
    """Trabecular ROI statistics of every vertebra in ``heights`` (same order).

    ``ct``: HU ``[k, j, i]``; ``labels``: the vertebra label map the morphometry was measured on
    (its ids are ``heights[n].label``); ``ijk_to_ras``: the grid (mm); ``heights``: the
    :class:`~.morphometry.VertebraHeights` list; ``body_labels``: optional ``vertebrae_body``
    map; ``grades``: optional :class:`~.grading.VertebraGrade` list (or mappings with ``level`` and
    ``genant_grade``) to flag fractured vertebrae. Fractured and incomplete vertebrae are
    measured and flagged. HU are as measured (see :func:`measure_contrast` for the contrast phase).
    """
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    fractured = _grade_lookup(grades)
    voxel_ml = voxel_volume_ml(ijk_to_ras)
    out = []
    for h in heights:
        result = TrabecularROI(h.level, int(h.label), complete=bool(h.complete),
                               fractured=fractured.get(h.level) if grades is not None else None)
        if result.fractured:
            result.flags.append("fractured")
        if not h.complete:
            result.flags.append("incomplete_vertebra")
        slices, roi, flags = trabecular_roi_mask(h, labels, ijk_to_ras, body_labels=body_labels, margin_mm=margin_mm)
        result.flags.extend(flags)
        if roi is not None and roi.any():
            lesion = _focal_lesion(ct[slices], roi)
            if lesion.any():
                roi = roi & ~lesion
                result.flags.append("focal_lesion_excluded")
        if roi is not None and roi.any():
            values = ct[slices][roi].astype(np.float64)
            result.voxels = int(values.size)
            result.volume_ml = result.voxels * voxel_ml
            result.mean_hu = float(values.mean())
            result.median_hu = float(np.median(values))
            if values.size > 1:
                result.sd_hu = float(values.std(ddof=1))
                result.mean_hu_se = result.sd_hu / float(np.sqrt(values.size))
            else:
                result.sd_hu = 0.0
            index = np.nonzero(roi)
            centre_ijk = np.array([index[2].mean() + slices[2].start, index[1].mean() + slices[1].start,
                                   index[0].mean() + slices[0].start])
            result.centre_ras = tuple(float(x) for x in ijk_to_ras[:3, :3] @ centre_ijk + ijk_to_ras[:3, 3])
            if result.voxels < ROI_MIN_VOXELS or result.volume_ml < ROI_MIN_ML:
                result.flags.append("roi_small")
        elif "roi_empty" not in result.flags and "not_measured" not in result.flags:
            result.flags.append("roi_empty")
        out.append(result)
    return out


def _focal_lesion(ct_crop: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """The ROI voxels of focal lesions (see the module docstring): outliers of the ROI's HU
    distribution and their face neighbours in the ROI. A boolean like ``roi``."""
    values = ct_crop[roi].astype(np.float64)
    median = np.median(values)
    robust_sd = 1.4826 * np.median(np.abs(values - median))
    outlier = np.zeros_like(roi)
    outlier[roi] = np.abs(values - median) > max(FOCAL_LESION_SDS * robust_sd, FOCAL_LESION_MIN_HU)
    if not outlier.any():
        return outlier
    return ndimage.binary_dilation(outlier) & roi


# ------------------------------------------------------------------------------------------------
# Bone summary
# ------------------------------------------------------------------------------------------------


def opportunistic_category(hu: float) -> str:
    """Opportunistic bone category of an L1 trabecular HU (Pickhardt et al., Ann Intern Med
    2013;158:588): ``<= 110`` ``osteoporosis-likely``, ``110 < HU <= 160``
    ``low-bone-density-possible``, ``> 160`` ``normal``."""
    if not np.isfinite(hu):
        raise ValueError("a NaN attenuation has no bone category")
    low, high = CATEGORY_THRESHOLDS_HU
    if hu <= low:
        return CATEGORIES[0]
    if hu <= high:
        return CATEGORIES[1]
    return CATEGORIES[2]


def _why_unusable(roi: TrabecularROI | None) -> str:
    if roi is None:
        return "missing"
    if not roi.complete:
        return "incomplete"
    if roi.fractured:
        return "fractured"
    if roi.voxels == 0:
        return "no ROI"
    return "ROI too small"


def bone_summary(rois: Sequence[TrabecularROI], contrast: ContrastResult | None = None) -> BoneSummary:
    """The exam's bone summary from :func:`measure_trabecular` (definitions in the module docstring).

    ``contrast``: the exam's :class:`ContrastResult`; its flag is copied beside the HU and a
    contrast-enhanced exam gets a warning (HU are not corrected)."""
    summary = BoneSummary()
    by_level = {r.level: r for r in rois}
    summary.per_level_hu = {r.level: r.mean_hu for r in rois if r.voxels > 0}
    if any(r.fractured is None and r.complete for r in rois if r.level in lv.LUMBAR_LEVELS):
        summary.warnings.append("fracture status of the lumbar vertebrae unknown (no grades given): "
                                "none was excluded as fractured")
    usable = [level for level in lv.LUMBAR_LEVELS if level in by_level and by_level[level].usable]
    summary.lumbar_levels = usable
    summary.excluded_lumbar = {level: _why_unusable(by_level.get(level)) for level in lv.LUMBAR_LEVELS
                               if level not in usable}
    if usable:
        summary.lumbar_mean_hu = float(np.mean([by_level[level].mean_hu for level in usable]))
    else:
        summary.warnings.append("no complete non-fractured lumbar vertebra with a usable ROI: no lumbar mean "
                                "and no opportunistic category")
    if usable:
        chosen = min(usable, key=lambda level: lv.level_position(level) - lv.level_position("L1"))
        summary.l1_level = chosen
        summary.l1_hu = float(by_level[chosen].mean_hu)
        summary.category = opportunistic_category(summary.l1_hu)
        se = by_level[chosen].mean_hu_se
        if np.isfinite(se):
            summary.l1_hu_se = float(se)
            span = CATEGORY_UNCERTAIN_SES * se
            summary.category_uncertain = (opportunistic_category(summary.l1_hu - span)
                                          != opportunistic_category(summary.l1_hu + span))
            if summary.category_uncertain:
                threshold = min(CATEGORY_THRESHOLDS_HU, key=lambda t: abs(t - summary.l1_hu))
                summary.warnings.append(
                    f"{chosen} trabecular HU {summary.l1_hu:.1f} is within {CATEGORY_UNCERTAIN_SES:g} standard "
                    f"errors ({span:.1f} HU) of the {threshold:g} HU category threshold: category uncertain")
        if chosen != "L1":
            summary.warnings.append(f"L1 {summary.excluded_lumbar['L1']}: the opportunistic category uses "
                                    f"{chosen}, the nearest complete non-fractured lumbar vertebra")
    if contrast is not None:
        summary.contrast_enhanced = contrast.contrast_enhanced
        if contrast.contrast_enhanced:
            summary.warnings.append(f"contrast-enhanced exam (aorta {contrast.aorta_hu:.0f} HU): trabecular HU "
                                    "are as measured, not corrected for contrast")
    return summary


# ------------------------------------------------------------------------------------------------
# Contrast
# ------------------------------------------------------------------------------------------------


def measure_contrast(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    aorta_label: int = lv.TOTAL_AORTA,
    threshold_hu: float = CONTRAST_THRESHOLD_HU,
    core_mm: float = AORTA_CORE_MM,
    label_boxes: list | None = None,
) -> ContrastResult:
    """Contrast phase from the aorta (TotalSegmentator ``total`` id 52 by default).

    The mean HU is taken over the aorta's central lumen: voxels whose centre lies at least
    ``core_mm`` plus the largest voxel spacing inside the mask (Euclidean distance in mm to the
    nearest voxel outside it, on the grid's own orthogonal axes). Slices of 1 mm or thinner are
    thinned to about 2 mm apart first (the mean needs no more; speed). A thin aorta without such a core
    falls back to its central half (distance at least half the largest distance), with a warning.
    The image border is not treated as the aorta's wall (an aorta cut by the field of view keeps
    its end slices). Without an aorta label the result is None with a warning. ``label_boxes``:
    ``ndimage.find_objects(labels)`` when the caller has it already."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    result = ContrastResult(threshold_hu=threshold_hu)
    if label_boxes is not None:
        box = label_boxes[aorta_label - 1] if len(label_boxes) >= aorta_label else None
    else:  # one pass, no full-size temporary
        box = (find_label_boxes(labels, aorta_label)[aorta_label - 1]
               if np.issubdtype(labels.dtype, np.integer) else None)
    if box is None:
        result.warnings.append(f"no aorta (label {aorta_label}) in the segmentation: contrast phase unknown")
        return result
    lo = np.maximum(np.array([s.start for s in box]) - 1, 0)
    hi = np.minimum(np.array([s.stop for s in box]) + 1, labels.shape)
    spacing_kji = voxel_spacing(ijk_to_ras)[::-1].copy()
    # Thin slices: every m-th slice is enough for a mean (slices about 2 mm apart); the grid of
    # the kept slices is still orthogonal, so the distance map on it is Euclidean in mm.
    m = max(1, int(2.0 // spacing_kji[0]))
    slices = (slice(lo[0], hi[0], m), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    spacing_kji[0] *= m
    mask = labels[slices] == aorta_label
    distance = distance_transform_edt(mask, sampling=spacing_kji)  # scipy's, with less memory
    core = distance >= core_mm + float(spacing_kji.max())
    if core.sum() < _AORTA_MIN_CORE_VOXELS:
        core = distance >= 0.5 * float(distance.max())
        result.warnings.append("aorta too thin for its central lumen at this voxel size: mean over its central half")
    values = ct[slices][core].astype(np.float64)
    result.aorta_voxels = int(values.size)
    result.aorta_hu = float(values.mean())
    result.contrast_enhanced = bool(result.aorta_hu > threshold_hu)
    return result
