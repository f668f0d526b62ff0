"""The QC picture of one exam (SPEC §5 ``qc.png``): a sagittal view along the spine's curve with
each vertebra's level, its three measured height lines, its Genant grade in colour and its
trabecular HU, so that a radiologist can accept or reject the result at a glance.

Two parts, both without Qt and without global matplotlib state:

* :func:`spine_reformat` samples the CT on a surface through the spine's centre line (a cubic
  spline through the vertebral body centres, parameterised by arc length and extended straight
  beyond the end vertebrae) and returns a :class:`SpineReformat`: the image in HU and the mapping
  between RAS millimetres and image pixels (both ways). Two geometries:

  - ``"curved"`` (default), a *projected curved planar reformat*: image coordinates are
    millimetres in the spine's best sagittal plane (spanned by the mean antero-posterior axis and
    the chord from the first to the last body centre); the surface sampled is that plane shifted,
    row by row, left or right so that it passes through the centre line. Sagittal curvature
    (lordosis, kyphosis) is shown as it is and in-plane lengths are true; a scoliosis is followed
    sideways, so every body is cut through its mid-sagittal plane (heights appear shortened by
    the cosine of the vertebra's coronal tilt only).
  - ``"straightened"``: rows are arc length along the centre line, columns the offset along each
    point's own antero-posterior axis (from the vertebrae's frames, orthogonalised to the
    tangent). The bodies stand in one straight column, but lengths at an offset ``a`` from the
    centre line are scaled by ``1 / (1 + κ a)`` for a curvature ``κ``: in a lordosis the anterior
    heights look a few per cent shorter and the posterior ones longer (about 6 % each way at
    14 mm from the centre line of a lumbar lordosis), which mimics a wedge. Used on request, or
    when the centre line turns back along its chord (the curved geometry needs it to progress
    monotonically from the first to the last centre).

  Only the strip of the CT around the surface is read (trilinear interpolation,
  ``scipy.ndimage.map_coordinates`` on a view of the bounding box of the sample points; the CT is
  never copied or converted as a whole). An optional thin slab (``slab_mm``) averages a few
  surfaces across the left-right direction to reduce noise.

* :func:`render_qc` draws the reformat with matplotlib's Agg canvas (no ``pyplot``, no change of
  the user's backend, so it is safe inside 3D Slicer; matplotlib is imported only when drawing)
  and writes the PNG atomically. It takes :class:`QCVertebra` records or the morphometry's
  results with their grades and HU (:func:`qc_vertebrae` converts them).

Picture conventions: **cranial at the top, anterior on the left** (the radiological convention
for sagittal images), marked with ``S``/``I``/``A``/``P`` on the image; pixels are square and in
millimetres (a scale bar is drawn). Colours by Genant grade: 0 green, 1 yellow, 2 orange, 3 red;
grey for vertebrae without a grade (incomplete, heights missing, S1). Borderline grades (loss
within 3 percentage points of a grade boundary) have dashed lines and a ``*``. Each label reads
e.g. ``L1  G2  wedge  31%`` with ``HU 142 · Ha/Hm/Hp 19.0/24.1/27.6 mm`` below it
(:func:`vertebra_label`). Vertebrae with implausible bodies keep their label but get no lines and
do not steer the centre line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from .. import levels as lv
from ..errors import InputError
from ..io.files import atomic_write
from .measurements import HEIGHTS_MEANINGLESS_FLAGS

NAN = float("nan")

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

HU_ATTRIBUTES = ("trabecular_hu_mean", "mean_hu", "hu_mean", "mean", "trabecular_hu")
"""Attribute (or key) names under which an HU record may carry its mean (see :func:`qc_vertebrae`)."""

UNRELIABLE_BODY_FLAGS = frozenset({
    "implausible_body_volume", "implausible_depth", "no_body_in_vertebrae_body_map", "body_not_separated"})
"""Morphometry flags after which a vertebra's centre and axes are not trusted to guide the
centre line of the picture (it is still drawn where its centre falls)."""

IMPLAUSIBLE_HEIGHT_FLAGS = UNRELIABLE_BODY_FLAGS | {"implausible_height", "heights_not_measurable"}
"""Flags after which a vertebra's height lines are not drawn."""

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
# What is drawn per vertebra
# ------------------------------------------------------------------------------------------------


