"""Draw one spine's continuous anatomy from a :class:`~.spec.SpineSpec` (see
:mod:`.anatomy` for the model, frames and units).

The anatomy depends only on the spec's ``seed``, levels, findings and bone options, never on
the scan (spacing, rotation, noise, kernel): the two renderings of a rotation pair are the same
anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from VertebralFractureScreenLib import levels as lv

from . import anatomy as an
from .spec import SpineSpec

TEXTURE_STEP_MM = 0.4


@dataclass
class Spine:
    """A drawn spine in patient coordinates: vertebrae cranial to caudal, the discs between
    them, and the patient's abdominal centre (for the scanner's cupping), RAS mm."""

    vertebrae: list
    discs: list
    abdomen_centre: np.ndarray
    fat_field: np.ndarray
    fat_origin: np.ndarray
    fat_step: float


def _findings_for(spec: SpineSpec, level: str):
    fracture = next((f for f in spec.fractures if f.level == level), None)
    if "findings" in spec.ablate:
        return fracture, [], []
    nodes = [n for n in spec.schmorl if n.level == level]
    osteo = [o for o in spec.osteophytes if o.level == level]
    return fracture, nodes, osteo


def _ablate(spec: SpineSpec, verts: list) -> None:
    """Switch off the anatomy's effects named in ``spec.ablate`` (after all draws)."""
    for v in verts:
        if "concavity" in spec.ablate:
            v.concavity = (0.0, 0.0)
        if "rims" in spec.ablate:
            v.rim_amp, v.flare = (0.0, 0.0), 0.0
            v.rough = v.rough * np.array([0.0, 1.0, 1.0, 1.0])
        if "texture" in spec.ablate:
            v.texture = None
        if "cortex" in spec.ablate:
            v.cortex_mm, v.hu_plate = 1.0, v.hu_wall


def _capsules(a: float, b_p: float, hc: float, lumbar: bool) -> np.ndarray:
    """Posterior elements as capsules (local mm): pedicles, laminae, spinous process,
    transverse processes, superior and inferior articular processes."""
    px = 0.62 * a
    r = float(np.clip(0.16 * a, 2.5, 4.2))
    spin_len, spin_drop = (28.0, 0.27) if lumbar else (30.0, 1.0)
    trans = 21.0 if lumbar else 15.0
    rows = []
    for side in (-1.0, 1.0):
        rows += [
            [side * px, b_p - 4.0, 0.15 * hc, side * px, b_p + 10.0, 0.15 * hc, r],
            [side * px, b_p + 10.0, 0.1 * hc, 0.0, b_p + 19.0, -0.1 * hc, 3.0],
            [side * px, b_p + 8.0, 0.1 * hc, side * (px + trans), b_p + 11.0, 0.2 * hc, 2.8 if lumbar else 2.4],
            [side * (px + 1.0), b_p + 12.0, 0.3 * hc, side * (px + 2.0), b_p + 15.0, 0.75 * hc + 3.0, 2.8],
            [side * (px - 2.0), b_p + 16.0, -0.2 * hc, side * (px - 2.5), b_p + 18.0, -hc - 1.0, 2.8],
        ]
    end_y = b_p + 19.0 + spin_len / np.sqrt(1 + spin_drop ** 2)
    end_z = -0.1 * hc - spin_len * spin_drop / np.sqrt(1 + spin_drop ** 2)
    rows.append([0.0, b_p + 19.0, -0.1 * hc, 0.0, end_y, end_z, 3.0])
    return np.asarray(rows, dtype=float)


def _texture(rng, v: an.Vertebra, amplitude: float) -> None:
    """Trabecular texture on a local grid: Gaussian-filtered white noise (correlation 0.5–0.8 mm,
    blobs of 1–3 mm), skewed towards bright plates, SD ``amplitude`` HU, zero mean."""
    if amplitude <= 0:
        return
    lo = np.array([-v.a - 2.0, -v.b_a - 2.0, -0.5 * v.h_post - 5.0])
    hi = np.array([v.a + 2.0, v.b_p + 2.0, 0.5 * max(v.h_ant, v.h_post) + 5.0])
    shape = tuple(np.ceil((hi - lo) / TEXTURE_STEP_MM).astype(int) + 1)
    g = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                rng.uniform(0.5, 0.8) / TEXTURE_STEP_MM, mode="wrap")
    g /= g.std()
    g = g + 0.25 * (g ** 2 - 1.0)
    v.texture = (amplitude * (g - g.mean()) / g.std()).astype(np.float32)
    v.tex_origin, v.tex_step = lo, TEXTURE_STEP_MM


