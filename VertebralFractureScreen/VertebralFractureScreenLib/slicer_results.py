"""A screening result as MRML nodes, and back (the Slicer module's results; no Qt).

:func:`write_result_nodes` shows a :class:`~.screening.ScreeningResult` in the scene, all in one
subject-hierarchy folder per exam (``"<exam> results"``, under the CT's study when it has one):

* table ``"<exam> vertebrae"``: the rows and columns of ``vertebrae.csv`` (numbers as doubles,
  NaN where missing; text as the CSV writes it), viewable in Slicer's table view;
* table ``"<exam> muscles"``: the rows of ``muscles.csv`` (none when no muscle was measured);
* table ``"<exam> exam"``: ``key``/``value`` rows of ``exam.json`` (nested keys joined by dots),
  and text node ``"<exam> exam.json"``: the record itself, so that a saved scene gives the same
  ``exam.json`` back when it is reopened;
* one markups line ``"<exam> <level> <Ha|Hm|Hp>"`` per measured height (superior to inferior
  end point, RAS), coloured by the vertebra's grade;
* segmentation ``"<exam> grades"``: a copy of each graded vertebra's segment, named
  ``"L1 G2 wedge"`` and coloured by grade. The user's input segmentation is left exactly as it
  was (IDs, names, colours) unless ``color_input_segments`` is asked for.

Every node made here carries :data:`RESULT_ATTRIBUTE` and :data:`EXAM_ATTRIBUTE` (the exam's
key: the CT volume node's ID, so two CTs of the same name keep apart). Writing a result again for
the same key replaces the earlier nodes, except the output nodes passed in (the panel's
output selectors), which are emptied and refilled: the scene never collects stale copies.
:func:`find_results` and :func:`restore_result` rebuild the panel's table and the exported
files from these nodes after a saved scene is reopened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import levels as lv
from .report import measurements
from .report.qc import GRADE_COLOURS
from .exam.screening import MUSCLE_COLUMNS, VERTEBRA_COLUMNS, ScreeningResult, vertebra_cells
from .io.serialization import jsonable
from .slicer_nodes import match_segments, remove_node, segments_from_labels

RESULT_ATTRIBUTE = "VertebralFractureScreen.Result"
"""Node attribute naming the role of a node this module made (``vertebrae``, ``muscles``,
``exam``, ``record``, ``grades``, ``line``); absent on every other node."""
EXAM_ATTRIBUTE = "VertebralFractureScreen.Exam"
"""Node (and folder item) attribute: the key of the exam the result belongs to."""
EXAM_NAME_ATTRIBUTE = "VertebralFractureScreen.ExamName"
LEVEL_ATTRIBUTE = "VertebralFractureScreen.Level"
HEIGHT_ATTRIBUTE = "VertebralFractureScreen.Height"

GRADE_COLORS: dict[int | None, tuple[float, float, float]] = {
    grade: tuple(int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)) for grade, colour in GRADE_COLOURS.items()}
"""Display colour (RGB 0–1) per Genant grade, the QC picture's colours; ``None``: not graded."""

HEIGHT_NAMES = {"ha": "Ha", "hm": "Hm", "hp": "Hp"}
_QUANTITIES = measurements.by_key(measurements.VERTEBRA_TABLE) | measurements.by_key(measurements.MUSCLE_TABLE)
"""The registry's declaration of every column of the two tables (kind, unit, title, description)."""
_NUMERIC_COLUMNS = frozenset(k for k, q in _QUANTITIES.items() if q.kind in ("number", "integer"))
_INTEGER_COLUMNS = frozenset(k for k, q in _QUANTITIES.items() if q.kind == "integer")
_BOOLEAN_COLUMNS = frozenset(k for k, q in _QUANTITIES.items() if q.kind == "boolean")
_LIST_COLUMNS = frozenset(k for k, q in _QUANTITIES.items() if q.kind == "list")

PANEL_COLUMNS = (("Level", "level"), ("Ha mm", "ha_mm"), ("Hm mm", "hm_mm"), ("Hp mm", "hp_mm"),
                 ("Loss %", "grade_loss"), ("Grade", "genant_grade"), ("Shape", "shape"), ("HU", "trabecular_hu_mean"))
"""Columns of the panel's results table: title and the ``vertebrae.csv`` column they show."""


