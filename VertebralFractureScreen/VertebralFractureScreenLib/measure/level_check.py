"""Are the vertebral levels labelled right? Evidence from the label map itself.

A level label decides which vertebra is L1, and so the bone category; segmentation models mislabel
levels in about 1–2 % of scans and at transitional vertebrae. Four checks, each run only when its
evidence is in the label map (the rest are named in ``not_checked``):

* **order**: the labelled vertebrae lie cranial to caudal along the spine in their level order
  (two swapped labels break it), and no label holds two vertebrae (two large pieces half a body
  apart along the spine: a sixth lumbar vertebra labelled L5 like its neighbour);
* **spacing**: consecutive labels are one level apart (body centres about half a body, a disc and
  half a body apart, from the normal dimensions of :mod:`..anatomy` scaled to this patient by the
  median of all gaps): a gap of about two levels between consecutive labels means a vertebra
  without a label, a gap of about one level between labels two apart a skipped label;
* **ribs** (TotalSegmentator's rib labels, :data:`..levels.TOTAL_RIB_IDS`, each connected piece
  of a label a rib of its own): rib *n* articulates with vertebra T\\ *n* (its head with the bodies of T\\ *n*-1 and T\\ *n*, its tubercle with the
  transverse process of T\\ *n*; ribs 11 and 12 with T11 and T12 alone), so the vertebra touching
  most of a rib's medial end should be T\\ *n*. Twelve rib pairs end at T12: a rib on a vertebra
  labelled L1 means 13 pairs or labels one level off, and so does T12 without a rib while T11 has
  one (11 pairs);
* **sacrum**: the sacrum lies directly below L5 (or S1); a lowest lumbar label other than L5 next
  to it means four or six lumbar-type vertebrae (a lumbosacral transition) or shifted labels.

VerSe's transitional labels (L6, T13) are reported as such. The result says what disagreed in one
sentence each; any disagreement makes the levels *doubtful*.

**The one shift all evidence agrees on** (``shift``): labels one or more levels off are told from
a transitional spine by two independent witnesses. The ribs give a shift when every rib number
seen (at least :data:`MIN_RIBS_FOR_SHIFT` of them) meets the vertebra that many levels from
T\\ *n*; the sacrum gives one from the lowest vertebra above it that is not labelled S1 (L4
there: one level too cranial). ``shift`` is set only when both give the same non-zero shift. The
sacrum cannot single out a shift towards the sacrum (a lumbar vertebra labelled S1 looks like a
right S1 from there), so such a shift is never proposed. Nothing is relabelled here:
:func:`shifted_labels` does it, and screening only when asked (``relabel_levels``), and only when
the shifted labels then pass every check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import levels as lv
from ..anatomy import normal_body
from ..geometry import distance_transform_edt, ijk_to_ras_points, voxel_spacing

RIB_CONTACT_MM = 3.0
"""A vertebra voxel within this distance of a rib's medial end touches the rib."""

RIB_MEDIAL_MM = 30.0
"""A rib's medial end: its voxels within this distance of its point nearest a vertebral centre."""

SHARED_PIECE = 0.3
"""A piece of a vertebra label holding at least this share of its voxels counts as a vertebra."""

GAP_MISSING = 1.6
"""Consecutive labels this many expected gaps apart or more: a vertebra between them has no label."""

MIN_RIBS_FOR_SHIFT = 2
"""Rib numbers that must agree on a level shift before the ribs witness it."""

GAP_SKIPPED = 0.7
"""Labels two or more levels apart that lie less than this fraction of their expected gap apart: a
label was skipped."""


@dataclass(frozen=True)
class LevelCheck:
    """What the label map says about its own levels.

    ``checked`` / ``not_checked``: the checks run, and those without evidence (with why);
    ``disagreements``: one sentence per finding; ``rib_levels``: rib number → the level of the
    vertebra its medial end touches most (both sides merged); ``transitional``: VerSe's L6/T13
    labels present. ``doubtful``: any disagreement. ``shift``: the level shift that ribs and
    sacrum agree on (levels to add to every label, caudal positive; 0: none proposed);
    ``relabelled_by``: the shift already applied to the labels checked here (screening's
    ``relabel_levels``)."""

    checked: tuple[str, ...] = ()
    not_checked: dict = field(default_factory=dict)
    disagreements: tuple[str, ...] = ()
    rib_levels: dict = field(default_factory=dict)
    transitional: tuple[str, ...] = ()
    shift: int = 0
    relabelled_by: int = 0

    @property
    def doubtful(self) -> bool:
        return bool(self.disagreements)

    def as_dict(self) -> dict:
        """The ``level_check`` block of ``exam.json``."""
        return {"doubtful": self.doubtful, "checked": list(self.checked), "not_checked": dict(self.not_checked),
                "disagreements": list(self.disagreements), "rib_levels": dict(self.rib_levels),
                "transitional": list(self.transitional), "shift": self.shift, "relabelled_by": self.relabelled_by}


