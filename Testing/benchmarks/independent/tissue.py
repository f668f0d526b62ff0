"""What the continuous anatomy holds at any point: HU before the scanner, and the occupancy of
each structure (vertebra, body, disc) for the label maps.

Every structure is a signed distance ``d`` (mm, negative inside) turned into an occupancy with
a linear ramp one sampling step ``h`` wide, ``clip(0.5 - d / h, 0, 1)`` (an anti-aliased
edge: the sampled grid then holds each voxel's partial volume to within the ramp). HU mix:

* body: trabecular bone (level HU + texture + subchondral sclerosis) inside the cortex, the
  cortical wall or endplate plate in its shell, osteophytes 700 HU;
* posterior elements: 300 HU inside a 1 mm cortex of 900 HU;
* disc: nucleus 70–100 HU to annulus 90–105 HU, vacuum gas -900 HU in degenerated discs;
* around them: muscle 45 HU with patches of fat (-90 HU) anterior of the spine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import anatomy as an
from .build import Spine

PE_INNER_HU, PE_CORTEX_HU, PE_CORTEX_MM = 300.0, 900.0, 1.0
BOX_MARGIN_MM = 4.5
"""Points farther than this from a structure's box are not evaluated for it (its occupancy is 0
there and its interfaces farther than any voxel's reach)."""


@dataclass
class Tissue:
    """Per point: ``hu`` (before the scanner), ``vert_occ`` / ``vert_id`` (occupancy of the most
    present vertebra and its ``total`` id), ``body_occ``, ``disc_occ``, ``trab_hu`` (the drawn
    trabecular HU of the vertebra whose body is within 3 mm, NaN elsewhere), ``trab_index``
    (index of the vertebra whose trabecular interior holds the point, -1 elsewhere) and
    ``iface`` (distance in mm to the nearest tissue interface, when asked)."""

    hu: np.ndarray
    vert_occ: np.ndarray
    vert_id: np.ndarray
    body_occ: np.ndarray
    disc_occ: np.ndarray
    trab_hu: np.ndarray
    trab_index: np.ndarray
    iface: np.ndarray | None


def _occ(sdf: np.ndarray, h: float) -> np.ndarray:
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


class _Accumulator:
    def __init__(self, n: int, distance: bool):
        self.bone_hu, self.bone_occ = np.zeros(n), np.zeros(n)
        self.vert_occ, self.vert_id = np.zeros(n), np.zeros(n, dtype=np.int16)
        self.body_occ, self.disc_occ, self.disc_hu = np.zeros(n), np.zeros(n), np.zeros(n)
        self.trab_hu = np.full(n, np.nan)
        self.trab_index = np.full(n, -1, dtype=np.int16)
        self.iface = np.full(n, np.inf) if distance else None

    def body_of(self, sel, label: int) -> np.ndarray:
        """Occupancy of vertebra ``label``'s body so far at ``sel`` (its posterior elements fill
        only the rest)."""
        return np.where(self.vert_id[sel] == label, self.body_occ[sel], 0.0)

    def interface(self, sel, *sdfs):
        if self.iface is not None:
            near = np.min(np.abs(np.stack(sdfs)), axis=0)
            self.iface[sel] = np.minimum(self.iface[sel], near)


def _body_box(v: an.Vertebra, q: np.ndarray, margin: float) -> np.ndarray:
    """Local points that may lie within ``margin`` of the body, its osteophytes or its discs'
    interfaces with it."""
    spur = max([o["length"] for o in v.osteophytes] or [0.0])
    grow = 1.0 + 2.0 * v.flare
    half = 0.5 * max(v.h_ant, v.h_post) + 2.0 + margin + 0.5 * spur
    return ((np.abs(q[:, 0]) < v.a * grow + spur + margin) & (q[:, 1] > -v.b_a * grow - spur - margin)
            & (q[:, 1] < v.b_p * grow + spur + margin) & (np.abs(q[:, 2]) < half))


def _capsule_box(v: an.Vertebra, q: np.ndarray, margin: float) -> np.ndarray:
    ends = v.capsules[:, :6].reshape(-1, 2, 3)
    r = v.capsules[:, 6].max() + margin
    lo, hi = ends.min(axis=(0, 1)) - r, ends.max(axis=(0, 1)) + r
    return np.all((q > lo) & (q < hi), axis=1)


