"""``vfscreen pacs`` against a real Orthanc (issue 29): pull, screen and push through DICOMweb and
DIMSE, the results read back from the server, every failure a PACS administrator meets (one
sentence, non-zero exit, nothing marked done, retried at the next poll), and the watcher killed
with SIGKILL and restarted.

The CT is the shared 20-slice example series (T11-T12, JPEG 2000 lossless) with its label map,
copied with fresh Study/Series/SOP Instance UIDs for each study (its own are blank). Orthanc runs
on 127.0.0.1 with free ports (:mod:`orthanc_server`); the tests skip, with the reason, without
the ``Orthanc`` binary, its DICOMweb plugin, pynetdicom or dicomweb-client.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
from orthanc_server import (CLIENT_AET, ORTHANC_AET, PASSWORD, REJECT_SR_PATIENT, USER, free_port, orthanc_missing,
                            start_orthanc)

MISSING = orthanc_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
pydicom = pytest.importorskip("pydicom", reason="the PACS tests need pydicom")

from VertebralFractureScreenLib.cli import main  # noqa: E402
from VertebralFractureScreenLib.pacs.journal import JOURNAL_FILE  # noqa: E402

SEG_NAME = "example_seg_dicom.nii.gz"
SERIES_NAME = "example_ct_dicom"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), authenticated=True)
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc):
    """The module's Orthanc, emptied, its result filter off."""
    orthanc.clear()
    orthanc.reject_results(False)
    return orthanc


@pytest.fixture
def environment(monkeypatch):
    """The DICOMweb credentials, from the environment only."""
    monkeypatch.setenv("VFS_PACS_USERNAME", USER)
    monkeypatch.setenv("VFS_PACS_PASSWORD", PASSWORD)
    monkeypatch.delenv("VFS_PACS_CONFIG", raising=False)


def copy_study(example: Path, folder: Path, patient: str = "PACS1", study_date: str | None = None,
               modality: str = "CT") -> tuple[str, list[Path]]:
    """The example series with fresh UIDs (one new study and series) in ``folder``: (study UID, files
    sorted by slice position). ``modality`` other than CT makes it a non-CT object."""
    folder.mkdir(parents=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = []
    for source in sorted((example / SERIES_NAME).iterdir()):
        ds = pydicom.dcmread(str(source))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, pydicom.uid.generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.AccessionNumber, ds.SeriesNumber = patient, "Pacs^Test", f"A{patient}", 2
        ds.StudyDate = study_date or ds.StudyDate
        ds.Modality = modality
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(path))
        files.append((float(ds.ImagePositionPatient[2]), path))
    return study, [path for _, path in sorted(files)]


def seg_folder(example: Path, folder: Path, *studies: str) -> Path:
    folder.mkdir(exist_ok=True)
    for study in studies:
        (folder / f"{study}.nii.gz").write_bytes((example / SEG_NAME).read_bytes())
    return folder


def connection_args(pacs, protocol: str, **wrong) -> list[str]:
    if protocol == "dicomweb":
        return ["--url", wrong.get("url", pacs.dicomweb_url)]
    return ["--host", "127.0.0.1", "--port", str(wrong.get("port", pacs.dicom_port)), "--called-aet",
            wrong.get("called_aet", ORTHANC_AET), "--calling-aet", CLIENT_AET]


