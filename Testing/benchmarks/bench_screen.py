#!/usr/bin/env python
"""Speed and memory of ``vfscreen screen`` on a full-size exam with a given segmentation.

The 512 x 512 x 500 phantom of ``bench_morphometry_speed.py`` (T1–L5, four fractures, cached) is
written as NIfTI files (CT int16, total and vertebrae_body label maps) into a scratch folder, and
``vfscreen screen CT --seg total --body-seg vertebrae_body --out OUT`` runs in a fresh process,
``--repeat`` times. Prints the wall time of each run (process start to exit, so reading the files,
every measurement, the QC picture and writing the outputs), the library's own timings from
``exam.json``, and the peak resident memory of the process (its own ``ru_maxrss``, largest over
the runs) against the CT's in-memory size. Goals (issue): under 5 s wall, peak memory under 3x the CT.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_screen.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import bench_morphometry_speed as speed  # noqa: E402

from VertebralFractureScreenLib import imageio  # noqa: E402

GOAL_SECONDS = 5.0
GOAL_MEMORY_RATIO = 3.0


def prepare(folder: Path, cache: Path) -> int:
    """Write the phantom's CT and label maps into ``folder`` (in its own process: the measuring
    parent stays small, since Linux counts a parent's pages in a forked child's peak RSS)."""
    slice_mm, _ = speed.slice_spacing_that_fits()
    spec = speed.make_spec(slice_mm)
    if not bc.is_cached(spec, cache):
        print("rendering the 512x512x500 phantom (several minutes, cached afterwards) ...", flush=True)
        bc.render_to_cache(spec, cache)
    phantom = bc.load_cached(spec, cache)
    for name in ("ct", "total", "vertebrae_body"):
        imageio.write_volume(folder / f"{name}.nii.gz", imageio.Volume(getattr(phantom, name), phantom.ijk_to_ras))
    print(phantom.ct.nbytes)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare, args.cache)
    with tempfile.TemporaryDirectory(prefix="vfscreen-bench-screen-") as scratch:
        scratch = Path(scratch)
        done = subprocess.run([sys.executable, __file__, "--prepare", str(scratch), "--cache", str(args.cache)],
                              check=True, capture_output=True, text=True)
        ct_bytes = int(done.stdout.split()[-1])
        files = {name: scratch / f"{name}.nii.gz" for name in ("ct", "total", "vertebrae_body")}
        # The child reports its own peak: ru_maxrss of RUSAGE_CHILDREN would also count the pages
        # a forked child shares with this (large) process before it execs.
        argv = ["screen", str(files["ct"]), "--seg", str(files["total"]), "--body-seg", str(files["vertebrae_body"]),
                "--out", str(scratch / "out")]
        child = ("import resource, sys\nfrom VertebralFractureScreenLib.cli import main\ncode = main(sys.argv[1:])\n"
                 "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")
        walls, peaks = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", child, *argv], check=True, capture_output=True, text=True)
            walls.append(time.perf_counter() - started)
            peaks.append(int(done.stdout.rsplit("PEAK_KIB", 1)[1]) * 1024)
        peak = max(peaks)
        timings = json.loads((scratch / "out" / "exam.json").read_text())["timings_s"]
    print(f"vfscreen screen on {' x '.join(map(str, speed.SIZE_IJK))} (CT {ct_bytes / 2**20:.0f} MiB int16), "
          f"given segmentation, {args.repeat} runs")
    print(f"  wall per run: {', '.join(f'{w:.2f}' for w in walls)} s (best {min(walls):.2f} s; goal < {GOAL_SECONDS:g} s)")
    print(f"  library timings of the last run (s): {timings}")
    print(f"  peak RSS: {peak / 2**20:.0f} MiB = {peak / ct_bytes:.2f} x the CT (goal < {GOAL_MEMORY_RATIO:g} x)")
    ok = min(walls) < GOAL_SECONDS and peak / ct_bytes < GOAL_MEMORY_RATIO
    print("[PASS]" if ok else "[FAIL]", "speed and memory goals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
