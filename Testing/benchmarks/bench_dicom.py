#!/usr/bin/env python
"""Speed of the DICOM objects (SEG, TID 1500 SR, QC Secondary Capture, KOS) of a full-size exam.

The 512 x 512 x 500 phantom of ``bench_morphometry_speed.py`` (T1–L5, four fractures, 0.8 x 0.8 x
1 mm, cached) is written as a DICOM CT series of 500 single-frame instances (fresh UIDs) into a
scratch folder, screened from that folder with its ``total`` and ``vertebrae_body`` label maps and
the demonstration model (T4–L5: 14 vertebrae, 14 trabecular ROIs, 4 muscles on 15 level slabs), and
its results folder written (``qc.png`` included). Then
``report.dicom_objects.write_dicom_objects`` runs ``--repeat`` times and the import of pydicom and
highdicom is timed in a fresh Python: the first run plus that import is what a fresh ``vfscreen``
process spends. Prints each run's wall time
and steps (``reference``: reading the 500 headers and matching them to the CT's grid;
``segments``: the segments' masks; ``seg``, ``sr``, ``sc``, ``kos``: each object built and
written), the CPU time of each run (wall time well above it means the machine is busy), the
SEG's frames and the files' sizes. Goal (issue 29): under 3 s.

``--exam-dir DIR`` keeps the DICOM series and the results in DIR (written when absent, reused
afterwards: the screening is then read back from nothing; it runs again).

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_dicom.py --repeat 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench_common as bc  # noqa: E402
import bench_morphometry_speed as speed  # noqa: E402
from test_dicom_objects import write_ct_series  # noqa: E402

from VertebralFractureScreenLib.exam.screening import screen_exam  # noqa: E402
from VertebralFractureScreenLib.io.volume import Volume  # noqa: E402

GOAL_SECONDS = 3.0


def import_seconds() -> float:
    """Seconds to import pydicom and highdicom in a fresh Python (this process has them already:
    the series writer uses pydicom)."""
    code = "import time; t = time.perf_counter(); import pydicom, highdicom; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def screened_exam(folder: Path, cache: Path):
    """The phantom's DICOM series in ``folder/ct`` (written when absent), screened; its results
    folder ``folder/out`` written."""
    slice_mm, _ = speed.slice_spacing_that_fits()
    spec = speed.make_spec(slice_mm)
    if not bc.is_cached(spec, cache):
        print("rendering the 512x512x500 phantom (several minutes, cached afterwards) ...", flush=True)
        bc.render_to_cache(spec, cache)
    phantom = bc.load_cached(spec, cache)
    series = folder / "ct"
    if not (series / "done").exists():
        print(f"writing the {phantom.ct.shape[0]}-slice DICOM series into {series} ...", flush=True)
        write_ct_series(series, phantom.ct, phantom.ijk_to_ras)
        (series / "done").write_text("")
    started = time.perf_counter()
    result = screen_exam(series, seg=Volume(phantom.total, phantom.ijk_to_ras),
                         body_seg=Volume(phantom.vertebrae_body, phantom.ijk_to_ras), model="demo")
    result.write(folder / "out")
    print(f"screened in {time.perf_counter() - started:.1f} s: {len(result.vertebrae)} vertebrae, "
          f"{len(result.muscles)} muscle rows")
    return result, folder / "out"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE)
    parser.add_argument("--exam-dir", type=Path, help="keep the DICOM series and the results here and reuse them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfscreen-bench-dicom-") as scratch:
        folder = args.exam_dir.expanduser() if args.exam_dir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result, out = screened_exam(folder, args.cache)
        from VertebralFractureScreenLib.report.dicom_objects import write_dicom_objects

        walls, cpus, steps = [], [], []
        for _ in range(args.repeat):
            steps.append({})
            started, cpu = time.perf_counter(), time.process_time()
            paths = write_dicom_objects(result, out, timings=steps[-1])
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        import pydicom

        frames = int(pydicom.dcmread(str(paths["seg"]), stop_before_pixels=True).NumberOfFrames)
    print(f"DICOM objects of the 512 x 512 x 500 exam ({len(result.vertebrae)} vertebrae), {args.repeat} runs")
    imports = import_seconds()
    cold = walls[0] + imports
    print(f"  wall per run: {', '.join(f'{w:.2f}' for w in walls)} s (best {min(walls):.2f} s); importing pydicom and "
          f"highdicom in a fresh process {imports:.2f} s: as in a fresh `vfscreen` process {cold:.2f} s (goal < "
          f"{GOAL_SECONDS:g} s)")
    print(f"  CPU per run: {', '.join(f'{c:.2f}' for c in cpus)} s (this process, all threads; wall above it means "
          "waiting: for the disk, or for other processes on a busy machine)")
    for number, parts in enumerate(steps, start=1):
        print(f"  run {number} steps (s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items()))
    print(f"  SEG: {frames} frames; files: " + ", ".join(f"{name} {size / 2**20:.1f} MiB"
                                                      for name, size in sizes.items()))
    print("[PASS]" if max(cold, *walls) < GOAL_SECONDS else "[FAIL]", "speed goal (a fresh process's first run, "
          "imports included, and every run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
