"""What the Slicer panel does to the scene, on real MRML nodes (``slicer-core`` wheel, no Qt):
scene hygiene over repeated runs and several exams, results that come back from a saved scene,
the row click (views, sagittal plane, highlighted segment), the table view, and TotalSegmentator
label maps loaded as segmentations.

The panel's Apply is ``slicer_nodes.screen_into_scene`` with the output nodes the parameter node
holds; the Qt side (widgets, parameter-node GUI connectors) needs a Slicer application and is
tested by ``VertebralFractureScreen/Testing/Python/VertebralFractureScreenPanelTest.py`` there.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer (the slicer-core wheel) is not installed")

from mrml_support import make_mrml_scene, segment_ids  # noqa: E402
from VertebralFractureScreenLib.exam import screening
from VertebralFractureScreenLib import slicer_nodes, slicer_results, slicer_segmentation
from VertebralFractureScreenLib.io.images import read_labelmap  # noqa: E402
from VertebralFractureScreenLib.levels import TOTAL_CLASS_NAMES, TOTAL_VERTEBRA_IDS  # noqa: E402
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom  # noqa: E402

SPEC_A = PhantomSpec(levels=("T12", "L1", "L2"), spacing=(2.0, 2.0, 2.0), supersampling=1,
                     fractures=(Fracture.parse("L1:wedge:0.35"),), seed=1)
SPEC_B = PhantomSpec(levels=("L2", "L3", "L4"), spacing=(2.0, 2.0, 2.0), supersampling=1,
                     fractures=(Fracture.parse("L3:crush:0.3"),), seed=2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicer_scene")
    return {name: write_phantom(spec, folder / name) for name, spec in (("A", SPEC_A), ("B", SPEC_B))}


@pytest.fixture
def mrml():
    return make_mrml_scene()


def nodes_by_id(scene) -> dict:
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())}


def segmentation_state(node) -> list:
    seg = node.GetSegmentation()
    return [(seg.GetNthSegmentID(i), seg.GetNthSegment(i).GetName(), tuple(seg.GetNthSegment(i).GetColor()),
             seg.GetNthSegment(i).GetLabelValue()) for i in range(seg.GetNumberOfSegments())]


def load_exam(mrml, paths, name):
    volume = mrml.load_volume(paths["ct"], name=name)
    segmentation = slicer_segmentation.load_total_segmentation(mrml.scene, paths["total"], volume, f"{name} total")
    return volume, segmentation


def test_scene_hygiene_three_runs_of_one_exam_and_one_of_another(mrml, phantoms):
    """The scene holds exactly one result per exam after repeated runs (no colour tables,
    labelmaps, display or storage nodes left over) and the inputs are unchanged."""
    scene = mrml.scene
    volume_a, seg_a = load_exam(mrml, phantoms["A"], "A")
    volume_b, seg_b = load_exam(mrml, phantoms["B"], "B")
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # a Slicer scene always has one
    inputs_before = {node_id: node.GetClassName() for node_id, node in nodes_by_id(scene).items()}
    state_a, state_b = segmentation_state(seg_a), segmentation_state(seg_b)
    array_a = slicer.util.arrayFromVolume(volume_a).copy()

    table, grades = None, None  # the panel's output selectors start at "Create new"
    for _ in range(3):
        _, made_a = slicer_nodes.screen_into_scene(volume_a, seg_a, vertebrae_table=table, grades_segmentation=grades)
        table, grades = made_a.vertebrae, made_a.grades  # the parameter node keeps them
    _, made_b = slicer_nodes.screen_into_scene(volume_b, seg_b)

    added = {node_id: node for node_id, node in nodes_by_id(scene).items() if node_id not in inputs_before}
    assert set(inputs_before) <= set(nodes_by_id(scene))  # nothing of the user's was removed
    classes = Counter(node.GetClassName() for node in added.values())
    lines_a, lines_b = len(made_a.lines), len(made_b.lines)
    assert lines_a == lines_b == 9
    assert classes == Counter({
        "vtkMRMLTableNode": 2 * 3,  # vertebrae, muscles, exam per exam
        "vtkMRMLTextNode": 2,  # exam.json per exam
        "vtkMRMLSegmentationNode": 2,  # grades per exam
        "vtkMRMLSegmentationDisplayNode": 2,
        "vtkMRMLMarkupsLineNode": lines_a + lines_b,
        "vtkMRMLMarkupsDisplayNode": lines_a + lines_b,
    }), classes
    # Every added display node serves a result node; each result node is in its exam's folder.
    results = {node.GetID() for node in slicer_results.result_nodes(scene)}
    assert results == {node_id for node_id, node in added.items() if not node.IsA("vtkMRMLDisplayNode")}
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for made in (made_a, made_b):
        assert sh.GetItemName(made.folder) == f"{made.name} results"
        assert {sh.GetItemParent(sh.GetItemByDataNode(node)) for node in made.nodes()} == {made.folder}
    assert made_a.folder != made_b.folder
    assert made_a.vertebrae is table and made_a.grades is grades
    # The inputs are as they were: segment IDs, names, colours, label values, CT voxels.
    assert segmentation_state(seg_a) == state_a and segmentation_state(seg_b) == state_b
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume_a), array_a)
    # Both exams' results stand side by side.
    found = slicer_results.find_results(scene)
    assert {made.name for made in found.values()} == {"A", "B"}
    assert found[made_a.key].vertebrae is made_a.vertebrae


def test_results_come_back_from_a_saved_scene(mrml, phantoms, tmp_path):
    """Saved as a Slicer data bundle and reopened: the panel's rows and the exported files
    (vertebrae.csv, muscles.csv, exam.json) are the same as before saving."""
    scene = mrml.scene
    volume, segmentation = load_exam(mrml, phantoms["A"], "A")
    result, made = slicer_nodes.screen_into_scene(volume, segmentation)
    before = tmp_path / "before"
    result.write(before, qc=False)
    rows_before = slicer_results.panel_rows(result.vertebrae)

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert mrml.app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    scene_file = next(bundle.glob("*.mrml"))
    scene.Clear(0)
    assert not slicer_results.find_results(scene)
    scene.SetURL(str(scene_file))
    assert scene.Connect()

    found = slicer_results.find_results(scene)
    assert len(found) == 1
    restored = next(iter(found.values()))
    assert restored.name == "A" and set(restored.lines) == set(made.lines)
    # Units, titles and descriptions from the measurement registry, kept by the saved scene.
    for node in (made.vertebrae, restored.vertebrae):
        assert node.GetColumnUnitLabel("ha_mm") == "mm" and node.GetColumnLongName("ha_mm") == "Anterior height"
        assert node.GetColumnUnitLabel("trabecular_hu_mean") == "[hnsf'U]"
        assert "15 %" in node.GetColumnDescription("ha_mm")
    assert restored.muscles.GetColumnUnitLabel("volume_ml") == "mL"
    rows = slicer_results.rows_from_table(restored.vertebrae, screening.VERTEBRA_COLUMNS)
    assert slicer_results.panel_rows(rows) == rows_before
    after = tmp_path / "after"
    written = slicer_results.restore_result(restored).write(after, qc=False)
    assert set(written) == {"vertebrae.csv", "muscles.csv", "exam.json"}
    for name in written:
        assert (after / name).read_text() == (before / name).read_text(), name


def test_row_click_shows_the_vertebra_in_its_sagittal_plane(mrml, phantoms):
    scene = mrml.scene
    volume, segmentation = load_exam(mrml, phantoms["A"], "A")
    _, made = slicer_nodes.screen_into_scene(volume, segmentation)
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        views[name] = node
    assert slicer_results.jump_to_vertebra(scene, made, "L1")
    centre = np.array(slicer_results.vertebra_centre_ras(made, "L1"))
    for node in views.values():  # every view passes through the body's centre
        matrix = slicer.util.arrayFromVTKMatrix(node.GetSliceToRAS())
        assert abs(np.dot(centre - matrix[:3, 3], matrix[:3, 2])) < 1e-6
    sagittal = slicer.util.arrayFromVTKMatrix(views["Yellow"].GetSliceToRAS())
    normal, up = sagittal[:3, 2], sagittal[:3, 1]
    for height in ("Ha", "Hm", "Hp"):  # the three height lines lie in the sagittal view's plane
        sup, inf = slicer_results.line_points(made.lines[f"L1 {height}"])
        assert abs(np.dot(sup - centre, normal)) < 1e-3 and abs(np.dot(inf - centre, normal)) < 1e-3
    # Still a sagittal view as Slicer draws one: normal to the left, head up, anterior on the left.
    assert normal[0] < -0.9 and up[2] > 0.9 and sagittal[1, 0] < -0.9
    display = made.grades.GetDisplayNode()
    assert display.GetSegmentOpacity2DFill("vertebrae_L1") == 1.0
    assert display.GetSegmentOpacity2DFill("vertebrae_L2") < 1.0
    assert not slicer_results.jump_to_vertebra(scene, made, "C1")


def test_table_view_shows_the_vertebrae_table(mrml, phantoms):
    scene = mrml.scene
    volume, segmentation = load_exam(mrml, phantoms["A"], "A")
    _, made = slicer_nodes.screen_into_scene(volume, segmentation)
    assert slicer_results.show_table(scene, made.vertebrae, mrml.app_logic)
    selection = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    assert selection.GetActiveTableID() == made.vertebrae.GetID()


def test_total_segmentation_loads_with_class_names_and_nothing_else(mrml, phantoms):
    """A TotalSegmentator label map becomes a segmentation whose segment IDs are class names and
    whose voxels are the label map's, with no colour table or labelmap node left behind."""
    scene = mrml.scene
    volume = mrml.load_volume(phantoms["A"]["ct"], name="A")
    before = set(nodes_by_id(scene))
    node = slicer_segmentation.load_total_segmentation(scene, phantoms["A"]["total"], volume, "A total")
    added = [n for node_id, n in nodes_by_id(scene).items() if node_id not in before]
    assert sorted(n.GetClassName() for n in added) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"]
    labels = read_labelmap(phantoms["A"]["total"]).array
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert segment_ids(node) == [TOTAL_CLASS_NAMES[v] for v in present]
    for level in ("T12", "L1"):
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(node, f"vertebrae_{level}", volume)
        np.testing.assert_array_equal(voxels > 0, labels == TOTAL_VERTEBRA_IDS[level])
