"""An independent image-formation path for the benchmarks (issue 30).

It shares no code and no assumption with ``VertebralFractureScreenLib.phantom`` or the
morphometry's endplate fit: its own continuous anatomy (:mod:`.anatomy`, :mod:`.build`,
:mod:`.tissue`), its own scanner (:mod:`.scanner`: PSF, slice profile, correlated noise,
beam-hardening cupping, label maps with boundary jitter) and its own truth on the continuous
anatomy (:mod:`.truth`). From the Lib it uses only the level names and TotalSegmentator ids
(``VertebralFractureScreenLib.levels``).

Entry point: :func:`render`.
"""

from __future__ import annotations

import time

import numpy as np

from . import scanner
from .build import build_spine
from .spec import Fracture, Osteophyte, SchmorlNode, SpineSpec
from .truth import spine_truth

__all__ = ["render", "SpineSpec", "Fracture", "SchmorlNode", "Osteophyte", "PROFILE_FRACTIONS"]

PROFILE_FRACTIONS = tuple(np.round(np.arange(0.15, 0.85 + 1e-9, 0.05), 6))
"""Depth fractions of the truth's height profile (15–85 % in 5 % steps)."""


def render(spec: SpineSpec, profile_fractions=PROFILE_FRACTIONS):
    """Render ``spec``. Returns ``(ct, total_labels, body_labels, ijk_to_ras, truth)``:

    * ``ct``: int16 HU ``[k, j, i]``;
    * ``total_labels``: uint8 TotalSegmentator ``total`` vertebra ids; ``body_labels``: uint8
      ``vertebrae_body`` map (1 bodies, 2 discs); both with segmentation-like boundary jitter;
    * ``ijk_to_ras``: 4x4 (mm);
    * ``truth``: ``{"vertebrae": [record, ...], "trabecular_truth_hu": float32 array (the drawn
      trabecular HU at each voxel centre within 3 mm of a body, cupping included; NaN
      elsewhere), "scan": {...}}`` (records: :func:`.truth.vertebra_truth`).
    """
    t0 = time.perf_counter()
    spine = build_spine(spec)
    grid = scanner.make_grid(spine, spec)
    seed = spec.effective_scan_seed()
    cupping = 0.0 if "cupping" in spec.ablate else float(np.random.default_rng([seed, 3]).uniform(8.0, 16.0))
    t1 = time.perf_counter()
    maps, info = scanner.render_volume(spine, spec, grid, cupping)
    t2 = time.perf_counter()
    noise_hu = 0.0 if "noise" in spec.ablate else spec.noise_hu
    noise = scanner.correlated_noise(grid.shape, grid.spacing, spec.kernel, noise_hu, np.random.default_rng([seed, 1]))
    ct = np.clip(np.rint(maps.ct + noise), -1024, 3071).astype(np.int16)
    total, body, bias = scanner.label_maps(maps, spec, np.random.default_rng([seed, 2]))
    t3 = time.perf_counter()
    vertebrae = spine_truth(spine, grid.rotation, profile_fractions)
    t4 = time.perf_counter()
    psf, ssp = scanner.psf_sigmas(spec)
    scan = {"kernel": spec.kernel, "psf_sigma_mm": psf, "ssp_sigma_mm": ssp, "ablate": list(spec.ablate),
            "supersampling": list(grid.factors), "cupping_hu": cupping,
            "label_bias_voxels": bias, "label_jitter_voxels": spec.label_jitter_voxels,
            "noise_sd_hu": float(noise.std()), "shape_kji": list(ct.shape),
            "seconds": {"anatomy": t1 - t0, "image": t2 - t1, "noise_labels": t3 - t2, "truth": t4 - t3,
                        "total": t4 - t0}, **info}
    truth = {"vertebrae": vertebrae, "trabecular_truth_hu": maps.trab_hu, "scan": scan}
    return ct, total, body, grid.ijk_to_ras.copy(), truth
