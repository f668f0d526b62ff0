"""Synthetic spine CT phantom with exact ground truth.

:func:`make_phantom` renders a thoraco-lumbar spine into a CT volume (HU) and label maps in the
three conventions of SPEC §3, and returns a ``truth`` dictionary with the analytic answers that
every measurement of this product is tested against.

Anatomy (see :mod:`.phantom_anatomy` for the frames and dimensions):

* vertebral bodies: elliptic cylinders in each vertebra's own frame with a cortical shell of
  ``cortex_mm`` (``cortical_hu``) around a trabecular core (``trabecular_hu``); the superior and
  inferior endplates are surfaces ``w_top(u, v)`` / ``w_bot(u, v)`` so that heights are known in
  closed form; physiological wedging at T6–T9 and T11–L1 and L5's short posterior wall;
* intervertebral discs filling the space between adjacent endplates;
* posterior elements (pedicles, lamina, spinous and transverse processes) around a spinal canal
  (CSF) holding the spinal cord down to the L1/L2 disc;
* autochthonous back muscles and iliopsoas as tubes that follow the spine curve, with
  intramuscular fat as a lattice of spheres occupying a chosen volume fraction;
* the aorta (native or contrast-enhanced) down to L4, and a body envelope with subcutaneous fat.

Fractures ``LEVEL:SHAPE:FRACTION`` deform a body relative to its own normal shape:

* ``wedge``: the superior endplate drops anteriorly, ``Ha = Ha0 (1 - F)``, ``Hp = Hp0``;
* ``biconcave``: both endplates are depressed centrally, ``Hm = Hm0 (1 - F)``, ``Ha, Hp`` kept;
* ``crush``: the whole body loses height, ``H = H0 (1 - F)`` everywhere.

The true height loss is therefore ``F`` and the true Genant grade is that of ``F`` (Genant 1993:
grade 1 for 20–25 %, 2 for 25–40 %, 3 above 40 %). Heights are the endplate distances along the
vertebra's cranio-caudal axis, in its mid-sagittal plane, at 15 / 50 / 85 % of the body's depth
from the anterior wall (SPEC §4).

Rendering: label maps take the tissue at the voxel centre; the CT of a voxel next to a change of
HU is the mean of sub-voxel samples on a regular grid (``supersampling`` per axis, by default as
many as keep them ≤ 0.5 mm apart), which gives the partial-volume effect. Changes are looked for
at the voxel centres and, in voxels of bone, disc and muscle along axes coarser than the cortex,
at probes closer than the cortex, so a plate thinner than a voxel is drawn even between tissues
of equal HU. Optional Gaussian point-spread function and Gaussian noise follow. Everything is computed in the anatomy frame and mapped through the
whole-anatomy rotation and the grid's IJK→RAS matrix, so any spacing, grid orientation and
rotation of the anatomy against the voxel grid is exact.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__, levels as lv
from .geometry import make_ijk_to_ras, rotation_matrix
from .grading import genant_grade, is_borderline
from .morphometry import AP_FRACTIONS, MIDDLE_REGION, PROFILE_FRACTIONS  # where the truth is given, as measured
from .phantom_anatomy import SpineCurve, level_dimensions, layout_levels

FRACTURE_SHAPES = ("wedge", "biconcave", "crush")

# Tissue codes of the phantom's tissue map (written as tissue.nii.gz).
TISSUES = {
    "air": 0, "subcutaneous_fat": 1, "soft_tissue": 2, "muscle": 3, "intramuscular_fat": 4,
    "blood": 5, "csf": 6, "spinal_cord": 7, "disc": 8, "posterior_bone": 9,
    "cortical_bone": 10, "trabecular_bone": 11, "sacrum": 12,
}

_UNPROBED_TISSUES = (TISSUES["air"], TISSUES["subcutaneous_fat"], TISSUES["soft_tissue"])
"""Tissues whose voxels are not probed for thin structures between voxel centres (the plates and
fat pockets of interest lie in or next to bone, disc and muscle, whose own voxels are probed)."""

VERSE_SACRUM = 26  # VerSe's sacrum id; the phantom's S1 and sacrum are written with it.


@dataclass(frozen=True)
class Fracture:
    """A fracture of one vertebral body: ``shape`` in :data:`FRACTURE_SHAPES`, ``fraction`` of
    height lost (0 < fraction < 0.7)."""

    level: str
    shape: str
    fraction: float

    @classmethod
    def parse(cls, text: str) -> "Fracture":
        """Parse ``LEVEL:SHAPE:FRACTION``, e.g. ``L1:wedge:0.3``."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"fracture {text!r} is not LEVEL:SHAPE:FRACTION (e.g. L1:wedge:0.3)")
        level, shape, fraction = parts[0].upper(), parts[1].lower(), parts[2]
        lv.level_position(level)
        try:
            value = float(fraction)
        except ValueError:
            raise ValueError(f"fracture fraction {fraction!r} is not a number") from None
        return cls(level, shape, value)

    def __post_init__(self):
        if self.shape not in FRACTURE_SHAPES:
            raise ValueError(f"fracture shape {self.shape!r} is not one of {', '.join(FRACTURE_SHAPES)}")
        if not 0.0 < self.fraction < 0.7:
            raise ValueError(f"fracture fraction {self.fraction} must lie between 0 and 0.7")


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines a phantom. Lengths in mm, angles in degrees, intensities in HU."""

    levels: tuple[str, ...] = lv.parse_level_range("T10-S1")
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # along i, j, k
    size_ijk: tuple[int, int, int] | None = None  # None: fit the field of view to the anatomy
    fov: str = "spine"  # "spine": tight box around spine and muscles; "body": whole body section
    fov_margin_mm: float = 4.0  # beyond the outer half-discs of the first and last level
    grid_orientation: str = "RAS"  # "RAS", "LPS" or "oblique" (grid axes tilted 15°/10°)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # anatomy about R, A, S axes
    centre_ras: tuple[float, float, float] = (12.5, -30.0, -120.0)
    lordosis_deg: float = 40.0
    kyphosis_deg: float = 35.0
    scoliosis_deg: float = 0.0
    physiological_wedging: bool = True
    fractures: tuple[Fracture, ...] = ()
    trabecular_hu: float | dict = 160.0
    cortical_hu: float = 700.0
    cortex_mm: float = 1.0
    posterior_hu: float = 400.0
    sacrum_hu: float = 250.0
    disc_hu: float = 90.0
    muscle_hu: float = 50.0
    fat_hu: float = -100.0
    soft_tissue_hu: float = 0.0  # fat-rich visceral and retroperitoneal tissue
    csf_hu: float = 10.0
    cord_hu: float = 35.0
    autochthon_fat_fraction: float = 0.15
    iliopsoas_fat_fraction: float = 0.05
    imat_period_mm: float = 10.0
    contrast: bool = False
    aorta_hu: float | None = None  # None: 40 HU native, 250 HU with contrast
    noise_hu: float = 0.0
    psf_fwhm_mm: float = 0.0
    supersampling: int | None = None  # odd sub-samples per axis; None: sub-sample spacing ≤ 0.5 mm
    seed: int = 0

    def __post_init__(self):
        if not self.levels:
            raise ValueError("the phantom needs at least one level")
        for name in self.levels:
            lv.level_position(name)
        if self.supersampling is not None and (self.supersampling < 1 or self.supersampling % 2 == 0):
            raise ValueError("supersampling must be an odd number ≥ 1 (the centre sample labels the voxel)")
        if min(self.spacing) <= 0:
            raise ValueError("voxel spacing must be positive")
        if self.fov not in ("spine", "body"):
            raise ValueError("fov must be 'spine' or 'body'")
        if self.grid_orientation not in ("RAS", "LPS", "oblique"):
            raise ValueError("grid_orientation must be RAS, LPS or oblique")
        if len({f.level for f in self.fractures}) != len(self.fractures):
            raise ValueError("at most one fracture per level")
        for fraction in (self.autochthon_fat_fraction, self.iliopsoas_fat_fraction):
            if not 0.0 <= fraction <= 0.5:
                raise ValueError("intramuscular fat fractions must lie in [0, 0.5]")

    def subsamples_per_axis(self) -> tuple[int, int, int]:
        """Odd number of partial-volume sub-samples along i, j, k.

        Default: the fewest that make the sub-sample spacing ≤ 0.5 mm, or two more when that makes
        the cortex (``cortex_mm``) a whole number of sub-samples. A thin plate parallel to the
        slices is then drawn with its exact thickness: with 7 sub-samples per 3 mm slice a 1 mm
        endplate was drawn 0.86 mm thick, 14 % too faint, which a partial-volume endplate fit
        reads as a position error of about 1 mm (3 mm slices now get 9 sub-samples)."""
        if self.supersampling is not None:
            return (self.supersampling,) * 3
        counts = []
        for spacing in self.spacing:
            fewest = max(1, int(np.ceil(spacing / 0.5 - 1e-9)))
            fewest += 1 - fewest % 2
            exact = [n for n in (fewest, fewest + 2) if abs(self.cortex_mm * n / spacing - round(self.cortex_mm * n / spacing)) < 1e-6]
            counts.append(exact[0] if exact else fewest)
        return tuple(counts)

    def trabecular_hu_of(self, level: str) -> float:
        if isinstance(self.trabecular_hu, dict):
            return float(self.trabecular_hu.get(level, 160.0))
        return float(self.trabecular_hu)

    @property
    def aorta_hu_value(self) -> float:
        if self.aorta_hu is not None:
            return float(self.aorta_hu)
        return 250.0 if self.contrast else 40.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["fractures"] = [f"{f.level}:{f.shape}:{f.fraction}" for f in self.fractures]
        return d


# ------------------------------------------------------------------------------------------------
# Vertebral body shape
# ------------------------------------------------------------------------------------------------


@dataclass
class VertebraModel:
    """One rigid vertebra: body shape in its local frame ``(u, v, w)`` (mm) = coordinates along
    ``(e_lr, e_ap, e_cc)`` from its body centre; ``v`` > 0 is anterior."""

    level: str
    s: float
    half_width: float  # a, body semi-axis along e_lr
    half_depth: float  # b, body semi-axis along e_ap
    ha0: float
    hp0: float
    fracture: Fracture | None
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))  # rows e_lr, e_ap, e_cc

    def ap_fraction(self, v):
        """Fraction of the body depth from the anterior wall (0) to the posterior wall (1)."""
        return (self.half_depth - v) / (2.0 * self.half_depth)

    def endplates(self, u, v):
        """Superior and inferior endplate positions ``w_top, w_bot`` (mm) above points (u, v)."""
        f = self.ap_fraction(np.asarray(v, dtype=float))
        normal = self.hp0 + (self.ha0 - self.hp0) * (0.85 - f) / 0.70
        top, bottom = 0.5 * normal, -0.5 * normal
        if self.fracture is None:
            return top, bottom
        fraction = self.fracture.fraction
        if self.fracture.shape == "wedge":
            ramp = np.clip((0.85 - f) / 0.70, 0.0, None)
            return top - fraction * normal * ramp, bottom
        if self.fracture.shape == "crush":
            return top * (1.0 - fraction), bottom * (1.0 - fraction)
        # biconcave: central depression of both endplates, flat across the central half width
        depression = fraction * _central_bump(f) * _lateral_plateau(np.asarray(u, dtype=float), self.half_width)
        return top * (1.0 - depression), bottom * (1.0 - depression)

    def height_at(self, ap_fraction: float) -> float:
        """True height (mm) in the mid-sagittal plane at an AP fraction from the anterior wall."""
        v = self.half_depth - 2.0 * self.half_depth * ap_fraction
        top, bottom = self.endplates(0.0, v)
        return float(top - bottom)

    def extents(self) -> tuple[float, float]:
        """Largest superior and inferior extent of the body from its centre (mm)."""
        u, v = np.meshgrid(np.linspace(-self.half_width, self.half_width, 41),
                           np.linspace(-self.half_depth, self.half_depth, 81))
        inside = (u / self.half_width) ** 2 + (v / self.half_depth) ** 2 <= 1.0 + 1e-9
        top, bottom = self.endplates(u[inside], v[inside])
        return float(np.max(top)), float(-np.min(bottom))

    def volume_mm3(self, step: float = 0.2) -> float:
        """Body volume by integrating the endplate distance over the elliptic cross-section."""
        us = np.arange(-self.half_width + step / 2, self.half_width, step)
        vs = np.arange(-self.half_depth + step / 2, self.half_depth, step)
        u, v = np.meshgrid(us, vs)
        inside = (u / self.half_width) ** 2 + (v / self.half_depth) ** 2 <= 1.0
        top, bottom = self.endplates(u[inside], v[inside])
        return float(np.sum(top - bottom) * step * step)

    def local(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local ``(u, v, w)`` of anatomy-frame points ``q`` (N, 3)."""
        offsets = self.axes @ self.centre
        return tuple(q @ axis - offset for axis, offset in zip(self.axes, offsets))


