"""Vertebral morphometry: each vertebra's body, its own frame, and its heights (SPEC §4).

Inputs are arrays on one voxel grid (indexed ``[k, j, i]``) and the grid's IJK→RAS matrix:
a vertebra label map (``totalsegmentator`` or ``verse`` ids), optionally the
``vertebrae_body`` map (1 = bodies, 2 = discs) and optionally the CT in HU. Outputs are in RAS
millimetres and do not depend on how the anatomy lies on the voxel grid.

Method, per vertebra (all work on a crop around the vertebra):

1. **Frame.** The cranio-caudal axis ``cc`` is the tangent of the spine's centre line through the
   body centroids: a parabola through the vertebra and its neighbours (two on one side at the
   ends of the column), so lordosis, kyphosis and scoliosis tilt each vertebra's axis as they
   tilt the vertebra. The antero-posterior axis ``ap`` points from the centroid of the posterior
   elements to the centroid of the body (so it follows axial rotation and scanner tilt), made
   orthogonal to ``cc``; ``lr = ap × cc`` points to the patient's right. Two passes: the first on
   whole-vertebra centroids and patient-anterior, the second on body centroids.
2. **Body.** From ``vertebrae_body`` when given (body = vertebra ∩ bodies). Otherwise the body is
   separated from the posterior elements by the vertebra's own shape: in the mid-sagittal plane
   the spinal canal splits the mask into the body (the most anterior large part) and the arch;
   every vertebra voxel anterior to the body's posterior wall there is body.
3. **Depth.** Anterior and posterior walls from the body mask's occupancy along ``ap`` in the
   mid-sagittal plane, row by row over the height: the posterior wall of the median row, the
   anterior wall of the 85th percentile (a wedge fracture keeps its anterior wall only low down).
4. **Heights** Ha, Hm, Hp at 15 / 50 / 85 % of the depth from the anterior wall, each from a
   bundle of cranio-caudal lines spread over the central band (and ±2.5 % of the depth):

   * with the CT, each endplate is fitted on the CT voxels of the central band around it
     (:func:`_fit_endplate_profile`): a profile ``w(v)`` over the whole depth, straight or a
     natural spline through its heights at the three positions and halfway between them, whose
     voxels are modelled by their exact partial volume of disc, a cortical plate of
     ``cortex_mm`` and trabecular bone. The plate's HU is fitted once per exam, jointly on
     the endplates (:func:`_exam_plate_hu`; the walls as a fallback); the disc's HU per
     endplate when the disc is seen beyond it, otherwise (a thin disc at thick slices) the median
     of the fits facing a neighbouring vertebra, or fitted there too when there are none;
   * without the CT (or when no fit is possible), the endplate is where the body mask's
     interpolated occupancy crosses one half; the median over the bundle's lines is taken.

Completeness is decided per part. Where the field of view (the CT's grid, or the segmentation's
own grid when it was resampled onto the CT's) cuts a vertebra, the flags say which part:
``posterior_elements_cut`` (the arch, spinous or transverse processes), ``body_cut`` (a wall of
the body), ``endplate_cut_superior`` / ``endplate_cut_inferior`` (the body within 2 mm, or a
voxel, of that endplate). A vertebra whose body and endplates are whole is measured and graded
even when its posterior elements are cut: its body joins the spine's centre line, and its
antero-posterior direction comes from what is left of its posterior elements, balanced left to
right when the cut took one side (:func:`_ap_hint`), or from its neighbours' when too little is
left. A vertebra whose body is cut
(flagged ``touches_field_of_view_edge`` too) and one with an implausible body are returned with
``complete = False``. A height whose superior endplate was found at or below
the inferior one is not reported (NaN, flag ``endplates_cross``), never as a negative number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize, stats

from .. import levels as lv
from ..geometry import distance_transform_edt, find_label_boxes, grid_edge_layer, mask_box, mask_centroid_ras, partial_volume_share, unit, voxel_extent_along, voxel_spacing, voxel_volume_ml

AP_FRACTIONS = {"ha": 0.15, "hm": 0.50, "hp": 0.85}
"""Measurement positions: fraction of the body depth from the anterior wall (SPEC §4)."""
HALFWAY_FRACTIONS = (0.675, 0.325)
"""Depth fractions halfway between the measurement positions, in increasing ``v`` (posterior
first): the endplate profiles' other two knots."""
PROFILE_FRACTIONS = np.round(np.arange(0.15, 0.85 + 1e-9, 0.05), 6)
"""Depth fractions (from the anterior wall) at which the height profile and the endplate outline
are reported: every 5 % between the anterior and posterior measurement positions."""
MIDDLE_REGION = (0.25, 0.75)
"""Depth fractions of the middle region, where a depression of an endplate is looked for (its
deepest point, wherever it lies, rather than the fixed middle position)."""

ENDPLATE_CORTEX_MM = 1.0
"""Assumed thickness of the endplates' cortical plate (mm); the outer surface is taken half of it
beyond the plate's centre. Reported endplate thickness is about 0.5–1.5 mm depending on level and
region; an error ``d`` here changes every height by ``d``, ratios hardly at all."""

CENTRAL_BAND = 0.15
"""Half-width of the band of lines across the body's left-right width, as a fraction of it."""

THICK_VOXEL_MM = 2.0
"""Voxels spanning more than this along a vertebra's cranio-caudal axis (mm) are thick: there a
bent endplate's heights are not refined locally (the few voxels near one position add more noise
than the profile's approximation costs), the endplate fits search more thoroughly, and the exam's
plate's HU is fitted a second time (phantom benchmark)."""

AXIS_POINT_BAND_MM = 2.0
"""Half-width (mm, left-right) of the walls' windows for :meth:`_BodyMeasurement.axis_point`,
at least half a voxel: the walls curve across the body, and the depth is the mid-sagittal
plane's."""

PLANE_SLOPES = np.arange(-0.3, 0.3 + 1e-9, 0.1)
"""Slopes (mm per mm) around its guess at which :func:`_fit_endplate` tries a plane."""

IMPRECISE_HEIGHT_SD_MM = 0.5
"""A vertebra whose endplates were fitted on the CT is flagged ``imprecise_heights`` when a
height's standard deviation from the noise (:attr:`VertebraHeights.ha_sd_mm` …) exceeds this
(mm): two of them, 1 mm, are 4 % of a 25 mm body, more than the grading's borderline margin."""

MASK_ENDPLATE_SD_VOXELS = 0.5
"""Standard deviation of the mask's endplate (:meth:`_BodyMeasurement.mask_endplates`) as a
fraction of the voxel's extent along the vertebra's axis. Each endplate fitted on the CT is
combined with the mask's by inverse variance (:func:`_with_mask_endplate`): the fit decides
where the noise lets it (its SD is a few hundredths of a millimetre at 1 mm voxels and rarely
above 0.3 mm at 3 mm), the mask where the fit cannot find the endplate (an osteoporotic body as
dense as its thin disc at 3 mm slices: SDs of 1–5 mm). The phantoms' masks (the true shape
sampled at voxel centres) give heights within 0.23–0.36 of a voxel RMS; a segmentation model's
mask is rarely better than half a voxel, the value taken. On the morphometry benchmark's rotation
pairs this changed heights at 1 mm and 0.7x0.7x3 mm by at most 0.01 mm and took the 3 mm
osteoporotic pair's largest error from 3.63 to 2.01 mm (1.96 mm with the SDs of
:data:`PROFILE_STEP_MM`)."""

BEND_FALSE_ALARM = 0.001
"""An endplate is fitted bent rather than straight only when the straight fit's excess residual
would arise by noise alone with at most this probability (a chi-squared test, and at least the
Bayesian information criterion). With the criterion alone (about 3 % at 3 mm slices, where an
endplate has about 100 voxels) noise bent flat endplates by up to 1.2 mm."""

MIN_BEND_VOXELS = 1.0 / 3.0
"""A bent endplate must also depart from the straight fit by at least this fraction of the
voxel's extent along the vertebra's axis at some knot (1 mm at 3 mm slices). The partial-volume
model is not exact (a plate drawn on sub-voxel samples, whole-number HU, neighbouring
structures), and with the thousand voxels of an endplate at 0.7x0.7x3 mm the test above accepts
bends that only fit that misfit: on the osteoporotic thoracic bodies of the attenuation phantoms
they bent flat endplates by 0.3–0.7 mm (0.7x0.7x3 mm heights p90 0.94 → 0.71 mm noise-free with
this rule; fractures' bends are millimetres deep)."""

LINE_SEARCH_STEP_MM = 0.3
"""Grid step of the endplate fits' line searches (mm); the least-squares polish refines them."""

THOROUGH_BENT_SWEEPS = 4
"""Sweeps of line searches for a bent endplate in a thorough fit (thick slices)."""

PROFILE_STEP_MM = 0.1
"""Grid step (mm) of the endplate's residual profile behind its reported SD at thick slices."""

SWEEP_TOLERANCE_MM = 0.02
"""The endplate fits' line searches stop when a sweep moves no knot by more than this (mm)."""

CROP_MARGIN_MM = 12.0

# Plausibility limits of a vertebral body (adult T1–S1).
MIN_BODY_VOLUME_ML = 2.0
HEIGHT_LIMITS_MM = (4.0, 60.0)
DEPTH_LIMITS_MM = (8.0, 70.0)


@dataclass(frozen=True, eq=False)
class VertebraFrame:
    """A vertebra's own frame in RAS mm: origin at the body centroid, unit axes ``lr`` (patient
    right), ``ap`` (anterior) and ``cc`` (superior), ``lr = ap × cc``."""

    centre: np.ndarray
    lr: np.ndarray
    ap: np.ndarray
    cc: np.ndarray

    @property
    def rotation(self) -> np.ndarray:
        """Rows ``lr, ap, cc``: maps RAS offsets to local ``(u, v, w)``."""
        return np.stack([self.lr, self.ap, self.cc])

    def to_local(self, ras: np.ndarray) -> np.ndarray:
        return (np.asarray(ras, dtype=float) - self.centre) @ self.rotation.T

    def to_ras(self, local: np.ndarray) -> np.ndarray:
        return np.asarray(local, dtype=float) @ self.rotation + self.centre


