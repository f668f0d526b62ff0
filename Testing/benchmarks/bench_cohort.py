#!/usr/bin/env python
"""Throughput and memory of ``vfscreen cohort`` on a phantom cohort with given segmentations.

The full-size exam of ``bench_screen.py`` (512 x 512 x 500, T1–L5, four fractures, cached) is
written once as NIfTI (CT, total and vertebrae_body maps); the cohort folder holds ``--exams``
exams that link to those files under the folder rule's names (``examNN.nii.gz``,
``examNN_seg.nii.gz``, ``examNN_body.nii.gz``), so every exam is read, measured and written in
full. Then, each in a fresh process:

1. ``vfscreen cohort IN --out OUT1 --workers 1`` (screening in the process itself),
2. ``vfscreen cohort IN --out OUT2 --workers 2`` (a local Dask cluster of two worker processes),
3. the same command again on the finished OUT2 (the re-run that must do nothing).

Prints wall time, exams per minute and the peak resident memory of each worker process (from
``cohort.json``: every worker reports its own ``ru_maxrss``).

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_cohort.py --exams 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402


def run(command: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    out = Path(command[command.index("--out") + 1])
    return wall, json.loads((out / "cohort.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exams", type=int, default=50)
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfscreen-bench-cohort-") as scratch:
        scratch = Path(scratch)
        base = scratch / "base"
        base.mkdir()
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_screen.py")), "--prepare",
                               str(base), "--cache", str(args.cache)], check=True, capture_output=True, text=True)
        ct_mib = int(done.stdout.split()[-1]) / 2**20
        inputs = scratch / "in"
        inputs.mkdir()
        for number in range(args.exams):
            for source, suffix in (("ct", ""), ("total", "_seg"), ("vertebrae_body", "_body")):
                os.symlink(base / f"{source}.nii.gz", inputs / f"exam{number:03d}{suffix}.nii.gz")
        vfscreen = [sys.executable, "-m", "VertebralFractureScreenLib.cli", "cohort", str(inputs)]
        results = {}
        for label, workers, out in (("1 worker", 1, "out1"), ("2 workers", 2, "out2"), ("re-run (2 workers)", 2, "out2")):
            print(f"running {label} ...", flush=True)
            results[label] = run(vfscreen + ["--out", str(scratch / out), "--workers", str(workers)])
    print(f"\nvfscreen cohort: {args.exams} exams of 512 x 512 x 500 (CT {ct_mib:.0f} MiB int16), given segmentations, "
          f"QC pictures on; {os.cpu_count()} CPU cores")
    print(f"{'run':<20}{'wall s':>8}{'screened':>10}{'exams/min':>11}{'peak MiB/worker':>17}")
    for label, (wall, summary) in results.items():
        this = summary["this_run"]
        peaks = this["peak_rss_mib_per_worker"]
        peak_text = ", ".join(f"{v:.0f}" for v in peaks.values()) or "–"
        rate = 60 * this["screened"] / wall if this["screened"] else float("nan")
        print(f"{label:<20}{wall:>8.1f}{this['screened']:>10}{rate:>11.1f}{peak_text:>17}")
    print("(exams/min from the command's wall time, start-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