def _vertebra(rng, spec: SpineSpec, level: str, size: float, base_hu: float) -> an.Vertebra:
    """One vertebra's parameters around the level's table values (frame set later)."""
    hp, ratio, depth, width, _ = an.LEVEL_TABLE[level]
    lumbar = level.startswith("L") or level == "S1"
    hp = hp * size * rng.uniform(0.97, 1.03)
    ratio = ratio + rng.uniform(-0.025, 0.025)
    depth, width = depth * size * rng.uniform(0.97, 1.03), width * size * rng.uniform(0.97, 1.03)
    indent = rng.uniform(0.04, 0.09) if lumbar else rng.uniform(0.0, 0.04)
    b_p = 0.5 * depth / (1.0 - 0.5 * indent)
    b_a = depth - b_p * (1.0 - indent)
    fracture, nodes, osteo = _findings_for(spec, level)
    hu_wall = rng.uniform(950.0, 1250.0)
    v = an.Vertebra(
        level=level, label=lv.TOTAL_VERTEBRA_IDS[level], scored=level in spec.levels,
        origin=np.zeros(3), axes=np.eye(3), a=0.5 * width, b_a=b_a, b_p=b_p, indent=indent,
        exponent=rng.uniform(2.2, 2.8), flare=rng.uniform(0.03, 0.07), h_ant=0.0, h_post=0.0,
        concavity=(0.0, 0.0), bowl_shift=rng.uniform(-0.06, 0.08),
        rim_amp=(rng.uniform(0.25, 0.7), rng.uniform(0.25, 0.7)),
        rim_harm=np.stack([an._harmonics(rng, 3, 9), an._harmonics(rng, 3, 9)]),
        rough=np.array([[rng.uniform(0.08, 0.2), rng.uniform(8, 16), rng.uniform(7, 14), rng.uniform(0, 6.3)]
                        for _ in range(2)]),
        wall_harm=an._harmonics(rng, 1, 6), wall_zphase=rng.uniform(0, 2 * np.pi),
        plate_harm=an._harmonics(rng, 2, 7),
        hu_trab=base_hu + rng.uniform(-8.0, 8.0), hu_wall=hu_wall, hu_plate=hu_wall * rng.uniform(0.8, 0.95),
        sclerosis=(0.0, 0.0), fracture=None, nodes=[], osteophytes=[],
        capsules=np.zeros((0, 7)))
    # chord heights: H(0.15) = ratio * hp and H(0.85) = hp before the dish
    slope = (hp - ratio * hp) / 0.70
    v.h_ant, v.h_post = ratio * hp - 0.15 * slope, hp + 0.15 * slope
    for n in nodes:
        v.nodes.append({"which": 0 if n.endplate == "superior" else 1, "x": n.lateral_mm,
                        "y": float(v.y_at(n.depth_fraction)), "radius": n.radius_mm, "depth": n.depth_mm})
    for o in osteo:
        v.osteophytes.append({"which": 0 if o.endplate == "superior" else 1, "angle_deg": o.angle_deg,
                              "half_width": np.radians(o.half_width_deg), "length": o.length_mm,
                              "thickness": o.thickness_mm})
    if fracture is not None:
        v.fracture = {"shape": fracture.shape, "fraction": fracture.fraction}
    v.capsules = _capsules(v.a, v.b_p, 0.25 * (v.h_ant + v.h_post), lumbar)
    return v


def _set_concavity(rng, vertebrae: list, base: float) -> None:
    """Endplate dishes of 1–3 mm: a spine-wide depth, varied per endplate (inferior ones a
    little deeper), then the fracture's reference heights on the unfractured surfaces."""
    for v in vertebrae:
        v.concavity = tuple(float(np.clip(base + d + rng.normal(0, 0.25), 1.0, 3.0)) for d in (-0.1, 0.15))
        if v.fracture is not None:
            y = v.y_at(np.array([0.15, 0.5]))
            z_sup, z_inf = an.endplates(v, np.zeros(2), y, nodes=False, fracture=False)
            v.fracture["ha0"], v.fracture["hm0"] = float(z_sup[0] - z_inf[0]), float(z_sup[1] - z_inf[1])