@dataclass
class VertebraHeights:
    """Morphometry of one vertebral body. Heights in mm (NaN when not measured)."""

    level: str
    label: int
    complete: bool
    ha_mm: float = float("nan")
    hm_mm: float = float("nan")
    hp_mm: float = float("nan")
    depth_mm: float = float("nan")
    width_mm: float = float("nan")
    body_volume_ml: float = float("nan")
    frame: VertebraFrame | None = None
    height_lines_ras: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Superior and inferior end point (RAS mm) of each measured height line, keyed ha/hm/hp."""
    endplate_method: str = ""
    flags: list[str] = field(default_factory=list)
    ha_sd_mm: float = float("nan")
    hm_sd_mm: float = float("nan")
    hp_sd_mm: float = float("nan")
    """Standard deviations (mm) of the heights from the CT's noise, from the two endplate fits
    (their least-squares covariance, at thick slices at least their residual's likelihood spread;
    each fit combined with the mask's endplate, :data:`MASK_ENDPLATE_SD_VOXELS`; NaN where an
    endplate comes from the mask alone). They leave out the model's own errors and assume
    uncorrelated voxel noise: a reconstruction kernel that correlates neighbouring voxels makes
    the true spread larger."""
    height_profile_mm: tuple[float, ...] = ()
    """Height (mm) at each of :data:`PROFILE_FRACTIONS` of the depth, from the endplate profiles
    (natural splines through their five knots); empty when the endplates were not found."""
    hm_min_mm: float = float("nan")
    hm_min_fraction: float = float("nan")
    """The smallest height over the middle region (:data:`MIDDLE_REGION`) and its depth fraction:
    where a depressed endplate is deepest."""
    sagittal_area_mm2: float = float("nan")
    """Area of the body's mid-sagittal outline between 15 and 85 % of its depth (mm²): the
    integral of the height profile, the CT's analogue of a radiograph's projected area."""
    endplate_depression_mm: tuple[float, float] = (float("nan"), float("nan"))
    """Superior and inferior endplate's deepest point in the middle region below the chord
    between its anterior and posterior measurement positions (mm, positive towards the body's
    centre; 0 or negative for a flat or convex endplate)."""
    endplate_outline_ras: dict[str, np.ndarray] = field(default_factory=dict)
    """The superior and inferior endplates in the mid-sagittal plane (RAS mm, one point per
    :data:`PROFILE_FRACTIONS`), keyed ``superior``/``inferior``: the measured outline the QC
    picture draws."""
    axis_point_ras: np.ndarray | None = None
    """The body's middle on the spine's centre line (RAS mm): in the mid-sagittal plane, at the
    middle of the Hm line's height, halfway between the anterior and posterior walls as fitted on
    the CT (:meth:`_BodyMeasurement.axis_point`, sub-voxel); the Hm line's midpoint (walls from the
    mask) without the CT or when a wall fit fails. None without height lines."""
    axis_point_from_ct: bool = False
    """Whether :attr:`axis_point_ras` comes from the CT-fitted walls."""
    voxel_extent_mm: tuple[float, float, float] = (float("nan"),) * 3
    """The voxel's extent (mm) along the frame's left-right, antero-posterior and cranio-caudal
    axes (:func:`.geometry.voxel_extent_along`): how finely the body was sampled in its own frame."""


@dataclass
class _Vertebra:
    """Working state of one vertebra during measurement."""

    level: str
    label: int
    slices: tuple[slice, slice, slice]
    origin_ijk: np.ndarray  # (i, j, k) of the crop's first voxel
    mask: np.ndarray  # whole vertebra, bool, crop
    edge: np.ndarray | None  # crop voxels where the field of view ends; None when the vertebra reaches none
    centroid: np.ndarray = None
    body: np.ndarray = None
    body_centroid: np.ndarray = None
    posterior_centroid: np.ndarray = None
    flags: list[str] = field(default_factory=list)

    @property
    def touches_edge(self) -> bool:
        """Whether any voxel of the vertebra lies where the field of view ends."""
        return self.edge is not None


class _CropSampler:
    """Samples arrays of one crop at RAS points (trilinear, or nearest for labels)."""

    def __init__(self, ijk_to_ras: np.ndarray, origin_ijk: np.ndarray):
        self.ras_to_crop = np.linalg.inv(ijk_to_ras)
        self.ras_to_crop[:3, 3] -= origin_ijk

    def __call__(self, array: np.ndarray, ras: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        ijk = ras @ self.ras_to_crop[:3, :3].T + self.ras_to_crop[:3, 3]
        return ndimage.map_coordinates(array, ijk[:, ::-1].T, order=order, mode="constant", cval=cval,
                                       prefilter=False)


def _local_coordinate(frame: "VertebraFrame", crop_ijk_to_ras: np.ndarray, shape_kji, axis: int) -> np.ndarray:
    """One local coordinate (0 = u, 1 = v, 2 = w; mm, float32) of every voxel centre of a crop."""
    row = frame.rotation[axis]
    steps = (row @ crop_ijk_to_ras[:3, :3]).astype(np.float32)
    nk, nj, ni = shape_kji
    return ((np.arange(ni, dtype=np.float32) * steps[0])[None, None, :]
            + (np.arange(nj, dtype=np.float32) * steps[1])[None, :, None]
            + (np.arange(nk, dtype=np.float32) * steps[2] + np.float32(row @ (crop_ijk_to_ras[:3, 3] - frame.centre)))
            [:, None, None])


def _local_grid(frame: "VertebraFrame", crop_ijk_to_ras: np.ndarray, shape_kji) -> np.ndarray:
    """Local ``(u, v, w)`` (mm, float32) of every voxel centre of a crop, shape ``(k, j, i, 3)``."""
    return np.stack([_local_coordinate(frame, crop_ijk_to_ras, shape_kji, axis) for axis in range(3)], axis=-1)


def spine_tangents(centroids: list[np.ndarray]) -> list[np.ndarray]:
    """Unit tangents (pointing cranially) of the curve through centroids ordered cranial to caudal.

    A parabola in the chord-length parameter is fitted through each point and its neighbours
    (the next two at the ends); its derivative at the point is the tangent. One point: superior.
    """
    n = len(centroids)
    if n == 1:
        return [np.array([0.0, 0.0, 1.0])]
    pts = np.asarray(centroids, dtype=float)
    if n == 2:
        t = unit(pts[0] - pts[1])
        return [t, t]
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    tangents = []
    for index in range(n):
        lo = min(max(index - 1, 0), n - 3)
        sel = slice(lo, lo + 3)
        s = chord[sel] - chord[index]
        coeffs = np.polyfit(s, pts[sel], 2)  # (3, 3): rows a, b, c of a s² + b s + c
        tangents.append(unit(-coeffs[1]))  # chord grows caudally; the tangent points cranially
    return tangents


def _frames(vertebrae: list[_Vertebra], centroids: list[np.ndarray], ap_hints: list[np.ndarray | None],
            cut: list[bool] | None = None):
    # A vertebra cut by the field of view has a displaced centroid: the centre line runs through
    # the whole ones only (when at least two), and a cut one takes the tangent of the nearest whole.
    # ``cut``: whose centroid is displaced (default: any part touches the field of view's edge).
    cut = [v.touches_edge for v in vertebrae] if cut is None else cut
    whole = [n for n, c in enumerate(cut) if not c]
    if len(whole) >= 2 and len(whole) < len(vertebrae):
        whole_tangents = spine_tangents([centroids[n] for n in whole])
        tangents = [whole_tangents[int(np.argmin([abs(n - w) for w in whole]))] for n in range(len(vertebrae))]
    else:
        tangents = spine_tangents(centroids)
    frames = []
    for vertebra, centre, tangent, hint in zip(vertebrae, centroids, tangents, ap_hints):
        anterior = np.array([0.0, 1.0, 0.0]) if hint is None else hint
        ap = anterior - (anterior @ tangent) * tangent
        if np.linalg.norm(ap) < 1e-6:
            ap = np.array([1.0, 0.0, 0.0]) - tangent[0] * tangent
        ap = unit(ap)
        frames.append(VertebraFrame(np.asarray(centre, dtype=float), np.cross(ap, tangent), ap, tangent))
    return frames


def _cut_part(vertebra: _Vertebra, part: np.ndarray) -> bool:
    """Whether ``part`` (a mask of the vertebra's crop) reaches where the field of view ends."""
    return vertebra.edge is not None and bool((part & vertebra.edge).any())


def _posterior_cut(vertebra: _Vertebra) -> bool:
    return vertebra.body is not None and _cut_part(vertebra, vertebra.mask & ~vertebra.body)


def _body_cut(vertebra: _Vertebra) -> bool:
    return _cut_part(vertebra, vertebra.mask if vertebra.body is None else vertebra.body)


def _cut_flags(vertebra: _Vertebra, frame: VertebraFrame, sample: _CropSampler, ijk_to_ras: np.ndarray) -> list[str]:
    """Which parts of the vertebra the field of view cuts (see the module docstring): the body's
    voxels on the edge are sorted by their height in the body along the frame's cranio-caudal
    axis, within ``max(2 mm, one voxel)`` of the top or bottom (an endplate) or between (a wall)."""
    flags = ["posterior_elements_cut"] if _posterior_cut(vertebra) else []
    if not _cut_part(vertebra, vertebra.body):
        return flags
    w = _local_coordinate(frame, np.linalg.inv(sample.ras_to_crop), vertebra.mask.shape, 2)
    w_body = w[vertebra.body]
    w_cut = w[vertebra.body & vertebra.edge]
    zone = max(2.0, voxel_extent_along(frame.cc, ijk_to_ras))
    top, bottom = w_cut > w_body.max() - zone, w_cut < w_body.min() + zone
    flags += ["body_cut"] * bool((~top & ~bottom).any()) + ["endplate_cut_superior"] * bool(top.any()) \
        + ["endplate_cut_inferior"] * bool(bottom.any())
    return flags


def _ap_hint(vertebra: _Vertebra, frame: VertebraFrame, ijk_to_ras: np.ndarray) -> np.ndarray | None:
    """Patient-anterior as the vertebra shows it: from its posterior elements' centroid to its
    body's. When the field of view cuts the posterior elements off to one side (a transverse
    process, or an arch cut obliquely), the centroid would move to the other: then only their
    voxels nearer to the mid-sagittal plane than the nearest cut voxel beyond
    :data:`CENTRAL_CUT_MM` (less a margin) count, on both sides alike; the left-right axis that
    says "nearer" is taken from the hint itself, :data:`HINT_ROUNDS` times. A cut near the
    mid-sagittal plane (a spinous process) moves the centroid along that plane only. None
    without posterior elements, or when too little of them is left."""
    if vertebra.posterior_centroid is None:
        return None
    hint = plain = unit(vertebra.body_centroid - vertebra.posterior_centroid)
    if not _posterior_cut(vertebra):
        return hint
    rest = vertebra.mask & ~vertebra.body
    k, j, i = np.nonzero(rest)
    ras = (np.stack([i, j, k], axis=1).astype(float) + vertebra.origin_ijk) @ ijk_to_ras[:3, :3].T \
        + ijk_to_ras[:3, 3] - vertebra.body_centroid
    cut = vertebra.edge[rest]
    for _ in range(HINT_ROUNDS):
        ap = hint - (hint @ frame.cc) * frame.cc
        if np.linalg.norm(ap) < 1e-6:
            return hint
        lr = np.cross(unit(ap), frame.cc)
        u = np.abs(ras @ lr)
        lateral = u[cut & (u >= CENTRAL_CUT_MM)]
        if not len(lateral):
            return hint
        keep = u < lateral.min() - max(2.0, voxel_extent_along(lr, ijk_to_ras))
        if np.count_nonzero(keep) < 10:
            return None
        hint = unit(-ras[keep].mean(axis=0))
    return hint if np.degrees(np.arccos(np.clip(hint @ plain, -1.0, 1.0))) <= MAX_HINT_CORRECTION_DEG else plain


MAX_FRAME_PASSES = 4
"""Most passes of frames and body separation (two when the field of view cuts no body)."""

MAX_HINT_CORRECTION_DEG = 10.0
"""A left-right balanced hint that turns further than this from the plain one is not trusted
(the balancing went astray in a frame still far off); the plain hint is kept."""

HINT_ROUNDS = 3
"""Rounds of :func:`_ap_hint`'s left-right balancing (each takes the left-right axis from the
previous round's hint)."""


CENTRAL_CUT_MM = 10.0
"""A cut of the posterior elements within this distance (mm) of the mid-sagittal plane (the
spinous process) does not unbalance them left to right."""


def _ap_hints(vertebrae: list[_Vertebra], frames: list[VertebraFrame], ijk_to_ras: np.ndarray) -> list[np.ndarray | None]:
    """Each vertebra's :func:`_ap_hint`; a vertebra whose posterior elements are cut and give no
    hint takes the mean of the hints, up to two levels away, of vertebrae whose posterior
    elements are whole."""
    hints = [_ap_hint(v, frame, ijk_to_ras) for v, frame in zip(vertebrae, frames)]
    whole = [n for n, v in enumerate(vertebrae) if hints[n] is not None and not _posterior_cut(v)]
    for n, v in enumerate(vertebrae):
        near = [m for m in whole if abs(m - n) <= 2]
        if hints[n] is None and _posterior_cut(v) and near:
            hints[n] = unit(np.mean([hints[m] for m in near], axis=0))
    return hints


def _separate_body(vertebra: _Vertebra, frame: VertebraFrame, sample: _CropSampler, step: float) -> np.ndarray | None:
    """Body part of a whole-vertebra mask, cut at the posterior wall found in the mid-sagittal plane."""
    mask_f = vertebra.mask.astype(np.float32)
    v = np.arange(-80.0, 60.0 + step, step)  # from the whole vertebra's centroid: arch behind, body ahead
    w = np.arange(-35.0, 35.0 + step, step)
    vv, ww = np.meshgrid(v, w, indexing="ij")
    plane = np.zeros(vv.shape, dtype=np.float32)
    offsets = (-2.0, -1.0, 0.0, 1.0, 2.0)
    for u in offsets:
        local = np.stack([np.full(vv.size, u), vv.ravel(), ww.ravel()], axis=1)
        plane += sample(mask_f, frame.to_ras(local)).reshape(vv.shape)
    plane /= len(offsets)
    parts, count = ndimage.label(plane >= 0.5)
    if count == 0:
        return None
    areas = ndimage.sum_labels(np.ones_like(plane), parts, index=np.arange(1, count + 1))
    mean_v = ndimage.mean(vv, parts, index=np.arange(1, count + 1))
    large = np.nonzero(areas >= 0.3 * areas.max())[0]
    body_part = large[np.argmax(mean_v[large])] + 1
    in_body = parts == body_part
    rows = np.nonzero(in_body.any(axis=0))[0]  # w indices
    central = rows[len(rows) // 4 : max(len(rows) // 4 + 1, 3 * len(rows) // 4)]
    posterior_wall = np.median([vv[in_body[:, r], r].min() for r in central if in_body[:, r].any()])
    local_v = _local_coordinate(frame, np.linalg.inv(sample.ras_to_crop), vertebra.mask.shape, 1)
    return vertebra.mask & (local_v >= posterior_wall - 0.5 * step)


def _crossings(profiles: np.ndarray, coords: np.ndarray, starts: np.ndarray, direction: int,
               level: float = 0.5) -> np.ndarray:
    """Per row of ``profiles`` (``(L, W)`` samples at ``coords``), the position where it first falls
    below ``level`` walking from index ``starts[row]`` in ``direction`` (+1 or -1); linear
    interpolation between samples. NaN where it never does."""
    rows = np.arange(profiles.shape[0])
    columns = np.arange(profiles.shape[1])
    beyond = (direction * (columns[None, :] - starts[:, None]) > 0) & (profiles < level)
    if direction > 0:
        after = np.argmax(beyond, axis=1)
    else:
        after = profiles.shape[1] - 1 - np.argmax(beyond[:, ::-1], axis=1)
    before = np.clip(after - direction, 0, profiles.shape[1] - 1)
    a, b = profiles[rows, before], profiles[rows, after]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(a != b, (a - level) / (a - b), 0.5)
    out = coords[before] + t * (coords[after] - coords[before])
    return np.where(beyond.any(axis=1), out, np.nan)


def _fit_endplate(values: np.ndarray, local: np.ndarray, direction: int, edge_guess: float, v_centre: float,
                  slope_guess: float, frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float,
                  search: float, slopes: np.ndarray = PLANE_SLOPES) -> tuple[float, float, float]:
    """Outer surface of one endplate, fitted to the CT values of the voxels around it.

    ``values`` are the HU of voxels whose centres have local coordinates ``local`` (N, 3);
    ``direction`` is +1 for a superior endplate (body below), -1 for an inferior one. The endplate
    is a plane ``w = e + g (v - v_centre)``; each voxel's HU is modelled as its exact partial-volume
    mix of disc (outside), a cortical plate of ``cortex_mm`` just inside the surface, and trabecular
    bone: ``HU = a + b·inside + c·plate``, where ``inside`` and ``plate`` are the shares of the
    voxel's volume beyond the plane (a box kernel, see :func:`.geometry.partial_volume_share`). ``a, b, c`` are solved by
    least squares for each ``(e, g)`` on a grid around the mask's estimate (``g`` at
    ``slope_guess + slopes``); the best fit wins.
    Returns ``(e, g, plate HU)`` with the plate's HU ``a + b + c``, or NaNs when no fit has a
    bright plate (``c > 0``)."""
    if len(values) < 8:
        return float("nan"), float("nan"), float("nan")
    step = 0.1
    edges = edge_guess + np.arange(-search, search + 1e-9, step)
    best = (float("nan"), float("nan"), np.inf, float("nan"))
    for slope in slope_guess + np.asarray(slopes, dtype=float):
        normal = unit(frame.cc - slope * frame.ap)
        cdf = partial_volume_share(normal, ijk_to_ras)
        scale = 1.0 / np.sqrt(1.0 + slope * slope)
        plane = local[:, 2] - slope * (local[:, 1] - v_centre)  # w measured along the plane's offset
        depth = direction * (edges[:, None] - plane[None, :]) * scale  # distance inside the body, mm
        inside = cdf(depth)
        plate = inside - cdf(depth - cortex_mm)
        coef, residual = _solve_linear([np.ones_like(inside), inside, plate], np.broadcast_to(values, inside.shape))
        residual[~(coef[:, 2] > 0)] = np.inf
        index = int(np.argmin(residual))
        if residual[index] < best[2]:
            best = (_parabolic_minimum(edges, residual), float(slope), float(residual[index]), float(coef[index].sum()))
    return best[0], best[1], best[3]


def _box_density(cdf, depth: np.ndarray, step: float = 0.01) -> np.ndarray:
    """Derivative of a partial-volume share (:func:`.geometry.partial_volume_share`) at
    ``depth`` (mm), by a central difference over ``step``."""
    return (cdf(depth + step) - cdf(depth - step)) / (2.0 * step)


def _tilt_shape(knots_v: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A profile's tilt: the line through ``-1`` at the first knot and ``+1`` at the last, at ``v``."""
    return 2.0 * (v - 0.5 * (knots_v[0] + knots_v[-1])) / max(knots_v[-1] - knots_v[0], 1e-6)


def _natural_spline_basis(knots_v: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(v), len(knots_v))`` matrix whose product with knot values gives the natural cubic
    spline through them at ``v``, extended linearly beyond the end knots (its second derivative
    is zero there, so the extension is smooth). Lines are reproduced exactly."""
    from scipy.interpolate import CubicSpline
    spline = CubicSpline(knots_v, np.eye(len(knots_v)), bc_type="natural")
    slope = spline.derivative()
    inner = np.clip(v, knots_v[0], knots_v[-1])
    return spline(inner) + (v - inner)[:, None] * slope(inner)


def _solve_linear(columns: list[np.ndarray], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ``target ≈ Σ coef_i · columns_i`` for each row (candidate) of ``(K, N)``
    arrays, from the normal equations. Returns ``coef (K, m)`` and the residual sum of squares
    ``(K,)`` (inf where the system is singular)."""
    m = len(columns)
    gram = np.empty((target.shape[0], m, m))
    columns = [np.broadcast_to(c, target.shape) for c in columns]
    for i, ci in enumerate(columns):
        for j in range(i, m):
            gram[:, i, j] = gram[:, j, i] = np.einsum("kn,kn->k", ci, columns[j])
    rhs = np.stack([np.einsum("kn,kn->k", c, target) for c in columns], axis=1)
    ok = np.abs(np.linalg.det(gram)) > 1e-9 * np.prod(np.diagonal(gram, axis1=1, axis2=2), axis=1)
    coef = np.zeros((target.shape[0], m))
    if ok.any():
        coef[ok] = np.linalg.solve(gram[ok], rhs[ok][..., None])[..., 0]
    residual = np.einsum("kn,kn->k", target, target) - (coef * rhs).sum(axis=1)  # |y|² − cᵀ Xᵀ y
    residual[~ok] = np.inf
    return coef, residual


def _parabolic_minimum(values: np.ndarray, residual: np.ndarray) -> float:
    """Position of the smallest ``residual`` over equally spaced ``values``, refined by the
    parabola through it and its neighbours."""
    index = int(np.argmin(residual))
    best = float(values[index])
    if 0 < index < len(values) - 1 and np.all(np.isfinite(residual[index - 1:index + 2])):
        r0, r1, r2 = residual[index - 1:index + 2]
        curvature = r0 - 2 * r1 + r2
        if curvature > 0:
            best += 0.5 * (values[1] - values[0]) * (r0 - r2) / curvature
    return best


def _tissue_model(values: np.ndarray, inside: np.ndarray, plate: np.ndarray, plate_hu: float | None,
                  disc_hu: float | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Columns and target of the linear least-squares problem of an endplate's partial-volume
    model (see :func:`_fit_endplate_profile`) for voxel ``values`` with shares ``inside`` (beyond
    the surface) and ``plate`` (within the cortical plate): with ``plate_hu`` known,
    ``values - plate_hu·plate [- disc_hu·(1 - inside)] ≈ [a·(1 - inside)] + t·(inside - plate)``;
    with ``plate_hu`` None, ``values [- disc_hu] ≈ [a] + b·inside + c·plate``. The disc's term is
    a column (first) unless ``disc_hu`` fixes it; the trabecular (or plate) term is the last."""
    outside = 1.0 - inside
    if plate_hu is None:
        columns = ([] if disc_hu is not None else [np.ones_like(inside)]) + [inside, plate]
        return columns, values - (disc_hu if disc_hu is not None else 0.0)
    target = values - plate_hu * plate
    if disc_hu is not None:
        return [inside - plate], target - disc_hu * outside
    return [outside, inside - plate], target


def _fit_endplate_profile(values: np.ndarray, local: np.ndarray, direction: int, knots_v: np.ndarray,
                          edges_guess: np.ndarray, frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float,
                          search: float, plate_hu: float | None, disc_hu: float | None = None,
                          sweeps: int = 1, local_half: float | None = None,
                          straight_only: bool = False,
                          thorough: bool = False, halfway: bool = False) -> tuple | None:
    """Outer surface of one endplate over the body's depth, fitted to the CT values of the voxels
    around it.

    The endplate is a profile ``w(v)``: either straight, or the natural cubic spline through its
    heights at the measurement positions ``knots_v`` and halfway between them (extended linearly
    beyond the end knots). A wedge, a crush or physiological wedging is nearly straight or bent
    once; a biconcave depression is smooth and deepest at mid-depth. Each voxel's HU is modelled
    as its exact partial-volume mix (a box kernel along the local normal,
    :func:`.geometry.partial_volume_share`) of three tissues, each with its own HU: disc outside
    (``a``), a cortical plate of ``cortex_mm`` just inside the surface (``plate_hu``) and
    trabecular bone (``t``): ``HU = a·(1 - inside) + t·(inside - plate) + plate_hu·plate``, with
    ``inside`` and ``plate`` the voxel's shares beyond the surface and within the plate. ``t`` and
    ``a`` (unless ``disc_hu`` fixes it) are solved by least squares; ``plate_hu`` is the exam's
    (:func:`_exam_plate_hu`), or, when None, free too (as a contrast over the bone, which must be
    positive). The knot heights: line searches on a grid of
    :data:`LINE_SEARCH_STEP_MM` within ``search`` of the mask's estimate ``edges_guess`` (shift and
    tilt, then each knot), refined by a parabola, then polished by nonlinear least squares. The
    bent profile is kept only when the data ask for it (:data:`BEND_FALSE_ALARM`);
    ``straight_only`` fits the straight one alone; ``thorough`` searches more widely (for thick
    slices, where an endplate has a few hundred voxels). Every voxel of the depth informs the disc
    and bone intensities and the slopes, so the fit holds at 3 mm slices where the few voxels
    around one measurement position cannot. ``direction`` is +1 for a superior endplate, -1 for an
    inferior one. When the endplate is bent, each height is refined on the voxels within
    ``local_half`` (mm along ``v``) of its position. Returns the surface's ``w`` at ``knots_v``
    (same order), the disc HU ``a`` and the standard deviation of the surface at ``knots_v`` from
    the noise (the least-squares covariance, with ``thorough`` at least the residual's likelihood
    spread; mm, inf where the data do not determine it), or None when no fit has a bright plate.
    With ``halfway`` a fourth element follows: the surface's ``w`` at the knots halfway between
    consecutive measurement positions, in increasing ``v``."""
    order = np.argsort(knots_v)
    if len(values) < 8:
        return None
    # The profile has a knot halfway between each two measurement positions too, and is a spline:
    # piecewise linear through the three alone, a biconcave depression was fitted as a triangle,
    # which pulled the anterior and posterior heights by up to 1.7 mm at 3 mm slices; piecewise
    # linear through five, its deepest knot overshot (Hm 0.5 mm short, median on the suite).
    measured_v = np.asarray(knots_v, dtype=float)[order]
    kv = np.empty(2 * len(measured_v) - 1)
    kv[0::2], kv[1::2] = measured_v, 0.5 * (measured_v[1:] + measured_v[:-1])
    guess = np.interp(kv, measured_v, np.asarray(edges_guess, dtype=float)[order])
    v, w = local[:, 1], local[:, 2]
    segment = np.clip(np.searchsorted(kv, v) - 1, 0, len(kv) - 2)
    dv = np.diff(kv)
    # The profile is linear in its knots: surface(v) = basis(v) @ knots, so a line search only
    # adds a multiple of basis @ direction.
    basis = _natural_spline_basis(kv, v)
    free, disc_fixed = plate_hu is None, disc_hu is not None
    offsets = np.arange(-search, search + 1e-9, LINE_SEARCH_STEP_MM)

    def in_window(candidates: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Whether each candidate profile (rows of knots) keeps every knot within ``search`` of
        ``centre``: where the fit looks (near the mask's endplate)."""
        return np.all(np.abs(np.atleast_2d(candidates) - centre) <= search + 1e-9, axis=1)

    def residuals(surfaces: np.ndarray, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residual and disc HU for candidate surfaces ``(K, N)`` near the profile ``knots``, whose
        slopes set the partial-volume kernel and the distance along the normal (they vary little
        within a line search)."""
        slopes = np.diff(knots) / dv
        cdf = partial_volume_share(unit(frame.cc - float(np.mean(slopes)) * frame.ap), ijk_to_ras)
        depth = (direction / np.sqrt(1.0 + slopes[segment] ** 2)) * (surfaces - w)  # inside the body, mm
        inside = cdf(depth)
        plate = inside - cdf(depth - cortex_mm)
        columns, target = _tissue_model(values[None, :], inside, plate, plate_hu, disc_hu)
        coef, residual = _solve_linear(columns, np.broadcast_to(target, inside.shape))
        if free:
            residual[~(coef[:, -1] > 0)] = np.inf
        return residual, (np.full(len(coef), disc_hu) if disc_fixed else coef[:, 0])

    def evaluated(knots):
        """The profile ``knots`` with its residual and disc HU."""
        residual, discs = residuals((basis @ knots)[None, :], knots)
        return knots, float(residual[0]), float(discs[0])

    def line_searches(knots, directions, centre, sweeps=sweeps):
        """Line searches along ``directions`` within ``search`` of ``centre``, repeated until a
        sweep moves no knot by more than ``SWEEP_TOLERANCE_MM`` (at most ``sweeps`` times); the
        final knots, residual and disc HU."""
        for _ in range(sweeps):
            start = knots.copy()
            for direction_k in directions:
                candidates = knots[None, :] + offsets[:, None] * direction_k[None, :]
                surfaces = (basis @ knots)[None, :] + offsets[:, None] * (basis @ direction_k)[None, :]
                residual, _ = residuals(surfaces, knots)
                residual[~in_window(candidates, centre)] = np.inf
                if np.isfinite(residual).any():
                    knots = knots + _parabolic_minimum(offsets, residual) * direction_k
            if np.max(np.abs(knots - start)) < SWEEP_TOLERANCE_MM:
                break
        return evaluated(knots)

    def projected(knots, span):
        """The residual vector and its Jacobian as functions of ``p``, the move ``span @ p`` of the
        profile ``knots`` (``span``: (knots, P)), with the linear coefficients solved for each
        ``p`` (variable projection)."""
        slopes = np.diff(knots) / dv
        cdf = partial_volume_share(unit(frame.cc - float(np.mean(slopes)) * frame.ap), ijk_to_ras)
        scale = direction / np.sqrt(1.0 + slopes[segment] ** 2)
        moves = scale[:, None] * (basis @ span)  # d depth / d p, (N, P)
        cache = {}

        def parts(p):
            key = p.tobytes()
            if key not in cache:
                cache.clear()
                depth = scale * (basis @ (knots + span @ p) - w)
                inside = cdf(depth)
                plate = inside - cdf(depth - cortex_mm)
                columns, target = _tissue_model(values, inside, plate, plate_hu, disc_hu)
                design = np.stack(columns, axis=1)
                gram = design.T @ design
                solvable = np.linalg.cond(gram) < 1e12
                coef = np.linalg.solve(gram, design.T @ target) if solvable else np.zeros(len(gram))
                cache[key] = depth, design, gram, solvable, coef, target - design @ coef
            return cache[key]

        def residual_vector(p):
            return parts(p)[-1]

        def jacobian(p):
            # Variable projection with Kaufman's approximation: the derivative of the residual
            # with the linear coefficients held, projected off the design's columns.
            depth, design, gram, solvable, coef, _ = parts(p)
            d_inside = _box_density(cdf, depth)
            d_plate = d_inside - _box_density(cdf, depth - cortex_mm)
            if free:  # HU = a + b·inside + c·plate
                inside_weight, plate_weight = coef[-2], coef[-1]
            else:  # HU = a·(1 - inside) + t·(inside - plate) + plate_hu·plate
                disc = disc_hu if disc_fixed else coef[0]
                inside_weight, plate_weight = coef[-1] - disc, plate_hu - coef[-1]
            jac = -(inside_weight * d_inside + plate_weight * d_plate)[:, None] * moves
            if solvable:
                jac -= design @ np.linalg.solve(gram, design.T @ jac)
            return jac

        return residual_vector, jacobian

    def polish(knots, rss, disc, directions, centre):
        """Least-squares refinement of ``knots`` within the span of ``directions`` (the line
        searches' grid result is the start): the knots are correlated, and line searches along
        fixed directions converge slowly (on an upright 3 mm phantom two sweeps left a flat
        endplate bent by 0.9 mm). Kept only when it lowers the residual and stays near the mask."""
        if not np.isfinite(rss):
            return knots, rss, disc
        span = np.stack(directions, axis=1)
        residual_vector, jacobian = projected(knots, span)
        fit = optimize.least_squares(residual_vector, np.zeros(span.shape[1]), jac=jacobian, x_scale=0.1,
                                     xtol=1e-4, max_nfev=60)
        polished = knots + span @ fit.x
        if not in_window(polished, centre)[0]:
            return knots, rss, disc
        result = evaluated(polished)
        return result if result[1] < rss else (knots, rss, disc)

    def knot_sd(knots, directions, centre) -> np.ndarray:
        """Standard deviation (mm) of each knot of the fitted profile ``knots`` from the noise of the
        voxel values: the least-squares covariance ``s² (JᵀJ)⁻¹`` of the moves along
        ``directions``, with ``s²`` the residual variance, mapped to the knots; with ``thorough``
        at least :func:`profile_sd` (within ``search`` of ``centre``, where the fit looked). Inf
        where the data do not determine the profile."""
        span = np.stack(directions, axis=1)
        residual_vector, jacobian = projected(knots, span)
        p0 = np.zeros(span.shape[1])
        residual, jac = residual_vector(p0), jacobian(p0)
        linear = 1 + (not disc_fixed) + free  # the tissue model's coefficients (_tissue_model)
        dof = len(residual) - span.shape[1] - linear
        normal = jac.T @ jac
        if dof <= 0 or np.linalg.cond(normal) > 1e12:
            return np.full(len(knots), np.inf)
        variance = residual @ residual / dof
        covariance = span @ np.linalg.inv(normal) @ span.T * variance
        sd = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        if thorough:
            sd = np.maximum(sd, profile_sd(knots, len(directions) > 2, variance, centre))
        return sd

    def profile_sd(knots, bent, variance, centre) -> np.ndarray:
        """Per knot, the spread (mm) of the residual's relative likelihood
        ``exp(-(rss - rss_min) / 2σ²)`` along a shift and a tilt of the whole endplate and, when
        ``bent``, moves of each knot alone: the root mean square of the move over a grid of
        :data:`PROFILE_STEP_MM`, as far as the fit looked (``search`` around ``centre``). Unlike
        the covariance (the residual's curvature at its optimum) it sees a residual made bumpy by
        the noise across a thick slice, where the fit jumps between nearby minima from one noise
        draw to the next."""
        steps = np.arange(1, int(search / PROFILE_STEP_MM) + 1) * PROFILE_STEP_MM
        steps = np.concatenate([-steps[::-1], [0.0], steps])
        moves = [shift, tilt] + (list(np.eye(len(knots))) if bent else [])
        sd = np.zeros(len(knots))
        for move in moves:
            candidates = knots[None, :] + steps[:, None] * move[None, :]
            surfaces = (basis @ knots)[None, :] + steps[:, None] * (basis @ move)[None, :]
            rss, _ = residuals(surfaces, knots)
            rss[~in_window(candidates, centre)] = np.inf
            finite = np.isfinite(rss)
            if not finite[len(steps) // 2]:
                continue
            likelihood = np.exp(-(rss[finite] - rss[finite].min()) / (2.0 * variance))
            spread = float(np.sqrt(np.sum(likelihood * steps[finite] ** 2) / np.sum(likelihood)))
            sd = np.maximum(sd, spread * np.abs(move))
        return sd

    # The straight endplate is searched near the straight line closest to the mask's endplate
    # (bent by up to a voxel at thick slices), the bent one near the mask's endplate itself.
    shift, tilt = np.ones(len(kv)), _tilt_shape(kv, kv)
    line = np.stack([shift, tilt], axis=1)
    guess_line = line @ np.linalg.lstsq(line, guess, rcond=None)[0]
    knot_moves = list(np.eye(len(kv)))
    # With ``thorough`` (thick slices: few voxels, rough residuals) the straight endplate is searched
    # on the whole grid of shifts and tilts within its window, and the bent one also from the
    # straight fit, with THOROUGH_BENT_SWEEPS sweeps: line searches from the mask's endplate stalled
    # in local minima there (a noise-free 3 mm phantom lost 0.6 mm; one sweep left a 30 % biconcave
    # endplate 2.2 mm short of its posterior rim). The grid's corners (a full shift plus a full
    # tilt) reach twice as far at the end knots: left in, they tilted a flat endplate by 3.3 mm at
    # 20 HU noise (3 mm attenuation phantom, T7), and the fit outside its window lost the
    # likelihood profile behind its SD (0.08 mm reported).
    if thorough:
        grid = (guess_line[None, None, :] + offsets[:, None, None] * shift[None, None, :]
                + offsets[None, :, None] * tilt[None, None, :]).reshape(-1, len(kv))
        grid = grid[in_window(grid, guess_line)]  # holds guess_line itself (no shift, no tilt)
        residual, _ = residuals(grid @ basis.T, guess_line)
        straight_start = evaluated(grid[int(np.argmin(residual))]) if np.isfinite(residual).any() else None
    if not thorough or straight_start is None:
        straight_start = line_searches(guess_line, [shift, tilt], guess_line)
    straight, rss_straight, disc_straight = polish(*straight_start, [shift, tilt], guess_line)
    if straight_only:
        rss_bent = np.inf
    else:
        bent_sweeps = THOROUGH_BENT_SWEEPS if thorough else sweeps
        bent_start, _, _ = line_searches(guess.copy(), [shift, tilt], guess)
        bent, rss_bent, disc_bent = polish(*line_searches(bent_start, knot_moves, guess, bent_sweeps), knot_moves,
                                           guess)
        if thorough and np.isfinite(rss_straight):
            other = polish(*line_searches(straight.copy(), knot_moves, guess, bent_sweeps), knot_moves, guess)
            if other[1] < rss_bent:
                bent, rss_bent, disc_bent = other
    n = len(values)
    extra = len(kv) - 2  # parameters the bent profile has beyond the straight one
    evidence = max(extra * np.log(n), float(stats.chi2.isf(BEND_FALSE_ALARM, extra)))
    min_bend = MIN_BEND_VOXELS * voxel_extent_along(frame.cc, ijk_to_ras)
    bend_is_real = np.isfinite(rss_bent) and (
        not np.isfinite(rss_straight)
        or (n * np.log(max(rss_straight, 1e-9) / max(rss_bent, 1e-9)) > evidence
            and np.max(np.abs(bent - straight)) >= min_bend))
    if bend_is_real:
        knots, disc, sd = bent, disc_bent, knot_sd(bent, knot_moves, guess)  # refined below: the whole profile's SD
        if local_half is not None and not free:
            # A bent endplate (a biconcave fracture) is only approximately piecewise linear: each
            # height is refined on the voxels near its position, with the profile's disc HU, the
            # plate's HU and the local slope fixed.
            slopes = np.diff(knots) / dv
            local_slopes = [slopes[0]] + [0.5 * (a + b) for a, b in zip(slopes[:-1], slopes[1:])] + [slopes[-1]]
            refined = knots.copy()
            steps = np.arange(-1.0, 1.0 + 1e-9, 0.05)
            for k, slope in enumerate(local_slopes):
                near = np.abs(v - kv[k]) <= local_half
                if np.count_nonzero(near) < 8:
                    continue
                cdf = partial_volume_share(unit(frame.cc - slope * frame.ap), ijk_to_ras)
                surface = knots[k] + steps[:, None] + slope * (v[near] - kv[k])[None, :]
                depth = direction * (surface - w[near][None, :]) / np.sqrt(1.0 + slope * slope)
                inside = cdf(depth)
                plate = inside - cdf(depth - cortex_mm)
                _, residual = _solve_linear(*_tissue_model(values[near][None, :], inside, plate, plate_hu, disc))
                if np.isfinite(residual).any():
                    refined[k] = knots[k] + _parabolic_minimum(steps, residual)
            knots = refined
    elif np.isfinite(rss_straight):
        knots, disc, sd = straight, disc_straight, knot_sd(straight, [shift, tilt], guess_line)
    else:
        return None
    result, result_sd = np.empty(len(measured_v)), np.empty(len(measured_v))
    result[order], result_sd[order] = knots[0::2], sd[0::2]
    if halfway:
        return result, disc, result_sd, knots[1::2].copy()
    return result, disc, result_sd


class _BodyMeasurement:
    """Measurement of one vertebral body in two steps: the geometry (body, depth, the band's voxels)
    when made, then the heights in :meth:`finish` with the exam's endplate plate HU."""

    def __init__(self, vertebra: _Vertebra, frame: VertebraFrame, sample: _CropSampler, labels_crop: np.ndarray,
                 ct_crop: np.ndarray | None, ijk_to_ras: np.ndarray, cortex_mm: float):
        self.vertebra, self.frame, self.sample = vertebra, frame, sample
        self.ijk_to_ras, self.cortex_mm, self.has_ct = ijk_to_ras, cortex_mm, ct_crop is not None
        body_cut = _body_cut(vertebra)
        # A mask off its bone (flag mask_off_bone) gives the mask's heights, not the bone's: never graded.
        result = VertebraHeights(vertebra.level, vertebra.label,
                                 complete=not body_cut and "mask_off_bone" not in vertebra.flags, frame=frame,
                                 flags=list(vertebra.flags))
        if body_cut:
            result.flags.append("touches_field_of_view_edge")
        self.result = result
        result.body_volume_ml = float(vertebra.body.sum()) * voxel_volume_ml(ijk_to_ras)
        self.s_w = s_w = voxel_extent_along(frame.cc, ijk_to_ras)
        # Local coordinates only around the body (the endplate fits look up to 2 s_w + 1.5 mm beyond).
        reach = np.ceil((2.5 * s_w + 3.0) / voxel_spacing(ijk_to_ras)).astype(int)[::-1]  # (k, j, i)
        box = mask_box(vertebra.body)
        box = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(box, reach, vertebra.body.shape))
        box_to_ras = np.linalg.inv(sample.ras_to_crop)
        box_to_ras[:3, 3] += box_to_ras[:3, :3] @ np.array([box[2].start, box[1].start, box[0].start], dtype=float)
        body = vertebra.body[box]
        grid = _local_grid(frame, box_to_ras, body.shape)
        local = grid[body].astype(float)
        self.s_v = s_v = voxel_extent_along(frame.ap, ijk_to_ras)
        s_u = voxel_extent_along(frame.lr, ijk_to_ras)
        result.voxel_extent_mm = (float(s_u), float(s_v), float(s_w))
        fine = 0.2
        u_lo, u_hi = np.percentile(local[:, 0], [0.5, 99.5])
        width = u_hi - u_lo + s_u
        self.u_mid = u_mid = 0.5 * (u_lo + u_hi)
        self.w_lo, self.w_hi = w_lo, w_hi = local[:, 2].min(), local[:, 2].max()
        v_lo, v_hi = local[:, 1].min(), local[:, 1].max()
        self.band = band = max(CENTRAL_BAND * width, 1.0)
        self.us = u_mid + np.linspace(-band, band, 7)
        self.body_f = body_f = vertebra.body.astype(np.float32)  # whole crop: the sampler's frame

        # Depth: per row of the height (rims excluded), the walls are where the occupancy averaged
        # over the mid-sagittal lines crosses one half. The posterior wall is the median row's; the
        # anterior wall the 85th percentile's, because a wedge fracture leaves the anterior wall
        # only in the lowest rows (a few rows at least survive up to a 70 % wedge).
        vs = np.arange(v_lo - 2 * s_v, v_hi + 2 * s_v, fine)
        rim = min(s_w, 0.2 * (w_hi - w_lo))
        ws = np.linspace(w_lo + rim, w_hi - rim, 15)
        depth_us = u_mid + np.linspace(-1.0, 1.0, 3) * max(0.05 * width, 1.0)
        uu, vv, ww = np.meshgrid(depth_us, vs, ws, indexing="ij")
        occupancy = sample(body_f, frame.to_ras(np.stack([uu.ravel(), vv.ravel(), ww.ravel()], axis=1)))
        rows = occupancy.reshape(uu.shape).mean(axis=0).T  # (w rows, v)
        rows = rows[rows.max(axis=1) >= 0.5]
        centres = np.argmax(rows, axis=1)
        anterior, posterior = _crossings(rows, vs, centres, +1), _crossings(rows, vs, centres, -1)
        self.v_ant = float(np.nanpercentile(anterior, 85)) if len(rows) else float("nan")
        self.v_post = float(np.nanmedian(posterior)) if len(rows) else float("nan")
        result.width_mm = float(width)
        result.depth_mm = float(self.v_ant - self.v_post)
        self.ws = np.arange(w_lo - 2.5 * s_w - 3.0, w_hi + 2.5 * s_w + 3.0, fine)
        if ct_crop is not None:
            # Voxels of the central band only (all fits look there), with their local coordinates.
            in_band = np.abs(grid[..., 0] - u_mid) <= band + 1e-3
            self.voxel_local = grid[in_band]  # float32: ample for mm, half the memory of 17 bodies' voxels
            self.ct_flat = ct_crop[box][in_band]
            self.other_body_flat = np.isin(labels_crop[box][in_band], (0, vertebra.label), invert=True)
        self.mask_endplates()
        self.body_f = None  # the crop-sized occupancy map is not needed any more

    def wall_plate_hu(self) -> float | None:
        """The cortical plate's HU fitted on this body's anterior and posterior walls."""
        if not self.has_ct:
            return None
        return _wall_plate_hu(self.ct_flat, self.voxel_local, self.frame, self.ijk_to_ras, self.u_mid,
                              self.band, self.v_ant, self.v_post, self.w_lo, self.w_hi, self.s_v, self.cortex_mm)

    def mask_endplates(self) -> None:
        """The mask's endplates at each measurement position (median over the bundle of lines):
        ``knots_v`` (3,) and ``edges`` (3, 2: superior, inferior), the starting point of the fits."""
        result, frame, sample = self.result, self.frame, self.sample
        knots_v, mask_edges = [], []
        for fraction in (*AP_FRACTIONS.values(), *HALFWAY_FRACTIONS):
            v_f = self.v_ant - fraction * (self.v_ant - self.v_post)
            vs_f = v_f + np.array([-0.025, 0.0, 0.025]) * result.depth_mm
            uu, vv, ww = np.meshgrid(self.us, vs_f, self.ws, indexing="ij")
            occ = sample(self.body_f, frame.to_ras(np.stack([uu.ravel(), vv.ravel(), ww.ravel()], axis=1)))
            knots_v.append(v_f)
            mask_edges.append(_mask_edges(occ.reshape(-1, len(self.ws)), self.ws))
        n = len(AP_FRACTIONS)
        self.knots_v, self.mask_edges = np.array(knots_v[:n]), np.array(mask_edges[:n])
        self.halfway_v, self.halfway_mask_edges = np.array(knots_v[n:]), np.array(mask_edges[n:])
        self.forget_fits()

    def fit_endplates(self, plate_hu: float | None, disc_hu: float | None = None,
                      straight_only: bool = False) -> list[tuple[int, float]]:
        """Fit the endplates not fitted yet on the CT (:func:`_fit_endplate_profile`; straight
        ones only with ``straight_only``). An endplate whose disc is not seen beyond it (a thin
        disc at thick slices, the field of view) is fitted only when ``disc_hu`` is given: the
        exam's disc HU, or NaN when none is known (then the fit finds it). Returns
        ``(direction, disc HU)`` of the fits made with the disc in view (direction +1 superior,
        -1 inferior)."""
        discs = []
        if not self.has_ct or not np.all(np.isfinite(self.mask_edges)):
            return discs
        for side, direction in enumerate((+1, -1)):
            if self.fitted[side]:
                continue
            fit = self._fit_profile(direction, self.mask_edges[:, side], plate_hu, disc_hu, straight_only)
            if fit is not None:
                edges, disc, sd, halfway = fit
                self.edges[:, side], self.edge_sd[:, side] = _with_mask_endplate(
                    edges, sd, self.mask_edges[:, side], MASK_ENDPLATE_SD_VOXELS * self.s_w)
                # The halfway knots move with the combination's shift of their two neighbours.
                order = np.argsort(self.knots_v)
                shift = (self.edges[:, side] - edges)[order]
                self.halfway_edges[:, side] = halfway + np.interp(self.halfway_v, self.knots_v[order], shift)
                self.fitted[side] = True
                if disc_hu is None:
                    discs.append((direction, disc))
        return discs

    def finish(self) -> VertebraHeights:
        """Heights Ha, Hm, Hp and their lines from the endplates found."""
        result, frame = self.result, self.frame
        for (key, v_f), (top, bottom), (sd_top, sd_bottom) in zip(zip(AP_FRACTIONS, self.knots_v), self.edges,
                                                                   self.edge_sd):
            if not np.isfinite(top - bottom):
                continue
            if top - bottom <= 0.0:
                # The superior endplate found at or below the inferior one (a body cut by the field
                # of view, a broken mask): that is no height, so none is reported, not a negative one.
                if "endplates_cross" not in result.flags:
                    result.flags.append("endplates_cross")
                continue
            setattr(result, f"{key}_mm", float(top - bottom))
            setattr(result, f"{key}_sd_mm", float(np.hypot(sd_top, sd_bottom)))
            result.height_lines_ras[key] = (frame.to_ras(np.array([[self.u_mid, v_f, top]]))[0],
                                           frame.to_ras(np.array([[self.u_mid, v_f, bottom]]))[0])
        fitted = sum(self.fitted)
        result.endplate_method = "ct" if fitted == 2 else ("mixed" if fitted else "mask")
        if self.has_ct and result.endplate_method != "ct":
            result.flags.append("endplate_from_mask")
        if fitted == 2 and not max(result.ha_sd_mm, result.hm_sd_mm, result.hp_sd_mm) <= IMPRECISE_HEIGHT_SD_MM:
            result.flags.append("imprecise_heights")
        result.axis_point_ras, result.axis_point_from_ct = self.axis_point()
        self.profile()
        _check_plausible(result)
        return result

    def profile(self) -> None:
        """The height profile, the deepest point of the middle region, the sagittal area, the
        endplates' depressions and outline, from the two endplate profiles: natural cubic splines
        through their five knots (the measurement positions and halfway between), the curve the
        CT fit itself uses."""
        from scipy.interpolate import CubicSpline

        result = self.result
        v = np.concatenate([self.knots_v, self.halfway_v])
        edges = np.concatenate([self.edges, self.halfway_edges])
        if not np.all(np.isfinite(edges)) or not np.all(edges[:, 0] > edges[:, 1]):
            return
        order = np.argsort(v)
        top, bottom = (CubicSpline(v[order], edges[order, side], bc_type="natural") for side in (0, 1))
        depth = self.v_ant - self.v_post
        v_of = lambda fraction: self.v_ant - np.asarray(fraction) * depth  # noqa: E731
        heights = top(v_of(PROFILE_FRACTIONS)) - bottom(v_of(PROFILE_FRACTIONS))
        result.height_profile_mm = tuple(float(h) for h in heights)
        fine = np.linspace(*MIDDLE_REGION, 101)
        v_fine = v_of(fine)
        top_fine, bottom_fine = top(v_fine), bottom(v_fine)
        middle = top_fine - bottom_fine
        deepest = int(np.argmin(middle))
        result.hm_min_mm, result.hm_min_fraction = float(middle[deepest]), float(fine[deepest])
        span = np.linspace(AP_FRACTIONS["ha"], AP_FRACTIONS["hp"], 141)
        along = top(v_of(span)) - bottom(v_of(span))
        result.sagittal_area_mm2 = float((along.sum() - 0.5 * (along[0] + along[-1])) * (span[1] - span[0]) * depth)
        v_a, v_p = v_of(AP_FRACTIONS["ha"]), v_of(AP_FRACTIONS["hp"])
        chord_t = np.interp(v_fine, [v_p, v_a], [top(v_p), top(v_a)])
        chord_b = np.interp(v_fine, [v_p, v_a], [bottom(v_p), bottom(v_a)])
        result.endplate_depression_mm = (float(np.max(chord_t - top_fine)), float(np.max(bottom_fine - chord_b)))
        points = v_of(PROFILE_FRACTIONS)
        u = np.full_like(points, self.u_mid)
        result.endplate_outline_ras = {
            "superior": self.frame.to_ras(np.stack([u, points, top(points)], axis=1)),
            "inferior": self.frame.to_ras(np.stack([u, points, bottom(points)], axis=1))}

    def axis_point(self) -> tuple[np.ndarray | None, bool]:
        """The body's middle on the spine's centre line (see :attr:`VertebraHeights.axis_point_ras`)
        and whether the CT placed it.

        The mask's walls are off by up to half an in-plane voxel, the same on every row of an
        upright body (on the 3 mm phantoms the Hm line's midpoint lay up to 1.1 mm from the true
        one, 0.37 mm median). Each wall is fitted here like an endplate (:func:`_fit_endplate`:
        disc for the soft tissue outside, cortical plate, trabecular bone inside) on the voxels
        within :data:`AXIS_POINT_BAND_MM` of the mid-sagittal plane and the middle two fifths of
        its own height line (Ha for the anterior wall, Hp for the posterior one, so that a wedge's
        low anterior wall is still met). On the attenuation phantoms (noise-free) the point lies
        0.03–0.13 mm (median) from the true one at 3 mm voxels, 0.00 mm at 1 mm and 0.7x0.7x3 mm."""
        (ha_top, ha_bottom), (hm_top, hm_bottom), (hp_top, hp_bottom) = self.edges  # local w, rows as AP_FRACTIONS
        if not np.isfinite(hm_top - hm_bottom):
            return None, False
        w_mid = 0.5 * (hm_top + hm_bottom)
        midpoint = self.frame.to_ras(np.array([[self.u_mid, self.knots_v[1], w_mid]]))[0]
        if not self.has_ct or not np.isfinite(ha_top - ha_bottom + hp_top - hp_bottom):
            return midpoint, False
        band = max(AXIS_POINT_BAND_MM, 0.5 * self.result.voxel_extent_mm[0])
        walls = [_fit_wall(self.ct_flat, self.voxel_local, self.frame, self.ijk_to_ras, direction, edge, self.u_mid, band,
                           0.5 * (top + bottom), 0.2 * abs(top - bottom), self.s_v, self.cortex_mm, slopes=(0.0,))[0]
                 for direction, edge, top, bottom in ((+1, self.v_ant, ha_top, ha_bottom),
                                                      (-1, self.v_post, hp_top, hp_bottom))]
        if not np.all(np.isfinite(walls)):
            return midpoint, False
        return self.frame.to_ras(np.array([[0.0, 0.5 * (walls[0] + walls[1]), w_mid]]))[0], True

    def forget_fits(self) -> None:
        """Back to the mask's endplates, before fitting again with another plate HU."""
        self.edges = self.mask_edges.copy()
        self.halfway_edges = self.halfway_mask_edges.copy()
        self.edge_sd = np.full_like(self.mask_edges, np.nan)  # unknown for the mask's endplates
        self.fitted = [False, False]

    def plate_hu_profiles(self, plate_hus: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Per endplate whose disc is seen: its residual sum of squares (HU²) as a function of the
        cortical plate's HU (one value per entry of ``plate_hus``) and its voxel count. For each
        plate HU the endplate moves to its best fit (:func:`_plate_hu_residuals`): shifted along
        its axis from the mask's profile, or shifted and tilted from its fit."""
        if not self.has_ct or not np.all(np.isfinite(self.mask_edges)):
            return []
        profiles = []
        for side, direction in enumerate((+1, -1)):
            window, disc_seen = self._endplate_window(direction, self.mask_edges[:, side])
            count = int(np.count_nonzero(window))
            if not disc_seen or count < 8:
                continue
            rss = _plate_hu_residuals(self.ct_flat[window], self.voxel_local[window], direction, self.knots_v,
                                      self.edges[:, side], self.frame, self.ijk_to_ras, self.cortex_mm,
                                      (REFIT_REACH_MM if self.fitted[side] else 0.5 * self.s_w + 0.8), plate_hus,
                                      tilt_search=REFIT_REACH_MM if self.fitted[side] else 0.0)
            if np.all(np.isfinite(rss)):
                profiles.append((rss, count))
        return profiles

    def _endplate_window(self, direction: int, mask_edges: np.ndarray) -> tuple[np.ndarray, bool]:
        """The central band's voxels around one endplate (a boolean over ``voxel_local``) and
        whether the disc is seen beyond it."""
        local, s_w, knots_v = self.voxel_local, self.s_w, self.knots_v
        clear = 0.5 * self.s_v + self.cortex_mm + 0.5  # keep off the anterior and posterior walls' cortex
        near = ((np.abs(local[:, 0] - self.u_mid) <= self.band) & (local[:, 1] <= self.v_ant - clear)
                & (local[:, 1] >= self.v_post + clear))
        order = np.argsort(knots_v)
        mask_w = np.interp(local[:, 1], knots_v[order], mask_edges[order])
        w_rel = direction * (local[:, 2] - mask_w)  # mm beyond the mask's endplate
        reach = 2.0 * s_w + 1.5
        limit = _outer_limits(local[:, 1], w_rel, near & self.other_body_flat, reach, self.s_v)
        window = near & (w_rel >= -reach) & (w_rel <= limit - 0.5 * s_w)
        # The disc must be seen beyond the endplate, or its intensity and the endplate's position
        # cannot be told apart: then the exam's disc HU is needed.
        outside = np.count_nonzero(window & (w_rel > 0.5 * s_w))
        return window, bool(outside >= max(4, 0.1 * np.count_nonzero(window)))

    def _fit_profile(self, direction: int, mask_edges: np.ndarray, plate_hu: float | None,
                     disc_hu: float | None,
                     straight_only: bool = False) -> tuple[np.ndarray, float, np.ndarray] | None:
        """One endplate's outer surface at the measurement positions, the disc HU and the surface's
        SD from the noise, fitted on the voxels of the central band around it; None when the disc
        is not seen and ``disc_hu`` is None, or when the fit fails. ``disc_hu`` fixes the disc HU
        only where the disc is not seen (NaN: fitted there too)."""
        window, disc_seen = self._endplate_window(direction, mask_edges)
        if not disc_seen and disc_hu is None:
            return None
        if disc_seen or np.isnan(disc_hu):  # NaN: the exam has no disc HU, fit it here too
            disc_hu = None
        local, s_w, knots_v = self.voxel_local, self.s_w, self.knots_v
        return _fit_endplate_profile(self.ct_flat[window], local[window], direction, knots_v, mask_edges, self.frame,
                                     self.ijk_to_ras, self.cortex_mm, 0.5 * s_w + 0.8, plate_hu, disc_hu,
                                     local_half=max(0.05 * self.result.depth_mm, self.s_v)
                                     if s_w <= THICK_VOXEL_MM else None, straight_only=straight_only,
                                     thorough=s_w > THICK_VOXEL_MM, halfway=True)


def _with_mask_endplate(fitted: np.ndarray, fitted_sd: np.ndarray, mask: np.ndarray,
                        mask_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance combination of an endplate fitted on the CT (``fitted``, its SD from the
    noise ``fitted_sd``; 0: exact, inf or NaN: undetermined) with the mask's (``mask``, SD
    ``mask_sd``), per knot (mm). Returns the combined endplate and its SD."""
    fitted_sd = np.where(np.isnan(fitted_sd), np.inf, fitted_sd)
    exact = fitted_sd == 0.0
    with np.errstate(divide="ignore"):
        weight = np.where(exact, 0.0, 1.0 / fitted_sd ** 2)
    mask_weight = 1.0 / mask_sd ** 2
    combined = (weight * fitted + mask_weight * mask) / (weight + mask_weight)
    combined_sd = 1.0 / np.sqrt(weight + mask_weight)
    return np.where(exact, fitted, combined), np.where(exact, 0.0, combined_sd)


def _plate_hu_residuals(values: np.ndarray, local: np.ndarray, direction: int, knots_v: np.ndarray,
                        knots: np.ndarray, frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float,
                        search: float, plate_hus: np.ndarray, tilt_search: float = 0.0) -> np.ndarray:
    """Residual sum of squares of one endplate's partial-volume model (see
    :func:`_fit_endplate_profile`, disc and trabecular HU free) for each plate HU in
    ``plate_hus``, minimised over shifts of the profile ``knots`` (w at ``knots_v``) within
    ``search`` mm and tilts moving its end knots by up to ``tilt_search`` mm (0.1 mm steps).
    Returns an array like ``plate_hus``.

    The plate's HU ``P`` enters the model linearly, so one set of sums per shift gives the
    residual of every ``P``: for ``y' = y - P·plate`` the 2x2 normal equations of
    ``a·(1 - inside) + t·(inside - plate)``."""
    order = np.argsort(knots_v)
    kv, kw = np.asarray(knots_v, dtype=float)[order], np.asarray(knots, dtype=float)[order]
    v, w = local[:, 1], local[:, 2]
    slopes = np.diff(kw) / np.diff(kv)
    segment = np.clip(np.searchsorted(kv, v) - 1, 0, len(kv) - 2)
    cdf = partial_volume_share(unit(frame.cc - float(np.mean(slopes)) * frame.ap), ijk_to_ras)
    steps = np.arange(-search, search + 1e-9, 0.1)
    tilts = np.arange(-tilt_search, tilt_search + 1e-9, 0.1) if tilt_search > 0 else np.zeros(1)
    moves = (steps[:, None, None] + tilts[None, :, None] * _tilt_shape(kv, v)[None, None, :]).reshape(-1, len(v))
    surface = _natural_spline_basis(kv, v) @ kw
    depth = (direction / np.sqrt(1.0 + slopes[segment] ** 2)) * (surface[None, :] + moves - w[None, :])
    inside = cdf(depth)
    plate = inside - cdf(depth - cortex_mm)
    disc, bone = 1.0 - inside, inside - plate
    y = values.astype(float)
    s_dd, s_db, s_bb = (disc * disc).sum(axis=1), (disc * bone).sum(axis=1), (bone * bone).sum(axis=1)
    s_dp, s_bp, s_pp = (disc * plate).sum(axis=1), (bone * plate).sum(axis=1), (plate * plate).sum(axis=1)
    s_dy, s_by, s_py, s_yy = disc @ y, bone @ y, plate @ y, y @ y
    P = np.asarray(plate_hus, dtype=float)[None, :]
    # y' = y - P·plate, per shift (rows) and plate HU (columns)
    t_d = s_dy[:, None] - P * s_dp[:, None]
    t_b = s_by[:, None] - P * s_bp[:, None]
    tt = s_yy - 2.0 * P * s_py[:, None] + P * P * s_pp[:, None]
    det = s_dd * s_bb - s_db * s_db
    ok = det > 1e-9 * np.maximum(s_dd * s_bb, 1e-12)
    det = np.where(ok, det, 1.0)[:, None]
    a = (s_bb[:, None] * t_d - s_db[:, None] * t_b) / det
    t = (s_dd[:, None] * t_b - s_db[:, None] * t_d) / det
    rss = tt - a * t_d - t * t_b
    rss[~ok] = np.inf
    return rss.min(axis=0)


def _mask_edges(occupancy: np.ndarray, ws: np.ndarray) -> tuple[float, float]:
    """Superior and inferior endplate of a bundle of cranio-caudal lines through the body mask
    (rows of ``occupancy`` sampled at ``ws``): where the occupancy crosses one half walking out
    from the body's centre (or from the line's nearest inside sample), median over the lines."""
    start = int(np.argmin(np.abs(ws)))
    inside = occupancy >= 0.5
    lines = inside.any(axis=1)
    if not lines.any():
        return float("nan"), float("nan")
    occupancy, inside = occupancy[lines], inside[lines]
    distance = np.where(inside, np.abs(np.arange(len(ws)) - start)[None, :], len(ws))
    starts = np.argmin(distance, axis=1)
    tops, bottoms = _crossings(occupancy, ws, starts, +1), _crossings(occupancy, ws, starts, -1)
    return float(np.nanmedian(tops)), float(np.nanmedian(bottoms))


def _outer_limits(v: np.ndarray, w_rel: np.ndarray, other: np.ndarray, reach: float, bin_mm: float) -> np.ndarray:
    """Per voxel, how far beyond the endplate (mm) a fit may look: ``reach``, but no further than
    halfway to the next vertebra in the same column (bins of ``bin_mm`` along ``v`` and their
    neighbours)."""
    bins = np.floor((v - v.min()) / bin_mm).astype(int)
    nearest = np.full(bins.max() + 3, np.inf)
    beyond = other & (w_rel > 0)
    np.minimum.at(nearest, bins[beyond] + 1, w_rel[beyond])
    nearest = np.minimum(np.minimum(nearest[:-2], nearest[1:-1]), nearest[2:])
    return np.minimum(reach, 0.5 * nearest[bins])


def _fit_wall(ct_flat, voxel_local, frame, ijk_to_ras, direction: int, edge: float, u_mid: float, band: float,
              w_centre: float, w_half: float, s_v: float, cortex_mm: float,
              slopes: np.ndarray = PLANE_SLOPES) -> tuple[float, float]:
    """The anterior (``direction`` +1) or posterior (-1) wall fitted like an endplate
    (:func:`_fit_endplate`, the wall's normal playing the cranio-caudal axis) on the voxels within
    ``band`` of ``u_mid``, ``w_half`` of ``w_centre`` and two voxels plus 1.5 mm of the mask's wall
    ``edge`` (local mm). Returns the wall's position ``v`` and the plate's HU (NaN when no fit)."""
    if not np.isfinite(edge):
        return float("nan"), float("nan")
    swapped = VertebraFrame(frame.centre, -frame.lr, frame.cc, frame.ap)  # wall normal plays "cc"
    rel = direction * (voxel_local[:, 1] - edge)
    reach = 2.0 * s_v + 1.5
    window = ((np.abs(voxel_local[:, 0] - u_mid) <= band) & (np.abs(voxel_local[:, 2] - w_centre) <= w_half)
              & (rel >= -reach) & (rel <= reach))
    local = voxel_local[window][:, [0, 2, 1]] * np.array([-1.0, 1.0, 1.0])
    wall, _, plate_hu = _fit_endplate(ct_flat[window], local, direction, edge, 0.0, 0.0, swapped, ijk_to_ras,
                                      cortex_mm, 0.5 * s_v + 0.3, slopes=slopes)
    return wall, plate_hu


def _wall_plate_hu(ct_flat, voxel_local, frame, ijk_to_ras, u_mid, band, v_ant, v_post, w_lo, w_hi, s_v,
                   cortex_mm) -> float | None:
    """HU of the cortical plate (for a plate of ``cortex_mm``) fitted on the anterior and
    posterior walls (:func:`_fit_wall`, the middle two fifths of the body's height), where the
    grid is usually finer than across the endplates. Median of the walls that give a fit; None
    when neither does."""
    plate_hus = [_fit_wall(ct_flat, voxel_local, frame, ijk_to_ras, direction, edge, u_mid, band, 0.5 * (w_lo + w_hi),
                           0.2 * (w_hi - w_lo), s_v, cortex_mm)[1]
                 for direction, edge in ((+1, v_ant), (-1, v_post))]
    plate_hus = [c for c in plate_hus if np.isfinite(c)]
    return float(np.median(plate_hus)) if plate_hus else None


def _check_plausible(result: VertebraHeights) -> None:
    reasons = []
    heights = [result.ha_mm, result.hm_mm, result.hp_mm]
    if not all(np.isfinite(heights)):
        reasons.append("heights_not_measurable")
    elif min(heights) < HEIGHT_LIMITS_MM[0] or max(heights) > HEIGHT_LIMITS_MM[1]:
        reasons.append("implausible_height")
    if not (DEPTH_LIMITS_MM[0] <= result.depth_mm <= DEPTH_LIMITS_MM[1]):
        reasons.append("implausible_depth")
    if result.body_volume_ml < MIN_BODY_VOLUME_ML:
        reasons.append("implausible_body_volume")
    if reasons:
        result.complete = False
        result.flags.extend(reasons)


def _set_body(vertebra: _Vertebra, body: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Store a vertebra's body mask with the centroids of the body and of the rest (posterior
    elements) in RAS."""
    vertebra.body = body
    vertebra.body_centroid = mask_centroid_ras(body, ijk_to_ras, vertebra.origin_ijk)
    rest = vertebra.mask & ~body
    vertebra.posterior_centroid = (mask_centroid_ras(rest, ijk_to_ras, vertebra.origin_ijk)
                                   if rest.sum() >= 10 else None)


REFIT_REACH_MM = 1.0
"""When the plate's HU is fitted again on fitted endplates, each may shift, and tilt its end
knots, by up to this much (mm): the first fits, made with a plate 10 % off, were off by up
to 0.9 mm."""

OUTLIER_MISFIT = 3.0
"""Endplates whose mean squared residual exceeds this multiple of the exam's median are not used
to fit the plate's HU."""

PLATE_HUS = np.arange(100.0, 2000.0 + 1e-9, 10.0)
"""Candidate HU of the endplates' cortical plate (of ``cortex_mm``)."""


def _exam_plate_hu(measurements: list["_BodyMeasurement"], walls: bool = True) -> float | None:
    """One HU of the endplates' cortical plate for the exam.

    The plate is a tissue of its own HU, the same at every level, not a contrast over the
    trabecular bone beside it: compact bone's density varies little along the spine, while the
    trabecular bone's falls from the thoracic to the lumbar spine and with osteoporosis (on the
    osteoporotic phantoms, trabecular 150 HU at T4 to 85 HU at L5 under a 700 HU cortex, one
    exam-wide contrast was 9–10 % off at the ends of the spine and moved thoracic endplates by
    up to 0.9 mm, or bent them by 2.7 mm at 3 mm voxels).

    Fitted jointly on the endplates whose disc is seen (:meth:`_BodyMeasurement.plate_hu_profiles`):
    the plate HU minimising their summed residual, each endplate at its own best position for
    each. An endplate whose plate lies within one slice cannot tell its plate's HU from its
    position (its residual is flat in it), but the endplates cut by a slice border, or oblique to
    the slices, can, and they decide. Endplates fitted much worse than the exam's
    median (:data:`OUTLIER_MISFIT`) are left out. The anterior and posterior walls are the
    fallback when the endplates give no minimum (``walls``): on the phantom suite the walls'
    curvature across the central band made them read about 9 % low, which moved endplates lying
    along 3 mm slices by up to 0.9 mm."""
    profiles = [p for m in measurements for p in m.plate_hu_profiles(PLATE_HUS)]
    if profiles:
        # Endplates the model fits badly (a fracture's depression fitted straight, a Schmorl's
        # node) are left out: their residual's trend in the plate's HU is the misfit's.
        misfit = np.array([rss.min() / count for rss, count in profiles])
        keep = misfit <= OUTLIER_MISFIT * np.median(misfit)
        total = np.sum([rss for (rss, _), k in zip(profiles, keep) if k], axis=0)
        index = int(np.argmin(total))
        if np.isfinite(total[index]) and 0 < index < len(total) - 1:
            return _parabolic_minimum(PLATE_HUS, total)
    if not walls:
        return None
    plate_hus = [c for c in (m.wall_plate_hu() for m in measurements) if c is not None]
    return float(np.median(plate_hus)) if plate_hus else None


def measure_heights(
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    convention: str = "totalsegmentator",
    body_labels: np.ndarray | None = None,
    ct: np.ndarray | None = None,
    levels: tuple[str, ...] | None = None,
    cortex_mm: float = ENDPLATE_CORTEX_MM,
    label_boxes: list | None = None,
    label_grid: tuple | None = None,
) -> list[VertebraHeights]:
    """Measure every vertebra of ``labels`` (cranial to caudal).

    ``labels``: vertebra label map ``[k, j, i]`` in ``convention``; ``body_labels``: optional
    ``vertebrae_body`` map on the same grid; ``ct``: optional CT in HU on the same grid (enables
    sub-voxel endplates); ``levels``: report only these (all present vertebrae still define the
    spine's centre line); ``label_boxes``: ``ndimage.find_objects(labels)`` when the caller has
    it already (one pass over a large volume fewer); ``label_grid``: the segmentation's own
    ``(ijk_to_ras, shape)`` when it was resampled onto this grid (where it ends, the field of view
    ends). Returns one :class:`VertebraHeights` per vertebra present.
    """
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    ids = lv.vertebra_ids(convention)
    by_label = {label: level for level, label in ids.items()}
    max_label = max(ids.values())
    if label_boxes is not None and len(label_boxes) >= max_label:
        objects = label_boxes[:max_label]
    else:
        objects = find_label_boxes(labels, max_label)
    spacing = voxel_spacing(ijk_to_ras)
    margin = np.ceil(CROP_MARGIN_MM / spacing).astype(int)  # (i, j, k)
    shape = labels.shape
    vertebrae: list[_Vertebra] = []
    for label, slices in enumerate(objects, start=1):
        if slices is None or label not in by_label:
            continue
        grown = tuple(slice(max(0, s.start - m), min(n, s.stop + m))
                      for s, m, n in zip(slices, margin[::-1], shape))
        crop = labels[grown]
        origin = np.array([grown[2].start, grown[1].start, grown[0].start], dtype=float)
        mask = crop == label
        edge = grid_edge_layer(grown, shape, ijk_to_ras, label_grid)
        touches = edge is not None and bool((mask & edge).any())
        vertebrae.append(_Vertebra(by_label[label], label, grown, origin, mask, edge if touches else None))
    vertebrae.sort(key=lambda v: lv.level_position(v.level))
    if not vertebrae:
        return []

    step = float(max(0.5, min(spacing)))
    samplers = [_CropSampler(ijk_to_ras, v.origin_ijk) for v in vertebrae]
    for v in vertebrae:
        v.centroid = mask_centroid_ras(v.mask, ijk_to_ras, v.origin_ijk)
    # Pass 1: frames from whole-vertebra centroids and patient-anterior; find the bodies.
    frames = _frames(vertebrae, [v.centroid for v in vertebrae], [None] * len(vertebrae))
    for v, frame, sample in zip(vertebrae, frames, samplers):
        body = None
        if body_labels is not None:
            body = v.mask & (body_labels[v.slices] == lv.BODY_LABEL)
            if body.sum() == 0:
                v.flags.append("no_body_in_vertebrae_body_map")
                body = None
        if body is None:
            body = _separate_body(v, frame, sample, step)
            if body is None or body.sum() == 0:
                body = v.mask.copy()
                v.flags.append("body_not_separated")
        _set_body(v, body, ijk_to_ras)
    # Passes 2–3: frames from body centroids, AP from the posterior elements to the body; bodies
    # found by shape are cut again in the refined frames. Where the field of view cuts a vertebra,
    # whether its body is cut (and so whether its centroid joins the centre line) can change with
    # the frame: the passes go on, up to MAX_FRAME_PASSES, until it no longer does.
    for index in range(MAX_FRAME_PASSES):
        body_cut = [_body_cut(v) for v in vertebrae]
        hints = _ap_hints(vertebrae, frames, ijk_to_ras)
        frames = _frames(vertebrae, [v.body_centroid for v in vertebrae], hints, body_cut)
        if body_labels is not None:
            break
        for v, frame, sample in zip(vertebrae, frames, samplers):
            if "body_not_separated" in v.flags:
                continue
            body = _separate_body(v, frame, sample, step)
            if body is not None and body.sum() > 0:
                _set_body(v, body, ijk_to_ras)
        if index >= 1 and [_body_cut(v) for v in vertebrae] == body_cut:
            break
    for v, frame, sample in zip(vertebrae, frames, samplers):
        v.flags += _cut_flags(v, frame, sample, ijk_to_ras)
        if ct is not None and bone_edge_contrast(v.mask, ct[v.slices], labels[v.slices],
                                                 spacing[::-1]) < MIN_BONE_EDGE_CONTRAST_HU:
            v.flags.append("mask_off_bone")
    measurements = [
        _BodyMeasurement(v, frame, sample, labels[v.slices], None if ct is None else ct[v.slices].astype(np.float32),
                         ijk_to_ras, cortex_mm)
        for v, frame, sample in zip(vertebrae, frames, samplers)
        if levels is None or v.level in levels
    ]
    # The endplates' cortical plate: one HU for the exam (:func:`_exam_plate_hu`), first on the
    # mask's endplate profiles, then, with thick voxels, again on straight endplates fitted with
    # it (each free to shift and tilt by REFIT_REACH_MM): at 3 mm slices the mask's profiles are
    # off by up to a voxel, which biased the plate's contrast over the bone 5–13 % low in the
    # first pass. At 1 mm the second pass changed no height of the phantom suite by more than
    # 0.04 mm and is skipped.
    plate_hu = _exam_plate_hu(measurements)
    thick = any(m.s_w > THICK_VOXEL_MM for m in measurements)
    if plate_hu is not None and thick:
        for m in measurements:
            m.fit_endplates(plate_hu, straight_only=True)
        refitted = _exam_plate_hu(measurements, walls=False)
        for m in measurements:
            m.forget_fits()
        plate_hu = refitted if refitted is not None else plate_hu
    # Endplates whose disc is seen first; then those behind a thin disc or at the field of view's
    # edge, with the exam's disc HU: the median of the first fits that face a segmented neighbour
    # across the disc. An end vertebra's outer endplate may face anything: in a phantom of T4–T8
    # at 0.7x0.7x3 mm, whose thin discs are not seen, the soft tissue beyond T4 and T8 set the
    # discs to 0 HU and moved their endplates by up to 1.3 mm. With no such fit the disc HU is
    # left free in each fit (there within 0.33 mm); on the benchmark suites this rule brought the
    # 3 mm heights' p90 from 0.39 to 0.31 mm.
    present = {v.level for v in vertebrae}
    facing = []
    for m in measurements:
        for direction, disc in m.fit_endplates(plate_hu):
            if lv.adjacent_level(m.vertebra.level, cranial=direction > 0) in present:
                facing.append(disc)
    exam_disc = float(np.median(facing)) if facing else float("nan")
    for m in measurements:
        m.fit_endplates(plate_hu, exam_disc)
    return [m.finish() for m in measurements]


MIN_BONE_EDGE_CONTRAST_HU = 120.0
"""A vertebra's mask must lie on bone: the median HU of its outermost voxels must exceed the
median HU of the unlabelled voxels 1–4 mm outside it by this much. As given, the masks of the
example CTs (3 mm; 1 x 1 x 2 mm with contrast) and of a VerSe CT (1 x 1 x 3 mm, osteoporotic)
give 163–382 HU; the same masks shifted by 10 to 50 mm along any axis at most 102 HU
(``docs/validation.md``)."""

BONE_EDGE_RING_MM = (1.0, 4.0)
"""Distances (mm) from the mask between which its surroundings are sampled: beyond the first
millimetre, so that a mask a voxel smaller than its bone (a segmentation made on a coarser grid)
is still compared with what lies outside the cortex, not with the cortex itself."""


def bone_edge_contrast(mask: np.ndarray, ct: np.ndarray, labels: np.ndarray, spacing_kji) -> float:
    """Median HU of the mask's outermost voxels minus the median HU of the unlabelled voxels
    :data:`BONE_EDGE_RING_MM` outside it (crop arrays ``[k, j, i]``, ``spacing_kji`` the voxel
    size in mm along them): how much brighter than its surroundings the mask's edge is, which a
    vertebra's cortex makes large and a mask shifted off its bone (another CT's segmentation, a
    misregistration) does not. NaN when either side has no voxel."""
    inner = mask & ~ndimage.binary_erosion(mask)
    near, far = BONE_EDGE_RING_MM
    reach = max(far, float(np.max(spacing_kji)))
    box = mask_box(mask)
    if box is None:
        return float("nan")
    # Distances only on the mask's box grown by more than ``reach``: every mask voxel lies inside
    # it, so they are the crop's there, and no voxel beyond it is within ``reach`` of the mask.
    grow = np.ceil(reach / np.asarray(spacing_kji, dtype=float)).astype(int) + 1
    near_box = tuple(slice(max(0, s.start - g), min(n, s.stop + g)) for s, g, n in zip(box, grow, mask.shape))
    distance = distance_transform_edt(~mask[near_box], sampling=spacing_kji)
    outer = np.zeros(mask.shape, dtype=bool)
    outer[near_box] = (distance > near) & (distance <= reach) & (labels[near_box] == 0)
    if not inner.any() or not outer.any():
        return float("nan")
    return float(np.median(ct[inner]) - np.median(ct[outer]))
