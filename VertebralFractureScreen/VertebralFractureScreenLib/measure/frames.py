"""Each vertebra's crop, its own frame and its body (steps 1–2 of :mod:`.morphometry`).

Inputs are arrays on one voxel grid (indexed ``[k, j, i]``) and the grid's IJK→RAS matrix; every
position is in RAS millimetres, or in a vertebra's local ``(u, v, w)`` (mm along its ``lr``,
``ap`` and ``cc`` axes from its frame's centre). A vertebra is worked on in a crop around it
(:data:`CROP_MARGIN_MM`), so that nothing here costs a pass over the whole volume.

* **Frame.** The cranio-caudal axis is the tangent of the spine's centre line through the body
  centroids (:func:`spine_tangents`); the antero-posterior axis points from the posterior
  elements' centroid to the body's (:func:`ap_hints`), made orthogonal to it.
* **Body.** From the ``vertebrae_body`` map when given, otherwise cut from the whole vertebra at
  its posterior wall in the mid-sagittal plane (:func:`separate_body`); frames and bodies are
  found again in turn until they agree (:func:`frames_and_bodies`).
* **Field of view.** Which parts of a vertebra the field of view cuts (:func:`cut_flags`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import find_label_boxes, grid_edge_layer, mask_centroid_ras, unit, voxel_extent_along, voxel_spacing

CROP_MARGIN_MM = 12.0
"""Margin (mm) around a vertebra's label box in its crop: room for the endplate fits and the
walls beyond the mask."""

MAX_FRAME_PASSES = 4
"""Most passes of frames and body separation (two when the field of view cuts no body)."""

MAX_HINT_CORRECTION_DEG = 10.0
"""A left-right balanced hint that turns further than this from the plain one is not trusted
(the balancing went astray in a frame still far off); the plain hint is kept."""

HINT_ROUNDS = 3
"""Rounds of :func:`ap_hints`' left-right balancing (each takes the left-right axis from the
previous round's hint)."""

CENTRAL_CUT_MM = 10.0
"""A cut of the posterior elements within this distance (mm) of the mid-sagittal plane (the
spinous process) does not unbalance them left to right."""


@dataclass(frozen=True, eq=False)
class VertebraFrame:
    """A vertebra's own frame in RAS mm: origin at the body centroid, unit axes ``lr`` (patient
    right), ``ap`` (anterior) and ``cc`` (superior), ``lr = ap × cc``."""

    centre: np.ndarray
    lr: np.ndarray
    ap: np.ndarray
    cc: np.ndarray

    @property
    def rotation(self) -> np.ndarray:
        """Rows ``lr, ap, cc``: maps RAS offsets to local ``(u, v, w)``."""
        return np.stack([self.lr, self.ap, self.cc])

    def to_local(self, ras: np.ndarray) -> np.ndarray:
        """Local ``(u, v, w)`` (mm, rows) of RAS points (mm, rows)."""
        return (np.asarray(ras, dtype=float) - self.centre) @ self.rotation.T

    def to_ras(self, local: np.ndarray) -> np.ndarray:
        """RAS points (mm, rows) of local ``(u, v, w)`` (mm, rows)."""
        return np.asarray(local, dtype=float) @ self.rotation + self.centre


@dataclass
class Vertebra:
    """Working state of one vertebra during measurement, on its crop of the label map."""

    level: str
    label: int
    slices: tuple[slice, slice, slice]
    origin_ijk: np.ndarray  # (i, j, k) of the crop's first voxel
    mask: np.ndarray  # whole vertebra, bool, crop
    edge: np.ndarray | None  # crop voxels where the field of view ends; None when the vertebra reaches none
    centroid: np.ndarray = None
    body: np.ndarray = None
    body_centroid: np.ndarray = None
    posterior_centroid: np.ndarray = None
    flags: list[str] = field(default_factory=list)

    @property
    def touches_edge(self) -> bool:
        """Whether any voxel of the vertebra lies where the field of view ends."""
        return self.edge is not None


