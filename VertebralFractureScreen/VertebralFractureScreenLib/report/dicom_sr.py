"""The Comprehensive 3D SR of one screened exam: a TID 1500 Measurement Report built with highdicom.

Content (every quantity's concept, derivation and unit from the registry, :mod:`.measurements`):

* per screened vertebra, a TID 1411 group (tracking identifier = the level, finding and finding
  site = the vertebra's code, referenced segment = its SEG segment): Ha, Hm, Hp (the registry's
  three distinct private concepts ``ha``, ``hm``, ``hp``: dcmqi, Slicer's reader, ignores
  modifiers, so one "Height" concept with a position modifier would show as three identical rows),
  Ha/Hp, Hm/Hp, Hp/Hp ref, height loss (these seven left out where the heights mean nothing or
  belong to a body cut by the scan, as the QC picture leaves them out), body volume
  (``SCT 118565006``), confidence, and the Genant grade and shape as coded evaluations (private
  answers, :mod:`.dicom_codes`);
* per vertebra with a trabecular ROI segment, a TID 1411 group "<level> trabecular ROI" referencing
  it: trabecular HU mean, median and SD (``DCM 112031`` Attenuation Coefficient in ``[hnsf'U]``
  with the derivations ``SCT 373098007`` Mean, private ``median``, ``SCT 386136009`` Standard
  Deviation). A TID 1411 group references one region, so the ROI's HU have a group of their own;
* per muscle and level slab (and the L1–L5 total, level "Lumbar spine"), a TID 1411 group
  referencing the muscle's segment (the whole muscle: the slab is not a segment), with the level
  as a coded evaluation: volume, mean HU, IMAT fraction, fat fraction;
* TID 1501 groups of the exam: "Fractures" (maximum grade, number of fractures and of graded
  vertebrae, one "Fractured vertebra" evaluation per fractured level, review needed), "Bone
  density" (finding site: the level read, L1 or its substitute: its trabecular HU, the bone
  category and whether it is uncertain), "Contrast" (finding site: the aorta: its HU and the
  contrast phase) and, with a model, "Fracture model" (probability, ``DCM 122157``, and threshold,
  with the model as algorithm: name, version = its creation date, parameters = its provenance).
  Groups, not finding sites on single measurements: dcmqi reads finding sites per group only.

A value that is missing (NaN, None) is left out, never written as 0. The observer is a device: this
software with its version. The document around highdicom's content is written here
(:func:`sr_document`, :mod:`.dicom_encode`). pydicom and highdicom are imported here only
(optional).
"""

from __future__ import annotations

import math

from .. import __version__
from . import dicom_codes as dc
from .dicom_seg import SEG_STORAGE, SOFTWARE, Segment
from .dicom_encode import write_part10
from .dicom_series import (ReferenceSeries, concept, dicom_packages, new_instance, private_scheme_identification,
                           text_value)
from .measurements import (EXAM_FIELDS, HEIGHTS_CUT_FLAGS, HEIGHTS_MEANINGLESS_FLAGS, MUSCLE_TABLE, VERTEBRA_TABLE,
                           Code, by_key)

VERTEBRA_MEASUREMENTS = ("ha_mm", "hm_mm", "hp_mm", "ha_hp", "hm_hp", "hp_ref_ratio", "height_loss",
                         "body_volume_ml", "confidence")
ROI_MEASUREMENTS = ("trabecular_hu_mean", "trabecular_hu_median", "trabecular_hu_sd")
HEIGHT_KEYS = ("ha_mm", "hm_mm", "hp_mm", "ha_hp", "hm_hp", "hp_ref_ratio", "height_loss")
"""The measurements that rest on the heights."""
MUSCLE_MEASUREMENTS = ("volume_ml", "mean_hu", "imat_fraction", "fat_fraction")
"""The muscles' partial-volume-guarded ``lean_hu`` and the standard errors are left out: they share
``mean_hu``'s concept and derivation (and the ``se`` derivation), so a reader could not tell them
apart."""
MANUFACTURER = "VertebralFractureScreen developers"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
CURRENT_REQUESTED_PROCEDURE_EVIDENCE = 0x0040A375
"""The SR's elements from this tag on (evidence, flags, template, content) are encoded directly
(:mod:`.dicom_encode`)."""