def _central_bump(f):
    """1 at mid-depth falling smoothly to 0 at 15 % and 85 % of the depth (cos² profile)."""
    x = (np.asarray(f) - 0.5) / 0.35
    return np.where(np.abs(x) < 1.0, np.cos(0.5 * np.pi * x) ** 2, 0.0)


def _lateral_plateau(u, half_width):
    """1 over the central half of the width, cos² taper to 0 at 90 % of the half-width."""
    x = (np.abs(u) - 0.5 * half_width) / (0.4 * half_width)
    return np.where(x <= 0.0, 1.0, np.where(x < 1.0, np.cos(0.5 * np.pi * x) ** 2, 0.0))


# ------------------------------------------------------------------------------------------------
# Scene assembly
# ------------------------------------------------------------------------------------------------


@dataclass
class Tube:
    """A structure that follows the spine curve: elliptic cross-section (semi-axes ``r_ap``,
    ``r_lr``) centred at offsets ``(c_ap, c_lr)`` from the curve, all functions of arc length."""

    name: str
    s_range: tuple[float, float]
    c_ap: callable
    c_lr: callable
    r_ap: callable
    r_lr: callable
    tissue: int
    hu: float
    total_label: int = 0
    fat_fraction: float = 0.0
    lattice_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def inside(self, s, n_ap, n_lr):
        ok = (s >= self.s_range[0]) & (s <= self.s_range[1])
        return ok & (((n_ap - self.c_ap(s)) / self.r_ap(s)) ** 2 + ((n_lr - self.c_lr(s)) / self.r_lr(s)) ** 2 <= 1.0)


