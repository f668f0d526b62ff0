"""TotalSegmentator for a CT node of the scene (``slicer_segmentation``), as the panel's Apply runs
it: in a child process, with its log, Slicer's event processing between polls, Cancel, and
nothing added to the scene unless it succeeded.

Real MRML nodes (``slicer-core`` wheel) and TotalSegmentator's real inference path offline, as in
``test_segmentation.py``: tiny fake checkpoints (every voxel of the crop predicted as L1) in a
temporary ``TOTALSEG_WEIGHTS_PATH``, handed to the child through its environment with a temporary
``TOTALSEG_HOME_DIR`` and a proxy that records any connection attempt.
"""

from __future__ import annotations

import time

import pytest

slicer = pytest.importorskip("slicer", reason="slicer (the slicer-core wheel) is not installed")

from mrml_support import make_mrml_scene, segment_ids  # noqa: E402
from VertebralFractureScreenLib import levels, slicer_segmentation  # noqa: E402
from VertebralFractureScreenLib.errors import WeightsMissingError  # noqa: E402
from VertebralFractureScreenLib.segment.job import SegmentationCancelled  # noqa: E402

import fake_totalseg_weights as fake  # noqa: E402
from totalseg_offline import needs_totalsegmentator, offline_env, phantom_ct  # noqa: E402

pytestmark = needs_totalsegmentator

L1 = levels.TOTAL_VERTEBRA_IDS["L1"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory, trap):
    root = tmp_path_factory.mktemp("slicer_totalseg")
    weights, empty, home = root / "weights", root / "no-weights", root / "home"
    fake.write_fake_total_fast_weights(weights, label=L1, crop_label=levels.TOTAL_AORTA)
    empty.mkdir()
    home.mkdir()
    return {"env": offline_env(weights, home, trap), "env_without_weights": offline_env(empty, home, trap),
            "trap": trap}


@pytest.fixture
def ct_node():
    mrml = make_mrml_scene()
    ct = phantom_ct("RAS")
    node = slicer.util.addVolumeFromArray(ct.array, ct.ijk_to_ras, "CT")
    return mrml, node


def node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.mark.slow
def test_segments_into_a_new_node_with_log_and_events(offline, ct_node):
    mrml, volume = ct_node
    before = node_ids(mrml.scene)
    lines, events = [], []
    node = slicer_segmentation.segment_volume_node(volume, quality="fast", env=offline["env"], log=lines.append,
                                                   process_events=lambda: events.append(time.monotonic()))
    added = [mrml.scene.GetNodeByID(i) for i in node_ids(mrml.scene) - before]
    assert sorted(n.GetClassName() for n in added) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"]
    assert node.GetName() == "CT TotalSegmentator"
    assert segment_ids(node) == ["vertebrae_L1"]  # what the fake model predicts, by its class name
    voxels = slicer.util.arrayFromSegmentBinaryLabelmap(node, "vertebrae_L1", volume)
    assert voxels.shape == slicer.util.arrayFromVolume(volume).shape and voxels.any()
    assert lines and len(events) >= 5  # the log reached the panel; events were processed while it ran
    assert offline["trap"].requests == []


def test_missing_weights_ask_first_and_add_nothing(offline, ct_node):
    mrml, volume = ct_node
    before = node_ids(mrml.scene)
    with pytest.raises(WeightsMissingError) as caught:
        slicer_segmentation.segment_volume_node(volume, quality="fast", env=offline["env_without_weights"])
    assert "\n" not in str(caught.value) and "weights" in str(caught.value)
    assert node_ids(mrml.scene) == before
    assert offline["trap"].requests == []


def test_cancel_stops_it_and_adds_nothing(offline, ct_node):
    mrml, volume = ct_node
    before = node_ids(mrml.scene)
    lines, asked = [], []

    def cancelled():
        if lines and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    with pytest.raises(SegmentationCancelled):
        slicer_segmentation.segment_volume_node(volume, quality="fast", env=offline["env"], log=lines.append,
                                                cancelled=cancelled)
    assert time.monotonic() - asked[0] < 15.0  # a liveness bound on a loaded machine, not a benchmark
    assert node_ids(mrml.scene) == before