def vfscreen(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vfscreen: ") and "Traceback" not in err, err
    return lines[0]


def journal(out: Path) -> dict:
    return json.loads((out / JOURNAL_FILE).read_text())["studies"]


def instances(pacs, study: str, modality: str) -> list[dict]:
    return [i for i in pacs.find("Instance", {"StudyInstanceUID": study})
            if pacs.rest(f"/instances/{i['ID']}/tags?simplify")["Modality"] == modality]


def read_back(pacs, study: str, modality: str):
    """The one instance of ``modality`` in the study, as Orthanc sends it."""
    found = instances(pacs, study, modality)
    assert len(found) == 1, f"{len(found)} {modality} instances in study {study}"
    from io import BytesIO

    request_path = f"/instances/{found[0]['ID']}/file"
    import urllib.request
    from base64 import b64encode

    request = urllib.request.Request(pacs.url + request_path)
    request.add_header("Authorization", "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return pydicom.dcmread(BytesIO(answer.read()))


# ------------------------------------------------------------------------------------------------
# The data and a round trip through each protocol
# ------------------------------------------------------------------------------------------------


def test_the_example_label_map_is_on_the_example_series_grid(example_data):
    import SimpleITK as sitk
    import numpy as np

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(example_data / SERIES_NAME)))
    ct, seg = reader.Execute(), sitk.ReadImage(str(example_data / SEG_NAME))
    assert ct.GetSize() == seg.GetSize() == (512, 512, 20)
    assert np.allclose(ct.GetSpacing(), seg.GetSpacing(), atol=1e-4)

    def corners(image):  # the grid's corner voxels in physical space: the same set for the same grid, whatever
        size = image.GetSize()  # the order of its axes (the label map's rows run the other way)
        return sorted(tuple(round(c, 3) for c in image.TransformIndexToPhysicalPoint((i, j, k)))
                      for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1))

    assert corners(ct) == corners(seg)
    on_ct = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
    before, after = sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(on_ct)
    labels = np.unique(before)
    assert {32, 33} <= set(labels.tolist())  # TotalSegmentator total ids: 32 = T12, 33 = T11
    for label in labels:
        assert np.count_nonzero(before == label) == np.count_nonzero(after == label)  # voxel for voxel


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_pull_screen_push_and_read_back(pacs, protocol, example_data, tmp_path, capsys, environment):
    import highdicom as hd
    import numpy as np

    study, files = copy_study(example_data, tmp_path / "ct")
    pacs.upload(files)
    out, segs = tmp_path / "out", seg_folder(example_data, tmp_path / "segs", study)
    status, text, err = vfscreen(capsys, "pacs", "screen", *connection_args(pacs, protocol), "--study", study,
                                 "--seg-dir", segs, "--out", out)
    assert status == 0, err
    assert f"study {study}: series 2 'CT Body 3.0' (20 images, 3 mm, kernel BR38F [soft]) screened" in text
    assert journal(out)[study]["state"] == "done"
    folder = out / study
    rows = list(csv.DictReader((folder / "vertebrae.csv").open()))
    assert [r["level"] for r in rows] == ["T11", "T12"]
    sr = read_back(pacs, study, "SR")
    assert sr.SOPInstanceUID == pydicom.dcmread(str(folder / "dicom" / "sr.dcm")).SOPInstanceUID
    groups = {str(g.tracking_identifier): [(m.name.meaning, m.unit.value, m.value) for m in g.get_measurements()]
              for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()}
    t12 = next(r for r in rows if r["level"] == "T12")
    for row in rows:  # the SR holds the csv's numbers (the csv rounds to 4 decimals)
        assert groups[row["level"]][0][:2] == ("Volume", "mL")
        assert groups[row["level"]][0][2] == pytest.approx(float(row["body_volume_ml"]), abs=1e-4)
    roi = groups["T12 trabecular ROI"]
    assert [(name, unit) for name, unit, _ in roi] == [("Attenuation Coefficient", "[hnsf'U]")] * 3
    assert [v for _, _, v in roi] == pytest.approx([float(t12[k]) for k in ("trabecular_hu_mean", "trabecular_hu_median",
                                                                            "trabecular_hu_sd")], abs=1e-4)
    assert 134.4 < float(t12["trabecular_hu_mean"]) < 134.6
    seg = hd.seg.Segmentation.from_dataset(read_back(pacs, study, "SEG"))
    numbers = {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(example_data / SEG_NAME)))
    sources = [uid for _, _, uid in seg.get_source_image_uids()]
    for level, label in (("T11", 33), ("T12", 32)):  # the vertebra segments are the label map's labels
        mask = seg.get_pixels_by_source_instance(sources, segment_numbers=[numbers[f"vertebra:{level}"]])
        assert int(np.count_nonzero(mask)) == int(np.count_nonzero(labels == label)) > 5000
    roi_mask = seg.get_pixels_by_source_instance(sources, segment_numbers=[numbers["roi:T12"]])
    assert int(np.count_nonzero(roi_mask)) == int(t12["roi_voxels"]) == 244
    assert all(len(instances(pacs, study, m)) == 1 for m in ("SEG", "SR", "KO", "OT"))
    status, text, _ = vfscreen(capsys, "pacs", "screen", *connection_args(pacs, protocol), "--patient", "PACS1",
                               "--seg-dir", segs, "--out", out)
    assert status == 0 and "already screened and pushed" in text  # never twice
    assert len(instances(pacs, study, "SR")) == 1
    everything = text + err + "".join(p.read_text(errors="replace") for p in out.rglob("*.json"))
    assert PASSWORD not in everything


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["in process", "dask"])
def test_a_query_becomes_a_cohort_pulled_once(workers, pacs, example_data, tmp_path, capsys, environment):
    """``pacs cohort``: the studies of a date range, each CT series pulled once into
    OUT/pacs-series, screened by the cohort engine (one worker, or a local Dask cluster) into
    features.csv; a second run pulls and screens nothing again, and nothing is pushed."""
    studies = [copy_study(example_data, tmp_path / f"ct{n}", patient=f"COHORT{n}", study_date="20240301")
               for n in (1, 2)]
    for _, files in studies:
        pacs.upload(files)
    uids = sorted(uid for uid, _ in studies)
    segs = seg_folder(example_data, tmp_path / "segs", *uids)
    out = tmp_path / "cohort"
    args = ("pacs", "cohort", *connection_args(pacs, "dicomweb"), "--date", "20240301", "--seg-dir", segs, "--out", out,
            "--workers", workers, "--no-qc")
    status, text, err = vfscreen(capsys, *args)
    assert status == 0, err
    rows = list(csv.DictReader((out / "features.csv").open()))
    assert sorted(r["exam_id"] for r in rows) == uids
    assert all((out / "pacs-series" / uid / ".retrieved.json").is_file() for uid in uids)
    pulled = {uid: (out / "pacs-series" / uid / ".retrieved.json").stat().st_mtime_ns for uid in uids}
    status, text, err = vfscreen(capsys, *args)
    assert status == 0, err
    assert {uid: (out / "pacs-series" / uid / ".retrieved.json").stat().st_mtime_ns for uid in uids} == pulled
    assert all(not instances(pacs, uid, "SR") for uid in uids)  # a cohort pushes nothing


