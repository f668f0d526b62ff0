"""Tests of the file I/O layer (the io package): orientations, resampling, Slicer segmentations, DICOM.

Geometry truths are computed independently in the tests (voxel centres from the 4x4 matrices the
tests build, NIfTI sform and NRRD headers parsed from the bytes on disk), never taken from the
module under test.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralFractureScreenLib import geometry, levels
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.io.dicom import is_dicom_folder
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap, resample_labelmap, write_volume
from VertebralFractureScreenLib.io.labels import LabelMapWarning
from VertebralFractureScreenLib.io.seg_nrrd import write_segmentation_nrrd
from VertebralFractureScreenLib.io.volume import Volume

# Values exactly representable in float32, so NIfTI (single precision) stores them exactly.
SPACING = (0.75, 1.25, 2.0)
ORIGIN = (-40.5, 12.25, 7.0)
BODY, MARKER = 5, 7

ORIENTATIONS = {
    "ras": np.eye(3),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    # i runs superior, j right, k anterior (columns are the RAS directions of i, j, k)
    "permuted": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    "oblique": geometry.rotation_matrix(25.0, 0.0, 25.0),
}
FORMATS = (".nii.gz", ".nrrd")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def phantom_labels(shape=(12, 14, 16)) -> np.ndarray:
    """A box (BODY) with a small marker (MARKER) in one corner, so flips and swaps show."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:9, 4:10, 5:12] = BODY
    labels[8, 9, 10:12] = MARKER
    return labels


def phantom_ct(labels: np.ndarray) -> np.ndarray:
    return np.where(labels > 0, 300 + 100 * (labels == MARKER), -1000).astype(np.int16)


def ras_of(labels: np.ndarray, ijk_to_ras: np.ndarray, value: int) -> np.ndarray:
    """RAS (mm) of the centres of the voxels holding ``value``, sorted for set comparison."""
    kji = np.argwhere(labels == value)
    points = geometry.ijk_to_ras_points(ijk_to_ras, kji[:, ::-1].astype(float))
    return points[np.lexsort(points.T[::-1])]


def restore_as(array: np.ndarray, ijk_to_ras: np.ndarray, flip=(), transpose=None):
    """The same anatomy stored differently: flip numpy axes, then transpose them; the matrix is
    adjusted so that every voxel keeps its RAS position."""
    a, m = array, np.array(ijk_to_ras, dtype=float)
    for axis in flip:
        column = 2 - axis
        m[:3, 3] += (a.shape[axis] - 1) * m[:3, column]
        m[:3, column] *= -1
        a = np.flip(a, axis)
    if transpose is not None:
        a = a.transpose(transpose)
        moved = m.copy()
        for new_axis, old_axis in enumerate(transpose):
            moved[:3, 2 - new_axis] = m[:3, 2 - old_axis]
        m = moved
    return np.ascontiguousarray(a), m