class SpineScene:
    """The phantom's anatomy: vertebrae, discs, tubes and envelope, in the anatomy frame."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed + 1)
        fractures = {f.level: f for f in spec.fractures}
        # 1. Shapes of all levels C7–S1 (the anatomy does not depend on which levels are drawn).
        all_levels = [n for n in lv.LEVELS if lv.level_position(n) >= lv.level_position("C7")]
        models: dict[str, VertebraModel] = {}
        for name in all_levels:
            dims = level_dimensions(name)
            ratio = dims.normal_ha_hp if spec.physiological_wedging else 1.0
            hp0 = 2.0 * dims.height_mm / (1.0 + ratio)
            models[name] = VertebraModel(name, 0.0, dims.width_mm / 2, dims.depth_mm / 2, ratio * hp0, hp0,
                                         fractures.get(name))
        extents = {name: m.extents() for name, m in models.items()}
        centres = layout_levels({n: e[0] for n, e in extents.items()}, {n: e[1] for n, e in extents.items()})
        self.curve = SpineCurve(centres, spec.lordosis_deg, spec.kyphosis_deg, spec.scoliosis_deg)
        for name, model in models.items():
            model.s = centres[name]
            c, e_lr, e_ap, e_cc = self.curve.frame(model.s)
            model.centre, model.axes = c, np.stack([e_lr, e_ap, e_cc])
        self.models = models
        self.extents = extents
        self.levels = [n for n in all_levels if n in spec.levels]  # drawn levels, cranial first
        # Disc mid-planes: arc length halfway between the adjacent endplates.
        self.disc_mid_s: dict[tuple[str, str], float] = {}
        for upper, lower in zip(all_levels[:-1], all_levels[1:]):
            top_of_lower = centres[lower] + extents[lower][0]
            bottom_of_upper = centres[upper] - extents[upper][1]
            self.disc_mid_s[(upper, lower)] = 0.5 * (top_of_lower + bottom_of_upper)
        first, last = self.levels[0], self.levels[-1]
        self.s_low = self._slab_limits(last)[0] - spec.fov_margin_mm
        self.s_high = self._slab_limits(first)[1] + spec.fov_margin_mm
        self.tubes = self._make_tubes(rng)

    # -- geometry helpers -----------------------------------------------------------------------
    def _slab_limits(self, level: str) -> tuple[float, float]:
        """Arc lengths of the mid-disc planes below and above ``level`` (its muscle slab)."""
        names = [n for n in lv.LEVELS if lv.level_position(n) >= lv.level_position("C7")]
        index = names.index(level)
        model = self.models[level]
        top, bottom = self.extents[level]
        above = self.disc_mid_s.get((names[index - 1], level)) if index > 0 else None
        below = self.disc_mid_s.get((level, names[index + 1])) if index + 1 < len(names) else None
        if above is None:
            above = model.s + top + level_dimensions(level).disc_below_mm / 2
        if below is None:
            below = model.s - bottom - 5.0
        return below, above

    def _level_profile(self, value_of_level) -> callable:
        """Piecewise-linear function of arc length through per-level values at body centres."""
        names = sorted(self.models, key=lambda n: self.models[n].s)
        xs = np.array([self.models[n].s for n in names])
        ys = np.array([value_of_level(n) for n in names], dtype=float)
        return lambda s: np.interp(s, xs, ys)

    def _make_tubes(self, rng) -> list[Tube]:
        spec = self.spec
        dims = level_dimensions
        s_all = (self.curve.s[0] + 1.0, self.curve.s[-1] - 1.0)
        half_depth = self._level_profile(lambda n: dims(n).depth_mm / 2)
        half_width = self._level_profile(lambda n: dims(n).width_mm / 2)
        canal_ap = self._level_profile(lambda n: dims(n).canal_half_depth_mm)
        canal_lr = self._level_profile(lambda n: dims(n).canal_half_width_mm)
        lamina = self._level_profile(lambda n: dims(n).lamina_thickness_mm)
        lumbar = self._level_profile(lambda n: 1.0 if n.startswith(("L", "S")) else 0.0)
        canal_centre = lambda s: -(half_depth(s) + canal_ap(s))  # noqa: E731
        # Autochthon: behind the lamina, beside the spinous process (half-thickness 3 mm).
        auto_r_ap = lambda s: 12.0 + 8.0 * lumbar(s)  # noqa: E731
        auto_r_lr = lambda s: 15.0 + 7.0 * lumbar(s)  # noqa: E731
        auto_ap = lambda s: canal_centre(s) - canal_ap(s) - lamina(s) - 1.5 - auto_r_ap(s)  # noqa: E731
        # Iliopsoas: lateral to the bodies from T12 down, growing to L5.
        s_t12, s_l5 = self.models["T12"].s, self.models["L5"].s
        psoas_r_lr = lambda s: np.interp(s, [s_l5, s_t12], [20.0, 5.0])  # noqa: E731
        psoas_r_ap = lambda s: 0.9 * psoas_r_lr(s)  # noqa: E731
        psoas_lr = lambda s: half_width(s) + psoas_r_lr(s) + 2.0  # noqa: E731
        conus_s = self.disc_mid_s[("L1", "L2")]
        aorta_bifurcation_s = self.models["L4"].s
        const = lambda value: (lambda s: np.full_like(np.asarray(s, dtype=float), value))  # noqa: E731
        t = TISSUES
        tubes = []
        for side, sign, auto_label, psoas_label in (("left", -1.0, lv.TOTAL_AUTOCHTHON_LEFT, lv.TOTAL_ILIOPSOAS_LEFT),
                                                    ("right", 1.0, lv.TOTAL_AUTOCHTHON_RIGHT, lv.TOTAL_ILIOPSOAS_RIGHT)):
            tubes.append(Tube(f"autochthon_{side}", s_all, auto_ap,
                              (lambda sg: lambda s: sg * (3.0 + 2.0 + auto_r_lr(s)))(sign),
                              auto_r_ap, auto_r_lr, t["muscle"], spec.muscle_hu, auto_label,
                              spec.autochthon_fat_fraction, rng.uniform(0, spec.imat_period_mm, 3)))
            tubes.append(Tube(f"iliopsoas_{side}", (s_all[0], s_t12), const(2.0),
                              (lambda sg: lambda s: sg * psoas_lr(s))(sign),
                              psoas_r_ap, psoas_r_lr, t["muscle"], spec.muscle_hu, psoas_label,
                              spec.iliopsoas_fat_fraction, rng.uniform(0, spec.imat_period_mm, 3)))
        tubes.append(Tube("aorta", (aorta_bifurcation_s, s_all[1]), lambda s: half_depth(s) + 14.0 + 11.0,
                          const(-16.0), const(11.0), const(11.0), t["blood"], spec.aorta_hu_value, lv.TOTAL_AORTA))
        tubes.append(Tube("canal", s_all, canal_centre, const(0.0), canal_ap, canal_lr, t["csf"], spec.csf_hu))
        tubes.append(Tube("spinal_cord", (conus_s, s_all[1]), canal_centre, const(0.0), const(4.5), const(4.5),
                          t["spinal_cord"], spec.cord_hu, lv.TOTAL_SPINAL_CORD))
        # Clip every tube to the drawn stretch of spine.
        for tube in tubes:
            tube.s_range = (max(tube.s_range[0], self.s_low - 80.0), min(tube.s_range[1], self.s_high + 80.0))
        return [tube for tube in tubes if tube.s_range[0] < tube.s_range[1]]

    # -- painting -------------------------------------------------------------------------------
    def paint(self, q: np.ndarray, labels_only: bool = False) -> dict[str, np.ndarray]:
        """Tissue, HU and labels of anatomy-frame points ``q`` (N, 3), by painter's order:
        envelope, tubes, discs, vertebrae (posterior elements, then body), sacrum."""
        spec = self.spec
        n = len(q)
        out = {
            "hu": np.full(n, -1000.0, dtype=np.float32),
            "tissue": np.zeros(n, dtype=np.uint8),
            "total": np.zeros(n, dtype=np.uint8),
            "body": np.zeros(n, dtype=np.uint8),
            "verse": np.zeros(n, dtype=np.uint8),
        }

        def put(mask, hu, tissue, total=0, body=0, verse=0):
            out["hu"][mask] = hu
            out["tissue"][mask] = tissue
            out["total"][mask] = total
            out["body"][mask] = body
            out["verse"][mask] = verse

        t = TISSUES
        self._q_box = (q.min(axis=0), q.max(axis=0)) if n else (np.zeros(3), np.zeros(3))
        # Body envelope: ellipse in the transverse plane following the spine's AP position.
        y_spine = np.interp(q[:, 2], self.curve.points[:, 2], self.curve.points[:, 1])
        ex, ey = q[:, 0] / 175.0, (q[:, 1] - y_spine - 45.0) / 150.0
        outer = ex ** 2 + ey ** 2 <= 1.0
        put(outer, spec.fat_hu, t["subcutaneous_fat"])
        inner = ((q[:, 0] / 160.0) ** 2 + ((q[:, 1] - y_spine - 45.0) / 135.0) ** 2 <= 1.0)
        put(inner, spec.soft_tissue_hu, t["soft_tissue"])
        # Tubes: one foot-point computation for all of them, on the points near the spine only.
        near = np.nonzero(self._tube_box_contains(q))[0]
        if len(near):
            s, n_ap, n_lr = self.curve.tube_coordinates(q[near])
            for tube in self.tubes:
                hit = tube.inside(s, n_ap, n_lr)
                if not hit.any():
                    continue
                idx = near[hit]
                hu = np.full(len(idx), tube.hu, dtype=np.float32)
                tissue = np.full(len(idx), tube.tissue, dtype=np.uint8)
                if tube.fat_fraction > 0:
                    fat = _in_fat_lattice(q[idx], spec.imat_period_mm, tube.fat_fraction, tube.lattice_offset)
                    hu[fat] = spec.fat_hu
                    tissue[fat] = t["intramuscular_fat"]
                out["hu"][idx] = hu
                out["tissue"][idx] = tissue
                out["total"][idx] = tube.total_label
                out["body"][idx] = 0
                out["verse"][idx] = 0
        # Discs between drawn neighbours.
        for upper, lower in zip(self.levels[:-1], self.levels[1:]):
            if lv.level_position(lower) - lv.level_position(upper) != 1:
                continue
            mask = self._disc(q, upper, lower)
            put(mask, spec.disc_hu, t["disc"], 0, lv.DISC_LABEL, 0)
        # Vertebrae.
        for name in self.levels:
            self._paint_vertebra(q, name, put)
        return out

    def _paint_vertebra(self, q, name, put):
        spec = self.spec
        t = TISSUES
        model = self.models[name]
        total_id = lv.TOTAL_VERTEBRA_IDS[name]
        verse_id = lv.VERSE_VERTEBRA_IDS.get(name, VERSE_SACRUM)
        reach = 2.0 * model.half_depth + 80.0
        if not self._box_near(model.centre, reach):
            return
        top_extent, bottom_extent = self.extents[name]
        if name == "S1":
            bottom_extent += 51.0  # the sacrum hangs below S1
        w = q @ model.axes[2] - model.axes[2] @ model.centre
        close = np.nonzero((w <= top_extent + 1.0) & (w >= -bottom_extent - 1.0))[0]
        if not len(close):
            return
        w = w[close]
        qc = q[close]
        u = qc @ model.axes[0] - model.axes[0] @ model.centre
        v = qc @ model.axes[1] - model.axes[1] @ model.centre
        d = level_dimensions(name)
        b, hp0 = model.half_depth, model.hp0
        w_lo, w_hi = -0.30 * hp0, 0.35 * hp0
        canal_front, canal_back = -b, -b - 2.0 * d.canal_half_depth_mm
        ped_in, ped_out = d.canal_half_width_mm, d.canal_half_width_mm + d.pedicle_width_mm
        in_w = (w >= w_lo) & (w <= w_hi)
        pedicles = in_w & (np.abs(u) >= ped_in) & (np.abs(u) <= ped_out) & (v <= canal_front + 1.0) & (v >= canal_back)
        lamina = in_w & (np.abs(u) <= ped_out) & (v < canal_back) & (v >= canal_back - d.lamina_thickness_mm)
        spinous = ((w >= -0.35 * hp0) & (w <= 0.25 * hp0) & (np.abs(u) <= 3.0)
                   & (v < canal_back - d.lamina_thickness_mm)
                   & (v >= canal_back - d.lamina_thickness_mm - d.spinous_length_mm))
        transverse_v = -b - d.canal_half_depth_mm
        transverse = ((np.abs(w) <= 0.15 * hp0) & (np.abs(u) > ped_out)
                      & (np.abs(u) <= ped_out + d.transverse_length_mm) & (np.abs(v - transverse_v) <= 4.0))
        posterior = pedicles | lamina | spinous | transverse
        if name == "S1":
            posterior = pedicles | lamina  # the sacrum's dorsal parts are not modelled in detail
        put(close[posterior], spec.posterior_hu, t["posterior_bone"], total_id, 0, verse_id)
        top, bottom = model.endplates(u, v)
        a = model.half_width
        ellipse = (u / a) ** 2 + (v / b) ** 2
        body = (ellipse <= 1.0) & (w <= top) & (w >= bottom)
        c = spec.cortex_mm
        core = body & ((u / (a - c)) ** 2 + (v / (b - c)) ** 2 <= 1.0) & (w <= top - c) & (w >= bottom + c)
        put(close[body & ~core], spec.cortical_hu, t["cortical_bone"], total_id, lv.BODY_LABEL, verse_id)
        put(close[core], spec.trabecular_hu_of(name), t["trabecular_bone"], total_id, lv.BODY_LABEL, verse_id)
        if name == "S1":
            below = (np.abs(u) <= a + 15.0) & (np.abs(v) <= b) & (w < bottom) & (w >= bottom - 50.0)
            put(close[below], spec.sacrum_hu, t["sacrum"], lv.TOTAL_SACRUM, 0, VERSE_SACRUM)

    def _box_near(self, centre, radius) -> bool:
        """Whether a sphere can touch the bounding box of the points being painted."""
        lo, hi = self._q_box
        gap = np.maximum(0.0, np.maximum(lo - centre, centre - hi))
        return float(gap @ gap) <= radius * radius

    def _disc(self, q, upper, lower):
        mu, ml = self.models[upper], self.models[lower]
        s_mid = self.disc_mid_s[(upper, lower)]
        c, e_lr, e_ap, e_cc = self.curve.frame(s_mid)
        if not self._box_near(c, 80.0):
            return np.zeros(len(q), dtype=bool)
        d = q - c
        w_mid = d @ e_cc
        close = np.nonzero(np.abs(w_mid) <= 25.0)[0]
        mask = np.zeros(len(q), dtype=bool)
        if not len(close):
            return mask
        dc = d[close]
        a = 0.5 * (mu.half_width + ml.half_width)
        b = 0.5 * (mu.half_depth + ml.half_depth)
        in_ellipse = ((dc @ e_lr) / a) ** 2 + ((dc @ e_ap) / b) ** 2 <= 1.0
        ul, vl, wl = ml.local(q[close])
        uu, vu, wu = mu.local(q[close])
        above_lower = wl > ml.endplates(ul, vl)[0]
        below_upper = wu < mu.endplates(uu, vu)[1]
        mask[close] = in_ellipse & above_lower & below_upper
        return mask

    # -- bounding boxes -------------------------------------------------------------------------
    def prepare_bounds(self):
        """Anatomy-frame boxes: of the tubes (to skip far points), of the drawn spine (vertebrae
        and tubes along the drawn stretch) and of the whole body section."""
        def tube_surface(s_lo, s_hi):
            pts = []
            for tube in self.tubes:
                s = np.linspace(max(s_lo, tube.s_range[0]), min(s_hi, tube.s_range[1]), 200)
                for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
                    n_ap = tube.c_ap(s) + tube.r_ap(s) * np.cos(angle)
                    n_lr = tube.c_lr(s) + tube.r_lr(s) * np.sin(angle)
                    pts.append(self.curve.from_tube_coordinates(s, n_ap, n_lr))
            return np.concatenate(pts)

        everywhere = tube_surface(-np.inf, np.inf)
        self._tube_lo, self._tube_hi = everywhere.min(axis=0) - 2.0, everywhere.max(axis=0) + 2.0
        drawn = tube_surface(self.s_low, self.s_high)
        # Every drawn vertebra, posterior elements included, must fit in the field of view.
        corners = [self.curve.sample(np.array([self.s_low, self.s_high]), self.curve.points)]
        for name in self.levels:
            m, d = self.models[name], level_dimensions(name)
            lateral = d.canal_half_width_mm + d.pedicle_width_mm + d.transverse_length_mm
            back = -(m.half_depth + 2 * d.canal_half_depth_mm + d.lamina_thickness_mm + d.spinous_length_mm)
            top, bottom = self.extents[name]
            local = np.array([[u, v, w] for u in (-lateral, lateral) for v in (back, m.half_depth)
                              for w in (-bottom - (50.0 if name == "S1" else 0.0), top)])
            corners.append(m.centre + local @ m.axes)
        corners = np.concatenate(corners)
        z_lo, z_hi = corners[:, 2].min(), corners[:, 2].max()
        lo = np.minimum(corners.min(axis=0), drawn.min(axis=0)) - 3.0
        hi = np.maximum(corners.max(axis=0), drawn.max(axis=0)) + 3.0
        lo[2], hi[2] = z_lo, z_hi
        self.spine_box = (lo, hi)
        y = self.curve.points[:, 1]
        self.body_box = (np.array([-176.0, y.min() + 45.0 - 151.0, z_lo]),
                         np.array([176.0, y.max() + 45.0 + 151.0, z_hi]))

    def _tube_box_contains(self, q):
        return np.all((q >= self._tube_lo) & (q <= self._tube_hi), axis=1)

    def fov_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box the field of view covers: the drawn vertebrae and the tubes along
        the drawn stretch (fov='spine'), or the whole body section over that height ('body')."""
        return self.body_box if self.spec.fov == "body" else self.spine_box