def _centroids(labels: np.ndarray, boxes: list, ijk_to_ras: np.ndarray, ids: Mapping[str, int]) -> dict:
    """Level → body-and-arch centroid (RAS mm) of every vertebra label present, cranial first."""
    out = {}
    for level, label in ids.items():
        box = boxes[label - 1] if label - 1 < len(boxes) else None
        if box is None:
            continue
        kji = np.argwhere(labels[box] == label)
        if len(kji):
            origin = np.array([s.start for s in box], dtype=np.int64)
            out[level] = ijk_to_ras_points(ijk_to_ras, (kji + origin)[:, ::-1]).mean(axis=0)
    return dict(sorted(out.items(), key=lambda item: lv.level_position(item[0])))


def _shared_labels(labels: np.ndarray, boxes: list, ijk_to_ras: np.ndarray, ids: Mapping[str, int],
                   centres: dict) -> list[str]:
    """The levels whose label holds two vertebrae: two large pieces (each at least
    :data:`SHARED_PIECE` of the label's voxels) whose centres lie at least half a nominal gap
    apart along the spine. A segmentation that knows five lumbar vertebrae labels a sixth like its
    neighbour."""
    from scipy import ndimage

    names = list(centres)
    axis = np.array(centres[names[0]]) - np.array(centres[names[-1]]) if len(names) > 1 else np.array([0, 0, 1.0])
    axis = axis / np.linalg.norm(axis)
    shared = []
    for level in names:
        label = ids[level]
        box = boxes[label - 1]
        pieces, count = ndimage.label(labels[box] == label)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        large = [p + 1 for p in np.flatnonzero(sizes >= SHARED_PIECE * sizes.sum())]
        if len(large) < 2:
            continue
        origin = np.array([s.start for s in box], dtype=np.int64)
        heights = [float(ijk_to_ras_points(ijk_to_ras, (np.argwhere(pieces == p) + origin)[:, ::-1]).mean(axis=0)
                         @ axis) for p in large]
        if max(heights) - min(heights) >= 0.5 * normal_body(level).height_mm:
            shared.append(level)
    return shared


def _expected_gap(upper: str, lower: str) -> float:
    """Nominal distance (mm) between the body centres of two levels, ``upper`` cranial."""
    a, b = lv.level_position(upper), lv.level_position(lower)
    span = [normal_body(lv.LEVELS[i]) for i in range(a, b + 1)]
    return (0.5 * span[0].height_mm + sum(n.disc_below_mm for n in span[:-1])
            + sum(n.height_mm for n in span[1:-1]) + 0.5 * span[-1].height_mm)


def _order_and_spacing(centres: dict) -> list[str]:
    """The order and spacing checks' findings (``centres`` in level order)."""
    names = list(centres)
    points = np.array([centres[n] for n in names])
    cranial = points[0] - points[-1]
    cranial = cranial / np.linalg.norm(cranial)
    height = points @ cranial
    findings, misplaced = [], set()
    for upper, lower, h_up, h_low in zip(names[:-1], names[1:], height[:-1], height[1:]):
        if h_up <= h_low:
            findings.append(f"{upper} lies below {lower}: their labels are swapped or wrong.")
            misplaced |= {upper, lower}
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    expected = np.array([_expected_gap(a, b) for a, b in zip(names[:-1], names[1:])])
    scale = float(np.median(gaps / expected))
    for (upper, lower), gap, nominal in zip(zip(names[:-1], names[1:]), gaps, expected * scale):
        if misplaced & {upper, lower}:
            continue  # out of order: their gaps say nothing more
        apart = lv.level_position(lower) - lv.level_position(upper)
        if apart == 1 and gap >= GAP_MISSING * nominal:
            findings.append(f"{upper} and {lower} are {gap:.0f} mm apart, about two levels: a vertebra between "
                            "them has no label.")
        elif apart > 1 and gap < GAP_SKIPPED * nominal:
            one_level = _expected_gap(upper, lv.adjacent_level(upper, cranial=False)) * scale
            if abs(gap - one_level) < 0.35 * one_level:
                findings.append(f"{upper} and {lower} are {gap:.0f} mm apart, one level: a level label was "
                                "skipped.")
    return findings


