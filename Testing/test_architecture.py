"""The library's layers (``docs/architecture.md``), enforced on the source: which part may import
which, where Slicer, Qt, argparse and SimpleITK may appear, and how long modules and functions
may grow. Read from the files with :mod:`ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "VertebralFractureScreen" / "VertebralFractureScreenLib"
PACKAGE = "VertebralFractureScreenLib"

LAYERS = {
    "base": 0,  # errors, levels, geometry, anatomy: names, frames and the errors everyone raises
    "io": 1,  # files in and out
    "measure": 1,  # pure measurements from arrays and an IJK→RAS matrix
    "report": 2,  # the measurement registry, the QC picture, agreement statistics
    "model": 3,  # features, the fracture model, training
    "segment": 3,  # TotalSegmentator
    "exam": 4,  # one exam end to end
    "phantom": 4,  # the synthetic spine (its truth uses the measurement definitions)
    "face": 5,  # cli, cohort, slicer_*, dependencies: what users and Slicer call
}
FACES = {"cli", "cohort", "pacs", "slicer_nodes", "slicer_results", "slicer_segmentation", "slicer_dicom", "dependencies"}
PEERS_APART = {("measure", "io"), ("io", "measure")}
"""Parts on one layer that must not import each other: a measurement reads no file, a reader
measures nothing."""
FACE_ONLY_IMPORTS = {"slicer", "qt", "ctk", "argparse", "vtk", "distributed", "dask"}
CHILD_PROCESS_ENTRIES = {"segment.job": {"argparse"}}
"""Modules that are also a process's entry point (``python -m``), with what they may import for it."""
NO_SIMPLEITK = {"base", "measure", "report", "model"}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
OVERSIZED_MODULES: dict[str, int] = {
}
"""Modules still above :data:`MAX_MODULE_LINES` (path → their line count when listed): each may
shrink, none may grow, and no other module may join (issue 25's target is an empty list)."""


def part_of(module: str) -> str:
    """The part a module (dotted, below the package) belongs to."""
    head = module.split(".")[0]
    if head in LAYERS and head not in ("base", "face"):
        return head
    return "face" if head in FACES else "base"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(LIB.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(LIB).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) of every import: library modules as dotted names below the package,
    others by their top-level name."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}".strip(".") for a in node.names] if not node.module else [target]
                found += [(f"{PACKAGE}.{name}" if name else PACKAGE, node.lineno) for name in names]
            elif node.module:
                found.append((node.module if node.module.startswith(PACKAGE) else node.module.split(".")[0],
                              node.lineno))
    return found


def library_target(name: str, known: dict[str, Path]) -> str | None:
    if not name.startswith(PACKAGE):
        return None
    rest = name[len(PACKAGE) + 1:]
    while rest and rest not in known:
        rest = rest.rpartition(".")[0]
    return rest or None


def test_each_part_imports_only_its_own_layer_or_lower():
    known = modules()
    wrong = []
    for module, path in known.items():
        part = part_of(module)
        for name, line in imports_of(module, path):
            target = library_target(name, known)
            if target is None or target == "__init__":
                continue
            other = part_of(target)
            if LAYERS[other] > LAYERS[part] or (part, other) in PEERS_APART:
                wrong.append(f"{path.relative_to(LIB)}:{line} ({part}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_only_the_faces_import_slicer_qt_argparse_vtk_or_dask():
    wrong = []
    for module, path in modules().items():
        if part_of(module) == "face":
            continue
        for name, line in imports_of(module, path):
            if name in FACE_ONLY_IMPORTS and name not in CHILD_PROCESS_ENTRIES.get(module, ()):
                wrong.append(f"{path.relative_to(LIB)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_measurements_and_the_bottom_layer_import_no_simpleitk():
    wrong = [f"{path.relative_to(LIB)}:{line}" for module, path in modules().items() if part_of(module) in NO_SIMPLEITK
             for name, line in imports_of(module, path) if name == "SimpleITK"]
    assert not wrong, "\n".join(wrong)


def test_module_sizes():
    sizes = {str(path.relative_to(LIB)): len(path.read_text().splitlines()) for path in modules().values()}
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    grown = {name: (n, OVERSIZED_MODULES.get(name)) for name, n in over.items()
             if name not in OVERSIZED_MODULES or n > OVERSIZED_MODULES[name]}
    assert not grown, f"modules over {MAX_MODULE_LINES} lines (now, listed): {grown}"


LONG_FUNCTIONS: dict[str, int] = {
}
"""Functions still over :data:`MAX_FUNCTION_LINES` without a reason in their docstring (line
counts when listed): each may shrink, none may grow, and no other function may join them."""


def long_functions() -> dict[str, int]:
    """``path:function`` → lines of every function over the limit whose docstring does not say
    why it is long ("long because ...")."""
    found = {}
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and "long because" not in doc.lower():
                    found[f"{path.relative_to(LIB)}:{node.name}"] = length
    return found


def test_functions_are_short_or_say_why():
    grown = {name: (n, LONG_FUNCTIONS.get(name)) for name, n in long_functions().items()
             if name not in LONG_FUNCTIONS or n > LONG_FUNCTIONS[name]}
    assert not grown, f"functions over {MAX_FUNCTION_LINES} lines (now, listed): {grown}"


def test_no_test_reaches_into_a_measuring_module_s_private_names():
    """Tests use the measuring modules' public names (issue 25): a private name is an
    implementation detail a refactoring may change without a behaviour change."""
    wrong = []
    for path in sorted(LIB.parent.parent.joinpath("Testing").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("VertebralFractureScreenLib.measure"):
                for name in node.names:
                    if name.name.startswith("_"):
                        wrong.append(f"{path.name}:{node.lineno} imports {node.module}.{name.name}")
                    if node.module == "VertebralFractureScreenLib.measure":
                        aliases.add(name.asname or name.name)
                    elif (LIB / "measure" / f"{name.name}.py").exists():
                        aliases.add(name.asname or name.name)
            elif isinstance(node, ast.Import):
                aliases |= {name.asname for name in node.names
                            if name.name.startswith("VertebralFractureScreenLib.measure.") and name.asname}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, wrong