def _present(items) -> list | None:
    """The items that are not None, or None when there are none (highdicom's "no items")."""
    return [item for item in items if item is not None] or None


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Builder:
    """Turns registry quantities and codes into highdicom content items."""

    def __init__(self, seg_uid: str, ct_series_uid: str, segments: list[Segment]):
        self.pydicom, self.hd = dicom_packages()
        self.seg_uid, self.ct_series_uid = seg_uid, ct_series_uid
        self.numbers = {segment.key: number for number, segment in enumerate(segments, start=1)}
        self.segments = {segment.key: segment for segment in segments}

    def measurement(self, quantity, value, *, algorithm=None):
        """A TID 300 measurement of a registry quantity, or None when ``value`` is missing."""
        value = _number(value)
        if value is None:
            return None
        hd = self.hd
        return hd.sr.Measurement(
            name=concept(quantity.code), value=value, unit=concept(dc.unit_code(quantity.unit)),
            derivation=concept(quantity.derivation) if quantity.derivation is not None else None,
            algorithm_id=algorithm)

    def evaluation(self, name: Code, value: Code | None):
        return None if value is None else self.hd.sr.QualitativeEvaluation(concept(name), concept(value))

    def yes_no(self, name: Code, value):
        return None if value is None else self.evaluation(name, dc.YES if value else dc.NO)

    def exam_group(self, identifier: str, site: Code | None, measurements, evaluations):
        """A TID 1501 group, or None without any item."""
        measurements, evaluations = _present(measurements), _present(evaluations)
        if not (measurements or evaluations):
            return None
        hd = self.hd
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=self.pydicom.uid.generate_uid(), identifier=identifier),
            finding_sites=[hd.sr.FindingSite(concept(site))] if site is not None else None,
            measurements=measurements, qualitative_evaluations=evaluations)

    def volumetric_group(self, key: str, identifier: str, measurements, evaluations=()):
        """A TID 1411 group referencing segment ``key``, or None without that segment or any item."""
        measurements, evaluations = _present(measurements), _present(evaluations)
        if key not in self.segments or not (measurements or evaluations):
            return None
        hd, segment = self.hd, self.segments[key]
        site = hd.sr.FindingSite(concept(segment.region or segment.type),
                                 laterality=concept(segment.modifier) if segment.modifier else None)
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=self.pydicom.uid.generate_uid(), identifier=identifier),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SEG_STORAGE, sop_instance_uid=self.seg_uid, segment_number=self.numbers[key],
                source_series=hd.sr.SourceSeriesForSegmentation(self.ct_series_uid)),
            finding_type=concept(segment.region or segment.type), finding_sites=[site],
            measurements=measurements, qualitative_evaluations=evaluations)


def _vertebra_groups(builder: _Builder, rows: list[dict]) -> list:
    """Per vertebra, its group and its trabecular ROI's. Heights (and their ratios and loss) that
    mean nothing, or belong to a body cut by the scan, are left out, as the QC picture and the
    terminal table leave them out (:data:`.measurements.HEIGHTS_MEANINGLESS_FLAGS`, ``HEIGHTS_CUT_FLAGS``)."""
    table = by_key(VERTEBRA_TABLE)
    groups = []
    for row in rows:
        level = row["level"]
        grade = row.get("genant_grade")
        keys = VERTEBRA_MEASUREMENTS if heights_shown(row) else tuple(k for k in VERTEBRA_MEASUREMENTS
                                                                        if k not in HEIGHT_KEYS)
        evaluations = [builder.evaluation(table["genant_grade"].code, dc.GENANT_GRADES.get(grade)),
                       builder.evaluation(table["shape"].code,
                                          dc.SHAPES.get(row.get("shape")) if grade is not None else None)]
        groups.append(builder.volumetric_group(
            f"vertebra:{level}", level, [builder.measurement(table[key], row.get(key)) for key in keys],
            evaluations))
        groups.append(builder.volumetric_group(
            f"roi:{level}", f"{level} trabecular ROI",
            [builder.measurement(table[key], row.get(key)) for key in ROI_MEASUREMENTS]))
    return groups


