"""TotalSegmentator for a CT in 3D Slicer's scene, without freezing Slicer (no Qt).

:func:`segment_volume_node` writes the CT node to a temporary file, runs
:func:`.segmentation.segment_ct` in a child process (:class:`.segmentation_job.SegmentationJob`:
the caller's ``process_events`` runs between polls, its ``log`` gets TotalSegmentator's output, its
``cancelled`` stops the child and all its workers) and only then makes the segmentation node, so a
failure or a cancel adds nothing to the scene. The headless path's policy applies unchanged: no
weight download unless ``download`` is given (:class:`.errors.WeightsMissingError` otherwise, so
the caller can ask the user), usage statistics off.

:func:`load_total_segmentation` turns a TotalSegmentator ``total`` label map (a file) into a
segmentation node whose segment IDs are the class names (``vertebrae_L1``), as SPEC §3 asks, with
no colour table or labelmap node left in the scene.
"""

from __future__ import annotations

import colorsys
import tempfile
from pathlib import Path

import numpy as np

from . import levels as lv
from .geometry import find_label_boxes
from .io.files import split_image_suffix
from .io.images import read_labelmap, write_volume
from .io.volume import Volume
from .segment.job import SegmentationJob, run_job
from .slicer_nodes import remove_node, segments_from_labels, volume_from_node


def class_color(label: int) -> tuple[float, float, float]:
    """A distinct display colour for TotalSegmentator ``total`` label ``label`` (golden-ratio hues)."""
    index = sorted(lv.TOTAL_CLASS_NAMES).index(label) if label in lv.TOTAL_CLASS_NAMES else label
    return colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.6, 0.9)


def labels_into_segmentation(segmentation_node, labels: Volume, names=None):
    """Fill ``segmentation_node`` with one segment per label present in ``labels`` (ID and name
    the TotalSegmentator class name of ``names``, default the ``total`` classes). Returns the node."""
    names = lv.TOTAL_CLASS_NAMES if names is None else names
    largest = max(names)
    boxes = find_label_boxes(labels.array, largest)
    segments = [(label, name, name, class_color(label)) for label, name in sorted(names.items())
                if label <= len(boxes) and boxes[label - 1] is not None]
    return segments_from_labels(segmentation_node, labels.array, labels.ijk_to_ras, segments, label_boxes=boxes)


def load_total_segmentation(scene, path, reference_volume_node=None, name: str | None = None):
    """Read a TotalSegmentator ``total`` label map (NIfTI, NRRD or ``.seg.nrrd``), on the grid of
    ``reference_volume_node`` when given, into a new segmentation node; returns the node."""
    reference = volume_from_node(reference_volume_node) if reference_volume_node is not None else None
    labels = read_labelmap(path, reference=reference)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or split_image_suffix(Path(path).name)[0])
    try:
        node.CreateDefaultDisplayNodes()
        labels_into_segmentation(node, labels)
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    except BaseException:
        remove_node(scene, node)
        raise
    return node


def segment_volume_node(volume_node, *, quality: str = "fast", device: str = "cpu", download: bool = False,
                        python: str | None = None, env: dict | None = None, log=None, process_events=None,
                        cancelled=None, name: str | None = None):
    """Segment the CT of ``volume_node`` with TotalSegmentator in a child process and return a new
    segmentation node ``"<CT> TotalSegmentator"`` on the CT's grid (segment IDs are class names).

    Args:
        python: the Python that runs TotalSegmentator (in Slicer: ``PythonSlicer``).
        env: extra environment for the child (e.g. ``TOTALSEG_WEIGHTS_PATH``).
        log, process_events, cancelled: as :func:`.segmentation_job.run_job`.

    Raises:
        SegmentationCancelled: ``cancelled()`` turned true; nothing was added to the scene.
        WeightsMissingError, DependencyError, InputError, SegmentationError: one sentence each, as
            :func:`.segmentation.segment_ct` says; nothing was added to the scene.
    """
    volume = volume_from_node(volume_node)
    with tempfile.TemporaryDirectory(prefix="vfs-slicer-segmentation-") as folder:
        ct_path = Path(folder) / "ct.nrrd"  # NRRD keeps the matrix in double precision
        write_volume(ct_path, volume, compress=False)
        job = SegmentationJob(ct_path, Path(folder) / "segmentation", quality=quality, device=device,
                              download=download, python=python, env=env)
        result = run_job(job, process_events=process_events, cancelled=cancelled, log=log)
        labels = read_labelmap(result.total_path, reference=volume)
    scene = volume_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} TotalSegmentator")
    try:
        node.CreateDefaultDisplayNodes()
        labels_into_segmentation(node, labels)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    except BaseException:
        remove_node(scene, node)
        raise
    return node