def nifti_sform(path: Path) -> tuple[int, np.ndarray]:
    """(sform_code, 4x4 sform) read from the NIfTI-1 header bytes; NIfTI's world frame is RAS."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(348)
    code = struct.unpack("<h", header[254:256])[0]
    rows = np.array(struct.unpack("<12f", header[280:328]), dtype=float).reshape(3, 4)
    return code, np.vstack([rows, [0, 0, 0, 1]])


def nrrd_header(path: Path) -> dict[str, str]:
    fields = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").rstrip("\n")
            if not line:
                break
            if ":=" in line:
                key, value = line.split(":=", 1)
                fields[key] = value
            elif ": " in line:
                key, value = line.split(": ", 1)
                fields[key] = value
    return fields


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------
# Volume
# ------------------------------------------------------------------------------------------------


def test_volume_properties_and_same_grid():
    m = geometry.make_ijk_to_ras(SPACING, ORIGIN, ORIENTATIONS["oblique"])
    vol = Volume(np.zeros((3, 4, 5), np.int16), m)
    assert vol.shape == (3, 4, 5)
    np.testing.assert_allclose(vol.spacing, SPACING)
    assert not vol.ijk_to_ras.flags.writeable
    shifted = m.copy()
    shifted[:3, 3] += [0.0, 5e-5, 0.0]
    assert vol.same_grid(Volume(np.ones((3, 4, 5), np.uint8), shifted))
    shifted[:3, 3] += [0.0, 1e-3, 0.0]
    assert not vol.same_grid(Volume(np.ones((3, 4, 5), np.uint8), shifted))
    assert not vol.same_grid(Volume(np.zeros((3, 4, 6), np.int16), m))
    with pytest.raises(ValueError):
        Volume(np.zeros((4, 5)), m)
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 4, 5)), np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------------
# orientations and round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", FORMATS)
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_round_trip_keeps_ras_geometry(tmp_path, orientation, extension):
    labels = phantom_labels()
    m = geometry.make_ijk_to_ras(SPACING, ORIGIN, ORIENTATIONS[orientation])
    seg_path, ct_path = tmp_path / f"seg{extension}", tmp_path / f"ct{extension}"
    write_volume(seg_path, Volume(labels, m))
    write_volume(ct_path, Volume(phantom_ct(labels), m))

    seg = read_labelmap(seg_path)
    ct = read_ct(ct_path)
    assert seg.array.dtype == np.uint8 and ct.array.dtype == np.int16
    np.testing.assert_array_equal(seg.array, labels)
    np.testing.assert_array_equal(ct.array, phantom_ct(labels))
    ct_labels = np.select([ct.array == 300, ct.array == 400], [BODY, MARKER], 0)
    for vol_labels, matrix in ((seg.array, seg.ijk_to_ras), (ct_labels, ct.ijk_to_ras)):
        np.testing.assert_allclose(matrix, m, atol=1e-5, rtol=0)
        for value in (BODY, MARKER):
            np.testing.assert_allclose(ras_of(vol_labels, matrix, value), ras_of(labels, m, value), atol=1e-4)

    # on disk: NIfTI's sform is RAS; NRRD is written in LPS (the Slicer/ITK convention)
    if extension == ".nii.gz":
        code, sform = nifti_sform(seg_path)
        assert code > 0
        np.testing.assert_allclose(sform, m, atol=1e-5)
    else:
        header = nrrd_header(seg_path)
        assert header["space"] == "left-posterior-superior"
        origin = [float(v) for v in header["space origin"].strip("()").split(",")]
        np.testing.assert_allclose(origin, [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]], atol=1e-9)
    assert no_temporary_files(tmp_path)


STORAGES = {
    "as_is": dict(),
    "lps_flip": dict(flip=(1, 2)),
    "flip_k": dict(flip=(0,)),
    "swap_axes": dict(transpose=(2, 0, 1)),
    "flip_and_swap": dict(flip=(0, 2), transpose=(1, 2, 0)),
}


@pytest.mark.parametrize(
    "extension, orientation", [(".nii.gz", "ras"), (".nii.gz", "lps"), (".nrrd", "ras"), (".nrrd", "oblique")]
)
def test_same_anatomy_stored_differently_reads_to_same_ras(tmp_path, extension, orientation):
    labels = phantom_labels()
    m = geometry.make_ijk_to_ras(SPACING, ORIGIN, ORIENTATIONS[orientation])
    reference_points = {value: ras_of(labels, m, value) for value in (BODY, MARKER)}
    reference_centroid = reference_points[BODY].mean(axis=0)
    for name, how in STORAGES.items():
        array, matrix = restore_as(labels, m, **how)
        path = tmp_path / f"{name}{extension}"
        write_volume(path, Volume(array, matrix))
        vol = read_labelmap(path)
        np.testing.assert_allclose(vol.ijk_to_ras, matrix, atol=1e-6, err_msg=name)
        centroid = ras_of(vol.array, vol.ijk_to_ras, BODY).mean(axis=0)
        np.testing.assert_allclose(centroid, reference_centroid, atol=1e-6, err_msg=name)
        for value in (BODY, MARKER):
            np.testing.assert_allclose(
                ras_of(vol.array, vol.ijk_to_ras, value), reference_points[value], atol=1e-6, err_msg=name
            )


# ------------------------------------------------------------------------------------------------
# resampling onto a reference grid
# ------------------------------------------------------------------------------------------------

BOX_LOW, BOX_HIGH = np.array([-10.0, -6.0, -9.0]), np.array([8.0, 12.0, 15.0])
MARK_LOW = np.array([4.0, 8.0, 11.0])


def anatomy_label(ras: np.ndarray) -> np.ndarray:
    """Labels of an analytic phantom at RAS points: a box with a marker in one corner."""
    inside = np.all((ras >= BOX_LOW) & (ras <= BOX_HIGH), axis=1)
    marker = np.all((ras >= MARK_LOW) & (ras <= BOX_HIGH), axis=1)
    return np.where(marker, MARKER, np.where(inside, BODY, 0)).astype(np.uint8)


def voxel_centres(ijk_to_ras: np.ndarray, shape) -> np.ndarray:
    """RAS of all voxel centres, in the array's C order ([k, j, i])."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    return geometry.ijk_to_ras_points(ijk_to_ras, ijk)


def sampled_phantom(ijk_to_ras: np.ndarray, shape) -> Volume:
    return Volume(anatomy_label(voxel_centres(ijk_to_ras, shape)).reshape(shape), ijk_to_ras)


