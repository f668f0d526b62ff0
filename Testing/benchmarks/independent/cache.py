"""A cache of rendered spines: ``<dir>/indep-<key>.npz`` (CT, ``total`` and ``vertebrae_body``
maps, IJK→RAS, the trabecular truth image) and ``indep-<key>.json`` (spec, truth records, scan
record, render time). The key hashes the full spec and the renderer's source, so a change of
the renderer renders again. Writes are atomic (arrays first, the JSON marks a complete entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .spec import SpineSpec

PACKAGE = Path(__file__).resolve().parent


RENDERER_MODULES = ("__init__.py", "anatomy.py", "build.py", "scanner.py", "spec.py", "tissue.py", "truth.py")
"""The modules whose source decides a rendering (not the suite, cache or report)."""


def source_hash() -> str:
    """Hash of the renderer's source (:data:`RENDERER_MODULES`)."""
    digest = hashlib.sha256()
    for path in (PACKAGE / name for name in RENDERER_MODULES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def key(spec: SpineSpec) -> str:
    payload = json.dumps({"spec": spec.to_json(), "source": source_hash()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def paths(spec: SpineSpec, cache: Path) -> tuple[Path, Path]:
    k = key(spec)
    return cache / f"indep-{k}.npz", cache / f"indep-{k}.json"


@dataclass
class Rendered:
    """A cached rendering (arrays ``[k, j, i]``)."""

    ct: np.ndarray
    total: np.ndarray
    body: np.ndarray
    ijk_to_ras: np.ndarray
    trabecular_truth_hu: np.ndarray
    truth: list
    scan: dict
    render_s: float


def _default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def render_to_cache(spec: SpineSpec, cache: Path) -> tuple[float, tuple]:
    """Render ``spec`` into the cache. Returns (seconds, shape kji). A top-level function for a
    process pool."""
    from . import render

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ct, total, body, ijk_to_ras, truth = render(spec)
    seconds = time.perf_counter() - t0
    npz, meta = paths(spec, cache)
    tmp = npz.with_name(f"{npz.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, ct=ct, total=total, body=body, ijk_to_ras=ijk_to_ras,
                        trab=truth["trabecular_truth_hu"].astype(np.float32))
    record = {"spec": spec.to_json(), "source": source_hash(), "render_s": seconds, "truth": truth["vertebrae"],
              "scan": truth["scan"]}
    tmp_meta = meta.with_name(f"{meta.name}.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, default=_default))
    os.replace(tmp, npz)
    os.replace(tmp_meta, meta)
    return seconds, tuple(ct.shape)


def load(spec: SpineSpec, cache: Path) -> Rendered:
    npz, meta = paths(spec, cache)
    record = json.loads(meta.read_text())
    with np.load(npz) as data:
        return Rendered(data["ct"], data["total"], data["body"], data["ijk_to_ras"], data["trab"],
                        record["truth"], record["scan"], float(record["render_s"]))


def render_many(specs: dict[str, SpineSpec], cache: Path, jobs: int = 1, rerender: bool = False,
                log=print) -> dict[str, float]:
    """Render the specs missing from the cache with ``jobs`` processes; name → seconds."""
    todo = {n: s for n, s in specs.items() if rerender or not all(p.exists() for p in paths(s, cache))}
    for name in specs:
        if name not in todo:
            log(f"  cached    {name}")
    times: dict[str, float] = {}
    if not todo:
        return times
    log(f"  rendering {len(todo)} spine(s) with {jobs} process(es) ...")
    if jobs <= 1:
        for name, spec in todo.items():
            times[name], shape = render_to_cache(spec, cache)
            log(f"  rendered  {name:<26} shape {shape} in {times[name]:.1f} s")
        return times
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(render_to_cache, spec, cache): name for name, spec in todo.items()}
        for future in as_completed(futures):
            name = futures[future]
            times[name], shape = future.result()
            log(f"  rendered  {name:<26} shape {shape} in {times[name]:.1f} s")
    return times
