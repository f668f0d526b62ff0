"""Shared pytest helpers for the VertebralFractureScreen tests.

Test data lives outside the repository (it must never be committed): by default in
``../shared/data/totalsegmentator-example`` next to the repository root, or wherever the
``VFS_SHARED_DATA`` environment variable points (the ``totalsegmentator-example`` folder itself).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Repository root (the parent of ``Testing/``)."""


def shared_data_dir() -> Path:
    """Folder of the TotalSegmentator example data (SPEC §7); it may not exist."""
    override = os.environ.get("VFS_SHARED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data" / "totalsegmentator-example").resolve()


@pytest.fixture(scope="session")
def example_data() -> Path:
    """Path of the example data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared example data not found at {path} (set VFS_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def trap():
    """A local connection trap used as HTTP(S) proxy (``totalseg_offline.ConnectionTrap``): it
    records any connection attempt of an offline TotalSegmentator run."""
    from totalseg_offline import ConnectionTrap

    trap = ConnectionTrap()
    yield trap
    trap.close()
