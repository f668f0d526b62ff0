"""Hostile and broken image headers (issue 26): every one is refused with one sentence.

Each test makes its bad file itself in ``tmp_path`` from a small valid volume written by
:func:`write_volume` (or, for DICOM, a series built from scratch with pydicom); no crafted file is
ever kept in the repository. The command-line tests run ``vfscreen screen`` in-process with
``capfd``, which captures the process's file descriptors, so text printed by ITK's C++ code on
stderr would show too.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureScreenLib import cli, levels
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap, write_volume
from VertebralFractureScreenLib.io.seg_nrrd import write_segmentation_nrrd
from VertebralFractureScreenLib.io.volume import Volume

# NIfTI-1 header fields (byte offsets)
DIM, DATATYPE, BITPIX, PIXDIM, VOX_OFFSET = 40, 70, 72, 76, 108
QFORM_CODE, SFORM_CODE, QUATERN_B, QOFFSET_X, SROW_X = 252, 254, 256, 268, 280

SHAPE = (12, 14, 16)  # k, j, i
L1, L2 = levels.TOTAL_VERTEBRA_IDS["L1"], levels.TOTAL_VERTEBRA_IDS["L2"]


# ------------------------------------------------------------------------------------------------
# makers
# ------------------------------------------------------------------------------------------------


def small_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:5, 4:10, 5:12] = L2
    labels[6:9, 4:10, 5:12] = L1
    return labels


def small_ct() -> np.ndarray:
    labels = small_labels()
    return np.where(labels > 0, 300, -1000).astype(np.int16) + np.arange(SHAPE[2], dtype=np.int16)


def matrix(spacing=(0.75, 1.25, 2.0), origin=(-40.5, 12.25, 7.0)) -> np.ndarray:
    m = np.diag([*spacing, 1.0])
    m[:3, 3] = origin
    return m


def make_exam(folder: Path, ct_name="ct.nii.gz", seg_name="seg.nii.gz") -> tuple[Path, Path]:
    """A small valid CT and segmentation (same grid)."""
    ct, seg = folder / ct_name, folder / seg_name
    write_volume(ct, Volume(small_ct(), matrix()))
    if seg_name.endswith(".seg.nrrd"):
        write_segmentation_nrrd(seg, Volume(small_labels(), matrix()), {L1: "vertebrae_L1", L2: "vertebrae_L2"})
    else:
        write_volume(seg, Volume(small_labels(), matrix()))
    return ct, seg


def nifti_content(path: Path) -> bytearray:
    data = path.read_bytes()
    return bytearray(gzip.decompress(data) if path.name.endswith(".gz") else data)


def save_nifti(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(bytes(content), compresslevel=1) if path.name.endswith(".gz") else bytes(content))
    return path


def patched_nifti(source: Path, target: Path, *changes) -> Path:
    """A copy of a NIfTI-1 file with header fields changed: ``(offset, struct format, values...)``."""
    content = nifti_content(source)
    for offset, fmt, *values in changes:
        struct.pack_into("<" + fmt, content, offset, *values)
    return save_nifti(target, content)


def run_cli(capfd, ct: Path, seg: Path, out: Path) -> tuple[int, str, str]:
    """``vfscreen screen CT --seg SEG --out OUT`` in-process: (exit status, stdout, stderr)."""
    status = cli.main(["screen", str(ct), "--seg", str(seg), "--out", str(out), "--no-qc"])
    captured = capfd.readouterr()
    return status, captured.out, captured.err


def assert_one_sentence_refusal(status: int, err: str, out_dir: Path, *fragments: str) -> str:
    """Exit status 2, exactly one line on stderr (``vfscreen: ...``) holding ``fragments``, no
    traceback, nothing written."""
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr has more than the sentence: {err!r}"
    line = lines[0]
    assert line.startswith("vfscreen: ") and "Traceback" not in line and "internal error" not in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert not out_dir.exists() or not any(out_dir.iterdir()), "something was written"
    return line


def assert_input_error(reader, path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(InputError) as error:
        reader(path, **kwargs)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------
# 1. voxel spacing
# ------------------------------------------------------------------------------------------------


BAD_SPACINGS = [math.nan, 0.0, -1.0, 1e-30, math.inf]


@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
@pytest.mark.parametrize("value", BAD_SPACINGS, ids=["nan", "zero", "negative", "tiny", "inf"])
@pytest.mark.parametrize("axis", [1, 3])
def test_bad_nifti_spacing_is_refused(tmp_path, capfd, extension, value, axis):
    ct, seg = make_exam(tmp_path)
    for role, source in (("ct", ct), ("seg", seg)):
        bad = patched_nifti(source, tmp_path / f"bad_{role}{extension}", (PIXDIM + 4 * axis, "f", value))
        reader = read_ct if role == "ct" else read_labelmap
        message = assert_input_error(reader, bad, "voxel spacing")
        assert ("nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:g}") in message
        args = (bad, seg) if role == "ct" else (ct, bad)
        status, _, err = run_cli(capfd, *args, tmp_path / f"out_{role}")
        assert_one_sentence_refusal(status, err, tmp_path / f"out_{role}", str(bad), "voxel spacing")


def test_good_spacings_still_read(tmp_path):
    ct, seg = make_exam(tmp_path)
    volume = read_ct(ct)
    np.testing.assert_allclose(volume.spacing, [0.75, 1.25, 2.0])
    fine = Volume(small_ct(), matrix(spacing=(0.05, 0.05, 0.1)))  # micro-CT sized voxels
    write_volume(tmp_path / "fine.nii.gz", fine)
    np.testing.assert_allclose(read_ct(tmp_path / "fine.nii.gz").spacing, [0.05, 0.05, 0.1], rtol=1e-6)


@pytest.mark.parametrize("direction", ["(0,0,0)", "(1e-30,0,0)", "(nan,nan,nan)", "(inf,0,0)", "(0,1.25,0)"])
def test_bad_nrrd_spacing_is_refused(tmp_path, direction):
    """Zero, tiny, non-finite or parallel voxel axes in a NRRD (CT through ITK, .seg.nrrd here)."""
    ct, seg = make_exam(tmp_path, ct_name="ct.nrrd", seg_name="seg.seg.nrrd")
    for source, reader in ((ct, read_ct), (seg, read_labelmap)):
        content = source.read_bytes()
        header, sep, data = content.partition(b"\n\n")
        lines = [
            f"space directions: {direction} (0,1.25,0) (0,0,2)".encode() if line.startswith(b"space directions:")
            else line
            for line in header.split(b"\n")
        ]
        bad = tmp_path / f"bad_{source.name}"
        bad.write_bytes(b"\n".join(lines) + sep + data)
        assert_input_error(reader, bad)


# ------------------------------------------------------------------------------------------------
# 2. origin and orientation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, offset", [
    ("qoffset", QOFFSET_X), ("qoffset", QOFFSET_X + 8), ("sform", SROW_X + 12), ("sform", SROW_X + 16),
    ("quaternion", QUATERN_B),
])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_nifti_geometry_is_refused(tmp_path, capfd, field, offset, value):
    ct, seg = make_exam(tmp_path)
    bad_ct = patched_nifti(ct, tmp_path / "bad_ct.nii.gz", (offset, "f", value))
    assert_input_error(read_ct, bad_ct, field)
    status, _, err = run_cli(capfd, bad_ct, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(bad_ct), field)
    bad_seg = patched_nifti(seg, tmp_path / "bad_seg.nii", (offset, "f", value))
    assert_input_error(read_labelmap, bad_seg, field)


def test_unused_geometry_fields_are_ignored(tmp_path):
    """NaN in a transform whose code is 0 (unused) is harmless: nibabel writes such files."""
    ct, _ = make_exam(tmp_path)
    reference = read_ct(ct)
    odd = patched_nifti(ct, tmp_path / "odd.nii.gz", (QFORM_CODE, "h", 0), (QOFFSET_X, "f", math.nan),
                        (QUATERN_B, "f", math.nan))
    volume = read_ct(odd)
    assert volume.same_grid(reference)


def test_nifti_without_any_transform_is_refused(tmp_path, capfd):
    """qform_code and sform_code both 0: ITK would guess an orientation (and anterior from posterior
    is what the heights depend on), so the file is refused, as CT and as segmentation."""
    ct, seg = make_exam(tmp_path)
    for role, source in (("ct", ct), ("seg", seg)):
        bad = patched_nifti(source, tmp_path / f"unplaced_{role}.nii.gz", (QFORM_CODE, "h", 0), (SFORM_CODE, "h", 0))
        reader = read_ct if role == "ct" else read_labelmap
        assert_input_error(reader, bad, "qform_code and sform_code")
        args = (bad, seg) if role == "ct" else (ct, bad)
        status, _, err = run_cli(capfd, *args, tmp_path / f"out_{role}")
        assert_one_sentence_refusal(status, err, tmp_path / f"out_{role}", str(bad), "position in space")


@pytest.mark.parametrize("replacement", [None, b"spacings: 0.75 1.25 2"], ids=["nothing", "spacings only"])
def test_nrrd_without_space_directions_is_refused(tmp_path, replacement):
    """No ``space directions`` means no orientation (and, without ``spacings``, 1 mm voxels by ITK's
    default): refused for the CT (read by ITK) and the ``.seg.nrrd`` (read here)."""
    ct, seg = make_exam(tmp_path, ct_name="ct.nrrd", seg_name="seg.seg.nrrd")
    for source, reader in ((ct, read_ct), (seg, read_labelmap)):
        header, sep, data = source.read_bytes().partition(b"\n\n")
        lines = [line for line in header.split(b"\n") if not line.startswith((b"space directions:", b"space:"))]
        if replacement:
            lines.append(replacement)
        bad = tmp_path / f"bad_{source.name}"
        bad.write_bytes(b"\n".join(lines) + sep + data)
        assert_input_error(reader, bad, "space directions")


# ------------------------------------------------------------------------------------------------
# 3. vox_offset and dimensions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -352.0, 1e30], ids=str)
def test_bad_vox_offset_is_refused(tmp_path, capfd, value):
    ct, seg = make_exam(tmp_path)
    bad = patched_nifti(ct, tmp_path / "bad.nii.gz", (VOX_OFFSET, "f", value))
    assert_input_error(read_ct, bad, "vox_offset")
    assert_input_error(read_labelmap, bad, "vox_offset")
    status, _, err = run_cli(capfd, bad, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(bad), "vox_offset")


@pytest.mark.parametrize("changes", [
    [(DIM + 4, "h", -5)],
    [(DIM + 2, "h", 0)],
    [(DIM, "h", 9)],
    [(DIM, "h", -3)],
    [(DATATYPE, "h", 9999)],
], ids=["negative dim", "zero dim", "ndim 9", "ndim negative", "unknown datatype"])
def test_bad_nifti_dimensions_are_refused_quietly(tmp_path, capfd, changes):
    ct, seg = make_exam(tmp_path)
    bad = patched_nifti(ct, tmp_path / "bad.nii", *changes)
    assert_input_error(read_ct, bad)
    status, _, err = run_cli(capfd, bad, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(bad))
    status, _, err = run_cli(capfd, ct, bad, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(bad))


def test_singular_sform_is_refused_quietly(tmp_path, capfd):
    """An all-zero sform (used: code 1) once made ITK print on stderr and the reader fail."""
    ct, seg = make_exam(tmp_path)
    bad = patched_nifti(ct, tmp_path / "bad.nii.gz", (SROW_X, "12f", *([0.0] * 12)), (QFORM_CODE, "h", 0))
    status, _, err = run_cli(capfd, bad, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(bad))


# ------------------------------------------------------------------------------------------------
# 5. DICOM slices with different orientations
# ------------------------------------------------------------------------------------------------


def write_dicom_series(folder: Path, orientations, spacing=2.0, size=8) -> None:
    """A CT series built from scratch: one slice per entry of ``orientations`` (6 direction
    cosines each), positioned along the normal of the first, 16-bit HU with rescale -1024."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    first = np.array(orientations[0], dtype=float)
    normal = np.cross(first[:3], first[3:])
    for n, orientation in enumerate(orientations):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "hostile"
        ds.SeriesNumber, ds.InstanceNumber = 1, n + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (np.array([-10.0, -10.0, 0.0]) + n * spacing * normal)]
        ds.SliceThickness = spacing
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = np.full((size, size), 24, dtype=np.uint16)
        pixels[2:6, 2:6] = 1324
        ds.PixelData = pixels.tobytes()
        try:
            ds.save_as(folder / f"slice{n:03d}.dcm", enforce_file_format=True)
        except TypeError:  # pydicom 2 (Slicer 5.8's stack): the same request under its old name
            ds.save_as(folder / f"slice{n:03d}.dcm", write_like_original=False)


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rotated_axial(degrees: float) -> tuple:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, s, 0.0, -s, c, 0.0)


