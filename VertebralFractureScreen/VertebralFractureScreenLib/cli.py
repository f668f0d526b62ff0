"""The ``vfscreen`` command line (SPEC §6).

Every failure caused by the user's input is reported as one sentence on stderr with exit
status 2; no traceback is shown for it. Unexpected internal errors exit with status 1 and a
short message that asks for a bug report (``VFS_DEBUG=1`` shows the traceback). Ctrl-C ends every
command with one sentence and exit status 130, also ``vfscreen cohort --workers N``, whose worker
processes are stopped by the command, never by the Ctrl-C itself (see :mod:`.cohort`).

Standard output is only a summary of what the command wrote to its files. When its reader goes
away early (``vfscreen screen ... | head -1``), the rest of the summary is dropped silently (the
standard recipe: the broken pipe is caught and standard output is sent to ``os.devnull``), the
command still finishes every file it writes, and the exit status is the command's own (0 when it
succeeded): a reader that stops reading is not a failure of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import InputError, VFSError

EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_EXAMS_FAILED = 1
"""``vfscreen cohort``: some exams failed (listed in ``errors.csv``; see ``--allow-failures``)."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C, SIGINT): 128 + the signal's number, as shells report it."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one sentence (exit 2), like every other input error."""

    def error(self, message):
        raise VFSError(f"{message} (see '{self.prog} --help').")  # main() prefixes "vfscreen: "


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
                   help="odd sub-samples per axis for partial volume (default: sub-sample spacing ≤ 0.5 mm, "
                        "two more where that draws the 1 mm cortex whole). Fewer draw plates thinner than a "
                        "voxel (cortex, endplates) too faint or not at all, so the image no longer matches "
                        "truth.json (at 3 mm, 1 measures a 30 %% L4 biconcave as 15 %%); the default is fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="image file format")
    p.set_defaults(run=_run_phantom)


def _run_phantom(args) -> int:
    from .levels import parse_level_range
    from .phantom.render import Fracture, PhantomSpec, write_phantom

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


def _add_screen_parser(commands) -> None:
    p = commands.add_parser(
        "screen",
        help="screen one CT exam (SPEC §5 outputs)",
        description="Screen one CT for vertebral fractures: heights, Genant grades, trabecular HU, muscles and a "
                    "QC picture, written to --out as vertebrae.csv, muscles.csv, exam.json and qc.png. Without "
                    "--seg, TotalSegmentator segments the CT (its label maps are kept in OUT/segmentation/).",
    )
    p.add_argument("ct", type=Path, help="CT: NIfTI, NRRD, MetaImage file or DICOM series folder (HU)")
    p.add_argument("--seg", type=Path, help="segmentation with vertebra labels (NIfTI/NRRD label map or .seg.nrrd)")
    p.add_argument("--body-seg", type=Path, help="vertebrae_body segmentation (1 = bodies, 2 = discs)")
    p.add_argument("--out", type=Path, help="output folder (default: ./<exam id>_vfscreen in the current folder; "
                                            "nothing is written beside the inputs)")
    p.add_argument("--exam-id", help="exam name in the outputs (default: the CT's file name): letters and digits of "
                                      "any script and . _ + -, starting with a letter or digit, as in cohorts")
    p.add_argument("--series", help="SeriesInstanceUID to read when the DICOM folder holds several series")
    p.add_argument("--dicom-reference", type=Path, metavar="SERIES",
                   help="the CT's DICOM series (folder) when the CT is given as NIfTI/NRRD: the DICOM objects "
                        "(SEG, SR, QC capture, KOS) are written into OUT/dicom/ against it; a DICOM CT is its own")
    p.add_argument("--no-dicom", action="store_true", help="do not write the DICOM objects of a DICOM CT")
    _add_screening_options(p, labels_of="--seg")
    p.set_defaults(run=_run_screen)


def _add_screening_options(p, labels_of: str) -> None:
    """The options of how an exam is screened, shared by ``screen`` and ``cohort``."""
    p.add_argument("--labels", choices=("totalsegmentator", "verse"), default="totalsegmentator",
                   help=f"label convention of {labels_of} (default: totalsegmentator)")
    p.add_argument("--levels", default="T4-L5", help="levels to report, e.g. T4-L5 (default)")
    p.add_argument("--model", help="fracture model file (JSON) to apply, or 'demo' for the demonstration model")
    p.add_argument("--quality", choices=("fast", "normal"), default="normal",
                   help="TotalSegmentator model: fast (3 mm) or normal (1.5 mm, default)")
    p.add_argument("--device", default="cpu", help="TotalSegmentator device: cpu (default), gpu, gpu:N")
    p.add_argument("--body", action="store_true", help="also run TotalSegmentator's vertebrae_body task")
    p.add_argument("--no-qc", action="store_true", help="skip the QC picture")
    p.add_argument("--segment-ribs", action="store_true", help="TotalSegmentator also segments the ribs, for the "
                                                                  "level check (slower)")
    p.add_argument("--relabel-levels", action="store_true", help="move the vertebra labels by the level shift that "
                   "ribs and sacrum agree on, if then consistent (docs/methods.md); default: report the doubt only")


def _parse_levels(text: str) -> tuple[str, ...]:
    from . import levels as lv

    try:
        return lv.parse_level_range(text)
    except ValueError as error:
        raise VFSError(f"{error}.") from None


def _run_screen(args) -> int:
    from .cohort import checked_exam_id  # the one exam-ID rule, shared with the cohort
    from .exam.screening import exam_id_of, screen_exam

    exam_id = checked_exam_id(args.exam_id, "--exam-id") if args.exam_id is not None else None
    if args.out is None:  # the default folder is named after the exam: its name must stay in this folder
        exam_id = exam_id or checked_exam_id(exam_id_of(args.ct), "the exam ID from the CT's name",
                                             " (give --exam-id or --out)")
    out = args.out or Path.cwd() / f"{exam_id}_vfscreen"
    if out.exists() and not out.is_dir():
        raise VFSError(f"output path {out} exists and is not a folder.")
    if args.no_dicom and args.dicom_reference is not None:
        raise VFSError("--no-dicom and --dicom-reference contradict each other: give one.")
    dicom = args.dicom_reference is not None or (not args.no_dicom and _is_dicom(args.ct))
    try:
        result = screen_exam(args.ct, seg=args.seg, body_seg=args.body_seg, convention=args.labels,
                             exam_id=exam_id, levels=_parse_levels(args.levels), series_uid=args.series,
                             out_dir=out, quality=args.quality, device=args.device, segment_body=args.body,
                             keep_label_maps=dicom,  # the SEG needs the label maps
                             model=args.model, relabel_levels=args.relabel_levels, segment_ribs=args.segment_ribs)
    except InputError as error:  # the library names its argument; on the command line it is --series
        raise InputError(str(error).replace("series_uid", "--series")) from None
    result.write(out, qc=not args.no_qc)
    note = _write_dicom(result, out, args) if dicom else ""
    print(result.table())
    print(result.summary())
    if note:
        print(note)
    print(f"results in {out}")
    return 0


def _is_dicom(ct: Path) -> bool:
    """Whether the CT argument is a DICOM series folder or file (its objects are then written)."""
    return ct.is_dir() or ct.suffix.lower() in (".dcm", ".dicom")


def _write_dicom(result, out: Path, args) -> str:
    """Write the DICOM objects into OUT/dicom/; a line for the terminal. Without the ``dicom`` extra,
    a DICOM CT's objects are skipped with a note; asked for with --dicom-reference, it is an error."""
    from .errors import DependencyError
    from .report.dicom_objects import write_dicom_objects

    required = args.dicom_reference is not None
    try:
        written = write_dicom_objects(result, out, reference=args.dicom_reference, series_uid=args.series,
                                      required=required)
    except DependencyError as error:
        if required:
            raise
        return f"DICOM objects not written: {error}"
    return f"DICOM objects ({', '.join(sorted(written))}) in {out / 'dicom'}" if written else ""


