"""The PACS rules that need no server (issue 29): which CT series of a study is screened, the study
query, and the configuration (credentials never shown)."""

from __future__ import annotations

import itertools
import json

import pytest

from VertebralFractureScreenLib.errors import VFSError
from VertebralFractureScreenLib.pacs.config import PacsConfig, PacsError, load_config
from VertebralFractureScreenLib.pacs.connection import StudyQuery, plain_header
from VertebralFractureScreenLib.pacs.selection import (MIN_SLICES, choose_series, kernel_class, preference, refusal,
                                                       slice_normal_angle)

AXIAL = [1, 0, 0, 0, 1, 0]
SECRET = "pA55-w0rd!never-shown"


def series(uid: str, **fields) -> dict:
    header = {"SeriesInstanceUID": uid, "Modality": "CT", "ImageOrientationPatient": AXIAL, "SliceThickness": 1.0,
              "NumberOfSeriesRelatedInstances": 300, "ConvolutionKernel": "B30f", "SeriesNumber": 2,
              "SeriesDescription": "Abdomen"}
    header.update(fields)
    return {k: v for k, v in header.items() if v is not None}


@pytest.mark.parametrize("kernel, description, expected", [
    ("B30f", None, "soft"), (["Br38f", "3"], None, "soft"), ("I26f", None, "soft"), ("B70f", None, "sharp"),
    ("Bl57d", None, "sharp"), ("Br64", None, "sharp"), ("STANDARD", None, "soft"), ("SOFT", None, "soft"),
    ("BONE", None, "sharp"), ("BONEPLUS", None, "sharp"), ("LUNG", None, "sharp"), ("EDGE", None, "sharp"),
    ("FC08", None, "soft"), ("FC52", None, "sharp"), ("B", None, "soft"), ("L", None, "sharp"), ("YB", None, "soft"),
    (None, "Abdomen Weichteil 1.0", "soft"), (None, "Thorax Lunge 1mm", "sharp"), (None, "Knochen 0.75", "sharp"),
    (None, "Portal venous 1 mm", "unknown"), ("XYZ12", None, "unknown"),
])
def test_kernel_classes(kernel, description, expected):
    assert kernel_class(kernel, description) == expected


def test_axial_is_within_ten_degrees_of_the_cranio_caudal_axis():
    assert slice_normal_angle(AXIAL) == pytest.approx(0)
    assert slice_normal_angle([0, 1, 0, 0, 0, -1]) == pytest.approx(90)  # sagittal
    assert slice_normal_angle("1\\0\\0\\0\\1\\0") == pytest.approx(0)  # as text
    import math

    tilt = math.radians(8)
    assert slice_normal_angle([1, 0, 0, 0, math.cos(tilt), math.sin(tilt)]) == pytest.approx(8)
    assert slice_normal_angle([1, 0, 0]) is None and slice_normal_angle(None) is None


@pytest.mark.parametrize("fields, reason", [
    ({"Modality": "MR"}, "its modality is MR, not CT"),
    ({"Modality": None}, "its modality is not given, not CT"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "it is a localizer (scout)"),
    ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "it is not axial (its slices are 90° from axial)"),
    ({"ImageOrientationPatient": None}, "its ImageOrientationPatient is missing or malformed"),
    ({"NumberOfSeriesRelatedInstances": MIN_SLICES - 1}, f"it has {MIN_SLICES - 1} images, fewer than {MIN_SLICES}"),
    ({"NumberOfSeriesRelatedInstances": None}, f"it has an unknown number of images, fewer than {MIN_SLICES}"),
])
def test_what_cannot_be_screened_and_why(fields, reason):
    assert refusal(series("1.2", **fields)) == reason
    assert refusal(series("1.2", NumberOfSeriesRelatedInstances=MIN_SLICES)) is None  # the minimum is enough