def label_grid() -> np.ndarray:
    """LPS-stored 1.5 mm grid around the phantom; no voxel centre lies on a box face."""
    return geometry.make_ijk_to_ras((1.5, 1.5, 1.5), (29.75, 29.75, -29.75), np.diag([-1.0, -1.0, 1.0]))


def test_resample_onto_oblique_grid_with_other_spacing(tmp_path):
    source = sampled_phantom(label_grid(), (40, 40, 40))
    path = tmp_path / "seg.nii.gz"
    write_volume(path, source)
    shape = (30, 45, 60)
    spacing = np.array([0.8, 1.1, 1.7])
    rotation = geometry.rotation_matrix(20.0, -15.0, 30.0)
    centre_ijk = (np.array(shape[::-1]) - 1) / 2
    reference = Volume(
        np.zeros(shape, np.int16),
        geometry.make_ijk_to_ras(spacing, -(rotation * spacing) @ centre_ijk, rotation),
    )
    out = read_labelmap(path, reference=reference)

    assert out.same_grid(reference) and out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, BODY, MARKER}
    # every reference voxel farther than half a source voxel diagonal from a box face gets the
    # phantom's label at its own RAS position
    centres = voxel_centres(reference.ijk_to_ras, shape)
    margin = 1.5 * np.sqrt(3) / 2 + 1e-6
    near_face = np.zeros(len(centres), bool)
    for low, high in ((BOX_LOW, BOX_HIGH), (MARK_LOW, BOX_HIGH)):
        near_face |= np.any((np.abs(centres - low) < margin) | (np.abs(centres - high) < margin), axis=1)
    truth = anatomy_label(centres)
    assert np.count_nonzero(truth[~near_face]) > 1000
    np.testing.assert_array_equal(out.array.ravel()[~near_face], truth[~near_face])
    # the labelled box's centroid lands within half a voxel of the true box centre
    labelled = centres[out.array.ravel() > 0]
    assert np.linalg.norm(labelled.mean(axis=0) - (BOX_LOW + BOX_HIGH) / 2) < spacing.max() / 2


def test_resample_flipped_permuted_shifted_grid_is_exact():
    source = sampled_phantom(label_grid(), (40, 40, 40))
    # the reference: the label grid stored RAS and with swapped axes, cropped by whole voxels
    array, matrix = restore_as(np.zeros((40, 40, 40), np.uint8), label_grid(), flip=(1, 2), transpose=(1, 0, 2))
    shifted = matrix.copy()
    shifted[:3, 3] += matrix[:3, :3] @ np.array([3.0, -4.0, 5.0])
    reference = Volume(np.zeros((33, 38, 36), np.int16), shifted)
    out = resample_labelmap(source, reference)
    expected = sampled_phantom(reference.ijk_to_ras, reference.shape)
    np.testing.assert_array_equal(out.array, expected.array)
    assert out.same_grid(reference)


def test_resample_paths_agree_on_whole_voxel_grids():
    """SimpleITK's resampler (general path) and array indexing (fast path) must agree exactly
    when voxel centres coincide."""
    from VertebralFractureScreenLib.io.images import resample_by_indexing, resample_by_sitk

    source = sampled_phantom(label_grid(), (40, 40, 40))
    _, matrix = restore_as(np.zeros((40, 40, 40), np.uint8), label_grid(), flip=(0, 2), transpose=(2, 1, 0))
    matrix[:3, 3] += matrix[:3, :3] @ np.array([-2.0, 6.0, 1.0])
    reference = Volume(np.zeros((41, 30, 44), np.int16), matrix)
    fast = resample_by_indexing(source, reference)
    general = resample_by_sitk(source, reference)
    assert fast is not None and fast.any()
    np.testing.assert_array_equal(fast, general)


def test_non_overlapping_segmentation_is_refused(tmp_path):
    source = sampled_phantom(label_grid(), (40, 40, 40))
    far = label_grid()
    far[:3, 3] += [0.0, 0.0, 500.0]
    path = tmp_path / "far.nii.gz"
    write_volume(path, Volume(source.array, far))
    reference = Volume(np.zeros((20, 20, 20), np.int16), geometry.make_ijk_to_ras((1, 1, 1), (-10, -10, -10)))
    with pytest.raises(InputError, match="does not overlap the CT"):
        read_labelmap(path, reference=reference)
    # grids overlap, but the labelled voxels all lie outside the reference
    corner = Volume(np.zeros((10, 10, 10), np.int16), geometry.make_ijk_to_ras((1, 1, 1), (20.0, 20.0, 20.0)))
    with pytest.raises(InputError, match="does not overlap"):
        resample_labelmap(source, corner)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def assert_one_sentence(error: pytest.ExceptionInfo, path: Path):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def test_missing_files_are_input_errors(tmp_path):
    missing = tmp_path / "nothing.nii.gz"
    with pytest.raises(InputError, match="CT file not found") as error:
        read_ct(missing)
    assert_one_sentence(error, missing)
    with pytest.raises(InputError, match="not found") as error:
        read_labelmap(missing)
    assert_one_sentence(error, missing)


