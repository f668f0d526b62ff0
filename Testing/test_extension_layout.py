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


# Which field types Slicer's parameter-node wrapper connects to which widget class: the
# ``canRepresent`` rules of Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, read from
# Slicer's tags v5.8.1 and v5.10.0. Each connector compares the widget's exact class
# (``type(widget) == ...``), so a subclass does not inherit a rule. A type is written as the
# checker below names it: "bool", "int", "float", "str", "Path" (any pathlib class), "FloatRange",
# "QColor", "node" (a vtkMRML...Node class or a Union of them); "+Choice" means the field must be
# annotated with ``Choice``; "Enum" an enum.Enum subclass.
_PATHS = {"Path"}
SLICER_CONNECTOR_RULES = {
    "v5.8.1": {
        "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"}, "QPushButton": {"bool"},
        "QSlider": {"int"}, "QSpinBox": {"int"},
        **{w: {"float"} for w in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
                                  "ctkDoubleSpinBox", "qMRMLSpinBox")},
        "QComboBox": {"int+Choice", "float+Choice", "str+Choice", "bool+Choice", "Enum"},
        "ctkComboBox": {"int+Choice", "float+Choice", "str+Choice", "bool+Choice", "Enum"},
        "QLineEdit": {"str"}, "QLabel": {"str"}, "QTextEdit": {"str"},
        **{w: {"FloatRange"} for w in ("ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget")},
        "ctkPathLineEdit": _PATHS, "ctkDirectoryButton": _PATHS,
        "qMRMLNodeComboBox": {"node"},
    },
}
SLICER_CONNECTOR_RULES["v5.10.0"] = {
    **SLICER_CONNECTOR_RULES["v5.8.1"],
    "ctkCheckablePushButton": {"bool"},
    **{w: {"float", "int"} for w in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
                                     "ctkDoubleSpinBox", "qMRMLSpinBox")},
    "ctkColorPickerButton": {"QColor"},
}


def _field_type(annotation: ast.expr) -> tuple[str, set[str]]:
    """(type name as the rules write it, names of its Annotated extras) of a field annotation."""
    extras: set[str] = set()
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        annotation = elements[0]
        extras = {ast.unparse(e.func if isinstance(e, ast.Call) else e).split(".")[-1] for e in elements[1:]}
    text = ast.unparse(annotation)
    name = text.split(".")[-1]
    if name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        return "Path", extras
    if re.fullmatch(r"vtkMRML\w*Node", name) or (text.startswith(("Union[", "Optional[")) and "vtkMRML" in text):
        return "node", extras
    return name, extras


def binding_problems(fields: dict[str, ast.expr], bound: dict[str, tuple[str, str]], rules: dict) -> list[str]:
    """Each widget bound to a parameter whose type no connector of ``rules`` represents."""
    problems = []
    for widget, (widget_class, parameter) in sorted(bound.items()):
        if parameter not in fields:
            problems.append(f"{widget}: no parameter {parameter}")
            continue
        kind, extras = _field_type(fields[parameter])
        accepted = rules.get(widget_class, set())
        ok = kind in accepted or (f"{kind}+Choice" in accepted and "Choice" in extras)
        if not ok:
            problems.append(f"{widget} ({widget_class}) cannot represent {parameter}: {kind}"
                            f"{' with ' + ', '.join(sorted(extras)) if extras else ''}; it takes "
                            f"{', '.join(sorted(accepted)) or 'nothing'}")
    return problems


def _parameter_fields(source: str) -> dict[str, ast.expr]:
    module = ast.parse(source)
    wrapper = next(node for node in module.body if isinstance(node, ast.ClassDef)
                   and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list))
    return {node.target.id: node.annotation for node in wrapper.body if isinstance(node, ast.AnnAssign)}


def _bound_widgets() -> dict[str, tuple[str, str]]:
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = (widget.get("class"), prop.findtext("string"))
    return bound


@pytest.mark.parametrize("version", sorted(SLICER_CONNECTOR_RULES))
def test_every_bound_widget_can_represent_its_parameter_type(version):
    """connectGui builds a connector for every bound widget before wiring any: one type that no
    connector represents and the whole panel is unbound (Apply never enabled)."""
    fields = _parameter_fields(MODULE_FILE.read_text(encoding="utf-8"))
    bound = _bound_widgets()
    assert {"inputVolume", "inputSegmentation", "modelPath", "quality", "outputTable"} <= {p for _, p in bound.values()}
    assert binding_problems(fields, bound, SLICER_CONNECTOR_RULES[version]) == []


def test_binding_check_rejects_what_slicer_rejects():
    """The check catches the defect it was written for (a str bound to a ctkPathLineEdit) and a
    QComboBox without Choice, and accepts their fixes."""
    rules = SLICER_CONNECTOR_RULES["v5.8.1"]
    fields = _parameter_fields("@parameterNodeWrapper\nclass P:\n    a: str = ''\n    b: pathlib.Path\n"
                               "    c: str = 'x'\n    d: Annotated[str, Choice(['x'])] = 'x'\n")
    bound = {"w1": ("ctkPathLineEdit", "a"), "w2": ("ctkPathLineEdit", "b"), "w3": ("QComboBox", "c"),
             "w4": ("QComboBox", "d")}
    problems = binding_problems(fields, bound, rules)
    assert [p.split(" ")[0] for p in problems] == ["w1", "w3"]


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
    """Screening needs only what Slicer bundles; each optional action's requirements file lists
    its packages with the minimum versions of pyproject.toml, and the missing-package check reads it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11 (Slicer 5.8's 3.9)
        tomllib = pytest.importorskip("tomli", reason="tomllib needs Python 3.11, tomli is not installed")

    from VertebralFractureScreenLib.dependencies import missing_modules, missing_requirements, read_requirements

    bundled_with_slicer = {"numpy", "scipy", "simpleitk"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    minimum = {re.split(r"[<>=!~ ;\[]", d)[0].lower(): d.split(";")[0].replace(" ", "") for d in project["dependencies"]}
    listed = {name: read_requirements(MODULE_DIR / "Resources" / name)
              for name in ("requirements-qc.txt", "requirements-training.txt")}
    assert listed == {"requirements-qc.txt": [minimum["matplotlib"]],
                      "requirements-training.txt": [minimum["scikit-learn"]]}
    assert set(minimum) - bundled_with_slicer == {"matplotlib", "scikit-learn"}
    for requirements in listed.values():
        assert missing_requirements(requirements) == []  # all installed here
    assert missing_requirements(["numpy>=1.0", "numpy>=999", "surely-not-a-package-here>=1"]) == [
        "numpy>=999", "surely-not-a-package-here>=1"]
    assert missing_modules(["numpy", "surely_not_a_module_here"]) == ["surely_not_a_module_here"]
