"""Screening a cohort: many exams, resumable, on one machine or a Dask cluster (``vfscreen cohort``).

:func:`run_cohort` is the engine behind ``vfscreen cohort`` and batch use from Slicer's Python
console. It finds the exams (:func:`find_exams`: a folder, a CSV manifest or a list of CT files,
rules in :mod:`.exams`), screens each one with :func:`.screening.screen_exam` into its own SPEC §5
folder, and then writes the cohort's tables.

Outputs in ``OUT``:

* ``exams/<exam_id>/``: the exam's SPEC §5 files (``exam.json`` last: it marks a finished
  exam), TotalSegmentator's label maps under ``segmentation/`` when it ran, or ``error.json``
  (stage and one-sentence reason) when the exam failed;
* ``features.csv``: one row per finished exam, in input order: ``exam_id``, the manifest's
  pass-through columns, ``features_version`` and the :mod:`.features` columns;
* ``errors.csv``: ``exam_id, stage, reason, kind`` for every failed exam; ``kind`` is ``input``
  (the exam itself cannot be screened: a re-run skips it) or ``environment`` (the machine failed
  it: disk full or over quota, permission denied, read-only file system, out of memory, a killed
  worker, a missing dependency; a plain re-run screens it again);
* ``predictions.csv`` (with a model): ``exam_id, model, probability, threshold, positive,
  demonstration, imputed_features`` per finished exam; a re-run with another ``--model`` applies
  it to the finished exams from their results, without screening them again;
* ``cohort.json``: the run summary (counts, time, exams per minute, peak memory per worker);
* ``cohort.log``: one line per exam and run, appended.

Robustness: a failing exam is recorded and never stops the others. A re-run skips finished exams
and exams whose input failed (``retry_failed=True`` tries those again too) and screens again the
exams that failed because of the environment, so a finished cohort re-runs in seconds and rewrites
none of its exam folders or tables. A folder exam whose file name cannot be an exam ID (see
:func:`find_exams`) is recorded as an input failure, and the others are screened. When even the
exam's ``error.json`` cannot be written (a full disk), its failure is still counted and listed in
``errors.csv`` if that can be written, and a re-run screens it again. The tables and
``cohort.json`` are written atomically; when that fails (a full disk) :func:`run_cohort` raises an
:class:`.errors.InputError` with one sentence, and the previous tables stay as they were. A log line
that cannot be written is dropped (never a traceback on the console).

Exit status of ``vfscreen cohort``: 0 when every exam is finished; 1 when any exam failed, in this
run or an earlier one (``errors.csv`` lists them), unless ``--allow-failures`` is given and every
failure is of kind ``input`` (pipelines that read ``errors.csv``); environment failures exit 1
even then, since a re-run would screen them. 2 for bad inputs or an unusable output folder
(one sentence on stderr, as for every command). Every file is written atomically, each
exam is screened under an exclusive lock on its folder (``fcntl.flock``, where the platform has
it) and its staging leftovers from a killed run are removed before it starts again, so killing a
run at any moment and re-running it ends with every exam done exactly once.

Interrupting a run (Ctrl-C, SIGINT) ends it as cleanly in parallel as in this process: the
exams being screened stop, their staging leftovers are removed, the tables are written for the
finished exams and :func:`run_cohort` raises ``KeyboardInterrupt`` (``vfscreen`` prints one
sentence and exits 130); a re-run keeps the finished exams and screens the others. A local
cluster's worker processes never receive the Ctrl-C themselves (it is blocked in them), so none
of them prints a traceback: this process closes the cluster, quietly, which stops them within
a few seconds.

Parallel work: ``workers=1`` screens in this process, one exam after the other. ``workers=N``
starts a local Dask cluster of N single-threaded worker processes; ``scheduler=ADDRESS`` uses an
existing Dask distributed cluster (``dask scheduler`` / ``dask worker``), whose workers must see
the inputs and ``OUT`` under the same paths (a shared file system) and have this package installed.
With a cluster, an exam that needs TotalSegmentator is two tasks: segmentation, which can ask for
worker resources (e.g. ``{"GPU": 1}``, given to workers by ``dask worker --resources GPU=1``), and
measurement, which can ask for others; Dask places and orders them.

One concern a module; each imports at run time only the modules listed before it, so there are no
cycles:

* :mod:`.failures`: a failure's kind (input or environment), stage and one-sentence reason.
* :mod:`.writes`: the engine's atomic writes, ``cohort.log`` and the test seam at its write points
  (``cohort.writes.fault_hook``).
* :mod:`.exams`: finding the exams (folder, manifest, list of CTs) and the one exam-ID rule.
* :mod:`.one_exam`: one exam in its worker: its folder and that folder's state, lock and
  leftovers, and :func:`screen_cohort_exam`.
* :mod:`.tables`: ``features.csv``, ``errors.csv`` and ``predictions.csv`` from the exam folders.
* :mod:`.progress`: a run's counts, as it goes and in the summary (``cohort.json``).
* :mod:`.cluster`: the exams on a Dask cluster, and Ctrl-C while it runs.
* :mod:`.run`: :func:`run_cohort`, the run step by step.

This package re-exports their public names (and the private ones the tests call).
"""

from __future__ import annotations

from .exams import (BODY_SUFFIXES, EXAM_ID_MAX_BYTES, EXAM_ID_RULE, MANIFEST_COLUMNS, SEG_SUFFIXES, CohortExam,
                    checked_exam_id, exams_from_files, find_exams, read_manifest)
from .failures import ENVIRONMENT_FAILURE, INPUT_FAILURE
from .one_exam import EXAMS_FOLDER, CohortSettings, ExamOutcome, exam_folder, screen_cohort_exam
from ..report.exam_folder import ERROR_FILE, FINISHED_FILE, exam_state
from .progress import SUMMARY_FILE, CohortProgress, CohortSummary, TerminalProgress
from .run import run_cohort
from .tables import ERROR_COLUMNS, ERRORS_FILE, FEATURES_FILE, PREDICTION_COLUMNS, PREDICTIONS_FILE, write_tables
from .writes import LOG_FILE, log

# The private names the tests call. Names that tests replace are replaced in the module that looks
# them up (``cohort.writes.fault_hook``), not here.
from .cluster import _sigint_held
from .failures import _environment_failure, _kind_of
from .one_exam import _remove_interrupted_leftovers, _to_screen, _worker_failure

__all__ = [
    "BODY_SUFFIXES", "ENVIRONMENT_FAILURE", "ERRORS_FILE", "ERROR_COLUMNS", "ERROR_FILE", "EXAMS_FOLDER",
    "EXAM_ID_MAX_BYTES", "EXAM_ID_RULE", "FEATURES_FILE", "FINISHED_FILE", "INPUT_FAILURE", "LOG_FILE",
    "MANIFEST_COLUMNS", "PREDICTIONS_FILE", "PREDICTION_COLUMNS", "SEG_SUFFIXES", "SUMMARY_FILE", "CohortExam",
    "CohortProgress", "CohortSettings", "CohortSummary", "ExamOutcome", "TerminalProgress", "checked_exam_id",
    "exam_folder", "exam_state", "exams_from_files", "find_exams", "log", "read_manifest", "run_cohort",
    "screen_cohort_exam", "write_tables",
]
