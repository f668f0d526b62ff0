"""The measurement registry: every quantity the product outputs, declared once.

Each :class:`Quantity` states its key (a CSV column, or a dotted ``exam.json`` path where
``<level>`` and ``<muscle>`` stand for a vertebra and a muscle name), title, unit (UCUM, as DICOM
SR writes units; ``1`` for a ratio or fraction, empty for text, flags and booleans), what it is,
its value kind, and a code: SNOMED CT (``SCT``) or DICOM (``DCM``) where one names the quantity,
else one of this product's private scheme :data:`PRIVATE_SCHEME` (listed in ``docs/outputs.md``);
text, lists and flags carry none.
A statistic of a quantity (mean, SD) carries the quantity's code and a ``derivation`` code, as
Slicer's Segment Statistics and DICOM TID 1500 write them.

The tables drive the CSV headers (:data:`VERTEBRA_TABLE`, :data:`MUSCLE_TABLE`), the model's feature
list (:data:`FEATURE_TABLE`), the Slicer tables' units and descriptions, and the generated output
reference ``docs/outputs.md`` (:func:`outputs_reference`; a test fails when the file is stale).
Why one place: each quantity's unit and code must be the same in every output, and the DICOM SR
needs them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import levels as lv

PRIVATE_SCHEME = "99VFS"
"""Coding scheme designator of this product's private codes (DICOM PS3.16 §8: private schemes start
with ``99``)."""


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value``, coding scheme designator and meaning, as DICOM writes them."""

    value: str
    scheme: str
    meaning: str


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


HEIGHT = Code("121207", "DCM", "Height")
VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
MEDIAN = _private("median", "Median")  # Slicer's Segment Statistics also found no standard code for it
PROBABILITY = Code("122157", "DCM", "Probability")  # as the DICOM SR issue names it

KINDS = ("number", "integer", "boolean", "text", "list", "object")
UNITS = {
    "mm": "millimetre", "mL": "millilitre", "mL/cm": "millilitre per centimetre", "[hnsf'U]": "Hounsfield unit",
    "1": "ratio or fraction (no unit)", "{vertebrae}": "number of vertebrae", "{voxels}": "number of voxels",
    "{grade}": "Genant grade 0–3", "s": "second", "deg": "degree (plane angle)", "": "none (text, flags, booleans)",
}
"""The UCUM units used, with their meaning (``{...}`` are UCUM annotations of a count)."""


@dataclass(frozen=True)
class Quantity:
    """One output quantity (see the module docstring)."""

    key: str
    title: str
    unit: str
    description: str
    kind: str = "number"
    code: Code | None = None
    derivation: Code | None = None


def _q(key, title, unit, description, kind="number", code=None, derivation=None) -> Quantity:
    if kind not in KINDS or unit not in UNITS:
        raise ValueError(f"{key}: unknown kind {kind!r} or unit {unit!r}")
    if code is None and kind in ("number", "integer"):
        code = _private([part for part in key.split(".") if not part.startswith("<")][-1], title)
    return Quantity(key, title, unit, description, kind, code, derivation)


def _hu(key, title, description, derivation) -> Quantity:
    return _q(key, title, "[hnsf'U]", description, code=ATTENUATION, derivation=derivation)


# ------------------------------------------------------------------------------------------------
# vertebrae.csv: one row per vertebra present
# ------------------------------------------------------------------------------------------------

_EXAM_ID = _q("exam_id", "Exam", "", "the exam's identifier (file name without suffix, or as given)", "text")
_LEVEL = _q("level", "Level", "", "vertebra name (C1–L6, T13, S1; SPEC §3)", "text")