@dataclass
class QCVertebra:
    """Everything the QC picture shows of one vertebra. Points and axes in RAS mm.

    ``centre_ras`` (body centre) and ``ap_ras`` (unit vector towards anterior) place the vertebra
    on the spine's centre line; without a centre it is listed in the title only. ``cc_ras`` (unit,
    superior) is only needed when the spine has one vertebra. ``height_lines_ras`` maps
    ``"ha"``/``"hm"``/``"hp"`` to the (superior, inferior) end points of each measured height.
    ``genant_grade`` is None for an ungraded vertebra; ``height_loss`` a fraction;
    ``trabecular_hu`` NaN when not measured."""

    level: str
    complete: bool = False
    centre_ras: np.ndarray | None = None
    ap_ras: np.ndarray | None = None
    cc_ras: np.ndarray | None = None
    height_lines_ras: dict = field(default_factory=dict)
    ha_mm: float = NAN
    hm_mm: float = NAN
    hp_mm: float = NAN
    genant_grade: int | None = None
    shape: str = ""
    height_loss: float = NAN
    borderline: bool = False
    trabecular_hu: float = NAN
    flags: list[str] = field(default_factory=list)
    outline_ras: dict = field(default_factory=dict)
    """The measured endplates in the mid-sagittal plane, ``superior``/``inferior`` → (N, 3) RAS
    points along the depth (``morphometry.VertebraHeights.endplate_outline_ras``)."""
    expected_superior_ras: np.ndarray | None = None
    """Where the superior endplate would lie with the expected normal heights (the grading's
    ``expected_profile_mm``) over the measured inferior endplate: the basis of the grade."""
    lost: np.ndarray | None = None
    """Per outline point, whether its height is :data:`LOST_HEIGHT` or more below the expected:
    the depressed part of the endplate."""
    depressed_side: str = "superior"
    """The endplate drawn as depressed: the one deeper below its chord."""


LOST_HEIGHT = 0.20
"""A point of the outline whose height is this fraction or more below the expected one is drawn
as lost (Genant's grade-1 height reduction)."""


