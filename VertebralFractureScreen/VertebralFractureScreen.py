"""3D Slicer module: opportunistic vertebral fracture screening on CT.

A thin shell: the measurements, the node logic and the segmentation job live in
``VertebralFractureScreenLib`` (plain Python, no Qt), which also runs headless and is tested there.
Only this file imports Qt, CTK and Slicer's GUI classes. It runs on Slicer 5.8 (Python 3.9) and
5.10 (Python 3.12).
"""

import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
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

QC_REQUIREMENTS_FILE = "requirements-qc.txt"
"""Python packages the QC picture needs beyond what Slicer bundles (in the module's Resources);
screening itself needs only what Slicer bundles (numpy, scipy, SimpleITK, VTK)."""


#
# VertebralFractureScreen
#


class VertebralFractureScreen(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Vertebral Fracture Screen")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []  # TotalSegmentator is optional: an existing segmentation works too
        self.parent.contributors = ["VertebralFractureScreen developers"]
        self.parent.helpText = _("""
Opportunistic screening for osteoporotic vertebral fractures on CT scans taken for another reason.
The CT is segmented with TotalSegmentator (or an existing segmentation with TotalSegmentator segment
IDs, terminology, or label values is used); each vertebra gets anterior, middle and posterior body
heights, a Genant grade and shape, and trabecular bone attenuation; paraspinal muscles are measured
per level; a multiparametric model (optional) gives the probability of a fragility fracture.
Results go into one subject-hierarchy folder per exam. Click a row of the results to show that
vertebra in its own sagittal plane.
Use <b>Make phantom</b> to create a synthetic spine CT (T12-L2) whose anatomy is exactly known.
""")
        self.parent.acknowledgementText = _("""
Segmentation by TotalSegmentator: Wasserthal J, Breit H-C, Meyer MT, et al. TotalSegmentator:
robust segmentation of 104 anatomic structures in CT images. Radiology: Artificial Intelligence
2023;5(5):e230024. https://doi.org/10.1148/ryai.230024.
Semi-quantitative grading after Genant HK et al., J Bone Miner Res 1993;8(9):1137-1148.
""")


#
# Parameter node
#


@parameterNodeWrapper
class VertebralFractureScreenParameterNode:
    """The panel's settings, saved with the scene. Each field's type must be one that Slicer's
    parameter-node wrapper connects to its widget's class (Testing/test_extension_layout.py checks
    this against Slicer's connector rules): ``pathlib.Path`` for a ``ctkPathLineEdit``, a
    ``Choice``-annotated ``str`` for a ``QComboBox``, ``bool`` for a ``QCheckBox``, a node class for
    a ``qMRMLNodeComboBox``."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    segmentWithTotalSegmentator: bool = False
    quality: Annotated[str, Choice(["fast", "normal"])] = "fast"
    cpu: bool = False
    modelPath: pathlib.Path  # Path() (".") when no model file is chosen
    useDemoModel: bool = False
    showHeightLines: bool = True
    colorInputSegments: bool = False
    outputTable: vtkMRMLTableNode
    outputSegmentation: vtkMRMLSegmentationNode


#
# VertebralFractureScreenWidget
#


class VertebralFractureScreenWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: wires the .ui widgets to the library (``VertebralFractureScreenLib``)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._result = None  # the ScreeningResult of this session (None after a scene is reopened)
        self._made = None  # its ResultNodes
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
        columns = self.logic.panelColumns()
        self.ui.resultsTable.setColumnCount(len(columns))
        self.ui.resultsTable.setHorizontalHeaderLabels(columns)
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        hasTotalSegmentator = self.logic.totalSegmentatorAvailable()
        self.ui.totalSegmentatorStatusLabel.visible = not hasTotalSegmentator
        self.ui.segmentWithTotalSegmentatorCheckBox.enabled = hasTotalSegmentator

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.makePhantomButton.connect("clicked(bool)", self.onMakePhantom)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.viewTableButton.connect("clicked(bool)", self.onViewTable)
        self.ui.showHeightLinesCheckBox.connect("toggled(bool)", self.onShowHeightLines)
        self.ui.resultsTable.connect("cellClicked(int,int)", self.onRowClicked)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self.showStoredResult()

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
        self.clearResult()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A scene was loaded: show the results saved in it (the table and Export come back)."""
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.showStoredResult()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.inputSegmentation:
            self._parameterNode.inputSegmentation = self.logic.firstInputSegmentation()

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, *args):
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
        self.ui.applyButton.toolTip = (_("Screen the selected CT for vertebral fractures.") if ready else
                                       _("Select a CT and a segmentation (or run TotalSegmentator)."))
        self.ui.cancelButton.enabled = self._running
        hasResult = self._made is not None
        self.ui.exportButton.enabled = hasResult and not self._running
        self.ui.viewTableButton.enabled = hasResult and not self._running
        self.ui.showHeightLinesCheckBox.enabled = hasResult

    def onInputVolumeChanged(self, volumeNode):
        """Another CT: output nodes that hold another exam's results are not overwritten; new ones
        are made for this exam (a node the user picks afterwards is used as chosen)."""
        p = self._parameterNode
        if p is None or volumeNode is None:
            return
        for name in ("outputTable", "outputSegmentation"):
            node = getattr(p, name)
            if node is not None and not self.logic.belongsToExam(node, volumeNode):
                setattr(p, name, None)
        self.showStoredResult(volumeNode)

    # -- running ----------------------------------------------------------------------------------

    def _step(self, text, percent):
        """Show progress and give Cancel a chance."""
        self.ui.progressBar.value = percent
        self.ui.progressLabel.text = text
        slicer.app.processEvents()
        if self._cancelRequested:
            raise ScreeningCancelled()

    def appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def onCancel(self):
        self._cancelRequested = True
        self.ui.progressLabel.text = _("Cancelling...")

    def onApply(self):
        from VertebralFractureScreenLib.segment.job import SegmentationCancelled

        p = self._parameterNode
        self._cancelRequested, self._running = False, True
        self.ui.progressBar.visible = True
        self.updateGUI()
        try:
            with slicer.util.tryWithErrorDisplay(_("Screening failed."), waitCursor=False):
                try:
                    segmentationNode = p.inputSegmentation
                    if p.segmentWithTotalSegmentator and self.logic.totalSegmentatorAvailable():
                        segmentationNode = self.segment()
                        if segmentationNode is None:
                            return
                        # The new segmentation is now the input: Apply again measures, not segments.
                        p.inputSegmentation, p.segmentWithTotalSegmentator = segmentationNode, False
                    self._step(_("Measuring heights, bone attenuation and muscles..."), 60)
                    with slicer.util.WaitCursor():
                        result, made = self.logic.screen(
                            p.inputVolume, segmentationNode, model=self.modelChoice(), vertebraeTable=p.outputTable,
                            gradesSegmentation=p.outputSegmentation, colorInputSegments=p.colorInputSegments,
                            showHeightLines=p.showHeightLines)
                    p.outputTable, p.outputSegmentation = made.vertebrae, made.grades
                    self._step(_("Showing the results..."), 90)
                    self.showResult(result, made)
                    self._step(_("Done."), 100)
                except (ScreeningCancelled, SegmentationCancelled):
                    self.ui.progressLabel.text = _("Cancelled: nothing was added to the scene.")
        finally:
            self._running = False
            self.ui.progressBar.visible = False
            self.updateGUI()

    def segment(self):
        """Segment the CT with TotalSegmentator in a child process (Slicer stays responsive, the log
        shows below, Cancel stops it). Returns the new segmentation node, or None when the user
        declined an install or a download. Weights are downloaded only after the user agreed."""
        from VertebralFractureScreenLib.errors import WeightsMissingError

        p = self._parameterNode
        if not self.ensureTotalSegmentatorPython():
            return None
        self.ui.logTextEdit.clear()
        self.ui.logTextEdit.visible = True
        for download in (False, True):
            self._step(_("Segmenting with TotalSegmentator (Cancel stops it)..."), 5)
            try:
                return self.logic.segment(p.inputVolume, quality=p.quality, cpu=p.cpu, download=download,
                                          log=self.appendLog, processEvents=slicer.app.processEvents,
                                          cancelled=lambda: self._cancelRequested)
            except WeightsMissingError as error:
                if download or not slicer.util.confirmOkCancelDisplay(_(
                        "TotalSegmentator's model weights for this task are not on this computer. Download "
                        "them now (several hundred MB)? They are published by the TotalSegmentator authors "
                        "(https://github.com/wasserth/TotalSegmentator) under their licence terms; the "
                        "'total' and 'vertebrae_body' tasks used here are open (Apache-2.0)."),
                        detailedText=str(error)):
                    return None
        return None

    def ensureTotalSegmentatorPython(self):
        """TotalSegmentator's Python packages, installed through the TotalSegmentator extension's own
        logic after asking (it knows which PyTorch suits this computer)."""
        def install(missing):
            self.ui.logTextEdit.clear()
            self.ui.logTextEdit.visible = True
            self._step(_("Installing TotalSegmentator's Python packages..."), 2)
            self.logic.installTotalSegmentatorPython(log=self.appendLog)

        return self.askAndInstall(
            self.logic.missingTotalSegmentatorPackages,
            _("TotalSegmentator's Python packages are not installed in Slicer's Python ({missing}). Install "
              "them now through the TotalSegmentator extension? This downloads PyTorch and TotalSegmentator "
              "(several GB) and can take many minutes."), install)

    def askAndInstall(self, missingPackages, question, install):
        """True when nothing of ``missingPackages()`` is missing, after installing it with
        ``install(missing)`` if the user agrees to ``question``; False when declined or failed."""
        missing = missingPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(question.format(missing=", ".join(missing))):
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed."), waitCursor=True):
            install(missing)
        return not missingPackages()

    def modelChoice(self):
        """The model the panel asks for: ``"demo"``, a model file, or None."""
        p = self._parameterNode
        if p.useDemoModel:
            return "demo"
        path = str(p.modelPath).strip()
        return None if path in ("", ".") else path

    # -- results ----------------------------------------------------------------------------------

    def clearResult(self):
        self._result, self._made, self._rows = None, None, []
        self.ui.resultsTable.setRowCount(0)
        self.ui.summaryLabel.text = _("No results yet.")
        self.updateGUI()

    def showStoredResult(self, volumeNode=None):
        """Show the result saved in the scene for ``volumeNode`` (default: the input CT)."""
        volumeNode = volumeNode or (self._parameterNode.inputVolume if self._parameterNode else None)
        made = self.logic.storedResult(volumeNode)
        if made is None:
            self.clearResult()
            return
        self.showResult(None, made)

    def showResult(self, result, made):
        """Fill the results table (coloured by grade) and the exam summary from the result nodes."""
        from VertebralFractureScreenLib import slicer_results

        self._result, self._made = result, made
        rows = slicer_results.rows_from_table(made.vertebrae, self.logic.vertebraColumns())
        self._rows = slicer_results.panel_rows(rows)
        table = self.ui.resultsTable
        table.setRowCount(len(self._rows))
        for r, row in enumerate(self._rows):
            color = qt.QColor.fromRgbF(*row["color"], 0.35)
            for c, text in enumerate(row["cells"]):
                item = qt.QTableWidgetItem(text)
                item.setBackground(qt.QBrush(color))
                table.setItem(r, c, item)
        restored = slicer_results.restore_result(made) if result is None else result
        self.ui.summaryLabel.text = restored.summary() if restored.exam else made.name
        self.updateGUI()

    def onRowClicked(self, row, column):
        """Show the vertebra of the clicked row: views centred on it, the sagittal view in its own
        mid-sagittal plane, its segment highlighted."""
        if self._made is None or row >= len(self._rows):
            return
        self.logic.jumpToVertebra(self._made, self._rows[row]["level"])

    def onShowHeightLines(self, visible):
        if self._made is not None:
            self.logic.setHeightLinesVisible(visible, self._made.key)

    def onViewTable(self):
        if self._made is not None:
            self.logic.showTable(self._made.vertebrae)

    def onExport(self):
        """Write vertebrae.csv, muscles.csv, exam.json and (when possible) qc.png to a folder."""
        if self._made is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export screening results"))
        if not folder:
            return
        qc = self._result is not None and self.ensureQcRequirements()
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.export(self._result, self._made, folder, qc=qc)
            note = "" if "qc.png" in written else _(" (no qc.png: it needs matplotlib and the measurements of "
                                                     "this session; press Apply to make it)")
            if self._result is not None:
                note += self.logic.exportToDicomDatabase(self._result, self._parameterNode.inputVolume, folder)
            self.ui.progressLabel.text = _("Results written to {folder}").format(folder=folder) + note

    def ensureQcRequirements(self):
        """matplotlib (for the QC picture only), installed after asking; False when declined."""
        return self.askAndInstall(
            self.logic.missingQcRequirements,
            _("The QC picture needs these Python packages, which are not installed in Slicer's Python: "
              "{missing}. Install them now (from PyPI)? Without them the tables and exam.json are exported "
              "without the picture."), self.logic.installPackages)

    def onMakePhantom(self):
        """Write a phantom to a new temporary folder and show it."""
        with slicer.util.tryWithErrorDisplay(_("Failed to make the phantom."), waitCursor=True):
            outDir = tempfile.mkdtemp(prefix="VertebralFractureScreenPhantom-")
            volumeNode, segmentationNode, _paths = self.logic.loadPhantom(outDir, fractures=("L1:wedge:0.35",))
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.inputSegmentation = segmentationNode
            self._parameterNode.segmentWithTotalSegmentator = False
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.ui.summaryLabel.text = _("Phantom ({levels}, L1 wedge fracture) written to {folder}").format(
                levels=", ".join(PHANTOM_LEVELS), folder=outDir)