VERTEBRA_TABLE: tuple[Quantity, ...] = (
    _EXAM_ID,
    _LEVEL,
    _q("complete", "Complete", "", "the whole body lies in the field of view and could be measured; only complete"
       " vertebrae are graded", "boolean"),
    _q("ha_mm", "Anterior height", "mm", "endplate distance along the vertebra's cranio-caudal axis at 15 % of the"
       " body's depth from the anterior wall, mid-sagittal (SPEC §4)", code=_private("ha", "Anterior vertebral height")),
    _q("hm_mm", "Middle height", "mm", "endplate distance at 50 % of the depth", code=_private("hm", "Middle vertebral height")),
    _q("hp_mm", "Posterior height", "mm", "endplate distance at 85 % of the depth",
       code=_private("hp", "Posterior vertebral height")),
    _q("ha_hp", "Ha/Hp", "1", "anterior over posterior height (wedge ratio)"),
    _q("hm_hp", "Hm/Hp", "1", "middle over posterior height (biconcavity ratio)"),
    _q("hp_ref_ratio", "Hp/Hp ref", "1", "posterior height over the mean posterior height of the unfractured"
       " neighbours (crush ratio)"),
    _q("height_loss", "Height loss", "1", "SPEC §4's largest of the wedge (1 − Ha/Hp), biconcave (1 − Hm/Hp) and"
       " crush (1 − Hp/Hp_ref) losses, each against the level's normal proportions, clipped to 0–1"
       " (docs/methods.md)"),
    _q("genant_grade", "Genant grade", "{grade}", "semi-quantitative grade 0–3 as a reader grades: the vertebra's"
       " shape and its height and area against the normal shape expected from its neighbours (docs/methods.md);"
       " empty when not graded", "integer", _private("genant", "Genant semiquantitative grade")),
    _q("shape", "Shape", "", "wedge, biconcave, crush or normal", "text", _private("shape", "Fracture shape")),
    _q("borderline", "Borderline", "", "the grade changes when every loss moves by 3 percentage points", "boolean"),
    _hu("trabecular_hu_mean", "Trabecular HU", "mean HU of the trabecular ROI (the body's core, cortex and focal"
        " outliers left out)", MEAN),
    _hu("trabecular_hu_median", "Trabecular HU median", "median HU of the trabecular ROI", MEDIAN),
    _hu("trabecular_hu_sd", "Trabecular HU SD", "standard deviation of the HU in the trabecular ROI",
        STANDARD_DEVIATION),
    _q("roi_voxels", "ROI voxels", "{voxels}", "voxels in the trabecular ROI", "integer"),
    _q("body_volume_ml", "Body volume", "mL", "volume of the vertebral body's mask", code=VOLUME),
    _q("flags", "Flags", "", "why a row is incomplete, not graded or uncertain (see the flags below)", "list"),
    _q("quantitative_grade", "Quantitative grade", "{grade}", "SPEC §4 grade of height_loss alone (Genant's"
       " height-reduction boundaries 20/25/40 %)", "integer"),
    _q("grade_basis", "Grade basis", "", "what decided genant_grade: shape, size, shape+size or normal", "text"),
    _q("grade_loss", "Grade loss", "1", "the loss behind genant_grade: the largest shape loss, or the size loss when"
       " the size decided"),
    _q("hm_min_mm", "Smallest middle height", "mm", "smallest height within 25–75 % of the depth (the deepest point"
       " of a depression)"),
    _q("expected_ha_mm", "Expected Ha", "mm", "normal anterior height expected from the neighbours"),
    _q("expected_hm_mm", "Expected Hm", "mm", "normal height expected at the middle region's deepest point"),
    _q("expected_hp_mm", "Expected Hp", "mm", "normal posterior height expected from the neighbours"),
    _q("middle_loss", "Middle loss", "1", "loss of the smallest middle height against the expected shape"),
    _q("size_loss", "Size loss", "1", "largest loss of Ha, the middle minimum or Hp against the expected heights"),
    _q("area_loss", "Area loss", "1", "loss of the mid-sagittal body area against the expected outline"),
    _q("endplate_depression", "Endplate depression", "1", "the deeper endplate's depression below its chord, as a"
       " fraction of the expected middle height"),
    _q("reference_levels", "Reference levels", "", "the unfractured neighbours the expected shape comes from", "list"),
    _q("confidence", "Confidence", "1", "trust in the vertebra's result, 0–1: the probability that its grade is right"
       " given the heights' noise, times factors for a weak reference, doubtful levels, a suspected lesion or"
       " hardware (measure/confidence.py); empty without a grade"),
)

def _by_key(table) -> dict[str, Quantity]:
    return {q.key: q for q in table}


# ------------------------------------------------------------------------------------------------
# muscles.csv: one row per muscle and level slab, and the L1–L5 total ("lumbar")
# ------------------------------------------------------------------------------------------------

