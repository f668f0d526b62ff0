"""The phantom's vertebral column: which vertebrae it has, how each is labelled and what it truly is.

The normal column is C7 … T12, L1 … L5, S1. Two numbering variants change it
(:class:`.spec.PhantomSpec` fields ``lumbar_vertebrae`` and ``rib_pairs``):

* **Lumbosacral transition** (``lumbar_vertebrae``, the vertebrae between T12 and the sacrum):
  with 6 a sixth lumbar vertebra ``L6`` (shaped as L5) lies between L5 and S1; it is drawn
  wherever L5 is. With 4 there is no L5 and S1 lies directly below L4.
* **Ribs** (``rib_pairs``): rib *n* on T *n*; with 13 pairs the 13th on the vertebra below T12,
  which is then anatomically a T13 (so the vertebrae below it are one lumbar number lower).

Each vertebra has a **name** (its place in the phantom: what ``levels``, fractures and the truth
call it, ``L6`` for the sixth lumbar), a **true identity** (what an anatomist counting from C7
down calls it: ``T13`` for the rib-bearing vertebra below T12, and the lumbar vertebrae below it
renumbered from L1), and labels:

* ``verse``: the true identity (VerSe annotates anatomy: T13 is 28, L6 25);
* ``total``: what TotalSegmentator most plausibly writes. The name's id, except that ``L6`` gets
  L5's: TotalSegmentator's training data leave transitional vertebrae unlabelled and count the
  lumbar spine from the sacrum up starting with L5 (wasserth/TotalSegmentator#88), and on spines
  with a transitional vertebra the model is seen to give two adjacent vertebrae the same label
  (#318, #373), so L5 and L6 both come out as L5. A T13 keeps the L1 id it has by its place
  (TotalSegmentator knows no T13; its training data had none, #88), and its ribs take rib 12's
  ids (it knows no 13th rib).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import levels as lv
from .spec import VERSE_SACRUM, PhantomSpec

_VERSE_EXTRA = {name: label for label, name in lv.VERSE_EXTRA_IDS.items()}  # "L6" → 25, "T13" → 28


@dataclass(frozen=True)
class Column:
    """The vertebrae C7 … S1 of one phantom, cranial first, with their labels and identities, and
    the rib number each rib-bearing vertebra carries."""

    names: tuple[str, ...]
    identities: dict[str, str]
    total_ids: dict[str, int]
    verse_ids: dict[str, int]
    ribs: dict[str, int]

    def drawn(self, levels) -> list[str]:
        """The names drawn for a spec's ``levels``, cranial first (L6 wherever L5 is drawn)."""
        return [name for name in self.names if name in levels or (name == "L6" and "L5" in levels)]

    def last_lumbar(self) -> str:
        """The lowest vertebra above the sacrum (L4, L5 or L6)."""
        return self.names[-2]


def column_of(spec: PhantomSpec) -> Column:
    """The column of ``spec``: see the module docstring."""
    names = [name for name in lv.LEVELS if lv.level_position(name) >= lv.level_position("C7")]
    if spec.lumbar_vertebrae == 4:
        names.remove("L5")
    elif spec.lumbar_vertebrae == 6:
        names.insert(names.index("L5") + 1, "L6")
    ribs = {f"T{n}": n for n in range(1, min(spec.rib_pairs, 12) + 1)}
    if spec.rib_pairs == 13:
        ribs["L1"] = 13
    identities, lumbar = {}, 0
    for name in names:
        if name.startswith("L") and name not in ribs:
            lumbar += 1
            identities[name] = f"L{lumbar}"
        else:
            identities[name] = "T13" if ribs.get(name) == 13 else name
    total_ids = {name: lv.TOTAL_VERTEBRA_IDS["L5" if name == "L6" else name] for name in names}
    verse_ids = {name: lv.VERSE_VERTEBRA_IDS.get(identity, _VERSE_EXTRA.get(identity, VERSE_SACRUM))
                 for name, identity in identities.items()}
    return Column(tuple(names), identities, total_ids, verse_ids, {n: k for n, k in ribs.items() if n in names})


def rib_total_id(side: str, number: int) -> int:
    """``total`` id of rib ``number`` on ``side``; the 13th takes the 12th's (TotalSegmentator has
    no 13th rib)."""
    return lv.TOTAL_RIB_IDS[(side, min(number, 12))]


def anatomy_truth(spec: PhantomSpec, column: Column, drawn: list[str]) -> dict:
    """The true numbering of the column: thoracic and lumbar counts, rib pairs, and the true
    identity of each drawn vertebra by name."""
    identities = column.identities.values()
    return {
        "thoracic_vertebrae": 12 + sum(1 for i in identities if i == "T13"),
        "lumbar_vertebrae": sum(1 for i in identities if i.startswith("L")),
        "rib_pairs": spec.rib_pairs,
        "identities": {name: column.identities[name] for name in drawn},
    }
