"""The QC picture of one exam (SPEC §5 ``qc.png``): a sagittal view along the spine's curve with
each vertebra's level, its three measured height lines, its Genant grade in colour and its
trabecular HU, so that a radiologist can accept or reject the result at a glance.

Three parts, all without Qt and without global matplotlib state:

* :func:`.reformat.spine_reformat` samples the CT on a surface through the spine's centre line
  (module :mod:`.reformat`: the geometries, ``"curved"`` by default, and the mapping between RAS
  millimetres and image pixels).
* :class:`QCVertebra` records say what is drawn of each vertebra; :func:`qc_vertebrae` builds them
  from the morphometry's results with their grades and HU (module :mod:`.qc_records`; both are
  re-exported here).
* :func:`render_qc` (this module) draws the reformat with matplotlib's Agg canvas (no ``pyplot``,
  no change of the user's backend, so it is safe inside 3D Slicer; matplotlib is imported only
  when drawing) and writes the PNG atomically. It takes the records or the morphometry's results.

Picture conventions: **cranial at the top, anterior on the left** (the radiological convention
for sagittal images), marked with ``S``/``I``/``A``/``P`` on the image; pixels are square and in
millimetres (a scale bar is drawn). Colours by Genant grade: 0 green, 1 yellow, 2 orange, 3 red;
grey for vertebrae without a grade (incomplete, heights missing, S1). Borderline grades (loss
within 3 percentage points of a grade boundary) have dashed lines and a ``*``. Each label reads
e.g. ``L1  G2  wedge  31%`` with ``HU 142 · Ha/Hm/Hp 19.0/24.1/27.6 mm`` below it
(:func:`vertebra_label`). Vertebrae with implausible bodies keep their label but get no lines and
do not steer the centre line; vertebrae cut by the scan get no lines either (they would end on the
scan's edge), and a scan with fewer than two whole bodies is shown on its own sagittal plane.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import levels as lv
from ..errors import InputError
from ..io.files import atomic_write
from ..measure.confidence import REVIEW_BELOW
from .measurements import HEIGHTS_CUT_FLAGS, HEIGHTS_MEANINGLESS_FLAGS
from .qc_records import LOST_HEIGHT, QCVertebra, qc_vertebrae
from .reformat import SpineReformat, scan_sagittal_axis, spine_reformat

if TYPE_CHECKING:  # only named in annotations
    from ..measure.grading import VertebraGrade

GRADE_COLOURS: dict[int | None, str] = {
    0: "#2ecc40",  # green
    1: "#ffdc00",  # yellow
    2: "#ff851b",  # orange
    3: "#ff1a1a",  # red
    None: "#a0a0a0",  # not graded
}
"""Colour per Genant grade; ``None`` for vertebrae without a grade."""

GRADE_LEGEND = {0: "G0 < 20 %", 1: "G1 20–25 %", 2: "G2 25–40 %", 3: "G3 > 40 %", None: "not graded"}

DEFAULT_WINDOW = (250.0, 1000.0)
"""Display window ``(level, width)`` in HU (−250…750): cortical endplates bright, trabecular bone,
discs, muscle and fat still told apart."""

HEIGHT_KEYS = ("ha", "hm", "hp")

UNRELIABLE_BODY_FLAGS = frozenset({
    "implausible_body_volume", "implausible_depth", "no_body_in_vertebrae_body_map", "body_not_separated"})
"""Morphometry flags after which a vertebra's centre and axes are not trusted to guide the
centre line of the picture (it is still drawn where its centre falls)."""

NO_HEIGHT_LINE_FLAGS = UNRELIABLE_BODY_FLAGS | HEIGHTS_CUT_FLAGS | {"implausible_height", "heights_not_measurable"}
"""Flags after which a vertebra's height lines are not drawn: its body is implausible, or cut by the
scan (the lines would end on the scan's edge)."""

ENDPLATE_CUT_FLAGS = frozenset({"endplate_cut_superior", "endplate_cut_inferior"})
"""Flags of a body whose cranio-caudal centre is not known (an endplate outside the scan)."""

_FLAG_TEXT = {  # in order of priority: the first one present is shown
    "touches_field_of_view_edge": "cut by FOV",
    "heights_not_measurable": "heights not measurable",
    "heights_missing": "heights missing",
    "implausible_height": "implausible height",
    "implausible_depth": "implausible depth",
    "implausible_body_volume": "implausible body",
    "body_not_separated": "body not separated",
    "no_body_in_vertebrae_body_map": "no body in map",
}


# ------------------------------------------------------------------------------------------------
# Picture
# ------------------------------------------------------------------------------------------------


def vertebra_label(v: QCVertebra) -> tuple[str, str]:
    """Main and second line of a vertebra's label (the second: HU, heights, and the confidence
    when it is below :data:`~.confidence.REVIEW_BELOW`)."""
    heights = [v.ha_mm, v.hm_mm, v.hp_mm]
    hu = f"HU {v.trabecular_hu:.0f}" if math.isfinite(v.trabecular_hu) else ""
    hts = ("" if not any(math.isfinite(h) for h in heights) or HEIGHTS_CUT_FLAGS.intersection(v.flags)
           else "heights not measurable" if HEIGHTS_MEANINGLESS_FLAGS.intersection(v.flags)
           else "Ha/Hm/Hp " + "/".join("–" if not math.isfinite(h) else f"{h:.1f}" for h in heights) + " mm")
    trust = (f"confidence {v.confidence:.2f}" if math.isfinite(v.confidence) and v.confidence < REVIEW_BELOW
             else "")
    second = " · ".join(part for part in (hu, hts, trust) if part)
    if v.genant_grade is None:
        reasons = [text for flag, text in _FLAG_TEXT.items() if flag in v.flags]
        incomplete = not v.complete and v.level != "S1" and "not_graded" not in v.flags
        reason = "incomplete" + (f" · {reasons[0]}" if reasons else "") if incomplete else "not graded"
        return f"{v.level}  {reason}", second
    loss = f"{100.0 * v.height_loss:.0f}%" if math.isfinite(v.height_loss) else ""
    shape = v.shape if v.genant_grade >= 1 and v.shape and v.shape != "normal" else ""
    # The noise leaves the grade open (grading.UNCERTAIN_SDS), or at least a height SD > 0.5 mm.
    imprecise = ("grade uncertain" if "grade_uncertain" in v.flags
                 else "heights imprecise" if "imprecise_heights" in v.flags else "")
    main = "  ".join(part for part in (f"{v.level}", f"G{v.genant_grade}", shape, loss) if part)
    return main + (" *" if v.borderline else "") + (f"  · {imprecise}" if imprecise else ""), second


def _summary(vertebrae: Sequence[QCVertebra]) -> str:
    graded = [v for v in vertebrae if v.genant_grade is not None]
    if not graded:
        return f"No vertebra graded ({len(vertebrae)} found)."
    worst = max(v.genant_grade for v in graded)
    fractured = [v for v in graded if v.genant_grade >= 1]
    text = f"Max Genant grade {worst}"
    if fractured:
        text += " · fractures: " + ", ".join(f"{v.level} G{v.genant_grade}{' ' + v.shape if v.shape else ''}"
                                             for v in fractured)
    else:
        text += " · no fracture"
    ungraded = len(vertebrae) - len(graded)
    text += f" · {len(graded)} graded" + (f", {ungraded} not graded" if ungraded else "")
    return text


def _spread(desired: np.ndarray, gap: float, lo: float, hi: float) -> np.ndarray:
    """Positions as close as possible to ``desired`` (sorted ascending) at least ``gap`` apart,
    inside [lo, hi] when they fit (clusters are moved as blocks about their mean)."""
    y = np.asarray(desired, float).copy()
    n = len(y)
    if n == 0:
        return y
    # Merge overlapping neighbours into blocks centred on their mean desired position.
    blocks = [[i] for i in range(n)]
    changed = True
    while changed:
        changed = False
        positions = []
        for block in blocks:
            centre = float(np.mean(desired[block]))
            start = centre - 0.5 * gap * (len(block) - 1)
            start = min(max(start, lo), max(lo, hi - gap * (len(block) - 1)))
            positions.append(start)
        for b in range(len(blocks) - 1):
            end = positions[b] + gap * (len(blocks[b]) - 1)
            if positions[b + 1] < end + gap - 1e-9:
                blocks[b] = blocks[b] + blocks[b + 1]
                del blocks[b + 1]
                changed = True
                break
    for block, start in zip(blocks, positions):
        for k, i in enumerate(block):
            y[i] = start + gap * k
    return y


def render_qc(
    ct: np.ndarray,
    ijk_to_ras: np.ndarray,
    vertebrae: Sequence,
    out_path,
    *,
    grades: Sequence[VertebraGrade] | Mapping[str, VertebraGrade] | None = None,
    hu: Mapping[str, float] | None = None,
    confidence: Mapping[str, float | None] | None = None,
    review: Sequence[str] = (),
    title: str = "",
    mode: str = "curved",
    window: tuple[float, float] = DEFAULT_WINDOW,
    pixel_mm: float = 0.75,
    slab_mm: float = 3.0,
    anterior_mm: float = 45.0,
    posterior_mm: float = 80.0,
    dpi: int = 100,
) -> None:
    """Write the QC picture of one exam to ``out_path`` (PNG, written atomically).

    ``ct``, ``ijk_to_ras``: the CT in HU ``[k, j, i]`` and its grid matrix (mm).
    ``vertebrae``: either :class:`QCVertebra` records, or the morphometry's
    :class:`~.morphometry.VertebraHeights` (then ``grades``, default
    :func:`~.grading.grade_spine` of them, complete them; see :func:`qc_vertebrae`). Any order;
    drawn cranial at the top. ``hu``: optional trabecular mean HU per level, a mapping level → HU
    (NaN or absent where not measured; see :func:`qc_vertebrae`), shown in the labels; with
    :class:`QCVertebra` records it overrides their ``trabecular_hu`` where it has the level.
    ``confidence``: level → the vertebra's confidence (``measure/confidence.py``), shown in its
    label when below :data:`~.confidence.REVIEW_BELOW`; ``review``: the exam's review reasons,
    shown in red under the summary.
    ``title``: first line(s) of the heading, e.g. the exam id and contrast status; a summary
    line (maximum grade, fractured levels) is added below it.
    ``mode``, ``pixel_mm``, ``slab_mm``, ``anterior_mm``, ``posterior_mm``: the reformat (see
    :func:`spine_reformat`); ``window``: display ``(level, width)`` in HU.

    Picture: cranial up, anterior left (``S``, ``I``, ``A``, ``P`` marked), square millimetre
    pixels with a scale bar; per vertebra its Ha/Hm/Hp lines and level name on the image and a
    label beside it, coloured by grade (:data:`GRADE_COLOURS`; borderline dashed with ``*``).
    Level names sit in front of the anterior wall, moved forward until no line crosses them. A
    vertebra cut by the scan (:data:`~.measurements.HEIGHTS_CUT_FLAGS`) or with an implausible
    body gets no lines. When fewer than two bodies have both endplates in the scan, the picture is
    the scan's own sagittal plane (its slices horizontal) and the heading says so.
    Raises :class:`~.errors.InputError` when no vertebra has a centre or the file cannot be
    written.
    """
    figure = qc_figure(ct, ijk_to_ras, vertebrae, grades=grades, hu=hu, confidence=confidence, review=review,
                       title=title, mode=mode, window=window, pixel_mm=pixel_mm, slab_mm=slab_mm,
                       anterior_mm=anterior_mm, posterior_mm=posterior_mm, dpi=dpi)
    _save_atomically(figure, Path(out_path), dpi)


def qc_figure(
    ct: np.ndarray,
    ijk_to_ras: np.ndarray,
    vertebrae: Sequence,
    *,
    grades: Sequence[VertebraGrade] | Mapping[str, VertebraGrade] | None = None,
    hu: Mapping[str, float] | None = None,
    confidence: Mapping[str, float | None] | None = None,
    review: Sequence[str] = (),
    title: str = "",
    mode: str = "curved",
    window: tuple[float, float] = DEFAULT_WINDOW,
    pixel_mm: float = 0.75,
    slab_mm: float = 3.0,
    anterior_mm: float = 45.0,
    posterior_mm: float = 80.0,
    dpi: int = 100,
):
    """The QC picture of one exam as a matplotlib ``Figure`` on an Agg canvas (no ``pyplot``): what
    :func:`render_qc` writes, for a caller that shows or inspects it. Parameters as there."""
    records = list(vertebrae)
    if records and not isinstance(records[0], QCVertebra):
        records = qc_vertebrae(records, grades, hu)
    elif hu:
        for v in records:
            if v.level in hu:
                v.trabecular_hu = float(hu[v.level])

    def position(v: QCVertebra) -> int:
        try:
            return lv.level_position(v.level)
        except ValueError:
            return 10_000

    for v in records:
        if confidence and confidence.get(v.level) is not None:
            v.confidence = float(confidence[v.level])
    records.sort(key=position)
    placed = [v for v in records if v.centre_ras is not None and np.all(np.isfinite(v.centre_ras))]
    if not placed:
        raise InputError("the QC picture needs at least one vertebra with a known centre")
    guides = [v for v in placed if v.ap_ras is not None and not UNRELIABLE_BODY_FLAGS.intersection(v.flags)]
    if not guides:
        guides = placed
    ap = [v.ap_ras if v.ap_ras is not None else np.array([0.0, 1.0, 0.0]) for v in guides]
    geometry = dict(mode=mode, pixel_mm=pixel_mm, anterior_mm=anterior_mm, posterior_mm=posterior_mm,
                    slab_mm=slab_mm)
    notes, how = (["Review needed: " + "; ".join(review) + "."] if review else []), None
    if sum(not ENDPLATE_CUT_FLAGS.intersection(v.flags) for v in guides) >= 2:
        reformat = spine_reformat(ct, ijk_to_ras, [v.centre_ras for v in guides], ap, cc_ras=guides[0].cc_ras,
                                  **geometry)
    else:
        # Fewer than two bodies with both endplates in the scan: the centres of cut bodies would
        # tilt a centre line through them, so the scan is shown on its own sagittal plane.
        centre, superior, length_mm = scan_sagittal_axis(ct.shape, ijk_to_ras, np.mean([v.centre_ras for v in placed], 0))
        reformat = spine_reformat(ct, ijk_to_ras, [centre], [np.mean(ap, axis=0)], cc_ras=superior,
                                  extend_mm=min(0.5 * length_mm + 5.0, 150.0), **geometry)
        how = "sagittal plane of the scan through the body centres"
        notes.append(f"The scan covers {length_mm:.0f} mm cranio-caudally and fewer than two vertebral bodies "
                     "lie whole in it: shown on the scan's own sagittal plane, not along the spine.")
    missing = [v.level for v in records if v not in placed]
    if missing:
        notes.append("Not shown (no centre): " + ", ".join(missing))
    return _draw(reformat, placed, records, title, window, notes, dpi, how)


EXPECTED_COLOUR = "#00e5ff"
LOST_COLOUR = "#ff00cc"


def _draw_grade_basis(ax, v: QCVertebra, to_mm) -> None:
    """A fractured vertebra's measured endplates (grade colour), its expected superior endplate
    (dashed) and the lost part of the depressed endplate (thick)."""
    if not v.outline_ras:
        return
    for points in v.outline_ras.values():
        xy = to_mm(points)
        ax.plot(xy[:, 0], xy[:, 1], color=_grade_colour(v), lw=0.9, path_effects=_outline(2.6), zorder=4)
    if v.expected_superior_ras is None:
        return
    xy = to_mm(v.expected_superior_ras)
    ax.plot(xy[:, 0], xy[:, 1], color=EXPECTED_COLOUR, lw=1.8, linestyle=(0, (2, 1.5)), zorder=5,
            path_effects=_outline(3.0))
    if v.lost is not None and np.any(v.lost):
        xy = to_mm(v.outline_ras[v.depressed_side])
        lost = np.where(v.lost, 0.0, np.nan)[:, None] + xy
        ax.plot(lost[:, 0], lost[:, 1], color=LOST_COLOUR, lw=2.6, solid_capstyle="round", zorder=5)


def _grade_colour(v: QCVertebra) -> str:
    return GRADE_COLOURS.get(v.genant_grade if v.genant_grade in GRADE_COLOURS else None)


def _outline(width: float = 2.5) -> list:
    """A black outline under white or coloured marks, legible on bone and on air."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground="black")]


def _draw(reformat: SpineReformat, placed: list[QCVertebra], records: list[QCVertebra], title: str,
          window: tuple[float, float], notes: list[str], dpi: int, how: str | None = None):
    """The figure: heading (``title``, the summary, then ``notes`` in red), the reformat with its
    lines and names, the label panel, the legend and a method line (``how`` the image was sampled,
    by default from the reformat's mode)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    px = reformat.pixel_mm
    rows, cols = reformat.shape
    height_mm, width_mm = rows * px, cols * px
    scale = float(np.clip(1100.0 / height_mm, 1.4, 4.0))  # figure pixels per mm
    img_w, img_h = width_mm * scale, height_mm * scale
    panel_w, left, right = 300.0, 14.0, 10.0
    fig_w = max(left + img_w + panel_w + right, 640.0)  # the legend needs about 600 px
    # Heading lines wrapped to the figure's width.
    room = fig_w - 2 * left
    title_lines = [part for line in title.splitlines() if line.strip()
                   for part in _wrap(line, room, 12, "bold", dpi)]
    summary_lines = _wrap(_summary(records), room, 10, "normal", dpi)
    note_lines = [line for note in notes for line in _wrap(note, room, 10, "normal", dpi)]
    top = 26.0 + 18.0 * len(title_lines) + 15.0 * (len(summary_lines) + len(note_lines))
    bottom = 64.0
    fig_h = top + img_h + bottom
    figure = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)

    ax = figure.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
    extent = _draw_image(ax, reformat, window)
    anchors = _draw_vertebrae(ax, reformat, placed, extent, scale, dpi)
    # Label panel: same vertical scale as the image (mm), x in figure pixels.
    panel = figure.add_axes(((left + img_w) / fig_w, bottom / fig_h, panel_w / fig_w, img_h / fig_h))
    panel.set_xlim(0.0, panel_w)
    panel.set_ylim(extent[2], extent[3])
    panel.axis("off")
    _draw_labels(panel, placed, anchors, extent, img_h, scale)

    # Heading.
    y = fig_h - 12.0
    for line in title_lines:
        figure.text(left / fig_w, y / fig_h, line, fontsize=12, fontweight="bold", ha="left", va="top")
        y -= 18.0
    for index, line in enumerate(summary_lines + note_lines):
        figure.text(left / fig_w, y / fig_h, line, fontsize=10, ha="left", va="top",
                    color="black" if index < len(summary_lines) else "#aa0000")
        y -= 15.0
    how = how or ("sagittal curved planar reformat through the body centres" if reformat.mode == "curved"
                  else "sagittal straightened reformat through the body centres")
    _draw_foot(figure, placed, left / fig_w, 18.0 / fig_h, 6.0 / fig_h,
               f"{how[0].upper()}{how[1:]}, slab {reformat.slab_mm:g} mm, W {window[1]:g} / L {window[0]:g} HU")
    return figure


def _draw_image(ax, reformat: SpineReformat, window: tuple[float, float]) -> tuple[float, float, float, float]:
    """The reformat in the display window, its S/I/A/P markers and a scale bar; returns the
    image's extent (left, right, bottom, top) in picture millimetres."""
    px = reformat.pixel_mm
    rows, cols = reformat.shape
    level, width = window
    extent = (-0.5 * px, (cols - 0.5) * px, (rows - 0.5) * px, -0.5 * px)
    ax.imshow(np.ma.masked_invalid(reformat.image), cmap=_grey_with_outside(), vmin=level - width / 2,
              vmax=level + width / 2, extent=extent, interpolation="bilinear", aspect="equal")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    marker = dict(color="white", fontsize=11, fontweight="bold", path_effects=_outline(), zorder=6)
    ax.text(0.5, 0.006, "I", transform=ax.transAxes, ha="center", va="bottom", **marker)
    ax.text(0.5, 0.994, "S", transform=ax.transAxes, ha="center", va="top", **marker)
    ax.text(0.01, 0.5, "A", transform=ax.transAxes, ha="left", va="center", **marker)
    ax.text(0.99, 0.5, "P", transform=ax.transAxes, ha="right", va="center", **marker)
    bar = 50.0 if cols * px > 90 else 20.0
    x0, y0 = extent[1] - bar - 4.0, extent[2] - 5.0
    ax.plot([x0, x0 + bar], [y0, y0], color="white", lw=2.5, solid_capstyle="butt", path_effects=_outline(),
            zorder=6)
    ax.text(x0 + bar / 2, y0 - 1.5, f"{bar:.0f} mm", color="white", fontsize=8, ha="center", va="bottom",
            path_effects=_outline(), zorder=6)
    return extent


def _draw_vertebrae(ax, reformat: SpineReformat, placed: list[QCVertebra], extent, scale: float,
                    dpi: int) -> list[float]:
    """Each vertebra's height lines (and a fracture's grade basis), then its level name in front of
    its anterior wall, clear of every line; returns the centres' picture rows (mm)."""
    px = reformat.pixel_mm

    def to_mm(points) -> np.ndarray:
        return reformat.ras_to_image(np.asarray(points, float))[..., ::-1] * px  # (x, y) mm

    anchors, anterior_walls, segments = [], {}, []
    for v in placed:
        colour = _grade_colour(v)
        centre = to_mm(v.centre_ras)
        mids = {}
        drawn = not NO_HEIGHT_LINE_FLAGS.intersection(v.flags)
        lw = 1.7 if v.genant_grade is not None else 1.2
        for key in HEIGHT_KEYS:
            line = v.height_lines_ras.get(key)
            ends = None if line is None or not drawn else to_mm(np.stack([line[0], line[1]]))
            if ends is None or not np.all(np.isfinite(ends)):
                continue
            mids[key] = ends.mean(axis=0)
            segments.append(ends)
            ax.plot(ends[:, 0], ends[:, 1], color=colour, lw=lw, linestyle=(0, (3, 2)) if v.borderline else "-",
                    marker="_", markersize=7, markeredgewidth=lw, path_effects=_outline(2.6), zorder=4,
                    solid_capstyle="butt", dash_capstyle="butt")
        if v.genant_grade is not None and v.genant_grade >= 1 and drawn:
            _draw_grade_basis(ax, v, to_mm)
        # The anterior wall lies 15/70 of the Ha–Hp distance in front of Ha.
        if "ha" in mids and "hp" in mids:
            anterior_walls[v.level] = mids["ha"] + (mids["ha"] - mids["hp"]) * (0.15 / 0.70) - centre
        anchors.append(centre[1])
    # Without lines of its own, a vertebra's anterior wall is as far in front of its centre as the others'.
    typical_wall = np.median(list(anterior_walls.values()), axis=0) if anterior_walls else np.array([-17.0, 0.0])
    name_height = _text_size("T12", 10, "bold", dpi)[1] / scale
    marker_width = _text_size("A", 11, "bold", dpi)[0] / scale + 0.01 * (extent[1] - extent[0])
    for v, y in zip(placed, anchors):
        x = to_mm(v.centre_ras)[0] + anterior_walls.get(v.level, typical_wall)[0] - 3.0
        beside_marker = abs(y - 0.5 * (extent[2] + extent[3])) < name_height  # the "A" at mid-height
        x = clear_of_lines(x, y, _text_size(v.level, 10, "bold", dpi)[0] / scale, name_height, segments,
                            extent[0] + 2.0 + (marker_width if beside_marker else 0.0))
        ax.text(x, y, v.level, color=_grade_colour(v), fontsize=10, fontweight="bold", ha="right", va="center",
                path_effects=_outline(), zorder=5, clip_on=True)
    return anchors


def _draw_labels(panel, placed: list[QCVertebra], anchors: list[float], extent, img_h: float, scale: float) -> None:
    """The labels beside the image, each joined to its vertebra's centre row: two-line labels 34 px
    apart, or one-line labels down to 17 px apart when they do not fit."""
    gap_px = min(34.0, img_h / max(1, len(placed)))
    compact = gap_px < 32.0
    gap_px = max(gap_px, 17.0) if compact else gap_px
    gap_mm = gap_px / scale
    desired = np.asarray(anchors, float)
    order = np.argsort(desired)
    spread = np.empty_like(desired)
    spread[order] = _spread(desired[order], gap_mm, extent[3] + 0.5 * gap_mm, extent[2] - 0.5 * gap_mm)
    for v, y_anchor, y_label in zip(placed, desired, spread):
        colour = _grade_colour(v)
        main, second = vertebra_label(v)
        panel.plot([0.0, 10.0, 18.0], [y_anchor, y_anchor, y_label], color="#555555", lw=0.8, clip_on=False)
        if compact:
            hu_text = f"  HU {v.trabecular_hu:.0f}" if math.isfinite(v.trabecular_hu) else ""
            panel.text(22.0, y_label, main + hu_text, fontsize=8, fontweight="bold", ha="left", va="center",
                       color="black", bbox=dict(boxstyle="round,pad=0.15", facecolor=colour, edgecolor="none"),
                       clip_on=False)
            continue
        panel.text(22.0, y_label, main, fontsize=9.5, fontweight="bold", ha="left", va="bottom", color="black",
                   bbox=dict(boxstyle="round,pad=0.2", facecolor=colour, edgecolor="none"), clip_on=False)
        if second:
            panel.text(24.0, y_label + 2.0 / scale, second, fontsize=8, ha="left", va="top", color="#222222",
                       clip_on=False)


def _draw_foot(figure, placed: list[QCVertebra], x: float, legend_y: float, method_y: float, method: str) -> None:
    """The legend (with the grade basis's entries when some vertebra shows it) and the method line,
    at figure fractions ``x``, ``legend_y`` and ``method_y``."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shows_basis = any(v.expected_superior_ras is not None and v.genant_grade for v in placed)
    handles = [Patch(facecolor=GRADE_COLOURS[g], edgecolor="none", label=GRADE_LEGEND[g]) for g in (0, 1, 2, 3, None)]
    handles.append(Line2D([0], [0], color="#555555", lw=1.7, linestyle=(0, (3, 2)), label="* borderline"))
    if shows_basis:
        handles.append(Line2D([0], [0], color=EXPECTED_COLOUR, lw=1.8, linestyle=(0, (2, 1.5)),
                              label="expected endplate"))
        handles.append(Line2D([0], [0], color=LOST_COLOUR, lw=2.6, label=f"height lost ≥ {LOST_HEIGHT:.0%}"))
    figure.legend(handles=handles, loc="lower left", bbox_to_anchor=(x, legend_y), ncol=6,
                  fontsize=8, frameon=False, handlelength=1.6, columnspacing=1.0, handletextpad=0.4)
    figure.text(x, method_y, method + " · anterior left, cranial up · lines: Ha, Hm, Hp"
                + (" · expected: from the neighbours" if shows_basis else ""),
                fontsize=7.5, color="#444444", ha="left", va="bottom")


def clear_of_lines(x_right: float, y: float, width: float, height: float, segments: list[np.ndarray],
                    x_min: float, margin: float = 1.5) -> float:
    """The right edge (mm) nearest ``x_right``, moving only anteriorly (left), for a text box
    ``width`` x ``height`` mm centred vertically on ``y`` that no drawn line segment (2 x 2 arrays of
    (x, y) mm end points) crosses; never left of ``x_min + width``."""
    band = (y - 0.5 * height - margin, y + 0.5 * height + margin)
    for _ in range(len(segments) + 1):
        blocking = []
        for (x0, y0), (x1, y1) in segments:
            if max(y0, y1) < band[0] or min(y0, y1) > band[1]:
                continue
            if abs(y1 - y0) < 1e-9:
                xs = [x0, x1]
            else:  # the segment's x where it enters and leaves the band
                t = np.clip((np.array(band) - y0) / (y1 - y0), 0.0, 1.0)
                xs = list(x0 + t * (x1 - x0))
            if min(xs) <= x_right + margin and max(xs) >= x_right - width - margin:
                blocking.append(min(xs))
        if not blocking:
            break
        x_right = min(blocking) - margin
    return max(x_right, x_min + width)


def _text_size(text: str, size: float, weight: str, dpi: int) -> tuple[float, float]:
    """Width and height (figure pixels) of ``text`` in matplotlib's default font, as the Agg
    renderer that draws it measures them."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    width, height, _ = RendererAgg(8, 8, dpi).get_text_width_height_descent(
        text, FontProperties(size=size, weight=weight), ismath=False)
    return width, height


def _wrap(text: str, width_px: float, size: float, weight: str, dpi: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width_px`` wide in matplotlib's default font
    (measured by the Agg renderer that draws them)."""

    def width(line: str) -> float:
        return _text_size(line, size, weight, dpi)[0]

    lines: list[str] = []
    for word in text.split():
        if lines and width(lines[-1] + " " + word) <= width_px:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _grey_with_outside():
    from matplotlib import colormaps

    return colormaps["gray"].with_extremes(bad="#1c2a4a")  # outside the CT: dark blue, not air


def _save_atomically(figure, path: Path, dpi: int) -> None:
    """Save ``figure`` as PNG to a hidden temporary file beside ``path``, then rename it."""
    # Fast PNG compression: a QC picture is written once per exam and read by eye (2.5x faster).
    atomic_write(path, ".png", lambda temporary: figure.savefig(temporary, format="png", dpi=dpi, facecolor="white",
                                                                pil_kwargs={"compress_level": 1}))
