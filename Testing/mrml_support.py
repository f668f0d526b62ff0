"""Headless MRML for tests: a scene wired like Slicer's, built on the ``slicer-core`` wheel (no Qt).

The wheel gives the real MRML classes and ``slicer.util``, but no application: nothing creates
the module logics that ``slicer.util`` reaches through ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()``. :func:`make_mrml_scene` builds them once per process and
installs them there, so test code can use ``slicer.util`` as it would inside Slicer::

    from mrml_support import make_mrml_scene

    mrml = make_mrml_scene()          # empty scene, same session for the whole run
    node = slicer.util.addVolumeFromArray(array, ijk_to_ras, "ct")
    seg = mrml.load_segmentation(path, {31: "vertebrae_L1"})

Quirks of the wheel:

* The logics hold raw pointers to the scene and to one another; if Python collects the
  application logic while the scene is in use the process crashes (SIGSEGV). The session
  therefore lives in a module-level cache until the interpreter exits, when :func:`_shutdown`
  takes it apart in a safe order; tests get the same session with an emptied scene.
* ``slicer.util.loadVolume`` / ``loadSegmentation`` need ``slicer.app`` (Qt), which the wheel
  lacks: use :meth:`MrmlSession.load_volume` / :meth:`MrmlSession.load_segmentation`, which call
  the same readers through the Volumes and Segmentations logics.
* Slicer's ``vtkSlicerColorLogic`` wants the application's home directory; the core
  ``vtkMRMLColorLogic`` gives the default colour tables without it. Without a Colors logic,
  labelmap display nodes log errors.
"""

from __future__ import annotations

import atexit
import colorsys
import types

import numpy as np

# Module logics, as Slicer's application registers them (name → class name in the wheel).
_LOGICS = (
    ("Colors", "vtkMRMLColorLogic"),  # default colour tables for labelmaps and segmentations
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
)

_session: MrmlSession | None = None


class MrmlSession:
    """A MRML scene with the application and module logics that must stay alive beside it."""

    def __init__(self):
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.logics = {}
        for name, class_name in _LOGICS:
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.install()

    @property
    def volumes_logic(self):
        return self.logics["Volumes"]

    @property
    def segmentations_logic(self):
        return self.logics["Segmentations"]

    def install(self) -> None:
        """Point ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` at this session."""
        import slicer

        slicer.mrmlScene = self.scene
        modules = getattr(slicer, "modules", None) or types.SimpleNamespace()
        for name, logic in self.logics.items():
            setattr(modules, name.lower(), types.SimpleNamespace(logic=lambda logic=logic: logic))
        slicer.modules = modules

    def clear(self) -> None:
        """Remove every node a test added; singleton nodes (default colour tables) stay."""
        self.scene.Clear(0)

    def load_volume(self, path, name: str | None = None, labelmap: bool = False):
        """Read a volume file (NIfTI, NRRD, ...) with Slicer's own reader, as ``slicer.util.loadVolume``."""
        options = 1 if labelmap else 0  # bit 0: label map (vtkSlicerVolumesLogic::AddArchetypeVolume)
        node = self.volumes_logic.AddArchetypeVolume(str(path), name or _stem(path), options)
        if node is None:
            raise RuntimeError(f"Slicer could not read the volume {path}")
        return node

    def load_segmentation(self, path, label_to_id: dict[int, str] | None = None, name: str | None = None):
        """Read a labelmap file as a segmentation node, as ``slicer.util.loadSegmentation``.

        ``label_to_id`` maps label value → segment ID (e.g. ``{31: "vertebrae_L1"}``); it is passed
        to the reader as a colour table, which is how Slicer names segments. Without it segments
        are named ``Segment_<label>``.
        """
        color_node = self.color_table(label_to_id) if label_to_id else None
        node = self.segmentations_logic.LoadSegmentationFromFile(str(path), False, name or _stem(path), color_node)
        if node is None:
            raise RuntimeError(f"Slicer could not read the segmentation {path}")
        return node

    def color_table(self, label_to_id: dict[int, str], name: str = "SegmentIDs"):
        """A user colour table naming each label value (the reader's source of segment IDs)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        node.SetTypeToUser()
        node.SetNumberOfColors(max(label_to_id) + 1)
        for index, (label, segment_id) in enumerate(sorted(label_to_id.items())):
            r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.6, 0.9)
            node.SetColor(label, segment_id, r, g, b, 1.0)
        return node

    def close(self) -> None:
        """Empty the scene, then drop the module logics, the application logic and the scene, in
        that order. (Detaching logics with ``SetMRMLScene(None)`` is not needed and makes the
        segmentations logic warn.) The process must not use the session afterwards."""
        self.scene.Clear(1)
        self.logics.clear()
        self.app_logic = None
        self.scene = None


def make_mrml_scene() -> MrmlSession:
    """The process-wide MRML session, with an empty scene and ``slicer.*`` pointing at it."""
    global _session
    if _session is None:
        _session = MrmlSession()
        atexit.register(_shutdown)
    else:
        _session.install()
        _session.clear()
    return _session


def ijk_to_ras(volume_node) -> np.ndarray:
    """A volume node's IJK→RAS matrix as a 4x4 numpy array."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def segment_ids(segmentation_node) -> list[str]:
    """The segment IDs of a segmentation node, in order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _stem(path) -> str:
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _shutdown() -> None:
    global _session
    if _session is not None:
        _session.close()
        _session = None
