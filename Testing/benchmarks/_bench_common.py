"""Shared helpers of the hand-run benchmarks (not a test module, not part of the Lib).

* a phantom cache: rendered phantoms stored as ``<key>.npz`` + ``<key>.json`` in a cache
  directory, keyed by a hash of the :class:`PhantomSpec` (and the Lib version), so re-runs skip
  the rendering;
* a thin adapter around TotalSegmentator's spine-report height measurement
  (``totalsegmentator/spine_report/measure_verte_height.py``, TotalSegmentator 2.18.0) that runs
  it on the same CT and masks as our morphometry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
try:  # the Lib is normally installed (editable) in the venv; fall back to the source tree
    import VertebralFractureScreenLib  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO / "VertebralFractureScreen"))

from VertebralFractureScreenLib import __version__ as LIB_VERSION  # noqa: E402
from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("VFSCREEN_BENCH_CACHE", "~/.cache/vfscreen-bench")).expanduser()

# ------------------------------------------------------------------------------------------------
# Phantom cache
# ------------------------------------------------------------------------------------------------


def spec_key(spec: ph.PhantomSpec) -> str:
    """Cache key of a phantom: hash of its full spec and the Lib version."""
    payload = json.dumps({"spec": spec.to_json(), "lib_version": LIB_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def renderer_fingerprint() -> str:
    """Hash of the phantom renderer's source (every module of ``phantom/``). Stored with each
    cached phantom so a run can warn when the renderer changed since (use ``--rerender``)."""
    digest = hashlib.sha256()
    for path in sorted(Path(ph.__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class CachedPhantom:
    """The parts of a rendered phantom the benchmarks use (arrays ``[k, j, i]``)."""

    ct: np.ndarray
    total: np.ndarray
    vertebrae_body: np.ndarray
    ijk_to_ras: np.ndarray
    truth: dict
    render_s: float
    cached: bool
    fingerprint: str


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def cache_paths(spec: ph.PhantomSpec, cache_dir: Path) -> tuple[Path, Path]:
    key = spec_key(spec)
    return cache_dir / f"phantom-{key}.npz", cache_dir / f"phantom-{key}.json"


def is_cached(spec: ph.PhantomSpec, cache_dir: Path) -> bool:
    npz, meta = cache_paths(spec, cache_dir)
    return npz.exists() and meta.exists()


def render_to_cache(spec: ph.PhantomSpec, cache_dir: Path) -> tuple[float, tuple[int, int, int]]:
    """Render ``spec`` and store it in ``cache_dir`` (atomically). Returns (seconds, shape kji).
    Top-level function so that a process pool can run it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    phantom = ph.make_phantom(spec)
    seconds = time.perf_counter() - t0
    npz, meta = cache_paths(spec, cache_dir)
    tmp_npz = npz.with_name(npz.stem + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp_npz, ct=phantom.ct, total=phantom.total, vertebrae_body=phantom.vertebrae_body,
                        ijk_to_ras=np.asarray(phantom.ijk_to_ras, dtype=float))
    record = {"spec": spec.to_json(), "lib_version": LIB_VERSION, "render_s": seconds,
              "renderer_fingerprint": renderer_fingerprint(), "shape_kji": list(phantom.ct.shape),
              "truth": phantom.truth}
    tmp_meta = meta.with_name(meta.name + f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, default=_json_default))
    os.replace(tmp_npz, npz)  # arrays first: the metadata's presence marks a complete entry
    os.replace(tmp_meta, meta)
    return seconds, tuple(phantom.ct.shape)


def load_cached(spec: ph.PhantomSpec, cache_dir: Path) -> CachedPhantom:
    npz, meta = cache_paths(spec, cache_dir)
    record = json.loads(meta.read_text())
    with np.load(npz) as data:
        return CachedPhantom(data["ct"], data["total"], data["vertebrae_body"], data["ijk_to_ras"],
                             record["truth"], float(record["render_s"]), True,
                             record.get("renderer_fingerprint", "?"))


def render_many(specs: dict[str, ph.PhantomSpec], cache_dir: Path, jobs: int = 1, rerender: bool = False,
                log=print) -> dict[str, float]:
    """Render every spec missing from the cache (``jobs`` processes). Returns name → seconds of
    the fresh renders and prints one line per phantom."""
    todo = {name: spec for name, spec in specs.items() if rerender or not is_cached(spec, cache_dir)}
    for name, spec in specs.items():
        if name not in todo:
            record = json.loads(cache_paths(spec, cache_dir)[1].read_text())
            stale = record.get("renderer_fingerprint") != renderer_fingerprint()
            log(f"  cached    {name:<28} shape {tuple(record['shape_kji'])}  "
                f"(rendered in {record['render_s']:.1f} s{'; renderer changed since, --rerender to refresh' if stale else ''})")
    times: dict[str, float] = {}
    if not todo:
        return times
    log(f"  rendering {len(todo)} phantom(s) with {jobs} process(es) ...")
    if jobs <= 1:
        for name, spec in todo.items():
            seconds, shape = render_to_cache(spec, cache_dir)
            times[name] = seconds
            log(f"  rendered  {name:<28} shape {shape}  in {seconds:.1f} s")
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(render_to_cache, spec, cache_dir): name for name, spec in todo.items()}
            for future in as_completed(futures):
                name = futures[future]
                seconds, shape = future.result()
                times[name] = seconds
                log(f"  rendered  {name:<28} shape {shape}  in {seconds:.1f} s")
    return times


# ------------------------------------------------------------------------------------------------
# TotalSegmentator spine report
# ------------------------------------------------------------------------------------------------

