"""Vertebral levels and the label conventions of SPEC §3.

Level names are ``C1``…``C7``, ``T1``…``T12``, ``L1``…``L5``, ``S1``, ordered cranial to caudal.

Label conventions:

* ``totalsegmentator``: TotalSegmentator ``total`` task ids (TotalSegmentator v2 class map).
* ``vertebrae_body``: TotalSegmentator ``vertebrae_body`` task, 1 = vertebral bodies, 2 = discs.
* ``verse``: VerSe challenge ids, 1–7 C1–C7, 8–19 T1–T12, 20–24 L1–L5, 25 L6, 28 T13.
"""

from __future__ import annotations

LEVELS: tuple[str, ...] = (
    tuple(f"C{n}" for n in range(1, 8))
    + tuple(f"T{n}" for n in range(1, 13))
    + tuple(f"L{n}" for n in range(1, 6))
    + ("S1",)
)
"""All level names, cranial to caudal."""

LEVEL_INDEX: dict[str, int] = {name: index for index, name in enumerate(LEVELS)}

SCREENING_LEVELS: tuple[str, ...] = LEVELS[LEVEL_INDEX["T4"] : LEVEL_INDEX["L5"] + 1]
"""Levels screened by default (T4–L5)."""

LUMBAR_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")

# --- TotalSegmentator `total` task -------------------------------------------------------------
TOTAL_KIDNEY_RIGHT = 2
TOTAL_KIDNEY_LEFT = 3
TOTAL_SACRUM = 25
TOTAL_AORTA = 52
TOTAL_INFERIOR_VENA_CAVA = 63
TOTAL_PORTAL_SPLENIC_VEIN = 64
TOTAL_SPINAL_CORD = 79
TOTAL_AUTOCHTHON_LEFT = 86
TOTAL_AUTOCHTHON_RIGHT = 87
TOTAL_ILIOPSOAS_LEFT = 88
TOTAL_ILIOPSOAS_RIGHT = 89

TOTAL_VERTEBRA_IDS: dict[str, int] = {"S1": 26}
TOTAL_VERTEBRA_IDS.update({f"L{n}": 32 - n for n in range(1, 6)})  # L1 31 … L5 27
TOTAL_VERTEBRA_IDS.update({f"T{n}": 44 - n for n in range(1, 13)})  # T1 43 … T12 32
TOTAL_VERTEBRA_IDS.update({f"C{n}": 51 - n for n in range(1, 8)})  # C1 50 … C7 44

TOTAL_RIB_IDS: dict[tuple[str, int], int] = {("left", n): 91 + n for n in range(1, 13)}
TOTAL_RIB_IDS.update({("right", n): 103 + n for n in range(1, 13)})
"""(side, rib number) → TotalSegmentator v2 ``total`` id: rib_left_1 92 … rib_left_12 103, rib_right_1
104 … rib_right_12 115 (TotalSegmentator's ``map_to_binary.class_map["total"]``)."""

TOTAL_CLASS_NAMES: dict[int, str] = {
    TOTAL_KIDNEY_RIGHT: "kidney_right",
    TOTAL_KIDNEY_LEFT: "kidney_left",
    TOTAL_SACRUM: "sacrum",
    TOTAL_AORTA: "aorta",
    TOTAL_INFERIOR_VENA_CAVA: "inferior_vena_cava",
    TOTAL_PORTAL_SPLENIC_VEIN: "portal_vein_and_splenic_vein",
    TOTAL_SPINAL_CORD: "spinal_cord",
    TOTAL_AUTOCHTHON_LEFT: "autochthon_left",
    TOTAL_AUTOCHTHON_RIGHT: "autochthon_right",
    TOTAL_ILIOPSOAS_LEFT: "iliopsoas_left",
    TOTAL_ILIOPSOAS_RIGHT: "iliopsoas_right",
}
TOTAL_CLASS_NAMES.update({label: f"vertebrae_{level}" for level, label in TOTAL_VERTEBRA_IDS.items()})
TOTAL_CLASS_NAMES.update({label: f"rib_{side}_{n}" for (side, n), label in TOTAL_RIB_IDS.items()})
"""TotalSegmentator class names (= Slicer segment IDs) of the ids this product uses."""

MUSCLE_NAMES: tuple[str, ...] = ("autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right")

# --- TotalSegmentator `vertebrae_body` task ------------------------------------------------------
BODY_LABEL = 1
DISC_LABEL = 2

# --- VerSe ----------------------------------------------------------------------------------------
VERSE_VERTEBRA_IDS: dict[str, int] = {}
VERSE_VERTEBRA_IDS.update({f"C{n}": n for n in range(1, 8)})
VERSE_VERTEBRA_IDS.update({f"T{n}": 7 + n for n in range(1, 13)})
VERSE_VERTEBRA_IDS.update({f"L{n}": 19 + n for n in range(1, 6)})
VERSE_EXTRA_IDS: dict[int, str] = {25: "L6", 28: "T13"}
"""Transitional vertebrae in VerSe; they have no place in the standard level list."""

LABEL_CONVENTIONS: tuple[str, ...] = ("totalsegmentator", "verse")


def vertebra_ids(convention: str) -> dict[str, int]:
    """Map level name → label id for a label convention (``totalsegmentator`` or ``verse``)."""
    if convention == "totalsegmentator":
        return dict(TOTAL_VERTEBRA_IDS)
    if convention == "verse":
        return dict(VERSE_VERTEBRA_IDS)
    raise ValueError(f"unknown label convention {convention!r}; use one of {', '.join(LABEL_CONVENTIONS)}")


def parse_level_range(text: str) -> tuple[str, ...]:
    """Parse ``"T4-L5"`` (inclusive, cranial first) or ``"L1,L3"`` into level names."""
    names: list[str] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            first, last = part.split("-", 1)
            a, b = level_position(first), level_position(last)
            if a > b:
                a, b = b, a
            names.extend(LEVELS[a : b + 1])
        else:
            level_position(part)
            names.append(part.upper())
    return tuple(sorted(dict.fromkeys(names), key=level_position))


def level_position(name: str) -> int:
    """Index of a level in :data:`LEVELS` (0 = C1); raises ``ValueError`` for unknown names."""
    try:
        return LEVEL_INDEX[name.upper()]
    except KeyError:
        raise ValueError(f"unknown vertebral level {name!r}; levels are C1-C7, T1-T12, L1-L5, S1") from None


def adjacent_level(name: str, cranial: bool) -> str | None:
    """The level just above (``cranial``) or below ``name`` in :data:`LEVELS`, None past C1 or S1."""
    index = level_position(name) + (-1 if cranial else 1)
    return LEVELS[index] if 0 <= index < len(LEVELS) else None
