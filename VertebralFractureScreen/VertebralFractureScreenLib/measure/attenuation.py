"""Bone attenuation: trabecular HU per vertebral body and the exam's bone summary (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, a vertebra label map
(``totalsegmentator`` or ``verse`` ids), optionally the ``vertebrae_body`` map (1 = bodies), the
grid's 4x4 IJK→RAS matrix (mm), and the morphometry of the vertebrae
(:func:`.morphometry.measure_heights`), whose frames and endplate points place each body's
trabecular ROI (:mod:`.trabecular_roi`: at least 3 mm from the cortex and the endplates, the
posterior fifth excluded).

**Trabecular HU** (:func:`measure_trabecular`): the HU statistics of the CT in the ROI.
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
standard error (``mean_hu_se``, from the noise of block means in the soft tissue around the
body, :func:`noise_of_means`; the ROI's SD over the square root of its voxels without such
tissue); when the L1 HU lies within :data:`CATEGORY_UNCERTAIN_SES` standard errors of a category threshold, the summary is
``category_uncertain`` with a warning. It matters at thick slices: on the attenuation benchmark's
3 mm spines (ROIs of 38–300 voxels) the standard errors at 20 HU noise are 1–3 HU.

The contrast phase (:func:`.contrast.measure_contrast`) is measured apart; HU are reported as
measured with its flag beside them.

**Category for the contrast phase** (:func:`phase_adjusted_category`, :func:`bone_for_phase`).
Contrast raises trabecular HU, so beside the category above the summary gives the category under
thresholds raised by the phase's published mean enhancement of L1 (:data:`PHASE_BONE_OFFSETS_HU`,
sources in :data:`PHASE_OFFSET_SOURCES` and ``docs/methods.md``), for the phase of
:func:`.phase.estimate_phase`: arterial + 14 HU (124 / 174 HU), portal venous and delayed + 18 HU
(128 / 178 HU). Equivalently the L1 HU minus the offset (``l1_hu_for_phase``, an unenhanced-
equivalent HU) goes under the unenhanced thresholds. When the phase is not confident, every phase
the values allow is tried: the category is given when they all agree (their offsets differ by
4 HU at most) and is None otherwise, and it is marked uncertain either way, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import voxel_spacing, voxel_volume_ml
from .contrast import ContrastResult, measure_contrast  # noqa: F401  measure_contrast: re-exported
from .grading import VertebraGrade
from .phase import ENHANCED, ENHANCED_PHASES, PHASES, PhaseResult
from .trabecular_roi import ROI_MARGIN_MM, trabecular_roi_mask

ROI_MIN_VOXELS = 30
ROI_MIN_ML = 0.3
"""Below either, the ROI is flagged ``roi_small`` and not used for the exam's bone summary."""

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

    ``mean_hu_se``: standard error of ``mean_hu`` (HU) from the CT's noise, correlation between
    voxels included: ``sqrt(V·m / voxels)`` with ``V`` the variance of the noise averaged over a
    block of ``m`` voxels, :data:`NOISE_BLOCK_MM` across, measured in the soft tissue around the
    body (:func:`noise_of_means`); ``sd_hu / sqrt(voxels)`` where too little soft tissue is found
    (NaN below two voxels). The ROI's SD holds the trabecular texture, which is the bone's and no
    error of its mean, and treats the voxels as independent, which a reconstruction kernel's
    correlated noise makes too small (issue 30)."""

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
        not fractured, ROI not small, no suspected lesion or hardware (:data:`PATHOLOGY_FLAGS`)."""
        return (self.complete and self.fractured is not True and self.voxels >= ROI_MIN_VOXELS
                and "roi_small" not in self.flags and not PATHOLOGY_FLAGS.intersection(self.flags))

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



# ------------------------------------------------------------------------------------------------
# Trabecular HU
# ------------------------------------------------------------------------------------------------