def _get(record, name, default=None):
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def _float(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NAN
    return value if math.isfinite(value) else NAN


def _hu_value(record) -> float:
    """Mean HU of an HU record: a number, or an object / mapping with one of :data:`HU_ATTRIBUTES`
    (NaN for None or a record without one)."""
    if isinstance(record, (int, float, np.number)):
        return _float(record)
    for name in HU_ATTRIBUTES:
        value = _get(record, name)
        if value is not None:
            return _float(value)
    return NAN


def _hu_by_level(hu) -> dict[str, float]:
    """``{LEVEL: HU}`` from a mapping level → HU record, or from records that carry ``level``."""
    if not hu:
        return {}
    if isinstance(hu, Mapping):
        return {str(k).upper(): _hu_value(v) for k, v in hu.items()}
    return {str(_get(r, "level")).upper(): _hu_value(r) for r in hu if _get(r, "level") is not None}


def qc_vertebrae(heights: Sequence, grades: Sequence | Mapping | None = None,
                 hu: Mapping | Sequence | None = None) -> list[QCVertebra]:
    """Build the QC records from the morphometry, its grades and the trabecular HU.

    ``heights``: :class:`~.morphometry.VertebraHeights` (or records with the same attributes:
    ``level``, ``complete``, ``ha_mm``/``hm_mm``/``hp_mm``, ``frame`` with ``centre``/``ap``/``cc``,
    ``height_lines_ras``, ``flags``); ``grades``: :class:`~.grading.VertebraGrade` per vertebra,
    as a list in the same order or a mapping level → grade (default: :func:`~.grading.grade_spine`
    of ``heights``); ``hu``: optional trabecular HU per level: a mapping level → HU, where the HU
    is a number or an object / mapping carrying it under one of :data:`HU_ATTRIBUTES` (such as
    :class:`~.attenuation.TrabecularROI`'s ``mean_hu``), or a list of such records that carry
    their ``level``."""
    heights = list(heights)
    if grades is None:
        from ..measure.grading import grade_spine

        grades = grade_spine(heights)
    if isinstance(grades, Mapping):
        by_level = {str(k).upper(): g for k, g in grades.items()}
    else:
        grades = list(grades)
        if len(grades) != len(heights):
            raise ValueError("grades must have one entry per vertebra of heights")
        by_level = {str(_get(h, "level")).upper(): g for h, g in zip(heights, grades)}
    hu_by_level = _hu_by_level(hu)
    records = []
    for h in heights:
        level = str(_get(h, "level")).upper()
        grade = by_level.get(level)
        frame = _get(h, "frame")
        lines = {key: (np.asarray(top, float), np.asarray(bottom, float))
                 for key, (top, bottom) in (_get(h, "height_lines_ras") or {}).items()}
        flags = list(_get(h, "flags") or [])
        if grade is not None:
            flags += [f for f in (_get(grade, "flags") or []) if f not in flags]
        complete = bool(_get(h, "complete")) and (grade is None or bool(_get(grade, "complete", True)))
        records.append(QCVertebra(
            level=level,
            complete=complete,
            centre_ras=None if frame is None else np.asarray(frame.centre, float),
            ap_ras=None if frame is None else np.asarray(frame.ap, float),
            cc_ras=None if frame is None else np.asarray(frame.cc, float),
            height_lines_ras=lines,
            ha_mm=_float(_get(h, "ha_mm")), hm_mm=_float(_get(h, "hm_mm")), hp_mm=_float(_get(h, "hp_mm")),
            genant_grade=None if grade is None else _get(grade, "genant_grade"),
            shape="" if grade is None else str(_get(grade, "shape") or ""),
            height_loss=NAN if grade is None else _float(_get(grade, "grade_loss", _get(grade, "height_loss"))),
            borderline=False if grade is None else bool(_get(grade, "borderline")),
            trabecular_hu=hu_by_level.get(level, NAN),
            flags=flags,
            **_grade_basis(h, grade),
        ))
    return records


def _grade_basis(heights, grade) -> dict:
    """The QC fields that show why a vertebra got its grade: its measured outline, the expected
    superior endplate and the lost part (empty without an outline or an expected profile)."""
    outline = {key: np.asarray(points, float) for key, points in (_get(heights, "endplate_outline_ras") or {}).items()}
    expected = tuple(_get(grade, "expected_profile_mm") or ()) if grade is not None else ()
    frame = _get(heights, "frame")
    if set(outline) != {"superior", "inferior"} or frame is None or len(expected) != len(outline["inferior"]):
        return {"outline_ras": outline}
    expected = np.asarray(expected, float)
    cc = np.asarray(frame.cc, float)
    measured = (outline["superior"] - outline["inferior"]) @ cc
    depression = _get(heights, "endplate_depression_mm") or (NAN, NAN)
    side = "inferior" if _float(depression[1]) > _float(depression[0]) else "superior"
    return {"outline_ras": outline, "expected_superior_ras": outline["inferior"] + expected[:, None] * cc,
            "lost": measured <= (1.0 - LOST_HEIGHT) * expected, "depressed_side": side}


# ------------------------------------------------------------------------------------------------
# Reformat
# ------------------------------------------------------------------------------------------------


def _unit_rows(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


@dataclass
class _CentreLine:
    """The centre line sampled every ``step`` mm of arc length ``s`` (0 at the first centre,
    increasing caudally), with unit caudal tangents and antero-posterior / right axes."""

    s: np.ndarray
    points: np.ndarray
    tangent: np.ndarray  # caudal
    ap: np.ndarray
    lr: np.ndarray
    s_centres: np.ndarray


def _centre_line(centres: np.ndarray, ap: np.ndarray, cc0: np.ndarray | None, extend_mm: float,
                 step: float) -> _CentreLine:
    """Cubic spline (natural) through the centres in the chord-length parameter, resampled by arc
    length, extended straight along the end tangents by ``extend_mm``."""
    n = len(centres)
    if n == 1:
        caudal = -_unit_rows(np.asarray(cc0 if cc0 is not None else (0.0, 0.0, 1.0), float))
        arc_dense = np.array([0.0])
        pts_dense = centres.copy()
        tan_dense = caudal[None, :]
        s_centres = np.array([0.0])
    else:
        chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(centres, axis=0), axis=1))])
        count = max(2, int(math.ceil(chord[-1] / 0.1)) + 1)
        tt = np.linspace(0.0, chord[-1], count)
        if n == 2:
            pts_dense = centres[0] + np.outer(tt / chord[-1], centres[1] - centres[0])
            tan_dense = np.repeat(_unit_rows(centres[1] - centres[0])[None, :], count, axis=0)
        else:
            spline = CubicSpline(chord, centres, bc_type="natural", axis=0)
            pts_dense = spline(tt)
            tan_dense = _unit_rows(spline(tt, 1))
        arc_dense = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts_dense, axis=0), axis=1))])
        s_centres = np.interp(chord, tt, arc_dense)
    length = arc_dense[-1]
    s = np.arange(-extend_mm, length + extend_mm + 0.5 * step, step)
    inside = (s >= 0.0) & (s <= length)
    points = np.empty((len(s), 3))
    tangent = np.empty((len(s), 3))
    for d in range(3):
        points[inside, d] = np.interp(s[inside], arc_dense, pts_dense[:, d])
        tangent[inside, d] = np.interp(s[inside], arc_dense, tan_dense[:, d])
    before, after = s < 0.0, s > length
    points[before] = pts_dense[0] + np.outer(s[before], tan_dense[0])
    tangent[before] = tan_dense[0]
    points[after] = pts_dense[-1] + np.outer(s[after] - length, tan_dense[-1])
    tangent[after] = tan_dense[-1]
    tangent = _unit_rows(tangent)
    ap_s = np.stack([np.interp(s, s_centres, ap[:, d]) for d in range(3)], axis=1)
    ap_s = _unit_rows(ap_s - np.sum(ap_s * tangent, axis=1, keepdims=True) * tangent)
    lr_s = np.cross(tangent, ap_s)  # lr = ap x cc with cc = -tangent
    return _CentreLine(s, points, tangent, ap_s, lr_s, s_centres)


