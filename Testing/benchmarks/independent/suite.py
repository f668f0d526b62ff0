"""The benchmark suite of independently rendered spines (issue 30): 36 spines, 12 per spacing
group (1 mm, 0.7x0.7x3 mm, 3 mm), each group with the same 12 designs:

* two rotation pairs (the same anatomy upright and rotated by 20°: about the left-right axis
  for the normal spine, about the body's long axis for the fractured one);
* normal spines with Schmorl's nodes, rim osteophytes and degenerated discs (narrow, vacuum gas,
  sclerotic endplates), one with four degenerated discs;
* wedge, biconcave and crush fractures of grade 1 (borderline), 2 and 3 (losses 0.225, 0.32–0.35,
  0.45–0.52; never adjacent), a mixed lordotic spine, a thoracic T7–L1 spine, a scoliotic one
  and an osteoporotic one (trabecular bone 80–110 HU);
* rotations up to 20° about one or three axes, noise 10, 20 or 30 HU (correlated), soft,
  standard and bone kernels, trabecular texture in all.

Losses are the truth's (see :mod:`.truth`); a grade-1 loss always lies within 3 points of a
boundary, so those vertebrae are borderline and left out of the exact-grade rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from VertebralFractureScreenLib import levels as lv

from .spec import Fracture, Osteophyte, SchmorlNode, SpineSpec

ISO1, ANISO, ISO3 = (1.0, 1.0, 1.0), (0.7, 0.7, 3.0), (3.0, 3.0, 3.0)
GROUPS = {ISO1: "1 mm", ANISO: "0.7x0.7x3", ISO3: "3 mm"}
GROUP_ORDER = ("1 mm", "0.7x0.7x3", "3 mm")


@dataclass(frozen=True)
class Case:
    """One spine of the suite; ``pair`` names a rotation pair (same anatomy at 0° and 20°)."""

    name: str
    spec: SpineSpec
    pair: str = ""

    @property
    def group(self) -> str:
        return GROUPS.get(tuple(self.spec.spacing), "x".join(f"{s:g}" for s in self.spec.spacing))

    @property
    def upright(self) -> bool:
        return not any(self.spec.rotation_deg)


def _fractures(*items: str) -> tuple[Fracture, ...]:
    out = []
    for item in items:
        level, shape, fraction = item.split(":")
        out.append(Fracture(level, shape, float(fraction)))
    return tuple(out)


NORMAL_NODES = (SchmorlNode("L2", "superior", 1.0, 0.55, 4.0, 3.0), SchmorlNode("L4", "inferior", -3.0, 0.45, 3.0, 2.0))
NORMAL_SPURS = (Osteophyte("L3", "inferior", 0.0, 50.0, 4.0, 2.5), Osteophyte("L4", "superior", 0.0, 45.0, 5.0, 3.0),
                Osteophyte("L4", "inferior", 90.0, 30.0, 3.0, 2.0))
DEGENERATE_NODES = (SchmorlNode("T12", "inferior", 0.0, 0.6, 3.5, 2.5), SchmorlNode("L1", "superior", 2.0, 0.5, 5.0, 3.5))
DEGENERATE_SPURS = (Osteophyte("L2", "inferior", 0.0, 40.0, 3.0, 2.0), Osteophyte("L3", "superior", -20.0, 50.0, 5.0, 3.0),
                    Osteophyte("L3", "inferior", 10.0, 60.0, 6.0, 3.0), Osteophyte("L4", "superior", 0.0, 60.0, 6.0, 3.0),
                    Osteophyte("L5", "superior", 30.0, 40.0, 4.0, 2.5))


def _designs() -> list[tuple[str, dict]]:
    """The 12 designs of every spacing group: (name, SpineSpec keywords without spacing/seed)."""
    t11l5 = lv.parse_level_range("T11-L5")
    return [
        ("normal-r0", dict(levels=t11l5, schmorl=NORMAL_NODES, osteophytes=NORMAL_SPURS, degenerated_discs=("L4",))),
        ("normal-r20", dict(levels=t11l5, schmorl=NORMAL_NODES, osteophytes=NORMAL_SPURS, degenerated_discs=("L4",),
                            rotation_deg=(20.0, 0.0, 0.0))),
        ("frac-r0", dict(levels=t11l5, kernel="soft", fractures=_fractures("T12:wedge:0.33", "L2:biconcave:0.5",
                                                                           "L4:crush:0.33"))),
        ("frac-axial20", dict(levels=t11l5, kernel="soft", rotation_deg=(0.0, 0.0, 20.0),
                              fractures=_fractures("T12:wedge:0.33", "L2:biconcave:0.5", "L4:crush:0.33"))),
        ("degenerative", dict(levels=lv.parse_level_range("T12-L5"), kernel="bone", noise_hu=30.0,
                              rotation_deg=(10.0, 0.0, 15.0), schmorl=DEGENERATE_NODES, osteophytes=DEGENERATE_SPURS,
                              degenerated_discs=("L2", "L3", "L4", "L5"))),
        ("wedge", dict(levels=t11l5, noise_hu=10.0, rotation_deg=(0.0, -12.0, 18.0),
                       fractures=_fractures("T11:wedge:0.225", "L1:wedge:0.48", "L3:wedge:0.32"))),
        ("biconcave", dict(levels=t11l5, kernel="bone", rotation_deg=(-15.0, 8.0, -20.0),
                           fractures=_fractures("T11:biconcave:0.32", "L1:biconcave:0.225", "L3:biconcave:0.52"))),
        ("crush", dict(levels=t11l5, kernel="soft", noise_hu=30.0,
                       fractures=_fractures("T12:crush:0.33", "L2:crush:0.5", "L4:crush:0.225"))),
        ("lordotic-mixed", dict(levels=t11l5, lordosis_scale=1.35, rotation_deg=(10.0, 0.0, 15.0),
                                fractures=_fractures("L1:wedge:0.5", "L3:crush:0.35", "L5:biconcave:0.33"),
                                schmorl=(SchmorlNode("L2", "inferior", -1.0, 0.5, 4.0, 3.0),))),
        ("thoracic", dict(levels=lv.parse_level_range("T7-L1"), noise_hu=20.0,
                          fractures=_fractures("T8:wedge:0.33", "T10:biconcave:0.45", "T12:crush:0.32"),
                          schmorl=(SchmorlNode("T9", "superior", 0.0, 0.5, 3.5, 2.5),))),
        ("scoliosis15", dict(levels=t11l5, kernel="bone", scoliosis_deg=15.0, degenerated_discs=("L3",),
                             fractures=_fractures("T12:biconcave:0.45", "L2:wedge:0.33"))),
        ("osteoporotic", dict(levels=t11l5, kernel="soft", osteoporotic=True,
                              fractures=_fractures("T12:wedge:0.35", "L2:biconcave:0.33", "L4:crush:0.45"),
                              schmorl=(SchmorlNode("L3", "superior", 1.5, 0.55, 4.0, 3.0),))),
    ]


def build_suite() -> list[Case]:
    """The full suite, group by group (1 mm, 0.7x0.7x3 mm, 3 mm)."""
    cases = []
    for g, (spacing, tag) in enumerate(((ISO1, "1mm"), (ANISO, "aniso"), (ISO3, "3mm"))):
        for d, (name, keywords) in enumerate(_designs()):
            pair = ""
            seed = 1000 * (g + 1) + d
            if name.startswith(("normal-", "frac-")):
                pair = f"{tag}-{name.split('-')[0]}"
                seed = 1000 * (g + 1) + (0 if name.startswith("normal") else 2)
            cases.append(Case(f"{tag}-{name}", SpineSpec(spacing=spacing, seed=seed, **keywords), pair))
    return cases
