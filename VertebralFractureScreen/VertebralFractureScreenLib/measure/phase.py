"""Contrast phase of an exam from the HU of the vessels and kidneys TotalSegmentator labels.

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the TotalSegmentator
``total`` label map and the grid's 4x4 IJK→RAS matrix (mm).

**What is measured** (:func:`estimate_phase`), each on a crop around its label (the label's box),
never on a copy of the volume, with rows, columns and slices closer than 1 mm thinned to about
2 mm apart (a median needs no more). Each label loses its partial-volume layer first: the voxels
with a face neighbour outside it, one voxel along each axis, so a thick slice loses one slice
and not its thickness in every direction. What is left is the label's *core*, and
*depth* is the distance in mm to the nearest voxel outside the core:

* the median HU of the lumen of the aorta (id 52), the inferior vena cava (63) and the portal and
  splenic vein (64): core voxels at least :data:`LUMEN_CORE_MM` deep;
* in the kidneys (ids 2 and 3, pooled), the median HU of the **cortex**, core voxels at most
  :data:`KIDNEY_CORTEX_MM` deep, and of the **medulla**, core voxels at least
  :data:`KIDNEY_MEDULLA_MM` deep. In a real kidney the deep sample mixes the pyramids with the
  columns of Bertin and the sinus, so it understates the corticomedullary difference; the rule
  below asks for half of the published difference. The kidneys need voxels of at most
  :data:`KIDNEY_MAX_VOXEL_MM` across in the plane of the two finer axes: coarser, no voxel of
  the cortex (about 7 mm thick) is clear of partial volume, and they count as missing.

A structure with fewer than :data:`MIN_VOXELS` such voxels counts as missing (with a warning), as
does an absent label. Each median carries a standard error (``1.2533 × 1.4826 × MAD / √n``).

**The rule** (:data:`PHASE_RULES`; this project's choice, set from the published values in
``docs/methods.md``). From the medians come seven cues: the five HU and two differences, aorta
minus portal vein and renal cortex minus medulla (the corticomedullary difference). For each
phase every cue has a range it can take in that phase; a phase is a *candidate* when every cue
that could be measured lies in its range, each value widened by :data:`SE_MARGIN` standard
errors. Then:

* exactly one candidate and at least :data:`MIN_STRUCTURES` of the four structures (aorta, IVC,
  portal vein, kidneys) measured: that phase, ``confident``;
* otherwise, when every candidate is an enhanced phase: ``enhanced`` (contrast-enhanced, phase
  unknown), not confident;
* otherwise (candidates that include ``native`` and an enhanced phase, a single structure, no
  structure, or values no phase allows, such as an aorta too bright for the portal venous phase
  with too little corticomedullary difference for the arterial): ``uncertain``.

A missing label removes cues, so it can only widen the candidates: when the values of a scan fit
its phase's ranges, its phase stays a candidate and the answer is that phase or something coarser,
whatever is missing. ``candidates`` and ``reasons`` (why each other phase
was ruled out) say how the answer came about. The thresholds assume 120 kV; at 80–100 kV iodine
reads higher and an enhanced phase may read as the next earlier one (see ``docs/methods.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import distance_transform_edt, find_label_boxes, voxel_spacing
from .contrast import label_box, thinned_crop

PHASES = ("native", "arterial", "portal_venous", "delayed")
"""The phases this module tells apart, in order of time after injection (``delayed`` includes the
nephrographic phase)."""
ENHANCED_PHASES = PHASES[1:]
ENHANCED = "enhanced"
"""Contrast-enhanced, phase unknown: every phase the values allow is an enhanced one."""
UNCERTAIN = "uncertain"
PHASE_ANSWERS = PHASES + (ENHANCED, UNCERTAIN)

VESSELS = {
    "aorta": lv.TOTAL_AORTA,
    "inferior_vena_cava": lv.TOTAL_INFERIOR_VENA_CAVA,
    "portal_vein_and_splenic_vein": lv.TOTAL_PORTAL_SPLENIC_VEIN,
}
"""Vessel (TotalSegmentator class name) → ``total`` id."""
KIDNEYS = {"kidney_right": lv.TOTAL_KIDNEY_RIGHT, "kidney_left": lv.TOTAL_KIDNEY_LEFT}
MEASURED = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cortex", "kidney_medulla")
"""The HU the estimate reports (``hu``, ``voxels``), in this order."""
STRUCTURE_CUES = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cortex")
"""The structures that count towards :data:`MIN_STRUCTURES`, by the HU that says each is measured
(the kidneys count once, by their cortex)."""

LUMEN_CORE_MM = 2.0
"""A vessel's sample: voxels of its core (the label less its partial-volume layer) at least this deep."""
KIDNEY_CORTEX_MM = 4.0
"""The cortex sample: voxels of the kidney's core at most this deep."""
KIDNEY_MEDULLA_MM = 10.0
"""The medulla sample: voxels of the kidney's core at least this deep."""
KIDNEY_MAX_VOXEL_MM = 3.0
"""The kidneys are measured only when the two finer voxel sizes are at most this (mm)."""
MIN_VOXELS = 10
"""Fewer voxels than this in a sample: the structure counts as missing."""
MIN_STRUCTURES = 2
"""Structures that must be measured for a confident phase."""
SE_MARGIN = 2.0
"""Each value is widened by this many standard errors before it is compared with a range."""