def _in_fat_lattice(q, period, fraction, offset):
    """Spheres of intramuscular fat on a cubic lattice (anatomy frame) filling ``fraction`` of
    space: radius ``r = period · (3 f / 4π)^(1/3)``."""
    radius = period * (3.0 * fraction / (4.0 * np.pi)) ** (1.0 / 3.0)
    d = np.mod(q - offset + 0.5 * period, period) - 0.5 * period
    return np.sum(d * d, axis=1) <= radius * radius


# ------------------------------------------------------------------------------------------------
# Grid and rendering
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Phantom:
    """A rendered phantom. Arrays are ``[k, j, i]``; ``ijk_to_ras`` is the 4x4 grid matrix (mm)."""

    ct: np.ndarray  # int16 HU
    total: np.ndarray  # uint8, TotalSegmentator `total` ids
    vertebrae_body: np.ndarray  # uint8, 1 body, 2 disc
    verse: np.ndarray  # uint8, VerSe ids
    tissue: np.ndarray  # uint8, TISSUES codes
    ijk_to_ras: np.ndarray
    truth: dict


def _grid_directions(orientation: str) -> np.ndarray:
    if orientation == "RAS":
        return np.eye(3)
    if orientation == "LPS":
        return np.diag([-1.0, -1.0, 1.0])
    return rotation_matrix(15.0, -10.0, 0.0)  # oblique grid


