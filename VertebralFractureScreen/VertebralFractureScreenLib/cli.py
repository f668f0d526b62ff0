"""The ``vfscreen`` command line (SPEC §6).

Every failure caused by the user's input is reported as one sentence on stderr with exit
status 2; no traceback is shown for it. Unexpected internal errors exit with status 1 and a
short message that asks for a bug report (``VFS_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import VFSError

EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one sentence (exit 2), like every other input error."""

    def error(self, message):
        raise VFSError(f"{self.prog}: {message} (see '{self.prog} --help').")


def _floats(text: str, count: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VFSError(f"{name} must be numbers separated by commas, got {text!r}.") from None
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise VFSError(f"{name} needs 1 or {count} comma-separated values, got {text!r}.")
    return values


def _trabecular_hu(text: str):
    if "=" not in text:
        return _floats(text, 1, "--trabecular-hu")[0]
    result = {}
    for item in text.split(","):
        level, _, value = item.partition("=")
        try:
            result[level.strip().upper()] = float(value)
        except ValueError:
            raise VFSError(f"--trabecular-hu entry {item!r} is not LEVEL=HU.") from None
    return result


def _add_phantom_parser(commands) -> None:
    p = commands.add_parser(
        "phantom",
        help="write a synthetic spine CT with exact ground truth",
        description="Write a synthetic spine CT (HU), label maps in the totalsegmentator, vertebrae_body and "
        "verse conventions, a tissue map and truth.json with the true heights, grades, HU and muscle metrics.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    p.add_argument("--levels", default="T10-S1", help="levels to draw, e.g. T4-L5 or L1,L2,L3 (default T10-S1)")
    p.add_argument("--spacing", default="1", help="voxel size in mm: one value or i,j,k (default 1)")
    p.add_argument("--size", default=None, help="grid size i,j,k in voxels (default: fit the field of view)")
    p.add_argument("--fov", choices=("spine", "body"), default="spine", help="field of view (default spine)")
    p.add_argument("--orientation", choices=("RAS", "LPS", "oblique"), default="RAS", help="voxel grid axes")
    p.add_argument("--rotate", default="0,0,0", help="anatomy rotation about R,A,S axes in degrees")
    p.add_argument("--lordosis", type=float, default=40.0, help="lumbar lordosis L1-S1 in degrees (default 40)")
    p.add_argument("--kyphosis", type=float, default=35.0, help="thoracic kyphosis T4-T12 in degrees (default 35)")
    p.add_argument("--scoliosis", type=float, default=0.0, help="coronal curve in degrees (default 0)")
    p.add_argument("--no-physiological-wedging", action="store_true",
                   help="make normal vertebrae perfectly rectangular in profile")
    p.add_argument("--fracture", action="append", default=[], metavar="LEVEL:SHAPE:FRACTION",
                   help="e.g. L1:wedge:0.3; shapes wedge, biconcave, crush (repeatable)")
    p.add_argument("--trabecular-hu", default="160", help="trabecular HU: one value or LEVEL=HU,... (default 160)")
    p.add_argument("--cortex-mm", type=float, default=1.0, help="cortical shell thickness (default 1 mm)")
    p.add_argument("--autochthon-fat", type=float, default=0.15, help="intramuscular fat fraction (default 0.15)")
    p.add_argument("--iliopsoas-fat", type=float, default=0.05, help="intramuscular fat fraction (default 0.05)")
    p.add_argument("--contrast", action="store_true", help="contrast-enhanced aorta (250 HU)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise SD in HU (default 0)")
    p.add_argument("--psf-fwhm", type=float, default=0.0, help="Gaussian blur FWHM in mm (default 0)")
    p.add_argument("--supersampling", type=int, default=None,
                   help="odd sub-samples per axis for partial volume (default: sub-sample spacing ≤ 0.5 mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="image file format")
    p.set_defaults(run=_run_phantom)


def _run_phantom(args) -> int:
    from .levels import parse_level_range
    from .phantom import Fracture, PhantomSpec, write_phantom

    try:
        levels = parse_level_range(args.levels)
        fractures = tuple(Fracture.parse(text) for text in args.fracture)
        spec = PhantomSpec(
            levels=levels,
            spacing=_floats(args.spacing, 3, "--spacing"),
            size_ijk=None if args.size is None else tuple(int(v) for v in _floats(args.size, 3, "--size")),
            fov=args.fov,
            grid_orientation=args.orientation,
            rotation_deg=_floats(args.rotate, 3, "--rotate"),
            lordosis_deg=args.lordosis,
            kyphosis_deg=args.kyphosis,
            scoliosis_deg=args.scoliosis,
            physiological_wedging=not args.no_physiological_wedging,
            fractures=fractures,
            trabecular_hu=_trabecular_hu(args.trabecular_hu),
            cortex_mm=args.cortex_mm,
            autochthon_fat_fraction=args.autochthon_fat,
            iliopsoas_fat_fraction=args.iliopsoas_fat,
            contrast=args.contrast,
            noise_hu=args.noise,
            psf_fwhm_mm=args.psf_fwhm,
            supersampling=args.supersampling,
            seed=args.seed,
        )
    except ValueError as error:
        raise VFSError(f"{error}.") from None
    missing = [f.level for f in fractures if f.level not in levels]
    if missing:
        raise VFSError(f"fractured level {', '.join(missing)} is not among the drawn levels {args.levels}.")
    if args.out.exists() and not args.out.is_dir():
        raise VFSError(f"output path {args.out} exists and is not a folder.")
    stale = args.out / "truth.json"
    if stale.exists():
        stale.unlink()  # truth.json marks a complete phantom: never leave an old one beside new images
    started = time.perf_counter()
    paths = write_phantom(spec, args.out, file_format=args.format)
    elapsed = time.perf_counter() - started
    truth = json.loads(paths["truth"].read_text())
    nk, nj, ni = truth["grid"]["shape_kji"]
    print(f"phantom written to {args.out} in {elapsed:.1f} s: {ni}x{nj}x{nk} voxels")
    print("level  complete  Ha_mm  Hm_mm  Hp_mm  grade  shape")
    for v in truth["vertebrae"]:
        print(f"{v['level']:<6} {str(v['complete']):<9} {v['ha_mm']:5.1f}  {v['hm_mm']:5.1f}  {v['hp_mm']:5.1f}"
              f"  {v['genant_grade']:>5}  {v['shape']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="vfscreen",
        description="Opportunistic screening for osteoporotic vertebral fractures on routine CT.",
    )
    parser.add_argument("--version", action="version", version=f"vfscreen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    _add_phantom_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vfscreen``; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_INPUT_ERROR
        return int(args.run(args) or 0)
    except VFSError as error:
        print(f"vfscreen: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("vfscreen: interrupted.", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"vfscreen: {error.strerror or error} ({error.filename or 'file system'}).", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as error:  # noqa: BLE001 - the last line of defence for the command line
        if os.environ.get("VFS_DEBUG"):
            raise
        print(f"vfscreen: internal error ({type(error).__name__}: {error}); please report it "
              "with the command you ran (VFS_DEBUG=1 shows the traceback).", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
