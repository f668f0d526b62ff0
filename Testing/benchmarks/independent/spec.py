"""What one independently rendered spine is made of: :class:`SpineSpec` and its findings.

Everything here is plain data (JSON-able through :meth:`SpineSpec.to_json`), so a spec can key a
cache. Units: millimetres, degrees, Hounsfield units. Levels use the names of SPEC §3
(``T12``, ``L1`` ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FRACTURE_SHAPES = ("wedge", "biconcave", "crush")
KERNELS = ("soft", "standard", "bone")
ABLATIONS = ("noise", "texture", "psf", "concavity", "rims", "label_jitter", "cupping", "findings", "cortex")
"""Effects a spec can switch off to measure what each does to the method (``SpineSpec.ablate``):
``noise``; ``texture``; ``psf`` (in-plane PSF and the slice profile's Gaussian down to 0.05 mm:
the voxel boxes remain); ``concavity`` (flat endplates: no dish); ``rims`` (no rim irregularity,
roughness or rim flare); ``label_jitter`` (labels are the thresholded partial volume, no jitter,
no bias); ``cupping``; ``findings`` (Schmorl's nodes, osteophytes, disc degeneration left out);
``cortex`` (walls and endplate plates a uniform 1 mm, the plates of the walls' HU).
The anatomy's random draws stay the same."""


@dataclass(frozen=True)
class Fracture:
    """A fracture of known loss: ``fraction`` of the affected height lost against the same
    vertebra unfractured (wedge: Ha, hinge at the Hp line; biconcave: Hm, both endplates
    depressed centrally; crush: every height)."""

    level: str
    shape: str
    fraction: float

    def __post_init__(self):
        if self.shape not in FRACTURE_SHAPES:
            raise ValueError(f"unknown fracture shape {self.shape!r}")
        if not 0.0 < self.fraction < 0.8:
            raise ValueError(f"fracture fraction {self.fraction} outside (0, 0.8)")


@dataclass(frozen=True)
class SchmorlNode:
    """A Schmorl's node: a pit of disc material in ``endplate`` ('superior'/'inferior') of
    ``level``, centred ``lateral_mm`` from the mid-sagittal plane (local x, towards the left) at
    depth fraction ``depth_fraction`` from the anterior wall; ``radius_mm`` wide and
    ``depth_mm`` deep, lined by sclerotic bone."""

    level: str
    endplate: str = "superior"
    lateral_mm: float = 0.0
    depth_fraction: float = 0.55
    radius_mm: float = 4.0
    depth_mm: float = 3.0


@dataclass(frozen=True)
class Osteophyte:
    """A rim osteophyte (bony spur) at ``endplate`` of ``level``: centred at ``angle_deg`` around
    the body (0 = anterior, +90 = left, -90 = right), ``half_width_deg`` wide, reaching
    ``length_mm`` beyond the wall, ``thickness_mm`` thick at its base, curling towards the disc."""

    level: str
    endplate: str = "superior"
    angle_deg: float = 0.0
    half_width_deg: float = 50.0
    length_mm: float = 4.0
    thickness_mm: float = 2.5


@dataclass(frozen=True)
class SpineSpec:
    """One spine and its scan.

    * ``levels``: the vertebrae scored (truth-complete); one more level above and below is drawn
      as context, cut by the field of view.
    * ``spacing``: voxel size (i, j, k) mm; ``rotation_deg``: (x, y, z) rotation of the patient
      in the scanner, applied as R = Rz @ Ry @ Rx about the spine's centre (x: left-right axis,
      a sagittal tilt; z: axial rotation).
    * ``noise_hu``: SD of the correlated noise per voxel; ``kernel``: reconstruction kernel
      (PSF and noise power spectrum), one of :data:`KERNELS`.
    * ``texture_hu``: SD of the trabecular texture before blurring (0: none).
    * ``trabecular_hu``: trabecular HU at the first scored level (falling 3 HU a level
      caudally); ``osteoporotic`` draws 80–110 HU instead.
    * ``lordosis_scale`` scales the segmental sagittal angles; ``scoliosis_deg`` a coronal
      curve's Cobb angle.
    * findings: ``fractures``, ``schmorl``, ``osteophytes``, ``degenerated_discs`` (names of the
      disc's upper level, e.g. ``"L4"`` for L4/L5).
    * ``seed`` draws the anatomy's own variation; ``scan_seed`` the noise and label jitter
      (None: from ``seed`` and the rotation). Two specs with the same ``seed`` and levels are
      the same anatomy.
    * ``ablate``: effects switched off (:data:`ABLATIONS`), for measuring their share of the
      errors.
    """

    levels: tuple[str, ...]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    noise_hu: float = 20.0
    kernel: str = "standard"
    texture_hu: float = 35.0
    trabecular_hu: float = 190.0
    osteoporotic: bool = False
    lordosis_scale: float = 1.0
    scoliosis_deg: float = 0.0
    fractures: tuple[Fracture, ...] = ()
    schmorl: tuple[SchmorlNode, ...] = ()
    osteophytes: tuple[Osteophyte, ...] = ()
    degenerated_discs: tuple[str, ...] = ()
    label_jitter_voxels: float = 0.45
    label_bias_voxels: float | None = None
    seed: int = 0
    scan_seed: int | None = None
    ablate: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}")
        unknown = set(self.ablate) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"unknown ablation(s) {sorted(unknown)}; known: {ABLATIONS}")
        if len(self.levels) < 3:
            raise ValueError("a spine needs at least three scored levels")

    def to_json(self) -> dict:
        """The spec as JSON-able data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def effective_scan_seed(self) -> int:
        """The seed of the noise and the label jitter."""
        if self.scan_seed is not None:
            return int(self.scan_seed)
        rot = sum(int(round(abs(a) * 10)) * 1000 ** n for n, a in enumerate(self.rotation_deg))
        return (int(self.seed) * 7919 + rot + int(self.spacing[2] * 100)) % (2 ** 31)
