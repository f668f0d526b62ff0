"""Synthetic spine CT phantom with exact ground truth: :func:`make_phantom` is the one entry point.

:func:`make_phantom` renders a thoraco-lumbar spine into a CT volume (HU) and label maps in the
three conventions of SPEC §3, and returns a ``truth`` dictionary with the analytic answers that
every measurement of this product is tested against; :func:`write_phantom` writes them.

The parts, each in its own module of :mod:`.phantom`:

* :mod:`.spec`: :class:`PhantomSpec`, :class:`Fracture`, :class:`Lesion` and :class:`Hardware`
  (what defines a phantom), the tissue codes and which HU each tissue gets;
* :mod:`.column`: which vertebrae the column has (4 or 6 lumbar, a T13), their labels and true
  identities;
* :mod:`.anatomy`: level dimensions, the spine curve and the vertebra frames;
* :mod:`.shapes`: the vertebral body with its endplate surfaces (and the fracture shapes), the
  fat lattice and point tests;
* :mod:`.ribs`, :mod:`.inserts`: the ribs; lesions, cement and screws in a vertebra;
* :mod:`.scene`: :class:`SpineScene`, all structures in the anatomy frame and their painting;
* :mod:`.raster`: the voxel grid, the two passes (voxel centres, then partial volume) and the
  scanner's blur and noise;
* :mod:`.truth`: heights, grades and muscle slabs as the measurements define them;
* :mod:`.mislabel`: mislabelled copies of a ``total`` map, for tests of a level checker.

The names that other modules import from here (``from .phantom.render import X``) are re-exported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import rotation_matrix
from ..measure.grading import genant_grade, is_borderline  # noqa: F401  (re-exported)
from ..measure.morphometry import AP_FRACTIONS  # noqa: F401  (re-exported)
from .raster import _make_grid, _paint_centres, _Renderer, _scanner_ct, _supersample_voxels, default_workers
from .scene import SpineScene, Tube  # noqa: F401  (re-exported)
from .shapes import VertebraModel  # noqa: F401  (re-exported)
from .spec import FRACTURE_SHAPES, TISSUES, VERSE_SACRUM, Fracture, Hardware, Lesion, PhantomSpec  # noqa: F401  (re-exported)
from .truth import _truth

__all__ = [
    "AP_FRACTIONS", "FRACTURE_SHAPES", "TISSUES", "VERSE_SACRUM", "Fracture", "Hardware", "Lesion", "Phantom",
    "PhantomSpec",
    "SpineScene", "Tube", "VertebraModel", "default_workers", "genant_grade", "is_borderline", "make_phantom",
    "write_phantom",
]


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


def make_phantom(spec: PhantomSpec = PhantomSpec(), chunk_voxels: int = 400_000, workers: int | None = None) -> Phantom:
    """Render the phantom described by ``spec`` (see the module docstring) with its truth.

    ``chunk_voxels`` bounds the sub-samples handled at once; ``workers`` is the number of
    threads (default :func:`default_workers`). The image does not depend on either."""
    scene = SpineScene(spec)
    scene.prepare_bounds()
    anatomy_to_ras = np.eye(4)
    anatomy_to_ras[:3, :3] = rotation_matrix(*spec.rotation_deg)
    anatomy_to_ras[:3, 3] = spec.centre_ras
    ijk_to_ras, shape = _make_grid(spec, scene, anatomy_to_ras)
    ijk_to_anatomy = np.linalg.inv(anatomy_to_ras) @ ijk_to_ras
    workers = default_workers() if workers is None else max(1, int(workers))
    renderer = _Renderer(spec, scene, ijk_to_anatomy, shape)
    hu, maps, boundary = _paint_centres(renderer, workers)
    _supersample_voxels(renderer, boundary, hu, maps, chunk_voxels, workers)
    ct = _scanner_ct(spec, hu)
    truth = _truth(spec, scene, ijk_to_ras, anatomy_to_ras, shape, maps["total"])
    return Phantom(ct, maps["total"], maps["body"], maps["verse"], maps["tissue"], ijk_to_ras, truth)


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