TS_KEYS = ("15%", "50%", "85%")
TS_KEY_FOR = {"ha": "85%", "hm": "50%", "hp": "15%"}
"""Which TotalSegmentator spine-report height corresponds to our Ha / Hm / Hp.

Their ``POSITION_MAPPING`` calls 15 % 'posterior' and 85 % 'anterior'. On RAS-canonical data
(which their pipeline makes with ``nib.as_closest_canonical``) the vertebrae are sorted cranial
to caudal, so their height axis points caudally, their in-plane horizontal axis points
anteriorly and their depth fractions are counted from the *posterior* wall: 15 % from posterior
= 85 % from anterior = our Hp, and 85 % = our Ha. bench_morphometry.py verifies this empirically
on the wedge fractures of the suite (Ha is the height that drops) and prints the check."""


def load_ts_module():
    """Import TotalSegmentator's ``measure_verte_height`` module, or return (None, reason)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from totalsegmentator.spine_report import measure_verte_height as module
        import nibabel  # noqa: F401
    except Exception as error:  # ImportError, or a dependency failing at import
        return None, f"{type(error).__name__}: {error}"
    return module, ""


def ts_images(ct: np.ndarray, total: np.ndarray, body: np.ndarray, ijk_to_ras: np.ndarray):
    """nibabel images (arrays transposed to [i, j, k], affine = IJK→RAS) and label maps in the form
    the spine report takes, made RAS-canonical as its pipeline does."""
    import nibabel as nib

    affine = np.asarray(ijk_to_ras, dtype=float)
    present = set(np.unique(total).tolist())
    verte_label_map = {int(label): f"vertebrae_{level}" for level, label in lv.TOTAL_VERTEBRA_IDS.items()
                       if label in present}
    ct_img = nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), affine))
    verte_img = nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(total.transpose(2, 1, 0)), affine))
    body_img = nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(body.transpose(2, 1, 0)), affine))
    body_label_map = {lv.BODY_LABEL: "vertebrae_body", lv.DISC_LABEL: "intervertebral_discs"}
    return ct_img, verte_img, verte_label_map, body_img, body_label_map


@contextlib.contextmanager
def quiet_warnings(verbose: bool = False):
    """Silence the FutureWarning scikit-image 0.26 raises for TS's ``binary_erosion`` call."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore", FutureWarning)
        yield


def run_ts(module, ct, total, body, ijk_to_ras, horizontal_mask_type: str = "raw", verbose: bool = False):
    """Run ``VertebraeProcessor(...).process_vertebrae()`` (the spine report uses
    ``horizontal_mask_type='raw'``). Returns (level → {'15%': mm, '50%': mm, '85%': mm} with NaN
    for a failed height, seconds of constructor + process_vertebrae, captured stdout)."""
    images = ts_images(ct, total, body, ijk_to_ras)
    buffer = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stdout if verbose else buffer), quiet_warnings(verbose):
        processor = module.VertebraeProcessor(*images, horizontal_mask_type=horizontal_mask_type)
        info = processor.process_vertebrae()
    seconds = time.perf_counter() - t0
    out: dict[str, dict[str, float]] = {}
    for name, record in info.items():
        level = name.replace("vertebrae_", "")
        heights = record.get("height_measurements") or {}
        out[level] = {}
        for key in TS_KEYS:
            value = float((heights.get(key) or {}).get("height_mm", 0.0) or 0.0)
            out[level][key] = value if value > 0 else float("nan")
    return out, seconds, buffer.getvalue()


def ts_fracture_flag(heights: dict[str, float]) -> bool:
    """TotalSegmentator's own flag (``detect_potential_fracture``): min/max of the three heights
    below 0.8."""
    values = [h for h in heights.values() if np.isfinite(h) and h > 0]
    if len(values) < 2:
        return False
    return min(values) / max(values) < 0.8


def largest_gaussian_error(sds, goal: float, draws: int = 10_000, rng: np.random.Generator | None = None) -> dict:
    """What noise alone does to a goal on a largest error: independent Gaussian errors of standard
    deviations ``sds``, drawn ``draws`` times; the largest |error| of each draw has this
    ``median``, ``p5`` and ``p95``, and is within ``goal`` in the share ``p_within`` of draws (as
    often as a method without systematic error would meet the goal). ``rng``: default seed 0."""
    sds = np.asarray(sds, dtype=float)
    rng = np.random.default_rng(0) if rng is None else rng
    largest = np.abs(rng.standard_normal((draws, len(sds))) * sds).max(axis=1) if len(sds) else np.zeros(1)
    return {"median": float(np.median(largest)), "p5": float(np.percentile(largest, 5)),
            "p95": float(np.percentile(largest, 95)), "p_within": float(np.mean(largest <= goal))}


def peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover
        return float("nan")


def add_common_arguments(parser) -> None:
    """Options both benchmarks share: the phantom cache, re-rendering, TotalSegmentator on/off."""
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"cache directory of rendered phantoms (default {DEFAULT_CACHE})")
    parser.add_argument("--rerender", action="store_true", help="render again even when cached")
    parser.add_argument("--no-ts", action="store_true", help="skip TotalSegmentator's spine-report measurement")
    parser.add_argument("--verbose", action="store_true", help="show TotalSegmentator's own printing")


def bench_parser(doc: str):
    """The command line every phantom benchmark shares: ``--cache``, ``--rerender``, ``--jobs`` and
    ``--only`` (a benchmark adds its own options to the returned parser)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"cache directory of rendered phantoms (default {DEFAULT_CACHE})")
    parser.add_argument("--rerender", action="store_true", help="render again even when cached")
    parser.add_argument("--jobs", type=int, default=1, help="processes for rendering missing phantoms (default 1)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    return parser
