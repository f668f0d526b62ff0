"""Screening from 3D Slicer's MRML nodes (the Slicer module's engine; no Qt).

:func:`screen_nodes` takes a CT volume node and a segmentation node, exports the segments onto
the CT's voxel grid as TotalSegmentator ``total`` ids and runs :func:`.screening.screen_exam` on
the arrays in memory: the same measurements as ``vfscreen screen`` on the same data. The results
go into the scene through :mod:`.slicer_results`.

Segments are matched to structures by the one rule of :func:`.io.labels.segment_structure` (also
used for ``.seg.nrrd`` files): by segment ID (a TotalSegmentator class name such as
``vertebrae_L1``), then by terminology (SNOMED CT code, or a type meaning such as ``L1 vertebra``),
then, for a label map loaded with "Add data" (segment ``Segment_<n>`` with label value ``n``), by
its label value; never by the segment's display name alone.

``slicer`` and ``vtk`` are imported inside the functions, so this module imports without Slicer.
It needs no Qt and no Slicer application object: it works in Slicer's Python console and on the
``slicer-core`` wheel (see ``Testing/mrml_support.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import levels as lv
from .errors import InputError
from .io.labels import LabelMapWarning, convention_ids
from .io.labels import segment_structure as _segment_structure_rule
from .io.volume import Volume
from .exam.screening import ScreeningResult, screen_exam

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
    """(class name or None, reason when None) of one ``vtkSegment`` by
    :func:`.io.labels.segment_structure`: ID, terminology, then the label value of a generic ID."""
    label_value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else None
    return _segment_structure_rule(segment_id, segment.GetName() or "", _segment_terminology(segment), label_value,
                                   known)


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
    """A scalar volume node as a :class:`~.io.volume.Volume` (array ``[k, j, i]``, IJK→RAS in
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
                         "convention (segments are matched by segment ID, such as vertebrae_L1, by terminology, or by "
                         "the label values of a label map loaded as a segmentation)")
    ordered = list(match.ids)
    segment_ids = vtk.vtkStringArray()
    for segment_id in ordered:
        segment_ids.InsertNextValue(segment_id)
    scene = reference_node.GetScene()
    # The export adds the labelmap's display node and a "<segmentation>_ColorTable" node too.
    with new_nodes_removed(scene):
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "VFS export (temporary)")
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
    return labels, match


def _node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


@contextlib.contextmanager
def new_nodes_removed(scene):
    """Remove, when the block ends (also by an exception), every node added to ``scene`` inside it:
    the temporary nodes of an export or import and the helper nodes Slicer adds with them."""
    before = _node_ids(scene)
    try:
        yield
    finally:
        for node_id in _node_ids(scene) - before:
            node = scene.GetNodeByID(node_id)
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)