@dataclass
class ResultNodes:
    """The nodes of one exam's result in the scene."""

    key: str
    name: str
    vertebrae: object = None
    muscles: object = None
    exam: object = None
    record: object = None
    grades: object = None
    lines: dict = field(default_factory=dict)
    """``"<level> <Ha|Hm|Hp>"`` → markups line node."""
    folder: int = 0
    """Subject-hierarchy item ID of the exam's folder."""
    segments: dict = field(default_factory=dict)
    """Input segment ID → grade, for the input segments recoloured on request."""

    def nodes(self) -> list:
        return [n for n in (self.vertebrae, self.muscles, self.exam, self.record, self.grades) if n is not None] + \
            list(self.lines.values())


def grade_color(grade: int | None, complete: bool = True) -> tuple[float, float, float]:
    """The display colour of a vertebra: by Genant grade, grey when incomplete or not graded."""
    return GRADE_COLORS[grade if complete and grade in GRADE_COLORS else None]


# ------------------------------------------------------------------------------------------------
# Finding and removing
# ------------------------------------------------------------------------------------------------

def result_nodes(scene, key: str | None = None) -> list:
    """The nodes that :func:`write_result_nodes` made in ``scene`` (of one exam ``key``, or all)."""
    found = []
    nodes = scene.GetNodes()
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(RESULT_ATTRIBUTE) and (key is None or node.GetAttribute(EXAM_ATTRIBUTE) == key):
            found.append(node)
    return found


def remove_result_nodes(scene, key: str | None = None, keep=()) -> int:
    """Remove the result nodes of ``key`` (all when None) with their display and storage nodes,
    except the nodes in ``keep``; returns how many result nodes were removed."""
    kept = {node.GetID() for node in keep if node is not None}
    removed = 0
    for node in result_nodes(scene, key):
        if node.GetScene() is None or node.GetID() in kept:
            continue
        remove_node(scene, node)
        removed += 1
    return removed


def _scene_of(scene):
    """A vtkMRMLScene from a scene, the ``slicer`` module, or None (``slicer.mrmlScene``)."""
    if scene is None:
        import slicer

        return slicer.mrmlScene
    return getattr(scene, "mrmlScene", scene)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    value = jsonable(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(_cell(v) for v in value) if all(not isinstance(v, (list, dict)) for v in value) \
            else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _flatten(data: dict, stem: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        name = f"{stem}.{key}" if stem else str(key)
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, name))
        else:
            rows.append((name, value))
    return rows


def _table(scene, node, name: str):
    """``node`` emptied of its columns, or a new table node called ``name``."""
    if node is None or node.GetScene() is None:
        return scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.RemoveAllColumns()
    return node


def _fill_rows_table(node, columns, rows: list[dict]):
    """``columns`` (numbers as doubles, NaN where missing; text otherwise, as the CSV files write
    it) with one row per dict of ``rows``."""
    import vtk

    table = node.GetTable()
    for column in columns:
        array = vtk.vtkDoubleArray() if column in _NUMERIC_COLUMNS else vtk.vtkStringArray()
        array.SetName(column)
        for row in rows:
            value = row.get(column)
            if column in _NUMERIC_COLUMNS:
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue(_cell(value))
        table.AddColumn(array)
        quantity = _QUANTITIES.get(column)
        if quantity is not None:  # shown by Slicer's table view as the column's tooltip and unit
            node.SetColumnLongName(column, quantity.title)
            node.SetColumnDescription(column, quantity.description)
            node.SetColumnUnitLabel(column, quantity.unit)
    node.Modified()
    return node


def _fill_exam_table(node, exam: dict):
    import vtk

    keys, values = vtk.vtkStringArray(), vtk.vtkStringArray()
    keys.SetName("key")
    values.SetName("value")
    for key, value in _flatten(exam):
        keys.InsertNextValue(key)
        values.InsertNextValue(_cell(value))
    node.GetTable().AddColumn(keys)
    node.GetTable().AddColumn(values)
    node.Modified()
    return node


def _mark(node, key: str, name: str, role: str, **attributes) -> None:
    node.SetAttribute(RESULT_ATTRIBUTE, role)
    node.SetAttribute(EXAM_ATTRIBUTE, key)
    node.SetAttribute(EXAM_NAME_ATTRIBUTE, name)
    for attribute, value in attributes.items():
        node.SetAttribute(attribute, value)


def exam_key(volume_node=None, name: str | None = None) -> str:
    """The key that ties result nodes to their exam: the CT volume node's ID, else the name."""
    return volume_node.GetID() if volume_node is not None else str(name)