def _add_cohort_parser(commands) -> None:
    p = commands.add_parser(
        "cohort",
        help="screen many exams (a folder or a CSV manifest), resumable, locally or on a Dask cluster",
        description="Screen every exam of a folder or CSV manifest into OUT/exams/<exam_id>/ (SPEC §5 files) and "
                    "write OUT/features.csv, OUT/errors.csv, OUT/cohort.json and OUT/cohort.log. A failing exam "
                    "never stops the others; a re-run skips finished exams. Folder rule: every CT file or DICOM "
                    "series folder is an exam; its segmentation is <exam>_seg / <exam>_total (and <exam>_body "
                    "for vertebrae_body) beside it, else TotalSegmentator segments it. Manifest: columns ct "
                    "[,exam_id, seg, body_seg, labels, series]; other columns are passed through to features.csv. "
                    "errors.csv lists each failed exam with its kind: 'input' (a re-run skips it; --retry-failed "
                    "screens it again) or 'environment' (disk full, permission denied, out of memory, a killed "
                    "worker: a plain re-run screens it again). Exit status: 0 when every exam is finished; 1 when "
                    "any exam failed, in this run or an earlier one (see --allow-failures); 2 for bad inputs or an "
                    "unusable output folder, with one sentence on stderr; 130 when interrupted (Ctrl-C), which "
                    "stops the workers and keeps the finished exams.",
    )
    p.add_argument("inputs", type=Path, help="folder of exams or CSV manifest")
    p.add_argument("--out", type=Path, required=True, help="cohort output folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: no Dask)")
    where.add_argument("--scheduler", help="address (tcp://host:port) or scheduler file of a Dask cluster")
    _add_screening_options(p, labels_of="the given segmentations")
    p.add_argument("--retry-failed", action="store_true", help="screen the exams that failed before again")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when exams failed because of their input (for pipelines that read "
                        "OUT/errors.csv); failures of the environment (disk full, permissions, memory, a killed "
                        "worker) still exit 1, since a re-run would screen those exams")
    p.add_argument("--segment-resources", metavar="NAME=N[,...]",
                   help="Dask worker resources for TotalSegmentator tasks, e.g. GPU=1 (cluster only)")
    p.add_argument("--measure-resources", metavar="NAME=N[,...]",
                   help="Dask worker resources for measurement tasks (cluster only)")
    p.set_defaults(run=_run_cohort, interrupted="; the finished exams are kept, and running the same command again "
                                                "screens the others")


