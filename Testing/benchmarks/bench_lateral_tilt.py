#!/usr/bin/env python
"""Height errors against the lateral tilt of the vertebrae to the slices, on independently
rendered spines (issue 28, point 4: which heights the lateral tilt makes imprecise).

Suite: T12–L3 spines of ``Testing/benchmarks/independent/`` (its PSF, slice profile, correlated
noise of 20 HU, texture, concave irregular endplates, jittered labels), two anatomies (seeds 11
and 12), each scanned at 0.7x0.7x3 mm, 3 mm and 1 mm and rotated about the antero-posterior axis
by 0, 2.5, 5, 7.5, 10, 20 and 30° (1 mm: 0, 10, 20, 30°). Every spine: ``measure_heights`` (CT and
``vertebrae_body`` map); each vertebra's lateral tilt to the slices is measured from its own frame
(:func:`..measure.spine_shape.lateral_tilt_deg`); errors against the renderer's truth in the
mid-sagittal plane (SPEC §4). Prints, per spacing and lateral-tilt band, the median and 90th
percentile of |error| over Ha, Hm, Hp, the median Hm error (a concave endplate read straight makes
Hm long) and the share flagged ``lateral_tilt`` by screening's rule.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_lateral_tilt.py --jobs 2

The first run renders 40 spines (about 20 minutes on 2 busy cores); later runs take a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from independent import cache as ic  # noqa: E402
from independent.spec import SpineSpec  # noqa: E402

from VertebralFractureScreenLib.measure import spine_shape  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402

LEVELS = ("T12", "L1", "L2", "L3")
THICK_TILTS = (0.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0)
THIN_TILTS = (0.0, 10.0, 20.0, 30.0)
SPACINGS = {"0.7x0.7x3": (0.7, 0.7, 3.0), "3 mm": (3.0, 3.0, 3.0), "1 mm": (1.0, 1.0, 1.0)}
BANDS = ((0, 2), (2, 4), (4, 6), (6, 8), (8, 12), (12, 40))
DEFAULT_CACHE = Path(os.environ.get("VFSCREEN_BENCH_CACHE", "~/.cache/vfscreen-bench")).expanduser() / "tilt"


def suite() -> dict[str, tuple[str, SpineSpec]]:
    specs = {}
    for group, spacing in SPACINGS.items():
        for tilt in (THIN_TILTS if spacing[2] <= 1.0 else THICK_TILTS):
            for seed in (11, 12):
                specs[f"{group} tilt {tilt:g} seed {seed}"] = (group, SpineSpec(
                    levels=LEVELS, spacing=spacing, rotation_deg=(0.0, tilt, 0.0), noise_hu=20.0, seed=seed,
                    scan_seed=seed))
    return specs


def measure(group: str, rendered) -> list[dict]:
    """One row per scored vertebra: its lateral tilt, errors and flags."""
    heights = {h.level: h for h in measure_heights(rendered.total, rendered.ijk_to_ras, body_labels=rendered.body,
                                                   ct=rendered.ct)}
    flagged = set(spine_shape.flag_lateral_tilt(list(heights.values()), rendered.ijk_to_ras))
    rows = []
    for truth in rendered.truth:
        h = heights.get(truth["level"])
        if not truth["complete"] or h is None or not h.complete:
            continue
        rows.append({"group": group, "lateral": spine_shape.lateral_tilt_deg(h.frame, rendered.ijk_to_ras),
                     "errors": [getattr(h, f"{k}_mm") - truth[f"{k}_mm"] for k in ("ha", "hm", "hp")],
                     "flagged": truth["level"] in flagged})
    return rows


def report(rows: list[dict]) -> None:
    print("| voxels | lateral tilt | vertebrae | median \\|error\\| | p90 \\|error\\| | median Hm error | flagged |")
    print("|---|---|---|---|---|---|---|")
    for group in SPACINGS:
        for lo, hi in BANDS:
            mine = [r for r in rows if r["group"] == group and lo <= r["lateral"] < hi]
            if not mine:
                continue
            errors = np.array([r["errors"] for r in mine])
            flagged = sum(r["flagged"] for r in mine)
            print(f"| {group} | {lo}–{hi}° | {len(mine)} | {np.median(np.abs(errors)):.2f} mm "
                  f"| {np.percentile(np.abs(errors), 90):.2f} mm | {np.median(errors[:, 1]):+.2f} mm "
                  f"| {flagged}/{len(mine)} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"render cache (default {DEFAULT_CACHE})")
    parser.add_argument("--jobs", type=int, default=1, help="processes for rendering missing spines (default 1)")
    args = parser.parse_args(argv)
    specs = suite()
    ic.render_many({name: spec for name, (_, spec) in specs.items()}, args.cache.expanduser(), jobs=args.jobs)
    rows = []
    for name, (group, spec) in specs.items():
        rows += measure(group, ic.load(spec, args.cache.expanduser()))
    print(f"\n{len(rows)} vertebrae; flag rule: lateral tilt > {spine_shape.LATERAL_TILT_DEG:g}° (beyond the "
          "tilts measured here)\n")
    report(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