def measure_trabecular(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    heights: Sequence,
    *,
    body_labels: np.ndarray | None = None,
    grades: Sequence[VertebraGrade] | None = None,
    margin_mm: float = ROI_MARGIN_MM,
) -> list[TrabecularROI]:
    """Trabecular ROI statistics of every vertebra in ``heights`` (same order).

    ``ct``: HU ``[k, j, i]``; ``labels``: the vertebra label map the morphometry was measured on
    (its ids are ``heights[n].label``); ``ijk_to_ras``: the grid (mm); ``heights``: the
    :class:`~.morphometry.VertebraHeights` list; ``body_labels``: optional ``vertebrae_body``
    map; ``grades``: optional :class:`~.grading.VertebraGrade` list (:func:`~.grading.grade_spine`
    of ``heights``) to flag fractured vertebrae. Fractured and incomplete vertebrae are
    measured and flagged. HU are as measured (see :func:`measure_contrast` for the contrast phase).
    """
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    # level → Genant grade >= 1, None where not graded
    fractured = {g.level: None if g.genant_grade is None else g.genant_grade >= 1 for g in grades or ()}
    voxel_ml = voxel_volume_ml(ijk_to_ras)
    vertebra_labels = {int(h.label) for h in heights}
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
            lesion = focal_lesion(ct[slices], roi)
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
                noise = noise_of_means(ct, labels, slices, ijk_to_ras, vertebra_labels)
                # The ROI's mean as an average of blocks of the block's noise: sqrt(V · voxels per block / n).
                result.mean_hu_se = (float(np.sqrt(noise[0] * noise[1] / values.size)) if noise is not None
                                     else result.sd_hu / float(np.sqrt(values.size)))
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


NOISE_BLOCK_MM = 6.0
"""Side (mm, per axis; at least one voxel) of the blocks whose means measure the noise of a mean
(:func:`noise_of_means`): longer than the reach of the reconstruction kernels' noise correlation
in plane (a ramp-like spectrum peaking at 0.1–0.3 cycles/mm) and between overlapping slices, so
that a block's mean carries the correlated noise as a ROI's mean does."""

NOISE_REACH_MM = 25.0
"""Soft tissue is sampled within this distance (mm, in the grid's in-plane axes) of the ROI's crop,
over the ROI's slices."""

NOISE_TISSUE_HU = (-20.0, 120.0)
"""A block is soft tissue when its mean lies in this range (muscle, discs, unenhanced vessels and
organs), none of its voxels belongs to a vertebra's label and all lie within
:data:`NOISE_VOXEL_HU` (no bone, air or fat edge)."""

NOISE_VOXEL_HU = (-200.0, 300.0)

NOISE_MIN_PAIRS = 30
"""Fewer pairs of neighbouring soft-tissue blocks than this: the ROI's standard error stays
``sd_hu / sqrt(voxels)``."""


