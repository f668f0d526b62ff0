"""``vfscreen pacs``: query, screen, watch and cohort straight from a PACS (``docs/pacs.md``).

* ``vfscreen pacs query``: the matching studies and the series each would screen (or why none);
* ``vfscreen pacs screen``: pull, screen and push every matching study, into ``OUT/<StudyInstanceUID>/``;
* ``vfscreen pacs watch``: poll for new CT studies and screen each once (:mod:`.watch`);
* ``vfscreen pacs cohort``: the matching studies as a cohort (:mod:`.cohort_exams`).

The connection options (``--config``, ``--url``, ``--host``...) are shared; a password comes from
the configuration file or ``VFS_PACS_PASSWORD`` only. Exit status: 0 when every study is done; 1
when a study failed (each is one sentence on stderr, and stays to be retried); 2 for bad input or
a PACS that cannot be searched (one sentence); 130 when interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import VFSError
from .config import load_config
from .connection import StudyQuery, connect
from .journal import Journal
from .selection import MIN_SLICES, choose_series, describe
from .study import ScreenOptions, screen_study
from .watch import DEFAULT_INTERVAL_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_SINCE_DAYS, watch

EXIT_STUDIES_FAILED = 1


def add_pacs_parser(commands, add_screening_options) -> None:
    """The ``pacs`` command group under ``commands`` (argparse sub-parsers); ``add_screening_options``
    adds ``vfscreen screen``'s options (labels, levels, model, TotalSegmentator settings)."""
    group = commands.add_parser("pacs", help="query, screen, watch and cohort straight from a PACS (DICOMweb or DIMSE)",
                                description="Screen CT studies straight from a PACS: query by patient, study, "
                                            "accession number or date; pull the CT series chosen by the rules of "
                                            "docs/pacs.md; screen; push the SEG, SR, QC capture and KOS back.")
    sub = group.add_subparsers(dest="pacs_command", metavar="ACTION", parser_class=type(group))
    group.set_defaults(run=lambda args: _dispatch(args, group))
    query = sub.add_parser("query", help="list the matching studies and the series each would screen")
    _connection_options(query)
    _query_options(query, required=True)
    query.add_argument("--min-slices", type=int, default=MIN_SLICES, help=f"fewest images (default {MIN_SLICES})")
    query.set_defaults(pacs_run=run_query)
    screen = sub.add_parser("screen", help="pull, screen and push the matching studies")
    _connection_options(screen)
    _query_options(screen, required=True)
    _screen_options(screen, add_screening_options)
    screen.set_defaults(pacs_run=run_screen, interrupted="; running the same command again resumes it")
    watcher = sub.add_parser("watch", help="poll the PACS and screen each new CT study once")
    _connection_options(watcher)
    _screen_options(watcher, add_screening_options)
    watcher.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between polls (default 60)")
    watcher.add_argument("--since-days", type=int, default=DEFAULT_SINCE_DAYS,
                         help="poll the studies of the last N days, today included (default 1: today and yesterday)")
    watcher.add_argument("--once", action="store_true", help="poll once and exit (for cron)")
    watcher.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                         help="stop trying a failing study after N attempts (default 5)")
    watcher.add_argument("--retry-failed", action="store_true", help="try studies that reached --max-attempts again")
    watcher.set_defaults(pacs_run=run_watch, interrupted="; running the same command again resumes it")
    cohort = sub.add_parser("cohort", help="screen the matching studies as a cohort (vfscreen cohort's engine)")
    _connection_options(cohort)
    _query_options(cohort, required=True)
    _cohort_options(cohort, add_screening_options)
    cohort.set_defaults(pacs_run=run_cohort, interrupted="; the finished exams are kept, and running the same command "
                                                    "again screens the others")


def _dispatch(args, parser) -> int:
    """Run the chosen action; without one, the group's help and exit status 2."""
    if getattr(args, "pacs_run", None) is None:
        parser.print_help()
        return 2
    return args.pacs_run(args)


def _connection_options(p) -> None:
    p.add_argument("--config", type=Path, help="PACS configuration file (JSON; default: $VFS_PACS_CONFIG)")
    p.add_argument("--protocol", choices=("dicomweb", "dimse"), help="default: dicomweb with --url, dimse with --host")
    p.add_argument("--url", help="DICOMweb base URL, e.g. https://pacs.example.org/dicom-web")
    p.add_argument("--ca-bundle", help="CA certificates (PEM) that sign the server's TLS certificate")
    p.add_argument("--host", help="DIMSE host")
    p.add_argument("--port", help="DIMSE port")
    p.add_argument("--called-aet", help="the PACS's AE title (DIMSE)")
    p.add_argument("--calling-aet", help="this client's AE title (DIMSE; default VFSCREEN)")


def _query_options(p, required: bool) -> None:
    p.add_argument("--study", help="StudyInstanceUID")
    p.add_argument("--patient", help="PatientID")
    p.add_argument("--accession", help="AccessionNumber")
    p.add_argument("--date", help="StudyDate or range, YYYYMMDD[-YYYYMMDD]")