@dataclass
class SpineReformat:
    """A sagittal reformat along the spine.

    ``image``: float32 HU, shape ``(rows, cols)``, NaN outside the CT; row 0 is cranial, column 0
    anterior (radiological sagittal convention: the patient faces left). ``pixel_mm``: the side
    of the square pixels. Pixel ``(row, col)`` has its centre at ``(col, row) * pixel_mm`` in the
    picture's millimetre coordinates. ``mode``: ``"curved"`` or ``"straightened"`` (see the
    module docstring). ``slab_mm``: thickness averaged across the surface."""

    image: np.ndarray
    pixel_mm: float
    mode: str
    slab_mm: float
    _curve: _CentreLine = field(repr=False)
    _plane: dict | None = field(default=None, repr=False)
    _a_left: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def image_to_ras(self, rows, cols, offset_mm=0.0) -> np.ndarray:
        """RAS (mm) of continuous pixel coordinates, ``offset_mm`` to the patient's right of the
        sampled surface. Broadcasts; returns shape ``(..., 3)``."""
        rows, cols, offset = np.broadcast_arrays(np.asarray(rows, float), np.asarray(cols, float),
                                                 np.asarray(offset_mm, float))
        px = self.pixel_mm
        if self._plane is None:
            c = self._curve
            s = c.s[0] + rows * px
            a = self._a_left - cols * px
            point = _interp_rows(c.points, c.s, s, extrapolate=True)
            ap = _interp_rows(c.ap, c.s, s)
            lr = _interp_rows(c.lr, c.s, s)
            return point + a[..., None] * ap + offset[..., None] * lr
        p = self._plane
        y = p["y_top"] - rows * px
        x = p["x_left"] - cols * px
        t = np.interp(y, p["y_curve"], p["t_curve"])
        return (p["origin"] + x[..., None] * p["ap"] + y[..., None] * p["si"]
                + (t + offset)[..., None] * p["lr"])

    def ras_to_image(self, ras) -> np.ndarray:
        """Continuous pixel coordinates ``(row, col)`` of RAS points (shape ``(..., 3)`` →
        ``(..., 2)``): the point is projected on the sampled surface along the left-right
        direction (curved) or onto the centre line's normal plane (straightened)."""
        return self._map(ras)[..., :2]

    def offset_mm(self, ras) -> np.ndarray:
        """Signed distance (mm, positive to the patient's right) of RAS points from the sampled
        surface."""
        return self._map(ras)[..., 2]

    def _map(self, ras) -> np.ndarray:
        ras = np.asarray(ras, float)
        flat = ras.reshape(-1, 3)
        px = self.pixel_mm
        if self._plane is None:
            c = self._curve
            from scipy.spatial import cKDTree

            _, index = cKDTree(c.points).query(flat)
            s = c.s[index] + np.sum((flat - c.points[index]) * c.tangent[index], axis=1)
            # Refine: the point's row is where it lies in the plane of that row's AP and LR axes.
            for _ in range(2):
                point = _interp_rows(c.points, c.s, s, extrapolate=True)
                normal = _unit_rows(np.cross(_interp_rows(c.ap, c.s, s), _interp_rows(c.lr, c.s, s)))
                s = s + np.sum((flat - point) * normal, axis=1) / np.maximum(
                    np.sum(_interp_rows(c.tangent, c.s, s) * normal, axis=1), 0.5)
            point = _interp_rows(c.points, c.s, s, extrapolate=True)
            rel = flat - point
            a = np.sum(rel * _interp_rows(c.ap, c.s, s), axis=1)
            n = np.sum(rel * _interp_rows(c.lr, c.s, s), axis=1)
            out = np.stack([(s - c.s[0]) / px, (self._a_left - a) / px, n], axis=1)
        else:
            p = self._plane
            rel = flat - p["origin"]
            x, y, z = rel @ p["ap"], rel @ p["si"], rel @ p["lr"]
            t = np.interp(y, p["y_curve"], p["t_curve"])
            out = np.stack([(p["y_top"] - y) / px, (p["x_left"] - x) / px, z - t], axis=1)
        return out.reshape(ras.shape[:-1] + (3,))


def _interp_rows(values: np.ndarray, s_grid: np.ndarray, s, extrapolate: bool = False) -> np.ndarray:
    """Linear interpolation of per-sample vectors ``values`` (n, 3) on the uniform grid
    ``s_grid`` at ``s`` (any shape); constant (or linear, with ``extrapolate``) beyond the ends."""
    s = np.asarray(s, float)
    step = s_grid[1] - s_grid[0] if len(s_grid) > 1 else 1.0
    f = (s - s_grid[0]) / step
    last = len(s_grid) - 1
    if last == 0:
        return np.broadcast_to(values[0], s.shape + (3,)).copy()
    i0 = np.clip(np.floor(f).astype(int), 0, last - 1)
    w = f - i0
    if not extrapolate:
        w = np.clip(w, 0.0, 1.0)
    return values[i0] * (1.0 - w)[..., None] + values[i0 + 1] * w[..., None]