def _centre_heights(v: an.Vertebra) -> tuple[float, float]:
    """Chord heights (mm) above and below the origin at mid-depth, fracture included, dish and
    nodes not: where the discs attach."""
    y = float(v.y_at(0.5))
    s = 0.5
    chord = v.h_ant + (v.h_post - v.h_ant) * s
    up, down = 0.5 * chord, 0.5 * chord
    if v.fracture:
        f = v.fracture
        if f["shape"] == "crush":
            up, down = up * (1 - f["fraction"]), down * (1 - f["fraction"])
        elif f["shape"] == "wedge":
            up -= float(an.fracture_drop(v, np.zeros(1), np.array([y]), 0)[0])
    return up, down


def _disc_height(rng, spec: SpineSpec, level: str, size: float) -> float:
    height = an.LEVEL_TABLE[level][4] * size * rng.uniform(0.9, 1.1)
    narrow = rng.uniform(0.35, 0.55)
    if level in spec.degenerated_discs and "findings" not in spec.ablate:
        height *= narrow
    return height


def _scoliosis_angles(n_joints: int, cobb_deg: float) -> np.ndarray:
    """Coronal angle per joint (degrees) of a C-shaped curve whose end vertebrae are tilted
    against each other by ``cobb_deg``."""
    if n_joints == 0 or cobb_deg == 0:
        return np.zeros(n_joints)
    w = np.sin(np.pi * (np.arange(n_joints) + 0.5) / n_joints)
    return cobb_deg * w / w.sum()


def _chain(rng, spec: SpineSpec, verts: list, size: float) -> list[float]:
    """Place the vertebrae one below the other (see :mod:`.anatomy`). Returns the discs' central
    heights (mm)."""
    lordosis = spec.lordosis_scale * rng.uniform(0.8, 1.2)
    coronal = _scoliosis_angles(len(verts) - 1, spec.scoliosis_deg)
    verts[0].origin = np.zeros(3)
    verts[0].axes = np.column_stack([(-1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)])
    heights = []
    for i in range(1, len(verts)):
        up, v = verts[i - 1], verts[i]
        g = _disc_height(rng, spec, up.level, size)
        theta = an.SEGMENT_ANGLE_DEG.get(up.level, 0.0) * lordosis + rng.normal(0.0, 1.0)
        if v.fracture and v.fracture["shape"] == "wedge":
            theta -= 0.7 * np.degrees(np.arctan(v.fracture["fraction"] * v.fracture["ha0"] / (0.7 * v.depth)))
        _, down = _centre_heights(up)
        centre = up.origin + up.axes @ np.array([0.0, float(up.y_at(0.5)), -down - 0.5 * g])
        v.axes = up.axes @ an.rotation("x", theta) @ an.rotation("y", coronal[i - 1])
        top, _ = _centre_heights(v)
        v.origin = centre - v.axes @ np.array([0.0, float(v.y_at(0.5)), top + 0.5 * g])
        heights.append(g)
    return heights


def _align(verts: list) -> None:
    """Turn and shift the chain so that its scored part runs head to foot along -z, centred
    at the origin."""
    scored = [v for v in verts if v.scored]
    u = scored[-1].origin - scored[0].origin
    u /= np.linalg.norm(u)
    target = np.array([0.0, 0.0, -1.0])
    axis = np.cross(u, target)
    sin, cos = np.linalg.norm(axis), float(u @ target)
    if sin < 1e-9:
        turn = np.eye(3)
    else:
        k = axis / sin
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        turn = np.eye(3) + sin * kx + (1 - cos) * kx @ kx
    middle = 0.5 * (scored[0].origin + scored[-1].origin)
    for v in verts:
        v.origin = turn @ (v.origin - middle)
        v.axes = turn @ v.axes