def heights_shown(row: dict) -> bool:
    """Whether a ``vertebrae.csv`` row's heights go into the SR (not meaningless, not cut)."""
    return not set(row.get("flags") or ()) & (HEIGHTS_MEANINGLESS_FLAGS | HEIGHTS_CUT_FLAGS)


def _muscle_groups(builder: _Builder, rows: list[dict]) -> list:
    table = by_key(MUSCLE_TABLE)
    groups = []
    for row in rows:
        if "not_segmented" in (row.get("flags") or ()):
            continue
        level = row["level"]
        groups.append(builder.volumetric_group(
            f"muscle:{row['muscle']}", f"{row['muscle']} {level}",
            [builder.measurement(table[key], row.get(key)) for key in MUSCLE_MEASUREMENTS],
            [builder.evaluation(dc.VERTEBRAL_LEVEL, dc.level_code(level))]))
    return groups


def _model_algorithm(builder: _Builder, model: dict):
    provenance = model.get("provenance") or {}
    parameters = [dc.plain(f"{key}={value}") for key, value in sorted(provenance.items()) if value is not None]
    parameters += [f"demonstration={bool(model.get('demonstration'))}"]
    return builder.hd.sr.AlgorithmIdentification(name=dc.plain(str(model.get("name") or "model")),
                                                 version=dc.plain(str(provenance.get("created_utc") or "unknown")),
                                                 parameters=parameters)


def _exam_groups(builder: _Builder, exam: dict) -> list:
    """The TID 1501 groups of the exam's findings: fractures, bone density (finding site: the level
    read), contrast (the aorta) and the fracture model; each concept once per group, since dcmqi
    reads finding sites per group only."""
    fields = by_key(EXAM_FIELDS)
    fracture, bone = exam.get("fracture") or {}, exam.get("bone") or {}
    contrast, model = exam.get("contrast") or {}, exam.get("model") or {}
    l1_level = bone.get("l1_level")
    groups = [("Fractures", None, [
        builder.measurement(fields["fracture.max_grade"], fracture.get("max_grade")),
        builder.measurement(fields["fracture.count"], fracture.get("count")),
        builder.measurement(fields["fracture.graded_levels"], fracture.get("graded_levels")),
    ], [*(builder.evaluation(dc.FRACTURED_LEVEL, dc.vertebra_code(level))
          for level in fracture.get("fractured_levels") or ()),
        builder.yes_no(dc.REVIEW_NEEDED, (exam.get("review") or {}).get("needed"))]),
        ("Bone density", dc.vertebra_code(l1_level) if l1_level else None, [
            builder.measurement(fields["bone.l1_hu"], bone.get("l1_hu"))], [
            builder.evaluation(fields["bone.category"].code, dc.BONE_CATEGORIES.get(bone.get("category"))),
            builder.yes_no(dc.CATEGORY_UNCERTAIN, bone.get("category_uncertain"))]),
        ("Contrast", dc.structure_codes("aorta")[0], [
            builder.measurement(fields["contrast.aorta_hu"], contrast.get("aorta_hu"))], [
            builder.yes_no(dc.CONTRAST_ENHANCED, contrast.get("contrast_enhanced"))])]
    if _number(model.get("probability")) is not None:
        algorithm = _model_algorithm(builder, model)
        groups.append(("Fracture model", None, [
            builder.measurement(fields["model.probability"], model["probability"], algorithm=algorithm),
            builder.measurement(fields["model.threshold"], model.get("threshold"), algorithm=algorithm)], []))
    return [builder.exam_group(*group) for group in groups]