def test_query_names_each_study_s_series(pacs, example_data, tmp_path, capsys, environment):
    study, files = copy_study(example_data, tmp_path / "ct", patient="QUERY1")
    pacs.upload(files)
    status, text, _ = vfscreen(capsys, "pacs", "query", *connection_args(pacs, "dicomweb"), "--accession", "AQUERY1")
    assert status == 0 and text.startswith(study) and "series 2 'CT Body 3.0' (20 images" in text


# ------------------------------------------------------------------------------------------------
# What goes wrong: one sentence, non-zero exit, nothing marked done, tried again
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_server_that_is_down_is_one_sentence(protocol, pacs, tmp_path, capsys, environment):
    port = free_port()
    wrong = {"url": f"http://127.0.0.1:{port}/dicom-web", "port": port}
    status, _, err = vfscreen(capsys, "pacs", "screen", *connection_args(pacs, protocol, **wrong), "--date",
                              "20221208", "--out", tmp_path / "out")
    assert status == 2
    assert "does not answer" in one_sentence(err)
    assert not (tmp_path / "out" / JOURNAL_FILE).exists()


def test_a_rejected_association_and_a_wrong_password_are_one_sentence(pacs, tmp_path, capsys, environment,
                                                                      monkeypatch):
    status, _, err = vfscreen(capsys, "pacs", "query", *connection_args(pacs, "dimse", called_aet="NOTORTHANC"),
                              "--date", "20221208")
    assert status == 2 and "rejected the association (is NOTORTHANC its AE title" in one_sentence(err)
    monkeypatch.setenv("VFS_PACS_PASSWORD", "wrong-" + PASSWORD)
    status, _, err = vfscreen(capsys, "pacs", "query", *connection_args(pacs, "dicomweb"), "--date", "20221208")
    assert status == 2 and "HTTP 401" in one_sentence(err) and PASSWORD not in err


def test_a_study_without_ct_fails_until_its_ct_arrives(pacs, example_data, tmp_path, capsys, environment):
    study, files = copy_study(example_data, tmp_path / "ct")
    other = pydicom.dcmread(str(files[0]))  # one non-CT object alone in the study (a secondary capture)
    other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    other.Modality, other.SeriesInstanceUID, other.SeriesNumber = "OT", pydicom.uid.generate_uid(), 99
    other.save_as(str(tmp_path / "sc.dcm"))
    pacs.upload([tmp_path / "sc.dcm"])
    out, segs = tmp_path / "out", seg_folder(example_data, tmp_path / "segs", study)
    args = ("pacs", "screen", *connection_args(pacs, "dimse"), "--study", study, "--seg-dir", segs, "--out", out)
    status, _, err = vfscreen(capsys, *args)
    assert status == 1
    assert f"has no CT series to screen (series 99: its modality is OT, not CT)" in one_sentence(err)
    assert journal(out)[study]["state"] == "failed" and journal(out)[study]["stage"] == "pull"
    pacs.upload(files)
    status, text, err = vfscreen(capsys, *args)
    assert status == 0 and journal(out)[study]["state"] == "done", err