def _rib_contacts(labels: np.ndarray, boxes: list, ijk_to_ras: np.ndarray, ids: Mapping[str, int],
                  centres: dict) -> list[tuple[int, str]]:
    """``(rib number, level)`` for every rib (each connected piece of each rib label): the level
    whose label touches most of the rib's medial end. A label may hold two ribs: a segmentation
    that knows twelve gives a 13th rib the 12th's id."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    by_label = {label: level for level, label in ids.items()}
    tree = cKDTree(np.array(list(centres.values())))
    spacing = voxel_spacing(ijk_to_ras)[::-1]  # k, j, i
    reach = np.ceil(RIB_CONTACT_MM / spacing).astype(np.int64) + 1
    found = []
    for (_, number), rib in lv.TOTAL_RIB_IDS.items():
        box = boxes[rib - 1] if rib - 1 < len(boxes) else None
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == rib)
        origin = np.array([s.start for s in box], dtype=np.int64)
        for piece in range(1, count + 1):
            kji = np.argwhere(pieces == piece) + origin
            distance = tree.query(ijk_to_ras_points(ijk_to_ras, kji[:, ::-1]))[0]
            medial = kji[distance <= distance.min() + RIB_MEDIAL_MM]
            lo = np.maximum(medial.min(axis=0) - reach, 0)
            hi = np.minimum(medial.max(axis=0) + reach + 1, np.asarray(labels.shape, dtype=np.int64))
            crop = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            rib_end = np.zeros(crop.shape, dtype=bool)
            rib_end[tuple((medial - lo).T)] = True
            near = distance_transform_edt(~rib_end, sampling=spacing) <= RIB_CONTACT_MM
            touched, counts = np.unique(crop[near], return_counts=True)
            tally = {by_label[t]: c for t, c in zip(touched.tolist(), counts.tolist()) if t in by_label}
            if tally:
                found.append((number, max(tally, key=tally.get)))
    return found


def _rib_levels(contacts: list[tuple[int, str]]) -> dict[int, str]:
    """Rib number n → its level: Tn when one of that number's ribs meets Tn, else the level its
    ribs meet most often."""
    out = {}
    for number in sorted({n for n, _ in contacts}):
        levels = [level for n, level in contacts if n == number]
        out[number] = f"T{number}" if f"T{number}" in levels else max(set(levels), key=levels.count)
    return out


def _rib_findings(rib_levels: dict[int, str], bearing: set[str], centres: dict) -> list[str]:
    """The rib check's findings: each rib number on the wrong vertebra, a rib on L1 (``bearing``:
    every level a rib meets), none on T12 while T11 has one."""
    findings = [f"rib {number} meets the vertebra labelled {level}, not T{number}."
                for number, level in rib_levels.items() if level != f"T{number}"]
    if "L1" in bearing:
        findings.append("the vertebra labelled L1 bears a rib: 13 rib pairs, or labels one level off.")
    if "T11" in bearing and "T12" in centres and "T12" not in bearing and 12 not in rib_levels:
        findings.append("T12 bears no rib while T11 does: 11 rib pairs, or labels one level off.")
    return findings


def _by_distance_to_sacrum(labels: np.ndarray, boxes: list, ijk_to_ras: np.ndarray, centres: dict) -> list[str]:
    """The labelled vertebrae (of ``centres``), nearest the sacrum first."""
    box = boxes[lv.TOTAL_SACRUM - 1] if lv.TOTAL_SACRUM - 1 < len(boxes) else None
    origin = np.array([s.start for s in box], dtype=np.int64)
    ras = ijk_to_ras_points(ijk_to_ras, (np.argwhere(labels[box] == lv.TOTAL_SACRUM) + origin)[:, ::-1])
    names = list(centres)
    points = np.array([centres[n] for n in names])
    distance = np.min(np.linalg.norm(points[:, None, :] - ras[None, ::max(1, len(ras) // 4000)], axis=2), axis=1)
    return [names[i] for i in np.argsort(distance, kind="stable")]


def _agreed_shift(rib_levels: dict[int, str], above_sacrum: str | None) -> int:
    """The shift ribs and sacrum agree on (module docstring), 0 when they do not or cannot;
    ``above_sacrum``: the lowest vertebra above the sacrum not labelled S1."""
    if above_sacrum is None or len(rib_levels) < MIN_RIBS_FOR_SHIFT:
        return 0
    from_ribs = {lv.level_position(f"T{number}") - lv.level_position(level) for number, level in rib_levels.items()}
    from_sacrum = lv.level_position("L5") - lv.level_position(above_sacrum)
    return from_sacrum if from_ribs == {from_sacrum} else 0


def shifted_labels(labels: np.ndarray, shift: int, convention: str = "totalsegmentator", *,
                   keep_s1: bool = False) -> np.ndarray:
    """A new label map with every vertebra label moved ``shift`` levels (caudal positive: 1 turns
    the label L4 into L5); other labels unchanged, and S1 too with ``keep_s1`` (a segmentation
    that mislabels the lumbar spine still knows the S1 segment fused to the sacrum). A label that
    would leave the convention's levels, or land on a kept S1, is a ``ValueError``."""
    ids = lv.vertebra_ids(convention)
    present = set(np.unique(labels).tolist())
    kept = {ids["S1"]} & present if keep_s1 and "S1" in ids else set()
    mapping = {}
    for level, label in ids.items():
        if label not in present or label in kept:
            continue
        position = lv.level_position(level) + shift
        target = lv.LEVELS[position] if 0 <= position < len(lv.LEVELS) else None
        if target not in ids or ids[target] in kept:
            raise ValueError(f"{level} moved by {shift} levels leaves the {convention} levels or lands on S1")
        mapping[label] = ids[target]
    if labels.size and labels.min() < 0:
        raise ValueError("a label map with negative labels cannot be relabelled")
    lookup = np.arange(max(int(labels.max(initial=0)), *mapping.values(), 0) + 1).astype(labels.dtype)
    for old, new in mapping.items():
        lookup[old] = new
    return lookup[labels]  # one pass over the volume, whatever the number of labels