class CropSampler:
    """Samples arrays of one crop at RAS points (trilinear, or nearest for labels)."""

    def __init__(self, ijk_to_ras: np.ndarray, origin_ijk: np.ndarray):
        self.ras_to_crop = np.linalg.inv(ijk_to_ras)
        self.ras_to_crop[:3, 3] -= origin_ijk

    def __call__(self, array: np.ndarray, ras: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Values of ``array`` (the crop, ``[k, j, i]``) at RAS points (mm, rows), spline ``order``
        (1: trilinear, 0: nearest), ``cval`` outside the crop."""
        ijk = ras @ self.ras_to_crop[:3, :3].T + self.ras_to_crop[:3, 3]
        return ndimage.map_coordinates(array, ijk[:, ::-1].T, order=order, mode="constant", cval=cval,
                                       prefilter=False)


def local_coordinate(frame: VertebraFrame, crop_ijk_to_ras: np.ndarray, shape_kji, axis: int) -> np.ndarray:
    """One local coordinate (0 = u, 1 = v, 2 = w; mm, float32) of every voxel centre of a crop."""
    row = frame.rotation[axis]
    steps = (row @ crop_ijk_to_ras[:3, :3]).astype(np.float32)
    nk, nj, ni = shape_kji
    return ((np.arange(ni, dtype=np.float32) * steps[0])[None, None, :]
            + (np.arange(nj, dtype=np.float32) * steps[1])[None, :, None]
            + (np.arange(nk, dtype=np.float32) * steps[2] + np.float32(row @ (crop_ijk_to_ras[:3, 3] - frame.centre)))
            [:, None, None])


def local_grid(frame: VertebraFrame, crop_ijk_to_ras: np.ndarray, shape_kji) -> np.ndarray:
    """Local ``(u, v, w)`` (mm, float32) of every voxel centre of a crop, shape ``(k, j, i, 3)``."""
    return np.stack([local_coordinate(frame, crop_ijk_to_ras, shape_kji, axis) for axis in range(3)], axis=-1)


def spine_tangents(centroids: list[np.ndarray]) -> list[np.ndarray]:
    """Unit tangents (pointing cranially) of the curve through centroids ordered cranial to caudal.

    A parabola in the chord-length parameter is fitted through each point and its neighbours
    (the next two at the ends); its derivative at the point is the tangent. One point: superior.
    """
    n = len(centroids)
    if n == 1:
        return [np.array([0.0, 0.0, 1.0])]
    pts = np.asarray(centroids, dtype=float)
    if n == 2:
        t = unit(pts[0] - pts[1])
        return [t, t]
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    tangents = []
    for index in range(n):
        lo = min(max(index - 1, 0), n - 3)
        sel = slice(lo, lo + 3)
        s = chord[sel] - chord[index]
        coeffs = np.polyfit(s, pts[sel], 2)  # (3, 3): rows a, b, c of a s² + b s + c
        tangents.append(unit(-coeffs[1]))  # chord grows caudally; the tangent points cranially
    return tangents


def vertebra_frames(vertebrae: list[Vertebra], centroids: list[np.ndarray], ap_hints: list[np.ndarray | None],
                    cut: list[bool] | None = None) -> list[VertebraFrame]:
    """Each vertebra's frame at its centroid (RAS mm): ``cc`` the spine's tangent there, ``ap`` its
    hint (patient-anterior when None) made orthogonal to ``cc``.

    A vertebra cut by the field of view has a displaced centroid: the centre line runs through the
    whole ones only (when at least two), and a cut one takes the tangent of the nearest whole.
    ``cut``: whose centroid is displaced (default: any part touches the field of view's edge)."""
    cut = [v.touches_edge for v in vertebrae] if cut is None else cut
    whole = [n for n, c in enumerate(cut) if not c]
    if len(whole) >= 2 and len(whole) < len(vertebrae):
        whole_tangents = spine_tangents([centroids[n] for n in whole])
        tangents = [whole_tangents[int(np.argmin([abs(n - w) for w in whole]))] for n in range(len(vertebrae))]
    else:
        tangents = spine_tangents(centroids)
    frames = []
    for vertebra, centre, tangent, hint in zip(vertebrae, centroids, tangents, ap_hints):
        anterior = np.array([0.0, 1.0, 0.0]) if hint is None else hint
        ap = anterior - (anterior @ tangent) * tangent
        if np.linalg.norm(ap) < 1e-6:
            ap = np.array([1.0, 0.0, 0.0]) - tangent[0] * tangent
        ap = unit(ap)
        frames.append(VertebraFrame(np.asarray(centre, dtype=float), np.cross(ap, tangent), ap, tangent))
    return frames


def _cut_part(vertebra: Vertebra, part: np.ndarray) -> bool:
    """Whether ``part`` (a mask of the vertebra's crop) reaches where the field of view ends."""
    return vertebra.edge is not None and bool((part & vertebra.edge).any())


def posterior_cut(vertebra: Vertebra) -> bool:
    """Whether the field of view cuts the posterior elements (the vertebra less its body)."""
    return vertebra.body is not None and _cut_part(vertebra, vertebra.mask & ~vertebra.body)


def body_cut(vertebra: Vertebra) -> bool:
    """Whether the field of view cuts the body (the whole vertebra while no body is known)."""
    return _cut_part(vertebra, vertebra.mask if vertebra.body is None else vertebra.body)


def cut_flags(vertebra: Vertebra, frame: VertebraFrame, sample: CropSampler, ijk_to_ras: np.ndarray) -> list[str]:
    """Which parts of the vertebra the field of view cuts (see :mod:`.morphometry`): the body's
    voxels on the edge are sorted by their height in the body along the frame's cranio-caudal
    axis, within ``max(2 mm, one voxel)`` of the top or bottom (an endplate) or between (a wall)."""
    flags = ["posterior_elements_cut"] if posterior_cut(vertebra) else []
    if not _cut_part(vertebra, vertebra.body):
        return flags
    w = local_coordinate(frame, np.linalg.inv(sample.ras_to_crop), vertebra.mask.shape, 2)
    w_body = w[vertebra.body]
    w_cut = w[vertebra.body & vertebra.edge]
    zone = max(2.0, voxel_extent_along(frame.cc, ijk_to_ras))
    top, bottom = w_cut > w_body.max() - zone, w_cut < w_body.min() + zone
    flags += ["body_cut"] * bool((~top & ~bottom).any()) + ["endplate_cut_superior"] * bool(top.any()) \
        + ["endplate_cut_inferior"] * bool(bottom.any())
    return flags


def _ap_hint(vertebra: Vertebra, frame: VertebraFrame, ijk_to_ras: np.ndarray) -> np.ndarray | None:
    """Patient-anterior as the vertebra shows it: from its posterior elements' centroid to its
    body's. When the field of view cuts the posterior elements off to one side (a transverse
    process, or an arch cut obliquely), the centroid would move to the other: then only their
    voxels nearer to the mid-sagittal plane than the nearest cut voxel beyond
    :data:`CENTRAL_CUT_MM` (less a margin) count, on both sides alike; the left-right axis that
    says "nearer" is taken from the hint itself, :data:`HINT_ROUNDS` times. A cut near the
    mid-sagittal plane (a spinous process) moves the centroid along that plane only. None
    without posterior elements, or when too little of them is left."""
    if vertebra.posterior_centroid is None:
        return None
    hint = plain = unit(vertebra.body_centroid - vertebra.posterior_centroid)
    if not posterior_cut(vertebra):
        return hint
    rest = vertebra.mask & ~vertebra.body
    k, j, i = np.nonzero(rest)
    ras = (np.stack([i, j, k], axis=1).astype(float) + vertebra.origin_ijk) @ ijk_to_ras[:3, :3].T \
        + ijk_to_ras[:3, 3] - vertebra.body_centroid
    cut = vertebra.edge[rest]
    for _ in range(HINT_ROUNDS):
        ap = hint - (hint @ frame.cc) * frame.cc
        if np.linalg.norm(ap) < 1e-6:
            return hint
        lr = np.cross(unit(ap), frame.cc)
        u = np.abs(ras @ lr)
        lateral = u[cut & (u >= CENTRAL_CUT_MM)]
        if not len(lateral):
            return hint
        keep = u < lateral.min() - max(2.0, voxel_extent_along(lr, ijk_to_ras))
        if np.count_nonzero(keep) < 10:
            return None
        hint = unit(-ras[keep].mean(axis=0))
    return hint if np.degrees(np.arccos(np.clip(hint @ plain, -1.0, 1.0))) <= MAX_HINT_CORRECTION_DEG else plain


def ap_hints(vertebrae: list[Vertebra], frames: list[VertebraFrame], ijk_to_ras: np.ndarray) -> list[np.ndarray | None]:
    """Each vertebra's patient-anterior (a RAS unit vector, :func:`_ap_hint`); a vertebra whose
    posterior elements are cut and give no hint takes the mean of the hints, up to two levels
    away, of vertebrae whose posterior elements are whole."""
    hints = [_ap_hint(v, frame, ijk_to_ras) for v, frame in zip(vertebrae, frames)]
    whole = [n for n, v in enumerate(vertebrae) if hints[n] is not None and not posterior_cut(v)]
    for n, v in enumerate(vertebrae):
        near = [m for m in whole if abs(m - n) <= 2]
        if hints[n] is None and posterior_cut(v) and near:
            hints[n] = unit(np.mean([hints[m] for m in near], axis=0))
    return hints


def separate_body(vertebra: Vertebra, frame: VertebraFrame, sample: CropSampler, step: float) -> np.ndarray | None:
    """Body part of a whole-vertebra mask (crop, bool), cut at the posterior wall found in the
    mid-sagittal plane (sampled every ``step`` mm): the spinal canal splits that plane into the
    body (the most anterior large part) and the arch. None when the plane holds no part."""
    mask_f = vertebra.mask.astype(np.float32)
    v = np.arange(-80.0, 60.0 + step, step)  # from the whole vertebra's centroid: arch behind, body ahead
    w = np.arange(-35.0, 35.0 + step, step)
    vv, ww = np.meshgrid(v, w, indexing="ij")
    plane = np.zeros(vv.shape, dtype=np.float32)
    offsets = (-2.0, -1.0, 0.0, 1.0, 2.0)
    for u in offsets:
        local = np.stack([np.full(vv.size, u), vv.ravel(), ww.ravel()], axis=1)
        plane += sample(mask_f, frame.to_ras(local)).reshape(vv.shape)
    plane /= len(offsets)
    parts, count = ndimage.label(plane >= 0.5)
    if count == 0:
        return None
    areas = ndimage.sum_labels(np.ones_like(plane), parts, index=np.arange(1, count + 1))
    mean_v = ndimage.mean(vv, parts, index=np.arange(1, count + 1))
    large = np.nonzero(areas >= 0.3 * areas.max())[0]
    body_part = large[np.argmax(mean_v[large])] + 1
    in_body = parts == body_part
    rows = np.nonzero(in_body.any(axis=0))[0]  # w indices
    central = rows[len(rows) // 4 : max(len(rows) // 4 + 1, 3 * len(rows) // 4)]
    posterior_wall = np.median([vv[in_body[:, r], r].min() for r in central if in_body[:, r].any()])
    local_v = local_coordinate(frame, np.linalg.inv(sample.ras_to_crop), vertebra.mask.shape, 1)
    return vertebra.mask & (local_v >= posterior_wall - 0.5 * step)


def set_body(vertebra: Vertebra, body: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Store a vertebra's body mask with the centroids of the body and of the rest (posterior
    elements) in RAS."""
    vertebra.body = body
    vertebra.body_centroid = mask_centroid_ras(body, ijk_to_ras, vertebra.origin_ijk)
    rest = vertebra.mask & ~body
    vertebra.posterior_centroid = (mask_centroid_ras(rest, ijk_to_ras, vertebra.origin_ijk)
                                   if rest.sum() >= 10 else None)


def crop_vertebrae(labels: np.ndarray, ijk_to_ras: np.ndarray, convention: str, label_boxes: list | None = None,
                   label_grid: tuple | None = None) -> list[Vertebra]:
    """Every vertebra of ``labels`` (ids of ``convention``), cranial to caudal, on a crop of its
    label box grown by :data:`CROP_MARGIN_MM`, with the crop's voxels where the field of view ends
    (the grid's, or ``label_grid``'s, edge) when the vertebra reaches them. ``label_boxes``:
    ``ndimage.find_objects(labels)`` when known (one pass over a large volume fewer)."""
    ids = lv.vertebra_ids(convention)
    by_label = {label: level for level, label in ids.items()}
    max_label = max(ids.values())
    if label_boxes is not None and len(label_boxes) >= max_label:
        objects = label_boxes[:max_label]
    else:
        objects = find_label_boxes(labels, max_label)
    margin = np.ceil(CROP_MARGIN_MM / voxel_spacing(ijk_to_ras)).astype(int)  # (i, j, k)
    shape = labels.shape
    vertebrae: list[Vertebra] = []
    for label, slices in enumerate(objects, start=1):
        if slices is None or label not in by_label:
            continue
        grown = tuple(slice(max(0, s.start - m), min(n, s.stop + m))
                      for s, m, n in zip(slices, margin[::-1], shape))
        crop = labels[grown]
        origin = np.array([grown[2].start, grown[1].start, grown[0].start], dtype=float)
        mask = crop == label
        edge = grid_edge_layer(grown, shape, ijk_to_ras, label_grid)
        touches = edge is not None and bool((mask & edge).any())
        vertebrae.append(Vertebra(by_label[label], label, grown, origin, mask, edge if touches else None))
    vertebrae.sort(key=lambda v: lv.level_position(v.level))
    return vertebrae


def _first_body(vertebra: Vertebra, frame: VertebraFrame, sample: CropSampler, body_labels: np.ndarray | None,
                step: float) -> np.ndarray:
    """The body in the first frame: the vertebra's part of the ``vertebrae_body`` map's bodies
    when given and not empty, else :func:`separate_body`, else (flag ``body_not_separated``) the
    whole vertebra."""
    body = None
    if body_labels is not None:
        body = vertebra.mask & (body_labels[vertebra.slices] == lv.BODY_LABEL)
        if body.sum() == 0:
            vertebra.flags.append("no_body_in_vertebrae_body_map")
            body = None
    if body is None:
        body = separate_body(vertebra, frame, sample, step)
        if body is None or body.sum() == 0:
            body = vertebra.mask.copy()
            vertebra.flags.append("body_not_separated")
    return body


def frames_and_bodies(vertebrae: list[Vertebra], samplers: list[CropSampler], ijk_to_ras: np.ndarray,
                      body_labels: np.ndarray | None, step: float) -> list[VertebraFrame]:
    """Each vertebra's frame, its body and centroids stored on it (``step``: the mid-sagittal
    plane's sampling, mm).

    Pass 1: frames from whole-vertebra centroids and patient-anterior; the bodies found in them.
    Then frames from body centroids, anterior from the posterior elements to the body; bodies
    found by shape are cut again in the refined frames. Where the field of view cuts a vertebra,
    whether its body is cut (and so whether its centroid joins the centre line) can change with
    the frame: the passes go on, up to :data:`MAX_FRAME_PASSES`, until it no longer does."""
    for v in vertebrae:
        v.centroid = mask_centroid_ras(v.mask, ijk_to_ras, v.origin_ijk)
    frames = vertebra_frames(vertebrae, [v.centroid for v in vertebrae], [None] * len(vertebrae))
    for v, frame, sample in zip(vertebrae, frames, samplers):
        set_body(v, _first_body(v, frame, sample, body_labels, step), ijk_to_ras)
    for index in range(MAX_FRAME_PASSES):
        cut = [body_cut(v) for v in vertebrae]
        hints = ap_hints(vertebrae, frames, ijk_to_ras)
        frames = vertebra_frames(vertebrae, [v.body_centroid for v in vertebrae], hints, cut)
        if body_labels is not None:
            break
        for v, frame, sample in zip(vertebrae, frames, samplers):
            if "body_not_separated" in v.flags:
                continue
            body = separate_body(v, frame, sample, step)
            if body is not None and body.sum() > 0:
                set_body(v, body, ijk_to_ras)
        if index >= 1 and [body_cut(v) for v in vertebrae] == cut:
            break
    return frames
