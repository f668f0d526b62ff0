"""Screening from, and results into, 3D Slicer's MRML nodes (the Slicer module's engine).

:func:`screen_nodes` takes a CT volume node and a segmentation node, exports the segments onto
the CT's voxel grid as TotalSegmentator ``total`` ids and runs :func:`.screening.screen_exam` on
the arrays in memory: the same measurements as ``vfscreen screen`` on the same data.
:func:`write_result_nodes` shows a :class:`~.screening.ScreeningResult` in the scene: a table of
the vertebrae (the columns of ``vertebrae.csv``), one of the muscles (``muscles.csv``), a
key/value table of the exam summary (``exam.json``), one markups line per measured height
coloured by Genant grade, and the vertebra segments coloured by grade. Running it again replaces
the earlier result nodes of the same prefix.

Segments are matched to structures as SPEC §3 says and as :func:`.imageio.read_labelmap` does for
``.seg.nrrd`` files: by segment ID (a TotalSegmentator class name such as ``vertebrae_L1``), then by
terminology (SNOMED CT code, or a type meaning such as ``L1 vertebra``), never by the segment's
name alone; a segment whose name names another structure than its terminology is left out.

``slicer`` and ``vtk`` are imported inside the functions, so this module imports without Slicer.
It needs no Qt and no Slicer application object: it works in Slicer's Python console and on the
``slicer-core`` wheel (see ``Testing/mrml_support.py``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import levels as lv
from .errors import InputError
from .imageio import LabelMapWarning, Volume, convention_ids, structure_from_terminology, vertebra_from_text
from .screening import MUSCLE_COLUMNS, VERTEBRA_COLUMNS, ScreeningResult, screen_exam, vertebra_cells
from .serialization import jsonable

RESULT_ATTRIBUTE = "VertebralFractureScreen.Result"
"""Node attribute ("1") that marks the nodes :func:`write_result_nodes` made."""
PREFIX_ATTRIBUTE = "VertebralFractureScreen.Prefix"
"""Node attribute holding the ``prefix`` of the result the node belongs to."""
LEVEL_ATTRIBUTE = "VertebralFractureScreen.Level"
HEIGHT_ATTRIBUTE = "VertebralFractureScreen.Height"

GRADE_COLORS: dict[int | None, tuple[float, float, float]] = {
    0: (0.20, 0.75, 0.25),  # green: no fracture
    1: (1.00, 0.90, 0.10),  # yellow: mild
    2: (1.00, 0.55, 0.00),  # orange: moderate
    3: (0.90, 0.10, 0.10),  # red: severe
    None: (0.60, 0.60, 0.60),  # grey: incomplete / not graded
}
"""Display colour (RGB 0–1) per Genant grade; ``None`` for vertebrae without a grade."""

HEIGHT_NAMES = {"ha": "Ha", "hm": "Hm", "hp": "Hp"}
_NUMERIC_COLUMNS = (frozenset(VERTEBRA_COLUMNS) | frozenset(MUSCLE_COLUMNS)) - {
    "exam_id", "level", "muscle", "complete", "shape", "borderline", "flags"}


@dataclass
class SegmentMatch:
    """How the segments of a segmentation node map onto label ids."""

    ids: dict[str, int] = field(default_factory=dict)
    """segment ID → label id, in segment order."""
    structures: dict[str, str] = field(default_factory=dict)
    """segment ID → TotalSegmentator class name (``vertebrae_L1``)."""
    dropped: list[str] = field(default_factory=list)
    """``"<segment ID> (<reason>)"`` for each segment left out."""


def segment_structure(segment_id: str, segment, known: dict[str, int]) -> tuple[str | None, str]:
    """(class name or None, reason when None) of one ``vtkSegment``: by ID, then terminology."""
    if segment_id in known:
        return segment_id, ""
    terminology = _segment_terminology(segment)
    structure = structure_from_terminology(terminology) if terminology else None
    if structure is None:
        return None, "no matching segment ID or terminology"
    name = (segment.GetName() or "").strip()
    named = name if name in known or name in lv.TOTAL_CLASS_NAMES.values() else vertebra_from_text(name)
    if named is not None and named != structure:
        return None, f"its name names {named} but its terminology {structure}"
    return structure, ""


def _segment_terminology(segment) -> str:
    """A segment's terminology entry string (``context~category~type~...``), or ""."""
    if hasattr(segment, "GetTerminology"):  # Slicer ≥ 5.7
        entry = segment.GetTerminology() or ""
        if entry:
            return entry
    import vtk  # older Slicer: the ``TerminologyEntry`` tag, read through an output argument

    value = vtk.reference("")
    tag = segment.GetTerminologyEntryTagName() if hasattr(segment, "GetTerminologyEntryTagName") else "TerminologyEntry"
    return str(value) if segment.GetTag(tag, value) else ""