MUSCLE_TABLE: tuple[Quantity, ...] = (
    _EXAM_ID,
    _q("muscle", "Muscle", "", "autochthon_left/right, iliopsoas_left/right", "text"),
    _q("level", "Level", "", "the vertebra whose slab (mid-disc to mid-disc) is measured, or lumbar for L1–L5",
       "text"),
    _q("volume_ml", "Volume", "mL", "volume of the muscle's label in the slab", code=VOLUME),
    _hu("mean_hu", "Mean HU", "mean HU of the muscle's voxels within −29…150 HU (SPEC §4)", MEAN),
    _q("imat_fraction", "IMAT fraction", "1", "share of the muscle's voxels within −190…−30 HU (intermuscular fat)"),
    _hu("lean_hu", "Lean HU", "mean HU of the −29…150 HU voxels whose six neighbours are muscle in that range too"
        " (partial volume guarded)", MEAN),
    _q("fat_fraction", "Fat fraction", "1", "fat volume fraction by linear unmixing between lean_hu and the exam's"
       " fat HU"),
    _hu("mean_hu_se", "Mean HU SE", "standard error of mean_hu from the noise", _private("se", "Standard error")),
    _hu("lean_hu_se", "Lean HU SE", "standard error of lean_hu from the noise", _private("se", "Standard error")),
    _q("complete", "Complete", "", "the slab is measured whole (flags say why not)", "boolean"),
    _q("flags", "Flags", "", "why a row is incomplete or not measured (see the flags below)", "list"),
)

# ------------------------------------------------------------------------------------------------
# exam.json (dotted paths; <level> is a vertebra, <muscle> a muscle or a group of two)
# ------------------------------------------------------------------------------------------------

