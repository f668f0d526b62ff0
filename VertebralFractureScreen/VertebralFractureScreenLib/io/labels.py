"""Label conventions, SNOMED CT terminology and the one rule that matches a segment to a structure.

Structures are named by TotalSegmentator class names (``vertebrae_L1``, ``autochthon_left``);
a label convention maps them to label ids (:func:`convention_ids`). A 3D Slicer segment is
matched to a structure by :func:`segment_structure`, and only by it, whether it comes from a
``.seg.nrrd`` file or a Slicer scene: by segment ID, then by terminology (never by display name
alone), then by the generic ID of an unnamed label map. No SimpleITK here.
"""

from __future__ import annotations

import re

from .. import levels
from ..errors import InputError

LABEL_MAP_CONVENTIONS: tuple[str, ...] = ("totalsegmentator", "verse", "vertebrae_body")
"""Label conventions that Slicer segments can be mapped to (see :func:`.images.read_labelmap`)."""


class LabelMapWarning(UserWarning):
    """A label map was read, but part of it was left out or overwritten (segments not mapped,
    segments overlapping)."""


def convention_ids(convention: str) -> dict[str, int]:
    """Map TotalSegmentator class name (= Slicer segment ID) → label id in a convention."""
    if convention == "totalsegmentator":
        return {name: label for label, name in levels.TOTAL_CLASS_NAMES.items()}
    if convention == "verse":
        ids = {f"vertebrae_{level}": label for level, label in levels.VERSE_VERTEBRA_IDS.items()}
        ids.update({f"vertebrae_{level}": label for label, level in levels.VERSE_EXTRA_IDS.items()})
        return ids
    if convention == "vertebrae_body":
        return {"vertebrae_body": levels.BODY_LABEL, "intervertebral_discs": levels.DISC_LABEL}
    raise InputError(f"unknown label convention {convention!r}; use one of {', '.join(LABEL_MAP_CONVENTIONS)}")


# ------------------------------------------------------------------------------------------------
# Terminology
# ------------------------------------------------------------------------------------------------

# SNOMED CT codes (segmented property type, optional modifier) of the structures this product
# uses, as TotalSegmentator's Slicer extension writes them in segment terminology.
_LEFT, _RIGHT = "7771000", "24028007"
_SNOMED_STRUCTURES: dict[tuple[str, str | None], str] = {
    ("54735007", None): "sacrum",
    ("15825003", None): "aorta",
    ("2748008", None): "spinal_cord",
    ("244849004", _LEFT): "autochthon_left",
    ("244849004", _RIGHT): "autochthon_right",
    ("68455001", _LEFT): "iliopsoas_left",
    ("68455001", _RIGHT): "iliopsoas_right",
    ("3572006", None): "vertebrae_body",
}
_SNOMED_VERTEBRAE = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001", "T1": "64864005", "T2": "53733008", "T3": "1626008",
    "T4": "73071006", "T5": "56401006", "T6": "45296009", "T7": "62487009", "T8": "11068009",
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
}
_SNOMED_STRUCTURES.update({(code, None): f"vertebrae_{level}" for level, code in _SNOMED_VERTEBRAE.items()})
_SNOMED_MEANINGS = {
    "54735007": "Sacrum",
    "15825003": "Aorta",
    "2748008": "Spinal cord",
    "244849004": "Deep muscle of back",
    "68455001": "Iliopsoas muscle",
    "3572006": "Vertebral body",
}
_SNOMED_MEANINGS.update({code: f"{level} vertebra" for level, code in _SNOMED_VERTEBRAE.items()})
_VERTEBRA_MEANING = re.compile(r"^\s*([CTLS])\s*(\d{1,2})\s+vertebra\s*$", re.IGNORECASE)


def vertebra_from_text(text: str) -> str | None:
    """``vertebrae_L1`` for a text such as ``L1 vertebra``; None otherwise."""
    match = _VERTEBRA_MEANING.match(text or "")
    if not match:
        return None
    level = f"{match.group(1).upper()}{int(match.group(2))}"
    return f"vertebrae_{level}" if level in levels.LEVEL_INDEX or level in ("L6", "T13") else None