def noise_of_means(ct: np.ndarray, labels: np.ndarray, slices: tuple, ijk_to_ras: np.ndarray,
                   vertebra_labels) -> tuple[float, int] | None:
    """The variance (HU²) of the CT's noise averaged over a block of :data:`NOISE_BLOCK_MM` and the
    block's voxel count, measured in the soft tissue around the crop ``slices``
    (:data:`NOISE_REACH_MM`, :data:`NOISE_TISSUE_HU`), or None with fewer than
    :data:`NOISE_MIN_PAIRS` pairs of face-neighbouring soft-tissue blocks. Half the robust mean
    square of the differences between neighbouring blocks' means (the median of the squares over
    0.455, the median of a chi-squared of one degree), over the more homogeneous half of the
    blocks (the lower half of their own variances: an edge or a fat streak inside a block raises
    it, while a block's mean is independent of it for Gaussian noise): differences cancel the
    smooth changes between tissues and cupping, and, unlike the ROI's own SD, they hold no
    trabecular texture (the bone's, not the measurement's error) and carry the noise's correlation
    between voxels. On a phantom with white noise of 20 HU at 2.5 mm voxels ``V·m`` is 394–434 HU²
    (400 expected; 500–520 over all blocks)."""
    spacing = voxel_spacing(ijk_to_ras)[::-1]  # (k, j, i)
    block = np.maximum(1, np.round(NOISE_BLOCK_MM / spacing)).astype(int)
    grow = [0] + [int(np.ceil(NOISE_REACH_MM / d)) for d in spacing[1:]]
    box = [slice(max(0, s.start - g), min(n, s.stop + g)) for s, g, n in zip(slices, grow, ct.shape)]
    box = tuple(slice(b.start, b.start + (b.stop - b.start) // n * n) for b, n in zip(box, block))
    counts = [(b.stop - b.start) // n for b, n in zip(box, block)]
    if min(counts) < 1:
        return None
    crop = ct[box].astype(np.float64)
    ok = (crop > NOISE_VOXEL_HU[0]) & (crop < NOISE_VOXEL_HU[1]) & ~np.isin(labels[box], list(vertebra_labels))
    shape = (counts[0], block[0], counts[1], block[1], counts[2], block[2])
    blocks = crop.reshape(shape)
    means = blocks.mean(axis=(1, 3, 5))
    usable = ok.reshape(shape).all(axis=(1, 3, 5)) & (means >= NOISE_TISSUE_HU[0]) & (means <= NOISE_TISSUE_HU[1])
    if not usable.any():
        return None
    # The more homogeneous half of the soft-tissue blocks: an edge or a fat streak inside a block
    # raises its own variance; the noise of a block's mean is independent of it.
    spread = blocks.var(axis=(1, 3, 5))
    usable &= spread <= np.median(spread[usable])
    squares = []
    for axis in range(3):
        ahead = [slice(None)] * 3
        behind = [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        both = usable[tuple(ahead)] & usable[tuple(behind)]
        squares.append(((means[tuple(ahead)] - means[tuple(behind)])[both]) ** 2)
    squares = np.concatenate(squares)
    if squares.size < NOISE_MIN_PAIRS:
        return None
    return float(np.median(squares)) / (2.0 * 0.4549), int(np.prod(block))


def focal_lesion(ct_crop: np.ndarray, roi: np.ndarray) -> np.ndarray:
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


PATHOLOGY_FLAGS = frozenset({"diffuse_lesion", "instrumented"})
"""Flags (from :mod:`.lesions`, copied onto the ROI by screening) after which a vertebra's HU says
nothing about osteoporosis: it is left out of the bone summary. A focal lesion is not among them:
the ROI already leaves its voxels out (``focal_lesion_excluded``)."""


def _why_unusable(roi: TrabecularROI | None) -> str:
    if roi is None:
        return "missing"
    if not roi.complete:
        return "incomplete"
    if roi.fractured:
        return "fractured"
    if "instrumented" in roi.flags:
        return "cement or screws"
    if "diffuse_lesion" in roi.flags:
        return "diffuse lesion"
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
# Category for the contrast phase
# ------------------------------------------------------------------------------------------------

PHASE_BONE_OFFSETS_HU = {"native": 0.0, "arterial": 14.0, "portal_venous": 18.0, "delayed": 18.0}
"""Mean rise of L1 trabecular HU over the unenhanced scan, per phase (HU): the category thresholds
of a phase are :data:`CATEGORY_THRESHOLDS_HU` plus its offset. Sources in :data:`PHASE_OFFSET_SOURCES`."""

PHASE_OFFSET_SOURCES = {
    "native": "Pickhardt et al., Ann Intern Med 2013;158:588 (L1 110 / 160 HU)",
    "arterial": "+14 HU: Pompe et al., Eur Radiol 2015;25:283 (paired L1, arterial +13.5 / +14.1 HU)",
    "portal_venous": "+18 HU: Pompe et al., Eur Radiol 2015;25:283 (paired L1, portal venous +18.2 / +18.0 HU)",
    "delayed": "+18 HU: this project's choice, as portal venous (Boutin et al., AJR 2016;207:1046)",
}
"""Where each offset comes from, as ``exam.json`` names it (the comparison with other published
offsets, TotalSegmentator's spine report's among them, is in ``docs/methods.md``)."""


@dataclass(frozen=True)
class PhaseCategory:
    """The opportunistic category of an L1 HU under the thresholds of a contrast phase.

    ``phases``: the phases tried (the phase itself, or every phase the values allow when it is not
    confident); ``offset_hu`` their common offset and ``thresholds_hu`` their thresholds (None when
    the phases tried differ); ``hu_for_phase`` the HU minus the offset (the unenhanced-equivalent
    HU; None when the offset is); ``category`` the category they all give (None when they differ);
    ``uncertain`` True when the phase is not confident, the phases tried disagree, or the HU ± 2
    standard errors spans a threshold; ``reason`` says which; ``source`` the offsets' sources."""

    category: str | None
    uncertain: bool
    offset_hu: float | None
    thresholds_hu: tuple[float, float] | None
    hu_for_phase: float | None
    phases: tuple[str, ...]
    source: str
    reason: str | None = None


def phase_offset(phase: str, candidates=None) -> tuple[tuple[str, ...], float | None]:
    """The phases to try for an answer of :func:`.phase.estimate_phase` (the phase itself; else
    its ``candidates``, or every enhanced phase for ``enhanced``, or every phase) and their common
    offset (None when they differ)."""
    if phase in PHASES:
        phases = (phase,)
    else:
        phases = tuple(p for p in candidates or () if p in PHASES) or (ENHANCED_PHASES if phase == ENHANCED else PHASES)
    offsets = {PHASE_BONE_OFFSETS_HU[p] for p in phases}
    return phases, (offsets.pop() if len(offsets) == 1 else None)


def phase_adjusted_category(l1_hu: float, phase: str, *, candidates=None, hu_se: float | None = None) -> PhaseCategory:
    """The category of ``l1_hu`` under the thresholds of ``phase`` (one of
    :data:`.phase.PHASE_ANSWERS`; ``candidates`` the estimate's candidate phases; ``hu_se`` the
    HU's standard error). See the module docstring and :class:`PhaseCategory`."""
    if not np.isfinite(l1_hu):
        raise ValueError("a NaN attenuation has no bone category")
    phases, offset = phase_offset(phase, candidates)
    categories = {opportunistic_category(l1_hu - PHASE_BONE_OFFSETS_HU[p]) for p in phases}
    category = next(iter(categories)) if len(categories) == 1 else None
    why = []
    if phase not in PHASES:
        why.append(f"contrast phase {phase}: tried {', '.join(phases)}" + ("" if category else ", which disagree"))
    if hu_se is not None and np.isfinite(hu_se) and category is not None:
        span = CATEGORY_UNCERTAIN_SES * hu_se
        if any(opportunistic_category(l1_hu - PHASE_BONE_OFFSETS_HU[p] - span)
               != opportunistic_category(l1_hu - PHASE_BONE_OFFSETS_HU[p] + span) for p in phases):
            why.append(f"within {CATEGORY_UNCERTAIN_SES:g} standard errors ({span:.1f} HU) of a threshold")
    return PhaseCategory(
        category=category, uncertain=bool(why), offset_hu=offset,
        thresholds_hu=None if offset is None else tuple(t + offset for t in CATEGORY_THRESHOLDS_HU),
        hu_for_phase=None if offset is None else float(l1_hu - offset), phases=phases,
        source="; ".join(PHASE_OFFSET_SOURCES[p] for p in phases), reason="; ".join(why) or None)


def bone_for_phase(summary: BoneSummary, phase: PhaseResult) -> dict:
    """The fields the contrast phase adds to ``exam.json``'s ``bone`` object: the category under
    the phase's thresholds (:func:`phase_adjusted_category` of ``summary.l1_hu``), whether it is
    uncertain and why, the offset and the two thresholds applied (L1 at or below the first:
    osteoporosis likely; above the second: normal) and their source, and L1's and the lumbar
    mean's HU minus the offset (None where the offset or the HU is unknown)."""
    phases, offset = phase_offset(phase.phase, phase.candidates)
    result = None
    if summary.l1_hu is not None and np.isfinite(summary.l1_hu):
        result = phase_adjusted_category(summary.l1_hu, phase.phase, candidates=phase.candidates,
                                         hu_se=summary.l1_hu_se)
    lumbar = summary.lumbar_mean_hu
    return {
        "category_for_phase": None if result is None else result.category,
        "category_for_phase_uncertain": None if result is None else result.uncertain,
        "category_for_phase_reason": None if result is None else result.reason,
        "phase_offset_hu": offset,
        "phase_osteoporosis_threshold_hu": None if offset is None else CATEGORY_THRESHOLDS_HU[0] + offset,
        "phase_normal_threshold_hu": None if offset is None else CATEGORY_THRESHOLDS_HU[1] + offset,
        "phase_threshold_source": "; ".join(PHASE_OFFSET_SOURCES[p] for p in phases),
        "l1_hu_for_phase": None if result is None else result.hu_for_phase,
        "lumbar_mean_hu_for_phase": None if lumbar is None or offset is None else float(lumbar - offset),
    }