def test_soft_kernel_then_thinnest_then_most_slices_then_number_and_uid():
    candidates = [
        series("1.1", ConvolutionKernel="B70f", SliceThickness=0.6),  # bone kernel: last despite thin slices
        series("1.2", ConvolutionKernel="XYZ", SliceThickness=0.6),  # unknown kernel: after the soft ones
        series("1.3", SliceThickness=3.0, NumberOfSeriesRelatedInstances=900),
        series("1.4", SliceThickness=1.0, NumberOfSeriesRelatedInstances=300),
        series("1.5", SliceThickness=1.0, NumberOfSeriesRelatedInstances=400),  # soft, thinnest, most slices
        series("1.6", Modality="SR"), series("1.7", ImageType=["DERIVED", "SECONDARY", "LOCALIZER"]),
    ]
    assert choose_series(candidates)["SeriesInstanceUID"] == "1.5"
    ranked = [s["SeriesInstanceUID"] for s in sorted(candidates[:5], key=preference)]
    assert ranked == ["1.5", "1.4", "1.3", "1.2", "1.1"]
    assert choose_series([series("1.9", SliceThickness=None), series("1.8", SliceThickness=5.0)])[
        "SeriesInstanceUID"] == "1.8"  # an unknown thickness counts as the thickest


def test_ties_are_broken_the_same_way_whatever_the_order():
    twins = [series("1.2.10", SeriesNumber=3), series("1.2.9", SeriesNumber=3), series("1.2.11", SeriesNumber=4)]
    chosen = {choose_series(list(order))["SeriesInstanceUID"] for order in itertools.permutations(twins)}
    assert chosen == {"1.2.10"}  # lowest series number, then the UID as text


def test_a_study_without_a_ct_series_is_one_sentence_with_each_series_reason():
    with pytest.raises(PacsError) as caught:
        choose_series([series("1.1", Modality="SR", SeriesNumber=9902),
                       series("1.2", NumberOfSeriesRelatedInstances=3, SeriesNumber=5)], study="study 1.2.3")
    assert str(caught.value) == ("study 1.2.3 has no CT series to screen (series 9902: its modality is SR, not CT; "
                                 f"series 5: it has 3 images, fewer than {MIN_SLICES}).")
    with pytest.raises(PacsError, match="has no series in the PACS"):
        choose_series([])
    assert choose_series([series("1.2", NumberOfSeriesRelatedInstances=3)], min_slices=3)


def test_plain_headers_from_pydicom():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ConvolutionKernel = ["Br38f", "3"]
    ds.SliceThickness = "3"
    ds.NumberOfSeriesRelatedInstances = "20"
    ds.Modality = "CT"
    header = plain_header(ds, ("ImageOrientationPatient", "ConvolutionKernel", "SliceThickness",
                               "NumberOfSeriesRelatedInstances", "Modality", "SeriesDescription"))
    assert header == {"ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "ConvolutionKernel": ["Br38f", "3"],
                      "SliceThickness": 3.0, "NumberOfSeriesRelatedInstances": 20, "Modality": "CT"}
    assert refusal({**header, "SeriesInstanceUID": "1"}) is None


@pytest.mark.parametrize("query, message", [
    ({}, "give the studies to screen"), ({"dates": "2026-01-01"}, "--date must be YYYYMMDD"),
    ({"dates": "20260131-20260101"}, "ends before it starts"), ({"study_uid": "1.2.abc"}, "must be a StudyInstanceUID"),
])
def test_bad_queries_are_refused(query, message):
    with pytest.raises(PacsError, match=message):
        StudyQuery(**query)


def test_query_filters():
    assert StudyQuery(patient_id="P1", dates="20260101-20260131").filters() == {
        "PatientID": "P1", "StudyDate": "20260101-20260131"}
    assert StudyQuery(accession="A7", dates="20260101-").filters() == {"AccessionNumber": "A7", "StudyDate": "20260101-"}


