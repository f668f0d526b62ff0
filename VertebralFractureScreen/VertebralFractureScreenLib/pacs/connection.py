"""The one small interface both protocols implement, the study query, and the headers they return.

A :class:`PacsConnection` finds studies (:meth:`~PacsConnection.find_studies`), lists a study's
series with one image's header each (:meth:`~PacsConnection.find_series`, the input of
:func:`.selection.choose_series`), copies a series into a folder (:meth:`~PacsConnection.retrieve_series`)
and stores result files (:meth:`~PacsConnection.store`). :mod:`.dicomweb` (QIDO-RS, WADO-RS,
STOW-RS) and :mod:`.dimse` (C-FIND, C-GET, C-STORE) implement it; :func:`connect` picks one from a
:class:`.config.PacsConfig`. Every failure of the server (unreachable, refused, rejected) is a
:class:`.config.PacsError` of one sentence that names the server without credentials.

Headers are dicts of DICOM keywords → plain values (:func:`plain_header`): text, numbers, or
lists of them, never pydicom objects, so that the selection rules are pure functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DependencyError
from .config import PacsConfig, PacsError

STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPInstanceUID", "ImageType", "ImageOrientationPatient", "ConvolutionKernel", "SliceThickness")
"""What is asked of the PACS at each level; :func:`.selection.choose_series` reads the series' and
one image's."""
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")


@dataclass(frozen=True)
class StudyQuery:
    """Which studies: by StudyInstanceUID, PatientID, AccessionNumber and/or a StudyDate range
    (``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` or ``-YYYYMMDD``, inclusive). Criteria
    combine (all must match); at least one is needed, so that nobody asks a PACS for all its
    studies by mistake."""

    study_uid: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    dates: str | None = None

    def __post_init__(self):
        if not any((self.study_uid, self.patient_id, self.accession, self.dates)):
            raise PacsError("give the studies to screen: --study UID, --patient ID, --accession NUMBER or "
                            "--date YYYYMMDD[-YYYYMMDD].")
        if self.dates is not None:
            match = _DATE.match(self.dates.strip())
            if not match or not (match.group(1) or match.group(3)) or (match.group(3) and match.group(1) and not
                                                                         match.group(2)):
                raise PacsError(f"--date must be YYYYMMDD or YYYYMMDD-YYYYMMDD, not {self.dates!r}.")
            if match.group(1) and match.group(3) and match.group(1) > match.group(3):
                raise PacsError(f"--date {self.dates} ends before it starts.")
        if self.study_uid is not None and not re.match(r"^[0-9]+(\.[0-9]+)*$", self.study_uid.strip()):
            raise PacsError(f"--study must be a StudyInstanceUID (digits and dots), not {self.study_uid!r}.")

    def filters(self) -> dict[str, str]:
        """The matching keys (DICOM keyword → value) for QIDO-RS and C-FIND."""
        found = {"StudyInstanceUID": self.study_uid, "PatientID": self.patient_id,
                 "AccessionNumber": self.accession, "StudyDate": self.dates}
        return {key: value.strip() for key, value in found.items() if value}


def plain_value(value):
    """A pydicom element value as plain Python: text, int, float or a list of them."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [plain_value(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if type(value).__name__ in ("IS", "int") else float(value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\0 ")
    return str(value).strip()


def plain_header(dataset, keys) -> dict:
    """``{keyword: plain value}`` of the ``keys`` a pydicom dataset holds (empty ones left out)."""
    header = {}
    for key in keys:
        value = getattr(dataset, key, None) if key in dataset else None
        if value not in (None, "", []):
            header[key] = plain_value(value)
    return header


def merged(series: dict, image: dict | None) -> dict:
    """A series' header completed by one image's: the series' own values win."""
    return {**(image or {}), **series}


class PacsConnection:
    """The interface of a PACS connection (module docstring); use it as a context manager."""

    def __init__(self, config: PacsConfig):
        self.config = config

    def describe(self) -> str:
        return self.config.describe()

    def find_studies(self, query: StudyQuery) -> list[dict]:
        """The matching studies' headers (:data:`STUDY_KEYS`), sorted by date, time and UID."""
        raise NotImplementedError

    def find_series(self, study_uid: str) -> list[dict]:
        """Every series of the study: its header (:data:`SERIES_KEYS`) completed with one of its
        images' (:data:`IMAGE_KEYS`)."""
        raise NotImplementedError

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> int:
        """Copy every instance of the series into ``folder`` as DICOM files, as stored (any
        transfer syntax); returns how many. A partial copy raises PacsError."""
        raise NotImplementedError

    def store(self, paths: list[Path], study_uid: str) -> int:
        """Send the DICOM files to the PACS; returns how many it stored. Raises PacsError naming
        what was refused when any file was not stored (the others may be stored: a PACS keeps what
        it accepted)."""
        raise NotImplementedError

    def stored_instances(self, study_uid: str) -> set[str]:
        """The SOPInstanceUIDs the PACS lists in the study (to check that a push was kept: some
        servers answer success for instances they filter out)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sorted_studies(studies: list[dict]) -> list[dict]:
    """Oldest first (StudyDate, StudyTime), then by UID: the order studies are screened in."""
    return sorted(studies, key=lambda s: (str(s.get("StudyDate", "")), str(s.get("StudyTime", "")),
                                          str(s.get("StudyInstanceUID", ""))))


def require(module: str, package: str):
    """Import an optional PACS package, or a DependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(f"the PACS commands need {package}: pip install 'vertebral-fracture-screen[pacs]' "
                              f"(or pip install {package}).") from None


def connect(config: PacsConfig) -> PacsConnection:
    """The connection for the configured protocol (nothing is sent until it is used)."""
    if config.protocol == "dicomweb":
        from .dicomweb import DicomwebConnection

        return DicomwebConnection(config)
    from .dimse import DimseConnection

    return DimseConnection(config)


def save_dataset(dataset, path: Path) -> None:
    """Write a pydicom dataset as a DICOM Part 10 file, with pydicom 2.4 or 3."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) < 3:
        dataset.save_as(str(path), write_like_original=False)
    else:
        dataset.save_as(str(path), enforce_file_format=True)