def test_dicom_series_built_here_reads(tmp_path):
    write_dicom_series(tmp_path / "series", [AXIAL] * 5)
    volume = read_ct(tmp_path / "series")
    assert volume.shape == (5, 8, 8)
    np.testing.assert_allclose(volume.spacing, [1.0, 1.0, 2.0])
    assert volume.array.min() == -1000 and volume.array.max() == 300
    # rounding noise in the direction cosines (1e-6) is not a different orientation
    write_dicom_series(tmp_path / "noisy", [AXIAL, rotated_axial(1e-4), AXIAL, rotated_axial(-1e-4), AXIAL])
    assert read_ct(tmp_path / "noisy").shape == (5, 8, 8)


@pytest.mark.parametrize("odd", [rotated_axial(10.0), rotated_axial(0.5), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)],
                         ids=["10 degrees", "half a degree", "coronal"])
def test_dicom_series_with_mixed_orientations_is_refused(tmp_path, capfd, odd):
    folder = tmp_path / "series"
    write_dicom_series(folder, [AXIAL, AXIAL, odd, AXIAL, AXIAL])
    message = assert_input_error(read_ct, folder, "orientation")
    assert "slice" in message
    _, seg = make_exam(tmp_path)
    status, _, err = run_cli(capfd, folder, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(folder), "orientation")