def test_configuration_file_then_environment_then_command_line(tmp_path):
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"url": "https://pacs.example.org/dicom-web/", "username": "screen",
                                "password": SECRET, "timeout_s": 5}))
    config = load_config(path, environ={})
    assert (config.protocol, config.url, config.username, config.timeout_s) == (
        "dicomweb", "https://pacs.example.org/dicom-web", "screen", 5.0)
    environ = {"VFS_PACS_USERNAME": "other", "VFS_PACS_PASSWORD": SECRET, "VFS_PACS_CONFIG": str(path)}
    assert load_config(None, environ=environ).username == "other"
    dimse = load_config(None, {"host": "pacs", "port": "11112", "called_aet": "PACS"}, environ={})
    assert (dimse.protocol, dimse.port, dimse.calling_aet) == ("dimse", 11112, "VFSCREEN")
    assert load_config(None, {"protocol": "dimse", "host": "h", "port": 104, "called_aet": "A", "tls": "yes"},
                       environ={}).tls is True


def test_credentials_are_never_shown(tmp_path):
    config = load_config(None, {"url": "https://pacs.example.org/dicom-web"},
                         environ={"VFS_PACS_USERNAME": "u", "VFS_PACS_PASSWORD": SECRET})
    assert SECRET not in repr(config) and SECRET not in config.describe()
    problems = [
        ({"url": f"https://u:{SECRET}@pacs.example.org/"}, {}),  # credentials in the URL: refused, not echoed
        ({"url": "http://pacs.example.org/"}, {"VFS_PACS_USERNAME": "u", "VFS_PACS_PASSWORD": SECRET}),
        ({"url": "https://pacs.example.org/"}, {"VFS_PACS_PASSWORD": SECRET}),
    ]
    dimse = load_config(None, {"host": "h", "port": 1, "called_aet": "A"},
                        environ={"VFS_PACS_USERNAME": "u", "VFS_PACS_PASSWORD": SECRET})
    assert dimse.password is None  # DIMSE has no passwords: a shared configuration's are dropped
    for overrides, environ in problems:
        with pytest.raises(PacsError) as caught:
            load_config(None, overrides, environ=environ)
        assert SECRET not in str(caught.value)
    path = tmp_path / "bad.json"
    path.write_text('{"url": "https://x", "password": "' + SECRET + '",}')
    with pytest.raises(PacsError) as caught:
        load_config(path, environ={})
    assert "not valid JSON" in str(caught.value) and SECRET not in str(caught.value)
    path.write_text(json.dumps({"url": "https://x", "passwd": SECRET}))
    with pytest.raises(PacsError, match="unknown key passwd") as caught:
        load_config(path, environ={})
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("overrides, message", [
    ({}, "no PACS configured"), ({"protocol": "ftp", "url": "https://x"}, "protocol must be dicomweb or dimse"),
    ({"url": "pacs.example.org"}, "must start with http:// or https://"),
    ({"host": "h", "called_aet": "A"}, "needs the PACS's host and port"),
    ({"host": "h", "port": "x", "called_aet": "A"}, "port must be a whole number"),
    ({"host": "h", "port": 70000, "called_aet": "A"}, "between 1 and 65535"),
    ({"host": "h", "port": 104}, "needs the PACS's AE title"),
    ({"host": "h", "port": 104, "called_aet": "A" * 17}, "is not an AE title"),
    ({"url": "https://x", "ca_bundle": "/nonexistent/ca.pem"}, "ca_bundle /nonexistent/ca.pem is not a file"),
])
def test_bad_configurations_are_one_sentence(overrides, message):
    with pytest.raises(VFSError, match=message):
        load_config(None, overrides, environ={})


def test_the_pacs_commands_are_in_vfscreen(capsys):
    from VertebralFractureScreenLib.cli import main

    assert main(["pacs", "screen", "--url", "https://pacs.example.org/dicom-web", "--out", "x"]) == 2
    assert "give the studies to screen" in capsys.readouterr().err
    assert main(["pacs"]) == 2
    assert "watch" in capsys.readouterr().out
    assert isinstance(PacsConfig("dimse").calling_aet, str)
