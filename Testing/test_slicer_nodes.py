"""Screening from real MRML nodes (``VertebralFractureScreenLib.slicer_nodes``) and the
result nodes it makes (``slicer_results``).

Runs on the ``slicer-core`` wheel through ``mrml_support``; skipped where ``slicer`` is missing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer (the slicer-core wheel) is not installed")

from mrml_support import ijk_to_ras, make_mrml_scene, segment_ids  # noqa: E402
from VertebralFractureScreenLib.exam import screening
from VertebralFractureScreenLib import slicer_nodes, slicer_results
from VertebralFractureScreenLib.io.volume import Volume  # noqa: E402
from VertebralFractureScreenLib.levels import TOTAL_CLASS_NAMES, TOTAL_VERTEBRA_IDS  # noqa: E402
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom, write_phantom  # noqa: E402

SPEC = PhantomSpec(levels=("T12", "L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), supersampling=1,
                   fractures=(Fracture.parse("L1:wedge:0.35"),), seed=1)
EXAM = "phantom"


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("slicer_nodes")
    paths = write_phantom(SPEC, out)
    reference = screening.screen_exam(paths["ct"], seg=paths["total"], body_seg=paths["vertebrae_body"],
                                      exam_id=EXAM)
    return paths, reference


@pytest.fixture
def mrml():
    return make_mrml_scene()


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_measurements(result, reference):
    assert [r["level"] for r in result.vertebrae] == [r["level"] for r in reference.vertebrae]
    for row, expected in zip(result.vertebrae, reference.vertebrae):
        assert _same(row, expected), (row, expected)
    assert _same(result.muscles, reference.muscles)
    for key in ("fracture", "bone", "contrast", "muscle", "levels_present", "levels_complete"):
        assert _same(result.exam[key], reference.exam[key]), key
    for h, ref in zip(result.heights, reference.heights):
        assert h.height_lines_ras.keys() == ref.height_lines_ras.keys()
        for key, (sup, inf) in h.height_lines_ras.items():
            np.testing.assert_array_equal(sup, ref.height_lines_ras[key][0])
            np.testing.assert_array_equal(inf, ref.height_lines_ras[key][1])
    assert [g.genant_grade for g in result.grades] == [g.genant_grade for g in reference.grades]


def node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def load_nodes(mrml, paths, names=TOTAL_CLASS_NAMES):
    volume = mrml.load_volume(paths["ct"], name="ct")
    segmentation = mrml.load_segmentation(paths["total"], names, name="total")
    body = mrml.load_segmentation(paths["vertebrae_body"], {1: "vertebrae_body", 2: "intervertebral_discs"},
                                  name="vertebrae_body")
    return volume, segmentation, body


def test_screen_nodes_gives_the_headless_numbers(mrml, phantom_files):
    paths, reference = phantom_files
    volume, segmentation, body = load_nodes(mrml, paths)
    before = node_ids(mrml.scene)
    result = slicer_nodes.screen_nodes(volume, segmentation, body_segmentation_node=body, exam_id=EXAM)
    # Screening adds nothing to the scene: the export's labelmap, its display node and the
    # "<segmentation>_ColorTable" node Slicer's export makes are all gone.
    assert node_ids(mrml.scene) == before
    assert_same_measurements(result, reference)
    # The phantom's wedge fracture is found, the others are not.
    grades = {g.level: g.genant_grade for g in result.grades}
    assert grades["L1"] >= 1 and all(grades[level] == 0 for level in ("T12", "L2", "L3"))
    # Same engine on the same in-memory arrays: the node's CT and geometry, the phantom's label
    # maps (so the export of the segments onto the CT grid is exact).
    made = make_phantom(SPEC)
    ct = Volume(slicer.util.arrayFromVolume(volume).copy(), ijk_to_ras(volume))
    in_memory = screening.screen_exam(ct, seg=made.total, body_seg=made.vertebrae_body, exam_id=EXAM)
    assert_same_measurements(result, in_memory)
    assert result.exam["inputs"]["segmentation"] == "Slicer node total"


def test_result_nodes_tables_lines_colours_and_rerun(mrml, phantom_files):
    paths, reference = phantom_files
    volume, segmentation, _ = load_nodes(mrml, paths)
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM)
    made = slicer_results.write_result_nodes(result, slicer, volume_node=volume, segmentation_node=segmentation)

    table = made.vertebrae
    assert table.GetName() == f"{EXAM} vertebrae"
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(screening.VERTEBRA_COLUMNS)
    assert table.GetNumberOfRows() == len(result.vertebrae) == 4
    col = {name: c for c, name in enumerate(screening.VERTEBRA_COLUMNS)}
    for r, row in enumerate(result.vertebrae):
        assert table.GetCellText(r, col["level"]) == row["level"]
        assert table.GetCellText(r, col["complete"]) == "true"
        assert table.GetCellText(r, col["shape"]) == row["shape"]
        for key in ("ha_mm", "hm_mm", "hp_mm", "height_loss", "trabecular_hu_mean", "body_volume_ml"):
            assert float(table.GetTable().GetValue(r, col[key]).ToDouble()) == pytest.approx(row[key], abs=1e-9)
        assert float(table.GetCellText(r, col["genant_grade"])) == row["genant_grade"]

    muscles = made.muscles
    assert muscles.GetName() == f"{EXAM} muscles"
    assert [muscles.GetColumnName(c) for c in range(muscles.GetNumberOfColumns())] == list(screening.MUSCLE_COLUMNS)
    assert muscles.GetNumberOfRows() == len(result.muscles) > 0
    col = {name: c for c, name in enumerate(screening.MUSCLE_COLUMNS)}
    for r, row in enumerate(result.muscles):
        assert (muscles.GetCellText(r, col["muscle"]), muscles.GetCellText(r, col["level"])) == (row["muscle"], row["level"])
        for key in ("volume_ml", "mean_hu", "imat_fraction", "lean_hu", "fat_fraction"):
            value = float(muscles.GetTable().GetValue(r, col[key]).ToDouble())
            assert value == pytest.approx(row[key], abs=1e-9, nan_ok=True), (row["level"], key)
        assert muscles.GetCellText(r, col["complete"]) == ("true" if row["complete"] else "false")
        assert muscles.GetCellText(r, col["flags"]) == ";".join(row["flags"])
    # T12 tops the phantom: its slab has no disc above, so its rows are flagged in the table too.
    t12 = [r for r, row in enumerate(result.muscles) if row["level"] == "T12"]
    assert t12 and all(muscles.GetCellText(r, col["complete"]) == "false"
                       and "no_vertebra_above" in muscles.GetCellText(r, col["flags"]) for r in t12)

    exam = made.exam
    assert exam.GetName() == f"{EXAM} exam"
    pairs = {exam.GetCellText(r, 0): exam.GetCellText(r, 1) for r in range(exam.GetNumberOfRows())}
    assert pairs["exam_id"] == EXAM
    assert pairs["fracture.max_grade"] == str(result.exam["fracture"]["max_grade"])
    assert pairs["fracture.fractured_levels"] == "L1"
    assert pairs["levels_present"] == "T12;L1;L2;L3"
    assert json.loads(made.record.GetText())["fracture"] == json.loads(json.dumps(result.exam["fracture"]))

    lines = made.lines
    assert set(lines) == {f"{level} {h}" for level in ("T12", "L1", "L2", "L3") for h in ("Ha", "Hm", "Hp")}
    by_level = {row["level"]: row for row in result.vertebrae}
    colours = {}
    for name, node in lines.items():
        level, height = name.split()
        assert node.GetName() == f"{EXAM} {name}" and node.GetNumberOfControlPoints() == 2
        assert slicer_results.line_length_mm(node) == pytest.approx(by_level[level][f"{height.lower()}_mm"], abs=1e-3)
        colours[level] = node.GetDisplayNode().GetColor()
    assert colours["L1"] == pytest.approx(slicer_results.GRADE_COLORS[by_level["L1"]["genant_grade"]])
    assert colours["L2"] == pytest.approx(slicer_results.GRADE_COLORS[0])

    # The grades segmentation: each graded vertebra's voxels exactly, named and coloured by grade.
    grades = made.grades.GetSegmentation()
    assert segment_ids(made.grades) == [f"vertebrae_{level}" for level in ("T12", "L1", "L2", "L3")]
    assert grades.GetSegment("vertebrae_L1").GetName() == f"L1 G{by_level['L1']['genant_grade']} wedge"
    assert grades.GetSegment("vertebrae_L1").GetColor() == pytest.approx(colours["L1"])
    labels = result.inputs.labels.array
    for level in ("T12", "L1"):
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(made.grades, f"vertebrae_{level}", volume)
        np.testing.assert_array_equal(voxels > 0, labels == TOTAL_VERTEBRA_IDS[level])

    # A second run replaces the result nodes instead of adding more.
    count, total = len(slicer_results.result_nodes(mrml.scene)), mrml.scene.GetNumberOfNodes()
    assert count == 5 + 12  # vertebrae, muscles, exam tables, exam.json, grades, 12 height lines
    again = slicer_results.write_result_nodes(result, slicer, volume_node=volume, segmentation_node=segmentation)
    assert len(slicer_results.result_nodes(mrml.scene)) == count
    assert mrml.scene.GetNumberOfNodes() == total
    assert table.GetScene() is None and again.vertebrae.GetScene() is mrml.scene
    assert mrml.scene.GetNodesByName(f"{EXAM} L1 Ha").GetNumberOfItems() == 1
    # Output nodes passed in are refilled, not replaced.
    refilled = slicer_results.write_result_nodes(result, slicer, volume_node=volume, segmentation_node=segmentation,
                                                 vertebrae_table=again.vertebrae, grades_segmentation=again.grades)
    assert refilled.vertebrae is again.vertebrae and refilled.grades is again.grades
    assert mrml.scene.GetNumberOfNodes() == total


def test_input_segmentation_unchanged_unless_grade_colours_asked(mrml, phantom_files):
    paths, _ = phantom_files
    volume, segmentation, _ = load_nodes(mrml, paths)
    seg = segmentation.GetSegmentation()

    def state():
        return [(seg.GetNthSegmentID(i), seg.GetNthSegment(i).GetName(), tuple(seg.GetNthSegment(i).GetColor()),
                 seg.GetNthSegment(i).GetLabelValue()) for i in range(seg.GetNumberOfSegments())]

    before = state()
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM)
    slicer_results.write_result_nodes(result, slicer, volume_node=volume, segmentation_node=segmentation)
    assert state() == before
    made = slicer_results.write_result_nodes(result, slicer, volume_node=volume, segmentation_node=segmentation,
                                             color_input_segments=True)
    after = state()
    assert [(i, n, v) for i, n, _, v in after] == [(i, n, v) for i, n, _, v in before]
    assert seg.GetSegment("vertebrae_L1").GetColor() == pytest.approx(
        slicer_results.GRADE_COLORS[by_level_grade(result, "L1")])
    assert made.segments["vertebrae_L1"] == by_level_grade(result, "L1")


def test_add_data_label_map_matched_by_label_values(mrml, phantom_files):
    """A TotalSegmentator NIfTI loaded with "Add data" as a segmentation (segment IDs and names
    Segment_<label value>) is screened by its label values, with the headless numbers."""
    paths, _ = phantom_files
    volume = mrml.load_volume(paths["ct"], name="ct")
    segmentation = mrml.load_segmentation(paths["total"], name="total")  # Slicer's reader: Segment_<label>
    ids = segment_ids(segmentation)
    assert f"Segment_{TOTAL_VERTEBRA_IDS['L1']}" in ids and not set(ids) & set(TOTAL_CLASS_NAMES.values())
    match = slicer_nodes.match_segments(segmentation)
    assert match.structures[f"Segment_{TOTAL_VERTEBRA_IDS['L1']}"] == "vertebrae_L1"
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM)
    assert_same_measurements(result, screening.screen_exam(paths["ct"], seg=paths["total"], exam_id=EXAM))
    # A generic ID whose number is not its label value is not trusted.
    seg = segmentation.GetSegmentation()
    seg.GetSegment(f"Segment_{TOTAL_VERTEBRA_IDS['L2']}").SetLabelValue(TOTAL_VERTEBRA_IDS["L2"] + 1)
    assert f"Segment_{TOTAL_VERTEBRA_IDS['L2']}" not in slicer_nodes.match_segments(segmentation).ids


def test_segments_matched_by_terminology_only(mrml, phantom_files):
    """Segment IDs that are not class names: the terminology decides; names never do alone."""
    from VertebralFractureScreenLib.io.labels import terminology_for

    paths, reference = phantom_files
    volume = mrml.load_volume(paths["ct"], name="ct")
    opaque = {label: f"S{label}" for label in TOTAL_CLASS_NAMES}  # IDs that say nothing
    segmentation = mrml.load_segmentation(paths["total"], opaque, name="total")
    seg = segmentation.GetSegmentation()
    ids = segment_ids(segmentation)
    assert not set(ids) & set(TOTAL_CLASS_NAMES.values())
    assert slicer_nodes.match_segments(segmentation).ids == {}
    for segment_id in ids:
        label = int(segment_id[1:])
        entry = terminology_for(TOTAL_CLASS_NAMES.get(label, ""))
        if entry:
            seg.GetSegment(segment_id).SetTerminology(entry)
    # A segment whose name contradicts its terminology is left out.
    l3 = f"S{TOTAL_VERTEBRA_IDS['L3']}"
    seg.GetSegment(l3).SetName("L4 vertebra")
    match = slicer_nodes.match_segments(segmentation)
    assert match.structures[f"S{TOTAL_VERTEBRA_IDS['L1']}"] == "vertebrae_L1"
    assert l3 not in match.ids and any(d.startswith(l3) for d in match.dropped)
    # Fixed: all vertebrae and muscles found by terminology give the headless numbers.
    seg.GetSegment(l3).SetName("L3 vertebra")
    match = slicer_nodes.match_segments(segmentation)
    assert sorted(match.ids.values()) == sorted(label for label in TOTAL_CLASS_NAMES if f"S{label}" in ids)
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM)
    without_body = screening.screen_exam(paths["ct"], seg=paths["total"], exam_id=EXAM)
    assert_same_measurements(result, without_body)
    shown = slicer_results.write_result_nodes(result, volume_node=volume, segmentation_node=segmentation,
                                              color_input_segments=True)
    assert shown.segments[f"S{TOTAL_VERTEBRA_IDS['L1']}"] == by_level_grade(result, "L1")


def by_level_grade(result, level):
    return next(g.genant_grade for g in result.grades if g.level == level)


def test_no_matching_segment_is_an_input_error(mrml, phantom_files):
    paths, _ = phantom_files
    volume = mrml.load_volume(paths["ct"], name="ct")
    segmentation = mrml.load_segmentation(paths["total"], {label: f"S{label}" for label in TOTAL_CLASS_NAMES},
                                          name="total")  # no class-name IDs, no terminology, no generic IDs
    before = node_ids(mrml.scene)
    with pytest.raises(slicer_nodes.InputError, match="no segment"):
        slicer_nodes.screen_nodes(volume, segmentation)
    assert node_ids(mrml.scene) == before


def test_model_output_reaches_the_exam_table(mrml, phantom_files):
    paths, _ = phantom_files
    volume, segmentation, _ = load_nodes(mrml, paths)
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM, model="demo")
    made = slicer_results.write_result_nodes(result, slicer)
    exam = made.exam
    pairs = {exam.GetCellText(r, 0): exam.GetCellText(r, 1) for r in range(exam.GetNumberOfRows())}
    assert float(pairs["model.probability"]) == pytest.approx(result.exam["model"]["probability"], abs=1e-6)
    assert pairs["model.demonstration"].lower() in ("true", "1") and "DEMONSTRATION" in pairs["model.note"]


def test_panel_rows_view_centres_and_height_line_toggle(mrml, phantom_files):
    """What the panel shows: its table rows (texts and grade colours, from the table node), the
    point a row click centres the views on (the body's centre, against the phantom's truth), and
    the height-line toggle."""
    paths, _ = phantom_files
    volume, segmentation, _ = load_nodes(mrml, paths)
    result = slicer_nodes.screen_nodes(volume, segmentation, exam_id=EXAM)
    made = slicer_results.write_result_nodes(result, slicer, volume_node=volume)
    rows = slicer_results.panel_rows(slicer_results.rows_from_table(made.vertebrae, screening.VERTEBRA_COLUMNS))
    assert rows == slicer_results.panel_rows(result.vertebrae)
    assert [r["level"] for r in rows] == [row["level"] for row in result.vertebrae]
    for shown, row in zip(rows, result.vertebrae):
        assert len(shown["cells"]) == len(slicer_results.PANEL_COLUMNS)
        assert shown["cells"][1] == f"{row['ha_mm']:.1f}" and shown["cells"][5].rstrip("?") == str(row["genant_grade"])
        assert shown["color"] == pytest.approx(slicer_results.GRADE_COLORS[row["genant_grade"]])
    truth = {v["level"]: v for v in json.loads(paths["truth"].read_text())["vertebrae"]}
    for level in ("T12", "L1", "L2"):
        centre = np.array(slicer_results.vertebra_centre_ras(made, level))
        assert np.linalg.norm(centre - np.array(truth[level]["centre_ras"])) < 3.0  # 2 mm voxels
    assert slicer_results.vertebra_centre_ras(made, "C1") is None
    assert slicer_results.set_height_lines_visible(mrml.scene, False, made.key) == len(made.lines) == 12
    assert not any(n.GetDisplayNode().GetVisibility() for n in made.lines.values())
    assert slicer_results.set_height_lines_visible(mrml.scene, True, made.key) == 12
    assert all(n.GetDisplayNode().GetVisibility() for n in made.lines.values())
