"""What defines a phantom: its :class:`PhantomSpec` (levels, pose, grid, fractures, intensities,
and the optional cases: ribs, lesions, hardware, a lumbosacral transition, a contrast phase with
its vessels and kidneys) and the codes its maps are written with.

Lengths are in mm, angles in degrees, intensities in HU. :meth:`PhantomSpec.tissue_hu` is the one
place that says which HU each tissue of :data:`TISSUES` gets; the scene paints tissues and labels
and takes their HU from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import levels as lv
from ..measure.attenuation import PHASE_BONE_OFFSETS_HU
from ..measure.phase import PHASES

FRACTURE_SHAPES = ("wedge", "biconcave", "crush")
LESION_KINDS = ("sclerotic", "lytic")
HARDWARE_KINDS = ("cement", "screws")
RIB_PAIRS = (0, 11, 12, 13)
LUMBAR_COUNTS = (4, 5, 6)

CEMENT_HU = 2500.0
"""PMMA bone cement (with its barium or zirconia opacifier) of a vertebroplasty."""
TITANIUM_HU = 8000.0
"""Titanium on an extended HU scale: far above the 12-bit CT's 3071, to which the scanner clips it
(:func:`.raster._scanner_ct`), so a voxel half filled with screw still reads 3071."""

# Tissue codes of the phantom's tissue map (written as tissue.nii.gz).
TISSUES = {
    "air": 0, "subcutaneous_fat": 1, "soft_tissue": 2, "muscle": 3, "intramuscular_fat": 4,
    "blood": 5, "csf": 6, "spinal_cord": 7, "disc": 8, "posterior_bone": 9,
    "cortical_bone": 10, "trabecular_bone": 11, "sacrum": 12,
    "rib_marrow": 13, "lesion": 14, "cement": 15, "metal": 16,
    "ivc_blood": 17, "portal_blood": 18, "renal_cortex": 19, "renal_medulla": 20,
}

PHASE_STRUCTURES = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cortex", "kidney_medulla")
PHASE_HU = {
    "native": (40.0, 38.0, 40.0, 35.0, 35.0),
    "arterial": (350.0, 90.0, 150.0, 210.0, 90.0),
    "portal_venous": (190.0, 150.0, 200.0, 190.0, 170.0),
    "delayed": (115.0, 110.0, 115.0, 130.0, 150.0),
}
"""HU of :data:`PHASE_STRUCTURES` per contrast phase in a phantom with a ``phase``: typical values at
120 kV (late arterial: aorta 290–360 HU, portal vein ~145 HU, renal cortex far above the medulla;
portal venous at ~70 s: portal vein above the aorta, a small corticomedullary difference left;
delayed at 3–5 min: every vessel near 110–120 HU, the medulla above the cortex as excretion
begins). Sources in ``docs/methods.md``; the phase estimate's ranges were set from the same
literature, and these values sit inside them."""

VERSE_SACRUM = 26  # VerSe's sacrum id; the phantom's S1 and sacrum are written with it.


def _fields(text: str, count: int, what: str, usage: str) -> list[str]:
    """``text`` split at ``:`` into ``count`` fields, the first a level (upper-cased and checked),
    the others lower-cased; ``what`` and ``usage`` name it in the error."""
    parts = text.split(":")
    if len(parts) != count:
        raise ValueError(f"{what} {text!r} is not {usage}")
    lv.level_position(parts[0])
    return [parts[0].upper()] + [part.lower() for part in parts[1:]]


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(choices)}")


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None


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
        level, shape, fraction = _fields(text, 3, "fracture", "LEVEL:SHAPE:FRACTION (e.g. L1:wedge:0.3)")
        return cls(level, shape, _number(fraction, "fracture fraction"))

    def __post_init__(self):
        _check_choice("fracture shape", self.shape, FRACTURE_SHAPES)
        if not 0.0 < self.fraction < 0.7:
            raise ValueError(f"fracture fraction {self.fraction} must lie between 0 and 0.7")


@dataclass(frozen=True)
class Lesion:
    """A bone lesion of one vertebral body: a sphere of ``diameter_mm`` at ``hu`` centred in the
    body's trabecular bone (clipped to it), or with ``diffuse`` the whole trabecular bone at ``hu``
    (``diameter_mm`` is then unused). ``kind`` in :data:`LESION_KINDS`."""

    level: str
    kind: str
    diameter_mm: float
    hu: float
    diffuse: bool = False

    @classmethod
    def parse(cls, text: str) -> "Lesion":
        """Parse ``LEVEL:KIND:DIAMETER:HU`` or ``LEVEL:KIND:diffuse:HU``, e.g. ``L2:sclerotic:12:900``,
        ``L3:lytic:8:20``, ``T12:sclerotic:diffuse:600``."""
        level, kind, size, hu = _fields(text, 4, "lesion", "LEVEL:KIND:DIAMETER:HU (e.g. L2:sclerotic:12:900)")
        diffuse = size == "diffuse"
        diameter = 0.0 if diffuse else _number(size, "lesion diameter")
        return cls(level, kind, diameter, _number(hu, "lesion HU"), diffuse)

    def __post_init__(self):
        _check_choice("lesion kind", self.kind, LESION_KINDS)
        if not self.diffuse and not self.diameter_mm > 0.0:
            raise ValueError(f"lesion diameter {self.diameter_mm} must be positive")
        if not -1000.0 <= self.hu <= 3071.0:
            raise ValueError(f"lesion HU {self.hu} must lie in [-1000, 3071]")

    @property
    def text(self) -> str:
        """The lesion as :meth:`parse` reads it."""
        return f"{self.level}:{self.kind}:{'diffuse' if self.diffuse else self.diameter_mm}:{self.hu}"


@dataclass(frozen=True)
class Hardware:
    """Hardware in one vertebra, ``kind`` in :data:`HARDWARE_KINDS`: ``cement`` (a vertebroplasty,
    a blob of PMMA filling about 30 % of the body's trabecular bone, :data:`CEMENT_HU`) or
    ``screws`` (two titanium pedicle screws of 6 mm through the pedicles into the body,
    :data:`TITANIUM_HU`)."""

    level: str
    kind: str

    @classmethod
    def parse(cls, text: str) -> "Hardware":
        """Parse ``LEVEL:KIND``, e.g. ``L1:cement``, ``L4:screws``."""
        return cls(*_fields(text, 2, "hardware", "LEVEL:KIND (e.g. L1:cement)"))

    def __post_init__(self):
        _check_choice("hardware kind", self.kind, HARDWARE_KINDS)

    @property
    def text(self) -> str:
        return f"{self.level}:{self.kind}"


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
    # Optional cases (see :mod:`.column`, :mod:`.ribs`, :mod:`.inserts`); their defaults draw none.
    rib_pairs: int = 0  # 0 (no ribs), 11, 12 or 13: rib n on T n; the 13th on the vertebra below T12
    lesions: tuple[Lesion, ...] = ()
    hardware: tuple[Hardware, ...] = ()
    lumbar_vertebrae: int = 5  # 4, 5 or 6 vertebrae between T12 and the sacrum (6: an L6 below L5)
    # A contrast phase (see :mod:`.organs`): None draws no vena cava, portal vein or kidneys and the
    # aorta as ``contrast`` says; a phase of PHASES draws them at PHASE_HU (``phase_hu`` overrides it
    # per structure) and raises trabecular bone and marrow by ``bone_enhancement_hu`` (None: the
    # phase's offset of measure.attenuation.PHASE_BONE_OFFSETS_HU).
    phase: str | None = None
    phase_hu: dict | None = None
    bone_enhancement_hu: float | None = None

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
        if self.rib_pairs not in RIB_PAIRS:
            raise ValueError(f"rib_pairs must be one of {', '.join(map(str, RIB_PAIRS))}")
        if self.lumbar_vertebrae not in LUMBAR_COUNTS:
            raise ValueError(f"lumbar_vertebrae must be one of {', '.join(map(str, LUMBAR_COUNTS))}")
        for what, items in (("lesion", self.lesions), ("hardware", self.hardware)):
            if len({item.level for item in items}) != len(items):
                raise ValueError(f"at most one {what} per level")
        if self.phase is not None:
            _check_choice("phase", self.phase, PHASES)
            if self.contrast:
                raise ValueError("give either contrast or phase (the phase decides the aorta's HU)")
        unknown = set(self.phase_hu or ()) - set(PHASE_STRUCTURES)
        if unknown or (self.phase is None and (self.phase_hu or self.bone_enhancement_hu is not None)):
            raise ValueError(f"phase_hu takes {', '.join(PHASE_STRUCTURES)}, and it and bone_enhancement_hu "
                             "need a phase")

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
        """Trabecular HU of ``level``; an L6 not in a per-level dict takes L5's (the two share a
        ``total`` label, which with the tissue fixes a sample's HU)."""
        if isinstance(self.trabecular_hu, dict):
            if level == "L6" and level not in self.trabecular_hu:
                level = "L5"
            return float(self.trabecular_hu.get(level, 160.0))
        return float(self.trabecular_hu)

    def lesion_of(self, level: str) -> Lesion | None:
        return next((lesion for lesion in self.lesions if lesion.level == level), None)

    def hardware_of(self, level: str) -> Hardware | None:
        return next((item for item in self.hardware if item.level == level), None)

    @property
    def aorta_hu_value(self) -> float:
        if self.aorta_hu is not None:
            return float(self.aorta_hu)
        if self.phase is not None:
            return self.phase_structure_hu("aorta")
        return 250.0 if self.contrast else 40.0

    def phase_structure_hu(self, name: str) -> float:
        """HU of one of :data:`PHASE_STRUCTURES` in this phantom's phase (``phase_hu`` first)."""
        if self.phase_hu and name in self.phase_hu:
            return float(self.phase_hu[name])
        return PHASE_HU[self.phase][PHASE_STRUCTURES.index(name)]

    @property
    def trabecular_enhancement_hu(self) -> float:
        """HU added to trabecular bone and rib marrow by the contrast phase (0 without a phase)."""
        if self.phase is None:
            return 0.0
        if self.bone_enhancement_hu is not None:
            return float(self.bone_enhancement_hu)
        return PHASE_BONE_OFFSETS_HU[self.phase]

    def tissue_hu(self, tissue: int, level: str | None = None) -> float:
        """HU of a tissue (a :data:`TISSUES` code) in this phantom; trabecular bone's and rib
        marrow's depend on the ``level`` (:meth:`trabecular_hu_of`), a lesion's is that of the
        ``level``'s lesion. Every other tissue has one HU everywhere, so a sample's tissue and
        ``total`` label fix its HU (what the partial-volume pass relies on)."""
        t = TISSUES
        if tissue in (t["trabecular_bone"], t["rib_marrow"]):
            return self.trabecular_hu_of(level) + self.trabecular_enhancement_hu
        if tissue == t["lesion"]:
            return float(self.lesion_of(level).hu)
        if tissue in _PHASE_TISSUES:
            return self.phase_structure_hu(_PHASE_TISSUES[tissue])
        return {
            t["air"]: -1000.0, t["subcutaneous_fat"]: self.fat_hu, t["soft_tissue"]: self.soft_tissue_hu,
            t["muscle"]: self.muscle_hu, t["intramuscular_fat"]: self.fat_hu, t["blood"]: self.aorta_hu_value,
            t["csf"]: self.csf_hu, t["spinal_cord"]: self.cord_hu, t["disc"]: self.disc_hu,
            t["posterior_bone"]: self.posterior_hu, t["cortical_bone"]: self.cortical_hu,
            t["sacrum"]: self.sacrum_hu, t["cement"]: CEMENT_HU, t["metal"]: TITANIUM_HU,
        }[tissue]

    def to_json(self) -> dict:
        """The spec as JSON: the optional cases only where they differ from their defaults (so
        the truth of a phantom without them is what it was before they existed)."""
        d = asdict(self)
        d["fractures"] = [f"{f.level}:{f.shape}:{f.fraction}" for f in self.fractures]
        d["lesions"] = [lesion.text for lesion in self.lesions]
        d["hardware"] = [item.text for item in self.hardware]
        for name, default in (("rib_pairs", 0), ("lesions", []), ("hardware", []), ("lumbar_vertebrae", 5),
                              ("phase", None), ("phase_hu", None), ("bone_enhancement_hu", None)):
            if d[name] == default:
                del d[name]
        return d


_PHASE_TISSUES = {TISSUES["ivc_blood"]: "inferior_vena_cava", TISSUES["portal_blood"]: "portal_vein_and_splenic_vein",
                  TISSUES["renal_cortex"]: "kidney_cortex", TISSUES["renal_medulla"]: "kidney_medulla"}