def _sample_kji(ct: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """Trilinear HU (float32) at continuous voxel indices ``(N, 3)`` in ``(k, j, i)`` order; NaN
    outside the grid (beyond its first or last voxel centre). Reads only the bounding box of the
    points (a view of ``ct``: the volume is never copied or converted as a whole)."""
    out = np.full(len(kji), np.nan, dtype=np.float32)
    upper = np.asarray(ct.shape) - 1
    inside = np.all((kji >= -1e-6) & (kji <= upper + 1e-6), axis=1)  # False for NaN
    if not inside.any():
        return out
    points = kji[inside]
    lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, np.asarray(ct.shape))
    crop = ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out[inside] = ndimage.map_coordinates(crop, (points - lo).T, order=1, mode="nearest", output=np.float32,
                                          prefilter=False)
    return out


def spine_reformat(
    ct: np.ndarray,
    ijk_to_ras: np.ndarray,
    centres_ras,
    ap_ras,
    *,
    cc_ras=None,
    mode: str = "curved",
    pixel_mm: float = 0.75,
    anterior_mm: float = 45.0,
    posterior_mm: float = 80.0,
    extend_mm: float | None = None,
    slab_mm: float = 3.0,
) -> SpineReformat:
    """Sagittal reformat of ``ct`` along the spine (see the module docstring).

    ``ct``: HU array ``[k, j, i]`` (any numeric dtype; read, never copied as a whole);
    ``ijk_to_ras``: its 4x4 grid matrix (mm; any spacing, oblique grids allowed);
    ``centres_ras``: ``(n, 3)`` vertebral body centres **ordered cranial to caudal**;
    ``ap_ras``: ``(n, 3)`` their antero-posterior unit axes (pointing anterior);
    ``cc_ras``: the superior axis of the vertebra, only used when ``n == 1``;
    ``mode``: ``"curved"`` (projected curved planar reformat, true in-plane lengths) or
    ``"straightened"``; ``pixel_mm``: pixel size; ``anterior_mm`` / ``posterior_mm``: how far
    the picture reaches in front of and behind the centre line; ``extend_mm``: how far beyond the
    first and last centre (default three quarters of the median spacing of the centres, at least
    15 mm); ``slab_mm``: left-right thickness averaged (0 for a single surface).
    """
    if mode not in ("curved", "straightened"):
        raise ValueError(f"mode must be 'curved' or 'straightened', not {mode!r}")
    if np.ndim(ct) != 3:
        raise ValueError("ct must be a 3-D array [k, j, i]")
    if not pixel_mm > 0:
        raise ValueError("pixel_mm must be positive")
    centres = np.asarray(centres_ras, float).reshape(-1, 3)
    ap = np.asarray(ap_ras, float).reshape(-1, 3)
    if len(centres) == 0 or len(ap) != len(centres):
        raise ValueError("one antero-posterior axis per centre is needed, and at least one centre")
    if not (np.all(np.isfinite(centres)) and np.all(np.isfinite(ap))):
        raise ValueError("centres and axes must be finite")
    # Drop repeated centres (a zero-length chord).
    keep = [0]
    for i in range(1, len(centres)):
        if np.linalg.norm(centres[i] - centres[keep[-1]]) > 1e-3:
            keep.append(i)
    centres, ap = centres[keep], _unit_rows(ap[keep])
    if extend_mm is None:
        gaps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        extend_mm = max(15.0, 0.75 * float(np.median(gaps))) if len(gaps) else 25.0
    cc0 = None if cc_ras is None else np.asarray(cc_ras, float).reshape(-1, 3)[0]
    curve = _centre_line(centres, ap, cc0, float(extend_mm), float(pixel_mm))
    px = float(pixel_mm)
    offsets = _slab_offsets(slab_mm, px)

    plane = None
    if mode == "curved":
        plane = _projection_plane(curve, centres)
        if plane is None:
            mode = "straightened"
    if plane is None:
        a_left = float(anterior_mm)
        cols = int(math.floor((anterior_mm + posterior_mm) / px)) + 1
        result = SpineReformat(np.empty((0, 0), np.float32), px, mode, float(slab_mm), curve, None, a_left)
        rows = len(curve.s)
    else:
        x_curve = (curve.points - plane["origin"]) @ plane["ap"]
        plane["x_left"] = float(x_curve.max() + anterior_mm)
        x_right = float(x_curve.min() - posterior_mm)
        cols = int(math.floor((plane["x_left"] - x_right) / px)) + 1
        rows = int(math.floor((plane["y_top"] - plane["y_bottom"]) / px)) + 1
        result = SpineReformat(np.empty((0, 0), np.float32), px, mode, float(slab_mm), curve, plane, 0.0)
    rr, cc = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, float))[:3]
    kji = (result.image_to_ras(rr, cc).reshape(-1, 3) @ ras_to_ijk[:, :3].T + ras_to_ijk[:, 3])[:, ::-1]
    # The slab's surfaces are the centre surface moved along the left-right axis (per row).
    lr = plane["lr"][None, :] if plane is not None else np.repeat(curve.lr, cols, axis=0)
    step_kji = (lr @ ras_to_ijk[:, :3].T)[:, ::-1]
    total = np.zeros(rows * cols, np.float32)
    count = np.zeros(rows * cols, np.float32)
    for offset in offsets:
        values = _sample_kji(ct, kji + offset * step_kji if offset else kji)
        finite = np.isfinite(values)
        total[finite] += values[finite]
        count[finite] += 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(count > 0, total / np.maximum(count, 1.0), np.nan).astype(np.float32)
    result.image = image.reshape(rows, cols)
    return result