def match_segments(segmentation_node, convention: str = "totalsegmentator") -> SegmentMatch:
    """Map the segments of ``segmentation_node`` to the label ids of ``convention``
    (``totalsegmentator``, ``verse`` or ``vertebrae_body``), as SPEC §3 says."""
    known = convention_ids(convention)
    segmentation = segmentation_node.GetSegmentation()
    match = SegmentMatch()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        structure, reason = segment_structure(segment_id, segment, known)
        if structure is None or structure not in known:
            match.dropped.append(f"{segment_id} ({reason or f'no {convention} label id for {structure}'})")
            continue
        match.ids[segment_id] = known[structure]
        match.structures[segment_id] = structure
    return match


def volume_from_node(volume_node) -> Volume:
    """A scalar volume node as a :class:`~.imageio.Volume` (array ``[k, j, i]``, IJK→RAS in
    world coordinates). A linear parent transform is applied; a non-linear one is refused."""
    import slicer
    import vtk

    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("the CT volume node has no image data")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise InputError(f"{volume_node.GetName()} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim != 3:
        raise InputError(f"{volume_node.GetName()} is not a 3-D scalar volume (array shape {array.shape})")
    return Volume(array, np.array(ijk_to_ras, dtype=float))


def labels_from_segmentation(segmentation_node, reference_node, convention: str = "totalsegmentator",
                             match: SegmentMatch | None = None) -> tuple[np.ndarray, SegmentMatch]:
    """The matched segments as one label array on ``reference_node``'s grid, in ``convention`` ids.

    Segments are exported with Slicer's Segmentations logic (which resamples them onto the
    reference geometry, following transforms); where segments overlap, the later one wins."""
    import slicer
    import vtk

    match = match or match_segments(segmentation_node, convention)
    if not match.ids:
        raise InputError(f"no segment of {segmentation_node.GetName()} is a structure of the {convention} "
                         "convention (segments are matched by segment ID, such as vertebrae_L1, or terminology)")
    ordered = list(match.ids)
    segment_ids = vtk.vtkStringArray()
    for segment_id in ordered:
        segment_ids.InsertNextValue(segment_id)
    scene = reference_node.GetScene()
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "VFS export (temporary)")
    try:
        logic = slicer.modules.segmentations.logic()
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, segment_ids, labelmap_node, reference_node):
            raise InputError(f"Slicer could not export the segments of {segmentation_node.GetName()} "
                             f"onto the grid of {reference_node.GetName()}")
        exported = slicer.util.arrayFromVolume(labelmap_node)
        largest = max(match.ids.values())
        dtype = np.uint8 if largest < 256 else np.uint16 if largest < 65536 else np.int32
        # Export label value n is the n-th segment of the list; map it to its id.
        lut = np.zeros(len(ordered) + 1, dtype=dtype)
        for index, segment_id in enumerate(ordered, start=1):
            lut[index] = match.ids[segment_id]
        if exported.shape != tuple(reversed(reference_node.GetImageData().GetDimensions())):
            raise InputError("the exported segmentation does not match the CT grid")
        labels = lut[np.clip(exported, 0, len(ordered)).astype(np.intp)]
    finally:
        display = labelmap_node.GetDisplayNode()
        scene.RemoveNode(labelmap_node)
        if display is not None and display.GetScene() is not None:
            scene.RemoveNode(display)
    return labels, match


