"""TotalSegmentator offline in tests: the skip marker, a small phantom CT, a local connection trap
used as HTTP(S) proxy, and the environment that keeps a run (in this process or a child) offline.

Shared by the segmentation tests (``test_segmentation``, ``test_segmentation_job``,
``test_slicer_segmentation``); the fake weights themselves are in ``fake_totalseg_weights``.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from pathlib import Path

import pytest

from VertebralFractureScreenLib.phantom import render as phantom
from VertebralFractureScreenLib.io.volume import Volume

HAVE_TOTALSEGMENTATOR = all(importlib.util.find_spec(name) is not None
                            for name in ("torch", "nnunetv2", "totalsegmentator"))
needs_totalsegmentator = pytest.mark.skipif(
    not HAVE_TOTALSEGMENTATOR,
    reason="TotalSegmentator, nnU-Net or PyTorch is not installed "
           "(pip install torch==2.13.0, then pip install -e '.[test,segment]')",
)


def phantom_ct(orientation: str) -> Volume:
    """A small L1 phantom at 3 mm. The noise leaves no plane of exactly 0 HU at the border, which
    nnU-Net would crop away as background before predicting."""
    spec = phantom.PhantomSpec(levels=("L1",), spacing=(3.0, 3.0, 3.0), grid_orientation=orientation,
                               noise_hu=20.0, supersampling=1)
    ph = phantom.make_phantom(spec)
    return Volume(ph.ct, ph.ijk_to_ras)


class ConnectionTrap:
    """A local TCP listener used as HTTP(S) proxy: it records the first line of every request
    (``CONNECT host:443 HTTP/1.1`` for HTTPS) and closes the connection."""

    def __init__(self):
        self.requests: list[str] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            with connection:
                connection.settimeout(2.0)
                try:
                    first_line = connection.recv(4096).split(b"\r\n", 1)[0].decode("ascii", "replace")
                except OSError:
                    first_line = "?"
                self.requests.append(first_line)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def offline_env(weights_dir: Path, home_dir: Path, trap: ConnectionTrap) -> dict:
    """Environment for an offline TotalSegmentator run: its weights and home folders, every proxy
    the trap, no proxy exceptions (a value None removes the variable)."""
    env = {"TOTALSEG_WEIGHTS_PATH": str(weights_dir), "TOTALSEG_HOME_DIR": str(home_dir), "NO_PROXY": None,
           "no_proxy": None}
    env.update({name: trap.url for name in PROXY_VARIABLES})
    return env


def set_offline_environment(monkeypatch, weights_dir: Path, home_dir: Path, trap: ConnectionTrap) -> None:
    """:func:`offline_env` applied to this process through ``monkeypatch``."""
    for name, value in offline_env(weights_dir, home_dir, trap).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