def _near(points: np.ndarray, box: tuple[np.ndarray, np.ndarray], centre: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the points within ``radius`` of ``centre`` (none when the points' box
    ``box`` is out of reach)."""
    lo, hi = box
    if np.any(centre + radius < lo) or np.any(centre - radius > hi):
        return np.zeros(0, dtype=np.intp)
    d0, d1, d2 = points[:, 0] - centre[0], points[:, 1] - centre[1], points[:, 2] - centre[2]
    return np.flatnonzero(d0 * d0 + d1 * d1 + d2 * d2 < radius * radius)


def _vertebra(acc: _Accumulator, index: int, v: an.Vertebra, points: np.ndarray, box, h: float) -> None:
    body_radius = float(np.hypot(np.hypot(v.a, max(v.b_a, v.b_p)) * 1.2, 0.6 * max(v.h_ant, v.h_post))) + 12.0
    sel = _near(points, box, v.origin, body_radius)
    if sel.size:
        q = v.local(points[sel])
        inside = _body_box(v, q, BOX_MARGIN_MM)
        if inside.any():
            _body(acc, index, v, sel[inside], q[inside], h)
    ends = v.capsules[:, :6].reshape(-1, 3)
    centre = 0.5 * (ends.min(0) + ends.max(0))
    reach = float(np.linalg.norm(0.5 * (ends.max(0) - ends.min(0)))) + v.capsules[:, 6].max() + BOX_MARGIN_MM
    sel = _near(points, box, v.origin + v.axes @ centre, reach)
    if sel.size:
        q = v.local(points[sel])
        inside = _capsule_box(v, q, BOX_MARGIN_MM)
        if inside.any():
            _posterior(acc, v, sel[inside], q[inside], h)


def _body(acc: _Accumulator, index: int, v: an.Vertebra, sel: np.ndarray, q: np.ndarray, h: float) -> None:
    """The body: cortex, trabecular bone, osteophytes."""
    pol = an.polar(v, q[:, 0], q[:, 1])
    d_side = an.side_distance(v, q, pol)
    z_sup, z_inf = an.endplates(v, q[:, 0], q[:, 1], pol=pol)
    top, bottom = q[:, 2] - z_sup, z_inf - q[:, 2]
    sdf_b = np.maximum.reduce([d_side, top, bottom])
    wall = d_side + an.wall_thickness(v, pol.theta, q[:, 2])
    plate = np.maximum(top + an.plate_thickness(v, q[:, 0], q[:, 1], 0, pol),
                       bottom + an.plate_thickness(v, q[:, 0], q[:, 1], 1, pol))
    sdf_in = np.maximum(wall, plate)
    sdf_o = an.osteophyte_sdf(v, q, d_side, z_sup, z_inf, pol.theta)
    occ_b, occ_o = _occ(sdf_b, h), _occ(sdf_o, h)
    occ_in = np.minimum(_occ(sdf_in, h), occ_b)
    trab = an.trabecular_hu(v, q, z_sup, z_inf)
    hu = occ_in * trab + (occ_b - occ_in) * np.where(plate > wall, v.hu_plate, v.hu_wall)
    body = np.maximum(occ_b, occ_o)
    hu += (body - occ_b) * an.OSTEOPHYTE_HU
    _add_bone(acc, sel, v.label, body, hu)
    acc.body_occ[sel] = np.maximum(acc.body_occ[sel], body)
    near_body = (sdf_b < 3.0) & np.isnan(acc.trab_hu[sel])
    acc.trab_hu[sel[near_body]] = trab[near_body]
    acc.trab_index[sel[occ_in > 0.5]] = index
    acc.interface(sel, sdf_b, sdf_in, np.where(np.isfinite(sdf_o), sdf_o, 1e3))


def _posterior(acc: _Accumulator, v: an.Vertebra, sel: np.ndarray, q: np.ndarray, h: float) -> None:
    """The posterior elements (only where the body is not)."""
    sdf_pe = an.capsule_sdf(v.capsules, q, BOX_MARGIN_MM)
    occ_pe = _occ(sdf_pe, h)
    occ_pe_in = np.minimum(_occ(sdf_pe + PE_CORTEX_MM, h), occ_pe)
    pe_hu = (occ_pe_in * PE_INNER_HU + (occ_pe - occ_pe_in) * PE_CORTEX_HU) / np.maximum(occ_pe, 1e-6)
    extra = np.clip(occ_pe - acc.body_of(sel, v.label), 0.0, None)
    _add_bone(acc, sel, v.label, extra, extra * pe_hu, occupancy=occ_pe)
    finite = np.where(np.isfinite(sdf_pe), sdf_pe, 1e3)
    acc.interface(sel, finite, finite + PE_CORTEX_MM)


def _add_bone(acc: _Accumulator, sel, label: int, occ, hu, occupancy=None) -> None:
    """Add a vertebra's bone (occupancy ``occ``, occupancy-weighted ``hu``) at ``sel``."""
    acc.bone_hu[sel] += hu
    acc.bone_occ[sel] += occ
    occupancy = occ if occupancy is None else occupancy
    mine = acc.vert_id[sel] == label
    acc.vert_occ[sel[mine]] = np.maximum(acc.vert_occ[sel[mine]], occupancy[mine])
    better = ~mine & (occupancy > acc.vert_occ[sel])
    acc.vert_occ[sel[better]] = occupancy[better]
    acc.vert_id[sel[better]] = label


def _disc(acc: _Accumulator, spine: Spine, d: an.Disc, points: np.ndarray, box, h: float) -> None:
    sel = _near(points, box, d.origin, d.bound_radius)
    if sel.size == 0:
        return
    qd = an.to_frame(points[sel], d.origin, d.axes)
    reach = max(d.a, d.b_a, d.b_p) + d.bulge + BOX_MARGIN_MM + 1.0
    keep = (np.abs(qd[:, 0]) < reach) & (np.abs(qd[:, 1]) < reach) & (np.abs(qd[:, 2]) < 0.5 * d.height + 8.0
                                                                         + BOX_MARGIN_MM)
    sel, qd = sel[keep], qd[keep]
    p = points[sel]
    up, lo = spine.vertebrae[d.upper], spine.vertebrae[d.lower]
    qu, ql = up.local(p), lo.local(p)
    d1 = qu[:, 2] - an.endplates(up, qu[:, 0], qu[:, 1])[1]
    d2 = an.endplates(lo, ql[:, 0], ql[:, 1])[0] - ql[:, 2]
    theta, r = np.arctan2(qd[:, 1], qd[:, 0]), np.hypot(qd[:, 0], qd[:, 1])
    radius = an.outline_radius(d, theta)
    bulge = d.bulge * np.clip(1.0 - (2.0 * qd[:, 2] / max(d.height, 1.0)) ** 2, 0.0, None)
    sdf = np.maximum.reduce([r - radius - bulge, d1, d2])
    occ = _occ(sdf, h)
    hu = d.hu_nucleus + (d.hu_annulus - d.hu_nucleus) * np.clip(r / radius, 0.0, 1.0) ** 2
    sdfs = [sdf]
    if d.gas:
        gas = np.zeros(sel.size)
        for centre, axes in d.gas:
            sdf_g = (np.linalg.norm((qd - centre) / axes, axis=1) - 1.0) * axes.min()
            gas = np.maximum(gas, _occ(sdf_g, h))
            sdfs.append(sdf_g)
        hu = hu * (1.0 - gas) + an.GAS_HU * gas
    better = occ > acc.disc_occ[sel]
    acc.disc_occ[sel[better]] = occ[better]
    acc.disc_hu[sel[better]] = hu[better]
    acc.interface(sel, *sdfs)


def background_hu(spine: Spine, points: np.ndarray) -> np.ndarray:
    """Soft tissue HU around the spine (trilinear on the spine's 2 mm background grid)."""
    idx = ((points - spine.fat_origin) / spine.fat_step).T
    return ndimage.map_coordinates(spine.fat_field, idx, order=1, mode="nearest")


def evaluate(spine: Spine, points: np.ndarray, h: float, distance: bool = False) -> Tissue:
    """The tissue at patient points ``points`` (n, 3) RAS mm, edges ramped over ``h`` mm."""
    points = np.asarray(points, dtype=float)
    acc = _Accumulator(points.shape[0], distance)
    box = (points.min(axis=0), points.max(axis=0)) if points.size else (np.zeros(3), np.zeros(3))
    for index, v in enumerate(spine.vertebrae):
        _vertebra(acc, index, v, points, box, h)
    for d in spine.discs:
        _disc(acc, spine, d, points, box, h)
    bone = np.minimum(acc.bone_occ, 1.0)
    bone_hu = acc.bone_hu / np.maximum(acc.bone_occ, 1.0)
    disc = np.minimum(acc.disc_occ, 1.0 - bone)
    rest = np.clip(1.0 - bone - disc, 0.0, 1.0)
    hu = bone_hu + disc * acc.disc_hu + rest * background_hu(spine, points)
    return Tissue(hu.astype(np.float32), acc.vert_occ.astype(np.float32), acc.vert_id,
                  acc.body_occ.astype(np.float32), disc.astype(np.float32), acc.trab_hu.astype(np.float32),
                  acc.trab_index, acc.iface)
