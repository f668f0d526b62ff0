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
of equal HU. Optional Gaussian point-spread function and Gaussian noise follow. Everything is
computed in the anatomy frame and mapped through the whole-anatomy rotation and the grid's
IJK→RAS matrix, so any spacing, grid orientation and rotation of the anatomy against the voxel
grid is exact.

How the sub-samples are found (the speed of it): each structure is evaluated only on points whose
box it can reach, from the top of the painter's order down, each point by the first structure
that holds it. A voxel's sub-samples are visited coarse to fine (ends and centre of each axis,
then the midpoints between, …): a sample whose coarser neighbours all have the same tissue and
label takes theirs unpainted, except where a thin or sharp part can hide between them (samples of
the cortex, the first refinement next to bone and discs, and the fat spheres in muscle, which are
tested exactly), so mostly the samples next to a change are painted. This gives the mean of all
sub-samples except for slivers thinner than the coarse spacing that no coarse sample reaches
(against painting every sample, a few voxels per phantom differ, by a few HU; see
docs/validation.md). The grid is rendered in boxes of about 32 mm on :func:`default_workers`
threads; the image does not depend on their number.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import __version__, levels as lv
from ..geometry import make_ijk_to_ras, rotation_matrix
from ..measure.grading import genant_grade, is_borderline
from ..measure.morphometry import AP_FRACTIONS, MIDDLE_REGION, PROFILE_FRACTIONS  # where the truth is given, as measured
from .anatomy import SpineCurve, level_dimensions, layout_levels

FRACTURE_SHAPES = ("wedge", "biconcave", "crush")

# Tissue codes of the phantom's tissue map (written as tissue.nii.gz).
TISSUES = {
    "air": 0, "subcutaneous_fat": 1, "soft_tissue": 2, "muscle": 3, "intramuscular_fat": 4,
    "blood": 5, "csf": 6, "spinal_cord": 7, "disc": 8, "posterior_bone": 9,
    "cortical_bone": 10, "trabecular_bone": 11, "sacrum": 12,
}

_HINTED_ITERATIONS = 3
"""Newton iterations for a foot point on the spine curve from a hint a few millimetres off (see
:meth:`SpineScene.paint`)."""

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
        return tuple(_dot(q, axis) - offset for axis, offset in zip(self.axes, offsets))


def _in_box(q: np.ndarray, lo, hi) -> np.ndarray:
    """Whether points ``q`` (N, 3) lie in the box ``lo``–``hi`` (closed)."""
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