EXAM_FIELDS: tuple[Quantity, ...] = (
    _EXAM_ID,
    _q("software.name", "Software", "", "VertebralFractureScreen", "text"),
    _q("software.version", "Software version", "", "the library's version", "text"),
    _q("created_utc", "Created", "", "when the exam was screened (ISO 8601, UTC)", "text"),
    _q("inputs.ct", "CT", "", "the CT file or DICOM folder", "text"),
    _q("inputs.segmentation", "Segmentation", "", "the segmentation file", "text"),
    _q("inputs.vertebrae_body", "Body segmentation", "", "the vertebrae_body map, when given", "text"),
    _q("inputs.labels", "Label convention", "", "totalsegmentator or verse (SPEC §3)", "text"),
    _q("inputs.segmented_by", "Segmented by", "", "given, or the TotalSegmentator run that made it", "text"),
    _q("geometry.shape_kji", "Grid shape", "", "voxels along k, j, i", "list"),
    _q("geometry.spacing_mm", "Voxel spacing", "mm", "voxel size along i, j, k", "list"),
    _q("geometry.ijk_to_ras", "IJK to RAS", "", "the 4x4 matrix from voxel indices to RAS millimetres", "list"),
    _q("levels_present", "Levels present", "", "vertebrae in the segmentation, cranial to caudal", "list"),
    _q("levels_complete", "Levels complete", "", "vertebrae measured whole", "list"),
    _q("fracture.max_grade", "Maximum grade", "{grade}", "highest Genant grade among graded vertebrae without a"
       " suspected lesion or hardware (null when"
       " none was graded)", "integer", _private("max_genant", "Maximum Genant grade")),
    _q("fracture.fractured_levels", "Fractured levels", "", "levels with grade ≥ 1", "list"),
    _q("fracture.count", "Fractures", "{vertebrae}", "number of fractured levels", "integer"),
    _q("fracture.possibly_pathological_levels", "Possibly pathological", "", "levels with grade ≥ 1 and a suspected"
       " lesion or hardware: not counted in max_grade, fractured_levels or count", "list"),
    _q("fracture.graded_levels", "Graded vertebrae", "{vertebrae}", "number of graded vertebrae", "integer"),
    _q("fracture.borderline_levels", "Borderline levels", "", "graded levels near a grade boundary", "list"),
    _q("fracture.uncertain_grade_levels", "Uncertain grades", "", "graded levels whose grade the heights' SDs"
       " leave open", "list"),
    _q("grading", "Grading basis", "", "how genant_grade and quantitative_grade are defined, and their boundaries",
       "object"),
    *(_q(f"height_sd_mm.<level>.{h}", f"{h.capitalize()} SD", "mm",
         f"SD of {h.capitalize()}: the larger of the CT's noise and the endplate model's own error",
         code=_by_key(VERTEBRA_TABLE)[f"{h}_mm"].code, derivation=STANDARD_DEVIATION) for h in ("ha", "hm", "hp")),
    _q("height_loss_sd.<level>", "Height loss SD", "1", "SD of height_loss from the heights' SDs",
       code=_by_key(VERTEBRA_TABLE)["height_loss"].code, derivation=STANDARD_DEVIATION),
    _hu("bone.l1_hu", "L1 HU", "trabecular mean HU of L1, or of the nearest usable lumbar level", MEAN),
    _hu("bone.l1_hu_se", "L1 HU SE", "standard error of l1_hu from the noise", _private("se", "Standard error")),
    _q("bone.l1_level", "Category level", "", "the level l1_hu comes from", "text"),
    _q("bone.category", "Bone category", "", "osteoporosis-likely (≤ 110 HU), low-bone-density-possible"
       " (110–160 HU) or normal (> 160 HU) from l1_hu (Pickhardt et al., Ann Intern Med 2013; unenhanced"
       " thresholds)", "text",
       _private("bone_category", "Opportunistic bone category")),
    _q("bone.category_uncertain", "Category uncertain", "", "l1_hu ± 2 standard errors spans a threshold, or the"
       " levels are doubtful (level_check)", "boolean"),
    _hu("bone.lumbar_mean_hu", "Lumbar mean HU", "mean trabecular HU of the complete non-fractured lumbar"
        " vertebrae", MEAN),
    _q("bone.lumbar_levels", "Lumbar levels", "", "the levels in lumbar_mean_hu", "list"),
    _q("bone.excluded_lumbar", "Excluded lumbar levels", "", "lumbar levels left out, with the reason", "object"),
    _hu("bone.per_level_hu.<level>", "Level HU", "trabecular mean HU of a complete vertebra", MEAN),
    _q("bone.contrast_enhanced", "Contrast (bone)", "", "the contrast flag the bone summary was read under",
       "boolean"),
    _q("bone.warnings", "Bone warnings", "", "what limits the bone summary", "list"),
    _q("bone.category_for_phase", "Bone category for the phase", "", "the category under the detected phase's"
       " thresholds (null without L1 HU or when the candidate phases disagree)", "text",
       _private("bone_category_phase", "Opportunistic bone category for the contrast phase")),
    _q("bone.category_for_phase_uncertain", "Phase category uncertain", "", "the phase is not certain, or l1_hu ± 2"
       " standard errors spans a threshold", "boolean"),
    _q("bone.category_for_phase_reason", "Phase category reason", "", "why it is uncertain", "text"),
    _hu("bone.phase_offset_hu", "Phase offset", "HU that contrast of the detected phase adds to L1 trabecular bone"
        " (null when the phase is not known)", _private("phase_offset", "Contrast phase offset")),
    _q("bone.phase_osteoporosis_threshold_hu", "Phase osteoporosis threshold", "[hnsf'U]", "110 HU plus the offset"),
    _q("bone.phase_normal_threshold_hu", "Phase normal threshold", "[hnsf'U]", "160 HU plus the offset"),
    _q("bone.phase_threshold_source", "Phase threshold source", "", "the publication behind the offset", "text"),
    _hu("bone.l1_hu_for_phase", "L1 HU for the phase", "l1_hu minus the phase offset", MEAN),
    _hu("bone.lumbar_mean_hu_for_phase", "Lumbar mean HU for the phase", "lumbar_mean_hu minus the phase offset",
        MEAN),
    _q("spine.coronal_cobb_deg", "Coronal Cobb angle", "deg", "the largest coronal curve's Cobb angle from the"
       " centre line's tangents at the body centres (null with fewer than 3 usable vertebrae)"),
    _q("spine.coronal_cobb_levels", "Cobb end vertebrae", "", "upper and lower end vertebra of that curve (empty"
       " below 3°: no curve)", "list"),
    _q("spine.kyphosis_deg", "Thoracic kyphosis", "deg", "sagittal angle T4 to T12 (null without both)"),
    _q("spine.kyphosis_levels", "Kyphosis levels", "", "the end levels of kyphosis_deg", "list"),
    _q("spine.lordosis_deg", "Lumbar lordosis", "deg", "sagittal angle L1 to L5 (null without both)"),
    _q("spine.lordosis_levels", "Lordosis levels", "", "the end levels of lordosis_deg", "list"),
    _q("spine.levels", "Curvature levels", "", "the vertebrae whose centres are trusted for the curvature", "list"),
    _q("review.needed", "Review needed", "", "a reader should look at this exam (reasons below)", "boolean"),
    _q("review.reasons", "Review reasons", "", "why: low-confidence fractures, open grades, doubtful levels,"
       " lesions, hardware, a mask off the bone", "list"),
    _q("level_check.doubtful", "Levels doubtful", "", "the label map's own evidence disagrees with its level labels",
       "boolean"),
    _q("level_check.checked", "Level checks run", "", "order, spacing, ribs, sacrum: the checks with evidence", "list"),
    _q("level_check.not_checked", "Level checks not run", "", "check → why it had no evidence", "object"),
    _q("level_check.disagreements", "Level disagreements", "", "one sentence per finding", "list"),
    _q("level_check.rib_levels", "Rib levels", "", "rib number → the level its medial end touches most", "object"),
    _q("level_check.transitional", "Transitional vertebrae", "", "VerSe's L6 or T13 labels present", "list"),
    _q("level_check.shift", "Agreed level shift", "", "levels to add to every vertebra label (caudal positive) on which"
       " ribs and sacrum agree; 0: none", "integer"),
    _q("level_check.relabelled_by", "Levels relabelled by", "", "the shift applied before measuring (relabel_levels,"
       " --relabel-levels); 0: labels as given", "integer"),
    _hu("contrast.aorta_hu", "Aorta HU", "mean HU of the aorta's central lumen", MEAN),
    _q("contrast.aorta_voxels", "Aorta voxels", "{voxels}", "voxels behind aorta_hu", "integer"),
    _q("contrast.contrast_enhanced", "Contrast-enhanced", "", "aorta_hu above threshold_hu", "boolean"),
    _q("contrast.threshold_hu", "Contrast threshold", "[hnsf'U]", "aorta HU above which the exam counts as"
       " contrast-enhanced"),
    _q("contrast.warnings", "Contrast warnings", "", "what limits the contrast estimate", "list"),
    _q("contrast.phase", "Contrast phase", "", "native, arterial, portal_venous, delayed, enhanced (phase unknown) or"
       " uncertain, from the vessels and kidneys (measure/phase.py)", "text",
       _private("contrast_phase", "Contrast phase")),
    _q("contrast.phase_confident", "Phase confident", "", "one phase fits and at least two structures were measured",
       "boolean"),
    _q("contrast.phase_candidates", "Phase candidates", "", "the phases the measured HU allow", "list"),
    *(_hu(f"contrast.phase_hu.{name}", f"Phase HU: {name}", f"median HU of the {name.replace('_', ' ')} core",
          MEDIAN) for name in ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cortex",
                               "kidney_medulla")),
    *(_q(f"contrast.phase_voxels.{name}", f"Phase voxels: {name}", "{voxels}", f"voxels behind phase_hu.{name}",
         "integer") for name in ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cortex",
                                 "kidney_medulla")),
    _q("contrast.phase_missing", "Phase structures missing", "", "structures absent or too small", "list"),
    _q("contrast.phase_reasons", "Phase reasons", "", "why each other phase was ruled out", "list"),
    _q("contrast.phase_warnings", "Phase warnings", "", "what limits the phase estimate", "list"),
    *(_q(f"muscle.lumbar.<muscle>.{q.key}", q.title, q.unit, f"L1–L5 total: {q.description}", q.kind, q.code,
         q.derivation) for q in MUSCLE_TABLE if q.key not in ("exam_id", "muscle", "level")),
    _q("muscle.lumbar.<muscle>.voxels", "Voxels", "{voxels}", "L1–L5 total: voxel count (partial shares summed)"),
    _q("muscle.levels", "Muscle levels", "", "levels with a muscle slab", "list"),
    _q("muscle.incomplete_levels", "Incomplete muscle levels", "", "levels with a flagged muscle row", "list"),
    _hu("muscle.fat_reference_hu", "Fat HU", "the exam's subcutaneous fat HU used for fat_fraction", MEAN),
    _q("muscle.lumbar_length_mm", "Lumbar length", "mm", "L1–L5 length along the spine (null when a lumbar level"
       " is missing)"),
    _q("model.name", "Model", "", "the fracture model applied (null without one)", "text"),
    _q("model.probability", "Fracture probability", "1", "the model's probability that the exam has a fracture",
       code=PROBABILITY),
    _q("model.threshold", "Model threshold", "1", "the model's operating threshold"),
    _q("model.positive", "Model positive", "", "probability ≥ threshold", "boolean"),
    _q("model.provenance", "Model provenance", "", "kind, training cohort, cross-validated AUC, date", "object"),
    _q("model.note", "Model note", "", "intended use, or DEMONSTRATION", "text"),
    _q("model.demonstration", "Demonstration model", "", "the model is the built-in demonstration", "boolean"),
    _q("model.imputed_features", "Imputed features", "", "features missing in this exam, imputed", "list"),
    _q("warnings", "Warnings", "", "everything that limits the exam's results, in one list", "list"),
    _q("timings_s.<stage>", "Timing", "s", "seconds spent per stage (read, morphometry, attenuation_and_muscles,"
       " segmentation, total)"),
)

