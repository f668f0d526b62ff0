#!/usr/bin/env python
"""Are the outputs of ``vfscreen screen`` unchanged by a refactoring? Snapshot, then diff.

``snapshot OUT`` screens two fixed exams with the library found first on ``sys.path`` (set
``PYTHONPATH`` to another checkout's ``VertebralFractureScreen`` folder to snapshot that one):

* ``demo``: the demonstration phantom (``vfscreen demo``'s spec), rendered once into ``--inputs``
  and reused, so a change to the renderer does not show as a change of the screening;
* ``example``: the shared TotalSegmentator example CT with its segmentation (skipped when
  ``Testing/shared_data.shared_data_dir()`` is absent).

Each is screened with the demonstration model and the QC picture. ``diff A B`` compares two
snapshots: ``vertebrae.csv`` and ``muscles.csv`` as text, ``exam.json`` as data with the fields
that change from run to run left out (timings, dates, the software version), ``qc.png`` as
pixels. Prints one line per file and exits 1 when anything differs.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/compare_outputs.py snapshot /tmp/before
    # ... change the code ...
    .venv/bin/python Testing/benchmarks/compare_outputs.py snapshot /tmp/after
    .venv/bin/python Testing/benchmarks/compare_outputs.py diff /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared_data import shared_data_dir  # noqa: E402

DEFAULT_INPUTS = Path.home() / ".cache" / "vfscreen-bench" / "compare-inputs"
VOLATILE_KEYS = {"timings", "timings_s", "created_utc", "software_version", "version", "date", "screened_utc", "file"}
"""exam.json keys whose values change from run to run (or with the checkout: the model file's path);
left out of the comparison at any depth."""

RENDER_DEMO = """
import sys
from pathlib import Path
from VertebralFractureScreenLib import cli, levels as lv
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom
spec = PhantomSpec(levels=lv.parse_level_range("T11-S1"), spacing=(1.5, 1.5, 1.5), fov="body",
                   fractures=tuple(Fracture.parse(f) for f in cli.DEMO_FRACTURES), noise_hu=15.0, seed=7,
                   trabecular_hu=cli.DEMO_TRABECULAR_HU)
write_phantom(spec, Path(sys.argv[1]))
"""

SCREEN = """
import sys
from VertebralFractureScreenLib.cli import main
sys.exit(main(["screen", *sys.argv[1:]]))
"""


def _python(code: str, *args) -> None:
    subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True)


def exams(inputs: Path) -> dict[str, tuple[Path, Path, Path | None]]:
    """The exams to screen: name → (CT, total segmentation, vertebrae_body map or None)."""
    demo = inputs / "demo"
    if not (demo / "ct.nii.gz").is_file():
        print(f"rendering the demo phantom into {demo} (once) ...", flush=True)
        _python(RENDER_DEMO, demo)
    found = {"demo": (demo / "ct.nii.gz", demo / "total.nii.gz", demo / "vertebrae_body.nii.gz")}
    shared = shared_data_dir()
    if (shared / "example_ct.nii.gz").is_file():
        found["example"] = (shared / "example_ct.nii.gz", shared / "example_seg_fast_force_split.nii.gz", None)
    else:
        print(f"no shared example CT in {shared}: only the demo phantom is compared")
    return found


def snapshot(out: Path, inputs: Path) -> None:
    for name, (ct, seg, body) in exams(inputs).items():
        args = [ct, "--seg", seg, "--out", out / name, "--exam-id", name, "--model", "demo"]
        if body is not None:
            args += ["--body-seg", body]
        _python(SCREEN, *args)
    print(f"snapshot in {out} (library: {_library_path()})")


def _library_path() -> str:
    result = subprocess.run([sys.executable, "-c", "import VertebralFractureScreenLib as v; print(v.__file__)"],
                            capture_output=True, text=True, check=True, env=os.environ)
    return result.stdout.strip()


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key} only in {'B' if key not in a else 'A'}"
            found = _first_difference(a[key], b[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for index, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{index}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def diff(a: Path, b: Path) -> int:
    import numpy as np
    from matplotlib.image import imread

    changed = 0
    for folder in sorted(p.name for p in a.iterdir() if p.is_dir()):
        for name in ("vertebrae.csv", "muscles.csv", "exam.json", "qc.png"):
            fa, fb = a / folder / name, b / folder / name
            if not fa.exists() and not fb.exists():
                continue
            if not (fa.exists() and fb.exists()):
                problem = f"only in {'A' if fa.exists() else 'B'}"
            elif name.endswith(".csv"):
                la, lb = fa.read_text().splitlines(), fb.read_text().splitlines()
                lines = [i for i, (x, y) in enumerate(zip(la, lb)) if x != y]
                problem = (f"{len(la)} vs {len(lb)} lines" if len(la) != len(lb)
                           else f"line {lines[0] + 1} differs" if lines else None)
            elif name == "exam.json":
                problem = _first_difference(_stable(json.loads(fa.read_text())), _stable(json.loads(fb.read_text())))
            else:
                pa, pb = imread(fa), imread(fb)
                problem = (f"picture size {pa.shape} vs {pb.shape}" if pa.shape != pb.shape
                           else f"{int(np.count_nonzero(np.any(pa != pb, axis=-1)))} pixels differ"
                           if np.any(pa != pb) else None)
            changed += problem is not None
            print(f"{folder}/{name}: {problem or 'identical'}")
    print("identical" if not changed else f"{changed} files differ")
    return 1 if changed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("snapshot", help="screen the fixed exams into OUT")
    p.add_argument("out", type=Path)
    p.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS, help="where the rendered demo phantom is kept")
    p = commands.add_parser("diff", help="compare two snapshots")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        snapshot(args.out, args.inputs)
        return 0
    return diff(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
