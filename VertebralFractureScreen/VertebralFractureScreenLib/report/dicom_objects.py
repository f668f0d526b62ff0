"""DICOM objects of one screened exam (issue 29): where clinicians and Slicer look.

:func:`write_dicom_objects` writes into ``OUT/dicom/``:

* ``seg.dcm``: a DICOM Segmentation (BINARY) of the screened vertebrae (bodies), their trabecular
  ROIs and the paraspinal muscles on the CT's own instances (:mod:`.dicom_seg`);
* ``sr.dcm``: a Comprehensive 3D SR, TID 1500 Measurement Report, of every vertebra, ROI, muscle
  slab and the exam's findings, referencing the SEG's segments (:mod:`.dicom_sr`);
* ``qc.dcm``: a Secondary Capture of the QC picture (``OUT/qc.png``, when it was drawn);
* ``kos.dcm``: a Key Object Selection ("Of Interest") referencing the three.

Each is a new series (numbers :data:`SERIES_NUMBERS`) with new UIDs (pydicom's UID root) in the
CT's study: patient and study attributes are copied from the CT's instances, so a PACS files them
beside the CT. The objects need the CT's DICOM series (the reference): by default the series the CT
was read from when ``screen_exam`` got a DICOM folder or file; for a CT given as NIfTI, NRRD or an
in-memory volume, a series given as ``reference`` (a folder, files or pydicom datasets) whose
instances are that CT's slices voxel for voxel (:func:`.dicom_series.match_grid`; otherwise an
:class:`~.errors.InputError`). Without a reference nothing is written (``{}``), unless
``required``: then an InputError says so. highdicom and pydicom (the ``dicom`` extra) are needed
only here: a :class:`~.errors.DependencyError` names the install command when they are missing.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.files import atomic_write
from . import dicom_codes as dc
from .dicom_seg import SOFTWARE, exam_segments, write_seg
from .dicom_encode import write_part10
from .dicom_series import (ReferenceSeries, concept, dicom_packages, match_grid, new_instance, reference_candidates,
                           whole_header)
from .dicom_sr import MANUFACTURER, content_document, write_sr

DICOM_FOLDER = "dicom"
"""Sub-folder of the results folder that holds the DICOM objects."""
FILES = {"seg": "seg.dcm", "sr": "sr.dcm", "sc": "qc.dcm", "kos": "kos.dcm"}
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "sc": 9903, "kos": 9904}
"""Series numbers of the new series (high, so that viewers list them after the CT's)."""
QC_ORIENTATION = ("P", "F")
"""Patient orientation of the QC picture's rows and columns: its main panel is a sagittal view,
anterior on the left, cranial at the top."""


def ct_dicom_source(result):
    """The DICOM folder or file the exam's CT was read from (``exam["inputs"]["ct"]``), or None."""
    from ..io.dicom import has_dicom_preamble, is_dicom_folder  # SimpleITK: only when asked

    source = (result.inputs.sources or {}).get("ct")
    if not source or source == "in memory":
        return None
    path = Path(source)
    if path.is_dir():
        return path if is_dicom_folder(path) else None
    return path if path.is_file() and (has_dicom_preamble(path) or path.suffix.lower() == ".dcm") else None


def reference_series(result, reference=None, series_uid: str | None = None,
                     required: bool = False) -> ReferenceSeries | None:
    """The CT's reference series matched to its grid (module docstring), or None without one. Of
    several series in a folder, the one whose instances are the CT's slices (``series_uid`` picks
    one when several are)."""
    source = reference if reference is not None else ct_dicom_source(result)
    if source is None:
        if required:
            raise InputError("DICOM objects need the CT's DICOM series: this CT was not read from DICOM "
                             f"({result.inputs.sources.get('ct', 'in memory')}); give its DICOM series as the "
                             "reference series")
        return None
    ct = result.inputs.ct
    matches, refusal = [], None
    for datasets in reference_candidates(source, series_uid):
        try:
            matches.append(match_grid(datasets, ct.ijk_to_ras, ct.shape))
        except InputError as error:
            refusal = error
    if not matches:
        raise refusal
    if len(matches) > 1:
        raise InputError(f"{len(matches)} DICOM series in {source} are the CT's slices: choose one with series_uid")
    series = matches[0]
    series.datasets[0] = whole_header(series.first)  # patient and study attributes come from it
    return series


def _new_uids(pydicom, name: str) -> dict:
    return {"series": pydicom.uid.generate_uid(), "instance": pydicom.uid.generate_uid(),
            "series_number": SERIES_NUMBERS[name]}


def write_dicom_objects(result, out_dir, reference=None, *, series_uid: str | None = None, qc_png=None,
                        required: bool = False, timings: dict | None = None) -> dict[str, Path]:
    """Write the DICOM objects of a :class:`..exam.screening.ScreeningResult` into
    ``out_dir/dicom/`` (module docstring).

    Args:
        result: the screening result (its ``inputs`` still hold the CT and the label maps).
        out_dir: the exam's results folder; ``qc.png`` there becomes the Secondary Capture.
        reference: the CT's DICOM series (folder, file, files or pydicom datasets); default: the
            series the CT was read from, when it was.
        series_uid: the series to take from a folder that holds several.
        qc_png: the QC picture (default ``out_dir/qc.png``); none there: no Secondary Capture.
        required: raise an InputError, rather than write nothing, when there is no reference.
        timings: a dict that gets the seconds of each step (``reference``, ``segments``, ``seg``,
            ``sr``, ``sc``, ``kos``).

    Returns:
        ``{"seg", "sr", "sc", "kos"}`` → written path (``sc`` only with a QC picture); ``{}``
        without a reference.
    """
    clock = _Clock(timings)
    series = reference_series(result, reference, series_uid, required)
    if series is None:
        return {}
    pydicom, _ = dicom_packages()
    folder = Path(out_dir).expanduser() / DICOM_FOLDER
    equipment = {"Manufacturer": MANUFACTURER, "ManufacturerModelName": SOFTWARE, "SoftwareVersions": __version__,
                 "DeviceSerialNumber": "1"}
    segmented_by = str((result.exam.get("inputs") or {}).get("segmented_by") or "given")
    clock.lap("reference")
    segments = exam_segments(result)
    clock.lap("segments")
    paths, written = {name: folder / file for name, file in FILES.items()}, {}
    written["seg"] = _atomic(paths["seg"], lambda p: write_seg(p, series, segments, _new_uids(pydicom, "seg"),
                                                                 equipment, segmented_by))
    clock.lap("seg")
    written["sr"] = _atomic(paths["sr"], lambda p: write_sr(p, result, series, written["seg"], segments,
                                                              _new_uids(pydicom, "sr"), equipment))
    clock.lap("sr")
    qc_png = Path(out_dir).expanduser() / "qc.png" if qc_png is None else Path(qc_png)
    if qc_png.is_file():
        written["sc"] = _atomic(paths["sc"], lambda p: write_sc(p, series, qc_png, _new_uids(pydicom, "sc"),
                                                                  equipment))
    elif paths["sc"].exists():
        paths["sc"].unlink()  # an older picture's capture would not match these results
    clock.lap("sc")
    written["kos"] = _atomic(paths["kos"], lambda p: write_kos(p, series, list(written.values()),
                                                                 _new_uids(pydicom, "kos"), equipment))
    clock.lap("kos")
    return {name: paths[name] for name in written}


class _Clock:
    """Seconds of consecutive steps, added to ``timings`` when given."""

    def __init__(self, timings: dict | None):
        self.timings, self.last = timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = round(self.timings.get(name, 0.0) + now - self.last, 4)
        self.last = now


def _atomic(path: Path, write):
    """``write(temporary)`` with :func:`..io.files.atomic_write`; returns what ``write`` returned."""
    out = []
    atomic_write(path, ".dcm", lambda temporary: out.append(write(temporary)))
    return out[0]


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def write_sc(path, series: ReferenceSeries, png: Path, uids: dict, equipment: dict):
    """The QC picture as an RGB Secondary Capture in the CT's study; returns its dataset."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")), dtype=np.uint8)
    ds = new_instance(series, SECONDARY_CAPTURE, "OT", uids, equipment, "Vertebral fracture screening QC picture")
    ds.ImageType, ds.ConversionType = ["DERIVED", "SECONDARY"], "WSD"
    ds.BodyPartExamined = "SPINE"  # unpaired: no Laterality (type 2C)
    ds.PatientOrientation, ds.BurnedInAnnotation = list(QC_ORIENTATION), "YES"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    write_part10(path, ds)
    return ds


def write_kos(path, series: ReferenceSeries, objects: list, uids: dict, equipment: dict):
    """A Key Object Selection document ("Of Interest", highdicom's TID 2010 content) referencing
    ``objects``; returns it."""
    _, hd = dicom_packages()
    content = hd.ko.KeyObjectSelection(
        document_title=concept(dc.OF_INTEREST), referenced_objects=objects,
        description=f"{SOFTWARE} {__version__}: segmentation, measurements, QC picture")
    ds = content_document(series, KEY_OBJECT_SELECTION, "KO", content[0], objects, uids, equipment,
                          "Vertebral fracture screening results")
    write_part10(path, ds)
    return ds