def check_levels(labels: np.ndarray, ijk_to_ras: np.ndarray, *, convention: str = "totalsegmentator",
                 label_boxes: list | None = None) -> LevelCheck:
    """Check the level labels of a vertebra label map ``[k, j, i]`` (grid matrix ``ijk_to_ras``,
    mm) against its own evidence (see the module docstring). ``label_boxes``:
    ``geometry.find_label_boxes(labels)`` when the caller has it."""
    from ..geometry import find_label_boxes

    boxes = find_label_boxes(labels) if label_boxes is None else label_boxes
    ids = lv.vertebra_ids(convention)
    centres = _centroids(labels, boxes, ijk_to_ras, ids)
    checked, not_checked, findings = [], {}, []
    transitional = tuple(name for label, name in lv.VERSE_EXTRA_IDS.items()
                         if convention == "verse" and label - 1 < len(boxes) and boxes[label - 1] is not None)
    for name in transitional:
        findings.append(f"a transitional vertebra is labelled {name}.")
    if len(centres) >= 3:
        checked += ["order", "spacing"]
        shared = _shared_labels(labels, boxes, ijk_to_ras, ids, centres)
        findings += [f"two vertebrae are labelled {level}: a transitional vertebra (e.g. six lumbar-type "
                     "vertebrae) or a label given twice." for level in shared]
        findings += _order_and_spacing({level: c for level, c in centres.items() if level not in shared})
    else:
        not_checked.update(order="fewer than 3 vertebrae", spacing="fewer than 3 vertebrae")
    has = [convention == "totalsegmentator" and label - 1 < len(boxes) and boxes[label - 1] is not None
           for label in lv.TOTAL_RIB_IDS.values()]
    contacts = _rib_contacts(labels, boxes, ijk_to_ras, ids, centres) if any(has) and centres else []
    rib_levels = _rib_levels(contacts)
    if not rib_levels:
        not_checked["ribs"] = ("no rib labels in the segmentation" if not any(has)
                               else "no rib reaches a labelled vertebra in the scan")
    sacrum = (convention == "totalsegmentator" and lv.TOTAL_SACRUM - 1 < len(boxes)
              and boxes[lv.TOTAL_SACRUM - 1] is not None)
    if rib_levels:
        checked.append("ribs")
        findings += _rib_findings(rib_levels, {level for _, level in contacts}, centres)
    above_sacrum = None
    if sacrum and any(level.startswith("L") for level in centres):
        checked.append("sacrum")
        order = _by_distance_to_sacrum(labels, boxes, ijk_to_ras, centres)
        nearest = order[0]
        above_sacrum = next(level for level in order if level != "S1")  # a lumbar one exists (checked above)
        if nearest not in ("L5", "S1"):
            findings.append(f"the vertebra next to the sacrum is labelled {nearest}, not L5: a lumbosacral transition "
                            "(four or six lumbar-type vertebrae) or labels shifted.")
    else:
        not_checked["sacrum"] = "no sacrum or no lumbar vertebra in the segmentation"
    return LevelCheck(tuple(checked), not_checked, tuple(findings), rib_levels, transitional,
                      shift=_agreed_shift(rib_levels, above_sacrum))