_INF = float("inf")
PHASE_RULES: dict[str, dict[str, tuple[float, float]]] = {
    # cue: phase → (lowest, highest) HU the cue takes in that phase (absent: no constraint)
    "aorta": {"native": (-_INF, 90.0), "arterial": (180.0, _INF), "portal_venous": (140.0, 320.0),
              "delayed": (70.0, 160.0)},
    "portal_vein_and_splenic_vein": {"native": (-_INF, 90.0), "arterial": (-_INF, 230.0),
                                     "portal_venous": (140.0, _INF), "delayed": (70.0, 160.0)},
    "inferior_vena_cava": {"native": (-_INF, 90.0), "arterial": (-_INF, 200.0), "portal_venous": (90.0, _INF),
                           "delayed": (70.0, 160.0)},
    "kidney_cortex": {"native": (-_INF, 80.0), "arterial": (120.0, _INF), "portal_venous": (120.0, _INF),
                      "delayed": (90.0, _INF)},
    "kidney_medulla": {"native": (-_INF, 80.0), "portal_venous": (80.0, _INF), "delayed": (90.0, _INF)},
    "corticomedullary_difference": {"native": (-25.0, 25.0), "arterial": (50.0, _INF),
                                    "portal_venous": (-10.0, 35.0), "delayed": (-_INF, 20.0)},
    "aorta_minus_portal": {"native": (-30.0, 30.0), "arterial": (70.0, _INF), "portal_venous": (-_INF, 40.0),
                           "delayed": (-35.0, 35.0)},
}
"""The ranges of the rule (module docstring; sources and reasons in ``docs/methods.md``)."""

_MEDIAN_SE = 1.2533 * 1.4826  # SE of a median = 1.2533 σ / √n; σ from the median absolute deviation


@dataclass(frozen=True)
class PhaseResult:
    """The contrast phase of one exam (module docstring).

    ``phase`` one of :data:`PHASE_ANSWERS`; ``confident`` True only for one of :data:`PHASES`
    decided as the rule says; ``candidates`` the phases the values allow (empty: none does);
    ``hu`` / ``hu_se`` / ``voxels`` per :data:`MEASURED` (None / 0 when not measured); ``cues``
    the differences used (None when a part is missing); ``missing`` the labels absent or too small
    (TotalSegmentator class names); ``reasons`` why each phase other than the answer was ruled out;
    ``warnings``."""

    phase: str
    confident: bool
    candidates: tuple[str, ...]
    hu: dict
    hu_se: dict
    voxels: dict
    cues: dict
    missing: tuple[str, ...]
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def exam_fields(self) -> dict:
        """The fields this estimate adds to ``exam.json``'s ``contrast`` object."""
        return {"phase": self.phase, "phase_confident": self.confident, "phase_candidates": list(self.candidates),
                "phase_hu": dict(self.hu), "phase_voxels": dict(self.voxels), "phase_missing": list(self.missing),
                "phase_reasons": list(self.reasons), "phase_warnings": list(self.warnings)}


@dataclass
class _Sample:
    """The HU of one measured structure: median, its standard error and voxel count."""

    median: float | None = None
    se: float | None = None
    voxels: int = 0

    @classmethod
    def of(cls, values: np.ndarray) -> "_Sample":
        if values.size < MIN_VOXELS:
            return cls(None, None, int(values.size))
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        return cls(median, _MEDIAN_SE * mad / float(np.sqrt(values.size)), int(values.size))