def remove_node(scene, node) -> None:
    """Remove ``node`` with the display and storage nodes that serve it."""
    helpers = []
    for count, get in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"), ("GetNumberOfStorageNodes", "GetNthStorageNode")):
        if hasattr(node, count):
            helpers += [getattr(node, get)(i) for i in range(getattr(node, count)())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


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
    sources = {"ct": f"Slicer node {volume_node.GetName()}", "segmentation": f"Slicer node {segmentation_node.GetName()}"}
    if body_segmentation_node is not None:
        sources["vertebrae_body"] = f"Slicer node {body_segmentation_node.GetName()}"
    return screen_exam(ct, seg=seg, body_seg=body, convention=convention, exam_id=exam_id or volume_node.GetName(),
                       levels=levels, model=model, sources=sources, notes=tuple(notes))


def _dropped_note(node, match: SegmentMatch) -> list[str]:
    if not match.dropped:
        return []
    shown = ", ".join(match.dropped[:12]) + (f" and {len(match.dropped) - 12} more" if len(match.dropped) > 12 else "")
    message = f"{node.GetName()}: {len(match.dropped)} segment(s) not used: {shown}"
    warnings.warn(message, LabelMapWarning, stacklevel=3)
    return [message]


def segments_from_labels(segmentation_node, labels: np.ndarray, ijk_to_ras, segments, *, label_boxes=None,
                         reference_volume_node=None):
    """Replace the segments of ``segmentation_node`` by ``segments`` of a label array.

    ``labels``: array ``[k, j, i]`` with IJK→RAS ``ijk_to_ras``; ``segments``: ``(label value,
    segment ID, name, RGB colour)`` in the order wanted. Only the box around those labels is handed
    to Slicer (through one temporary labelmap node, removed afterwards with the nodes it brought),
    so a 512x512x1000 map costs the spine's box, not the volume. ``label_boxes``: each label's box
    as :func:`.geometry.find_label_boxes` gives it, when known. Labels absent from the array give
    empty segments. Returns the node."""
    import slicer
    import vtk

    from .geometry import find_label_boxes

    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    if reference_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    if not segments:
        segmentation_node.Modified()
        return segmentation_node
    largest = int(max(label for label, *_ in segments))
    boxes = label_boxes if label_boxes is not None else find_label_boxes(labels, largest)
    present = [boxes[label - 1] for label, *_ in segments if len(boxes) >= label and boxes[label - 1] is not None]
    lut = np.zeros(largest + 1, dtype=np.uint8)
    segment_ids = vtk.vtkStringArray()
    for value, (label, segment_id, name, color) in enumerate(segments, start=1):
        lut[label] = value
        segmentation.AddEmptySegment(segment_id, name, [float(c) for c in color])
        segment_ids.InsertNextValue(segment_id)
    if not present:
        segmentation_node.Modified()
        return segmentation_node
    lower = np.array([min(box[axis].start for box in present) for axis in range(3)], dtype=np.intp)
    upper = np.array([max(box[axis].stop for box in present) for axis in range(3)], dtype=np.intp)
    crop = np.asarray(labels[tuple(slice(lo, hi) for lo, hi in zip(lower, upper))])
    inside = (crop >= 0) & (crop <= largest)
    values = np.where(inside, lut[np.where(inside, crop, 0).astype(np.intp)], 0).astype(np.uint8)
    ijk_to_ras = np.array(ijk_to_ras, dtype=float)
    box_to_ras = ijk_to_ras.copy()
    box_to_ras[:, 3] = ijk_to_ras @ np.array([lower[2], lower[1], lower[0], 1.0])  # [k, j, i] -> IJK
    with new_nodes_removed(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "VFS import (temporary)")
        labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(box_to_ras))
        slicer.util.updateVolumeFromArray(labelmap, values)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node,
                                                                                          segment_ids):
            raise InputError(f"Slicer could not import the label map into {segmentation_node.GetName()}")
    segmentation_node.Modified()
    return segmentation_node


def screen_into_scene(volume_node, segmentation_node, *, body_segmentation_node=None, model=None,
                      vertebrae_table=None, grades_segmentation=None, color_input_segments: bool = False,
                      show_height_lines: bool = True):
    """What the panel's Apply does after segmentation: :func:`screen_nodes`, then the result into
    the scene by :func:`.slicer_results.write_result_nodes` (this CT's earlier result replaced,
    the given output nodes refilled). Returns ``(ScreeningResult, ResultNodes)``."""
    from . import slicer_results

    result = screen_nodes(volume_node, segmentation_node, body_segmentation_node=body_segmentation_node, model=model)
    made = slicer_results.write_result_nodes(
        result, volume_node.GetScene(), volume_node=volume_node, segmentation_node=segmentation_node,
        vertebrae_table=vertebrae_table, grades_segmentation=grades_segmentation,
        color_input_segments=color_input_segments)
    slicer_results.set_height_lines_visible(volume_node.GetScene(), show_height_lines, made.key)
    return result, made