def structure_from_terminology(entry: str) -> str | None:
    """TotalSegmentator class name named by a Slicer terminology entry
    (``context~category~type~typeModifier~anatomicContext~region~regionModifier``, each code as
    ``scheme^value^meaning``); None when it names none of the structures this product knows."""
    parts = entry.split("~")
    if len(parts) < 3:
        return None
    type_code = parts[2].split("^")
    modifier = parts[3].split("^") if len(parts) > 3 else []
    code = type_code[1].strip() if len(type_code) > 1 else ""
    modifier_code = modifier[1].strip() if len(modifier) > 1 and modifier[1].strip() else None
    if (code, modifier_code) in _SNOMED_STRUCTURES:
        return _SNOMED_STRUCTURES[(code, modifier_code)]
    if modifier_code is None or modifier_code not in (_LEFT, _RIGHT):
        meaning = type_code[2] if len(type_code) > 2 else ""
        return vertebra_from_text(meaning)
    return None


def terminology_for(name: str) -> str | None:
    """Slicer terminology entry for the TotalSegmentator class names this product uses."""
    for (code, modifier), structure in _SNOMED_STRUCTURES.items():
        if structure == name:
            meaning = _SNOMED_MEANINGS[code]
            modifier_text = f"SCT^{modifier}^{'Left' if modifier == _LEFT else 'Right'}" if modifier else "^^"
            return (
                "Segmentation category and type - 3D Slicer General Anatomy list"
                f"~SCT^123037004^Anatomical Structure~SCT^{code}^{meaning}~{modifier_text}"
                "~Anatomic codes - DICOM master list~^^~^^"
            )
    return None


def segment_color(label: int) -> tuple[float, float, float]:
    """A stable, distinct-looking colour (RGB, each 0..1) for a label id (golden-angle hue walk)."""
    hue = (label * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 - int(hue * 6)
    high, low = 0.9, 0.3
    rising, falling = low + (high - low) * fraction, high - (high - low) * fraction
    return [
        (high, rising, low), (falling, high, low), (low, high, rising),
        (low, falling, high), (rising, low, high), (high, low, falling),
    ][sector % 6]


# ------------------------------------------------------------------------------------------------
# The segment-matching rule
# ------------------------------------------------------------------------------------------------

_GENERIC_SEGMENT_ID = re.compile(r"^(?:Segment|Label)_(\d+)$")


def segment_structure(segment_id: str, name: str, terminology: str, label_value: int | None,
                      known: dict[str, int]) -> tuple[str | None, str]:
    """(class name or None, reason when None) of one segment, by the product's one matching rule.

    In this order: the segment ID is a class name of ``known`` (``vertebrae_L1``); else its
    terminology names a structure (SNOMED CT code or a type meaning such as ``L1 vertebra``), unless
    the segment's name names another structure; else the ID is the generic one that Slicer gives a
    label map loaded as a segmentation without names (``Segment_<n>``, or ``Label_<n>`` from the
    Segmentations module's import) with ``n`` equal to the segment's label value, and ``n`` is an
    id of ``known``: a TotalSegmentator NIfTI loaded with "Add data" keeps its label values. The
    display name alone never decides, because users rename segments freely; but a name that names
    another structure than the terminology or the label value vetoes the match.
    """
    segment_id = (segment_id or "").strip()
    if segment_id in known:
        return segment_id, ""
    name = (name or "").strip()
    named = name if name in known or name in levels.TOTAL_CLASS_NAMES.values() else vertebra_from_text(name)
    structure = structure_from_terminology(terminology) if terminology else None
    if structure is not None:
        if named is not None and named != structure:
            return None, f"its name names {named} but its terminology {structure}"
        return structure, ""
    generic = _GENERIC_SEGMENT_ID.match(segment_id)
    if generic and label_value is not None and int(generic.group(1)) == int(label_value):
        by_id = {label: cls for cls, label in known.items()}
        if int(label_value) in by_id:
            if named is not None and named != by_id[int(label_value)]:
                return None, f"its name names {named} but its label value {by_id[int(label_value)]}"
            return by_id[int(label_value)], ""
    return None, "no matching segment ID, terminology or label value"
