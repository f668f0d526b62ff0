#!/usr/bin/env python
"""Speed of a PACS round trip (issue 29): pull, screen and push the shared 20-slice example series
(512 x 512, JPEG 2000 lossless, T11-T12) with its given label map through a real Orthanc, once
over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and once over DIMSE (C-FIND, C-GET, C-STORE).

Orthanc is started on 127.0.0.1 with free ports (``Testing/orthanc_server.py``; Debian packages
``orthanc`` and ``orthanc-dicomweb``), the series is uploaded with fresh UIDs (one study per
protocol and repeat), and the library's own steps are timed in this process:

* ``pull``: the series query (:func:`pacs.selection.choose_series` on ``find_series``) and
  ``retrieve_series`` into a scratch folder;
* ``screen``: ``screen_exam`` with the given segmentation, the results folder (``qc.png``
  included) and the DICOM objects (SEG, SR, SC, KOS);
* ``push``: storing the four objects and checking that the PACS lists them.

Goal (issue 29): the three together under 30 s on a 2-core machine, for each protocol.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_pacs.py --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench_common  # noqa: E402,F401  (puts the Lib on the path when it is not installed)
from orthanc_server import ORTHANC_AET, CLIENT_AET, orthanc_missing, start_orthanc  # noqa: E402
from shared_data import shared_data_dir  # noqa: E402

from VertebralFractureScreenLib.pacs.config import load_config  # noqa: E402
from VertebralFractureScreenLib.pacs.connection import connect  # noqa: E402
from VertebralFractureScreenLib.pacs.selection import choose_series  # noqa: E402
from VertebralFractureScreenLib.pacs.study import push  # noqa: E402


def fresh_study(example: Path, folder: Path) -> str:
    """The example series with new UIDs in ``folder``; its StudyInstanceUID."""
    import pydicom

    folder.mkdir(parents=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for source in sorted((example / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(str(source))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, pydicom.uid.generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.SeriesNumber = "BENCH", 2
        ds.save_as(str(folder / f"{ds.SOPInstanceUID}.dcm"))
    return study


def round_trip(config, study: str, example: Path, scratch: Path) -> dict[str, float]:
    """Seconds of pull, screen and push of one study (module docstring)."""
    from VertebralFractureScreenLib.exam.screening import screen_exam
    from VertebralFractureScreenLib.report.dicom_objects import write_dicom_objects

    times = {}
    started = time.perf_counter()
    with connect(config) as connection:
        header = choose_series(connection.find_series(study))
        series = str(header["SeriesInstanceUID"])
        connection.retrieve_series(study, series, scratch / "pulled")
        times["pull"] = time.perf_counter() - started
        started = time.perf_counter()
        out = scratch / "results"
        result = screen_exam(scratch / "pulled", seg=example / "example_seg_dicom.nii.gz", exam_id=study,
                             series_uid=series, out_dir=out)
        result.write(out)
        written = write_dicom_objects(result, out, reference=scratch / "pulled", series_uid=series, required=True)
        times["screen"] = time.perf_counter() - started
        started = time.perf_counter()
        push(connection, study, [written[name] for name in ("seg", "sr", "sc", "kos")])
        times["push"] = time.perf_counter() - started
    times["total"] = sum(times.values())
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="round trips per protocol (default 3)")
    args = parser.parse_args()
    missing = orthanc_missing()
    example = shared_data_dir()
    if missing or not (example / "example_ct_dicom").is_dir():
        print(f"cannot run: {missing or f'no example data at {example}'}")
        return 1
    with tempfile.TemporaryDirectory(prefix="vfscreen-bench-pacs-") as root:
        root = Path(root)
        server = start_orthanc(root / "orthanc")
        try:
            configs = {"dicomweb": load_config(None, {"url": server.dicomweb_url}, environ={}),
                       "dimse": load_config(None, {"host": "127.0.0.1", "port": server.dicom_port,
                                                   "called_aet": ORTHANC_AET, "calling_aet": CLIENT_AET}, environ={})}
            print(f"Orthanc {server.rest('/system')['Version']} on 127.0.0.1; example series 20 x 512 x 512 "
                  "(JPEG 2000 lossless) with its label map; seconds")
            print(f"{'protocol':<10}{'run':>4}{'pull':>8}{'screen':>8}{'push':>8}{'total':>8}")
            for protocol, config in configs.items():
                totals = []
                for run in range(1, args.repeat + 1):
                    folder = root / f"{protocol}{run}"
                    study = fresh_study(example, folder / "upload")
                    server.upload(sorted((folder / "upload").iterdir()))
                    times = round_trip(config, study, example, folder)
                    totals.append(times["total"])
                    print(f"{protocol:<10}{run:>4}" + "".join(f"{times[k]:>8.2f}" for k in ("pull", "screen", "push",
                                                                                          "total")))
                print(f"{protocol:<10} median total {statistics.median(totals):.2f} s (goal < 30 s)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
