"""Continuous spine anatomy of the independent benchmark renderer (no code or assumption shared
with ``VertebralFractureScreenLib.phantom`` or the endplate fit).

**Frames.** Patient coordinates are RAS millimetres (x to the patient's right, y anterior, z
superior). Each vertebra has a local frame: origin ``origin`` (the body's centre on its chord),
columns of ``axes`` = local x (towards the patient's left), local y (posterior: from the body
towards the canal), local z (superior). A point ``p`` has local coordinates ``(p - origin) @
axes``.

**Body.** In-plane outline: a superellipse of half-width ``a``, anterior half-depth ``b_a``,
posterior half-depth ``b_p`` with a posterior indentation ``indent`` (kidney shape) and a rim
flare towards the endplates. The depth fraction ``s`` runs from 0 at the anterior wall to 1 at
the posterior wall (mid-sagittal, mid-height). Endplates are height fields ``z_sup(x, y)``,
``z_inf(x, y)``: a chord (anterior height ``h_ant``, posterior ``h_post``), a concave dish of
depth ``concavity`` (1–3 mm), an irregular rim (random harmonics around the outline, outer 20 %
of the radius), a low roughness, fracture deformations, and Schmorl's nodes (pits). Cortical
walls are 0.5–1.5 mm thick (varying with angle and height), endplate plates 0.5–1.5 mm (thin
centrally, thick at the rim), thickness taken along the radius / along local z.

**Spine.** A kinematic chain: each vertebra follows the one above across a disc of given
central height, rotated by the segment's sagittal (lordosis/kyphosis) and coronal (scoliosis)
angle; a wedge fracture adds kyphosis at the segment above it. The chain is turned so its
scored part runs head to foot along -z and centred at the origin.

Dimensions are rounded adult values after published morphometry (Panjabi et al., Spine 1991
and 1992; Zhou et al., Eur Spine J 2000), chosen for this model; every spine draws its own
size, shape and angles around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from VertebralFractureScreenLib import levels as lv

from .spec import SpineSpec

# level: (posterior chord height mm, Ha/Hp, mid-sagittal depth mm, width mm, disc below mm)
LEVEL_TABLE = {
    "T2": (16.0, 0.94, 21.0, 27.0, 3.8), "T3": (16.5, 0.93, 22.0, 27.0, 3.8),
    "T4": (17.0, 0.93, 23.0, 28.0, 4.0), "T5": (17.5, 0.92, 24.0, 29.0, 4.0),
    "T6": (18.0, 0.92, 25.0, 30.0, 4.2), "T7": (18.7, 0.92, 26.0, 31.0, 4.5),
    "T8": (19.3, 0.93, 27.0, 32.0, 4.8), "T9": (20.0, 0.94, 28.0, 34.0, 5.0),
    "T10": (21.0, 0.95, 29.0, 36.0, 5.5), "T11": (22.2, 0.93, 30.0, 38.0, 6.0),
    "T12": (23.5, 0.91, 31.0, 40.0, 7.0), "L1": (24.5, 0.93, 32.0, 42.0, 8.0),
    "L2": (25.3, 0.97, 33.0, 44.0, 9.0), "L3": (25.8, 1.00, 34.0, 46.0, 10.0),
    "L4": (25.8, 1.03, 34.5, 48.0, 10.5), "L5": (25.0, 1.12, 34.5, 50.0, 10.0),
    "S1": (27.0, 1.15, 35.0, 50.0, 0.0),
}
"""Rounded adult values (see the module docstring); each spine scales and jitters them."""

SEGMENT_ANGLE_DEG = {
    "T2": -4.0, "T3": -4.5, "T4": -4.5, "T5": -4.5, "T6": -4.5, "T7": -4.5, "T8": -4.0,
    "T9": -3.5, "T10": -2.5, "T11": -1.0, "T12": 1.0, "L1": 4.0, "L2": 7.0, "L3": 9.0,
    "L4": 12.0, "L5": 16.0,
}
"""Sagittal angle (degrees) of the segment below each level; positive = lordotic (the disc
taller anteriorly)."""

PE_HU, OSTEOPHYTE_HU, GAS_HU = 480.0, 700.0, -900.0


@dataclass
class Vertebra:
    """One vertebra's continuous geometry and materials (see the module docstring)."""

    level: str
    label: int
    scored: bool
    origin: np.ndarray
    axes: np.ndarray
    a: float
    b_a: float
    b_p: float
    indent: float
    exponent: float
    flare: float
    h_ant: float
    h_post: float
    concavity: tuple[float, float]
    bowl_shift: float
    rim_amp: tuple[float, float]
    rim_harm: np.ndarray          # (2 endplates, K, 3): harmonic number, amplitude, phase
    rough: np.ndarray             # (2 endplates, 4): amplitude, wavelength x, wavelength y, phase
    wall_harm: np.ndarray         # (K, 3)
    wall_zphase: float
    plate_harm: np.ndarray        # (K, 3)
    hu_trab: float
    hu_wall: float
    hu_plate: float
    sclerosis: tuple[float, float]
    fracture: dict | None
    nodes: list
    osteophytes: list
    capsules: np.ndarray          # (n, 7): p0, p1, radius (local mm)
    texture: np.ndarray | None = None
    tex_origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    tex_step: float = 0.4
    bound_radius: float = 80.0
    cortex_mm: float | None = None
    """A uniform cortex thickness (mm) replacing the varying one (the ``cortex`` ablation)."""

    @property
    def depth(self) -> float:
        """Mid-sagittal depth at mid-height (mm), anterior to posterior wall."""
        return self.b_a + self.b_p * (1.0 - self.indent)

    def y_at(self, s):
        """Local y of depth fraction ``s`` (0 anterior wall, 1 posterior wall)."""
        return -self.b_a + np.asarray(s) * self.depth

    def s_at(self, y):
        """Depth fraction of local y."""
        return (np.asarray(y) + self.b_a) / self.depth

    def local(self, points: np.ndarray) -> np.ndarray:
        """Patient points (n, 3) → local coordinates (n, 3)."""
        return to_frame(points, self.origin, self.axes)


