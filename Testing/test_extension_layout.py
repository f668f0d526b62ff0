"""The Slicer extension's shell is consistent: the CMake lists name every file the module needs,
the panel's .ui defines every widget the module uses, and the library stays free of Qt."""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_NAME = "VertebralFractureScreen"
MODULE_DIR = ROOT / MODULE_NAME
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
LIB_DIR = MODULE_DIR / f"{MODULE_NAME}Lib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"

GUI_MODULES = ("qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule")
"""Imports that need the Slicer application; only the module file may use them."""


def cmake_list(text: str, variable: str) -> list[str]:
    """Items of ``set(VARIABLE item ...)`` in a CMakeLists, with ``${MODULE_NAME}`` expanded."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{variable}\s+([^)]*)\)", text)
    assert match, f"{variable} is not set in the module's CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", MODULE_NAME) for item in match.group(1).split()]


def lib_files() -> list[Path]:
    return sorted(p for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, anywhere in it (``from a.b import c`` gives ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def is_gui_module(name: str) -> bool:
    return any(name == gui or name.startswith(gui + ".") for gui in GUI_MODULES)


@pytest.fixture(scope="module")
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)  # raises on invalid XML


def test_ui_is_a_qmrmlwidget_with_declared_custom_widgets(ui_tree):
    root = ui_tree.getroot()
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"custom widgets without a <customwidget> entry: {sorted(custom - declared)}"


def test_every_widget_the_module_uses_is_in_the_ui(ui_tree):
    names = {w.get("name") for w in ui_tree.getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no self.ui widgets: the pattern is out of date"
    assert used <= names, f"widgets missing from {UI_FILE.name}: {sorted(used - names)}"


def test_module_cmakelists_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    expected_scripts = [MODULE_FILE.name] + [p.relative_to(MODULE_DIR).as_posix() for p in lib_files()]
    expected_resources = [
        p.relative_to(MODULE_DIR).as_posix()
        for p in (MODULE_DIR / "Resources").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    ]
    unlisted = sorted(set(expected_scripts) - set(scripts))
    assert not unlisted, f"add to MODULE_PYTHON_SCRIPTS in {MODULE_NAME}/CMakeLists.txt: {unlisted}"
    unlisted = sorted(set(expected_resources) - set(resources))
    assert not unlisted, f"add to MODULE_PYTHON_RESOURCES in {MODULE_NAME}/CMakeLists.txt: {unlisted}"
    missing = [item for item in scripts + resources if not (MODULE_DIR / item).is_file()]
    assert not missing, f"listed in CMakeLists.txt but absent: {missing}"
    for call in ("slicerMacroBuildScriptedModule", "WITH_GENERIC_TESTS", "slicer_add_python_unittest"):
        assert call in text


def test_extension_cmakelists_declares_the_extension():
    text = re.sub(r"#[^\n]*", "", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"?[^)]*\bTotalSegmentator\b', text)
    assert re.search(r'set\(\s*EXTENSION_CATEGORY\s+"Quantification"\s*\)', text)
    for line in ("project(VertebralFractureScreen)", "find_package(Slicer REQUIRED)",
                 f"add_subdirectory({MODULE_NAME})", "${Slicer_EXTENSION_CPACK}"):
        assert line in text


def test_library_imports_no_qt_and_no_slicer_application():
    module_imports = imported_modules(MODULE_FILE)
    assert {"qt", "slicer.ScriptedLoadableModule"} <= module_imports  # the check below is meaningful
    offenders = {}
    for path in lib_files():
        source = path.read_text(encoding="utf-8")
        bad = sorted(name for name in imported_modules(path) if is_gui_module(name))
        bad += ["slicer.app"] if re.search(r"\bslicer\.app\b", source) else []
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"the library must run without Qt: {offenders}"


@pytest.mark.parametrize("path", [MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png",
                                  ROOT / "Resources" / f"{MODULE_NAME}.png"])
def test_icons_are_128_pixel_pngs(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


def test_every_parameter_the_ui_binds_is_in_the_parameter_node():
    """The parameter node wrapper connects widgets by their SlicerParameterName property."""
    tree = ET.parse(UI_FILE)
    bound = {}
    for widget in tree.getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(node for node in module.body if isinstance(node, ast.ClassDef)
                   and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list))
    fields = {node.target.id for node in wrapper.body if isinstance(node, ast.AnnAssign)}
    assert bound and set(bound.values()) <= fields, sorted(set(bound.values()) - fields)
    assert {"inputVolume", "inputSegmentation", "segmentWithTotalSegmentator", "quality", "cpu", "modelPath",
            "showHeightLines"} <= set(bound.values())


def test_slicer_requirements_match_the_package_dependencies():
    """Resources/requirements.txt lists every dependency of pyproject.toml that Slicer does not
    bundle, with the same minimum version, and the missing-package check reads it."""
    import tomllib

    from VertebralFractureScreenLib.dependencies import missing_requirements, read_requirements

    bundled_with_slicer = {"numpy", "simpleitk"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = sorted(d.split(";")[0].replace(" ", "") for d in project["dependencies"]
                      if re.split(r"[<>=!~ ;\[]", d)[0].lower() not in bundled_with_slicer)
    listed = read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert sorted(listed) == expected
    assert missing_requirements(listed) == []  # all installed here
    assert missing_requirements(["numpy>=1.0", "numpy>=999", "surely-not-a-package-here>=1"]) == [
        "numpy>=999", "surely-not-a-package-here>=1"]
