"""Shared pytest helpers for the VertebralFractureScreen tests.

Test data lives outside the repository (it must never be committed); ``shared_data`` says where
(the TotalSegmentator example data and the expert-graded development scans).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import graded_data_dir, graded_scans, shared_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Repository root (the parent of ``Testing/``)."""


@pytest.fixture(scope="session")
def example_data() -> Path:
    """Path of the example data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared example data not found at {path} (set VFS_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def graded_set() -> list:
    """The expert-graded development scans (``shared_data.graded_scans``); skips the test when
    there are none."""
    scans = graded_scans()
    if not scans:
        pytest.skip(f"no expert-graded development scans at {graded_data_dir()} (set VFS_GRADED_DATA; "
                    "see Testing/benchmarks/prepare_graded_set.py)")
    return scans


@pytest.fixture(scope="module")
def trap():
    """A local connection trap used as HTTP(S) proxy (``totalseg_offline.ConnectionTrap``): it
    records any connection attempt of an offline TotalSegmentator run."""
    from totalseg_offline import ConnectionTrap

    trap = ConnectionTrap()
    yield trap
    trap.close()