def _slab_offsets(slab_mm: float, px: float) -> np.ndarray:
    if not slab_mm > 0:
        return np.zeros(1)
    m = min(9, max(2, int(math.ceil(slab_mm / px)) + 1))
    return np.linspace(-0.5 * slab_mm, 0.5 * slab_mm, m)


def _projection_plane(curve: _CentreLine, centres: np.ndarray) -> dict | None:
    """The best sagittal plane of the curved reformat, or None when the centre line does not
    progress monotonically along its chord (then the straightened geometry is used)."""
    if len(centres) > 1:
        si = _unit_rows(centres[0] - centres[-1])
    else:
        si = -curve.tangent[0]
    ap = curve.ap.mean(axis=0)
    ap = ap - (ap @ si) * si
    if np.linalg.norm(ap) < 1e-6:
        return None
    ap = _unit_rows(ap)
    lr = np.cross(ap, si)
    origin = centres.mean(axis=0)
    rel = curve.points - origin
    y = rel @ si
    if len(y) > 1 and not np.all(np.diff(y) < 0):  # must descend caudally
        return None
    return {"origin": origin, "ap": ap, "si": si, "lr": lr,
            "y_curve": y[::-1].copy(), "t_curve": (rel @ lr)[::-1].copy(),
            "y_top": float(y[0]), "y_bottom": float(y[-1])}


# ------------------------------------------------------------------------------------------------
# Picture
# ------------------------------------------------------------------------------------------------