def screen_nodes(volume_node, segmentation_node, *, body_segmentation_node=None, exam_id: str | None = None,
                 levels=lv.SCREENING_LEVELS, convention: str = "totalsegmentator", model=None) -> ScreeningResult:
    """Screen the CT of ``volume_node`` with the segments of ``segmentation_node``.

    Args:
        volume_node: ``vtkMRMLScalarVolumeNode`` in HU.
        segmentation_node: ``vtkMRMLSegmentationNode`` whose segments are TotalSegmentator
            structures (segment ID ``vertebrae_L1``, ``aorta``, ``autochthon_left``, ... or the
            matching terminology); other segments are left out with a warning in the result.
        body_segmentation_node: optional segmentation of the ``vertebrae_body`` task (segments
            ``vertebrae_body`` and ``intervertebral_discs``).
        exam_id: name of the exam (default: the volume node's name).
        levels: levels to report (T4–L5 by default).
        model: fracture model to apply (a model file, ``"demo"`` or a :class:`.model.FractureModel`);
            its output is in ``result.exam["model"]`` and in the exam table node.
        convention: ``totalsegmentator`` (default) or ``verse`` (vertebrae only).

    Returns:
        The :class:`~.screening.ScreeningResult` of :func:`.screening.screen_exam` on the arrays.

    Raises:
        InputError: as :func:`.screening.screen_exam`, or when no segment matches.
    """
    ct = volume_from_node(volume_node)
    seg, match = labels_from_segmentation(segmentation_node, volume_node, convention)
    body = None
    notes = _dropped_note(segmentation_node, match)
    if body_segmentation_node is not None:
        body, body_match = labels_from_segmentation(body_segmentation_node, volume_node, "vertebrae_body")
        notes += _dropped_note(body_segmentation_node, body_match)
    result = screen_exam(ct, seg=seg, body_seg=body, convention=convention,
                         exam_id=exam_id or volume_node.GetName(), levels=levels, model=model)
    result.exam["inputs"].update({"ct": f"Slicer node {volume_node.GetName()}",
                                  "segmentation": f"Slicer node {segmentation_node.GetName()}"})
    if body_segmentation_node is not None:
        result.exam["inputs"]["vertebrae_body"] = f"Slicer node {body_segmentation_node.GetName()}"
    if notes:
        result.exam["warnings"] = notes + [w for w in result.exam["warnings"] if w not in notes]
    return result


def _dropped_note(node, match: SegmentMatch) -> list[str]:
    if not match.dropped:
        return []
    shown = ", ".join(match.dropped[:12]) + (f" and {len(match.dropped) - 12} more" if len(match.dropped) > 12 else "")
    message = f"{node.GetName()}: {len(match.dropped)} segment(s) not used: {shown}"
    warnings.warn(message, LabelMapWarning, stacklevel=3)
    return [message]


# ------------------------------------------------------------------------------------------------
# Results into nodes
# ------------------------------------------------------------------------------------------------

def result_nodes(scene, prefix: str | None = None) -> list:
    """The nodes that :func:`write_result_nodes` made in ``scene`` (of one ``prefix``, or all)."""
    found = []
    nodes = scene.GetNodes()
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(RESULT_ATTRIBUTE) != "1":
            continue
        if prefix is None or node.GetAttribute(PREFIX_ATTRIBUTE) == prefix:
            found.append(node)
    return found


def remove_result_nodes(scene, prefix: str | None = None) -> int:
    """Remove earlier result nodes (with their display nodes); returns how many were removed."""
    removed = 0
    for node in result_nodes(scene, prefix):
        if node.GetScene() is None:
            continue
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if hasattr(node, "GetNumberOfDisplayNodes") else []
        scene.RemoveNode(node)
        for display in displays:
            if display is not None and display.GetScene() is not None:
                scene.RemoveNode(display)
        removed += 1
    return removed


def _mark(node, prefix: str, **attributes) -> None:
    node.SetAttribute(RESULT_ATTRIBUTE, "1")
    node.SetAttribute(PREFIX_ATTRIBUTE, prefix)
    for key, value in attributes.items():
        node.SetAttribute(key, value)


def _scene_of(scene):
    """A vtkMRMLScene from a scene, the ``slicer`` module, or None (``slicer.mrmlScene``)."""
    if scene is None:
        import slicer

        return slicer.mrmlScene
    return getattr(scene, "mrmlScene", scene)


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