def write_result_nodes(result: ScreeningResult, scene=None, *, volume_node=None, segmentation_node=None,
                       vertebrae_table=None, grades_segmentation=None, make_grades: bool = True,
                       color_input_segments: bool = False, convention: str = "totalsegmentator") -> ResultNodes:
    """Show ``result`` in the scene (see the module docstring), replacing this exam's earlier result.

    Args:
        scene: a ``vtkMRMLScene``, the ``slicer`` module, or None for ``slicer.mrmlScene``.
        volume_node: the screened CT; its ID is the exam's key and its study holds the folder.
        segmentation_node: the input segmentation; its vertebra segments are copied into the grades
            segmentation (and recoloured by grade only when ``color_input_segments``).
        vertebrae_table, grades_segmentation: output nodes to fill (emptied first); new ones are
            made when None (the grades segmentation only with ``make_grades`` and an input).
    """
    scene = _scene_of(scene)
    name = result.exam_id
    key = exam_key(volume_node, name)
    remove_result_nodes(scene, key, keep=(vertebrae_table, grades_segmentation))
    made = ResultNodes(key=key, name=name)
    made.vertebrae = _fill_rows_table(_table(scene, vertebrae_table, f"{name} vertebrae"), VERTEBRA_COLUMNS,
                                      result.vertebrae)
    _mark(made.vertebrae, key, name, "vertebrae")
    if result.muscles:
        made.muscles = _fill_rows_table(_table(scene, None, f"{name} muscles"), MUSCLE_COLUMNS, result.muscles)
        _mark(made.muscles, key, name, "muscles")
    made.exam = _fill_exam_table(_table(scene, None, f"{name} exam"), result.exam)
    _mark(made.exam, key, name, "exam")
    made.record = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{name} exam.json")
    made.record.SetText(json.dumps(jsonable(result.exam), indent=2) + "\n")
    _mark(made.record, key, name, "record")

    grade_of = {g.level: g for g in result.grades}
    for heights in result.heights:
        grade = grade_of.get(heights.level)
        color = grade_color(grade.genant_grade if grade else None, bool(grade and grade.complete))
        for height, (superior, inferior) in heights.height_lines_ras.items():
            line_name = f"{heights.level} {HEIGHT_NAMES.get(height, height)}"
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"{name} {line_name}")
            node.AddControlPoint(*(float(x) for x in superior), "sup")
            node.AddControlPoint(*(float(x) for x in inferior), "inf")
            node.SetLocked(True)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetColor(*color)
                display.SetSelectedColor(*color)
                display.SetPointLabelsVisibility(False)
            _mark(node, key, name, "line", **{LEVEL_ATTRIBUTE: heights.level, HEIGHT_ATTRIBUTE: height})
            made.lines[line_name] = node

    graded = [g for g in result.grades if f"vertebrae_{g.level}" in _convention_ids(result)]
    if result.inputs is not None and (grades_segmentation is not None or (make_grades and graded)):
        made.grades = _fill_grades(scene, grades_segmentation, f"{name} grades", result, graded, volume_node)
        _mark(made.grades, key, name, "grades")
    if color_input_segments and segmentation_node is not None:
        match = match_segments(segmentation_node, convention)
        segmentation = segmentation_node.GetSegmentation()
        for segment_id, structure in match.structures.items():
            level = structure[len("vertebrae_"):] if structure.startswith("vertebrae_") else None
            if level in grade_of:
                grade = grade_of[level]
                segmentation.GetSegment(segment_id).SetColor(*grade_color(grade.genant_grade, grade.complete))
                made.segments[segment_id] = grade.genant_grade if grade.complete else None
    made.folder = _put_in_folder(scene, made, volume_node)
    return made


def _convention_ids(result: ScreeningResult) -> dict[str, int]:
    from .io.labels import convention_ids

    return convention_ids(result.inputs.convention) if result.inputs is not None else {}


def _fill_grades(scene, node, name: str, result: ScreeningResult, graded: list, volume_node):
    """The grades segmentation: one segment per graded vertebra (ID ``vertebrae_<level>``, name
    ``"L1 G2 wedge"``, grade colour) from the label map that was screened, in superior-to-inferior
    order; the input segmentation is not read or changed."""
    if node is None or node.GetScene() is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
    ids = _convention_ids(result)
    segments = []
    for grade in sorted(graded, key=lambda g: lv.LEVEL_INDEX.get(g.level, 99)):
        shown = grade.complete and grade.genant_grade is not None
        segments.append((ids[f"vertebrae_{grade.level}"], f"vertebrae_{grade.level}",
                         f"{grade.level} G{grade.genant_grade} {grade.shape}" if shown else f"{grade.level} not graded",
                         grade_color(grade.genant_grade, grade.complete)))
    return segments_from_labels(node, result.inputs.labels.array, result.inputs.labels.ijk_to_ras, segments,
                                label_boxes=result.inputs.label_boxes, reference_volume_node=volume_node)