class ScreeningCancelled(Exception):
    """The user pressed Cancel; raised between steps."""


#
# VertebralFractureScreenLogic
#


class VertebralFractureScreenLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: moves data between MRML nodes and ``VertebralFractureScreenLib``; every
    measurement is the library's (``slicer_nodes``, ``slicer_results``), the same engine as
    ``vfscreen screen``."""

    def getParameterNode(self):
        return VertebralFractureScreenParameterNode(super().getParameterNode())

    # -- packages ---------------------------------------------------------------------------------

    @staticmethod
    def resourcesPath(name):
        return os.path.join(os.path.dirname(__file__), "Resources", name)

    def missingQcRequirements(self):
        """Requirements of Resources/requirements-qc.txt that Slicer's Python does not satisfy."""
        from VertebralFractureScreenLib.dependencies import missing_requirements, read_requirements

        return missing_requirements(read_requirements(self.resourcesPath(QC_REQUIREMENTS_FILE)))

    @staticmethod
    def installPackages(requirements):
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
        """The TotalSegmentator extension is installed (it brings the Python packages on request)."""
        return hasattr(slicer.modules, "totalsegmentator")

    @staticmethod
    def missingTotalSegmentatorPackages():
        from VertebralFractureScreenLib.dependencies import missing_modules

        return missing_modules(("torch", "nnunetv2", "totalsegmentator"))

    @staticmethod
    def installTotalSegmentatorPython(log=None):
        """Install TotalSegmentator, nnU-Net and a PyTorch for this computer through the
        TotalSegmentator extension's own ``setupPythonRequirements`` (as its panel does)."""
        import TotalSegmentator

        logic = TotalSegmentator.TotalSegmentatorLogic()
        logic.logCallback = log
        try:
            logic.setupPythonRequirements()
        except Exception as error:  # the extension's InstallError says whether Slicer must restart
            if getattr(error, "restartRequired", False):
                slicer.util.infoDisplay(_("Slicer must be restarted to finish installing TotalSegmentator: "
                                          "{error}").format(error=error))
            raise

    # -- screening --------------------------------------------------------------------------------

    @staticmethod
    def panelColumns():
        from VertebralFractureScreenLib import slicer_results

        return [title for title, _key in slicer_results.PANEL_COLUMNS]

    @staticmethod
    def vertebraColumns():
        from VertebralFractureScreenLib.exam.screening import VERTEBRA_COLUMNS

        return VERTEBRA_COLUMNS

    @staticmethod
    def firstInputSegmentation():
        """The first segmentation in the scene that is not one of this module's results."""
        from VertebralFractureScreenLib import slicer_results

        nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if not node.GetAttribute(slicer_results.RESULT_ATTRIBUTE):
                return node
        return None

    @staticmethod
    def segment(volumeNode, quality="fast", cpu=False, download=False, log=None, processEvents=None, cancelled=None):
        """Segment with TotalSegmentator in a child process into a new segmentation node; nothing is
        added to the scene when it fails or is cancelled."""
        from VertebralFractureScreenLib import slicer_segmentation

        return slicer_segmentation.segment_volume_node(
            volumeNode, quality=quality, device="cpu" if cpu else "gpu" if _hasCuda() else "cpu", download=download,
            python=shutil.which("PythonSlicer") or sys.executable, log=log, process_events=processEvents,
            cancelled=cancelled)

    @staticmethod
    def screen(volumeNode, segmentationNode, model=None, bodySegmentationNode=None, vertebraeTable=None,
               gradesSegmentation=None, colorInputSegments=False, showHeightLines=True):
        """Screen the CT on its segmentation and show the result; returns the library's
        ``(ScreeningResult, ResultNodes)``."""
        from VertebralFractureScreenLib import slicer_nodes

        return slicer_nodes.screen_into_scene(
            volumeNode, segmentationNode, body_segmentation_node=bodySegmentationNode, model=model,
            vertebrae_table=vertebraeTable, grades_segmentation=gradesSegmentation,
            color_input_segments=colorInputSegments, show_height_lines=showHeightLines)

    @staticmethod
    def belongsToExam(node, volumeNode):
        from VertebralFractureScreenLib import slicer_results

        key = node.GetAttribute(slicer_results.EXAM_ATTRIBUTE)
        return key is None or key == slicer_results.exam_key(volumeNode)

    @staticmethod
    def storedResult(volumeNode=None):
        """The result nodes in the scene for ``volumeNode`` (else the last result), or None."""
        from VertebralFractureScreenLib import slicer_results

        results = slicer_results.find_results(slicer.mrmlScene)
        if volumeNode is not None and slicer_results.exam_key(volumeNode) in results:
            return results[slicer_results.exam_key(volumeNode)]
        return list(results.values())[-1] if results and volumeNode is None else None

    @staticmethod
    def export(result, made, folder, qc=True):
        """Write the exam's files; from the table and record nodes when ``result`` is None (a
        reopened scene), without the QC picture then."""
        from VertebralFractureScreenLib import slicer_results

        if result is None:
            return slicer_results.restore_result(made).write(folder, qc=False)
        return result.write(folder, qc=qc)

    @staticmethod
    def exportToDicomDatabase(result, volumeNode, folder):
        """When the CT came from Slicer's DICOM database: its SEG, SR, QC capture and KOS written
        into ``folder/dicom`` against the CT's own files and imported into the database, where
        QuantitativeReporting shows them. Returns a note for the panel ("" when not from DICOM)."""
        from VertebralFractureScreenLib import slicer_dicom
        from VertebralFractureScreenLib.errors import DependencyError

        database = getattr(slicer, "dicomDatabase", None)
        if volumeNode is None or database is None or not database.isOpen:
            return ""
        from DICOMLib import DICOMUtils

        try:
            written = slicer_dicom.export_to_dicom_database(
                result, volumeNode, folder, database.fileForInstance,
                lambda path: DICOMUtils.importDicom(path, database))
        except DependencyError as error:  # highdicom/pydicom missing from Slicer's Python
            return _("; DICOM results not written: {error}").format(error=error)
        return _("; DICOM SEG, SR, QC capture and KOS added to the DICOM database") if written else ""

    @staticmethod
    def jumpToVertebra(made, level):
        from VertebralFractureScreenLib import slicer_results

        return slicer_results.jump_to_vertebra(slicer.mrmlScene, made, level)

    @staticmethod
    def setHeightLinesVisible(visible, key=None):
        from VertebralFractureScreenLib import slicer_results

        return slicer_results.set_height_lines_visible(slicer.mrmlScene, visible, key)

    @staticmethod
    def showTable(tableNode):
        from VertebralFractureScreenLib import slicer_results

        return slicer_results.show_table(slicer.mrmlScene, tableNode, slicer.app.applicationLogic())

    # -- console batch and phantom ----------------------------------------------------------------

    def screenFiles(self, inputs, outputFolder, workers=1, progress=None, cancel=None, **settings):
        """Batch from Slicer's Python console: the ``vfscreen cohort`` engine on a folder, a CSV
        manifest or a list of CT files (segmentations found beside them by name). Returns the
        cohort summary; results go to ``outputFolder`` (one folder per exam, features.csv)."""
        from VertebralFractureScreenLib import cohort

        return cohort.run_cohort(inputs, outputFolder, workers=workers, progress=progress, cancel=cancel,
                                 settings=cohort.CohortSettings(**settings))

    def writePhantom(self, outDir, levels=PHANTOM_LEVELS, spacing=(1.0, 1.0, 1.0), fractures=()):
        """Write the library's phantom to ``outDir``; returns its paths keyed ct, total, truth, ...
        ``fractures``: texts such as ``"L1:wedge:0.35"``."""
        from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom

        spec = PhantomSpec(levels=tuple(levels), spacing=tuple(spacing),
                           fractures=tuple(Fracture.parse(text) for text in fractures))
        return write_phantom(spec, outDir)

    def loadPhantom(self, outDir, levels=PHANTOM_LEVELS, spacing=(1.0, 1.0, 1.0), fractures=()):
        """Write a phantom and load its CT and TotalSegmentator segmentation into the scene.
        Returns the volume node, the segmentation node and the written paths."""
        from VertebralFractureScreenLib import slicer_segmentation

        paths = self.writePhantom(outDir, levels, spacing, fractures)
        volumeNode = slicer.util.loadVolume(str(paths["ct"]), {"name": "PhantomCT"})
        segmentationNode = slicer_segmentation.load_total_segmentation(
            slicer.mrmlScene, paths["total"], volumeNode, "PhantomSegmentation")
        return volumeNode, segmentationNode, paths