def _rows_table(scene, columns, rows: list[dict], name: str):
    """A table node with ``columns`` (numbers as doubles, NaN where missing; text otherwise, as the
    CSV files write it) and one row per dict of ``rows``."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
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
    node.Modified()
    return node


def _exam_table(scene, result: ScreeningResult, name: str):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    keys, values = vtk.vtkStringArray(), vtk.vtkStringArray()
    keys.SetName("key")
    values.SetName("value")
    for key, value in _flatten(result.exam):
        keys.InsertNextValue(key)
        values.InsertNextValue(_cell(value))
    node.GetTable().AddColumn(keys)
    node.GetTable().AddColumn(values)
    node.Modified()
    return node


def grade_color(grade: int | None, complete: bool = True) -> tuple[float, float, float]:
    """The display colour of a vertebra: by Genant grade, grey when incomplete or not graded."""
    return GRADE_COLORS[grade if complete and grade in GRADE_COLORS else None]


def write_result_nodes(result: ScreeningResult, scene=None, *, prefix: str = "VFS", segmentation_node=None,
                       convention: str = "totalsegmentator") -> dict:
    """Show ``result`` in the MRML scene, replacing earlier results of the same ``prefix``.

    Makes a table node ``"<prefix> vertebrae"`` (one row per vertebra, the columns of
    ``vertebrae.csv``; numbers as doubles, NaN where missing), a table node ``"<prefix> muscles"``
    (the rows and columns of ``muscles.csv``; None when no muscle was measured, e.g. VerSe
    labels), a table node ``"<prefix> exam"`` (``key``/``value`` rows of ``exam.json``, nested
    keys joined by dots) and a markups line node
    ``"<level> <Ha|Hm|Hp>"`` (``"<prefix> <level> ..."`` for a prefix other than ``VFS``) per
    measured height, from the superior to the inferior end point (RAS), coloured by the
    vertebra's grade (:data:`GRADE_COLORS`). When ``segmentation_node`` is given, its vertebra
    segments (matched by ID or terminology) are coloured by grade too.

    Earlier result nodes of the same ``prefix`` (found by the :data:`RESULT_ATTRIBUTE` and
    :data:`PREFIX_ATTRIBUTE` node attributes) are removed first, with their display nodes.

    Args:
        scene: a ``vtkMRMLScene``, the ``slicer`` module, or None for ``slicer.mrmlScene``.

    Returns:
        ``{"vertebrae": table node, "muscles": table node or None, "exam": table node,
        "lines": {"L1 Ha": line node, ...}, "segments": {segment ID: grade}}``.
    """
    scene = _scene_of(scene)
    remove_result_nodes(scene, prefix)
    vertebrae = _rows_table(scene, VERTEBRA_COLUMNS, result.vertebrae, f"{prefix} vertebrae")
    _mark(vertebrae, prefix)
    muscles = None
    if result.muscles:
        muscles = _rows_table(scene, MUSCLE_COLUMNS, result.muscles, f"{prefix} muscles")
        _mark(muscles, prefix)
    exam = _exam_table(scene, result, f"{prefix} exam")
    _mark(exam, prefix)

    grade_of = {g.level: g for g in result.grades}
    lines = {}
    for heights in result.heights:
        grade = grade_of.get(heights.level)
        color = grade_color(grade.genant_grade if grade else None, bool(grade and grade.complete))
        for key, (superior, inferior) in heights.height_lines_ras.items():
            name = f"{heights.level} {HEIGHT_NAMES.get(key, key)}"
            if prefix != "VFS":  # the default prefix keeps the short names ("L1 Ha")
                name = f"{prefix} {name}"
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
            node.AddControlPoint(*(float(x) for x in superior), "sup")
            node.AddControlPoint(*(float(x) for x in inferior), "inf")
            node.SetLocked(True)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetColor(*color)
                display.SetSelectedColor(*color)
                display.SetPointLabelsVisibility(False)
            _mark(node, prefix, **{LEVEL_ATTRIBUTE: heights.level, HEIGHT_ATTRIBUTE: key})
            lines[name] = node

    segments = {}
    if segmentation_node is not None:
        match = match_segments(segmentation_node, convention)
        level_of = {f"vertebrae_{level}": level for level in lv.LEVELS}
        segmentation = segmentation_node.GetSegmentation()
        for segment_id, structure in match.structures.items():
            level = level_of.get(structure)
            if level is None or level not in grade_of:
                continue
            grade = grade_of[level]
            segmentation.GetSegment(segment_id).SetColor(*grade_color(grade.genant_grade, grade.complete))
            segments[segment_id] = grade.genant_grade if grade.complete else None
    return {"vertebrae": vertebrae, "muscles": muscles, "exam": exam, "lines": lines, "segments": segments}


def line_length_mm(line_node) -> float:
    """Length of a two-point markups line in world coordinates (mm)."""
    return float(line_node.GetLineLengthWorld())


TOTALSEGMENTATOR_EXTENSION_MISSING = (
    "the TotalSegmentator extension is not installed: install it in Slicer's Extensions Manager (search "
    "'TotalSegmentator'), restart Slicer and try again; existing segmentations can be screened without it")


def segment_with_totalsegmentator_extension(volume_node, *, quality: str = "fast", cpu: bool = False,
                                            task: str = "total", subset=None, segmentation_node=None):
    """Segment ``volume_node`` with the SlicerTotalSegmentator extension's logic into a (new)
    segmentation node, whose segment IDs are TotalSegmentator class names, and return the node.

    Calls ``TotalSegmentatorLogic.process`` with keyword arguments only: ``quality`` (or, in
    versions of the extension that predate it, ``fast = quality == "fast"``), ``cpu``, ``task``
    and ``subset`` (default: the classes screening needs,
    :data:`.segmentation.SCREENING_CLASSES`); only those its ``process`` accepts are passed.

    Raises:
        DependencyError: the extension is not installed (one sentence saying how to get it).
    """
    import importlib
    import inspect

    from .errors import DependencyError
    from .segmentation import SCREENING_CLASSES

    if quality not in ("fast", "normal"):
        raise InputError(f"unknown quality {quality!r}; use fast or normal")
    try:
        extension = importlib.import_module("TotalSegmentator")
        logic = extension.TotalSegmentatorLogic()
    except (ImportError, AttributeError):
        raise DependencyError(TOTALSEGMENTATOR_EXTENSION_MISSING) from None
    import slicer

    if segmentation_node is None:
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{volume_node.GetName()} TotalSegmentator")
    accepted = inspect.signature(logic.process).parameters
    options = {"cpu": bool(cpu), "task": task, "subset": list(SCREENING_CLASSES if subset is None else subset)}
    if "quality" in accepted:
        options["quality"] = quality
    elif "fast" in accepted:
        options["fast"] = quality == "fast"
    logic.process(inputVolume=volume_node, outputSegmentation=segmentation_node,
                  **{key: value for key, value in options.items() if key in accepted})
    return segmentation_node


# ------------------------------------------------------------------------------------------------
# What the module panel shows (plain functions, so they are tested headless)
# ------------------------------------------------------------------------------------------------

PANEL_COLUMNS = (("Level", "level"), ("Ha mm", "ha_mm"), ("Hm mm", "hm_mm"), ("Hp mm", "hp_mm"),
                 ("Loss %", "height_loss"), ("Grade", "genant_grade"), ("Shape", "shape"), ("HU", "trabecular_hu_mean"))
"""Columns of the panel's results table: title and the ``vertebrae.csv`` column they show."""