# ------------------------------------------------------------------------------------------------
# features.csv: the exam features a fracture model uses (version in features.FEATURE_VERSION)
# ------------------------------------------------------------------------------------------------

_MUSCLE_FEATURES = tuple(
    quantity
    for group, name in (("autochthon", "autochthonous muscles"), ("iliopsoas", "iliopsoas"))
    for quantity in (
        _q(f"{group}_volume_ml_per_cm", f"{group} volume per cm", "mL/cm", f"{name} L1–L5 volume per cm of lumbar"
           " length"),
        _hu(f"{group}_mean_hu", f"{group} mean HU", f"{name} L1–L5 mean HU over −29…150 HU", MEAN),
        _q(f"{group}_imat_fraction", f"{group} IMAT fraction", "1", f"{name} L1–L5 share of voxels in −190…−30 HU"),
    )
)

FEATURE_TABLE_V1: tuple[Quantity, ...] = (
    _q("max_genant_grade", "Maximum grade", "{grade}", "highest Genant grade among graded vertebrae"),
    _q("max_height_loss", "Maximum height loss", "1", "largest height loss among graded vertebrae"),
    _q("fractured_count", "Fractures", "{vertebrae}", "graded vertebrae with Genant grade ≥ 1"),
    _q("moderate_severe_count", "Moderate or severe", "{vertebrae}", "graded vertebrae with Genant grade ≥ 2"),
    _q("graded_count", "Graded", "{vertebrae}", "vertebrae that could be graded (complete)"),
    _hu("l1_hu", "L1 HU", "L1 trabecular mean HU, or the nearest complete non-fractured lumbar level's", MEAN),
    _hu("lumbar_mean_hu", "Lumbar mean HU", "mean trabecular HU of the non-fractured complete lumbar vertebrae", MEAN),
    *(_hu(f"hu_{level}", f"{level} HU", f"trabecular mean HU of {level} (complete vertebrae only)", MEAN)
      for level in lv.SCREENING_LEVELS),
    *_MUSCLE_FEATURES,
    _hu("aorta_hu", "Aorta HU", "mean HU of the aorta", MEAN),
    _q("contrast_enhanced", "Contrast-enhanced", "1", "1 when the aorta's mean HU is above 150 HU"),
)
"""The features of version 1 (``features.FEATURE_VERSION`` 1): what models trained before the
contrast phase use."""