def vertebra_label(v: QCVertebra) -> tuple[str, str]:
    """Main and second line of a vertebra's label."""
    heights = [v.ha_mm, v.hm_mm, v.hp_mm]
    hu = f"HU {v.trabecular_hu:.0f}" if math.isfinite(v.trabecular_hu) else ""
    hts = ("" if not any(math.isfinite(h) for h in heights)
           else "heights not measurable" if HEIGHTS_MEANINGLESS_FLAGS.intersection(v.flags)
           else "Ha/Hm/Hp " + "/".join("–" if not math.isfinite(h) else f"{h:.1f}" for h in heights) + " mm")
    second = " · ".join(part for part in (hu, hts) if part)
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
    grades: Sequence | Mapping | None = None,
    hu: Mapping | Sequence | None = None,
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
    drawn cranial at the top. ``hu``: optional trabecular HU per level (a mapping level → HU or
    HU record, or records with a ``level``; see :func:`qc_vertebrae`), shown in the labels;
    with :class:`QCVertebra` records it overrides their ``trabecular_hu``.
    ``title``: first line(s) of the heading, e.g. the exam id and contrast status; a summary
    line (maximum grade, fractured levels) is added below it.
    ``mode``, ``pixel_mm``, ``slab_mm``, ``anterior_mm``, ``posterior_mm``: the reformat (see
    :func:`spine_reformat`); ``window``: display ``(level, width)`` in HU.

    Picture: cranial up, anterior left (``S``, ``I``, ``A``, ``P`` marked), square millimetre
    pixels with a scale bar; per vertebra its Ha/Hm/Hp lines and level name on the image and a
    label beside it, coloured by grade (:data:`GRADE_COLOURS`; borderline dashed with ``*``).
    Raises :class:`~.errors.InputError` when no vertebra has a centre or the file cannot be
    written.
    """
    records = list(vertebrae)
    if records and not isinstance(records[0], QCVertebra):
        records = qc_vertebrae(records, grades, hu)
    elif hu:
        hu_by_level = _hu_by_level(hu)
        for v in records:
            if v.level in hu_by_level:
                v.trabecular_hu = hu_by_level[v.level]

    def position(v: QCVertebra) -> int:
        try:
            return lv.level_position(v.level)
        except ValueError:
            return 10_000

    records.sort(key=position)
    placed = [v for v in records if v.centre_ras is not None and np.all(np.isfinite(v.centre_ras))]
    if not placed:
        raise InputError("the QC picture needs at least one vertebra with a known centre")
    guides = [v for v in placed if v.ap_ras is not None and not UNRELIABLE_BODY_FLAGS.intersection(v.flags)]
    if not guides:
        guides = placed
    ap = [v.ap_ras if v.ap_ras is not None else np.array([0.0, 1.0, 0.0]) for v in guides]
    reformat = spine_reformat(ct, ijk_to_ras, [v.centre_ras for v in guides], ap, cc_ras=guides[0].cc_ras,
                              mode=mode, pixel_mm=pixel_mm, anterior_mm=anterior_mm, posterior_mm=posterior_mm,
                              slab_mm=slab_mm)
    missing = [v.level for v in records if v not in placed]
    figure = _draw(reformat, placed, records, title, window, missing, dpi)
    _save_atomically(figure, Path(out_path), dpi)


EXPECTED_COLOUR = "#00e5ff"
LOST_COLOUR = "#ff00cc"


def _draw_grade_basis(ax, v: QCVertebra, to_mm, colour, outline_effect) -> None:
    """A fractured vertebra's measured endplates (grade colour), its expected superior endplate
    (dashed) and the lost part of the depressed endplate (thick)."""
    from matplotlib import patheffects

    if not v.outline_ras:
        return
    for points in v.outline_ras.values():
        xy = to_mm(points)
        ax.plot(xy[:, 0], xy[:, 1], color=colour, lw=0.9, path_effects=outline_effect, zorder=4)
    if v.expected_superior_ras is None:
        return
    xy = to_mm(v.expected_superior_ras)
    ax.plot(xy[:, 0], xy[:, 1], color=EXPECTED_COLOUR, lw=1.8, linestyle=(0, (2, 1.5)), zorder=5,
            path_effects=[patheffects.withStroke(linewidth=3.0, foreground="black")])
    if v.lost is not None and np.any(v.lost):
        xy = to_mm(v.outline_ras[v.depressed_side])
        lost = np.where(v.lost, 0.0, np.nan)[:, None] + xy
        ax.plot(lost[:, 0], lost[:, 1], color=LOST_COLOUR, lw=2.6, solid_capstyle="round", zorder=5)


def _draw(reformat: SpineReformat, placed: list[QCVertebra], records: list[QCVertebra], title: str,
          window: tuple[float, float], missing: list[str], dpi: int):
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

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
    if missing:
        summary_lines += _wrap("Not shown (no centre): " + ", ".join(missing), room, 10, "normal", dpi)
    top = 26.0 + 18.0 * len(title_lines) + 15.0 * len(summary_lines)
    bottom = 64.0
    fig_h = top + img_h + bottom
    figure = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)

    ax = figure.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
    level, width = window
    cmap = _grey_with_outside()
    extent = (-0.5 * px, (cols - 0.5) * px, (rows - 0.5) * px, -0.5 * px)
    ax.imshow(np.ma.masked_invalid(reformat.image), cmap=cmap, vmin=level - width / 2, vmax=level + width / 2,
              extent=extent, interpolation="bilinear", aspect="equal")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    thin_outline = [patheffects.withStroke(linewidth=2.6, foreground="black")]

    # Orientation markers and scale bar.
    marker = dict(color="white", fontsize=11, fontweight="bold", path_effects=outline, zorder=6)
    ax.text(0.5, 0.006, "I", transform=ax.transAxes, ha="center", va="bottom", **marker)
    ax.text(0.5, 0.994, "S", transform=ax.transAxes, ha="center", va="top", **marker)
    ax.text(0.01, 0.5, "A", transform=ax.transAxes, ha="left", va="center", **marker)
    ax.text(0.99, 0.5, "P", transform=ax.transAxes, ha="right", va="center", **marker)
    bar = 50.0 if width_mm > 90 else 20.0
    x0, y0 = extent[1] - bar - 4.0, extent[2] - 5.0
    ax.plot([x0, x0 + bar], [y0, y0], color="white", lw=2.5, solid_capstyle="butt", path_effects=outline, zorder=6)
    ax.text(x0 + bar / 2, y0 - 1.5, f"{bar:.0f} mm", color="white", fontsize=8, ha="center", va="bottom",
            path_effects=outline, zorder=6)

    def to_mm(points) -> np.ndarray:
        return reformat.ras_to_image(np.asarray(points, float))[..., ::-1] * px  # (x, y) mm

    # Height lines and level names on the image.
    anchors = []
    for v in placed:
        colour = GRADE_COLOURS.get(v.genant_grade if v.genant_grade in GRADE_COLOURS else None)
        centre = to_mm(v.centre_ras)
        mids = {}
        drawn = not IMPLAUSIBLE_HEIGHT_FLAGS.intersection(v.flags)
        lw = 1.7 if v.genant_grade is not None else 1.2
        for key in HEIGHT_KEYS:
            line = v.height_lines_ras.get(key)
            if line is None or not drawn:
                continue
            ends = to_mm(np.stack([line[0], line[1]]))
            if not np.all(np.isfinite(ends)):
                continue
            mids[key] = ends.mean(axis=0)
            ax.plot(ends[:, 0], ends[:, 1], color=colour, lw=lw, linestyle=(0, (3, 2)) if v.borderline else "-",
                    marker="_", markersize=7, markeredgewidth=lw, path_effects=thin_outline, zorder=4,
                    solid_capstyle="butt", dash_capstyle="butt")
        if v.genant_grade is not None and v.genant_grade >= 1 and drawn:
            _draw_grade_basis(ax, v, to_mm, colour, thin_outline)
        # The anterior wall lies 15/70 of the Ha–Hp distance in front of Ha.
        if "ha" in mids and "hp" in mids:
            anterior = mids["ha"] + (mids["ha"] - mids["hp"]) * (0.15 / 0.70)
        else:
            anterior = centre + np.array([-17.0, 0.0])
        name_x = max(anterior[0] - 3.0, extent[0] + 9.0)
        ax.text(name_x, centre[1], v.level, color=colour, fontsize=10, fontweight="bold", ha="right", va="center",
                path_effects=outline, zorder=5, clip_on=True)
        anchors.append(centre[1])

    # Label panel: same vertical scale as the image (mm), x in figure pixels.
    panel = figure.add_axes(((left + img_w) / fig_w, bottom / fig_h, panel_w / fig_w, img_h / fig_h))
    panel.set_xlim(0.0, panel_w)
    panel.set_ylim(extent[2], extent[3])
    panel.axis("off")
    # Two-line labels 34 px apart; when they do not fit, one-line labels down to 17 px apart.
    gap_px = min(34.0, img_h / max(1, len(placed)))
    compact = gap_px < 32.0
    gap_px = max(gap_px, 17.0) if compact else gap_px
    gap_mm = gap_px / scale
    desired = np.asarray(anchors, float)
    order = np.argsort(desired)
    spread = np.empty_like(desired)
    spread[order] = _spread(desired[order], gap_mm, extent[3] + 0.5 * gap_mm, extent[2] - 0.5 * gap_mm)
    for v, y_anchor, y_label in zip(placed, desired, spread):
        colour = GRADE_COLOURS.get(v.genant_grade if v.genant_grade in GRADE_COLOURS else None)
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

    # Heading.
    y = fig_h - 12.0
    for line in title_lines:
        figure.text(left / fig_w, y / fig_h, line, fontsize=12, fontweight="bold", ha="left", va="top")
        y -= 18.0
    for line in summary_lines:
        figure.text(left / fig_w, y / fig_h, line, fontsize=10, ha="left", va="top",
                    color="#aa0000" if line.startswith("Not shown") else "black")
        y -= 15.0

    # Legend and method line; the grade basis's entries when some vertebra shows it.
    shows_basis = any(v.expected_superior_ras is not None and v.genant_grade for v in placed)
    handles = [Patch(facecolor=GRADE_COLOURS[g], edgecolor="none", label=GRADE_LEGEND[g]) for g in (0, 1, 2, 3, None)]
    handles.append(Line2D([0], [0], color="#555555", lw=1.7, linestyle=(0, (3, 2)), label="* borderline"))
    if shows_basis:
        handles.append(Line2D([0], [0], color=EXPECTED_COLOUR, lw=1.8, linestyle=(0, (2, 1.5)),
                              label="expected endplate"))
        handles.append(Line2D([0], [0], color=LOST_COLOUR, lw=2.6, label=f"height lost ≥ {LOST_HEIGHT:.0%}"))
    figure.legend(handles=handles, loc="lower left", bbox_to_anchor=(left / fig_w, 18.0 / fig_h), ncol=6,
                  fontsize=8, frameon=False, handlelength=1.6, columnspacing=1.0, handletextpad=0.4)
    how = ("curved planar reformat" if reformat.mode == "curved" else "straightened reformat")
    figure.text(left / fig_w, 6.0 / fig_h,
                f"Sagittal {how} through the body centres, slab {reformat.slab_mm:g} mm, "
                f"W {window[1]:g} / L {window[0]:g} HU · anterior left, cranial up · lines: Ha, Hm, Hp"
                + (" · expected: from the neighbours" if shows_basis else ""),
                fontsize=7.5, color="#444444", ha="left", va="bottom")
    return figure


def _wrap(text: str, width_px: float, size: float, weight: str, dpi: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width_px`` wide in matplotlib's default font
    (measured by the Agg renderer that draws them)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(size=size, weight=weight)
    renderer = RendererAgg(8, 8, dpi)

    def width(line: str) -> float:
        return renderer.get_text_width_height_descent(line, prop, ismath=False)[0]

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
