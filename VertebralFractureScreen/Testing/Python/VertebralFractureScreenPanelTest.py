"""The panel in a real 3D Slicer (ctest: slicer_add_python_unittest; or Slicer's Python console:
``slicer.util.selectModule("VertebralFractureScreen")`` then run this file).

What the headless suite (pytest on the ``slicer-core`` wheel, Testing/) cannot reach: Qt widgets,
the parameter-node wrapper's GUI connectors, Slicer's scene IO manager. Needs no network.
"""

import os
import tempfile
import unittest

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class VertebralFractureScreenPanelTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("VertebralFractureScreen")
        self.widget = slicer.modules.vertebralfracturescreen.widgetRepresentation().self()
        self.folder = tempfile.mkdtemp(prefix="VertebralFractureScreenPanelTest-")

    def runTest(self):
        for test in (self.test_every_parameter_is_bound, self.test_scene_hygiene_and_saved_scene):
            self.setUp()
            test()

    def loadPhantom(self, name):
        volumeNode, segmentationNode, _paths = self.widget.logic.loadPhantom(
            os.path.join(self.folder, name), levels=("T12", "L1", "L2"), spacing=(2.0, 2.0, 2.0),
            fractures=("L1:wedge:0.35",))
        volumeNode.SetName(name)
        return volumeNode, segmentationNode

    def test_every_parameter_is_bound(self):
        """connectGui binds every widget (it raises on a type its connectors do not represent)."""
        self.assertIsNotNone(self.widget._parameterNodeGuiTag)
        volumeNode, segmentationNode = self.loadPhantom("A")
        p = self.widget._parameterNode
        p.inputVolume, p.inputSegmentation = volumeNode, segmentationNode
        self.assertTrue(self.widget.ui.applyButton.enabled)
        self.widget.ui.modelPathLineEdit.currentPath = os.path.join(self.folder, "model.json")
        self.assertEqual(str(p.modelPath), os.path.join(self.folder, "model.json"))
        self.widget.ui.cpuCheckBox.checked = True
        self.assertTrue(p.cpu)

    def test_scene_hygiene_and_saved_scene(self):
        """Three Applies on one CT and one on another leave exactly one result per CT; the input
        segmentation is unchanged; a saved scene gives the table and the export back."""
        p = self.widget._parameterNode
        a, segA = self.loadPhantom("A")
        colours = [tuple(segA.GetSegmentation().GetNthSegment(i).GetColor())
                   for i in range(segA.GetSegmentation().GetNumberOfSegments())]
        p.inputVolume, p.inputSegmentation = a, segA
        for _run in range(3):
            self.widget.onApply()
        counts = slicer.mrmlScene.GetNumberOfNodes()
        self.widget.onApply()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), counts)
        b, segB = self.loadPhantom("B")
        p.inputVolume, p.inputSegmentation = b, segB
        self.assertIsNone(p.outputTable)  # A's table is not overwritten by B
        self.widget.onApply()
        from VertebralFractureScreenLib import slicer_results

        self.assertEqual(sorted(made.name for made in slicer_results.find_results(slicer.mrmlScene).values()),
                         ["A", "B"])
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems(), 0)
        self.assertEqual([tuple(segA.GetSegmentation().GetNthSegment(i).GetColor())
                          for i in range(segA.GetSegmentation().GetNumberOfSegments())], colours)

        exported = os.path.join(self.folder, "before")
        self.widget.logic.export(None, self.widget._made, exported)
        scenePath = os.path.join(self.folder, "scene.mrb")
        self.assertTrue(slicer.util.saveScene(scenePath))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(scenePath)
        self.assertEqual(self.widget.ui.resultsTable.rowCount, 3)
        again = os.path.join(self.folder, "after")
        self.widget.logic.export(None, self.widget._made, again)
        for name in ("vertebrae.csv", "muscles.csv", "exam.json"):
            with open(os.path.join(exported, name)) as one, open(os.path.join(again, name)) as other:
                self.assertEqual(one.read(), other.read(), name)


if __name__ == "__main__":
    unittest.main()
