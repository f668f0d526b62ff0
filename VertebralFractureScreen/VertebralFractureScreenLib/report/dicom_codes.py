"""The codes of the DICOM objects (:mod:`.dicom_objects`) that the measurement registry does not hold:
anatomy (vertebrae, muscles, aorta), the answers of the coded evaluations (Genant grade, shape, bone
category, yes/no), the concepts of the exam's listed and yes/no findings, and the UCUM units.

Every quantity's own code (and derivation) comes from :mod:`.measurements`; this module adds only
what a DICOM object needs beyond it. Sources of the standard codes:

* vertebrae C1–L5, the sacrum, the muscles (with laterality) and the aorta: the SNOMED CT codes
  this product already matches Slicer segments by (:func:`..io.labels.terminology_for`, as
  TotalSegmentator's Slicer extension writes them; the vertebra codes are those of DICOM PS3.16
  CID 7602/7603, e.g. ``SCT 66794005`` "L1 vertebra");
* S1: ``SCT 65985001``, TotalSegmentator's DICOM SEG terminology
  (``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``); L6 and T13 (VerSe's
  transitional vertebrae) have no SNOMED CT code: private ``vertebra_L6``, ``vertebra_T13``;
* categories and types of segments: PS3.16 CID 7150 (``SCT 91723000`` Anatomical Structure,
  ``SCT 85756007`` Tissue) and CID 7166 (``SCT 3138006`` Bone), ``SCT 3572006`` Vertebral body;
* ``SCT 122496007`` Lumbar spine, ``SCT 373066001`` Yes / ``SCT 373067005`` No (CID 230),
  ``SCT 77477000`` Computed tomography, ``DCM 126000`` Imaging Measurement Report, ``DCM 113000``
  Of Interest (CID 7010): pydicom's code dictionary (DICOM PS3.16).

Private codes are in :data:`.measurements.PRIVATE_SCHEME` (``99VFS``), listed in ``docs/methods.md``
("DICOM objects"). No pydicom here: codes are :class:`.measurements.Code` values.
"""

from __future__ import annotations

from ..io.labels import terminology_for
from .measurements import PRIVATE_SCHEME, UNITS, Code


_PLAIN = {"\u2013": "-", "\u2014": "-", "\u2264": "<=", "\u2265": ">=", "\u00d7": "x", "\u00b7": "."}


def plain(text: str) -> str:
    """``text`` in DICOM's default character repertoire (ASCII): registry titles and unit meanings use
    a few typographic signs (``0–3``) that the default repertoire lacks."""
    for sign, ascii_sign in _PLAIN.items():
        text = text.replace(sign, ascii_sign)
    return text.encode("ascii", "replace").decode("ascii")


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
TISSUE = _sct("85756007", "Tissue")
BONE = _sct("3138006", "Bone")
VERTEBRAL_BODY = _sct("3572006", "Vertebral body")
LUMBAR_SPINE = _sct("122496007", "Lumbar spine")
YES = _sct("373066001", "Yes")
NO = _sct("373067005", "No")
COMPUTED_TOMOGRAPHY = _sct("77477000", "Computed tomography")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
OF_INTEREST = Code("113000", "DCM", "Of Interest")

S1_VERTEBRA = _sct("65985001", "S1 vertebra")

GENANT_GRADES = {
    0: _private("genant_0", "Genant grade 0 (normal)"),
    1: _private("genant_1", "Genant grade 1 (mild)"),
    2: _private("genant_2", "Genant grade 2 (moderate)"),
    3: _private("genant_3", "Genant grade 3 (severe)"),
}
"""Answers of the Genant grade evaluation (concept: the registry's ``genant_grade`` code)."""
SHAPES = {
    "normal": _private("shape_normal", "Normal shape"),
    "wedge": _private("shape_wedge", "Wedge deformity"),
    "biconcave": _private("shape_biconcave", "Biconcave deformity"),
    "crush": _private("shape_crush", "Crush deformity"),
}
"""Answers of the shape evaluation (concept: the registry's ``shape`` code)."""
BONE_CATEGORIES = {
    "osteoporosis-likely": _private("bone_op_likely", "Osteoporosis likely (L1 at most 110 HU)"),
    "low-bone-density-possible": _private("bone_low_poss", "Low bone density possible (L1 110-160 HU)"),
    "normal": _private("bone_normal", "Normal bone density (L1 above 160 HU)"),
}
"""Answers of the opportunistic bone category (concept: the registry's ``bone.category`` code)."""

FRACTURED_LEVEL = _private("fractured_level", "Fractured vertebra")
"""Concept of the exam's fractured levels, one evaluation each, answered by the vertebra's code."""
CONTRAST_ENHANCED = _private("contrast", "Contrast-enhanced")
CATEGORY_UNCERTAIN = _private("cat_uncertain", "Bone category uncertain")
REVIEW_NEEDED = _private("review_needed", "Review needed")
VERTEBRAL_LEVEL = _private("vertebral_level", "Vertebral level")
"""Concept of a muscle group's level slab, answered by the vertebra's code (``Lumbar spine`` for
the L1–L5 total)."""


def _terminology_codes(name: str) -> tuple[Code, Code | None] | None:
    """(type, modifier) of a TotalSegmentator class name from its Slicer terminology entry
    (``...~SCT^code^meaning~SCT^modifier^meaning~...``)."""
    entry = terminology_for(name)
    if entry is None:
        return None
    parts = entry.split("~")
    codes = []
    for part in parts[2:4]:
        fields = part.split("^")
        codes.append(Code(fields[1], fields[0], fields[2]) if len(fields) == 3 and fields[1] else None)
    return codes[0], codes[1]


def vertebra_code(level: str) -> Code:
    """The SNOMED CT code of a vertebra (``L1`` → ``SCT 66794005`` "L1 vertebra"); a private code
    for VerSe's L6 and T13."""
    if level == "S1":
        return S1_VERTEBRA
    found = _terminology_codes(f"vertebrae_{level}")
    if found is None:
        return _private(f"vertebra_{level}", f"{level} vertebra")
    return found[0]


def level_code(level: str) -> Code:
    """The code of a muscle row's level: the vertebra's, or ``Lumbar spine`` for ``lumbar``."""
    return LUMBAR_SPINE if level == "lumbar" else vertebra_code(level)


def structure_codes(name: str) -> tuple[Code, Code | None]:
    """(type, laterality modifier or None) of a structure by its TotalSegmentator class name
    (``autochthon_left`` → Deep muscle of back, Left; ``aorta`` → Aorta)."""
    found = _terminology_codes(name)
    if found is None:
        raise ValueError(f"no SNOMED CT code known for {name}")
    return found


def unit_code(unit: str) -> Code:
    """A registry unit as a UCUM code (``mm`` → ``UCUM mm`` "millimetre"; ``1`` → "no units")."""
    if unit not in UNITS or not unit:
        raise ValueError(f"no UCUM unit {unit!r} in the registry")
    return Code(unit, "UCUM", "no units" if unit == "1" else UNITS[unit])


def private_codes() -> list[Code]:
    """Every private code of this module (for the documentation and its test)."""
    values = [*GENANT_GRADES.values(), *SHAPES.values(), *BONE_CATEGORIES.values(), FRACTURED_LEVEL,
              CONTRAST_ENHANCED, CATEGORY_UNCERTAIN, REVIEW_NEEDED, VERTEBRAL_LEVEL]
    values += [vertebra_code(level) for level in ("L6", "T13")]
    return values