def _put_in_folder(scene, made: ResultNodes, volume_node) -> int:
    """Put every node of ``made`` into the exam's subject-hierarchy folder (made once per exam,
    under the CT's parent item: its study when it came from DICOM); returns the folder's item ID."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return 0
    parent = sh.GetSceneItemID()
    if volume_node is not None:
        volume_item = sh.GetItemByDataNode(volume_node)
        if volume_item:
            parent = sh.GetItemParent(volume_item) or parent
    folder = _find_folder(sh, made.key)
    if not folder:
        folder = sh.CreateFolderItem(parent, f"{made.name} results")
        sh.SetItemAttribute(folder, EXAM_ATTRIBUTE, made.key)
    for node in made.nodes():
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, folder)
        else:  # Slicer's subject-hierarchy plugins add an item for each new node; without them, here
            sh.CreateItem(folder, node)
    return folder


def _find_folder(sh, key: str) -> int:
    children = _vtk_id_list()
    sh.GetItemChildren(sh.GetSceneItemID(), children, True)
    for index in range(children.GetNumberOfIds()):
        item = children.GetId(index)
        if sh.GetItemAttribute(item, EXAM_ATTRIBUTE) == key and not sh.GetItemDataNode(item):
            return item
    return 0


def _vtk_id_list():
    import vtk

    return vtk.vtkIdList()


# ------------------------------------------------------------------------------------------------
# Reading back (a reopened scene)
# ------------------------------------------------------------------------------------------------

def find_results(scene) -> dict[str, ResultNodes]:
    """The results in ``scene``, by exam key (in the order their vertebrae tables were added)."""
    found: dict[str, ResultNodes] = {}
    for node in result_nodes(_scene_of(scene)):
        key = node.GetAttribute(EXAM_ATTRIBUTE)
        made = found.setdefault(key, ResultNodes(key=key, name=node.GetAttribute(EXAM_NAME_ATTRIBUTE) or key))
        role = node.GetAttribute(RESULT_ATTRIBUTE)
        if role == "line":
            height = node.GetAttribute(HEIGHT_ATTRIBUTE)
            made.lines[f"{node.GetAttribute(LEVEL_ATTRIBUTE)} {HEIGHT_NAMES.get(height, height)}"] = node
        elif role in ("vertebrae", "muscles", "exam", "record", "grades"):
            setattr(made, role, node)
    return {key: made for key, made in found.items() if made.vertebrae is not None}


def rows_from_table(node, columns) -> list[dict]:
    """The rows of a table node written by :func:`write_result_nodes`, typed as the screening
    gives them (numbers as floats or ints, None where missing, booleans, flag lists), so that
    they write the same CSV text again."""
    table = node.GetTable()
    index = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for column in columns:
            if column not in index:
                row[column] = None
                continue
            if column in _NUMERIC_COLUMNS:
                value = table.GetValue(r, index[column]).ToDouble()
                row[column] = None if math.isnan(value) else int(value) if column in _INTEGER_COLUMNS else value
            else:
                text = table.GetValue(r, index[column]).ToString()
                if column in _BOOLEAN_COLUMNS:
                    row[column] = {"true": True, "false": False}.get(text)
                elif column in _LIST_COLUMNS:
                    row[column] = [part for part in text.split(";") if part]
                else:
                    row[column] = text
        rows.append(row)
    return rows


def restore_result(made: ResultNodes) -> ScreeningResult:
    """A :class:`~.screening.ScreeningResult` with the rows and the exam record of a result in the
    scene (no measurement objects: it writes the CSV files and ``exam.json``, not the QC picture)."""
    vertebrae = rows_from_table(made.vertebrae, VERTEBRA_COLUMNS)
    muscles = rows_from_table(made.muscles, MUSCLE_COLUMNS) if made.muscles is not None else []
    exam = json.loads(made.record.GetText()) if made.record is not None else {}
    return ScreeningResult(exam_id=made.name, vertebrae=vertebrae, muscles=muscles, exam=exam, heights=[], grades=[],
                           rois=[], muscle_rows=[], contrast=None, bone=None, inputs=None)


# ------------------------------------------------------------------------------------------------
# What the panel shows and does (plain functions, so they are tested headless)
# ------------------------------------------------------------------------------------------------

def panel_rows(rows: list[dict]) -> list[dict]:
    """One row per vertebra (``vertebrae.csv`` rows) for the panel's table: ``cells`` (texts in
    :data:`PANEL_COLUMNS` order), ``color`` (RGB 0–1 of its grade, grey when incomplete), ``level``."""
    return [{"level": row["level"], "cells": vertebra_cells(row), "color": grade_color(row["genant_grade"], row["complete"])}
            for row in rows]


def vertebra_centre_ras(made: ResultNodes, level: str):
    """Centre of a vertebral body (the middle of its Hm line, else of its Ha and Hp lines; RAS mm),
    or None when none of its heights was measured."""
    measured = {h: line_points(node) for h in ("Hm", "Ha", "Hp")
                if (node := made.lines.get(f"{level} {h}")) is not None and node.GetNumberOfControlPoints() == 2}
    ends = [measured["Hm"]] if "Hm" in measured else list(measured.values())
    if not ends:
        return None
    centre = np.mean([0.5 * (sup + inf) for sup, inf in ends], axis=0)
    return tuple(float(x) for x in centre) if np.all(np.isfinite(centre)) else None


def line_points(node) -> tuple[np.ndarray, np.ndarray]:
    """The two end points of a markups line node (world RAS, mm)."""
    points = []
    for index in range(2):
        point = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, point)
        points.append(np.array(point, dtype=float))
    return points[0], points[1]


def vertebra_sagittal_plane(made: ResultNodes, level: str):
    """(normal, in-plane up, centre) of a vertebra's mid-sagittal plane (RAS, unit vectors):
    the plane of its Ha and Hp lines. None unless both were measured."""
    if f"{level} Ha" not in made.lines or f"{level} Hp" not in made.lines:
        return None
    ha_sup, ha_inf = line_points(made.lines[f"{level} Ha"])
    hp_sup, hp_inf = line_points(made.lines[f"{level} Hp"])
    up = (ha_sup - ha_inf) + (hp_sup - hp_inf)
    anterior = 0.5 * (ha_sup + ha_inf) - 0.5 * (hp_sup + hp_inf)
    normal = np.cross(anterior, up)
    if np.linalg.norm(up) == 0 or np.linalg.norm(normal) == 0:
        return None
    normal /= np.linalg.norm(normal)
    if normal[0] > 0:  # towards the patient's left, as in Slicer's sagittal view
        normal = -normal
    up = up - np.dot(up, normal) * normal
    up /= np.linalg.norm(up)
    if up[2] < 0:
        up = -up
    return normal, up, np.array(vertebra_centre_ras(made, level))


def jump_to_vertebra(scene, made: ResultNodes, level: str, highlight_opacity: float = 0.25) -> bool:
    """Centre every slice view on the vertebra, turn the sagittal views into its own mid-sagittal
    plane (so its three height lines lie in the view) and highlight its segment in the grades
    segmentation (the others drawn at ``highlight_opacity``). False when it was not measured."""
    import slicer

    scene = _scene_of(scene)
    centre = vertebra_centre_ras(made, level)
    if centre is None:
        return False
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *centre, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    plane = vertebra_sagittal_plane(made, level)
    if plane is not None:
        normal, up, point = plane
        for node in _slice_nodes(scene):
            if node.GetLayoutName() == "Yellow":  # Slicer's sagittal view
                # Slicer's sagittal axes: x posterior (= up x normal), y up, normal to the left.
                node.SetSliceToRASByNTP(*normal, *np.cross(up, normal), *point, 0)
    if made.grades is not None and made.grades.GetDisplayNode() is not None:
        display = made.grades.GetDisplayNode()
        segmentation = made.grades.GetSegmentation()
        target = f"vertebrae_{level}"
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            display.SetSegmentOpacity(segment_id, 1.0 if segment_id == target else highlight_opacity)
    return True


def _slice_nodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def show_table(scene, table_node, application_logic=None) -> bool:
    """Show ``table_node`` in Slicer's table view: make it the active table and, where a layout
    node exists, switch to a layout with a table view. False when there is no selection node."""
    import slicer

    scene = _scene_of(scene)
    selection = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    if selection is None:
        return False
    selection.SetActiveTableID(table_node.GetID())
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    if application_logic is not None:
        application_logic.PropagateTableSelection()
    return True


def set_height_lines_visible(scene, visible: bool, key: str | None = None) -> int:
    """Show or hide the height lines (of one exam ``key``, or all); returns how many changed."""
    changed = 0
    for node in result_nodes(_scene_of(scene), key):
        if node.GetAttribute(RESULT_ATTRIBUTE) == "line" and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(bool(visible))
            changed += 1
    return changed


def line_length_mm(line_node) -> float:
    """Length of a two-point markups line in world coordinates (mm)."""
    return float(line_node.GetLineLengthWorld())