def _make_grid(spec: PhantomSpec, scene: SpineScene, anatomy_to_ras: np.ndarray):
    """IJK→RAS matrix and array shape ``(nk, nj, ni)`` covering the field of view."""
    directions = _grid_directions(spec.grid_orientation)
    spacing = np.asarray(spec.spacing, dtype=float)
    lo, hi = scene.fov_box()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ras = corners @ anatomy_to_ras[:3, :3].T + anatomy_to_ras[:3, 3]
    along = ras @ directions  # coordinates along the grid axes (mm)
    a_lo, a_hi = along.min(axis=0), along.max(axis=0)
    if spec.size_ijk is None:
        size = np.maximum(np.round((a_hi - a_lo) / spacing).astype(int) + 1, 1)
        start = 0.5 * (a_lo + a_hi) - 0.5 * (size - 1) * spacing
    else:
        size = np.asarray(spec.size_ijk, dtype=int)
        start = 0.5 * (a_lo + a_hi) - 0.5 * (size - 1) * spacing
    origin = directions @ start
    return make_ijk_to_ras(spacing, origin, directions), (int(size[2]), int(size[1]), int(size[0]))


def make_phantom(spec: PhantomSpec = PhantomSpec(), chunk_voxels: int = 400_000) -> Phantom:
    """Render the phantom described by ``spec`` (see the module docstring) with its truth."""
    scene = SpineScene(spec)
    scene.prepare_bounds()
    rotation = rotation_matrix(*spec.rotation_deg)
    anatomy_to_ras = np.eye(4)
    anatomy_to_ras[:3, :3] = rotation
    anatomy_to_ras[:3, 3] = spec.centre_ras
    ijk_to_ras, shape = _make_grid(spec, scene, anatomy_to_ras)
    ras_to_anatomy = np.linalg.inv(anatomy_to_ras)
    ijk_to_anatomy = ras_to_anatomy @ ijk_to_ras
    nk, nj, ni = shape

    # Pass 1: the tissue at every voxel centre gives the label maps and the HU of voxels that
    # lie inside one tissue. Along axes whose spacing exceeds the cortex, a few more samples per
    # voxel of the spine's and muscles' tissues (on the lines through its centre along those
    # axes, closer than the cortex) only look for tissue changes: a plate or a fat pocket thinner
    # than a voxel can lie between two voxel centres, and when the tissues on either side have the
    # same HU (trabecular bone as dense as the disc, an osteoporotic lumbar body) no centre shows
    # a change next to it (a 1 mm endplate between the centres of 3 mm slices was not drawn).
    hu = np.zeros(shape, dtype=np.float32)
    maps = {key: np.zeros(shape, dtype=np.uint8) for key in ("total", "body", "verse", "tissue")}
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    probes = []
    for axis, step in enumerate(spec.spacing):  # along the lines through the centre, axis by axis
        n = int(np.floor(step / spec.cortex_mm)) + 1 if step > spec.cortex_mm else 1
        for offset in (np.arange(n) + 0.5) / n - 0.5 if n > 1 else ():
            probes.append(np.eye(3)[axis] * offset)
    probes = np.array(probes).reshape(-1, 3)
    # Lowest and highest HU seen in each voxel (centre and probes); the CT itself without probes.
    hu_low, hu_high = (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)) if len(probes) else (hu, hu)
    chunk_slices = max(1, chunk_voxels // (nj * ni * (1 + len(probes))))
    for k0 in range(0, nk, chunk_slices):
        k1 = min(nk, k0 + chunk_slices)
        kk = np.arange(k0, k1)
        ijk = np.stack(np.broadcast_arrays(ii[None], jj[None], kk[:, None, None]), axis=-1).reshape(-1, 3)
        painted = scene.paint(ijk @ ijk_to_anatomy[:3, :3].T + ijk_to_anatomy[:3, 3])
        hu[k0:k1] = painted["hu"].reshape(k1 - k0, nj, ni)
        for key in maps:
            maps[key][k0:k1] = painted[key].reshape(k1 - k0, nj, ni)
        if not len(probes):
            continue
        low, high = painted["hu"].copy(), painted["hu"].copy()
        probed_at = np.flatnonzero(~np.isin(painted["tissue"], _UNPROBED_TISSUES))
        if len(probed_at):
            points = (ijk[probed_at, None, :] + probes[None, :, :]).reshape(-1, 3)
            probed = scene.paint(points @ ijk_to_anatomy[:3, :3].T + ijk_to_anatomy[:3, 3])["hu"]
            probed = probed.reshape(len(probed_at), len(probes))
            low[probed_at] = np.minimum(low[probed_at], probed.min(axis=1))
            high[probed_at] = np.maximum(high[probed_at], probed.max(axis=1))
        hu_low[k0:k1], hu_high[k0:k1] = low.reshape(k1 - k0, nj, ni), high.reshape(k1 - k0, nj, ni)

    # Pass 2, partial volume: voxels next to a change of HU (at their centres or probes) are the
    # mean of sub-voxel samples on a regular grid (the centre sample is among them, the counts
    # being odd).
    counts = spec.subsamples_per_axis()
    if max(counts) > 1:
        boundary = ndimage.maximum_filter(hu_high, size=3) != ndimage.minimum_filter(hu_low, size=3)
        kji = np.argwhere(boundary)
        axes = [(np.arange(n) + 0.5) / n - 0.5 for n in counts]
        offsets = np.array(list(itertools.product(*axes)))
        step = max(1, chunk_voxels // len(offsets))
        for start in range(0, len(kji), step):
            block = kji[start:start + step]
            ijk = block[:, ::-1].astype(float)
            points = (ijk[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
            painted = scene.paint(points @ ijk_to_anatomy[:3, :3].T + ijk_to_anatomy[:3, 3])
            mean = painted["hu"].reshape(len(block), len(offsets)).mean(axis=1)
            hu[block[:, 0], block[:, 1], block[:, 2]] = mean

    voxel = np.asarray(spec.spacing, dtype=float)
    if spec.psf_fwhm_mm > 0:
        sigma_kji = (spec.psf_fwhm_mm / 2.3548) / voxel[::-1]
        hu = ndimage.gaussian_filter(hu, sigma=sigma_kji, mode="nearest")
    if spec.noise_hu > 0:
        rng = np.random.default_rng(spec.seed)
        hu += rng.normal(0.0, spec.noise_hu, size=hu.shape).astype(np.float32)
    ct = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    truth = _truth(spec, scene, ijk_to_ras, anatomy_to_ras, shape, maps["total"])
    return Phantom(ct, maps["total"], maps["body"], maps["verse"], maps["tissue"], ijk_to_ras, truth)


# ------------------------------------------------------------------------------------------------
# Truth
# ------------------------------------------------------------------------------------------------


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def _profile_truth(model: VertebraModel) -> dict:
    """The true height profile of a body in its mid-sagittal plane (as
    ``morphometry.VertebraHeights``): heights every 5 % of the depth from 15 to 85 %, the middle
    region's (25–75 %) smallest height and where it lies, and the area between 15 and 85 %."""
    profile = [model.height_at(f) for f in PROFILE_FRACTIONS]
    middle = np.linspace(*MIDDLE_REGION, 501)
    heights = np.array([model.height_at(f) for f in middle])
    span = np.linspace(AP_FRACTIONS["ha"], AP_FRACTIONS["hp"], 701)
    along = np.array([model.height_at(f) for f in span])
    area = (along.sum() - 0.5 * (along[0] + along[-1])) * (span[1] - span[0]) * 2.0 * model.half_depth
    return {"height_profile_mm": profile, "hm_min_mm": float(heights.min()),
            "hm_min_fraction": float(middle[int(np.argmin(heights))]), "sagittal_area_mm2": float(area)}


def _truth(spec, scene: SpineScene, ijk_to_ras, anatomy_to_ras, shape, total_map) -> dict:
    rot, shift = anatomy_to_ras[:3, :3], anatomy_to_ras[:3, 3]
    to_ras = lambda p: (rot @ np.asarray(p) + shift).tolist()  # noqa: E731
    present = set(np.unique(total_map).tolist())
    vertebrae = []
    for name in scene.levels:
        model = scene.models[name]
        total_id = lv.TOTAL_VERTEBRA_IDS[name]
        if total_id not in present:
            continue
        complete = not _touches_border(total_map == total_id)
        heights = {key: model.height_at(f) for key, f in AP_FRACTIONS.items()}
        normal = VertebraModel(name, model.s, model.half_width, model.half_depth, model.ha0, model.hp0, None)
        normal_heights = {key: normal.height_at(f) for key, f in AP_FRACTIONS.items()}
        loss = model.fracture.fraction if model.fracture else 0.0
        points = {}
        for key, f in AP_FRACTIONS.items():
            v = model.half_depth - 2.0 * model.half_depth * f
            top, bottom = model.endplates(0.0, v)
            points[key] = [to_ras(model.centre + model.axes.T @ [0.0, v, float(top)]),
                           to_ras(model.centre + model.axes.T @ [0.0, v, float(bottom)])]
        vertebrae.append({
            "level": name,
            "total_id": total_id,
            "verse_id": lv.VERSE_VERTEBRA_IDS.get(name, VERSE_SACRUM),
            "complete": complete,
            "ha_mm": heights["ha"], "hm_mm": heights["hm"], "hp_mm": heights["hp"],
            "ha_hp": heights["ha"] / heights["hp"], "hm_hp": heights["hm"] / heights["hp"],
            "normal_ha_mm": normal_heights["ha"], "normal_hm_mm": normal_heights["hm"],
            "normal_hp_mm": normal_heights["hp"],
            "fracture": None if model.fracture is None else {"shape": model.fracture.shape,
                                                             "fraction": model.fracture.fraction},
            "height_loss": loss,
            "genant_grade": genant_grade(loss),
            "shape": model.fracture.shape if model.fracture and genant_grade(loss) > 0 else "normal",
            "borderline": is_borderline(loss),
            "trabecular_hu": spec.trabecular_hu_of(name),
            "cortical_hu": spec.cortical_hu,
            "body_volume_ml": model.volume_mm3() / 1000.0,
            "body_width_mm": 2 * model.half_width,
            "body_depth_mm": 2 * model.half_depth,
            "centre_ras": to_ras(model.centre),
            "axes_ras": {"lr": (rot @ model.axes[0]).tolist(), "ap": (rot @ model.axes[1]).tolist(),
                         "cc": (rot @ model.axes[2]).tolist()},
            "height_points_ras": points,
            **_profile_truth(model),
        })
    muscles = _muscle_truth(spec, scene, ijk_to_ras, anatomy_to_ras, shape)
    return {
        "software": {"name": "VertebralFractureScreen phantom", "version": __version__},
        "spec": spec.to_json(),
        "definitions": {
            "heights": "endplate distance along the vertebra's cranio-caudal axis in its mid-sagittal plane, "
                       "at 15/50/85 % of the body depth from the anterior wall (mm)",
            "height_loss": "fracture fraction relative to the vertebra's own normal shape",
            "muscle_slab": "between the mid-planes of the discs above and below the level, normal to the spine curve",
            "imat_fraction": "volume fraction of intramuscular fat inside the muscle within the slab",
        },
        "grid": {"shape_kji": list(shape), "ijk_to_ras": np.asarray(ijk_to_ras).tolist()},
        "vertebrae": vertebrae,
        "muscles": muscles,
        "aorta": {"hu": spec.aorta_hu_value, "contrast_enhanced": spec.aorta_hu_value > 150.0,
                  "present": lv.TOTAL_AORTA in present},
        "anatomy_to_ras": np.asarray(anatomy_to_ras).tolist(),
    }


def _muscle_truth(spec, scene: SpineScene, ijk_to_ras, anatomy_to_ras, shape, step: float = 0.5) -> list[dict]:
    """Per muscle and level slab: volume (ml, by the tube's exact volume element), lean HU, fat
    fraction (fine sampling) and the fraction of the slab's volume inside the field of view.

    ``slab_planes_ras`` gives the slab's limits in RAS: the mid-disc planes ``below`` and
    ``above`` (normal to the spine curve), each as a ``point`` on the curve and a unit ``normal``
    pointing cranially; the slab is where ``(x - below.point) · below.normal >= 0`` and
    ``(x - above.point) · above.normal <= 0`` (near the spine)."""
    rot, shift = anatomy_to_ras[:3, :3], anatomy_to_ras[:3, 3]

    def plane(s_value: float) -> dict:
        c, _, _, e_cc = scene.curve.frame(s_value)
        return {"point": (rot @ c + shift).tolist(), "normal": (rot @ e_cc).tolist()}

    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    anatomy_to_ijk = ras_to_ijk @ anatomy_to_ras
    nk, nj, ni = shape
    rows = []
    lumbar: dict[str, list[float]] = {}
    for name in scene.levels:
        if name == "S1":
            continue
        s_lo, s_hi = scene._slab_limits(name)
        s = np.arange(s_lo + step / 2, s_hi, step)
        for tube in scene.tubes:
            if tube.total_label not in (lv.TOTAL_AUTOCHTHON_LEFT, lv.TOTAL_AUTOCHTHON_RIGHT,
                                        lv.TOTAL_ILIOPSOAS_LEFT, lv.TOTAL_ILIOPSOAS_RIGHT):
                continue
            ss = s[(s >= tube.s_range[0]) & (s <= tube.s_range[1])]
            if not len(ss):
                continue
            # Exact volume: the volume element is linear in the offsets, so its mean over the
            # ellipse is its value at the centre; area = π r_ap r_lr.
            area = np.pi * tube.r_ap(ss) * tube.r_lr(ss)
            jac = scene.curve.tube_volume_element(ss, tube.c_ap(ss), tube.c_lr(ss))
            volume = float(np.sum(area * jac) * step)
            # Fat fraction and FOV share by sampling the cross-sections.
            grid = np.arange(-1.0 + step / 40, 1.0, step / 20.0)
            gu, gv = np.meshgrid(grid, grid)
            disk = gu**2 + gv**2 <= 1.0
            gu, gv = gu[disk], gv[disk]
            fat_w = total_w = fov_w = 0.0
            for s_value in ss[:: max(1, int(round(1.0 / step)))]:  # one cross-section per mm
                sv = np.full(len(gu), s_value)
                n_ap = tube.c_ap(sv) + tube.r_ap(sv) * gu
                n_lr = tube.c_lr(sv) + tube.r_lr(sv) * gv
                q = scene.curve.from_tube_coordinates(sv, n_ap, n_lr)
                weight = scene.curve.tube_volume_element(sv, n_ap, n_lr)
                fat = _in_fat_lattice(q, spec.imat_period_mm, tube.fat_fraction, tube.lattice_offset)
                ijk = q @ anatomy_to_ijk[:3, :3].T + anatomy_to_ijk[:3, 3]
                inside = np.all((ijk > -0.5) & (ijk < np.array([ni, nj, nk]) - 0.5), axis=1)
                total_w += weight.sum()
                fat_w += weight[fat].sum() if tube.fat_fraction > 0 else 0.0
                fov_w += weight[inside].sum()
            fraction = fat_w / total_w if tube.fat_fraction > 0 else 0.0
            in_fov = fov_w / total_w
            rows.append({"muscle": tube.name, "level": name, "volume_ml": volume / 1000.0,
                         "lean_hu": spec.muscle_hu, "fat_hu": spec.fat_hu, "imat_fraction": fraction,
                         "fov_fraction": in_fov, "slab_mm": [s_lo, s_hi],
                         "slab_planes_ras": {"below": plane(s_lo), "above": plane(s_hi)}})
            if name in lv.LUMBAR_LEVELS:
                lumbar.setdefault(tube.name, []).append((volume / 1000.0, fraction, in_fov, name))
    for muscle, parts in lumbar.items():
        if {p[3] for p in parts} != set(lv.LUMBAR_LEVELS):
            continue
        vol = sum(p[0] for p in parts)
        rows.append({"muscle": muscle, "level": "lumbar", "volume_ml": vol, "lean_hu": spec.muscle_hu,
                     "fat_hu": spec.fat_hu, "imat_fraction": sum(p[0] * p[1] for p in parts) / vol,
                     "fov_fraction": sum(p[0] * p[2] for p in parts) / vol,
                     "slab_mm": [scene._slab_limits("L5")[0], scene._slab_limits("L1")[1]],
                     "slab_planes_ras": {"below": plane(scene._slab_limits("L5")[0]),
                                         "above": plane(scene._slab_limits("L1")[1])}})
    return rows


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_phantom(spec: PhantomSpec, out_dir, file_format: str = "nii.gz") -> dict[str, Path]:
    """Render ``spec`` and write ``ct``, ``total``, ``vertebrae_body``, ``verse`` and ``tissue``
    images (``.nii.gz`` or ``.nrrd``) and ``truth.json`` into ``out_dir``. ``truth.json`` is
    written last, so its presence means the phantom is complete. Returns the written paths."""
    from .imageio import Volume, write_volume  # local: keeps the phantom maths free of file I/O

    if file_format not in ("nii.gz", "nii", "nrrd"):
        raise ValueError("file format must be nii.gz, nii or nrrd")
    phantom = make_phantom(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    arrays = {"ct": phantom.ct, "total": phantom.total, "vertebrae_body": phantom.vertebrae_body,
              "verse": phantom.verse, "tissue": phantom.tissue}
    for key, array in arrays.items():
        path = out / f"{key}.{file_format}"
        write_volume(path, Volume(array, phantom.ijk_to_ras))
        paths[key] = path
    truth_path = out / "truth.json"
    truth = dict(phantom.truth)
    truth["files"] = {key: p.name for key, p in paths.items()}
    tmp = truth_path.with_name(f".{truth_path.name}.tmp")
    tmp.write_text(json.dumps(truth, indent=2))
    os.replace(tmp, truth_path)
    paths["truth"] = truth_path
    return paths