# ------------------------------------------------------------------------------------------------
# 6. NRRD detached data files
# ------------------------------------------------------------------------------------------------


def detached_header(folder: Path, name: str, data_file: str, segmentation: bool, sizes="4 4 4",
                    encoding="raw") -> Path:
    lines = [
        "NRRD0004",
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {sizes}",
        "space directions: (1,0,0) (0,1,0) (0,0,1)",
        "kinds: domain domain domain",
        f"encoding: {encoding}",
        "space origin: (0,0,0)",
        f"data file: {data_file}",
    ]
    if segmentation:
        lines += ["Segment0_ID:=vertebrae_L1", "Segment0_LabelValue:=1", "Segment0_Layer:=0"]
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def escaping_targets(tmp_path: Path) -> dict[str, str]:
    outside = tmp_path / "outside.raw"
    outside.write_bytes(bytes(64))
    return {
        "dotdot": "../outside.raw",
        "deep dotdot": "../../../../../../../../../../etc/passwd",
        "absolute": str(outside),
        "etc passwd": "/etc/passwd",
        "dev zero": "/dev/zero",
    }


@pytest.mark.parametrize("case", ["dotdot", "deep dotdot", "absolute", "etc passwd", "dev zero"])
@pytest.mark.parametrize("name, segmentation, reader", [
    ("ct.nhdr", False, read_ct),
    ("seg.seg.nhdr", True, read_labelmap),
    ("seg.seg.nrrd", True, read_labelmap),
    ("labels.nhdr", False, read_labelmap),
])
def test_nrrd_data_file_outside_the_header_folder_is_refused(tmp_path, case, name, segmentation, reader):
    target = escaping_targets(tmp_path)[case]
    header = detached_header(tmp_path / "exam", name, target, segmentation)
    assert_input_error(reader, header, "data file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_nrrd_data_file_must_be_a_regular_file(tmp_path):
    folder = tmp_path / "exam"
    folder.mkdir()
    os.mkfifo(folder / "pipe.raw")
    os.symlink("/dev/zero", folder / "zero.raw")
    os.symlink(tmp_path / "elsewhere.raw", folder / "link.raw")
    (tmp_path / "elsewhere.raw").write_bytes(bytes(64))
    (folder / "sub").mkdir()
    for data_file in ("pipe.raw", "zero.raw", "link.raw", "sub", "missing.raw"):
        for name, segmentation, reader in (("ct.nhdr", False, read_ct), ("s.seg.nhdr", True, read_labelmap)):
            header = detached_header(folder, name, data_file, segmentation)
            assert_input_error(reader, header, "data file")


def test_nrrd_data_file_in_the_header_folder_or_below_is_read(tmp_path):
    folder = tmp_path / "exam"
    (folder / "data").mkdir(parents=True)
    values = (np.arange(64) % 3).astype(np.uint8)
    (folder / "data" / "v.raw").write_bytes(values.tobytes())
    (folder / "w.raw").write_bytes(values.tobytes())
    ct = read_ct(detached_header(folder, "ct.nhdr", "data/v.raw", False))
    np.testing.assert_array_equal(ct.array.ravel(), values)
    seg = read_labelmap(detached_header(folder, "s.seg.nhdr", "./data/../w.raw", True))
    np.testing.assert_array_equal(seg.array.ravel(), (values == 1) * L1)


def test_cli_refuses_escaping_nrrd_data_file(tmp_path, capfd):
    ct, seg = make_exam(tmp_path)
    header = detached_header(tmp_path / "exam", "ct.nhdr", "/dev/zero", False, sizes="64 64 64")
    status, _, err = run_cli(capfd, header, seg, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(header), "data file")
    header = detached_header(tmp_path / "exam", "s.seg.nhdr", "../../../../../../../etc/passwd", True)
    status, _, err = run_cli(capfd, ct, header, tmp_path / "out")
    assert_one_sentence_refusal(status, err, tmp_path / "out", str(header), "data file")


# ------------------------------------------------------------------------------------------------
# 7. declared sizes (decompression bombs)
# ------------------------------------------------------------------------------------------------


def gzip_zeros(nbytes: int, prefix: bytes = b"") -> bytes:
    """gzip of ``prefix`` followed by ``nbytes`` zero bytes, built without holding them all."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflater.compress(prefix)]
    block = bytes(1 << 20)
    left = nbytes
    while left > 0:
        parts.append(deflater.compress(block[: min(left, len(block))]))
        left -= min(left, len(block))
    parts.append(deflater.flush())
    return b"".join(parts)


def huge_nifti_header(source: Path, dims=(2048, 2048, 2048)) -> bytes:
    content = nifti_content(source)
    struct.pack_into("<4h", content, DIM, 3, *dims)
    return bytes(content[:352])


def test_declared_huge_nifti_is_refused_before_reading(tmp_path, capfd):
    ct, seg = make_exam(tmp_path)
    for role, source in (("ct", ct), ("seg", seg)):
        bomb = tmp_path / f"bomb_{role}.nii.gz"
        bomb.write_bytes(gzip_zeros(8 << 20, prefix=huge_nifti_header(source)))  # 8 MiB of voxels
        reader = read_ct if role == "ct" else read_labelmap
        assert_input_error(reader, bomb, "too large", "VFSCREEN_MAX_VOLUME_BYTES")
        args = (bomb, seg) if role == "ct" else (ct, bomb)
        status, _, err = run_cli(capfd, *args, tmp_path / "out")
        assert_one_sentence_refusal(status, err, tmp_path / "out", str(bomb), "too large")


def test_volume_limit_is_configurable(tmp_path, monkeypatch):
    ct, seg = make_exam(tmp_path)
    nbytes = int(np.prod(SHAPE)) * 2
    monkeypatch.setenv("VFSCREEN_MAX_VOLUME_BYTES", str(nbytes - 1))
    assert_input_error(read_ct, ct, "too large", "VFSCREEN_MAX_VOLUME_BYTES")
    monkeypatch.setenv("VFSCREEN_MAX_VOLUME_BYTES", str(nbytes))
    assert read_ct(ct).shape == SHAPE
    monkeypatch.setenv("VFSCREEN_MAX_VOLUME_BYTES", "lots")
    with pytest.raises(InputError, match="VFSCREEN_MAX_VOLUME_BYTES"):
        read_ct(ct)


@pytest.mark.parametrize("name, segmentation, reader", [
    ("ct.nrrd", False, read_ct),
    ("seg.seg.nrrd", True, read_labelmap),
    ("labels.nrrd", False, read_labelmap),
])
def test_declared_huge_nrrd_is_refused_before_inflating(tmp_path, name, segmentation, reader):
    folder = tmp_path / "exam"
    header = detached_header(folder, name, "unused", segmentation, sizes="4096 4096 4096", encoding="gzip")
    text = "\n".join(line for line in header.read_text().splitlines() if not line.startswith("data file"))
    header.write_bytes(text.encode() + b"\n\n" + gzip_zeros(8 << 20))
    assert_input_error(reader, header, "too large", "VFSCREEN_MAX_VOLUME_BYTES")


@pytest.mark.parametrize("name, segmentation", [("seg.seg.nrrd", True), ("ct.nrrd", False)])
def test_nrrd_inflation_stops_at_the_declared_size(tmp_path, monkeypatch, name, segmentation):
    """Compressed data that goes on far past the declared size (here: 64 MiB of zeros after the
    64 voxels, then garbage) is read only as far as the voxels go."""
    folder = tmp_path / "exam"
    header = detached_header(folder, name, "unused", segmentation, encoding="gzip")
    text = "\n".join(line for line in header.read_text().splitlines() if not line.startswith("data file"))
    voxels = (np.arange(64) % 2).astype(np.uint8).tobytes()
    stream = gzip_zeros(64 << 20, prefix=voxels)
    header.write_bytes(text.encode() + b"\n\n" + stream[: len(stream) // 2] + b"garbage" * 100)
    volume = (read_labelmap if segmentation else read_ct)(header)
    expected = np.frombuffer(voxels, np.uint8)
    np.testing.assert_array_equal(volume.array.ravel(), expected * L1 if segmentation else expected)


def test_nifti_completeness_check_stops_at_the_declared_size(tmp_path):
    """A .nii.gz whose gzip stream runs on past the voxels (its size field then disagrees) is
    checked by inflating only as far as the header says, not to the end of the stream."""
    ct, _ = make_exam(tmp_path)
    content = bytes(nifti_content(ct))
    stream = gzip_zeros(64 << 20, prefix=content)
    odd = tmp_path / "odd.nii.gz"
    odd.write_bytes(stream[: len(stream) // 2] + b"garbage" * 100)
    np.testing.assert_array_equal(read_ct(odd).array, small_ct())


def test_input_that_is_not_a_regular_file_is_refused(tmp_path):
    for reader in (read_ct, read_labelmap):
        with pytest.raises(InputError, match="not a regular file"):
            reader(Path("/dev/zero"))


# ------------------------------------------------------------------------------------------------
# other headers ITK would read wrongly
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, fragment", [
    ([(344, "4s", b"xyz\0")], "NIfTI magic"),  # ITK reads it as Analyze 7.5 and drops the position
    ([(112, "f", math.inf)], "scl_slope"),
    ([(112, "2f", 2.0, -math.inf)], "scl_inter"),
])
def test_other_misleading_nifti_headers_are_refused(tmp_path, changes, fragment):
    ct, _ = make_exam(tmp_path)
    bad = patched_nifti(ct, tmp_path / "bad.nii.gz", *changes)
    assert_input_error(read_ct, bad, fragment)


def test_nibabel_style_nan_scaling_is_read(tmp_path):
    """nibabel writes NaN scl_slope and scl_inter for "not scaled"."""
    ct, _ = make_exam(tmp_path)
    nan_scaled = patched_nifti(ct, tmp_path / "nan.nii.gz", (112, "2f", math.nan, math.nan))
    np.testing.assert_array_equal(read_ct(nan_scaled).array, small_ct())


@pytest.mark.parametrize("data_file", ["/dev/zero", "../outside.raw", "LIST"])
def test_metaimage_data_file_outside_the_header_folder_is_refused(tmp_path, data_file):
    (tmp_path / "outside.raw").write_bytes(bytes(64))
    folder = tmp_path / "exam"
    folder.mkdir()
    header = folder / "ct.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                      f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    assert_input_error(read_ct, header, "data file")
    (folder / "ct.raw").write_bytes(bytes(range(64)))
    header.write_text(header.read_text().replace(f"ElementDataFile = {data_file}", "ElementDataFile = ct.raw"))
    np.testing.assert_array_equal(read_ct(header).array.ravel(), np.arange(64))


def test_in_memory_volume_with_absurd_spacing_is_refused():
    from VertebralFractureScreenLib.io.exam_inputs import check_ct

    with pytest.raises(InputError, match="invalid voxel spacing"):
        check_ct(Volume(small_ct(), matrix(spacing=(1e-5, 1.0, 1.0))), "CT")
    check_ct(Volume(small_ct(), matrix()), "CT")
