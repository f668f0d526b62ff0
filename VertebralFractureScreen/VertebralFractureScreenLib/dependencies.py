"""Which Python packages are missing (for Slicer's install on first use of an action).

Screening needs only what 3D Slicer bundles (numpy, scipy, SimpleITK, VTK). The QC picture needs
matplotlib (``Resources/requirements-qc.txt``), training a model scikit-learn
(``Resources/requirements-training.txt``), segmentation TotalSegmentator. The Slicer module asks
before it installs anything; this module only answers what the running Python lacks, without
importing it.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9a-zA-Z.]*))?\s*$")


def read_requirements(path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped). Only
    ``name`` and ``name>=version`` lines are supported, which is all this project needs."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not _REQUIREMENT.match(text):
            raise ValueError(f"unsupported requirement line {line!r} in {path} (use 'name' or 'name>=version')")
        lines.append(text)
    return lines


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", text):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def missing_requirements(requirements) -> list[str]:
    """The requirements (lines such as ``scipy>=1.10``) that are not installed, or installed in an
    older version, in the running Python."""
    missing = []
    for requirement in requirements:
        name, minimum = _REQUIREMENT.match(requirement).groups()
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum):
            missing.append(requirement)
    return missing


def missing_modules(names) -> list[str]:
    """The importable module names of ``names`` (e.g. ``torch``) that the running Python cannot
    find, without importing any of them. The import system's caches are cleared first: a package
    installed a moment ago by this very process (Slicer's pip_install) is found."""
    importlib.invalidate_caches()
    return [name for name in names if importlib.util.find_spec(name) is None]
