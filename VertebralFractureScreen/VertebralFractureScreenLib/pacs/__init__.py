"""Screening straight from a PACS (``vfscreen pacs``; ``docs/pacs.md``).

One concern a module, each importing only those listed before it:

* :mod:`.config`: where the PACS is and how to reach it (JSON file, environment, command line),
  credentials kept out of every message; :class:`PacsError`;
* :mod:`.selection`: which CT series of a study is screened (pure rules on header dicts);
* :mod:`.connection`: the one small interface of both protocols, the study query, plain headers;
* :mod:`.dicomweb` (QIDO-RS, WADO-RS, STOW-RS) and :mod:`.dimse` (C-FIND, C-GET, C-STORE);
* :mod:`.journal`: which studies of an output folder are screened, pushed or failed;
* :mod:`.study`: one study pulled, screened and pushed;
* :mod:`.watch`: polling for new studies; :mod:`.cohort_exams`: a query as a cohort's exams;
* :mod:`.commands`: the ``vfscreen pacs`` command group.

``pynetdicom`` and ``dicomweb-client`` (the ``pacs`` extra) are imported only when a connection
is made; without them a :class:`.errors.DependencyError` names the install command.
"""

from __future__ import annotations

from .config import ENVIRONMENT, PROTOCOLS, PacsConfig, PacsError, load_config
from .connection import PacsConnection, StudyQuery, connect
from .journal import JOURNAL_FILE, Journal
from .selection import MIN_SLICES, choose_series, kernel_class, refusal
from .study import ScreenOptions, result_files, screen_study
from .watch import tick, watch

__all__ = ["ENVIRONMENT", "JOURNAL_FILE", "MIN_SLICES", "PROTOCOLS", "Journal", "PacsConfig", "PacsConnection",
           "PacsError", "ScreenOptions", "StudyQuery", "choose_series", "connect", "kernel_class", "load_config",
           "refusal", "result_files", "screen_study", "tick", "watch"]