def device_observer(pydicom, hd):
    """The observation context: this software, with its version, as the device observer."""
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=pydicom.uid.generate_uid(entropy_srcs=[SOFTWARE, __version__]), name=SOFTWARE,
        manufacturer_name=MANUFACTURER, model_name=f"VertebralFractureScreenLib {__version__}")
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def measurement_report(result, reference: ReferenceSeries, seg_uid: str, segments: list[Segment]):
    """The TID 1500 content of a :class:`..exam.screening.ScreeningResult` (module docstring)."""
    builder = _Builder(seg_uid, str(reference.first.SeriesInstanceUID), segments)
    groups = _vertebra_groups(builder, result.vertebrae) + _muscle_groups(builder, result.muscles)
    groups = [group for group in groups + _exam_groups(builder, result.exam) if group is not None]
    hd = builder.hd
    return hd.sr.MeasurementReport(
        observation_context=device_observer(builder.pydicom, hd),
        procedure_reported=concept(dc.COMPUTED_TOMOGRAPHY), imaging_measurements=groups,
        title=concept(dc.IMAGING_MEASUREMENT_REPORT))


def evidence(objects) -> list:
    """The Current Requested Procedure Evidence Sequence's items: ``objects`` (pydicom datasets of
    the CT's study) by series."""
    pydicom, _ = dicom_packages()
    by_series: dict[str, list] = {}
    for ds in objects:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = text_value(ds, "SOPClassUID")
        item.ReferencedSOPInstanceUID = text_value(ds, "SOPInstanceUID")
        by_series.setdefault(text_value(ds, "SeriesInstanceUID"), []).append(item)
    study = pydicom.Dataset()
    study.ReferencedSeriesSequence = []
    for uid, items in by_series.items():
        series = pydicom.Dataset()
        series.ReferencedSOPSequence, series.SeriesInstanceUID = items, uid
        study.ReferencedSeriesSequence.append(series)
    study.StudyInstanceUID = text_value(objects[0], "StudyInstanceUID")
    return [study]


def sr_document(report, reference: ReferenceSeries, evidence_objects: list, uids: dict, equipment: dict):
    """The Comprehensive 3D SR document of a TID 1500 ``report`` (highdicom's content), its patient
    and study the CT's, ``uids`` its series and instance, ``equipment`` its Manufacturer (…).

    Written directly rather than through highdicom's ``Comprehensive3DSR``, which copies and parses
    the content tree again: 1.4–2.5 s on the 512 x 512 x 500 exam's 90 groups, most of the 3 s."""
    ds = content_document(reference, COMPREHENSIVE_3D_SR, "SR", report[0], evidence_objects, uids, equipment,
                          "Vertebral fracture screening measurements")
    ds.PerformedProcedureCodeSequence = []
    ds.CodingSchemeIdentificationSequence = private_scheme_identification()
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    return ds


def content_document(reference: ReferenceSeries, sop_class: str, modality: str, root, evidence_objects: list,
                     uids: dict, equipment: dict, description: str):
    """A structured document (SR, KOS) in the CT's study: :func:`.dicom_series.new_instance`, the
    evidence it references, and the root content item ``root`` (highdicom's: its concept,
    template and content tree)."""
    ds = new_instance(reference, sop_class, modality, uids, equipment, description)
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = evidence(evidence_objects)
    for elem in root:
        ds.add(elem)
    return ds


def write_sr(path, result, reference: ReferenceSeries, seg, segments: list[Segment], uids: dict,
             equipment: dict):
    """Write the SR to ``path`` (``seg``: the SEG's dataset, evidence with the CT's instances);
    returns the SR dataset."""
    report = measurement_report(result, reference, str(seg.SOPInstanceUID), segments)
    ds = sr_document(report, reference, [*reference.datasets, seg], uids, equipment)
    write_part10(path, ds, fast_from=CURRENT_REQUESTED_PROCEDURE_EVIDENCE)
    return ds