def estimate_phase(ct: np.ndarray, labels: np.ndarray, ijk_to_ras: np.ndarray, *,
                   label_boxes: list | None = None) -> PhaseResult:
    """The contrast phase of an exam (rule and definitions in the module docstring).

    ``labels``: the TotalSegmentator ``total`` map on the CT's grid; ``label_boxes``:
    ``ndimage.find_objects(labels)`` (or :func:`..geometry.find_label_boxes`) when the caller has
    it already, else found here in one pass."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    if label_boxes is None and np.issubdtype(labels.dtype, np.integer):
        label_boxes = find_label_boxes(labels, max(VESSELS.values()))
    samples: dict[str, _Sample] = {}
    missing, warnings = [], []
    for name, label, box in _present(VESSELS, label_boxes, missing):
        slices, depth = _depth_in_core(labels, label, box, ijk_to_ras)
        samples[name] = _Sample.of(ct[slices][depth >= LUMEN_CORE_MM].astype(np.float64))
        if samples[name].median is None:
            missing.append(name)
            warnings.append(f"{name}: fewer than {MIN_VOXELS} voxels of its central lumen at this voxel size: "
                            "not used")
    cortex, medulla = _kidney_samples(ct, labels, ijk_to_ras, label_boxes, missing, warnings)
    samples["kidney_cortex"], samples["kidney_medulla"] = cortex, medulla
    return phase_from_hu({name: samples[name].median if name in samples else None for name in MEASURED},
                         {name: samples[name].se if name in samples else None for name in MEASURED},
                         voxels={name: samples[name].voxels if name in samples else 0 for name in MEASURED},
                         missing=missing, warnings=warnings)


def phase_from_hu(hu: dict, hu_se: dict | None = None, *, voxels: dict | None = None, missing=(),
                  warnings=()) -> PhaseResult:
    """The phase the rule (module docstring) gives for median HU ``hu`` (a name of
    :data:`MEASURED` → HU; absent or None: not measured) with their standard errors ``hu_se``
    (absent: 0); ``voxels``, ``missing`` and ``warnings`` are carried into the result (the
    warnings of the decision are added)."""
    hu = {name: None if hu.get(name) is None else float(hu[name]) for name in MEASURED}
    se = {name: None if hu[name] is None else float((hu_se or {}).get(name) or 0.0) for name in MEASURED}
    cues = _cues(hu, se)
    candidates, reasons = _candidates(cues)
    measured = sum(hu[name] is not None for name in STRUCTURE_CUES)
    warnings = list(warnings)
    phase = _answer(candidates, measured, warnings)
    return PhaseResult(phase=phase, confident=phase in PHASES, candidates=candidates, hu=hu, hu_se=se,
                       voxels={name: int((voxels or {}).get(name, 0)) for name in MEASURED},
                       cues={key: value[0] for key, value in cues.items() if key not in MEASURED},
                       missing=tuple(missing), reasons=tuple(reasons), warnings=tuple(warnings))


def no_phase(reason: str = "a VerSe segmentation has no vessel or kidney labels") -> PhaseResult:
    """The answer without any of the structures: ``uncertain``, every structure missing."""
    return phase_from_hu({}, missing=tuple(name for name in MEASURED if name != "kidney_medulla"),
                         warnings=(f"contrast phase not assessed: {reason}",))


def _present(structures: dict, label_boxes, missing: list):
    """``(name, label, box)`` of each of ``structures`` (name → label) in the segmentation; the
    names of the absent ones are added to ``missing``."""
    for name, label in structures.items():
        box = label_box(label_boxes, label)
        if box is None:
            missing.append(name)
        else:
            yield name, label, box


def _depth_in_core(labels: np.ndarray, label: int, box, ijk_to_ras) -> tuple[tuple[slice, ...], np.ndarray]:
    """The crop of ``label``'s box (:func:`.contrast.thinned_crop`, rows, columns and slices about
    2 mm apart at most) and, on it, each voxel's depth in the label's core: the label less its
    partial-volume layer (the voxels with a face neighbour outside it), and the depth in
    mm to the nearest voxel outside that core (0 outside it). The image border is not an edge: a
    structure cut by the field of view keeps its end slices."""
    slices, spacing_kji = thinned_crop(box, labels.shape, ijk_to_ras, in_plane=True)
    core = ndimage.binary_erosion(labels[slices] == label, border_value=1)  # the six face neighbours
    return slices, distance_transform_edt(core, sampling=spacing_kji)


def _kidney_samples(ct, labels, ijk_to_ras, label_boxes, missing: list, warnings: list) -> tuple[_Sample, _Sample]:
    """The cortex and medulla samples of both kidneys, pooled (module docstring); absent or
    too-small kidneys are added to ``missing``."""
    cortex, medulla = [], []
    if sorted(voxel_spacing(ijk_to_ras))[1] > KIDNEY_MAX_VOXEL_MM:
        present = [name for name in KIDNEYS if label_box(label_boxes, KIDNEYS[name]) is not None]
        if present:
            warnings.append(f"kidneys not measured: voxels coarser than {KIDNEY_MAX_VOXEL_MM:g} mm in the plane leave "
                            "no voxel of the cortex clear of partial volume")
        missing.extend(KIDNEYS)
        return _Sample(), _Sample()
    for _, label, box in _present(KIDNEYS, label_boxes, missing):
        slices, depth = _depth_in_core(labels, label, box, ijk_to_ras)
        values = ct[slices]
        cortex.append(values[(depth > 0.0) & (depth <= KIDNEY_CORTEX_MM)].astype(np.float64))
        medulla.append(values[depth >= KIDNEY_MEDULLA_MM].astype(np.float64))
    samples = [_Sample.of(np.concatenate(parts) if parts else np.zeros(0)) for parts in (cortex, medulla)]
    present = [name for name in KIDNEYS if name not in missing]
    for what, sample in zip(("cortex", "medulla"), samples):
        if present and sample.median is None:
            warnings.append(f"kidney {what}: {sample.voxels} voxels at this voxel size, fewer than {MIN_VOXELS}: "
                            "not used")
    if present and samples[0].median is None:  # no cortex: the kidneys are not measured
        missing.extend(present)
        samples[1] = _Sample(None, None, samples[1].voxels)
    return samples[0], samples[1]


def _cues(hu: dict, se: dict) -> dict[str, tuple[float, float]]:
    """Every cue that could be measured → (value, standard error): the five HU and the two
    differences (their standard errors added in quadrature)."""
    cues = {name: (hu[name], se[name]) for name in MEASURED if hu[name] is not None}
    for cue, (a, b) in (("aorta_minus_portal", ("aorta", "portal_vein_and_splenic_vein")),
                        ("corticomedullary_difference", ("kidney_cortex", "kidney_medulla"))):
        if a in cues and b in cues:
            cues[cue] = (cues[a][0] - cues[b][0], float(np.hypot(cues[a][1], cues[b][1])))
    return cues


def _candidates(cues: dict[str, tuple[float, float]]) -> tuple[tuple[str, ...], list[str]]:
    """The phases whose every range holds its cue (widened by :data:`SE_MARGIN` standard errors),
    and a reason for each phase ruled out (its first failing cue)."""
    candidates, reasons = [], []
    for phase in PHASES:
        failing = None
        for cue, (value, se) in cues.items():
            low, high = PHASE_RULES[cue].get(phase, (-_INF, _INF))
            margin = SE_MARGIN * se
            if value + margin < low or value - margin > high:
                bound = f"below {low:g}" if value + margin < low else f"above {high:g}"
                failing = f"{phase}: {cue.replace('_', ' ')} {value:.0f} HU is {bound} HU"
                break
        if failing is None:
            candidates.append(phase)
        else:
            reasons.append(failing)
    return tuple(candidates), reasons


def _answer(candidates: tuple[str, ...], measured: int, warnings: list) -> str:
    """The phase the candidates and the number of measured structures allow (module docstring)."""
    if not measured:
        warnings.append("no aorta, vena cava, portal vein or kidney could be measured: contrast phase uncertain")
        return UNCERTAIN
    if not candidates:
        warnings.append("the vessels' and kidneys' HU fit no single phase (between phases, or contradictory): "
                        "contrast phase uncertain")
        return UNCERTAIN
    if len(candidates) == 1 and measured >= MIN_STRUCTURES:
        return candidates[0]
    if len(candidates) == 1:
        warnings.append(f"only one structure measured: {candidates[0]} is not confirmed by a second")
    if all(phase in ENHANCED_PHASES for phase in candidates):
        return ENHANCED
    return UNCERTAIN