def _dot(q: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``q @ axis`` for points ``q`` (N, 3), without BLAS (whose threads would compete with the
    renderer's)."""
    return q[:, 0] * axis[0] + q[:, 1] * axis[1] + q[:, 2] * axis[2]


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
        self._reach = None  # set by prepare_bounds

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
    def paint(self, q: np.ndarray, labels_only: bool = False, s_hint: np.ndarray | None = None,
              box: tuple[np.ndarray, np.ndarray] | None = None, hint_iterations: int = _HINTED_ITERATIONS,
              want_s: bool = False) -> dict[str, np.ndarray]:
        """Tissue, HU and labels of anatomy-frame points ``q`` (N, 3), by painter's order:
        envelope, tubes, discs, vertebrae (posterior elements, then body), sacrum.

        ``s_hint`` (N,): arc lengths within a few millimetres of the points' foot points on the
        spine curve (NaN: none), from which ``hint_iterations`` Newton steps find them; ``box``:
        ``(lo, hi)``, a box known to hold the points (default: their bounding box);
        ``want_s``: also return ``"s"``, the foot points' arc lengths (NaN where the points are
        far from every tube).

        The structures are evaluated from the top of that order down, each on the points that no
        structure above it has taken, and only where the box holding all it paints (see
        :meth:`prepare_bounds`) meets the points' bounding box. A point's result does not depend
        on the other points."""
        if self._reach is None:
            self.prepare_bounds()
        spec = self.spec
        q = np.asarray(q, dtype=float)
        n = len(q)
        out = {
            "hu": np.full(n, -1000.0, dtype=np.float32),
            "tissue": np.zeros(n, dtype=np.uint8),
            "total": np.zeros(n, dtype=np.uint8),
            "body": np.zeros(n, dtype=np.uint8),
            "verse": np.zeros(n, dtype=np.uint8),
        }
        if want_s:
            out["s"] = np.full(n, np.nan)
        if not n:
            return out

        def put(index, hu, tissue, total=0, body=0, verse=0):
            out["hu"][index] = hu
            out["tissue"][index] = tissue
            out["total"][index] = total
            out["body"][index] = body
            out["verse"][index] = verse

        t = TISSUES
        lo, hi = (q.min(axis=0), q.max(axis=0)) if box is None else box
        reach = self._reach
        free = np.arange(n)  # points no structure has taken yet
        # Vertebrae, the last drawn first, then the discs between drawn neighbours.
        n_discs = len(reach["discs"])
        meets = _boxes_meet(lo, hi, reach["frames"])
        for name, ok in zip(self.levels[::-1], meets[n_discs:][::-1]):
            if ok and len(free):
                free = self._paint_vertebra(q, free, name, put)
        for (upper, lower), frame, ok in zip(reach["discs"], reach["disc_frames"], meets[:n_discs]):
            if ok and len(free):
                disc = self._disc(q[free], upper, lower, frame)
                put(free[disc], spec.disc_hu, t["disc"], 0, lv.DISC_LABEL, 0)
                free = free[~disc]
        # Tubes, the last made first: one foot-point computation for all of them, on the points
        # in the boxes of the stretches that meet the points' box.
        tubes = []
        for tube, (seg_lo, seg_hi) in zip(self.tubes, reach["tubes"]):
            meets = np.all((seg_lo <= hi) & (seg_hi >= lo), axis=1)
            if meets.any():
                tubes.append((tube, seg_lo[meets].min(axis=0), seg_hi[meets].max(axis=0)))
        if tubes and len(free):
            box_lo = np.maximum(self._tube_lo, np.min([b[1] for b in tubes], axis=0))
            box_hi = np.minimum(self._tube_hi, np.max([b[2] for b in tubes], axis=0))
            near = _in_box(q[free], box_lo, box_hi)
            if near.any():
                index, free = free[near], free[~near]
                qn = q[index]
                s, n_ap, n_lr = self._tube_coordinates(qn, None if s_hint is None else s_hint[index], hint_iterations)
                if want_s:
                    out["s"][index] = s
                left = np.ones(len(index), dtype=bool)
                for tube, tube_lo, tube_hi in tubes[::-1]:
                    sub = np.flatnonzero(left & _in_box(qn, tube_lo, tube_hi))
                    if not len(sub):
                        continue
                    sub = sub[tube.inside(s[sub], n_ap[sub], n_lr[sub])]
                    if not len(sub):
                        continue
                    left[sub] = False
                    idx = index[sub]
                    hu = np.full(len(idx), tube.hu, dtype=np.float32)
                    tissue = np.full(len(idx), tube.tissue, dtype=np.uint8)
                    if tube.fat_fraction > 0:
                        fat = _in_fat_lattice(qn[sub], spec.imat_period_mm, tube.fat_fraction, tube.lattice_offset)
                        hu[fat] = spec.fat_hu
                        tissue[fat] = t["intramuscular_fat"]
                    put(idx, hu, tissue, tube.total_label)
                free = np.concatenate([free, index[left]])
        # Body envelope: ellipse in the transverse plane following the spine's AP position.
        if not len(free):
            return out
        outer, inner = self._envelope_state(lo, hi)
        if inner is False and outer is False:
            return out
        qf = q[free]
        if inner is None or outer is None:
            y_spine = np.interp(qf[:, 2], self.curve.points[:, 2], self.curve.points[:, 1])
        if inner is None:
            inside = ((qf[:, 0] / 160.0) ** 2 + ((qf[:, 1] - y_spine - 45.0) / 135.0) ** 2 <= 1.0)
        else:
            inside = np.full(len(free), inner)
        put(free[inside], spec.soft_tissue_hu, t["soft_tissue"])
        if outer is None:
            ex, ey = qf[:, 0] / 175.0, (qf[:, 1] - y_spine - 45.0) / 150.0
            fat = ~inside & (ex ** 2 + ey ** 2 <= 1.0)
        else:
            fat = ~inside & outer
        put(free[fat], spec.fat_hu, t["subcutaneous_fat"])
        return out

    def _tube_coordinates(self, q, hint, hint_iterations):
        """:meth:`SpineCurve.tube_coordinates` of points ``q``, from the hints where finite."""
        if hint is None:
            return self.curve.tube_coordinates(q)
        hinted = np.isfinite(hint)
        if hinted.all():
            return self.curve.tube_coordinates(q, hint_iterations, hint)
        out = tuple(np.empty(len(q)) for _ in range(3))
        for subset, result in ((hinted, self.curve.tube_coordinates(q[hinted], hint_iterations, hint[hinted])),
                               (~hinted, self.curve.tube_coordinates(q[~hinted]))):
            for array, values in zip(out, result):
                array[subset] = values
        return out

    def _paint_vertebra(self, q, free, name, put) -> np.ndarray:
        """Paint the points ``q[free]`` that vertebra ``name`` holds; returns the others."""
        spec = self.spec
        t = TISSUES
        model = self.models[name]
        total_id = lv.TOTAL_VERTEBRA_IDS[name]
        verse_id = lv.VERSE_VERTEBRA_IDS.get(name, VERSE_SACRUM)
        top_extent, bottom_extent = self._w_extent(name)
        w = _dot(q[free], model.axes[2]) - model.axes[2] @ model.centre
        near = (w <= top_extent + 1.0) & (w >= -bottom_extent - 1.0)
        if not near.any():
            return free
        close = free[near]
        w = w[near]
        qc = q[close]
        u = _dot(qc, model.axes[0]) - model.axes[0] @ model.centre
        v = _dot(qc, model.axes[1]) - model.axes[1] @ model.centre
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
        top, bottom = model.endplates(u, v)
        a = model.half_width
        ellipse = (u / a) ** 2 + (v / b) ** 2
        body = (ellipse <= 1.0) & (w <= top) & (w >= bottom)
        c = spec.cortex_mm
        core = body & ((u / (a - c)) ** 2 + (v / (b - c)) ** 2 <= 1.0) & (w <= top - c) & (w >= bottom + c)
        below = np.zeros(len(close), dtype=bool)
        if name == "S1":
            below = (np.abs(u) <= a + 15.0) & (np.abs(v) <= b) & (w < bottom) & (w >= bottom - 50.0)
        # Within the vertebra, later parts cover earlier ones: sacrum over body over posterior.
        put(close[posterior & ~body & ~below], spec.posterior_hu, t["posterior_bone"], total_id, 0, verse_id)
        put(close[body & ~core & ~below], spec.cortical_hu, t["cortical_bone"], total_id, lv.BODY_LABEL, verse_id)
        put(close[core & ~below], spec.trabecular_hu_of(name), t["trabecular_bone"], total_id, lv.BODY_LABEL, verse_id)
        put(close[below], spec.sacrum_hu, t["sacrum"], lv.TOTAL_SACRUM, 0, VERSE_SACRUM)
        taken = np.zeros(len(free), dtype=bool)
        taken[np.flatnonzero(near)[posterior | body | below]] = True
        return free[~taken]

    def hu_of_keys(self) -> np.ndarray:
        """HU of every ``(tissue << 8) | total`` a point can be painted with (the tissue and the
        ``total`` label fix the HU); other entries are NaN."""
        spec, t = self.spec, TISSUES
        table = np.full(1 << 16, np.nan, dtype=np.float32)

        def set_hu(tissue, total, hu):
            table[(tissue << 8) | total] = hu

        set_hu(t["air"], 0, -1000.0)
        set_hu(t["subcutaneous_fat"], 0, spec.fat_hu)
        set_hu(t["soft_tissue"], 0, spec.soft_tissue_hu)
        for tube in self.tubes:
            set_hu(tube.tissue, tube.total_label, tube.hu)
            if tube.fat_fraction > 0:
                set_hu(t["intramuscular_fat"], tube.total_label, spec.fat_hu)
        set_hu(t["disc"], 0, spec.disc_hu)
        for name in self.levels:
            total_id = lv.TOTAL_VERTEBRA_IDS[name]
            set_hu(t["posterior_bone"], total_id, spec.posterior_hu)
            set_hu(t["cortical_bone"], total_id, spec.cortical_hu)
            set_hu(t["trabecular_bone"], total_id, spec.trabecular_hu_of(name))
        set_hu(t["sacrum"], lv.TOTAL_SACRUM, spec.sacrum_hu)
        return table

    def _w_extent(self, name: str) -> tuple[float, float]:
        """Superior and inferior reach of a vertebra from its centre along its axis (mm)."""
        top_extent, bottom_extent = self.extents[name]
        if name == "S1":
            bottom_extent += 51.0  # the sacrum hangs below S1
        return top_extent, bottom_extent

    def _disc(self, q, upper, lower, frame=None):
        mu, ml = self.models[upper], self.models[lower]
        c, e_lr, e_ap, e_cc = self.curve.frame(self.disc_mid_s[(upper, lower)]) if frame is None else frame
        d = q - c
        w_mid = _dot(d, e_cc)
        close = np.nonzero(np.abs(w_mid) <= 25.0)[0]
        mask = np.zeros(len(q), dtype=bool)
        if not len(close):
            return mask
        dc = d[close]
        a = 0.5 * (mu.half_width + ml.half_width)
        b = 0.5 * (mu.half_depth + ml.half_depth)
        in_ellipse = (_dot(dc, e_lr) / a) ** 2 + (_dot(dc, e_ap) / b) ** 2 <= 1.0
        ul, vl, wl = ml.local(q[close])
        uu, vu, wu = mu.local(q[close])
        above_lower = wl > ml.endplates(ul, vl)[0]
        below_upper = wu < mu.endplates(uu, vu)[1]
        mask[close] = in_ellipse & above_lower & below_upper
        return mask

    def _envelope_state(self, lo, hi) -> tuple[bool | None, bool | None]:
        """Whether the box ``lo``–``hi`` lies wholly inside (True) or wholly outside (False) the
        outer and the inner body ellipse, or None where it may cross one."""
        zs, ys = self.curve.points[:, 2], self.curve.points[:, 1]  # z increases along the curve
        first, last = np.searchsorted(zs, [lo[2], hi[2]], side="right")
        y_spine = np.concatenate([np.interp([lo[2], hi[2]], zs, ys), ys[first:last]])
        x_range = (lo[0], hi[0])
        y_range = (lo[1] - y_spine.max() - 45.0, hi[1] - y_spine.min() - 45.0)
        states = []
        for rx, ry in ((175.0, 150.0), (160.0, 135.0)):
            far = max(x * x for x in x_range) / rx ** 2 + max(y * y for y in y_range) / ry ** 2
            near = (min(max(0.0, x_range[0]), x_range[1]) ** 2 / rx ** 2
                    + min(max(0.0, y_range[0]), y_range[1]) ** 2 / ry ** 2)
            states.append(True if far <= 1.0 - 1e-9 else False if near > 1.0 + 1e-9 else None)
        return states[0], states[1]

    # -- bounding boxes -------------------------------------------------------------------------
    def prepare_bounds(self):
        """Anatomy-frame boxes: of the tubes (to skip far points), of the drawn spine (vertebrae
        and tubes along the drawn stretch) and of the whole body section; and the reach of every
        structure that :meth:`paint` tests before evaluating it: per tube, boxes around ~10 mm
        stretches of it; per disc and vertebra, a box in its own frame holding all it paints."""
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
        self._reach = self._structure_reach()

    def _structure_reach(self) -> dict:
        """Boxes holding everything each tube, disc and vertebra paints (see :meth:`paint`).

        A tube's cross-sections, sampled every 0.5 mm of arc length on 48 points of their rim,
        are boxed per ~10 mm stretch, with 1 mm to spare (far more than the rim moves between
        samples). Discs and vertebrae: boxes in their own frames (u, v, w) from their defining
        inequalities, with 1 µm to spare for rounding."""
        angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        tubes = []
        for tube in self.tubes:
            s0, s1 = tube.s_range
            edges = np.linspace(s0, s1, max(2, int(np.ceil((s1 - s0) / 10.0)) + 1))
            per = max(2, int(np.ceil((edges[1] - edges[0]) / 0.5)) + 1)
            s = np.concatenate([np.linspace(a, b, per) for a, b in zip(edges[:-1], edges[1:])])
            s_rim, angle = np.repeat(s, len(angles)), np.tile(angles, len(s))
            rim = self.curve.from_tube_coordinates(s_rim, tube.c_ap(s_rim) + tube.r_ap(s_rim) * np.cos(angle),
                                                   tube.c_lr(s_rim) + tube.r_lr(s_rim) * np.sin(angle))
            rim = rim.reshape(len(edges) - 1, per * len(angles), 3)
            tubes.append((rim.min(axis=1) - 1.0, rim.max(axis=1) + 1.0))
        discs, disc_frames, frames = [], [], []
        for upper, lower in zip(self.levels[:-1], self.levels[1:]):
            if lv.level_position(lower) - lv.level_position(upper) != 1:
                continue
            mu, ml = self.models[upper], self.models[lower]
            frame = self.curve.frame(self.disc_mid_s[(upper, lower)])
            a, b = 0.5 * (mu.half_width + ml.half_width), 0.5 * (mu.half_depth + ml.half_depth)
            discs.append((upper, lower))
            disc_frames.append(frame)
            frames.append((frame[0], np.stack(frame[1:]), np.array([-a, -b, -25.0]), np.array([a, b, 25.0])))
        for name in self.levels:
            m, d = self.models[name], level_dimensions(name)
            top, bottom = self._w_extent(name)
            ped_out = d.canal_half_width_mm + d.pedicle_width_mm
            lateral = max(ped_out + d.transverse_length_mm, m.half_width + (15.0 if name == "S1" else 0.0), 3.0)
            back = -m.half_depth - 2.0 * d.canal_half_depth_mm - d.lamina_thickness_mm - d.spinous_length_mm
            frames.append((m.centre, m.axes, np.array([-lateral, back, -bottom - 1.0]),
                           np.array([lateral, m.half_depth, top + 1.0])))
        frames = {"centre": np.array([f[0] for f in frames]).reshape(-1, 3),
                  "axes": np.array([f[1] for f in frames]).reshape(-1, 3, 3),
                  "lo": np.array([f[2] for f in frames]).reshape(-1, 3) - 1e-3,
                  "hi": np.array([f[3] for f in frames]).reshape(-1, 3) + 1e-3}
        return {"tubes": tubes, "discs": discs, "disc_frames": disc_frames, "frames": frames}

    def fov_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box the field of view covers: the drawn vertebrae and the tubes along
        the drawn stretch (fov='spine'), or the whole body section over that height ('body')."""
        return self.body_box if self.spec.fov == "body" else self.spine_box


def _boxes_meet(lo, hi, frames: dict) -> np.ndarray:
    """Whether the anatomy-frame box ``lo``–``hi`` can meet each frame's local box: the box's
    corners in every frame (centre, rows of axes) are boxed and compared."""
    if not len(frames["centre"]):
        return np.zeros(0, dtype=bool)
    corners = np.array(list(itertools.product(*zip(lo, hi))))  # (8, 3)
    local = (np.einsum("cj,fkj->fck", corners, frames["axes"])
             - np.einsum("fj,fkj->fk", frames["centre"], frames["axes"])[:, None, :])
    return np.all((local.min(axis=1) <= frames["hi"]) & (local.max(axis=1) >= frames["lo"]), axis=1)


def _in_fat_lattice(q, period, fraction, offset):
    """Spheres of intramuscular fat on a cubic lattice (anatomy frame) filling ``fraction`` of
    space: radius ``r = period · (3 f / 4π)^(1/3)``."""
    radius = period * (3.0 * fraction / (4.0 * np.pi)) ** (1.0 / 3.0)
    d = np.mod(q - offset + 0.5 * period, period) - 0.5 * period
    return d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2] <= radius * radius


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


def _subsample_levels(n: int) -> list[list[int]]:
    """Nested sets of sub-sample indices along one axis (0 … n−1), coarse to fine: the ends and
    the centre (for n ≥ 5; n = 3 starts from the ends alone), then the midpoints of the gaps,
    level by level, until every index is in."""
    sets = [sorted({0, (n - 1) // 2, n - 1}) if n >= 5 else sorted({0, n - 1})]
    while len(sets[-1]) < n:
        current = sets[-1]
        sets.append(sorted(set(current) | {(a + b) // 2 for a, b in zip(current[:-1], current[1:]) if b - a >= 2}))
    return sets


def _refinement_plan(counts: tuple[int, int, int]):
    """The order in which :meth:`_Renderer.supersample` visits a voxel's sub-samples.

    Sub-samples are numbered as ``itertools.product`` of the per-axis indices (i slowest). The
    centre is known from the first pass; the coarsest level is painted; each finer level's new
    samples lie in a cell of the previous level, whose corners decide whether they need painting,
    and so does the centre where it lies in the cell and is not a corner, and in the first
    refinement if the coarsest level lacks it (3 sub-samples along an axis: a sliver through the
    middle of the voxel that no corner reaches is seen at the centre). Returns the coarsest
    samples, the centre and, per finer level: the new samples, their corners (repeated to equal
    length), the cell of the previous level each lies in (an index into the last item) and
    those cells as ``(lowest, highest)`` sub-sample indices along the three axes."""
    per_axis = [_subsample_levels(n) for n in counts]
    depth = max(len(levels) for levels in per_axis)
    sets = [[levels[min(k, len(levels) - 1)] for levels in per_axis] for k in range(depth)]
    centre = tuple((n - 1) // 2 for n in counts)

    def flat(p):
        return (p[0] * counts[1] + p[1]) * counts[2] + p[2]

    first = [flat(p) for p in itertools.product(*sets[0]) if p != centre]
    centre_coarse = all(x in coarse for x, coarse in zip(centre, sets[0]))
    steps = []
    for previous, current in zip(sets[:-1], sets[1:]):
        gaps = [list(zip(prev[:-1], prev[1:])) or [(prev[0], prev[0])] for prev in previous]
        cells = list(itertools.product(*gaps))
        new, corners, cell_of = [], [], []
        for p in itertools.product(*current):
            if p == centre or all(x in prev for x, prev in zip(p, previous)):
                continue
            spans = [(x,) if x in prev else (prev[bisect.bisect(prev, x) - 1], prev[bisect.bisect(prev, x)])
                     for x, prev in zip(p, previous)]
            cell = [flat(c) for c in itertools.product(*spans)]
            if flat(centre) not in cell and (not steps and not centre_coarse
                                             or all(span[0] <= x <= span[-1] for x, span in zip(centre, spans))):
                cell.append(flat(centre))
            new.append(flat(p))
            corners.append(cell)
            cell_of.append(cells.index(tuple(next(g for g in axis_gaps if g[0] <= x <= g[1])
                                             for x, axis_gaps in zip(p, gaps))))
        width = max(len(c) for c in corners)
        steps.append((np.array(new, dtype=np.intp),
                      np.array([c + [c[0]] * (width - len(c)) for c in corners], dtype=np.intp),
                      np.array(cell_of, dtype=np.intp),
                      np.array([[g[0] for g in c] + [g[1] for g in c] for c in cells], dtype=np.intp)))
    return np.array(first, dtype=np.intp), flat(centre), steps


def _key(tissue, total) -> np.ndarray:
    """One integer per sample for its tissue and ``total`` label, which also fix its HU (see
    :meth:`SpineScene.hu_of_keys`): two samples agree when their keys are equal."""
    return (np.asarray(tissue, dtype=np.uint16) << np.uint16(8)) | np.asarray(total, dtype=np.uint16)


_SHARP_TISSUES = tuple(TISSUES[name] for name in
                       ("posterior_bone", "cortical_bone", "trabecular_bone", "disc", "sacrum"))
"""Tissues of structures with edges and corners (boxes, rims of bodies and discs)."""

_ALWAYS_PAINTED = TISSUES["cortical_bone"]
"""Tissue whose cells are painted sample by sample even when all their corners agree: the
cortex is about as thin as a cell, so a corner of the trabecular core or an edge of the shell
can reach into a cell without reaching a corner."""


class _Renderer:
    """Both passes of :func:`make_phantom` over parts of the grid that can run in any order (and
    in threads): each part's result depends on its own voxels only."""

    def __init__(self, spec: PhantomSpec, scene: SpineScene, ijk_to_anatomy: np.ndarray, shape):
        self.spec, self.scene, self.shape = spec, scene, shape
        self.matrix, self.shift = ijk_to_anatomy[:3, :3].T.copy(), ijk_to_anatomy[:3, 3].copy()
        probes = []
        for axis, step in enumerate(spec.spacing):  # along the lines through the centre, axis by axis
            n = int(np.floor(step / spec.cortex_mm)) + 1 if step > spec.cortex_mm else 1
            for offset in (np.arange(n) + 0.5) / n - 0.5 if n > 1 else ():
                probes.append(np.eye(3)[axis] * offset)
        self.probes = np.array(probes).reshape(-1, 3) @ self.matrix  # anatomy-frame offsets
        self.probed = np.ones(256, dtype=bool)
        self.probed[list(_UNPROBED_TISSUES)] = False
        self.counts = spec.subsamples_per_axis()
        axes = [(np.arange(n) + 0.5) / n - 0.5 for n in self.counts]
        self.offsets = np.array(list(itertools.product(*axes))) @ self.matrix  # anatomy-frame offsets
        self.plan = _refinement_plan(self.counts)
        # Per finer level, the cells' centres as anatomy-frame offsets from the voxel centre, and
        # their half-diagonals (mm).
        self.cells = []
        for *_, boxes in self.plan[2]:
            lo, hi = (np.array([(boxes[:, a + shift] + 0.5) / n - 0.5 for a, n in enumerate(self.counts)]).T
                      for shift in (0, 3))
            self.cells.append(((0.5 * (lo + hi)) @ self.matrix,
                               np.linalg.norm(0.5 * (hi - lo) * np.asarray(spec.spacing), axis=1)))
        self.fat_tubes = {tube.total_label: tube for tube in scene.tubes if tube.fat_fraction > 0}
        self.fat_key = {label: _key(TISSUES["intramuscular_fat"], label) for label in self.fat_tubes}
        self.hu_of = scene.hu_of_keys()

    def box(self, ijk_lo, ijk_hi, reach: float) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box holding the voxel centres ``ijk_lo``–``ijk_hi`` (i, j, k) and every
        point within ``reach`` voxels of them along the grid axes."""
        corners = np.array(list(itertools.product(*zip(np.asarray(ijk_lo) - reach, np.asarray(ijk_hi) + reach))))
        q = corners @ self.matrix + self.shift
        return q.min(axis=0) - 1e-6, q.max(axis=0) + 1e-6

    def centres(self, box) -> tuple:
        """Pass 1 over a box of voxels ``((k0, k1), (j0, j1), (i0, i1))``: the tissue and labels
        at the centres, and the lowest and highest HU at the centre and the probes."""
        (k0, k1), (j0, j1), (i0, i1) = box
        m = self.matrix
        q = ((self.shift + np.arange(k0, k1)[:, None] * m[2])[:, None, None, :]
             + (np.arange(j0, j1)[:, None] * m[1])[None, :, None, :]
             + (np.arange(i0, i1)[:, None] * m[0])[None, None, :, :]).reshape(-1, 3)
        lo, hi = (i0, j0, k0), (i1 - 1, j1 - 1, k1 - 1)
        painted = self.scene.paint(q, box=self.box(lo, hi, 0.0), want_s=len(self.probes) > 0)
        low = high = painted["hu"]
        if len(self.probes):
            low, high = painted["hu"].copy(), painted["hu"].copy()
            probed_at = np.flatnonzero(self.probed[painted["tissue"]])
            if len(probed_at):
                points = (q[probed_at, None, :] + self.probes[None, :, :]).reshape(-1, 3)
                hint = np.repeat(painted["s"][probed_at], len(self.probes))
                probed = self.scene.paint(points, box=self.box(lo, hi, 0.5), s_hint=hint)["hu"]
                probed = probed.reshape(len(probed_at), len(self.probes))
                low[probed_at] = np.minimum(low[probed_at], probed.min(axis=1))
                high[probed_at] = np.maximum(high[probed_at], probed.max(axis=1))
        return box, painted, low, high

    def supersample(self, kji: np.ndarray, centre_key: np.ndarray, near_bone: np.ndarray) -> np.ndarray:
        """Pass 2, the mean HU of the sub-samples of voxels ``kji`` (M, 3), coarse to fine.

        A sub-sample whose cell corners all agree (same tissue and label, hence HU) takes their
        value without being painted, except in the cortex (:data:`_ALWAYS_PAINTED`); in muscle,
        such a sample is still tested against the fat lattice (a fat sphere can bulge into a cell
        between its corners). Otherwise it is painted. In voxels ``near_bone`` (M,), next to
        the edges and corners of bone and discs, which can reach into a cell without reaching a
        corner, the first refinement is painted whole."""
        first, centre, steps = self.plan
        m = len(kji)
        ijk = kji[:, ::-1]
        box = self.box(ijk.min(axis=0), ijk.max(axis=0), 0.5)
        key = np.zeros((m, len(self.offsets)), dtype=np.uint16)
        key[:, centre] = centre_key
        centres_q = ijk @ self.matrix + self.shift
        # The foot points of the voxel centres on the spine curve, and the curve there: a Newton
        # step from them is the hint of every sample of the voxel (two more steps finish it).
        curve = self.scene.curve
        centre_s = curve.tube_coordinates(centres_q)[0]
        at_centre = curve.local_frame(centre_s)

        def paint(voxel, sample):
            q = centres_q[voxel] + self.offsets[sample]
            hint = curve.newton_step(q[:, 0], q[:, 1], q[:, 2], centre_s[voxel],
                                    at_centre[0][:, voxel], at_centre[1][:, voxel])
            painted = self.scene.paint(q, s_hint=hint, box=box, hint_iterations=_HINTED_ITERATIONS - 1)
            keys = _key(painted["tissue"], painted["total"])
            if not np.array_equal(self.hu_of[keys], painted["hu"]):
                raise RuntimeError("phantom: a sample's HU is not the one of its tissue and label")
            key[voxel, sample] = keys

        paint(np.repeat(np.arange(m), len(first)), np.tile(first, m))
        for level, ((new, corners, cell_of, _), cells) in enumerate(zip(steps, self.cells)):
            value = key[:, corners[:, 0]]
            agree = np.ones(value.shape, dtype=bool)
            for c in range(1, corners.shape[1]):
                agree &= key[:, corners[:, c]] == value
            if level == 0:
                agree &= ~near_bone[:, None]
            key[:, new] = value
            tissue = value >> np.uint16(8)
            voxel, sample = np.nonzero(~agree | (tissue == _ALWAYS_PAINTED))
            if len(voxel):
                paint(voxel, new[sample])
            if self.fat_tubes:
                voxel, sample = np.nonzero(agree & (tissue == TISSUES["muscle"]))
                if len(voxel):
                    self._fat(voxel, new[sample], cell_of[sample], cells, key, centres_q)
        return self.hu_of[key].mean(axis=1)

    def _fat(self, voxel, sample, cell, cells, key, centres_q):
        """Samples of muscle between agreeing corners: those in a fat sphere become fat. Only
        the samples in cells that a sphere of the lattice can reach are tested: the sphere
        nearest to the cell's centre (no other can reach the cell while the spheres and cells
        are small against the lattice's period)."""
        period = self.spec.imat_period_mm
        label = key[voxel, sample] & np.uint16(255)
        offsets, radii = cells
        for total_label, tube in self.fat_tubes.items():
            mine = np.flatnonzero(label == total_label)
            if not len(mine):
                continue
            radius = period * (3.0 * tube.fat_fraction / (4.0 * np.pi)) ** (1.0 / 3.0)
            if radius + radii.max() < 0.5 * period - 1e-6:
                row = np.zeros(len(centres_q), dtype=np.intp)
                row[voxel[mine]] = 1
                voxels = np.flatnonzero(row)
                row[voxels] = np.arange(len(voxels))
                q = centres_q[voxels][:, None, :] + offsets[None, :, :]
                d = np.mod(q - tube.lattice_offset + 0.5 * period, period) - 0.5 * period
                reach = (d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2) <= (radius + radii + 1e-6) ** 2
                mine = mine[reach[row[voxel[mine]], cell[mine]]]
                if not len(mine):
                    continue
            v, p = voxel[mine], sample[mine]
            fat = _in_fat_lattice(centres_q[v] + self.offsets[p], period, tube.fat_fraction, tube.lattice_offset)
            key[v[fat], p[fat]] = self.fat_key[total_label]


def _brick(spacing) -> np.ndarray:
    """Voxels per axis (k, j, i) of the boxes the grid is rendered in: about 32 mm, 8 to 32 voxels."""
    return np.clip(np.round(32.0 / np.asarray(spacing, dtype=float)), 8, 32).astype(np.intp)[::-1]


def _map(function, tasks, workers: int):
    """``map`` in a pool of threads (numpy releases the GIL in its loops) or, for one worker,
    in this thread. Results come in the order of ``tasks``, with at most a few per thread
    waiting to be taken."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(function, task))
                if len(pending) >= 3 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def default_workers() -> int:
    """Threads :func:`make_phantom` renders in: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def make_phantom(spec: PhantomSpec = PhantomSpec(), chunk_voxels: int = 400_000, workers: int | None = None) -> Phantom:
    """Render the phantom described by ``spec`` (see the module docstring) with its truth.

    ``chunk_voxels`` bounds the sub-samples handled at once; ``workers`` is the number of
    threads (default :func:`default_workers`). The image does not depend on either."""
    scene = SpineScene(spec)
    scene.prepare_bounds()
    rotation = rotation_matrix(*spec.rotation_deg)
    anatomy_to_ras = np.eye(4)
    anatomy_to_ras[:3, :3] = rotation
    anatomy_to_ras[:3, 3] = spec.centre_ras
    ijk_to_ras, shape = _make_grid(spec, scene, anatomy_to_ras)
    ras_to_anatomy = np.linalg.inv(anatomy_to_ras)
    ijk_to_anatomy = ras_to_anatomy @ ijk_to_ras
    workers = default_workers() if workers is None else max(1, int(workers))
    renderer = _Renderer(spec, scene, ijk_to_anatomy, shape)

    # Pass 1: the tissue at every voxel centre gives the label maps and the HU of voxels that
    # lie inside one tissue. Along axes whose spacing exceeds the cortex, a few more samples per
    # voxel of the spine's and muscles' tissues (on the lines through its centre along those
    # axes, closer than the cortex) only look for tissue changes: a plate or a fat pocket thinner
    # than a voxel can lie between two voxel centres, and when the tissues on either side have the
    # same HU (trabecular bone as dense as the disc, an osteoporotic lumbar body) no centre shows
    # a change next to it (a 1 mm endplate between the centres of 3 mm slices was not drawn).
    # The grid is painted in boxes of about 32 mm, each of which evaluates only the structures
    # that reach it.
    hu = np.zeros(shape, dtype=np.float32)
    maps = {key: np.zeros(shape, dtype=np.uint8) for key in ("total", "body", "verse", "tissue")}
    probed = len(renderer.probes) > 0
    hu_low, hu_high = (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)) if probed else (hu, hu)
    brick = _brick(spec.spacing)
    boxes = [tuple((int(start), int(min(start + step, size))) for start, step, size in zip(corner, brick, shape))
             for corner in itertools.product(*(range(0, size, step) for size, step in zip(shape, brick)))]
    for box, painted, low, high in _map(renderer.centres, boxes, workers):
        where = tuple(slice(*span) for span in box)
        box_shape = tuple(b - a for a, b in box)
        hu[where] = painted["hu"].reshape(box_shape)
        for key in maps:
            maps[key][where] = painted[key].reshape(box_shape)
        if probed:
            hu_low[where], hu_high[where] = low.reshape(box_shape), high.reshape(box_shape)

    # Pass 2, partial volume: voxels next to a change of HU (at their centres or probes) are the
    # mean of sub-voxel samples on a regular grid (the centre sample is among them, the counts
    # being odd). The samples are visited coarse to fine (see _Renderer.supersample): a sample
    # between coarser ones that agree takes their value, so mostly those near a change are
    # painted.
    if max(renderer.counts) > 1:
        boundary = ndimage.maximum_filter(hu_high, size=3) != ndimage.minimum_filter(hu_low, size=3)
        del hu_low, hu_high  # (where probed, two more grids of float32)
        kji = np.argwhere(boundary)
        del boundary
        # The voxels box by box (the boxes of pass 1), each box in tasks of chunk_voxels samples.
        brick_of = kji // brick
        n_bricks = -(-np.asarray(shape, dtype=np.intp) // brick)
        brick_id = (brick_of[:, 0] * n_bricks[1] + brick_of[:, 1]) * n_bricks[2] + brick_of[:, 2]
        del brick_of
        order = np.argsort(brick_id, kind="stable")
        kji, brick_id = kji[order], brick_id[order]
        centre_key = _key(maps["tissue"][tuple(kji.T)], maps["total"][tuple(kji.T)])
        sharp = np.zeros(256, dtype=bool)
        sharp[list(_SHARP_TISSUES)] = True
        near_bone = ndimage.maximum_filter(sharp[maps["tissue"]], size=3)[tuple(kji.T)]
        per_task = max(1, chunk_voxels // len(renderer.offsets))
        starts = np.flatnonzero(np.r_[True, brick_id[1:] != brick_id[:-1]])
        tasks = []
        for start, stop in zip(starts, np.r_[starts[1:], len(kji)]):
            tasks.extend((a, min(a + per_task, stop)) for a in range(int(start), int(stop), per_task))

        def supersample(task):
            a, b = task
            return task, renderer.supersample(kji[a:b], centre_key[a:b], near_bone[a:b])

        for (a, b), mean in _map(supersample, tasks, workers):
            block = kji[a:b]
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
            curve = scene.curve
            for s_value in ss[:: max(1, int(round(1.0 / step)))]:  # one cross-section per mm
                # (curve.from_tube_coordinates and curve.tube_volume_element at one arc length,
                # their per-point arithmetic unchanged)
                sv = np.array([s_value])
                n_ap = tube.c_ap(sv) + tube.r_ap(sv) * gu
                n_lr = tube.c_lr(sv) + tube.r_lr(sv) * gv
                e_ap, e_lr = curve.sample(sv, curve.e_ap), curve.sample(sv, curve.e_lr)
                q = curve.sample(sv, curve.points) + n_ap[:, None] * e_ap + n_lr[:, None] * e_lr
                dt = curve.sample(sv, curve.dtangent)
                weight = (1.0 - n_ap * np.einsum("ij,ij->i", dt, e_ap)
                          - n_lr * np.einsum("ij,ij->i", dt, e_lr))
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
    from ..io.volume import Volume
    from ..io.images import write_volume

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
