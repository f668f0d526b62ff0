"""3D Slicer module: opportunistic vertebral fracture screening on CT.

A thin shell: the measurements live in ``VertebralFractureScreenLib`` (plain Python, no Qt),
which also runs headless. Only this file imports Qt, CTK and Slicer's GUI classes.
"""

import colorsys
import json
import logging
import os
import tempfile
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PHANTOM_LEVELS = ("T12", "L1", "L2")
"""Levels of the phantom made by the panel's "Make phantom" button and by the self-test."""

REQUIREMENTS_FILE = "requirements.txt"
"""Python packages the library needs beyond what Slicer bundles (in the module's Resources)."""


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
multiparametric model (optional) gives the probability of a fragility fracture.
Click a row of the results to centre the views on that vertebra.
Use <b>Make phantom</b> to create a synthetic spine CT (T12-L2) whose anatomy is exactly known.
"""
        self.parent.acknowledgementText = """
Segmentation by TotalSegmentator: Wasserthal J, Breit H-C, Meyer MT, et al. TotalSegmentator:
robust segmentation of 104 anatomic structures in CT images. Radiology: Artificial Intelligence
2023;5(5):e230024. https://doi.org/10.1148/ryai.230024.
Semi-quantitative grading after Genant HK et al., J Bone Miner Res 1993;8(9):1137-1148.
"""


#
# Parameter node
#


@parameterNodeWrapper
class VertebralFractureScreenParameterNode:
    """The panel's settings, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    segmentWithTotalSegmentator: bool = False
    quality: Annotated[str, Choice(["fast", "normal"])] = "fast"
    cpu: bool = False
    modelPath: str = ""
    useDemoModel: bool = False
    showHeightLines: bool = True


#
# VertebralFractureScreenWidget
#


class ScreeningCancelled(Exception):
    """The user pressed Cancel; raised between steps."""


class VertebralFractureScreenWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: wires the .ui widgets to the library (``VertebralFractureScreenLib``)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._result = None
        self._rows = []
        self._cancelRequested = False
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebralFractureScreen.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VertebralFractureScreenLogic()

        self.ui.progressBar.visible = False
        self.ui.resultsTable.setColumnCount(len(self.logic.panelColumns()))
        self.ui.resultsTable.setHorizontalHeaderLabels(self.logic.panelColumns())
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        hasTotalSegmentator = self.logic.totalSegmentatorAvailable()
        self.ui.totalSegmentatorStatusLabel.visible = not hasTotalSegmentator
        self.ui.segmentWithTotalSegmentatorCheckBox.enabled = hasTotalSegmentator

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.makePhantomButton.connect("clicked(bool)", self.onMakePhantom)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.showHeightLinesCheckBox.connect("toggled(bool)", self.onShowHeightLines)
        self.ui.resultsTable.connect("cellClicked(int,int)", self.onRowClicked)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self._result, self._rows = None, []
        self.ui.resultsTable.setRowCount(0)
        self.ui.summaryLabel.text = "No results yet."
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.inputSegmentation:
            self._parameterNode.inputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, *_):
        """Enable the widgets that make sense for the current choices."""
        p = self._parameterNode
        if p is None:
            return
        useTotalSegmentator = p.segmentWithTotalSegmentator and self.logic.totalSegmentatorAvailable()
        self.ui.inputSegmentationSelector.enabled = not useTotalSegmentator and not self._running
        self.ui.qualityComboBox.enabled = useTotalSegmentator
        self.ui.cpuCheckBox.enabled = useTotalSegmentator
        self.ui.modelPathLineEdit.enabled = not p.useDemoModel
        ready = bool(p.inputVolume) and (useTotalSegmentator or bool(p.inputSegmentation))
        self.ui.applyButton.enabled = ready and not self._running
        self.ui.applyButton.toolTip = ("Screen the selected CT for vertebral fractures." if ready else
                                       "Select a CT and a segmentation (or run TotalSegmentator).")
        self.ui.cancelButton.enabled = self._running
        self.ui.exportButton.enabled = self._result is not None and not self._running
        self.ui.showHeightLinesCheckBox.enabled = self._result is not None

    # -- running ----------------------------------------------------------------------------------

    def _step(self, text, percent):
        """Show progress and give Cancel a chance (it takes effect between steps)."""
        self.ui.progressBar.value = percent
        self.ui.progressLabel.text = text
        slicer.app.processEvents()
        if self._cancelRequested:
            raise ScreeningCancelled()

    def onCancel(self):
        self._cancelRequested = True
        self.ui.progressLabel.text = "Cancelling after the current step..."

    def onApply(self):
        p = self._parameterNode
        if not self.ensureRequirements():
            return
        self._cancelRequested, self._running = False, True
        self.ui.progressBar.visible = True
        self.updateGUI()
        try:
            with slicer.util.tryWithErrorDisplay("Screening failed.", waitCursor=True):
                try:
                    segmentationNode = p.inputSegmentation
                    if p.segmentWithTotalSegmentator and self.logic.totalSegmentatorAvailable():
                        self._step("Segmenting with TotalSegmentator (this step cannot be interrupted)...", 5)
                        segmentationNode = self.logic.segment(p.inputVolume, quality=p.quality, cpu=p.cpu)
                        p.inputSegmentation = segmentationNode
                    self._step("Measuring heights, bone attenuation and muscles...", 40)
                    result = self.logic.screen(p.inputVolume, segmentationNode, model=self.modelChoice())
                    self._step("Showing the results...", 85)
                    self.logic.showResult(result, segmentationNode, showHeightLines=p.showHeightLines)
                    self.showResult(result)
                    self._step("Done.", 100)
                except ScreeningCancelled:
                    self.ui.progressLabel.text = "Cancelled: nothing more was done after the step that was running."
        finally:
            self._running = False
            self.ui.progressBar.visible = False
            self.updateGUI()

    def modelChoice(self):
        """The model the panel asks for: ``"demo"``, a model file, or None."""
        p = self._parameterNode
        if p.useDemoModel:
            return "demo"
        return p.modelPath.strip() or None

    def showResult(self, result):
        """Fill the results table (coloured by grade) and the exam summary."""
        from VertebralFractureScreenLib import slicer_nodes

        self._result, self._rows = result, slicer_nodes.panel_rows(result)
        table = self.ui.resultsTable
        table.setRowCount(len(self._rows))
        for r, row in enumerate(self._rows):
            color = qt.QColor.fromRgbF(*row["color"], 0.35)
            for c, text in enumerate(row["cells"]):
                item = qt.QTableWidgetItem(text)
                item.setBackground(qt.QBrush(color))
                table.setItem(r, c, item)
        self.ui.summaryLabel.text = result.summary()
        self.ui.showHeightLinesCheckBox.checked = self._parameterNode.showHeightLines

    def onRowClicked(self, row, column):
        """Centre the slice views on the vertebra of the clicked row."""
        if self._result is None or row >= len(self._rows):
            return
        centre = self.logic.vertebraCentre(self._result, self._rows[row]["level"])
        if centre is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centre, True)

    def onShowHeightLines(self, visible):
        self.logic.setHeightLinesVisible(visible)

    def onExport(self):
        """Write the SPEC files (vertebrae.csv, muscles.csv, exam.json, qc.png) to a folder."""
        if self._result is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export screening results")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            self._result.write(folder)
            self.ui.progressLabel.text = f"Results written to {folder}"

    def ensureRequirements(self):
        """Install the missing Python packages of Resources/requirements.txt, after asking."""
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "Vertebral Fracture Screen needs these Python packages, which are not installed in Slicer's "
            f"Python: {', '.join(missing)}. Install them now (from PyPI)?"
        ):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            self.logic.installRequirements(missing)
            return not self.logic.missingRequirements()
        return False

    def onMakePhantom(self):
        """Write a phantom to a new temporary folder and show it."""
        if not self.ensureRequirements():
            return
        with slicer.util.tryWithErrorDisplay("Failed to make the phantom.", waitCursor=True):
            outDir = tempfile.mkdtemp(prefix="VertebralFractureScreenPhantom-")
            volumeNode, segmentationNode, _ = self.logic.loadPhantom(outDir, fractures=("L1:wedge:0.35",))
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.inputSegmentation = segmentationNode
            self._parameterNode.segmentWithTotalSegmentator = False
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.ui.summaryLabel.text = f"Phantom ({', '.join(PHANTOM_LEVELS)}, L1 wedge fracture) written to {outDir}"


#
# VertebralFractureScreenLogic
#


class VertebralFractureScreenLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: moves data between MRML nodes and ``VertebralFractureScreenLib``; every
    measurement is the library's (``slicer_nodes``), the same engine as ``vfscreen screen``."""

    def getParameterNode(self):
        return VertebralFractureScreenParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath():
        return os.path.join(os.path.dirname(__file__), "Resources", REQUIREMENTS_FILE)

    def missingRequirements(self):
        """Requirements of Resources/requirements.txt that Slicer's Python does not satisfy."""
        from VertebralFractureScreenLib.dependencies import missing_requirements, read_requirements

        return missing_requirements(read_requirements(self.requirementsPath()))

    @staticmethod
    def installRequirements(requirements):
        """Install with ``slicer.packaging`` where this Slicer has it, else ``slicer.util.pip_install``.
        Never called at import time: the panel asks the user first."""
        if not requirements:
            return
        try:
            from slicer import packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_install"):
            packaging.pip_install(" ".join(requirements))
        else:
            slicer.util.pip_install(" ".join(requirements))

    @staticmethod
    def totalSegmentatorAvailable():
        return hasattr(slicer.modules, "totalsegmentator")

    @staticmethod
    def panelColumns():
        from VertebralFractureScreenLib import slicer_nodes

        return [title for title, _ in slicer_nodes.PANEL_COLUMNS]

    @staticmethod
    def segment(volumeNode, quality="fast", cpu=False):
        """Segment with the TotalSegmentator extension into a new segmentation node."""
        from VertebralFractureScreenLib import slicer_nodes

        return slicer_nodes.segment_with_totalsegmentator_extension(volumeNode, quality=quality, cpu=cpu)

    @staticmethod
    def screen(volumeNode, segmentationNode, model=None, bodySegmentationNode=None):
        """Screen the CT on its segmentation; returns the library's ScreeningResult."""
        from VertebralFractureScreenLib import slicer_nodes

        return slicer_nodes.screen_nodes(volumeNode, segmentationNode, body_segmentation_node=bodySegmentationNode,
                                         model=model)

    @staticmethod
    def showResult(result, segmentationNode=None, showHeightLines=True):
        """Tables, height lines and grade colours in the scene (replacing an earlier result)."""
        from VertebralFractureScreenLib import slicer_nodes

        nodes = slicer_nodes.write_result_nodes(result, slicer.mrmlScene, segmentation_node=segmentationNode)
        slicer_nodes.set_height_lines_visible(slicer.mrmlScene, showHeightLines)
        return nodes

    @staticmethod
    def setHeightLinesVisible(visible):
        from VertebralFractureScreenLib import slicer_nodes

        return slicer_nodes.set_height_lines_visible(slicer.mrmlScene, visible)

    @staticmethod
    def vertebraCentre(result, level):
        from VertebralFractureScreenLib import slicer_nodes

        return slicer_nodes.vertebra_centre_ras(result, level)

    def screenFiles(self, inputs, outputFolder, workers=1, progress=None, cancel=None, **settings):
        """Batch from Slicer's Python console: the ``vfscreen cohort`` engine on a folder, a CSV
        manifest or a list of CT files (segmentations found beside them by name). Returns the
        cohort summary; results go to ``outputFolder`` (one SPEC folder per exam, features.csv)."""
        from VertebralFractureScreenLib import cohort

        return cohort.run_cohort(inputs, outputFolder, workers=workers, progress=progress, cancel=cancel,
                                 settings=cohort.CohortSettings(**settings))

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

    @staticmethod
    def loadWedgePhantom(logic):
        """A T11–L3 phantom at 2 mm with an L1 wedge fracture, loaded; returns the volume and
        segmentation nodes and the truth per level."""
        logic.installRequirements(logic.missingRequirements())
        with tempfile.TemporaryDirectory() as outDir:
            volumeNode, segmentationNode, paths = logic.loadPhantom(
                outDir, levels=("T11", "T12", "L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), fractures=("L1:wedge:0.35",))
            with open(paths["truth"], encoding="utf-8") as file:
                truth = {v["level"]: v for v in json.load(file)["vertebrae"]}
        return volumeNode, segmentationNode, truth

    def runTest(self):
        self.setUp()
        self.test_PhantomLoadsWithGeometryAndSegmentIDs()
        self.setUp()
        self.test_ScreeningGradesThePhantom()
        self.setUp()
        self.test_PanelScreensThePhantom()

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
        volumeNode, segmentationNode, truth = self.loadWedgePhantom(VertebralFractureScreenLogic())
        result = slicer_nodes.screen_nodes(volumeNode, segmentationNode)
        for row in result.vertebrae:
            if row["complete"]:
                self.assertEqual(row["genant_grade"], truth[row["level"]]["genant_grade"], row["level"])
        self.assertEqual(result.exam["fracture"]["fractured_levels"], ["L1"])
        nodes = slicer_nodes.write_result_nodes(result, slicer.mrmlScene, segmentation_node=segmentationNode)
        self.assertEqual(nodes["vertebrae"].GetNumberOfRows(), len(result.vertebrae))
        self.assertTrue(slicer.mrmlScene.GetFirstNodeByName("L1 Ha"))
        self.delayDisplay("Test passed")

    def test_PanelScreensThePhantom(self):
        """The panel: Apply on a phantom fills the table (L1 graded as the truth says), the summary
        shows the demonstration model's probability marked as such, and a row click centres the views."""
        slicer.util.selectModule("VertebralFractureScreen")
        widget = slicer.modules.vertebralfracturescreen.widgetRepresentation().self()
        volumeNode, segmentationNode, truth = self.loadWedgePhantom(widget.logic)
        parameters = widget._parameterNode
        parameters.inputVolume = volumeNode
        parameters.inputSegmentation = segmentationNode
        parameters.segmentWithTotalSegmentator = False
        parameters.useDemoModel = True
        widget.onApply()
        table = widget.ui.resultsTable
        levels = [table.item(r, 0).text() for r in range(table.rowCount)]
        self.assertIn("L1", levels)
        row = levels.index("L1")
        self.assertEqual(table.item(row, 5).text().rstrip("?"), str(truth["L1"]["genant_grade"]))
        self.assertIn("DEMONSTRATION", widget.ui.summaryLabel.text)
        widget.onRowClicked(row, 0)
        widget.ui.showHeightLinesCheckBox.checked = False
        self.assertFalse(slicer.mrmlScene.GetFirstNodeByName("L1 Ha").GetDisplayNode().GetVisibility())
        self.delayDisplay("Test passed")
