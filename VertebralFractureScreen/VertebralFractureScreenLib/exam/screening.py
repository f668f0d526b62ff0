"""Screening one exam end to end (SPEC §5): the product's main job.

:func:`screen_exam` is the one entry point that ``vfscreen screen``, ``vfscreen demo``, the Slicer
module and batch code call. It takes the CT and its segmentations as paths or in-memory volumes,
segments with TotalSegmentator when no segmentation is given, and returns a
:class:`ScreeningResult`; :meth:`ScreeningResult.write` writes the SPEC §5 folder.

The measurement chain, each step in its own module:

1. :mod:`.exam_inputs` reads and checks the inputs (one sentence per problem);
2. :mod:`.morphometry` measures every vertebra's body heights in its own frame;
3. :mod:`.grading` grades them (Genant, shape, reference heights);
4. :mod:`.attenuation` measures the trabecular ROIs, the exam's bone summary and the contrast;
5. :mod:`.muscles` measures the paraspinal muscles per level slab;
6. :mod:`.qc` draws the QC picture.

The results folder's format (files, the order that never leaves a folder looking finished
before it is, reading it back) belongs to :mod:`..report.exam_folder`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from .. import levels as lv
from ..measure.attenuation import CATEGORY_UNCERTAIN_SES, bone_for_phase, bone_summary, measure_trabecular
from ..measure.confidence import PATHOLOGY_FLAGS as LESION_FLAGS
from ..measure.confidence import review_reasons, vertebra_confidence
from ..measure.contrast import ContrastResult, measure_contrast
from ..measure.lesions import find_lesions
from ..measure.level_check import check_levels, shifted_labels
from ..measure.phase import estimate_phase, no_phase
from ..measure.spine_shape import flag_lateral_tilt, spine_curvature
from ..errors import InputError
from ..io.exam_inputs import ExamInputs, load_exam, read_ct_checked
from ..model.features import exam_features
from ..geometry import find_label_boxes, voxel_spacing
from ..io.files import split_image_suffix
from ..measure.grading import GRADING_BASIS, exam_fracture_summary, grade_spine
from ..model.fracture_model import resolve_model
from ..measure.morphometry import measure_heights
from ..measure.level_slabs import lumbar_length_mm
from ..measure.muscles import measure_muscles, muscle_summary
from ..io.serialization import csv_text, jsonable
from ..report.exam_folder import FINISHED_FILE, SEGMENTATION_FOLDER, publish
from ..report.measurements import HEIGHTS_CUT_FLAGS, HEIGHTS_MEANINGLESS_FLAGS, MUSCLE_TABLE, VERTEBRA_TABLE, keys

VERTEBRA_COLUMNS = keys(VERTEBRA_TABLE)
"""Columns of ``vertebrae.csv`` as the measurement registry declares them (units, codes and
meanings in ``docs/outputs.md``): SPEC §5's, then the reader-like grade's basis."""
MUSCLE_COLUMNS = keys(MUSCLE_TABLE)
"""Columns of ``muscles.csv`` as the registry declares them: SPEC §5's six, then the
partial-volume-guarded companions, their standard errors, ``complete`` and ``flags``."""


@dataclass
class ScreeningResult:
    """Everything measured on one exam.

    ``vertebrae`` and ``muscles`` are the rows of the two CSV files (SPEC §5), ``exam`` the content
    of ``exam.json``; ``heights``, ``grades``, ``rois``, ``muscle_rows``, ``contrast`` and
    ``bone`` the measurement objects (for the Slicer module and the QC picture); ``inputs`` the
    exam's volumes."""

    exam_id: str
    vertebrae: list[dict]
    muscles: list[dict]
    exam: dict
    heights: list
    grades: list
    rois: list
    muscle_rows: list
    contrast: object
    bone: object
    inputs: ExamInputs = field(repr=False)

    def write(self, out_dir, *, qc: bool = True) -> dict[str, Path]:
        """Write the SPEC §5 files into ``out_dir`` (created when absent; see
        :func:`.exam_folder.publish`: ``exam.json`` last); returns their paths."""

        def write(staging: Path) -> None:
            (staging / "vertebrae.csv").write_text(csv_text(VERTEBRA_COLUMNS, self.vertebrae), encoding="utf-8")
            (staging / "muscles.csv").write_text(csv_text(MUSCLE_COLUMNS, self.muscles), encoding="utf-8")
            if qc:
                started = time.perf_counter()
                self._render_qc(staging / "qc.png")
                self.exam["timings_s"]["qc"] = round(time.perf_counter() - started, 3)
            (staging / FINISHED_FILE).write_text(json.dumps(jsonable(self.exam), indent=2) + "\n", encoding="utf-8")

        return publish(out_dir, write)

    def _render_qc(self, path: Path) -> None:
        from ..report.qc import render_qc  # matplotlib is imported only when a picture is drawn

        summary = self.exam["fracture"]
        contrast = self.exam["contrast"]
        parts = [self.exam_id, f"max grade {summary['max_grade'] if summary['max_grade'] is not None else '–'}"]
        if summary["fractured_levels"]:
            parts.append("fractured " + ", ".join(summary["fractured_levels"]))
        if contrast.get("phase") not in (None, "uncertain"):
            parts.append(contrast["phase"].replace("_", " ") + ("" if contrast.get("phase_confident") else "?"))
        elif contrast.get("contrast_enhanced") is not None:
            parts.append("contrast" if contrast["contrast_enhanced"] else "native")
        render_qc(self.inputs.ct.array, self.inputs.ct.ijk_to_ras, self.heights, path, grades=self.grades,
                  hu={r.level: r.mean_hu for r in self.rois}, title="  ·  ".join(parts),
                  confidence={row["level"]: row["confidence"] for row in self.vertebrae},
                  review=self.exam["review"]["reasons"])

    def table(self) -> str:
        """A short per-vertebra table for a terminal."""
        lines = [f"{'level':<6}{'Ha':>6}{'Hm':>6}{'Hp':>6}{'loss':>7}  {'grade':<6}{'shape':<15}{'HU':>6}"]
        for row in self.vertebrae:
            level, ha, hm, hp, loss, grade, shape, hu = vertebra_cells(row)
            loss = loss if loss == "–" else loss + "%"
            note = "  heights imprecise" if "imprecise_heights" in row["flags"] and ha != "–" else ""
            if LESION_FLAGS.intersection(row["flags"]) and row["genant_grade"]:
                note += "  possibly pathological"
            lines.append(f"{level:<6}{ha:>6}{hm:>6}{hp:>6}{loss:>7}  {grade:<6}{shape:<15}{hu:>6}{note}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The exam summary in a few lines for a terminal."""
        fracture, bone, contrast = self.exam["fracture"], self.exam["bone"], self.exam["contrast"]
        lines = []
        if fracture["max_grade"] is None:
            lines.append("fractures: no vertebra could be graded")
        elif fracture["fractured_levels"]:
            lines.append(f"fractures: {', '.join(fracture['fractured_levels'])} (max Genant grade {fracture['max_grade']})")
        else:
            lines.append(f"fractures: none among {fracture['graded_levels']} graded vertebrae")
        if fracture.get("possibly_pathological_levels"):
            lines.append(f"possibly pathological (lesion or implant; not counted above): "
                         f"{', '.join(fracture['possibly_pathological_levels'])}")
        if fracture.get("uncertain_grade_levels"):
            lines.append(f"grades the image's noise leaves open: {', '.join(fracture['uncertain_grade_levels'])} "
                         "(heights' SDs span a grade boundary)")
        if bone.get("l1_hu") is not None:
            lines.append(f"bone: {bone.get('l1_level') or 'L1'} {bone['l1_hu']:.0f} HU → {bone.get('category')}"
                         + (" (uncertain: the levels are doubtful)" if bone.get("category_uncertain")
                            and (self.exam.get("level_check") or {}).get("doubtful")
                            else f" (uncertain: {bone['l1_hu']:.1f} ± {CATEGORY_UNCERTAIN_SES * bone['l1_hu_se']:.1f} HU, "
                            f"{CATEGORY_UNCERTAIN_SES:g} standard errors, spans a threshold)"
                            if bone.get("category_uncertain") else "")
                         + (f"; mean of non-fractured lumbar vertebrae {bone['lumbar_mean_hu']:.0f} HU"
                            if bone.get("lumbar_mean_hu") is not None else ""))
        if contrast.get("aorta_hu") is not None:
            lines.append(f"aorta {contrast['aorta_hu']:.0f} HU → {'contrast-enhanced' if contrast['contrast_enhanced'] else 'native'}")
        if contrast.get("phase") not in (None, "uncertain") or contrast.get("phase_candidates"):
            phase = contrast["phase"].replace("_", " ")
            lines.append(f"phase: {phase}" + ("" if contrast.get("phase_confident") else
                                               f" (not certain: {' or '.join(contrast.get('phase_candidates') or [])})")
                         + (f"; bone category for this phase: {bone['category_for_phase']}"
                            f" (L1 ≤ {bone['phase_osteoporosis_threshold_hu']:.0f} / > {bone['phase_normal_threshold_hu']:.0f} HU)"
                            if bone.get("category_for_phase") and bone.get("phase_offset_hu") is not None else ""))
        lumbar = self.exam["muscle"].get("lumbar", {})
        for group in ("autochthon", "iliopsoas"):
            if group in lumbar and "not_segmented" in lumbar[group]["flags"]:
                lines.append(f"{group}: not in the segmentation, not measured")
            elif group in lumbar:
                g = lumbar[group]
                lines.append(f"{group} L1–L5: {g['volume_ml']:.0f} ml, {g['mean_hu']:.0f} HU, "
                             f"fat {100 * g['imat_fraction']:.1f} %" + ("" if g["complete"] else " (incomplete)"))
        spine = self.exam.get("spine") or {}
        angles = [f"{name} {spine[key]:.0f}° ({'–'.join(spine[key.replace('_deg', '_levels')])})"
                  for name, key in (("coronal Cobb", "coronal_cobb_deg"), ("kyphosis", "kyphosis_deg"),
                                    ("lordosis", "lordosis_deg")) if spine.get(key) is not None]
        if angles:
            lines.append("spine: " + ", ".join(angles))
        model = self.exam.get("model") or {}
        if model.get("probability") is not None:
            lines.append(f"model {model['name']}: fracture probability {model['probability']:.2f} "
                         f"({'≥' if model['positive'] else '<'} threshold {model['threshold']:.2f} → "
                         f"{'positive' if model['positive'] else 'negative'})"
                         + (" — DEMONSTRATION ONLY, not a clinical result" if model.get("demonstration") else ""))
            provenance = model.get("provenance") or {}
            auc = provenance.get("cv_auc")
            lines.append(f"model provenance: {provenance.get('kind')} trained on {provenance.get('training_exams')} exams "
                         f"({provenance.get('training_positives')} with fracture"
                         + (f", cross-validated AUC {auc:.2f}" if auc is not None else "") + f"), {provenance.get('created_utc')}")
        review = self.exam.get("review") or {}
        if review.get("needed"):
            lines.append("review needed: " + "; ".join(review["reasons"]))
        lines.extend(f"warning: {w}" for w in self.exam["warnings"])
        return "\n".join(lines)


def _cell_number(value, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"


def why_not_graded(row: dict) -> str:
    """A few words on why a row has no grade ("" when it has one): ``cut by FOV``, ``mask off
    bone``, ``not measurable``, ``not graded`` (S1) or ``incomplete``."""
    if row["genant_grade"] is not None:
        return ""
    flags = set(row["flags"])
    if "mask_off_bone" in flags:
        return "mask off bone"
    if flags & HEIGHTS_CUT_FLAGS:
        return "cut by FOV"
    if flags & HEIGHTS_MEANINGLESS_FLAGS:
        return "not measurable"
    if "not_graded" in flags:
        return "not graded"
    return "incomplete"


def vertebra_cells(row: dict) -> list[str]:
    """A ``vertebrae.csv`` row as the texts of a results table: level, Ha, Hm, Hp (mm; ``–`` when
    the vertebra is not measurable or cut by the scan, :data:`.measurements.HEIGHTS_MEANINGLESS_FLAGS`
    and :data:`.measurements.HEIGHTS_CUT_FLAGS`), the grade's loss (%,
    ``grade_loss``; ``–`` without a grade), grade (``?`` when borderline or ``grade_uncertain``,
    ``–`` when not graded), shape (or :func:`why_not_graded`) and HU."""
    open_grade = row["borderline"] or "grade_uncertain" in row["flags"]
    grade = "–" if row["genant_grade"] is None else str(row["genant_grade"]) + ("?" if open_grade else "")
    measurable = not (set(row["flags"]) & (HEIGHTS_MEANINGLESS_FLAGS | HEIGHTS_CUT_FLAGS))
    heights = [_cell_number(row[key]) if measurable else "–" for key in ("ha_mm", "hm_mm", "hp_mm")]
    loss = _cell_number(row["grade_loss"], 100, 0) if row["genant_grade"] is not None else "–"
    return [row["level"], *heights, loss, grade, why_not_graded(row) or row["shape"],
            _cell_number(row["trabecular_hu_mean"], 1, 0)]


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def exam_id_of(ct) -> str:
    """The default exam name: the CT file's (or DICOM folder's) name without its image suffix."""
    if isinstance(ct, (str, Path)):
        name = Path(ct).name
        parts = split_image_suffix(name)
        return name if parts is None else parts[0]
    return "exam"


def screen_exam(ct, *, seg=None, body_seg=None, convention: str = "totalsegmentator", exam_id: str | None = None,
                levels=lv.SCREENING_LEVELS, series_uid: str | None = None, out_dir=None,
                quality: str = "normal", device: str = "cpu", segment_body: bool = False,
                keep_label_maps: bool = True, model=None, sources: dict | None = None,
                notes: tuple[str, ...] = (), relabel_levels: bool = False,
                segment_ribs: bool = False) -> ScreeningResult:
    """Screen one exam.

    Args:
        ct: CT path (NIfTI, NRRD, MetaImage, DICOM folder) or :class:`.io.volume.Volume` in HU.
        seg: segmentation with vertebra labels (``convention`` ids; TotalSegmentator ``total`` ids
            also give muscles, aorta, cord and ribs): a path, a Volume or an integer array on the
            CT grid. None: TotalSegmentator segments the CT (needs ``out_dir``, where its label
            maps are kept under ``segmentation/`` so a re-run does not segment again).
        body_seg: optional ``vertebrae_body`` map (1 = bodies, 2 = discs), same forms as ``seg``.
        convention: ``totalsegmentator`` or ``verse``; muscles and aorta need the former.
        exam_id: name of the exam in the outputs (default: the CT file's name without suffix).
        levels: levels to report (SPEC §3: T4–L5 by default); all vertebrae present still shape
            the spine's centre line, the reference heights and the level check.
        series_uid: DICOM series to read when the CT folder holds several.
        out_dir: only used for TotalSegmentator's label maps; :meth:`ScreeningResult.write`
            writes the results.
        quality, device, segment_body, segment_ribs: TotalSegmentator settings (``fast``/``normal``,
            ``cpu``/``gpu``, also run the ``vertebrae_body`` task, also segment the ribs).
        keep_label_maps: False lets the label maps go as soon as no step needs them (the
            ``vertebrae_body`` map after the trabecular ROIs), which lowers the peak memory when
            they were read from files; the result's ``inputs`` then lack them.
        model: a fracture model to apply (:class:`.model.FractureModel`, a model file, or
            ``"demo"`` for the shipped demonstration model); its output goes to ``exam["model"]``.
        sources: how ``exam.json``'s ``inputs`` names the inputs (``ct``, ``segmentation``,
            ``vertebrae_body``) when they are not files, e.g. Slicer nodes.
        notes: warnings the caller found before screening (e.g. segments it left out), listed
            first among the exam's warnings.
        relabel_levels: move every vertebra label by the level shift that ribs and sacrum agree on
            (:mod:`..measure.level_check`), when the moved labels then pass every check.

    Raises:
        InputError: bad input (one sentence); DependencyError / SegmentationError: segmentation
            was needed and TotalSegmentator is missing, lacks weights or failed.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = resolve_model(model)  # a bad model file is refused before any work
    exam_id = exam_id or exam_id_of(ct)
    inputs, convention, segmented_by = _read_inputs(ct, seg, body_seg, convention, series_uid, out_dir, timings,
                                                    dict(quality=quality, device=device, segment_body=segment_body,
                                                         segment_ribs=segment_ribs))
    warnings_ = list(notes) + [w for w in inputs.warnings if w not in notes]

    t = time.perf_counter()
    inputs, level_check = _checked_levels(inputs, convention, relabel_levels, warnings_)
    all_heights, heights, grades = _vertebrae(inputs, convention, levels)
    spine = spine_curvature(all_heights)
    timings["morphometry"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    rois, contrast, muscle_rows, bone = _bone_and_muscles(inputs, convention, all_heights, heights, grades,
                                                          keep_label_maps, warnings_)
    phase = _phase(inputs, convention)
    timings["attenuation_and_muscles"] = round(time.perf_counter() - t, 3)
    warnings_ += list(bone.warnings) + [w for w in contrast.warnings if w not in bone.warnings]
    warnings_ += list(phase.warnings) if phase is not None else []
    warnings_ += [f"{h.level} incomplete ({', '.join(h.flags) or 'not measurable'}): not graded"
                  for h in heights if not h.complete]
    bone = _with_level_doubts(bone, level_check, warnings_)

    vertebra_rows = _vertebra_rows(exam_id, heights, grades, rois, level_check.doubtful)
    # Every muscles.csv column but the exam's id is the row's attribute of the same name.
    muscle_table = [{"exam_id": exam_id} | {column: getattr(m, column) for column in MUSCLE_COLUMNS[1:]}
                    | {"flags": list(m.flags)} for m in muscle_rows]
    timings["total"] = round(time.perf_counter() - started, 3)
    exam = _exam_record(exam_id, inputs, {**inputs.sources, **(sources or {}), "labels": convention,
                                          "segmented_by": segmented_by},
                        all_heights, heights, grades, vertebra_rows, bone, contrast, phase, muscle_rows, spine,
                        level_check, warnings_, timings)
    if model is not None:
        _apply_model(model, exam, vertebra_rows)
    return ScreeningResult(exam_id, vertebra_rows, muscle_table, exam, heights, grades, rois, muscle_rows, contrast,
                           bone, inputs)


def _checked_levels(inputs: ExamInputs, convention: str, relabel: bool, warnings_: list[str]):
    """``(inputs, level check)``: the labels' own evidence on their levels. With ``relabel``
    and a shift that ribs and sacrum agree on, the labels are moved by it (S1 kept) and checked
    again; the moved labels are used only when that check finds nothing (a warning says so)."""
    ijk_to_ras = inputs.ct.ijk_to_ras
    check = check_levels(inputs.labels.array, ijk_to_ras, convention=convention, label_boxes=inputs.label_boxes)
    if not (relabel and check.shift):
        return inputs, check
    try:
        moved = shifted_labels(inputs.labels.array, check.shift, convention, keep_s1=True)
    except ValueError:
        return inputs, check
    boxes = find_label_boxes(moved)
    recheck = check_levels(moved, ijk_to_ras, convention=convention, label_boxes=boxes)
    direction = "caudally" if check.shift > 0 else "cranially"
    if recheck.doubtful:
        warnings_.append(f"levels not relabelled: moved {abs(check.shift)} level(s) {direction} as ribs and sacrum "
                         f"suggest, the labels still disagree ({recheck.disagreements[0]})")
        return inputs, check
    warnings_.append(f"levels relabelled: every vertebra label moved {abs(check.shift)} level(s) {direction}, where "
                     f"ribs and sacrum agree ({'; '.join(check.disagreements)})")
    labels = replace(inputs.labels, array=moved)
    return replace(inputs, labels=labels, label_boxes=boxes), replace(recheck, relabelled_by=check.shift)


def _with_level_doubts(bone, level_check, warnings_: list[str]):
    """The bone summary, its category marked uncertain when the levels are doubtful (it rests on L1
    being L1); appends one warning per finding of the level check to ``warnings_``."""
    if not level_check.doubtful:
        return bone
    warnings_ += [f"levels doubtful: {finding}" for finding in level_check.disagreements]
    if bone.l1_hu is None:
        return bone
    warnings_.append(f"levels doubtful: the bone category, read at the vertebra labelled {bone.l1_level or 'L1'}, "
                     "may belong to another level (category marked uncertain)")
    return replace(bone, category_uncertain=True)


def _apply_model(model, exam: dict, vertebra_rows: list[dict]) -> None:
    """Put ``model``'s output into ``exam["model"]`` (and a warning when it imputed features)."""
    exam["model"] = model.apply(exam_features(exam, vertebra_rows))
    imputed = exam["model"]["imputed_features"]
    if imputed:
        exam["warnings"].append(f"model {model.name!r}: {len(imputed)} missing features imputed with the training "
                                f"cohort's medians ({', '.join(imputed)})")


def _read_inputs(ct, seg, body_seg, convention, series_uid, out_dir, timings: dict, segmenting: dict):
    """``(inputs, convention, segmented_by)``: the exam read, segmented first when ``seg`` is None
    (``segmenting``: :func:`_segmented`'s TotalSegmentator settings); the seconds go to ``timings``."""
    started = time.perf_counter()
    ct, seg, body_seg, convention, segmented_by, seconds = _segmented(ct, seg, body_seg, convention, series_uid,
                                                                      out_dir, **segmenting)
    if seconds is not None:
        timings["segmentation"] = seconds
    inputs = load_exam(ct, seg, body_seg, convention=convention, series_uid=series_uid)
    timings["read"] = round(time.perf_counter() - started - (seconds or 0.0), 3)
    return inputs, convention, segmented_by


def _segmented(ct, seg, body_seg, convention, series_uid, out_dir, *, quality, device, segment_body, segment_ribs):
    """The exam's CT and segmentations, segmenting with TotalSegmentator when ``seg`` is None:
    ``(ct, seg, body_seg, convention, segmented_by, seconds)`` (seconds None when given)."""
    if seg is not None:
        return ct, seg, body_seg, convention, "given", None
    if out_dir is None:
        raise ValueError("segmentation by TotalSegmentator needs out_dir to keep its label maps")
    from ..segment.totalsegmentator import RIB_CLASSES, SCREENING_CLASSES, segment_ct

    volume = read_ct_checked(ct, series_uid)
    classes = SCREENING_CLASSES + (RIB_CLASSES if segment_ribs else ())
    result = segment_ct(volume, Path(out_dir) / SEGMENTATION_FOLDER, quality=quality, device=device, body=segment_body,
                        classes=classes)
    if result.body_path is not None and body_seg is None:
        body_seg = result.body_path
    segmented_by = (f"TotalSegmentator {result.totalsegmentator_version} ({result.quality}"
                    f"{', reused' if result.reused else ''})")
    return volume, result.total_path, body_seg, "totalsegmentator", segmented_by, round(result.seconds, 3)


def _vertebrae(inputs: ExamInputs, convention: str, levels) -> tuple[list, list, list]:
    """Every vertebra's heights (all present: neighbours give the reference heights and the muscle
    slabs their endplates), the reported levels' heights and their grades. Refuses a
    segmentation that does not lie on the CT's bone, or that has none of ``levels``."""
    labels, ijk_to_ras = inputs.labels.array, inputs.ct.ijk_to_ras
    all_heights = measure_heights(labels, ijk_to_ras, convention=convention, body_labels=inputs.body_labels,
                                  ct=inputs.ct.array, label_boxes=inputs.label_boxes, label_grid=inputs.label_grid)
    flag_lateral_tilt(all_heights, ijk_to_ras)  # before grading: the flag lowers the confidence
    off_bone = [h.level for h in all_heights if "mask_off_bone" in h.flags]
    if all_heights and 2 * len(off_bone) >= len(all_heights):
        raise InputError(f"the segmentation does not lie on the CT's bone ({len(off_bone)} of {len(all_heights)} "
                         "vertebrae show no bone edge under their outline): is it this CT's segmentation, on its grid?")
    grades_all = {g.level: g for g in grade_spine(all_heights)}
    heights = [h for h in all_heights if h.level in levels]
    if not heights:
        other = "verse" if convention == "totalsegmentator" else "totalsegmentator"
        found = [h.level for h in all_heights]
        raise InputError(f"the segmentation has no vertebra in the screened levels {levels[0]}–{levels[-1]} "
                         f"(only {', '.join(found)} in the {convention} convention); check --levels, "
                         f"or try --labels {other}")
    return all_heights, heights, [grades_all[h.level] for h in heights]


def _bone_and_muscles(inputs: ExamInputs, convention: str, all_heights, heights, grades, keep_label_maps: bool,
                      warnings_: list[str]):
    """The trabecular ROIs, the aorta's contrast, the muscle rows and the bone summary; appends
    what limits them to ``warnings_``."""
    ct_array, labels, ijk_to_ras = inputs.ct.array, inputs.labels.array, inputs.ct.ijk_to_ras
    rois = measure_trabecular(ct_array, labels, ijk_to_ras, heights, body_labels=inputs.body_labels, grades=grades)
    lesions = {found.level: found for found in find_lesions(ct_array, labels, ijk_to_ras, all_heights,
                                                            body_labels=inputs.body_labels,
                                                            label_boxes=inputs.label_boxes, convention=convention)}
    fractured = {g.level for g in grades if (g.genant_grade or 0) >= 1}
    for roi in rois:  # the lesion flags reach the vertebra's row through its ROI's
        found = lesions.get(roi.level)
        if found is not None:
            extra = [*found.flags, *(["diffuse_lesion"] if found.suspected_lesion and found.diffuse else [])]
            # an unassessed body matters on a fracture (it may be pathological), not elsewhere
            unchecked = roi.level in fractured and not found.instrumented
            roi.flags += [f for f in extra if (f != "lesions_not_assessed" or unchecked) and f not in roi.flags]
    if not keep_label_maps:
        inputs.body_labels = None
    if convention == "totalsegmentator":
        contrast = measure_contrast(ct_array, labels, ijk_to_ras, label_boxes=inputs.label_boxes)
        muscle_rows = measure_muscles(ct_array, labels, ijk_to_ras, all_heights,
                                      levels=[h.level for h in heights if h.level != "S1"],
                                      label_boxes=inputs.label_boxes, label_grid=inputs.label_grid)
        absent = sorted({m.muscle for m in muscle_rows if "not_segmented" in m.flags})
        if absent:
            warnings_.append(f"no {', '.join(absent)} label{'s' if len(absent) > 1 else ''} in the segmentation: "
                             "not measured (volume left empty, not 0 ml)")
    else:
        contrast = ContrastResult(warnings=["no aorta label in a VerSe segmentation: contrast not assessed"])
        muscle_rows = []
        warnings_.append("VerSe labels carry no muscles: muscle metrics not measured")
    for found in lesions.values():
        what = found.suspected_lesion and f"a {found.suspected_lesion} lesion" or found.instrumented
        if what and found.level in {h.level for h in heights}:
            warnings_.append(f"{found.level}: suspected {what}: a fracture there is reported as possibly pathological"
                             " and not counted as osteoporotic" + ("" if found.suspected_lesion and not found.diffuse
                                                                    else "; its HU is left out of the bone summary"))
    return rois, contrast, muscle_rows, bone_summary(rois, contrast)


def _phase(inputs: ExamInputs, convention: str):
    """The contrast phase from the vessels and kidneys (None for a VerSe segmentation, which has
    none of them)."""
    if convention != "totalsegmentator":
        return None
    return estimate_phase(inputs.ct.array, inputs.labels.array, inputs.ct.ijk_to_ras, label_boxes=inputs.label_boxes)


def _vertebra_rows(exam_id: str, heights, grades, rois, levels_doubtful: bool) -> list[dict]:
    """The rows of ``vertebrae.csv`` (keys of :data:`VERTEBRA_COLUMNS`)."""
    rows = []
    roi_by_level = {r.level: r for r in rois}
    for h, g in zip(heights, grades):
        roi = roi_by_level.get(h.level)
        flags = list(dict.fromkeys(list(h.flags) + list(g.flags) + (list(roi.flags) if roi else [])))
        rows.append({
            "exam_id": exam_id, "level": h.level, "complete": bool(g.complete),
            "ha_mm": h.ha_mm, "hm_mm": h.hm_mm, "hp_mm": h.hp_mm,
            "ha_hp": g.ha_hp, "hm_hp": g.hm_hp, "hp_ref_ratio": g.hp_ref_ratio, "height_loss": g.height_loss,
            "genant_grade": g.genant_grade, "shape": g.shape, "borderline": bool(g.borderline),
            "trabecular_hu_mean": roi.mean_hu if roi else float("nan"),
            "trabecular_hu_median": roi.median_hu if roi else float("nan"),
            "trabecular_hu_sd": roi.sd_hu if roi else float("nan"),
            "roi_voxels": roi.voxels if roi else 0,
            "body_volume_ml": h.body_volume_ml, "flags": flags,
            "quantitative_grade": g.quantitative_grade, "grade_basis": g.grade_basis, "grade_loss": g.grade_loss,
            "hm_min_mm": h.hm_min_mm,
            "expected_ha_mm": g.expected_ha_mm, "expected_hm_mm": g.expected_hm_mm, "expected_hp_mm": g.expected_hp_mm,
            "middle_loss": g.middle_loss, "size_loss": g.size_loss, "area_loss": g.area_loss,
            "endplate_depression": g.endplate_depression, "reference_levels": list(g.reference_levels),
            "confidence": vertebra_confidence(g, flags, levels_doubtful),
        })
    return rows


def _exam_record(exam_id, inputs: ExamInputs, sources: dict, all_heights, heights, grades, vertebra_rows, bone,
                 contrast, phase, muscle_rows, spine, level_check, warnings_: list[str], timings: dict) -> dict:
    """The content of ``exam.json`` without the model's part (fields as
    :data:`.measurements.EXAM_FIELDS` declares them)."""
    ct_array, ijk_to_ras = inputs.ct.array, inputs.ct.ijk_to_ras
    reasons = review_reasons(vertebra_rows, level_check.doubtful) + (
        [f"level labels moved by {level_check.relabelled_by:+d} (see level_check)"] if level_check.relabelled_by else [])
    return {
        "exam_id": exam_id,
        "software": {"name": "VertebralFractureScreen", "version": __version__},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": sources,
        "geometry": {"shape_kji": list(ct_array.shape),
                     "spacing_mm": [round(float(s), 4) for s in voxel_spacing(ijk_to_ras)],
                     "ijk_to_ras": np.round(ijk_to_ras, 6).tolist()},
        "levels_present": [h.level for h in heights],
        "levels_complete": [h.level for h in heights if h.complete],
        "fracture": exam_fracture_summary(grades, [r["level"] for r in vertebra_rows
                                                   if LESION_FLAGS.intersection(r["flags"])]),
        "grading": GRADING_BASIS,
        # SD of each height from the CT's noise (morphometry.VertebraHeights.ha_sd_mm); NaN → null
        "height_sd_mm": {h.level: {key: round(float(getattr(h, f"{key}_sd_mm")), 3) for key in ("ha", "hm", "hp")}
                         for h in heights},
        # SD of each graded vertebra's height loss from those (grading.VertebraGrade.height_loss_sd)
        "height_loss_sd": {g.level: round(float(g.height_loss_sd), 4) for g in grades if g.graded},
        "bone": {**_bone_json(bone), **bone_for_phase(bone, phase if phase is not None else no_phase())},
        "contrast": {**asdict(contrast), **(phase if phase is not None else no_phase()).exam_fields()},
        "muscle": ({**muscle_summary(muscle_rows), "lumbar_length_mm": lumbar_length_mm(all_heights)} if muscle_rows
                   else {"lumbar": {}, "levels": [], "incomplete_levels": [], "lumbar_length_mm": None}),
        "review": {"needed": bool(reasons), "reasons": reasons},
        "spine": _spine_json(spine),
        "level_check": level_check.as_dict(),
        "model": {"name": None, "probability": None, "threshold": None, "positive": None, "provenance": None,
                  "note": "no model applied"},
        "warnings": list(dict.fromkeys(warnings_)),
        "timings_s": timings,
    }


def _spine_json(spine) -> dict:
    """``exam.json``'s ``spine`` block: angles in degrees (null when not measurable)."""
    return {"coronal_cobb_deg": _number(spine.coronal_cobb_deg),
            "coronal_cobb_levels": list(spine.coronal_cobb_levels or []),
            "kyphosis_deg": _number(spine.kyphosis_deg), "kyphosis_levels": list(spine.kyphosis_levels or []),
            "lordosis_deg": _number(spine.lordosis_deg), "lordosis_levels": list(spine.lordosis_levels or []),
            "levels": list(spine.levels)}


def _bone_json(bone) -> dict:
    data = asdict(bone)
    return {key: _number(value) if isinstance(value, float) else value for key, value in data.items()}