def test_missing_slices_are_refused_until_the_slice_arrives(pacs, example_data, tmp_path, capsys, environment):
    """Watch mode: a study is screened once its instance count holds still for one poll; a failure
    is tried again at each poll, with the same sentence, and succeeds once the series is whole."""
    today = date.today().strftime("%Y%m%d")
    study, files = copy_study(example_data, tmp_path / "ct", study_date=today)
    pacs.upload(files[:10] + files[11:])  # slice 10 of 20 missing
    out, segs = tmp_path / "out", seg_folder(example_data, tmp_path / "segs", study)
    args = ("pacs", "watch", *connection_args(pacs, "dicomweb"), "--once", "--min-slices", 10, "--seg-dir", segs,
            "--out", out)
    handler = signal.getsignal(signal.SIGTERM)
    status, _, _ = vfscreen(capsys, *args)
    assert status == 0 and study not in journal(out)  # first poll: seen, waiting to settle
    assert signal.getsignal(signal.SIGTERM) is handler  # the watcher's own SIGTERM handler is gone again
    for attempt in (1, 2):
        status, _, err = vfscreen(capsys, *args)
        assert status == 1
        assert "has unevenly spaced slices" in one_sentence(err) and "missing slices?" in err
        entry = journal(out)[study]
        assert (entry["state"], entry["stage"], entry["attempts"]) == ("failed", "screen", attempt)
        assert not instances(pacs, study, "SR")
    pacs.upload([files[10]])
    status, _, _ = vfscreen(capsys, *args)  # the count changed: wait one poll
    status, text, err = vfscreen(capsys, *args)
    assert status == 0 and journal(out)[study]["state"] == "done", err
    assert len(instances(pacs, study, "SR")) == 1


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_refused_result_is_pushed_again_with_the_same_uids(protocol, pacs, example_data, tmp_path, capsys,
                                                             environment):
    study, files = copy_study(example_data, tmp_path / "ct", patient=f"{REJECT_SR_PATIENT}1")
    pacs.upload(files)
    pacs.reject_results(True)
    out, segs = tmp_path / "out", seg_folder(example_data, tmp_path / "segs", study)
    args = ("pacs", "screen", *connection_args(pacs, protocol), "--study", study, "--seg-dir", segs, "--out", out)
    status, _, err = vfscreen(capsys, *args)
    assert status == 1 and "does not keep 1 of 4 result files (sr.dcm" in one_sentence(err)
    entry = journal(out)[study]
    assert (entry["state"], entry["stage"], entry["screened"]) == ("failed", "push", True)
    assert not instances(pacs, study, "SR") and len(instances(pacs, study, "SEG")) == 1  # a partial set remains
    written = {name: pydicom.dcmread(str(out / study / "dicom" / name)).SOPInstanceUID for name in ("seg.dcm", "sr.dcm")}
    pacs.reject_results(False)
    status, text, err = vfscreen(capsys, *args)
    assert status == 0 and "results pushed again from" in text, err
    assert journal(out)[study]["state"] == "done"
    assert read_back(pacs, study, "SEG").SOPInstanceUID == written["seg.dcm"]  # the same UIDs: once in the PACS
    assert read_back(pacs, study, "SR").SOPInstanceUID == written["sr.dcm"]


# ------------------------------------------------------------------------------------------------
# Watch mode, killed and restarted
# ------------------------------------------------------------------------------------------------


