"""The headless MRML harness: volumes and segments go in and come back out of real MRML nodes
with their voxels and oblique geometry intact."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (Python 3.11)")

from mrml_support import ijk_to_ras, make_mrml_scene, segment_ids  # noqa: E402
from VertebralFractureScreenLib.geometry import make_ijk_to_ras, rotation_matrix  # noqa: E402


@pytest.fixture
def mrml():
    return make_mrml_scene()


def oblique_ijk_to_ras() -> np.ndarray:
    """Anisotropic voxels on an axis grid rotated about all three axes, with an LPS-like flip."""
    directions = rotation_matrix(20.0, -10.0, 35.0) @ np.diag([-1.0, -1.0, 1.0])
    return make_ijk_to_ras((0.8, 0.7, 2.5), (12.5, -40.0, 310.0), directions)


def test_volume_round_trip_keeps_voxels_and_oblique_geometry(mrml):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(7, 11, 13)).astype(np.int16)  # [k, j, i]
    matrix = oblique_ijk_to_ras()

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))

    assert node.GetScene() is mrml.scene
    back = slicer.util.arrayFromVolume(node)
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(ijk_to_ras(node), matrix, atol=1e-9)


def test_segment_round_trip_keeps_voxels(mrml):
    array = np.zeros((7, 11, 13), dtype=np.int16)
    volume = slicer.util.addVolumeFromArray(array, oblique_ijk_to_ras(), "ct")
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[2:5, 3:8, 4:10] = 1
    labels[3, 5, 6] = 0  # a hole, so that a filled box would not pass

    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert segmentation.GetSegmentation().AddEmptySegment("vertebrae_L1") == "vertebrae_L1"
    slicer.util.updateSegmentBinaryLabelmapFromArray(labels, segmentation, "vertebrae_L1", volume)

    back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "vertebrae_L1", volume)
    np.testing.assert_array_equal(back, labels)
    assert segment_ids(segmentation) == ["vertebrae_L1"]


def test_scene_is_empty_for_each_test(mrml):
    assert mrml.scene.GetNodesByClass("vtkMRMLVolumeNode").GetNumberOfItems() == 0
    assert mrml.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    assert make_mrml_scene() is mrml  # one session per process


def test_files_load_with_slicers_readers(mrml, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[1:3, 1:4, 2:5] = 31
    labels[3:5, 1:4, 2:5] = 30
    image = sitk.GetImageFromArray(array)  # ITK geometry is LPS
    image.SetSpacing((0.7, 0.8, 2.0))
    image.SetOrigin((10.0, 20.0, -30.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(tmp_path / "total.nii.gz"))

    volume = mrml.load_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)
    expected = np.diag([-0.7, -0.8, 2.0, 1.0])
    expected[:3, 3] = (-10.0, -20.0, -30.0)
    np.testing.assert_allclose(ijk_to_ras(volume), expected, atol=1e-6)

    segmentation = mrml.load_segmentation(tmp_path / "total.nii.gz", {31: "vertebrae_L1", 30: "vertebrae_L2"})
    assert sorted(segment_ids(segmentation)) == ["vertebrae_L1", "vertebrae_L2"]
    for label, segment_id in ((31, "vertebrae_L1"), (30, "vertebrae_L2")):
        back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        np.testing.assert_array_equal(back, (labels == label).astype(back.dtype))


def test_phantom_files_load_with_slicer_geometry(mrml, tmp_path):
    """The library's phantom writer and Slicer's readers agree on voxels, oblique geometry and
    segment IDs (what the module's "Make phantom" button and self-test rely on)."""
    phantom = pytest.importorskip("VertebralFractureScreenLib.phantom.render")
    pytest.importorskip("VertebralFractureScreenLib.io.images")
    from VertebralFractureScreenLib.levels import TOTAL_CLASS_NAMES, TOTAL_VERTEBRA_IDS

    spec = phantom.PhantomSpec(levels=("L1", "L2"), spacing=(2.5, 2.5, 2.5), supersampling=1,
                               grid_orientation="oblique")
    made = phantom.make_phantom(spec)
    paths = phantom.write_phantom(spec, tmp_path)
    volume = mrml.load_volume(paths["ct"])
    segmentation = mrml.load_segmentation(paths["total"], TOTAL_CLASS_NAMES)

    np.testing.assert_allclose(ijk_to_ras(volume), made.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), made.ct)
    assert {"vertebrae_L1", "vertebrae_L2"} <= set(segment_ids(segmentation))
    back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "vertebrae_L1", volume)
    np.testing.assert_array_equal(back, made.total == TOTAL_VERTEBRA_IDS["L1"])
