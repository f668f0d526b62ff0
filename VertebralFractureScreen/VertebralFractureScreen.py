"""3D Slicer module: opportunistic vertebral fracture screening on CT.

A thin shell: the measurements live in ``VertebralFractureScreenLib`` (plain Python, no Qt),
which also runs headless. Only this file imports Qt, CTK and Slicer's GUI classes.
"""

import colorsys
import importlib.util
import json
import logging
import tempfile

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PHANTOM_LEVELS = ("T12", "L1", "L2")
"""Levels of the phantom made by the panel's "Make phantom" button and by the self-test."""

LIBRARY_REQUIREMENTS = {"scipy": "scipy"}
"""Modules the library needs beyond what Slicer bundles (import name → pip requirement)."""

RESULT_COLUMNS = (
    ("Level", "level"),
    ("Grade", "genant_grade"),
    ("Shape", "shape"),
    ("Ha/Hp", "ha_hp"),
    ("Hm/Hp", "hm_hp"),
    ("HU", "trabecular_hu_mean"),
)
"""Columns of the results table: title and the matching vertebrae.csv column (SPEC §5)."""


#
# VertebralFractureScreen
#


class VertebralFractureScreen(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Vertebral Fracture Screen"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []  # TotalSegmentator is optional: an existing segmentation works too
        self.parent.contributors = ["VertebralFractureScreen developers"]
        self.parent.helpText = """
Opportunistic screening for osteoporotic vertebral fractures on CT scans taken for another reason.
The CT is segmented with TotalSegmentator (or an existing segmentation with TotalSegmentator segment
IDs is used); each vertebra gets anterior, middle and posterior body heights, a Genant grade and
shape, and trabecular bone attenuation; paraspinal muscles are measured per lumbar level; a
multiparametric model gives the probability of a fragility fracture.
Use <b>Make phantom</b> to create a synthetic spine CT (T12-L2) whose anatomy is exactly known.
"""
        self.parent.acknowledgementText = """
Segmentation by TotalSegmentator: Wasserthal J, Breit H-C, Meyer MT, et al. TotalSegmentator:
robust segmentation of 104 anatomic structures in CT images. Radiology: Artificial Intelligence
2023;5(5):e230024. https://doi.org/10.1148/ryai.230024.
Semi-quantitative grading after Genant HK et al., J Bone Miner Res 1993;8(9):1137-1148.
"""


#
# VertebralFractureScreenWidget
#


class VertebralFractureScreenWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: wires the .ui widgets to the logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebralFractureScreen.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.inputSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = VertebralFractureScreenLogic()

        self.ui.applyButton.enabled = False
        self.ui.applyButton.toolTip = "Screening arrives with the morphometry release."
        self.ui.progressBar.visible = False
        self.ui.resultsTable.setColumnCount(len(RESULT_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels([title for title, _ in RESULT_COLUMNS])
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

        self.ui.makePhantomButton.connect("clicked(bool)", self.onMakePhantom)
        self.ui.segmentWithTotalSegmentatorCheckBox.connect("toggled(bool)", self.updateGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.updateGUI()

    def cleanup(self):
        self.removeObservers()

    def onSceneEndClose(self, caller, event):
        self.ui.resultsTable.setRowCount(0)
        self.ui.summaryLabel.text = "No results yet."

    def updateGUI(self, *_):
        """Enable the widgets that make sense for the current choices."""
        useTotalSegmentator = self.ui.segmentWithTotalSegmentatorCheckBox.checked
        self.ui.inputSegmentationSelector.enabled = not useTotalSegmentator
        self.ui.qualityComboBox.enabled = useTotalSegmentator
        self.ui.cpuCheckBox.enabled = useTotalSegmentator

    def onMakePhantom(self):
        """Write a phantom to a new temporary folder and show it."""
        missing = self.logic.missingRequirements()
        if missing and not slicer.util.confirmOkCancelDisplay(
            f"This module needs the Python packages {', '.join(missing)}. Install them now?"
        ):
            return
        with slicer.util.tryWithErrorDisplay("Failed to make the phantom.", waitCursor=True):
            self.logic.installRequirements(missing)
            outDir = tempfile.mkdtemp(prefix="VertebralFractureScreenPhantom-")
            volumeNode, segmentationNode, _ = self.logic.loadPhantom(outDir)
            self.ui.inputVolumeSelector.setCurrentNode(volumeNode)
            self.ui.inputSegmentationSelector.setCurrentNode(segmentationNode)
            self.ui.segmentWithTotalSegmentatorCheckBox.checked = False
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.ui.summaryLabel.text = f"Phantom ({', '.join(PHANTOM_LEVELS)}) written to {outDir}"


#
# VertebralFractureScreenLogic
#


class VertebralFractureScreenLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: moves data between MRML nodes and ``VertebralFractureScreenLib``."""

    @staticmethod
    def missingRequirements():
        """pip requirements of the library that are not installed in Slicer's Python."""
        return [req for name, req in LIBRARY_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]

    @staticmethod
    def installRequirements(requirements):
        for requirement in requirements:
            slicer.util.pip_install(requirement)

    def writePhantom(self, outDir, levels=PHANTOM_LEVELS, spacing=(1.0, 1.0, 1.0), fractures=()):
        """Write the library's phantom to ``outDir``; returns its paths keyed ct, total, truth, ...
        ``fractures``: texts such as ``"L1:wedge:0.35"``."""
        from VertebralFractureScreenLib.phantom import Fracture, PhantomSpec, write_phantom

        spec = PhantomSpec(levels=tuple(levels), spacing=tuple(spacing),
                           fractures=tuple(Fracture.parse(text) for text in fractures))
        return write_phantom(spec, outDir)

    def loadPhantom(self, outDir, levels=PHANTOM_LEVELS, spacing=(1.0, 1.0, 1.0), fractures=()):
        """Write a phantom and load its CT and TotalSegmentator segmentation into the scene.
        Returns the volume node, the segmentation node and the written paths."""
        paths = self.writePhantom(outDir, levels, spacing, fractures)
        volumeNode = slicer.util.loadVolume(paths["ct"], {"name": "PhantomCT"})
        segmentationNode = self.loadTotalSegmentation(paths["total"], volumeNode, "PhantomSegmentation")
        return volumeNode, segmentationNode, paths

    def loadTotalSegmentation(self, path, referenceVolumeNode=None, name=None):
        """Load a labelmap with TotalSegmentator ``total`` ids as a segmentation whose segment IDs
        are the TotalSegmentator class names (``vertebrae_L1``, ...), as SPEC §3 requires."""
        from VertebralFractureScreenLib.levels import TOTAL_CLASS_NAMES

        colorNode = self.classNameColorNode(TOTAL_CLASS_NAMES)
        properties = {"colorNodeID": colorNode.GetID()}
        if name:
            properties["name"] = name
        segmentationNode = slicer.util.loadSegmentation(path, properties)
        if referenceVolumeNode:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        return segmentationNode

    @staticmethod
    def classNameColorNode(classNames, nodeName="VertebralFractureScreenClasses"):
        """A colour table naming label values ``{label: class name}``: Slicer's segmentation reader
        takes segment IDs and names from it. Made once per scene, hidden from node selectors."""
        colorNode = slicer.mrmlScene.GetFirstNodeByName(nodeName)
        if colorNode and colorNode.IsA("vtkMRMLColorTableNode"):
            return colorNode
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", nodeName)
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(True)
        colorNode.SetNumberOfColors(max(classNames) + 1)
        for index, (label, className) in enumerate(sorted(classNames.items())):
            r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.6, 0.9)
            colorNode.SetColor(label, className, r, g, b, 1.0)
        return colorNode


#
# VertebralFractureScreenTest
#


class VertebralFractureScreenTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (and by ctest through slicer_add_python_unittest)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PhantomLoadsWithGeometryAndSegmentIDs()
        self.setUp()
        self.test_ScreeningGradesThePhantom()

    def test_PhantomLoadsWithGeometryAndSegmentIDs(self):
        """Slicer's readers see the phantom where the library put it, with TotalSegmentator IDs."""
        self.delayDisplay("Making and loading a phantom")
        logic = VertebralFractureScreenLogic()
        logic.installRequirements(logic.missingRequirements())
        with tempfile.TemporaryDirectory() as outDir:
            # 2 mm voxels keep the test short; any spacing must load with the library's geometry.
            volumeNode, segmentationNode, paths = logic.loadPhantom(outDir, spacing=(2.0, 2.0, 2.0))
            self.assertTrue({"ct", "total", "vertebrae_body", "verse", "truth"} <= set(paths))
            with open(paths["truth"], encoding="utf-8") as file:
                expected = np.array(json.load(file)["grid"]["ijk_to_ras"], dtype=float)

        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), expected, atol=1e-4)

        segmentation = segmentationNode.GetSegmentation()
        segmentIDs = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        for level in PHANTOM_LEVELS:
            self.assertIn(f"vertebrae_{level}", segmentIDs)
        logging.info("Phantom segment IDs: %s", sorted(segmentIDs))
        self.delayDisplay("Test passed")

    def test_ScreeningGradesThePhantom(self):
        """The node logic grades a phantom with a wedge fracture of L1 as its truth says, and shows
        the result as tables, height lines and grade colours."""
        from VertebralFractureScreenLib import slicer_nodes

        self.delayDisplay("Screening a phantom with an L1 wedge fracture")
        logic = VertebralFractureScreenLogic()
        logic.installRequirements(logic.missingRequirements())
        with tempfile.TemporaryDirectory() as outDir:
            volumeNode, segmentationNode, paths = logic.loadPhantom(
                outDir, levels=("T11", "T12", "L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), fractures=("L1:wedge:0.35",))
            with open(paths["truth"], encoding="utf-8") as file:
                truth = {v["level"]: v for v in json.load(file)["vertebrae"]}
        result = slicer_nodes.screen_nodes(volumeNode, segmentationNode)
        for row in result.vertebrae:
            if row["complete"]:
                self.assertEqual(row["genant_grade"], truth[row["level"]]["genant_grade"], row["level"])
        self.assertEqual(result.exam["fracture"]["fractured_levels"], ["L1"])
        nodes = slicer_nodes.write_result_nodes(result, slicer.mrmlScene, segmentation_node=segmentationNode)
        self.assertEqual(nodes["vertebrae"].GetNumberOfRows(), len(result.vertebrae))
        self.assertTrue(slicer.mrmlScene.GetFirstNodeByName("L1 Ha"))
        self.delayDisplay("Test passed")