def _hasCuda():
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


#
# VertebralFractureScreenTest
#


class VertebralFractureScreenTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (and by ctest through slicer_add_python_unittest). It needs no
    network: a step whose package is missing is skipped with a message saying so."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    @staticmethod
    def loadWedgePhantom(logic):
        """A T11–L3 phantom at 2 mm with an L1 wedge fracture, loaded; returns the volume and
        segmentation nodes and the truth per level."""
        with tempfile.TemporaryDirectory() as outDir:
            volumeNode, segmentationNode, paths = logic.loadPhantom(
                outDir, levels=("T11", "T12", "L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), fractures=("L1:wedge:0.35",))
            with open(paths["truth"], encoding="utf-8") as file:
                truth = {v["level"]: v for v in json.load(file)["vertebrae"]}
        return volumeNode, segmentationNode, truth

    def runTest(self):
        for test in (self.test_PanelBindsItsParameters, self.test_PhantomLoadsWithGeometryAndSegmentIDs,
                     self.test_PanelScreensThePhantom, self.test_TotalSegmentatorPath):
            self.setUp()
            test()

    def test_PanelBindsItsParameters(self):
        """Every widget is bound to its parameter (connectGui raises otherwise) and Apply is enabled
        once a CT and a segmentation are selected."""
        slicer.util.selectModule("VertebralFractureScreen")
        widget = slicer.modules.vertebralfracturescreen.widgetRepresentation().self()
        self.assertIsNotNone(widget._parameterNodeGuiTag)
        volumeNode, segmentationNode, _truth = self.loadWedgePhantom(widget.logic)
        widget._parameterNode.inputVolume = volumeNode
        widget._parameterNode.inputSegmentation = segmentationNode
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.ui.qualityComboBox.currentIndex = 1
        self.assertEqual(widget._parameterNode.quality, "normal")

    def test_PhantomLoadsWithGeometryAndSegmentIDs(self):
        """Slicer's readers see the phantom where the library put it, with TotalSegmentator IDs."""
        self.delayDisplay("Making and loading a phantom")
        logic = VertebralFractureScreenLogic()
        with tempfile.TemporaryDirectory() as outDir:
            volumeNode, segmentationNode, paths = logic.loadPhantom(outDir, spacing=(2.0, 2.0, 2.0))
            with open(paths["truth"], encoding="utf-8") as file:
                expected = np.array(json.load(file)["grid"]["ijk_to_ras"], dtype=float)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), expected, atol=1e-4)
        segmentation = segmentationNode.GetSegmentation()
        segmentIDs = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        for level in PHANTOM_LEVELS:
            self.assertIn(f"vertebrae_{level}", segmentIDs)
        self.delayDisplay("Test passed")

    def test_PanelScreensThePhantom(self):
        """Apply on a phantom fills the table (L1 graded as the truth says) and the summary (the
        demonstration model marked as such); a row click shows the vertebra; the height-line
        toggle and the table view work; Apply again leaves no extra nodes."""
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
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        widget.onApply()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        widget.onRowClicked(row, 0)
        widget.ui.showHeightLinesCheckBox.checked = False
        self.assertFalse(widget._made.lines["L1 Ha"].GetDisplayNode().GetVisibility())
        widget.onViewTable()
        self.delayDisplay("Test passed")

    def test_TotalSegmentatorPath(self):
        """Segmentation in a child process, when TotalSegmentator and its weights are installed."""
        logic = VertebralFractureScreenLogic()
        if not logic.totalSegmentatorAvailable() or logic.missingTotalSegmentatorPackages():
            self.delayDisplay("Skipped: TotalSegmentator (extension or Python packages) is not installed")
            return
        from VertebralFractureScreenLib.errors import WeightsMissingError

        volumeNode, _segmentation, _truth = self.loadWedgePhantom(logic)
        lines = []
        try:
            segmentationNode = logic.segment(volumeNode, quality="fast", cpu=True, log=lines.append)
        except WeightsMissingError:
            self.delayDisplay("Skipped: TotalSegmentator's weights are not on this computer (no download in tests)")
            return
        self.assertIsNotNone(segmentationNode.GetSegmentation().GetSegment("vertebrae_L1"))
        self.assertTrue(lines)
        self.delayDisplay("Test passed")