def _run_cohort(args) -> int:
    from .cohort import CohortSettings, TerminalProgress, run_cohort

    settings = CohortSettings.from_options(args, _parse_levels(args.levels))
    summary = run_cohort(args.inputs, args.out, settings=settings, workers=args.workers, scheduler=args.scheduler,
                         retry_failed=args.retry_failed, segment_resources=args.segment_resources,
                         measure_resources=args.measure_resources, progress=TerminalProgress())
    print(summary.text())
    print(f"features in {args.out / 'features.csv'}; errors in {args.out / 'errors.csv'}; log {args.out / 'cohort.log'}")
    if summary.unfinished:
        return EXIT_INPUT_ERROR
    if summary.failed_environment:
        print(f"vfscreen: {summary.failed_environment} of {summary.exams} exams failed because of the environment "
              f"(see {args.out / 'errors.csv'}); running the same command again screens them.", file=sys.stderr)
        return EXIT_EXAMS_FAILED
    if summary.failed and not args.allow_failures:
        print(f"vfscreen: {summary.failed} of {summary.exams} exams failed (see {args.out / 'errors.csv'}); "
              "--allow-failures exits 0 in that case.", file=sys.stderr)
        return EXIT_EXAMS_FAILED
    return 0


def _add_train_parser(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a fracture model on a cohort's features.csv with a label column",
        description="Train a fracture model (median imputation, standardisation, logistic regression or gradient "
                    "boosting) on FEATURES.csv (from 'vfscreen cohort') with a 0/1 label column. Stratified k-fold "
                    "cross-validation with every fitted step inside the folds gives the AUC with a bootstrap 95 % CI, "
                    "sensitivity/specificity/PPV/NPV at the target specificity and at Youden's point, ROC and "
                    "calibration plots and a report; the model is then fitted on all exams and saved as JSON.",
    )
    p.add_argument("features", type=Path, help="features.csv with a label column")
    p.add_argument("--label", required=True, help="column with 1 (fracture) / 0 (none)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (JSON)")
    p.add_argument("--kind", choices=("logistic", "gradient-boosting"), default="logistic",
                   help="model (default: logistic regression)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold split and the bootstrap (default 0)")
    p.add_argument("--target-specificity", type=float, default=0.95,
                   help="specificity of the operating point (default 0.95, as the published model)")
    p.add_argument("--name", help="model name shown with its probabilities (default: kind and cohort size)")
    p.add_argument("--report", type=Path, help="report folder (default: MODEL_report beside the model file)")
    p.set_defaults(run=_run_train)