PHASE_FEATURES: tuple[Quantity, ...] = (
    *(_q(f"phase_{phase}", f"Phase {phase.replace('_', ' ')}", "1",
         f"(version 2) contrast phase one-hot: 1 when the exam's phase is {phase.replace('_', ' ')} (confident), 0 "
         "when the estimate rules it out, empty when it is one of several candidates")
      for phase in ("native", "arterial", "portal_venous", "delayed")),
    _hu("l1_hu_for_phase", "L1 HU for phase", "(version 2) l1_hu minus the contrast phase's mean trabecular "
        "enhancement (unenhanced-equivalent; empty when the phase, or the enhancement of its candidates, is unknown)",
        MEAN),
    _hu("lumbar_mean_hu_for_phase", "Lumbar mean HU for phase", "(version 2) lumbar_mean_hu minus the contrast "
        "phase's mean trabecular enhancement (as l1_hu_for_phase)", MEAN),
)
"""The features version 2 adds to version 1's (read from ``exam.json``'s ``contrast.phase*`` and
``bone.*_for_phase``)."""

FEATURE_TABLE: tuple[Quantity, ...] = FEATURE_TABLE_V1 + PHASE_FEATURES
"""The features of the current version (``features.FEATURE_VERSION``), in ``features.csv``'s column
order: version 1's, then :data:`PHASE_FEATURES`."""

