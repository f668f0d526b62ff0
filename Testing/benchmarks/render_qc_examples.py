#!/usr/bin/env python
"""Render the QC picture (``qc.png``) for two examples, and time it.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/render_qc_examples.py OUT_DIR [--data DIR] [--speed]

Writes into ``OUT_DIR``:

* ``qc_phantom.png``: a T10–L5 phantom at 1 mm with lordosis, 10° rotation, noise 20 HU and three
  fractures (T12 biconcave 45 %, L1 wedge 30 %, L3 crush 22 %), measured by the library
  (morphometry with the CT and the ``vertebrae_body`` map, grading, trabecular HU); the phantom is
  cached like the other benchmarks' (``--cache``; the first run renders it, about 1–2 minutes);
* ``qc_example_ct.png``: TotalSegmentator's example CT (``example_ct.nii.gz`` with
  ``spine_report/totalseg.nii.gz`` and ``spine_report/totalseg_vertebrae_body.nii.gz``) from the
  shared data folder (``--data``, default ``../shared/data/totalsegmentator-example``).

Prints the time of each step; the render time is that of :func:`render_qc` alone. ``--speed``
also times the render on a 512 x 512 x 500 CT with 17 vertebrae (synthetic content: the time
does not depend on it), best of three, and the growth of the process's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402
from VertebralFractureScreenLib.measure.grading import grade_spine  # noqa: E402
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402
from VertebralFractureScreenLib.report.qc import QCVertebra, render_qc  # noqa: E402

PHANTOM_SPEC = ph.PhantomSpec(
    levels=lv.parse_level_range("T10-L5"), spacing=(1.0, 1.0, 1.0), lordosis_deg=40.0,
    rotation_deg=(4.0, -3.0, 10.0), noise_hu=20.0, seed=11,
    fractures=tuple(ph.Fracture.parse(f) for f in ("L1:wedge:0.3", "T12:biconcave:0.45", "L3:crush:0.22")))


def _bone_and_contrast(ct, labels, ijk_to_ras, heights, grades, body_labels):
    """Trabecular ROIs and the contrast phase from the attenuation module; (None, None) with a
    note when that module is not available (the picture then shows no HU)."""
    try:
        from VertebralFractureScreenLib.measure.attenuation import measure_trabecular
        from VertebralFractureScreenLib.measure.contrast import measure_contrast
    except ImportError as error:
        print(f"  (no trabecular HU: {error})")
        return None, None
    rois = measure_trabecular(ct, labels, ijk_to_ras, heights, body_labels=body_labels, grades=grades)
    contrast = measure_contrast(ct, labels, ijk_to_ras)
    return rois, contrast


def _contrast_text(contrast) -> str:
    if contrast is None or getattr(contrast, "aorta_hu", None) is None:
        return "contrast unknown"
    phase = "contrast-enhanced" if contrast.contrast_enhanced else "native"
    return f"{phase} (aorta {contrast.aorta_hu:.0f} HU)"


def screen_and_render(name, ct, labels, body_labels, ijk_to_ras, out: Path, title: str, mode: str) -> None:
    t0 = time.perf_counter()
    heights = measure_heights(labels, ijk_to_ras, body_labels=body_labels, ct=ct)
    grades = grade_spine(heights)
    t1 = time.perf_counter()
    rois, contrast = _bone_and_contrast(ct, labels, ijk_to_ras, heights, grades, body_labels)
    t2 = time.perf_counter()
    hu = None if rois is None else {r.level: r.mean_hu for r in rois}
    render_qc(ct, ijk_to_ras, heights, out, grades=grades, hu=hu, mode=mode,
              title=f"{title} · {_contrast_text(contrast)}")
    t3 = time.perf_counter()
    print(f"{name}: {len(heights)} vertebrae on {ct.shape[::-1]} voxels; morphometry + grading {t1 - t0:.2f} s, "
          f"HU {t2 - t1:.2f} s, render_qc {t3 - t2:.2f} s -> {out}")


def phantom_example(out_dir: Path, cache: Path, mode: str) -> None:
    if not bc.is_cached(PHANTOM_SPEC, cache):
        print("rendering the phantom (cached for the next run) ...")
        bc.render_to_cache(PHANTOM_SPEC, cache)
    p = bc.load_cached(PHANTOM_SPEC, cache)
    screen_and_render("phantom", p.ct, p.total, p.vertebrae_body, p.ijk_to_ras, out_dir / "qc_phantom.png",
                      "Phantom T10–L5 (truth: T12 biconcave 45 %, L1 wedge 30 %, L3 crush 22 %)", mode)


def real_example(out_dir: Path, data: Path, mode: str) -> None:
    if not data.is_dir():
        print(f"example CT: skipped, {data} not found (use --data)")
        return
    ct = read_ct(data / "example_ct.nii.gz")
    labels = read_labelmap(data / "spine_report" / "totalseg.nii.gz", reference=ct)
    bodies = read_labelmap(data / "spine_report" / "totalseg_vertebrae_body.nii.gz", reference=ct)
    screen_and_render("example CT", ct.array, labels.array, bodies.array, ct.ijk_to_ras,
                      out_dir / "qc_example_ct.png", "TotalSegmentator example CT", mode)


def speed(out_dir: Path, mode: str, repeat: int = 3) -> None:
    """render_qc on a 512 x 512 x 500 int16 CT (0.8 x 0.8 x 1 mm) with 17 vertebrae T1–L5."""
    rng = np.random.default_rng(0)
    ct = rng.integers(-200, 400, size=(500, 512, 512), dtype=np.int16)
    ijk_to_ras = np.diag([0.8, 0.8, 1.0, 1.0])
    ijk_to_ras[:3, 3] = (-204.0, -204.0, -250.0)
    levels = lv.parse_level_range("T1-L5")
    records = []
    for n, level in enumerate(levels):
        s = 225.0 - 28.0 * n  # superior coordinate of the body centre (mm)
        centre = np.array([0.0, 15.0 * np.cos(s / 160.0), s])
        ap, cc = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
        lines = {key: (centre + a * ap + 11.0 * cc, centre + a * ap - 11.0 * cc)
                 for key, a in (("ha", 12.0), ("hm", 0.0), ("hp", -12.0))}
        records.append(QCVertebra(level, True, centre, ap, cc, lines, 22.0, 22.0, 22.0, genant_grade=n % 4,
                                  shape="wedge", height_loss=0.1 * (n % 4), trabecular_hu=150.0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        render_qc(ct, ijk_to_ras, records, out_dir / "qc_speed.png", title="speed test (synthetic content)",
                  mode=mode)
        times.append(time.perf_counter() - t0)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before
    print(f"speed: render_qc on 512x512x500 with 17 vertebrae: best {min(times):.2f} s, "
          f"runs {', '.join(f'{t:.2f}' for t in times)} s; peak memory grew by {grown:.0f} MB "
          f"(the CT itself is {ct.nbytes / 2**20:.0f} MB)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--data", type=Path, default=bc.REPO.parent / "shared" / "data" / "totalsegmentator-example",
                        help="the totalsegmentator-example folder")
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE, help="phantom cache folder")
    parser.add_argument("--mode", choices=("curved", "straightened"), default="curved")
    parser.add_argument("--speed", action="store_true", help="also time a 512 x 512 x 500 exam")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import matplotlib.backends.backend_agg  # noqa: F401  (render_qc imports it on first use)
    print(f"importing matplotlib (once per process, not counted below): {time.perf_counter() - t0:.2f} s")
    phantom_example(args.out, args.cache, args.mode)
    real_example(args.out, args.data, args.mode)
    if args.speed:
        speed(args.out, args.mode)


if __name__ == "__main__":
    main()