def panel_rows(result: ScreeningResult) -> list[dict]:
    """One row per vertebra for the panel's table: ``cells`` (texts in :data:`PANEL_COLUMNS`
    order), ``color`` (RGB 0–1 of its grade, grey when incomplete) and ``level``."""
    return [{"level": row["level"], "cells": vertebra_cells(row), "color": grade_color(row["genant_grade"], row["complete"])}
            for row in result.vertebrae]


def vertebra_centre_ras(result: ScreeningResult, level: str) -> tuple[float, float, float] | None:
    """Centre of a vertebral body (the middle of its Hm line, RAS mm) for centring the views;
    None when it was not measured."""
    for h in result.heights:
        lines = h.height_lines_ras or {}
        if h.level == level and "hm" in lines:
            centre = 0.5 * (np.asarray(lines["hm"][0], dtype=float) + np.asarray(lines["hm"][1], dtype=float))
            if np.all(np.isfinite(centre)):
                return tuple(float(x) for x in centre)
    return None


def set_height_lines_visible(scene, visible: bool, prefix: str = "VFS") -> int:
    """Show or hide the height lines of one result; returns how many line nodes were changed."""
    changed = 0
    for node in result_nodes(_scene_of(scene), prefix):
        if node.IsA("vtkMRMLMarkupsLineNode") and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility(bool(visible))
            changed += 1
    return changed