def test_corrupt_and_truncated_files_are_input_errors(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 50)
    gzipped_garbage = tmp_path / "garbage2.nii.gz"
    gzipped_garbage.write_bytes(gzip.compress(b"this is not an image" * 50))
    for path in (garbage, gzipped_garbage):
        for reader in (read_ct, read_labelmap):
            with pytest.raises(InputError) as error:
                reader(path)
            assert_one_sentence(error, path)

    ct = Volume((np.arange(40 * 50 * 60) % 900).astype(np.int16).reshape(40, 50, 60), np.eye(4))
    for extension in (".nii", ".nii.gz", ".nrrd"):
        whole = tmp_path / f"whole{extension}"
        write_volume(whole, ct)
        cut = tmp_path / f"cut{extension}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
        with pytest.raises(InputError) as error:
            read_ct(cut)
        assert_one_sentence(error, cut)


def test_images_that_are_not_3d_scalar_volumes_are_refused(tmp_path):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(flat))
    four_d = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16), isVector=False), str(four_d))
    vector = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(vector))
    for path, message in ((flat, "2-D image"), (four_d, "4-D image"), (vector, "values per voxel")):
        for reader in (read_ct, read_labelmap):
            with pytest.raises(InputError, match=message) as error:
                reader(path)
            assert_one_sentence(error, path)
    single = tmp_path / "single.nii.gz"
    write_volume(single, Volume(np.zeros((1, 30, 30), np.int16), np.eye(4)))
    with pytest.raises(InputError, match="single slice"):
        read_ct(single)


def test_label_maps_must_hold_whole_non_negative_ids(tmp_path):
    fractional = np.zeros((4, 5, 6), np.float32)
    fractional[1, 2, 3] = 2.5
    negative = np.zeros((4, 5, 6), np.int16)
    negative[0, 0, 0] = -1000
    for name, array, message in (("frac", fractional, "non-integer"), ("neg", negative, "negative")):
        path = tmp_path / f"{name}.nii.gz"
        write_volume(path, Volume(array, np.eye(4)))
        with pytest.raises(InputError, match=message) as error:
            read_labelmap(path)
        assert_one_sentence(error, path)
    whole = np.zeros((4, 5, 6), np.float32)
    whole[1, 1, 1], whole[2, 2, 2] = 31.0, 300.0
    path = tmp_path / "whole.nii.gz"
    write_volume(path, Volume(whole, np.eye(4)))
    labels = read_labelmap(path)
    assert labels.array.dtype == np.uint16 and labels.array[2, 2, 2] == 300 and labels.array[1, 1, 1] == 31
    with pytest.raises(InputError, match="unknown label convention"):
        read_labelmap(path, convention="nonsense")