FLAGS: dict[str, str] = {
    # morphometry: the body, its field of view and its heights
    "posterior_elements_cut": "the arch or a process reaches the field of view's edge (the body is whole: still graded)",
    "body_cut": "a wall of the body reaches the field of view's edge: not graded",
    "endplate_cut_superior": "the superior endplate lies within 2 mm (or a voxel) of the field of view's edge: not graded",
    "endplate_cut_inferior": "the inferior endplate lies within 2 mm (or a voxel) of the field of view's edge: not graded",
    "touches_field_of_view_edge": "a cut body or endplate (with one of the flags above): not graded",
    "no_body_in_vertebrae_body_map": "the vertebrae_body map has no body voxel in this vertebra: separated by shape",
    "body_not_separated": "the body could not be cut from the arch: not measured",
    "endplates_cross": "the fitted endplates cross: heights from the mask",
    "endplate_from_mask": "an endplate could not be placed on the CT: the mask's is used",
    "imprecise_heights": "a height's SD from the CT's noise is above 0.5 mm",
    "lateral_tilt": "tilted laterally against the slices by more than 30°: heights beyond the tilts validated on"
                    " independent images",
    "heights_not_measurable": "a height could not be measured: not graded",
    "implausible_height": "a height outside the plausible range for a vertebral body: not graded",
    "implausible_depth": "a body depth outside the plausible range: not graded",
    "implausible_body_volume": "a body too small to be a vertebral body: not graded",
    "mask_off_bone": "the vertebra's mask does not lie on bone in the CT (misregistered or another CT's segmentation):"
                     " not graded",
    # grading
    "not_graded": "S1 or a level outside C1–L5: never graded",
    "heights_missing": "marked complete but a height is missing: treated as incomplete",
    "one_sided_reference": "the crush reference comes from one neighbour only",
    "no_reference": "no usable neighbour: no crush criterion",
    "crushed_neighbour_excluded": "a neighbour suspected of a crush was left out of the reference",
    "level_gap": "the adjacent level is absent from the segmentation (a missing vertebra or a labelling error?)",
    "grade_uncertain": "the heights' SDs (noise or model error) leave the grade open (two SDs change it)",
    # trabecular ROI
    "roi_limits_from_mask": "the ROI's limits come from the mask, not the fitted endplates",
    "fractured": "a fractured vertebra: its HU is reported, not used for the bone category",
    "incomplete_vertebra": "an incomplete vertebra: its HU is not used for the bone category",
    "suspected_lesion": "a sclerotic or lytic lesion is suspected (measure/lesions.py): a fracture there is possibly"
    " pathological, not counted as osteoporotic, and the vertebra is left out of the model's features",
    "instrumented": "cement or screws in or beside the body: as suspected_lesion, and its HU is left out of the bone"
    " summary",
    "diffuse_lesion": "the suspected lesion fills the body: its HU is left out of the bone summary",
    "lesions_not_assessed": "a fractured body whose core could not be checked for lesions (collapsed too far, no"
    " frame): the fracture may be pathological; the exam asks for a review",
    "focal_lesion_excluded": "a focal outlier (dense island or lytic focus) was left out of the ROI",
    "roi_small": "the ROI holds few voxels: its HU is imprecise",
    "roi_empty": "no ROI could be placed: no HU",
    # muscles
    "no_vertebra_above": "no vertebra above to bound the slab: not measured",
    "no_vertebra_below": "no vertebra below to bound the slab: not measured",
    "vertebra_above_incomplete": "the vertebra above is incomplete: the slab is bounded without it",
    "vertebra_below_incomplete": "the vertebra below is incomplete: the slab is bounded without it",
    "vertebra_incomplete": "the slab's own vertebra is incomplete",
    "cut_by_field_of_view": "the slab is cut by the field of view",
    "not_segmented": "the muscle is not in the segmentation: not measured (not 0 ml)",
    "missing_level_<level>": "an L1–L5 level is absent: the lumbar total lacks it",
    "incomplete_level_<level>": "an L1–L5 slab of this muscle is incomplete: the lumbar total is too",
}
"""Every flag a row of ``vertebrae.csv`` or ``muscles.csv`` (or a muscle total in ``exam.json``) may
carry, with its meaning."""