def _screen_options(p, add_screening_options) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder: OUT/<StudyInstanceUID>/ per study and the "
                                                           "journal OUT/pacs-journal.json")
    p.add_argument("--seg-dir", type=Path, help="folder of given segmentations, <StudyInstanceUID>.nii.gz (and "
                                                "<StudyInstanceUID>_body.nii.gz); default: TotalSegmentator segments")
    p.add_argument("--min-slices", type=int, default=MIN_SLICES, help=f"fewest images of a series (default {MIN_SLICES})")
    add_screening_options(p, labels_of="--seg-dir's segmentations")


def _cohort_options(p, add_screening_options) -> None:
    p.add_argument("--out", type=Path, required=True, help="cohort output folder (as vfscreen cohort's; the pulled "
                                                           "series in OUT/pacs-series/)")
    p.add_argument("--seg-dir", type=Path, help="folder of given segmentations, <StudyInstanceUID>.nii.gz")
    p.add_argument("--min-slices", type=int, default=MIN_SLICES, help=f"fewest images of a series (default {MIN_SLICES})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: no Dask)")
    where.add_argument("--scheduler", help="address or scheduler file of a Dask cluster")
    add_screening_options(p, labels_of="--seg-dir's segmentations")
    p.add_argument("--retry-failed", action="store_true", help="screen the exams that failed before again")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 when only exams' own inputs failed")
    p.set_defaults(segment_resources=None, measure_resources=None)


def _config(args):
    overrides = {"protocol": args.protocol, "url": args.url, "ca_bundle": args.ca_bundle, "host": args.host,
                 "port": args.port, "called_aet": args.called_aet, "calling_aet": args.calling_aet}
    return load_config(args.config, overrides)


def _query(args) -> StudyQuery:
    return StudyQuery(study_uid=args.study, patient_id=args.patient, accession=args.accession, dates=args.date)


def _options(args) -> ScreenOptions:
    from ..cli import _parse_levels  # the command line's one levels rule
    from ..cohort import CohortSettings

    if args.min_slices < 1:
        raise VFSError(f"--min-slices must be at least 1, not {args.min_slices}.")
    if args.seg_dir is not None and not args.seg_dir.is_dir():
        raise VFSError(f"--seg-dir {args.seg_dir} is not a folder.")
    if args.out.exists() and not args.out.is_dir():
        raise VFSError(f"output path {args.out} exists and is not a folder.")
    settings = CohortSettings.from_options(args, _parse_levels(args.levels))
    return ScreenOptions(settings, seg_dir=args.seg_dir, min_slices=args.min_slices)


def run_query(args) -> int:
    config, query = _config(args), _query(args)
    with connect(config) as connection:
        studies = connection.find_studies(query)
        if not studies:
            print(f"no study in {connection.describe()} matches")
        for study in studies:
            uid = study.get("StudyInstanceUID")
            try:
                chosen = describe(choose_series(connection.find_series(uid), args.min_slices, "it"))
            except VFSError as error:
                chosen = f"nothing to screen: {str(error).rstrip('.')}"
            print(f"{uid}  {study.get('StudyDate', '')}  accession {study.get('AccessionNumber', '-')}  {chosen}")
    return 0


def run_screen(args) -> int:
    config, query, options = _config(args), _query(args), _options(args)
    journal = Journal(args.out)
    failed = 0
    with journal.locked(), connect(config) as connection:
        studies = connection.find_studies(query)
        if not studies:
            raise VFSError(f"{connection.describe()} has no study matching the query.")
        for study in studies:
            uid = str(study.get("StudyInstanceUID"))
            try:
                print(screen_study(connection, uid, args.out, options, journal))
            except VFSError as error:
                failed += 1
                print(f"vfscreen: study {uid}: {str(error).rstrip('.')} (not marked done; running the same command "
                      "again retries it).", file=sys.stderr)
    return EXIT_STUDIES_FAILED if failed else 0


def run_watch(args) -> int:
    config, options = _config(args), _options(args)
    if args.interval <= 0 or args.since_days < 0 or args.max_attempts < 1:
        raise VFSError("--interval must be positive, --since-days at least 0 and --max-attempts at least 1.")
    print(f"watching {config.describe()} every {args.interval:g} s for CT studies of the last {args.since_days} "
          f"day(s); results in {args.out}", flush=True)
    return watch(lambda: connect(config), args.out, options, interval_s=args.interval, since_days=args.since_days,
                 once=args.once, max_attempts=args.max_attempts, retry_failed=args.retry_failed)


def run_cohort(args) -> int:
    from ..cli import _run_cohort  # the cohort command's own run: its engine, summary and exit status
    from .cohort_exams import pacs_exams

    config, query, options = _config(args), _query(args), _options(args)
    with connect(config) as connection:
        exams, skipped = pacs_exams(connection, query, args.out, seg_dir=options.seg_dir,
                                    min_slices=options.min_slices)
    for line in skipped:
        print(f"vfscreen: {line} (left out of the cohort).", file=sys.stderr)
    if not exams:
        raise VFSError(f"no study of the query has a CT series to screen ({len(skipped)} left out).")
    args.inputs = exams
    status = _run_cohort(args)
    return status or (EXIT_STUDIES_FAILED if skipped and not args.allow_failures else 0)