def test_ct_value_types(tmp_path):
    cases = {
        "whole_float": (np.full((3, 4, 5), -1024.0, np.float32), np.int16),
        "fractional": (np.full((3, 4, 5), 12.5, np.float32), np.float32),
        "wide_int": (np.full((3, 4, 5), 40000, np.int32), np.float32),
        "int32_in_range": (np.full((3, 4, 5), -1200, np.int32), np.int16),
    }
    for name, (array, dtype) in cases.items():
        path = tmp_path / f"{name}.nrrd"
        write_volume(path, Volume(array, np.eye(4)))
        ct = read_ct(path)
        assert ct.array.dtype == dtype, name
        np.testing.assert_array_equal(ct.array, array)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def test_write_volume_is_atomic_and_checks_its_target(tmp_path):
    vol = Volume(phantom_labels(), geometry.make_ijk_to_ras(SPACING, ORIGIN))
    path = tmp_path / "out" / "seg.nii.gz"  # missing folders are created
    write_volume(path, vol)
    write_volume(path, Volume(np.zeros_like(vol.array), vol.ijk_to_ras))  # overwrite in place
    assert not read_labelmap(path).array.any()
    assert no_temporary_files(path.parent)
    plain = path.parent / "plain.txt"
    plain.write_text("x")  # permissions follow the umask, as for any other file
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    seg_path = path.parent / "seg.seg.nrrd"
    write_segmentation_nrrd(seg_path, vol, {BODY: "vertebrae_L1"})
    assert seg_path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert no_temporary_files(path.parent)

    blocked = tmp_path / "blocked.nii.gz"
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_volume(blocked, vol)
    assert no_temporary_files(tmp_path)
    with pytest.raises(InputError, match="must end with"):
        write_volume(tmp_path / "seg.png", vol)

    sheared = vol.ijk_to_ras.copy()
    sheared[0, 2] = 0.5
    with pytest.raises(InputError, match="sheared"):
        write_volume(tmp_path / "sheared.nii.gz", Volume(vol.array, sheared))
    write_volume(tmp_path / "sheared.nrrd", Volume(vol.array, sheared))
    np.testing.assert_allclose(read_labelmap(tmp_path / "sheared.nrrd").ijk_to_ras, sheared, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Slicer segmentations
# ------------------------------------------------------------------------------------------------


def test_segmentation_nrrd_round_trip_maps_segment_ids(tmp_path):
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[1:4, 2:6, 3:9] = 1
    labels[5:8, 2:6, 3:9] = 2
    labels[9:11, 10:13, 1:4] = 3
    labels[0, 0, 0] = 9  # not listed: written as background
    m = geometry.make_ijk_to_ras(SPACING, ORIGIN, ORIENTATIONS["oblique"])
    path = tmp_path / "spine.seg.nrrd"
    write_segmentation_nrrd(path, Volume(labels, m), {1: "vertebrae_L1", 2: "vertebrae_L2", 3: "aorta"})
    assert no_temporary_files(tmp_path)

    header = nrrd_header(path)
    assert header["Segment0_ID"] == "vertebrae_L1" and header["Segment2_LabelValue"] == "3"
    assert header["Segment1_Extent"] == "3 8 2 5 5 7"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert "TerminologyEntry:" in header["Segment0_Tags"] and "^66794005^" in header["Segment0_Tags"]

    seg = read_labelmap(path)
    expected = np.select([labels == 1, labels == 2, labels == 3], [31, 30, 52], 0)
    np.testing.assert_array_equal(seg.array, expected)
    np.testing.assert_allclose(seg.ijk_to_ras, m, atol=1e-9)

    # ITK (which Slicer uses) reads the same voxels at the same place
    image = sitk.ReadImage(str(path))
    assert image.GetMetaData("Segment1_ID") == "vertebrae_L2"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.where(labels == 9, 0, labels))
    itk_lps = np.eye(4)
    itk_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    itk_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(geometry.LPS_TO_RAS @ itk_lps, m, atol=1e-9)

    with pytest.warns(LabelMapWarning, match="aorta"):
        verse = read_labelmap(path, convention="verse")
    np.testing.assert_array_equal(
        verse.array, np.select([labels == 1, labels == 2], [levels.VERSE_VERTEBRA_IDS["L1"], 21], 0)
    )


LPS_DIRECTIONS = np.array([[0.0, -0.8, 0.0], [0.0, 0.0, 1.2], [2.5, 0.0, 0.0]])  # columns: i, j, k in LPS
LPS_ORIGIN = np.array([12.5, -30.0, 100.25])