HEIGHTS_MEANINGLESS_FLAGS = frozenset({"implausible_height", "implausible_depth", "implausible_body_volume",
                                       "heights_not_measurable", "body_not_separated", "mask_off_bone"})
"""Flags after which a vertebra's heights mean nothing (no plausible body, or a mask off its bone):
the terminal table and the QC picture's label print no number for them."""

HEIGHTS_CUT_FLAGS = frozenset({"touches_field_of_view_edge", "body_cut", "endplate_cut_superior",
                               "endplate_cut_inferior"})
"""Flags of a body cut by the scan's edge: its heights are those of the part inside the scan, not the
vertebra's (``vertebrae.csv`` keeps them, flagged): the terminal table and the QC picture print no
number for them and draw no height line, which would end on the scan's edge."""

TABLES = {"vertebrae.csv": VERTEBRA_TABLE, "muscles.csv": MUSCLE_TABLE, "exam.json": EXAM_FIELDS,
          "features.csv": FEATURE_TABLE}


def keys(table) -> tuple[str, ...]:
    """The keys of ``table`` in order (a CSV header)."""
    return tuple(q.key for q in table)


def by_key(table) -> dict[str, Quantity]:
    """The quantities of ``table`` by key."""
    return _by_key(table)


def _code_text(code: Code | None) -> str:
    return "" if code is None else f"{code.scheme} {code.value}"


def outputs_reference() -> str:
    """The text of ``docs/outputs.md``: every output quantity with its unit, code and meaning."""
    lines = ["# Outputs", "", "Generated from `VertebralFractureScreenLib/report/measurements.py` by",
             "`python -m VertebralFractureScreenLib.report.measurements > docs/outputs.md`; do not edit by hand",
             "(a test fails when this file is stale).", "",
             f"Units are UCUM. Codes are DICOM (`DCM`), SNOMED CT (`SCT`) or this product's private scheme"
             f" `{PRIVATE_SCHEME}`; a statistic shows its derivation after the quantity's code.", ""]
    for name, table in TABLES.items():
        lines += [f"## `{name}`", "", "| key | title | unit | code | description |", "|---|---|---|---|---|"]
        for q in table:
            code = _code_text(q.code) + (f" · {_code_text(q.derivation)}" if q.derivation else "")
            unit = f"`{q.unit}`" if q.unit else ""
            lines.append(f"| `{q.key}` | {q.title} | {unit} | {code} | {q.description} |")
        lines.append("")
    lines += ["## Flags", "", "| flag | meaning |", "|---|---|"]
    lines += [f"| `{flag}` | {meaning} |" for flag, meaning in FLAGS.items()]
    lines += ["", "## Units", "", "| UCUM | meaning |", "|---|---|"]
    lines += [f"| `{unit}` | {meaning} |" for unit, meaning in UNITS.items() if unit]
    private = sorted({(c.value, c.meaning) for table in TABLES.values() for q in table
                      for c in (q.code, q.derivation) if c is not None and c.scheme == PRIVATE_SCHEME})
    lines += ["", f"## Private codes (`{PRIVATE_SCHEME}`)", "", "| code | meaning |", "|---|---|"]
    lines += [f"| `{value}` | {meaning} |" for value, meaning in private]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(outputs_reference(), end="")
