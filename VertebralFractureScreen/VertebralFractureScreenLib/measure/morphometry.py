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
     (:class:`.endplate_fit.EndplateProfileFit`): a profile ``w(v)`` over the whole depth, straight or a
     natural spline through its heights at the three positions and halfway between them, whose
     voxels are modelled by their exact partial volume of disc, a cortical plate of
     ``cortex_mm`` and trabecular bone. The plate's HU is fitted once per exam, jointly on
     the endplates (:func:`_exam_plate_hu`; the walls as a fallback); the disc's HU per
     endplate when the disc is seen beyond it, otherwise (a thin disc at thick slices) the median
     of the fits facing a neighbouring vertebra, or fitted there too when there are none; the
     profile, an average across the band, is then moved to the mid-sagittal plane by a lateral
     parabola fitted across the band (:meth:`.endplate_fit.EndplateProfileFit.lateral_offset`);
   * without the CT (or when no fit is possible), the endplate is where the body mask's
     interpolated occupancy crosses one half; the median over the bundle's lines is taken.

Completeness is decided per part. Where the field of view (the CT's grid, or the segmentation's
own grid when it was resampled onto the CT's) cuts a vertebra, the flags say which part:
``posterior_elements_cut`` (the arch, spinous or transverse processes), ``body_cut`` (a wall of
the body), ``endplate_cut_superior`` / ``endplate_cut_inferior`` (the body within 2 mm, or a
voxel, of that endplate). A vertebra whose body and endplates are whole is measured and graded
even when its posterior elements are cut: its body joins the spine's centre line, and its
antero-posterior direction comes from what is left of its posterior elements, balanced left to
right when the cut took one side (:func:`.frames.ap_hints`), or from its neighbours' when too
little is left. A vertebra whose body is cut (flagged ``touches_field_of_view_edge`` too) and one
with an implausible body are returned with ``complete = False``. A height whose superior endplate
was found at or below the inferior one is not reported (NaN, flag ``endplates_cross``), never as
a negative number.

This module runs the exam (:func:`measure_heights`) and fits what is shared by its vertebrae:
the cortical plate's HU and the disc's. The steps live in :mod:`.frames` (crops, frames, bodies,
the field of view's cuts), :mod:`.body` (one body's depth, endplates and heights, and
:class:`~.body.VertebraHeights`), :mod:`.endplate_fit` (one endplate's profile fitted on the CT)
and :mod:`.endplate_model` (the partial-volume model behind the fits).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import distance_transform_edt, mask_box, voxel_spacing
from .body import AP_FRACTIONS, MIDDLE_REGION, PROFILE_FRACTIONS, THICK_VOXEL_MM, BodyMeasurement, VertebraHeights
from .endplate_model import parabolic_minimum
from .frames import CropSampler, VertebraFrame, crop_vertebrae, cut_flags, frames_and_bodies

__all__ = [
    "AP_FRACTIONS", "ENDPLATE_CORTEX_MM", "MIDDLE_REGION", "MIN_BONE_EDGE_CONTRAST_HU", "PLATE_HUS",
    "PROFILE_FRACTIONS", "THICK_VOXEL_MM", "VertebraFrame", "VertebraHeights", "bone_edge_contrast",
    "measure_heights",
]
"""The morphometry's public names, some defined in :mod:`.body` and :mod:`.frames` and kept here
for the modules and users that import them from the morphometry."""

ENDPLATE_CORTEX_MM = 1.0
"""Assumed thickness of the endplates' cortical plate (mm); the outer surface is taken half of it
beyond the plate's centre. Reported endplate thickness is about 0.5–1.5 mm depending on level and
region; an error ``d`` here changes every height by ``d``, ratios hardly at all. Issue 30 measured
a thickness fitted per exam jointly with the plate's HU and a Gaussian PSF (on the fitted
endplates): 0.96–1.03 mm on the phantom suite's 1 mm plates, but anywhere from 0.4 to 1.0 mm on
the independently rendered spines (plates 0.6–0.85 mm, blurred by 0.45–0.9 mm and lined by
trabecular bone brightening towards them), whose residual is flat along a ridge of thickness
against blur; the images do not determine it, so the nominal 1 mm stays and its error is part of
the heights' SDs (:data:`.body.ENDPLATE_MODEL_SD_MM`)."""

OUTLIER_MISFIT = 3.0
"""Endplates whose mean squared residual exceeds this multiple of the exam's median are not used
to fit the plate's HU."""

PLATE_HUS = np.arange(100.0, 2000.0 + 1e-9, 10.0)
"""Candidate HU of the endplates' cortical plate (of ``cortex_mm``)."""


def _exam_plate_hu(measurements: list[BodyMeasurement], walls: bool = True) -> float | None:
    """One HU of the endplates' cortical plate for the exam.

    The plate is a tissue of its own HU, the same at every level, not a contrast over the
    trabecular bone beside it: compact bone's density varies little along the spine, while the
    trabecular bone's falls from the thoracic to the lumbar spine and with osteoporosis, so one
    exam-wide contrast would be off at the ends of the spine and move or bend their endplates.

    Fitted jointly on the endplates whose disc is seen (:meth:`.body.BodyMeasurement.plate_hu_profiles`):
    the plate HU minimising their summed residual (HU²), each endplate at its own best position
    for each. An endplate whose plate lies within one slice cannot tell its plate's HU from its
    position (its residual is flat in it), but the endplates cut by a slice border, or oblique to
    the slices, can, and they decide. Endplates fitted much worse than the exam's median
    (:data:`OUTLIER_MISFIT`) are left out. The anterior and posterior walls are the fallback when
    the endplates give no minimum (``walls``): the walls' curvature across the central band makes
    them read low, which moves endplates lying along thick slices."""
    profiles = [p for m in measurements for p in m.plate_hu_profiles(PLATE_HUS)]
    if profiles:
        # Endplates the model fits badly (a fracture's depression fitted straight, a Schmorl's
        # node) are left out: their residual's trend in the plate's HU is the misfit's.
        misfit = np.array([rss.min() / count for rss, count in profiles])
        keep = misfit <= OUTLIER_MISFIT * np.median(misfit)
        total = np.sum([rss for (rss, _), k in zip(profiles, keep) if k], axis=0)
        index = int(np.argmin(total))
        if np.isfinite(total[index]) and 0 < index < len(total) - 1:
            return parabolic_minimum(PLATE_HUS, total)
    if not walls:
        return None
    plate_hus = [c for c in (m.wall_plate_hu() for m in measurements) if c is not None]
    return float(np.median(plate_hus)) if plate_hus else None


def _refined_exam_plate_hu(measurements: list[BodyMeasurement]) -> float | None:
    """The exam's cortical plate HU (:func:`_exam_plate_hu`), first on the mask's endplate
    profiles, then, with thick voxels (:data:`.body.THICK_VOXEL_MM`), again on straight endplates
    fitted with it (each free to shift and tilt by :data:`.body.REFIT_REACH_MM`), the fits then
    forgotten: at thick slices the mask's profiles are off by up to a voxel, which biases the
    first pass's plate low; at thin ones the second pass changes little and is skipped."""
    plate_hu = _exam_plate_hu(measurements)
    thick = any(m.s_w > THICK_VOXEL_MM for m in measurements)
    if plate_hu is not None and thick:
        for m in measurements:
            m.fit_endplates(plate_hu, straight_only=True)
        refitted = _exam_plate_hu(measurements, walls=False)
        for m in measurements:
            m.forget_fits()
        plate_hu = refitted if refitted is not None else plate_hu
    return plate_hu


def _fit_exam_endplates(measurements: list[BodyMeasurement], present: set[str], plate_hu: float | None) -> None:
    """Fit every body's endplates on the CT with the exam's ``plate_hu``: those whose disc is seen
    first; then those behind a thin disc or at the field of view's edge, with the exam's disc HU:
    the median of the first fits that face a segmented neighbour (a level in ``present``) across
    the disc. An end vertebra's outer endplate may face anything (soft tissue), whose HU must not
    stand in for the discs'; with no such fit the disc HU is left free in each fit."""
    facing = []
    for m in measurements:
        for direction, disc in m.fit_endplates(plate_hu):
            if lv.adjacent_level(m.vertebra.level, cranial=direction > 0) in present:
                facing.append(disc)
    exam_disc = float(np.median(facing)) if facing else float("nan")
    for m in measurements:
        m.fit_endplates(plate_hu, exam_disc)


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
    vertebrae = crop_vertebrae(labels, ijk_to_ras, convention, label_boxes, label_grid)
    if not vertebrae:
        return []
    spacing = voxel_spacing(ijk_to_ras)
    samplers = [CropSampler(ijk_to_ras, v.origin_ijk) for v in vertebrae]
    frames = frames_and_bodies(vertebrae, samplers, ijk_to_ras, body_labels, float(max(0.5, min(spacing))))
    for v, frame, sample in zip(vertebrae, frames, samplers):
        v.flags += cut_flags(v, frame, sample, ijk_to_ras)
        if ct is not None and bone_edge_contrast(v.mask, ct[v.slices], labels[v.slices],
                                                 spacing[::-1]) < MIN_BONE_EDGE_CONTRAST_HU:
            v.flags.append("mask_off_bone")
    measurements = [
        BodyMeasurement(v, frame, sample, labels[v.slices], None if ct is None else ct[v.slices].astype(np.float32),
                        ijk_to_ras, cortex_mm)
        for v, frame, sample in zip(vertebrae, frames, samplers)
        if levels is None or v.level in levels
    ]
    plate_hu = _refined_exam_plate_hu(measurements)
    _fit_exam_endplates(measurements, {v.level for v in vertebrae}, plate_hu)
    return [m.finish() for m in measurements]


MIN_BONE_EDGE_CONTRAST_HU = 120.0
"""A vertebra's mask must lie on bone: the median HU of its outermost voxels (with thick voxels
their :data:`THICK_EDGE_PERCENTILE`-th percentile) must exceed the median HU of the unlabelled
voxels 1–4 mm outside it by this much. As given, the masks of the example CTs (3 mm; 1 x 1 x 2 mm
with contrast) and of a VerSe CT (1 x 1 x 3 mm, osteoporotic) give 163–382 HU; the same masks
shifted by 10 to 50 mm along any axis at most 102 HU (``docs/validation.md``)."""

THICK_EDGE_PERCENTILE = 60.0
"""With voxels thicker than :data:`.body.THICK_VOXEL_MM` along some axis, the mask's outermost
voxels are taken at this percentile rather than their median: a segmentation half a voxel too
large (1.5 mm at 3 mm voxels) puts part of that layer on the soft tissue beside the cortex, and the
median then fell below the limit on 18 of 83 vertebrae of the independent 3 mm spines (label
maps with half a voxel of boundary error, issue 30), 5 with the 60th percentile. The example CT's
masks shifted by 10–50 mm (3 mm voxels) still give at most 111 HU with it (70th percentile: 161 HU,
no longer rejected); at 1 mm voxels nothing changes."""

BONE_EDGE_RING_MM = (1.0, 4.0)
"""Distances (mm) from the mask between which its surroundings are sampled: beyond the first
millimetre, so that a mask a voxel smaller than its bone (a segmentation made on a coarser grid)
is still compared with what lies outside the cortex, not with the cortex itself."""


def bone_edge_contrast(mask: np.ndarray, ct: np.ndarray, labels: np.ndarray, spacing_kji) -> float:
    """Median HU (with thick voxels :data:`THICK_EDGE_PERCENTILE`-th percentile) of the mask's
    outermost voxels minus the median HU of the unlabelled voxels
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
    edge = THICK_EDGE_PERCENTILE if float(np.max(spacing_kji)) > THICK_VOXEL_MM else 50.0
    return float(np.percentile(ct[inner], edge) - np.median(ct[outer]))
