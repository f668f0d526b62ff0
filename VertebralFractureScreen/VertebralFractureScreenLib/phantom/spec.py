"""What defines a phantom: its :class:`PhantomSpec` (levels, pose, grid, fractures, intensities)
and the codes its maps are written with.

Lengths are in mm, angles in degrees, intensities in HU. :meth:`PhantomSpec.tissue_hu` is the one
place that says which HU each tissue of :data:`TISSUES` gets; the scene paints tissues and labels
and takes their HU from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import levels as lv

FRACTURE_SHAPES = ("wedge", "biconcave", "crush")

# Tissue codes of the phantom's tissue map (written as tissue.nii.gz).
TISSUES = {
    "air": 0, "subcutaneous_fat": 1, "soft_tissue": 2, "muscle": 3, "intramuscular_fat": 4,
    "blood": 5, "csf": 6, "spinal_cord": 7, "disc": 8, "posterior_bone": 9,
    "cortical_bone": 10, "trabecular_bone": 11, "sacrum": 12,
}

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
        the cortex (``cortex_mm``) a whole number of sub-samples, so that a thin plate parallel to
        the slices is drawn with its exact thickness (with 7 sub-samples per 3 mm slice a 1 mm
        endplate would be drawn 0.86 mm thick, 14 % too faint, which a partial-volume endplate fit
        reads as a position error of about 1 mm; 3 mm slices get 9)."""
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

    def tissue_hu(self, tissue: int, level: str | None = None) -> float:
        """HU of a tissue (a :data:`TISSUES` code) in this phantom; trabecular bone's depends on
        the ``level`` (:meth:`trabecular_hu_of`). Every other tissue has one HU everywhere, so a
        sample's tissue and ``total`` label fix its HU (what the partial-volume pass relies on)."""
        t = TISSUES
        if tissue == t["trabecular_bone"]:
            return self.trabecular_hu_of(level)
        return {
            t["air"]: -1000.0, t["subcutaneous_fat"]: self.fat_hu, t["soft_tissue"]: self.soft_tissue_hu,
            t["muscle"]: self.muscle_hu, t["intramuscular_fat"]: self.fat_hu, t["blood"]: self.aorta_hu_value,
            t["csf"]: self.csf_hu, t["spinal_cord"]: self.cord_hu, t["disc"]: self.disc_hu,
            t["posterior_bone"]: self.posterior_hu, t["cortical_bone"]: self.cortical_hu,
            t["sacrum"]: self.sacrum_hu,
        }[tissue]

    def to_json(self) -> dict:
        d = asdict(self)
        d["fractures"] = [f"{f.level}:{f.shape}:{f.fraction}" for f in self.fractures]
        return d