def to_frame(points: np.ndarray, origin: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``(points - origin) @ axes`` written out (numpy's matmul is slow for n x 3 by 3 x 3)."""
    d = points - origin
    return d[:, 0:1] * axes[0] + d[:, 1:2] * axes[1] + d[:, 2:3] * axes[2]


@dataclass
class Disc:
    """The disc between vertebrae ``upper`` and ``lower`` (indices into the spine's list): a
    frame halfway between theirs, the mean outline bulging by up to ``bulge`` mm, nucleus and
    annulus HU, and gas pockets (ellipsoids in the disc frame: centre, semi-axes) when
    degenerated."""

    upper: int
    lower: int
    origin: np.ndarray
    axes: np.ndarray
    a: float
    b_a: float
    b_p: float
    indent: float
    exponent: float
    height: float
    bulge: float
    degenerated: bool
    hu_nucleus: float
    hu_annulus: float
    gas: list
    bound_radius: float


def _harmonics(rng, kmin: int, kmax: int, decay: float = 1.0) -> np.ndarray:
    """Random periodic function of an angle as harmonics (k, amplitude, phase), RMS 1."""
    ks = np.arange(kmin, kmax + 1, dtype=float)
    amps = rng.normal(size=ks.size) * ks ** (-decay)
    amps /= np.sqrt(0.5 * np.sum(amps ** 2))
    return np.stack([ks, amps, rng.uniform(0, 2 * np.pi, ks.size)], axis=1)


ANGLES = np.linspace(-np.pi, np.pi, 4097)
"""The angle grid of the tabulated functions of the angle around a body (radians)."""


def periodic(harm: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Evaluate :func:`_harmonics` at angles ``theta`` (radians)."""
    out = np.zeros_like(theta)
    for k, amp, phase in harm:
        out += amp * np.cos(k * theta + phase)
    return out


def _outline(v, theta: np.ndarray) -> np.ndarray:
    c, s = np.abs(np.cos(theta)), np.sin(theta)
    b = np.where(s < 0, v.b_a, v.b_p)
    p = v.exponent
    r = (c ** p / v.a ** p + np.abs(s) ** p / b ** p) ** (-1.0 / p)
    return r * (1.0 - v.indent * np.exp(-((theta - np.pi / 2) / 0.45) ** 2))


def tables(v) -> dict:
    """Functions of the angle around the body, tabulated on :data:`ANGLES` once per body: the
    outline radius, the rims' irregularity, the wall's and plate's thickness variation."""
    cached = getattr(v, "_tables", None)
    if cached is None:
        cached = {"radius": _outline(v, ANGLES)}
        if hasattr(v, "rim_harm"):
            cached.update(rim0=periodic(v.rim_harm[0], ANGLES), rim1=periodic(v.rim_harm[1], ANGLES),
                          wall=periodic(v.wall_harm, ANGLES), plate=periodic(v.plate_harm, ANGLES))
        object.__setattr__(v, "_tables", cached)
    return cached


def lookup(v, name: str, theta: np.ndarray) -> np.ndarray:
    """A tabulated function of the angle (see :func:`tables`)."""
    return np.interp(theta, ANGLES, tables(v)[name])


def outline_radius(v, theta: np.ndarray) -> np.ndarray:
    """Radius (mm) of the body's (or disc's) in-plane outline at angle ``theta`` = atan2(y, x)
    in the local frame, at mid-height: a superellipse with a posterior indentation."""
    return lookup(v, "radius", theta)


@dataclass
class Polar:
    """In-plane polar position of local points: angle, radius, outline radius at that angle."""

    theta: np.ndarray
    r: np.ndarray
    outline: np.ndarray

    @property
    def rho(self) -> np.ndarray:
        """Radius relative to the outline (1 on the wall at mid-height)."""
        return self.r / self.outline


def polar(v, x: np.ndarray, y: np.ndarray) -> Polar:
    theta = np.arctan2(y, x)
    return Polar(theta, np.hypot(x, y), outline_radius(v, theta))


def side_distance(v: Vertebra, q: np.ndarray, pol: Polar | None = None) -> np.ndarray:
    """Radial signed distance (mm, positive outside) of local points from the body's wall,
    with the rim flare towards the endplates."""
    pol = pol or polar(v, q[:, 0], q[:, 1])
    hc = 0.25 * (v.h_ant + v.h_post)
    scale = 1.0 + v.flare * np.clip(np.abs(q[:, 2]) / hc, 0.0, 1.2) ** 4
    return pol.r - pol.outline * scale


def _bowl(v: Vertebra, x, y):
    """The concave dish, 1 at its centre and 0 from its edge (slightly inside the outline)."""
    yc = v.y_at(0.5 + v.bowl_shift)
    rho2 = (x / (0.92 * v.a)) ** 2 + ((y - yc) / (0.46 * v.depth)) ** 2
    return np.clip(1.0 - rho2, 0.0, None) ** 1.5


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def node_pit(v: Vertebra, x, y, which: int):
    """Depth (mm, ≥ 0) of the Schmorl's nodes of endplate ``which`` (0 superior, 1 inferior)."""
    pit = np.zeros_like(x)
    for node in v.nodes:
        if node["which"] != which:
            continue
        rho2 = ((x - node["x"]) ** 2 + (y - node["y"]) ** 2) / node["radius"] ** 2
        pit = np.maximum(pit, node["depth"] * np.clip(1.0 - rho2, 0.0, None) ** 0.75)
    return pit


def fracture_drop(v: Vertebra, x, y, which: int):
    """How far (mm, ≥ 0, towards the body's centre) the fracture moves endplate ``which`` at
    local (x, y); crush is a scaling applied in :func:`endplates`. Wedge: the superior
    endplate hinged at the Hp line, lowered by ``fraction * Ha0`` at the Ha line; biconcave: both
    endplates by ``fraction * Hm0 / 2`` at the middle, cos² over ±35 % of the depth, flat across
    the central half of the width and fading out by 95 % of the half-width."""
    f = v.fracture
    if not f or f["shape"] == "crush":
        return np.zeros_like(x)
    s = v.s_at(y)
    if f["shape"] == "wedge":
        if which != 0:
            return np.zeros_like(x)
        return f["fraction"] * f["ha0"] * np.clip((0.85 - s) / 0.70, 0.0, None)
    along = np.where(np.abs(s - 0.5) < 0.35, np.cos(0.5 * np.pi * (s - 0.5) / 0.35) ** 2, 0.0)
    across = 1.0 - _smoothstep((np.abs(x) - 0.25 * v.a) / (0.7 * v.a))
    return 0.5 * f["fraction"] * f["hm0"] * along * across


def endplates(v: Vertebra, x, y, nodes: bool = True, fracture: bool = True, pol: Polar | None = None):
    """Superior and inferior endplate surfaces ``z_sup(x, y)``, ``z_inf(x, y)`` (local mm)."""
    pol = pol or polar(v, x, y)
    s = v.s_at(y)
    chord = v.h_ant + (v.h_post - v.h_ant) * s
    bowl = _bowl(v, x, y)
    rim_w = _smoothstep((pol.rho - 0.8) / 0.2)
    out = []
    for which, sign in ((0, 1.0), (1, -1.0)):
        amp, lx, ly, phase = v.rough[which]
        z = (0.5 * chord - v.concavity[which] * bowl
             + v.rim_amp[which] * lookup(v, f"rim{which}", pol.theta) * rim_w
             + amp * np.sin(2 * np.pi * x / lx + phase) * np.cos(2 * np.pi * y / ly + phase))
        if fracture and v.fracture and v.fracture["shape"] == "crush":
            z = z * (1.0 - v.fracture["fraction"])
        if fracture:
            z = z - fracture_drop(v, x, y, which)
        if nodes:
            z = z - node_pit(v, x, y, which)
        out.append(sign * z)
    return out[0], out[1]


def wall_thickness(v: Vertebra, theta, z):
    """Cortical wall thickness (mm, 0.5–1.5) by angle and height."""
    if v.cortex_mm is not None:
        return np.full_like(theta, v.cortex_mm)
    t = 1.0 + 0.3 * lookup(v, "wall", theta) + 0.15 * np.sin(2 * np.pi * z / 11.0 + v.wall_zphase)
    return np.clip(t, 0.5, 1.5)


def plate_thickness(v: Vertebra, x, y, which: int, pol: Polar | None = None):
    """Endplate cortex thickness (mm, 0.5–1.5): thin centrally, thick at the rim, thick around
    a Schmorl's node (its sclerotic lining)."""
    if v.cortex_mm is not None:
        return np.full_like(x, v.cortex_mm)
    pol = pol or polar(v, x, y)
    rho = np.clip(pol.rho, 0, 1)
    t = 0.6 + 0.5 * rho ** 2 + 0.15 * lookup(v, "plate", pol.theta) * rho
    t = t + 0.6 * (node_pit(v, x, y, which) > 0)
    return np.clip(t, 0.5, 1.5)


def osteophyte_sdf(v: Vertebra, q: np.ndarray, d_side: np.ndarray, z_sup, z_inf, theta=None) -> np.ndarray:
    """Signed distance (mm, negative inside) of local points from the vertebra's rim
    osteophytes: a spur along the endplate's rim over an arc, tapering outwards and curling
    towards the disc. +inf where there is none."""
    sdf = np.full(q.shape[0], np.inf)
    if not v.osteophytes:
        return sdf
    theta = np.arctan2(q[:, 1], q[:, 0]) if theta is None else theta
    for o in v.osteophytes:
        centre = np.radians(o["angle_deg"])  # 0 anterior (-y), +90 left (+x)
        dtheta = np.angle(np.exp(1j * (theta - (centre - np.pi / 2))))
        window = np.where(np.abs(dtheta) < o["half_width"], np.cos(0.5 * np.pi * dtheta / o["half_width"]) ** 2, 0.0)
        reach = o["length"] * window
        e = np.clip(d_side, 0.0, None)
        frac = e / np.maximum(reach, 1e-3)
        sign = 1.0 if o["which"] == 0 else -1.0
        rim = z_sup if o["which"] == 0 else z_inf
        centre_z = rim - sign * 0.5 * o["thickness"] + sign * 0.35 * o["length"] * frac ** 2
        half = 0.5 * o["thickness"] * (1.0 - 0.6 * np.clip(frac, 0, 1))
        one = np.maximum.reduce([d_side - reach, -d_side - 1.5, np.abs(q[:, 2] - centre_z) - half])
        sdf = np.minimum(sdf, np.where(reach > 0.05, one, np.inf))
    return sdf


def capsule_sdf(capsules: np.ndarray, q: np.ndarray, margin: float = 4.5) -> np.ndarray:
    """Signed distance (mm) of local points from a union of capsules (segment p0–p1, radius);
    +inf farther than ``margin`` from every capsule's box."""
    sdf = np.full(q.shape[0], np.inf)
    for row in capsules:
        p0, p1, radius = row[:3], row[3:6], row[6]
        lo, hi = np.minimum(p0, p1) - radius - margin, np.maximum(p0, p1) + radius + margin
        sel = np.flatnonzero((q[:, 0] > lo[0]) & (q[:, 0] < hi[0]) & (q[:, 1] > lo[1]) & (q[:, 1] < hi[1])
                             & (q[:, 2] > lo[2]) & (q[:, 2] < hi[2]))
        if sel.size == 0:
            continue
        d = p1 - p0
        r0, r1, r2 = q[sel, 0] - p0[0], q[sel, 1] - p0[1], q[sel, 2] - p0[2]
        t = np.clip((r0 * d[0] + r1 * d[1] + r2 * d[2]) / float(d @ d), 0.0, 1.0)
        r0, r1, r2 = r0 - t * d[0], r1 - t * d[1], r2 - t * d[2]
        sdf[sel] = np.minimum(sdf[sel], np.sqrt(r0 * r0 + r1 * r1 + r2 * r2) - radius)
    return sdf


def texture_at(v: Vertebra, q: np.ndarray) -> np.ndarray:
    """Trabecular texture (HU, zero mean) at local points (trilinear; 0 outside its grid)."""
    if v.texture is None:
        return np.zeros(q.shape[0])
    idx = ((q - v.tex_origin) / v.tex_step).T
    return ndimage.map_coordinates(v.texture, idx, order=1, mode="constant", cval=0.0)


def trabecular_hu(v: Vertebra, q: np.ndarray, z_sup=None, z_inf=None) -> np.ndarray:
    """The drawn trabecular HU at local points: the level's HU, its texture and the subchondral
    sclerosis of a degenerated disc's endplates (decaying over 2.5 mm below the plate)."""
    hu = v.hu_trab + texture_at(v, q)
    if max(v.sclerosis) > 0:
        if z_sup is None:
            z_sup, z_inf = endplates(v, q[:, 0], q[:, 1])
        hu = hu + v.sclerosis[0] * np.exp(-np.clip(z_sup - q[:, 2], 0, None) / 2.5)
        hu = hu + v.sclerosis[1] * np.exp(-np.clip(q[:, 2] - z_inf, 0, None) / 2.5)
    return hu


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Right-handed rotation matrix about a coordinate axis."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def level_range(spec: SpineSpec) -> list[str]:
    """The drawn levels: the scored ones with one context level above and below."""
    first, last = lv.LEVEL_INDEX[spec.levels[0]], lv.LEVEL_INDEX[spec.levels[-1]]
    names = list(lv.LEVELS[max(first - 1, lv.LEVEL_INDEX["T2"]): min(last + 2, len(lv.LEVELS))])
    return names