def _polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def _discs(rng, spec: SpineSpec, verts: list, heights: list[float]) -> list[an.Disc]:
    """The discs between neighbouring vertebrae; a degenerated one is narrow (drawn in
    :func:`_disc_height`), denser, holds vacuum gas and scleroses its endplates."""
    discs = []
    for i, g in enumerate(heights):
        up, lo = verts[i], verts[i + 1]
        _, down = _centre_heights(up)
        top, _ = _centre_heights(lo)
        origin = 0.5 * (up.origin + up.axes @ np.array([0, 0, -down]) + lo.origin + lo.axes @ np.array([0, 0, top]))
        degenerated = up.level in spec.degenerated_discs and "findings" not in spec.ablate
        gas = []
        if up.level in spec.degenerated_discs:
            for _ in range(int(rng.integers(2, 5))):
                centre = np.array([rng.uniform(-0.45, 0.45) * up.a, rng.uniform(-0.25, 0.25) * up.depth,
                                   rng.uniform(-0.15, 0.15) * g])
                axes = np.array([rng.uniform(3, 7), rng.uniform(2, 5), min(rng.uniform(0.5, 1.2), 0.3 * g)])
                gas.append((centre, axes))
            sclerosis = rng.uniform(60, 150, size=2)
        if degenerated:
            up.sclerosis = (up.sclerosis[0], sclerosis[0])
            lo.sclerosis = (sclerosis[1], lo.sclerosis[1])
            up.rim_amp = (up.rim_amp[0], up.rim_amp[1] + 0.4)
            lo.rim_amp = (lo.rim_amp[0] + 0.4, lo.rim_amp[1])
        else:
            gas = []
        mean = {k: 0.5 * (getattr(up, k) + getattr(lo, k)) for k in ("a", "b_a", "b_p", "indent", "exponent")}
        discs.append(an.Disc(
            upper=i, lower=i + 1, origin=origin, axes=_polar(up.axes + lo.axes), height=g,
            bulge=rng.uniform(0.5, 1.5), degenerated=degenerated,
            hu_nucleus=rng.uniform(85, 100) if degenerated else rng.uniform(70, 85),
            hu_annulus=rng.uniform(90, 105), gas=gas,
            bound_radius=max(mean["a"], mean["b_a"], mean["b_p"]) + g + 8.0, **mean))
    return discs


def _background(rng, verts: list) -> tuple[np.ndarray, np.ndarray, float]:
    """Soft tissue around the spine on a 2 mm patient grid (HU): muscle (45 HU) and, anterior
    of the bodies from 4 mm on, patches of retroperitoneal fat (down to -90 HU)."""
    step = 2.0
    origins = np.array([v.origin for v in verts])
    lo, hi = origins.min(0) - 90.0, origins.max(0) + 90.0
    shape = tuple(np.ceil((hi - lo) / step).astype(int) + 1)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    field /= field.std()
    grid = np.stack(np.meshgrid(*[lo[k] + step * np.arange(shape[k]) for k in range(3)], indexing="ij"), -1)
    points = grid.reshape(-1, 3)
    nearest = np.argmin(np.abs(points[:, 2:3] - origins[None, :, 2]), axis=1)
    anterior = np.empty(points.shape[0])
    for n, v in enumerate(verts):
        sel = nearest == n
        q = v.local(points[sel])
        anterior[sel] = -q[:, 1] - v.b_a
    weight = an._smoothstep((anterior - 4.0) / 8.0) / (1.0 + np.exp(-field.reshape(-1) / 0.35))
    hu = (45.0 - 135.0 * weight).reshape(shape).astype(np.float32)
    return hu, lo, step


def build_spine(spec: SpineSpec) -> Spine:
    """Draw the spine of ``spec`` (deterministic in ``spec.seed`` and the anatomy options)."""
    rng = np.random.default_rng(spec.seed)
    size = rng.uniform(0.92, 1.08)
    base_hu = rng.uniform(80.0, 110.0) if spec.osteoporotic else spec.trabecular_hu + rng.uniform(-10.0, 10.0)
    first = lv.LEVEL_INDEX[spec.levels[0]]
    verts = [_vertebra(rng, spec, name, size, base_hu - 3.0 * (lv.LEVEL_INDEX[name] - first))
             for name in an.level_range(spec)]
    _set_concavity(rng, verts, rng.uniform(1.3, 2.3))
    for v in verts:
        _texture(rng, v, spec.texture_hu * rng.uniform(0.85, 1.15))
    heights = _chain(rng, spec, verts, size)
    _align(verts)
    discs = _discs(rng, spec, verts, heights)
    _ablate(spec, verts)
    for v in verts:
        corners = np.abs(v.capsules[:, :6].reshape(-1, 3)).max(0) + 5.0
        v.bound_radius = float(np.linalg.norm(np.maximum(corners, [v.a + 10, max(v.b_a, v.b_p) + 10,
                                                                    0.5 * v.h_post + 8])))
    fat, fat_origin, fat_step = _background(rng, verts)
    centre = np.mean([v.origin for v in verts if v.scored], axis=0)
    abdomen = centre + 75.0 * np.array([0.0, 1.0, 0.0])
    return Spine(verts, discs, abdomen, fat, fat_origin, fat_step)