def two_layer_segmentation(kind: str, encoding: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A hand-written 4-D Slicer segmentation with overlapping segments in two layers.

    Returns (file bytes, expected labels in total ids, expected IJK→RAS)."""
    nk, nj, ni = 6, 7, 8
    layers = np.zeros((2, nk, nj, ni), np.uint8)  # [layer, k, j, i]
    layers[0, 1:3, 1:4, 1:5] = 1  # vertebrae_L1 by ID
    layers[0, 4:6, 1:4, 1:5] = 2  # L2 by terminology only
    layers[0, 0, 5:7, 6:8] = 3  # "vertebrae_L3" by name only: must be dropped
    layers[1, 2:5, 2:6, 3:7] = 1  # autochthon_left, overlapping L1 and L2
    layers[1, 0, 0, 0:2] = 2  # iliopsoas_right by the Segment<N>_Terminology key
    layers[1, 5, 6, 0] = 4  # name says L4, terminology says L5: conflict, dropped

    expected = np.zeros((nk, nj, ni), np.uint8)
    expected[layers[0] == 1] = 31
    expected[layers[0] == 2] = 30
    expected[layers[1] == 1] = 86
    expected[layers[1] == 2] = 89

    term = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~{}"
    directions = " ".join("(" + ",".join(repr(float(v)) for v in LPS_DIRECTIONS[:, c]) + ")" for c in range(3))
    header = "\n".join(
        [
            "NRRD0004",
            "# written by hand for a test",
            "type: unsigned char",
            "dimension: 4",
            "space: left-posterior-superior",
            f"sizes: 2 {ni} {nj} {nk}",
            f"space directions: none {directions}",
            f"kinds: {kind} domain domain domain",
            "endian: little",
            f"encoding: {encoding}",
            "space origin: (" + ",".join(repr(float(v)) for v in LPS_ORIGIN) + ")",
            "Segment0_ID:=vertebrae_L1",
            "Segment0_Name:=L1",
            "Segment0_LabelValue:=1",
            "Segment0_Layer:=0",
            "Segment1_ID:=Segment_2",
            "Segment1_Name:=L2 vertebra",
            "Segment1_LabelValue:=2",
            "Segment1_Layer:=0",
            "Segment1_Tags:=Segmentation.Status:inprogress|TerminologyEntry:"
            + term.format("SCT^14293000^L2 vertebra~^^~Anatomic codes - DICOM master list~^^~^^")
            + "|",
            "Segment2_ID:=Segment_3",
            "Segment2_Name:=vertebrae_L3",
            "Segment2_LabelValue:=3",
            "Segment2_Layer:=0",
            "Segment3_ID:=autochthon_left",
            "Segment3_Name:=Autochthon left",
            "Segment3_LabelValue:=1",
            "Segment3_Layer:=1",
            "Segment4_ID:=Segment_6",
            "Segment4_Name:=Psoas R",
            "Segment4_LabelValue:=2",
            "Segment4_Layer:=1",
            "Segment4_Terminology:=" + term.format("SCT^68455001^Iliopsoas muscle~SCT^24028007^Right"),
            "Segment5_ID:=Segment_5",
            "Segment5_Name:=L4 vertebra",
            "Segment5_LabelValue:=4",
            "Segment5_Layer:=1",
            "Segment5_Tags:=TerminologyEntry:" + term.format("SCT^49668003^L5 vertebra~^^") + "|",
            "Segmentation_MasterRepresentation:=Binary labelmap",
            "Segmentation_ReferenceImageExtentOffset:=0 0 0",
        ]
    )
    # NRRD's first axis (the layer) varies fastest: numpy order [k, j, i, layer]
    data = np.ascontiguousarray(np.moveaxis(layers, 0, -1)).tobytes()
    if encoding == "gzip":
        data = gzip.compress(data)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = LPS_DIRECTIONS
    ijk_to_lps[:3, 3] = LPS_ORIGIN
    return (header + "\n\n").encode() + data, expected, geometry.LPS_TO_RAS @ ijk_to_lps


@pytest.mark.parametrize("kind, encoding", [("list", "gzip"), ("none", "raw"), ("vector", "raw")])
def test_two_layer_segmentation_nrrd(tmp_path, kind, encoding):
    content, expected, ijk_to_ras = two_layer_segmentation(kind, encoding)
    path = tmp_path / "layers.seg.nrrd"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = read_labelmap(path)
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, LabelMapWarning))
    assert "Segment_3" in messages and "Segment_5" in messages and "overlap" in messages
    assert "Segment_2" not in messages and "Segment_6" not in messages
    np.testing.assert_array_equal(seg.array, expected)
    np.testing.assert_allclose(seg.ijk_to_ras, ijk_to_ras, atol=1e-12)

    # resampled onto a reference that is the same grid stored RAS-wise
    array, matrix = restore_as(np.zeros(expected.shape, np.int16), ijk_to_ras, flip=(0,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelMapWarning)
        resampled = read_labelmap(path, reference=Volume(array, matrix))
    np.testing.assert_array_equal(resampled.array, np.flip(expected, 0))


# ------------------------------------------------------------------------------------------------
# real data (TotalSegmentator's example files, SPEC §7)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_ct(example_data) -> Volume:
    return read_ct(example_data / "example_ct_dicom")


def test_dicom_ct_and_las_segmentation_land_on_the_anatomy(example_data, dicom_ct):
    ct = dicom_ct
    assert ct.shape == (20, 512, 512) and ct.array.dtype == np.int16
    np.testing.assert_allclose(ct.spacing, [0.9765625, 0.9765625, 2.0])
    seg = read_labelmap(example_data / "example_seg_dicom.nii.gz", reference=ct)
    assert seg.same_grid(ct)
    present = set(np.unique(seg.array))
    assert {levels.TOTAL_VERTEBRA_IDS["T12"], levels.TOTAL_VERTEBRA_IDS["T11"]} <= present
    vertebrae = np.isin(seg.array, [32, 33])
    assert ct.array[vertebrae].mean() > 100  # bone
    assert ct.array[np.flip(vertebrae, 1)].mean() < 0  # the check can tell a flipped label map
    assert ct.array[:, :24, :24].mean() < -900  # air outside the body
    assert ct.array.min() >= -1024  # rescale intercept applied (stored values start at 0)


def test_nifti_ct_with_its_spine_segmentation(example_data):
    ct = read_ct(example_data / "example_ct.nii.gz")
    assert ct.shape == (112, 101, 122) and ct.array.dtype == np.int16  # stored as int32
    np.testing.assert_allclose(ct.spacing, [3.0, 3.0, 3.0])
    seg = read_labelmap(example_data / "spine_report" / "totalseg.nii.gz", reference=ct)
    assert seg.same_grid(ct)
    assert set(np.unique(seg.array)) == {0, *range(26, 34)}
    assert ct.array[seg.array == levels.TOTAL_VERTEBRA_IDS["L1"]].mean() > 100


def test_dicom_folder_detection_and_single_file(example_data, dicom_ct):
    folder = example_data / "example_ct_dicom"
    assert is_dicom_folder(folder)
    assert not is_dicom_folder(example_data)
    assert not is_dicom_folder(example_data / "example_ct.nii.gz")
    one_file = sorted(folder.iterdir())[7]
    ct = read_ct(one_file)  # the whole series it belongs to
    assert ct.same_grid(dicom_ct)
    np.testing.assert_array_equal(ct.array, dicom_ct.array)
    with pytest.raises(InputError, match="no DICOM series"):
        read_ct(example_data / "spine_report")


def set_dicom_text(data: bytes, group: int, element: int, vr: bytes, value: str) -> bytes:
    """Replace the value of a top-level explicit-VR-little-endian text element (short form)."""
    tag = struct.pack("<HH", group, element) + vr
    start = data.find(tag, 0, data.find(b"\xe0\x7f\x10\x00"))  # before the pixel data
    assert start > 0, "element not found"
    old_length = struct.unpack("<H", data[start + 6 : start + 8])[0]
    encoded = value.encode("ascii")
    if len(encoded) % 2:
        encoded += b"\0" if vr == b"UI" else b" "
    return data[: start + 6] + struct.pack("<H", len(encoded)) + encoded + data[start + 8 + old_length :]


def test_dicom_folder_with_two_series(tmp_path, example_data, dicom_ct):
    first, second = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
    for n, source in enumerate(sorted((example_data / "example_ct_dicom").iterdir())):
        content = source.read_bytes()
        (tmp_path / f"a{n:03d}.dcm").write_bytes(set_dicom_text(content, 0x0020, 0x000E, b"UI", first))
        copy = set_dicom_text(content, 0x0020, 0x000E, b"UI", second)
        (tmp_path / f"b{n:03d}.dcm").write_bytes(set_dicom_text(copy, 0x0008, 0x103E, b"LO", "second copy"))
    with pytest.raises(InputError, match="2 series") as error:
        read_ct(tmp_path)
    message = str(error.value)
    assert first in message and second in message and "20 slices" in message and "second copy" in message
    assert "series_uid" in message and "\n" not in message
    ct = read_ct(tmp_path, series_uid=second)
    assert ct.same_grid(dicom_ct)
    np.testing.assert_array_equal(ct.array, dicom_ct.array)
    with pytest.raises(InputError, match="is not in folder"):
        read_ct(tmp_path, series_uid="1.2.3")


def slice_positions(folder: Path) -> dict[Path, np.ndarray]:
    """ImagePositionPatient (LPS, mm) of every file in a DICOM folder."""
    positions = {}
    for path in folder.iterdir():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        positions[path] = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    return positions


@pytest.mark.parametrize("defect, message", [
    ("missing", "unevenly spaced"),
    ("duplicated", "same position"),
    ("tilted", "gantry-tilted"),
])
def test_dicom_series_that_is_not_a_regular_grid_is_refused(tmp_path, example_data, defect, message):
    by_height = sorted(slice_positions(example_data / "example_ct_dicom").items(), key=lambda item: item[1][2])
    chosen = [path for path, _ in by_height[:6]]  # six neighbouring slices keep the test fast
    for n, path in enumerate(chosen):
        content = path.read_bytes()
        if defect == "tilted":  # shift each slice sideways by 0.5 mm per slice (about 14 degrees)
            x, y, z = by_height[n][1]
            content = set_dicom_text(content, 0x0020, 0x0032, b"DS", f"{x + 0.5 * n:.8g}\\{y:.8g}\\{z:.8g}")
        (tmp_path / f"slice{n:03d}.dcm").write_bytes(content)
    if defect == "missing":
        os.remove(tmp_path / "slice003.dcm")
    if defect == "duplicated":
        shutil.copy(tmp_path / "slice002.dcm", tmp_path / "slice002_again.dcm")
    with pytest.raises(InputError, match=message) as error:
        read_ct(tmp_path)
    assert_one_sentence(error, tmp_path)


# ------------------------------------------------------------------------------------------------
# interoperability with 3D Slicer's own segmentation reader and writer (slicer-core wheel)
# ------------------------------------------------------------------------------------------------


def test_segmentation_nrrd_interoperates_with_slicer(tmp_path):
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (Python 3.11)")
    mrml_support = pytest.importorskip("mrml_support")
    mrml = mrml_support.make_mrml_scene()
    matrix = geometry.make_ijk_to_ras(
        (0.8, 0.7, 2.5), (12.5, -40.0, 310.0), geometry.rotation_matrix(20.0, -10.0, 35.0) @ np.diag([-1.0, -1.0, 1.0])
    )
    labels = np.zeros((7, 11, 13), np.uint8)
    labels[1:3, 2:6, 3:9] = 1
    labels[4:6, 2:6, 3:9] = 2
    labels[3, 8:10, 1:3] = 3
    names = {1: "vertebrae_L1", 2: "vertebrae_L2", 3: "aorta"}
    ours = tmp_path / "ours.seg.nrrd"
    write_segmentation_nrrd(ours, Volume(labels, matrix), names)
    volume = slicer.util.addVolumeFromArray(np.zeros(labels.shape, np.int16), matrix, "ct")

    # Slicer reads our file: segment IDs, label values, terminology, voxels and oblique geometry
    segmentation = mrml.load_segmentation(ours)
    assert mrml_support.segment_ids(segmentation) == list(names.values())
    for value, segment_id in names.items():
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        assert segment.GetLabelValue() == value
        back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        np.testing.assert_array_equal(back, labels == value)
    assert "^66794005^L1 vertebra" in segmentation.GetSegmentation().GetSegment("vertebrae_L1").GetTerminology()

    # we read a file Slicer writes with overlapping segments (two layers, 'list' axis)
    overlapping = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "overlapping")
    overlapping.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    body = np.zeros(labels.shape, np.uint8)
    body[1:5, 2:6, 3:9] = 1
    muscle = np.zeros(labels.shape, np.uint8)
    muscle[3:6, 4:9, 5:11] = 1
    for segment_id, mask in (("vertebrae_L1", body), ("autochthon_left", muscle)):
        overlapping.GetSegmentation().AddEmptySegment(segment_id)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, overlapping, segment_id, volume)
    theirs = tmp_path / "theirs.seg.nrrd"
    storage = overlapping.CreateDefaultStorageNode()
    storage.SetFileName(str(theirs))
    assert storage.WriteData(overlapping)
    assert nrrd_header(theirs)["dimension"] == "4"
    with pytest.warns(LabelMapWarning, match="overlap"):
        seg = read_labelmap(theirs, reference=Volume(np.zeros(labels.shape, np.int16), matrix))
    expected = np.zeros(labels.shape, np.uint8)
    expected[body > 0] = levels.TOTAL_VERTEBRA_IDS["L1"]
    expected[muscle > 0] = levels.TOTAL_AUTOCHTHON_LEFT
    np.testing.assert_array_equal(seg.array, expected)


@pytest.mark.parametrize("orientation", ["ras", "lps", "permuted", "oblique"])
@pytest.mark.parametrize("extension", [".nii", ".nii.gz"])
def test_nifti_read_directly_matches_simpleitk(tmp_path, orientation, extension):
    """The direct NIfTI reader (one copy of the voxels in memory) gives SimpleITK's voxels and
    geometry."""
    import SimpleITK as sitk

    from VertebralFractureScreenLib.io.nifti import read_nifti_directly

    rng = np.random.default_rng(3)
    ijk_to_ras = geometry.make_ijk_to_ras((0.7, 0.8, 2.5), (10.0, -20.0, 30.0), ORIENTATIONS[orientation])
    ct = Volume(rng.integers(-1024, 2000, size=(7, 9, 11)).astype(np.int16), ijk_to_ras)
    path = tmp_path / f"ct{extension}"
    write_volume(path, ct)
    direct = read_nifti_directly(path, "CT")
    assert direct is not None and direct[0].dtype == np.int16
    np.testing.assert_array_equal(direct[0], sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    np.testing.assert_allclose(direct[1], ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(read_ct(path).array, ct.array)


def test_scaled_nifti_is_read_through_simpleitk(tmp_path):
    """A NIfTI with a rescale slope is left to SimpleITK, which applies it."""
    from VertebralFractureScreenLib.io.nifti import read_nifti_directly

    ct = Volume(np.arange(7 * 9 * 11, dtype=np.int16).reshape(7, 9, 11) - 300, geometry.make_ijk_to_ras(
        (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), ORIENTATIONS["ras"]))
    path = tmp_path / "scaled.nii"
    write_volume(path, ct, compress=False)
    data = bytearray(path.read_bytes())
    data[112:116] = struct.pack("<f", 2.0)  # scl_slope
    path.write_bytes(bytes(data))
    assert read_nifti_directly(path, "CT") is None
    np.testing.assert_array_equal(read_ct(path).array, ct.array.astype(np.int32) * 2)