def _report_folder(path: Path, suffix: str) -> Path:
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{name}_{suffix}")


def _run_train(args) -> int:
    from .model.fracture_model import read_feature_table
    from .model.training import train_model

    table = read_feature_table(args.features, args.label)
    result = train_model(table, kind=args.kind, folds=args.folds, seed=args.seed,
                         target_specificity=args.target_specificity, name=args.name)
    report = args.report or _report_folder(args.out, "report")
    _report(report, result.model, result.model.training["cross_validation"], table.labels, result.out_of_fold,
            f"{args.folds}-fold cross-validation")
    result.model.save(args.out)
    print(f"model written to {args.out}; report in {report}")
    return 0


def _report(folder: Path, model, metrics: dict, labels, probabilities, what: str) -> None:
    """Write a model report (plots, text, HTML) and print its summary."""
    from .model.report import summary_lines, write_report

    write_report(folder, model, metrics, labels, probabilities, what=what)
    print("\n".join(summary_lines(model, metrics, what=what)))


def _add_evaluate_parser(commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="evaluate a fracture model on another cohort's features.csv",
        description="Apply MODEL.json to the exams of FEATURES.csv and report its AUC (bootstrap 95 % CI), "
                    "sensitivity/specificity/PPV/NPV at the model's threshold and at Youden's point, ROC and "
                    "calibration plots.",
    )
    p.add_argument("model", help="model file (JSON), or 'demo'")
    p.add_argument("features", type=Path, help="features.csv with a label column")
    p.add_argument("--label", required=True, help="column with 1 (fracture) / 0 (none)")
    p.add_argument("--report", type=Path, help="report folder (default: FEATURES_evaluation beside the table)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .model.fracture_model import read_feature_table, resolve_model
    from .model.training import evaluate_model

    model = resolve_model(args.model)
    table = read_feature_table(args.features, args.label)
    metrics, probabilities = evaluate_model(model, table, seed=args.seed)
    report = args.report or _report_folder(args.features, "evaluation")
    _report(report, model, metrics, table.labels, probabilities, f"evaluation on {args.features.name}")
    print(f"report in {report}")
    return 0


def _add_demo_parser(commands) -> None:
    p = commands.add_parser(
        "demo",
        help="make a phantom with fractures, screen it and print the results",
        description="Render a small synthetic spine CT with three fractures (a wedge, a biconcave and a crush "
                    "fracture) in a temporary folder, screen it and print the per-vertebra table and the exam "
                    "summary beside the phantom's truth.",
    )
    p.add_argument("--out", type=Path, help="keep the phantom and the results in this folder")
    p.set_defaults(run=_run_demo)


def _add_setup_segmentation_parser(commands) -> None:
    from .segment.install import TORCH_BUILDS, WEIGHT_TASKS

    p = commands.add_parser(
        "setup-segmentation",
        help="install PyTorch, TotalSegmentator and its model weights (needs internet access)",
        description="Install, into this Python: PyTorch (unless one is installed; --torch chooses the build), "
                    "TotalSegmentator and nnU-Net at the versions this package is tested with, and the model "
                    "weights screening uses, after showing their licence terms. Screening never downloads "
                    "anything itself; after this, 'vfscreen screen CT --out DIR' segments and screens.",
    )
    p.add_argument("--torch", choices=tuple(TORCH_BUILDS), default="cpu",
                   help="PyTorch build to install when none is installed (default: cpu; cu126/cu128 need an NVIDIA "
                        "driver for that CUDA version)")
    p.add_argument("--weights", default="fast,normal,body", metavar="LIST",
                   help=f"comma-separated weights to download, of {', '.join(WEIGHT_TASKS)} (default: all; fast is "
                        "--quality fast, normal the default quality, body the vertebrae_body map for --body)")
    p.add_argument("--yes", action="store_true", help="accept the licence terms without asking")
    p.add_argument("--dry-run", action="store_true", help="print the terms and the commands, install nothing")
    p.set_defaults(run=_run_setup_segmentation)


def _run_setup_segmentation(args) -> int:
    from .segment.install import WEIGHT_TASKS, setup_segmentation

    tasks = [t.strip() for t in args.weights.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in WEIGHT_TASKS]
    if unknown or not tasks:
        raise InputError(f"--weights {args.weights!r}: choose from {', '.join(WEIGHT_TASKS)}")
    return setup_segmentation(torch_build=args.torch, tasks=tasks, dry_run=args.dry_run, accept_licence=args.yes)


DEMO_FRACTURES = ("T12:biconcave:0.3", "L1:wedge:0.35", "L3:crush:0.45")
DEMO_TRABECULAR_HU = 95.0
"""Osteoporotic trabecular bone (below Pickhardt's 110 HU), as fits a spine with three fractures."""


def _run_demo(args) -> int:
    import tempfile

    from . import levels as lv
    from .phantom.render import Fracture, PhantomSpec, write_phantom
    from .exam.screening import screen_exam

    spec = PhantomSpec(levels=lv.parse_level_range("T11-S1"), spacing=(1.5, 1.5, 1.5), fov="body",
                       fractures=tuple(Fracture.parse(f) for f in DEMO_FRACTURES), noise_hu=15.0, seed=7,
                       trabecular_hu=DEMO_TRABECULAR_HU)
    with tempfile.TemporaryDirectory(prefix="vfscreen-demo-") as scratch:
        root = args.out or Path(scratch)
        started = time.perf_counter()
        print(f"rendering a phantom spine T11–S1 at 1.5 mm with fractures {', '.join(DEMO_FRACTURES)} ...")
        paths = write_phantom(spec, root / "phantom")
        rendered = time.perf_counter() - started
        started = time.perf_counter()
        from .model.fracture_model import demo_model_path

        model = "demo" if demo_model_path().is_file() else None  # the demonstration model, where it ships
        result = screen_exam(paths["ct"], seg=paths["total"], body_seg=paths["vertebrae_body"], exam_id="demo-phantom",
                             model=model)
        out = root / "results"
        result.write(out)
        screened = time.perf_counter() - started
        truth = {v["level"]: v for v in json.loads(paths["truth"].read_text())["vertebrae"]}
        print(f"phantom rendered in {rendered:.1f} s; screened (with QC picture) in {screened:.1f} s\n")
        lines = result.table().splitlines()
        print(lines[0] + "   truth: grade shape")
        for line, row in zip(lines[1:], result.vertebrae):
            t = truth.get(row["level"], {})
            print(f"{line}   {t.get('genant_grade', '–')}     {t.get('shape', '')}")
        print()
        print(result.summary())
        print("\nThis is a synthetic phantom: a demonstration, not a clinical result.")
        print(f"results in {out}" if args.out else "(run 'vfscreen demo --out DIR' to keep the files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="vfscreen",
        description="Opportunistic screening for osteoporotic vertebral fractures on routine CT.",
    )
    parser.add_argument("--version", action="version", version=f"vfscreen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    _add_screen_parser(commands)
    _add_cohort_parser(commands)
    _add_train_parser(commands)
    _add_evaluate_parser(commands)
    _add_demo_parser(commands)
    _add_phantom_parser(commands)
    _add_setup_segmentation_parser(commands)
    from .pacs.commands import add_pacs_parser  # the logic lives in pacs/ (docs/pacs.md)

    add_pacs_parser(commands, _add_screening_options)
    return parser


class _StdoutGuard:
    """``sys.stdout`` while a command runs: once its reader has closed the pipe, the rest of the
    output is dropped (and the file descriptor pointed at ``os.devnull``, so that flushing at exit
    does not fail either) instead of stopping the command half-way (see the module docstring)."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, text):
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._to_devnull()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._to_devnull()

    def _to_devnull(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # a stream without a file descriptor: dropping is enough
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vfscreen``; returns the process exit status (a closed standard output does
    not change it: see the module docstring)."""
    if sys.stdout is None:  # no console at all (pythonw)
        return _main(argv)
    guard = _StdoutGuard(sys.stdout)
    sys.stdout = guard
    try:
        return _main(argv)
    finally:
        if sys.stdout is guard:
            sys.stdout = guard.stream


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_INPUT_ERROR
        status = int(args.run(args) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # a reader gone before the last line is noticed here, not at exit
        return status
    except VFSError as error:
        print(f"vfscreen: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"vfscreen: interrupted{getattr(args, 'interrupted', '')}.", file=sys.stderr)
        return EXIT_INTERRUPTED
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