def _watcher(pacs, out: Path, segs: Path) -> subprocess.Popen:
    env = {**os.environ, "VFS_PACS_USERNAME": USER, "VFS_PACS_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "import sys; from VertebralFractureScreenLib.cli import main; sys.exit(main())",
               "pacs", "watch", "--url", pacs.dicomweb_url, "--interval", "0.5", "--seg-dir", str(segs),
               "--out", str(out)]
    log = open(out.parent / f"watch-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for(condition, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _state(out: Path, study: str):
    try:
        return journal(out).get(study, {}).get("state")
    except (OSError, ValueError):
        return None


def test_watch_screens_each_study_once_across_sigkill(pacs, example_data, tmp_path):
    today = date.today().strftime("%Y%m%d")
    first, first_files = copy_study(example_data, tmp_path / "a", patient="WATCH1", study_date=today)
    second, second_files = copy_study(example_data, tmp_path / "b", patient=f"{REJECT_SR_PATIENT}2", study_date=today)
    third, third_files = copy_study(example_data, tmp_path / "c", patient="WATCH3", study_date=today)
    out, segs = tmp_path / "out", seg_folder(example_data, tmp_path / "segs", first, second, third)
    out.mkdir()
    watcher = _watcher(pacs, out, segs)
    try:
        pacs.upload(first_files)
        _wait_for(lambda: _state(out, first) == "done")
        pacs.reject_results(True)  # the second study's SR is dropped: screened, not done
        pacs.upload(second_files)
        _wait_for(lambda: journal(out).get(second, {}).get("stage") == "push")
        pacs.upload(third_files)
        time.sleep(1.0)  # somewhere in the third study's poll, pull or screening
    finally:
        watcher.send_signal(signal.SIGKILL)
        watcher.wait()
    assert _state(out, second) == "failed" and journal(out)[second]["screened"]
    pacs.reject_results(False)
    watcher = _watcher(pacs, out, segs)
    try:
        _wait_for(lambda: all(_state(out, s) == "done" for s in (first, second, third)))
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 130
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("watch-*.log")))
    assert "Traceback" not in logs and PASSWORD not in logs
    assert logs.count(f"study {first}: ") == 1  # screened and pushed once; never again after the restart
    assert f"study {second}: results pushed again from" in logs  # pushed again, not screened again
    for study in (first, second, third):
        for modality in ("SR", "SEG", "KO", "OT"):
            assert len(instances(pacs, study, modality)) == 1, (study, modality)
        local = pydicom.dcmread(str(out / study / "dicom" / "sr.dcm")).SOPInstanceUID
        assert read_back(pacs, study, "SR").SOPInstanceUID == local


# ------------------------------------------------------------------------------------------------
# TLS: DICOMweb over https and DIMSE over TLS, verified against the CA bundle given
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-tls"), authenticated=True, tls=True)
    yield server
    server.stop()


def test_dicomweb_over_https_trusts_only_the_ca_bundle_given(tls_orthanc, example_data, tmp_path, capsys,
                                                            environment):
    """An https PACS whose certificate the system does not know: with ``--ca-bundle`` (its
    authority) the query answers; without it, one sentence naming the option, nothing else."""
    tls_orthanc.clear()
    study, files = copy_study(example_data, tmp_path / "ct", patient="TLS1")
    tls_orthanc.upload(files)
    url = tls_orthanc.dicomweb_url
    assert url.startswith("https://")
    status, text, err = vfscreen(capsys, "pacs", "query", "--url", url, "--ca-bundle", tls_orthanc.certificate,
                                 "--accession", "ATLS1")
    assert status == 0 and text.startswith(study), err
    status, _, err = vfscreen(capsys, "pacs", "query", "--url", url, "--accession", "ATLS1")
    assert status != 0
    assert "is not trusted" in one_sentence(err) and "ca_bundle" in err


def test_dimse_over_tls_pulls_screens_and_pushes_and_trusts_only_the_ca_bundle(tls_orthanc, example_data, tmp_path,
                                                                              capsys, environment, monkeypatch):
    """``tls = true``: C-FIND, C-GET and C-STORE over TLS; the SR arrives. Without the CA bundle,
    the TLS setup fails in one sentence and nothing is screened."""
    tls_orthanc.clear()
    study, files = copy_study(example_data, tmp_path / "ct", patient="TLS2")
    tls_orthanc.upload(files)
    segs = seg_folder(example_data, tmp_path / "segs", study)
    monkeypatch.setenv("VFS_PACS_TLS", "true")
    status, text, err = vfscreen(capsys, "pacs", "screen", *connection_args(tls_orthanc, "dimse"), "--ca-bundle",
                                 tls_orthanc.certificate, "--study", study, "--seg-dir", segs, "--out", tmp_path / "out")
    assert status == 0, err
    assert len(instances(tls_orthanc, study, "SR")) == 1
    status, _, err = vfscreen(capsys, "pacs", "query", *connection_args(tls_orthanc, "dimse"), "--study", study)
    assert status != 0 and "over TLS" in one_sentence(err) and "certificate is not trusted" in err
