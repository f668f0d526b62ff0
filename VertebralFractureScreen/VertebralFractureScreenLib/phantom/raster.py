"""The rasteriser: the phantom's scene (:class:`.scene.SpineScene`) sampled on a voxel grid.

Label maps take the tissue at the voxel centre; the CT of a voxel next to a change of HU is the
mean of sub-voxel samples on a regular grid (``supersampling`` per axis, by default as many as
keep them ≤ 0.5 mm apart), which gives the partial-volume effect. Changes are looked for at the
voxel centres and, in voxels of bone, disc and muscle along axes coarser than the cortex, at
probes closer than the cortex, so a plate thinner than a voxel is drawn even between tissues of
equal HU. Optional Gaussian point-spread function and Gaussian noise follow. Everything is
computed in the anatomy frame and mapped through the whole-anatomy rotation and the grid's
IJK→RAS matrix, so any spacing, grid orientation and rotation of the anatomy against the voxel
grid is exact.

How the sub-samples are found (the speed of it): a voxel's sub-samples are visited coarse to
fine (ends and centre of each axis, then the midpoints between, …): a sample whose coarser
neighbours all have the same tissue and label takes theirs unpainted, except where a thin or
sharp part can hide between them (samples of the cortex, the first refinement next to bone and
discs, and the fat spheres in muscle, which are tested exactly), so mostly the samples next to a
change are painted. This gives the mean of all sub-samples except for slivers thinner than the
coarse spacing that no coarse sample reaches (against painting every sample, a few voxels per
phantom differ, by a few HU; see docs/validation.md). The grid is rendered in boxes of about
32 mm on :func:`default_workers` threads; the image does not depend on their number.

Arrays are ``[k, j, i]``; boxes of voxels are ``((k0, k1), (j0, j1), (i0, i1))``.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from ..geometry import make_ijk_to_ras, rotation_matrix
from .scene import _HINTED_ITERATIONS, SpineScene
from .shapes import _fat_radius, _in_fat_lattice
from .spec import TISSUES, PhantomSpec

_UNPROBED_TISSUES = (TISSUES["air"], TISSUES["subcutaneous_fat"], TISSUES["soft_tissue"])
"""Tissues whose voxels are not probed for thin structures between voxel centres (the plates and
fat pockets of interest lie in or next to bone, disc and muscle, whose own voxels are probed)."""


def _grid_directions(orientation: str) -> np.ndarray:
    if orientation == "RAS":
        return np.eye(3)
    if orientation == "LPS":
        return np.diag([-1.0, -1.0, 1.0])
    return rotation_matrix(15.0, -10.0, 0.0)  # oblique grid


def _make_grid(spec: PhantomSpec, scene: SpineScene, anatomy_to_ras: np.ndarray):
    """IJK→RAS matrix and array shape ``(nk, nj, ni)`` covering the field of view."""
    directions = _grid_directions(spec.grid_orientation)
    spacing = np.asarray(spec.spacing, dtype=float)
    lo, hi = scene.fov_box()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ras = corners @ anatomy_to_ras[:3, :3].T + anatomy_to_ras[:3, 3]
    along = ras @ directions  # coordinates along the grid axes (mm)
    a_lo, a_hi = along.min(axis=0), along.max(axis=0)
    if spec.size_ijk is None:
        size = np.maximum(np.round((a_hi - a_lo) / spacing).astype(int) + 1, 1)
    else:
        size = np.asarray(spec.size_ijk, dtype=int)
    start = 0.5 * (a_lo + a_hi) - 0.5 * (size - 1) * spacing
    origin = directions @ start
    return make_ijk_to_ras(spacing, origin, directions), (int(size[2]), int(size[1]), int(size[0]))


def _subsample_levels(n: int) -> list[list[int]]:
    """Nested sets of sub-sample indices along one axis (0 … n−1), coarse to fine: the ends and
    the centre (for n ≥ 5; n = 3 starts from the ends alone), then the midpoints of the gaps,
    level by level, until every index is in."""
    sets = [sorted({0, (n - 1) // 2, n - 1}) if n >= 5 else sorted({0, n - 1})]
    while len(sets[-1]) < n:
        current = sets[-1]
        sets.append(sorted(set(current) | {(a + b) // 2 for a, b in zip(current[:-1], current[1:]) if b - a >= 2}))
    return sets


def _refinement_plan(counts: tuple[int, int, int]):
    """The order in which :meth:`_Renderer.supersample` visits a voxel's sub-samples.

    Sub-samples are numbered as ``itertools.product`` of the per-axis indices (i slowest). The
    centre is known from the first pass; the coarsest level is painted; each finer level's new
    samples lie in a cell of the previous level, whose corners decide whether they need painting,
    and so does the centre where it lies in the cell and is not a corner, and in the first
    refinement if the coarsest level lacks it (3 sub-samples along an axis: a sliver through the
    middle of the voxel that no corner reaches is seen at the centre). Returns the coarsest
    samples, the centre and, per finer level: the new samples, their corners (repeated to equal
    length), the cell of the previous level each lies in (an index into the last item) and
    those cells as ``(lowest, highest)`` sub-sample indices along the three axes."""
    per_axis = [_subsample_levels(n) for n in counts]
    depth = max(len(levels) for levels in per_axis)
    sets = [[levels[min(k, len(levels) - 1)] for levels in per_axis] for k in range(depth)]
    centre = tuple((n - 1) // 2 for n in counts)

    def flat(p):
        return (p[0] * counts[1] + p[1]) * counts[2] + p[2]

    first = [flat(p) for p in itertools.product(*sets[0]) if p != centre]
    centre_coarse = all(x in coarse for x, coarse in zip(centre, sets[0]))
    steps = []
    for previous, current in zip(sets[:-1], sets[1:]):
        gaps = [list(zip(prev[:-1], prev[1:])) or [(prev[0], prev[0])] for prev in previous]
        cells = list(itertools.product(*gaps))
        new, corners, cell_of = [], [], []
        for p in itertools.product(*current):
            if p == centre or all(x in prev for x, prev in zip(p, previous)):
                continue
            spans = [(x,) if x in prev else (prev[bisect.bisect(prev, x) - 1], prev[bisect.bisect(prev, x)])
                     for x, prev in zip(p, previous)]
            cell = [flat(c) for c in itertools.product(*spans)]
            if flat(centre) not in cell and (not steps and not centre_coarse
                                             or all(span[0] <= x <= span[-1] for x, span in zip(centre, spans))):
                cell.append(flat(centre))
            new.append(flat(p))
            corners.append(cell)
            cell_of.append(cells.index(tuple(next(g for g in axis_gaps if g[0] <= x <= g[1])
                                             for x, axis_gaps in zip(p, gaps))))
        width = max(len(c) for c in corners)
        steps.append((np.array(new, dtype=np.intp),
                      np.array([c + [c[0]] * (width - len(c)) for c in corners], dtype=np.intp),
                      np.array(cell_of, dtype=np.intp),
                      np.array([[g[0] for g in c] + [g[1] for g in c] for c in cells], dtype=np.intp)))
    return np.array(first, dtype=np.intp), flat(centre), steps


def _key(tissue, total) -> np.ndarray:
    """One integer per sample for its tissue and ``total`` label, which also fix its HU (see
    :meth:`SpineScene.hu_of_keys`): two samples agree when their keys are equal."""
    return (np.asarray(tissue, dtype=np.uint16) << np.uint16(8)) | np.asarray(total, dtype=np.uint16)


_SHARP_TISSUES = tuple(TISSUES[name] for name in
                       ("posterior_bone", "cortical_bone", "trabecular_bone", "disc", "sacrum", "metal"))
"""Tissues of structures with edges and corners (boxes, rims of bodies and discs, ends of screws)."""

_ALWAYS_PAINTED = TISSUES["cortical_bone"]
"""Tissue whose cells are painted sample by sample even when all their corners agree: the
cortex is about as thin as a cell, so a corner of the trabecular core or an edge of the shell
can reach into a cell without reaching a corner."""


class _Renderer:
    """Both passes (:func:`_paint_centres`, :func:`_supersample_voxels`) over parts of the grid
    that can run in any order (and in threads): each part's result depends on its own voxels only."""

    def __init__(self, spec: PhantomSpec, scene: SpineScene, ijk_to_anatomy: np.ndarray, shape):
        self.spec, self.scene, self.shape = spec, scene, shape
        self.matrix, self.shift = ijk_to_anatomy[:3, :3].T.copy(), ijk_to_anatomy[:3, 3].copy()
        probes = []
        for axis, step in enumerate(spec.spacing):  # along the lines through the centre, axis by axis
            n = int(np.floor(step / spec.cortex_mm)) + 1 if step > spec.cortex_mm else 1
            for offset in (np.arange(n) + 0.5) / n - 0.5 if n > 1 else ():
                probes.append(np.eye(3)[axis] * offset)
        self.probes = np.array(probes).reshape(-1, 3) @ self.matrix  # anatomy-frame offsets
        self.probed = np.ones(256, dtype=bool)
        self.probed[list(_UNPROBED_TISSUES)] = False
        self.counts = spec.subsamples_per_axis()
        axes = [(np.arange(n) + 0.5) / n - 0.5 for n in self.counts]
        self.offsets = np.array(list(itertools.product(*axes))) @ self.matrix  # anatomy-frame offsets
        self.plan = _refinement_plan(self.counts)
        # Per finer level, the cells' centres as anatomy-frame offsets from the voxel centre, and
        # their half-diagonals (mm).
        self.cells = []
        for *_, boxes in self.plan[2]:
            lo, hi = (np.array([(boxes[:, a + shift] + 0.5) / n - 0.5 for a, n in enumerate(self.counts)]).T
                      for shift in (0, 3))
            self.cells.append(((0.5 * (lo + hi)) @ self.matrix,
                               np.linalg.norm(0.5 * (hi - lo) * np.asarray(spec.spacing), axis=1)))
        self.fat_tubes = {tube.total_label: tube for tube in scene.tubes if tube.fat_fraction > 0}
        self.fat_key = {label: _key(TISSUES["intramuscular_fat"], label) for label in self.fat_tubes}
        self.hu_of = scene.hu_of_keys()

    def box(self, ijk_lo, ijk_hi, reach: float) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box holding the voxel centres ``ijk_lo``–``ijk_hi`` (i, j, k) and every
        point within ``reach`` voxels of them along the grid axes."""
        corners = np.array(list(itertools.product(*zip(np.asarray(ijk_lo) - reach, np.asarray(ijk_hi) + reach))))
        q = corners @ self.matrix + self.shift
        return q.min(axis=0) - 1e-6, q.max(axis=0) + 1e-6

    def centres(self, box) -> tuple:
        """Pass 1 over a box of voxels ``((k0, k1), (j0, j1), (i0, i1))``: the tissue and labels
        at the centres, and the lowest and highest HU at the centre and the probes."""
        (k0, k1), (j0, j1), (i0, i1) = box
        m = self.matrix
        q = ((self.shift + np.arange(k0, k1)[:, None] * m[2])[:, None, None, :]
             + (np.arange(j0, j1)[:, None] * m[1])[None, :, None, :]
             + (np.arange(i0, i1)[:, None] * m[0])[None, None, :, :]).reshape(-1, 3)
        lo, hi = (i0, j0, k0), (i1 - 1, j1 - 1, k1 - 1)
        painted = self.scene.paint(q, box=self.box(lo, hi, 0.0), want_s=len(self.probes) > 0)
        low = high = painted["hu"]
        if len(self.probes):
            low, high = painted["hu"].copy(), painted["hu"].copy()
            probed_at = np.flatnonzero(self.probed[painted["tissue"]])
            if len(probed_at):
                points = (q[probed_at, None, :] + self.probes[None, :, :]).reshape(-1, 3)
                hint = np.repeat(painted["s"][probed_at], len(self.probes))
                probed = self.scene.paint(points, box=self.box(lo, hi, 0.5), s_hint=hint)["hu"]
                probed = probed.reshape(len(probed_at), len(self.probes))
                low[probed_at] = np.minimum(low[probed_at], probed.min(axis=1))
                high[probed_at] = np.maximum(high[probed_at], probed.max(axis=1))
        return box, painted, low, high

    def supersample(self, kji: np.ndarray, centre_key: np.ndarray, near_bone: np.ndarray) -> np.ndarray:
        """Pass 2, the mean HU of the sub-samples of voxels ``kji`` (M, 3), coarse to fine.

        A sub-sample whose cell corners all agree (same tissue and label, hence HU) takes their
        value without being painted, except in the cortex (:data:`_ALWAYS_PAINTED`); in muscle,
        such a sample is still tested against the fat lattice (a fat sphere can bulge into a cell
        between its corners). Otherwise it is painted. In voxels ``near_bone`` (M,), next to
        the edges and corners of bone and discs, which can reach into a cell without reaching a
        corner, the first refinement is painted whole."""
        first, centre, steps = self.plan
        m = len(kji)
        ijk = kji[:, ::-1]
        box = self.box(ijk.min(axis=0), ijk.max(axis=0), 0.5)
        key = np.zeros((m, len(self.offsets)), dtype=np.uint16)
        key[:, centre] = centre_key
        centres_q = ijk @ self.matrix + self.shift
        # The foot points of the voxel centres on the spine curve, and the curve there: a Newton
        # step from them is the hint of every sample of the voxel (two more steps finish it).
        curve = self.scene.curve
        centre_s = curve.tube_coordinates(centres_q)[0]
        at_centre = curve.local_frame(centre_s)

        def paint(voxel, sample):
            q = centres_q[voxel] + self.offsets[sample]
            hint = curve.newton_step(q[:, 0], q[:, 1], q[:, 2], centre_s[voxel],
                                    at_centre[0][:, voxel], at_centre[1][:, voxel])
            painted = self.scene.paint(q, s_hint=hint, box=box, hint_iterations=_HINTED_ITERATIONS - 1)
            keys = _key(painted["tissue"], painted["total"])
            if not np.array_equal(self.hu_of[keys], painted["hu"]):
                raise RuntimeError("phantom: a sample's HU is not the one of its tissue and label")
            key[voxel, sample] = keys

        paint(np.repeat(np.arange(m), len(first)), np.tile(first, m))
        for level, ((new, corners, cell_of, _), cells) in enumerate(zip(steps, self.cells)):
            value = key[:, corners[:, 0]]
            agree = np.ones(value.shape, dtype=bool)
            for c in range(1, corners.shape[1]):
                agree &= key[:, corners[:, c]] == value
            if level == 0:
                agree &= ~near_bone[:, None]
            key[:, new] = value
            tissue = value >> np.uint16(8)
            voxel, sample = np.nonzero(~agree | (tissue == _ALWAYS_PAINTED))
            if len(voxel):
                paint(voxel, new[sample])
            if self.fat_tubes:
                voxel, sample = np.nonzero(agree & (tissue == TISSUES["muscle"]))
                if len(voxel):
                    self._fat(voxel, new[sample], cell_of[sample], cells, key, centres_q)
        return self.hu_of[key].mean(axis=1)

    def _fat(self, voxel, sample, cell, cells, key, centres_q):
        """Samples of muscle between agreeing corners: those in a fat sphere become fat. Only
        the samples in cells that a sphere of the lattice can reach are tested: the sphere
        nearest to the cell's centre (no other can reach the cell while the spheres and cells
        are small against the lattice's period)."""
        period = self.spec.imat_period_mm
        label = key[voxel, sample] & np.uint16(255)
        offsets, radii = cells
        for total_label, tube in self.fat_tubes.items():
            mine = np.flatnonzero(label == total_label)
            if not len(mine):
                continue
            radius = _fat_radius(period, tube.fat_fraction)
            if radius + radii.max() < 0.5 * period - 1e-6:
                row = np.zeros(len(centres_q), dtype=np.intp)
                row[voxel[mine]] = 1
                voxels = np.flatnonzero(row)
                row[voxels] = np.arange(len(voxels))
                q = centres_q[voxels][:, None, :] + offsets[None, :, :]
                d = np.mod(q - tube.lattice_offset + 0.5 * period, period) - 0.5 * period
                reach = (d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2) <= (radius + radii + 1e-6) ** 2
                mine = mine[reach[row[voxel[mine]], cell[mine]]]
                if not len(mine):
                    continue
            v, p = voxel[mine], sample[mine]
            fat = _in_fat_lattice(centres_q[v] + self.offsets[p], period, tube.fat_fraction, tube.lattice_offset)
            key[v[fat], p[fat]] = self.fat_key[total_label]


def _brick(spacing) -> np.ndarray:
    """Voxels per axis (k, j, i) of the boxes the grid is rendered in: about 32 mm, 8 to 32 voxels."""
    return np.clip(np.round(32.0 / np.asarray(spacing, dtype=float)), 8, 32).astype(np.intp)[::-1]


def _map(function, tasks, workers: int):
    """``map`` in a pool of threads (numpy releases the GIL in its loops) or, for one worker,
    in this thread. Results come in the order of ``tasks``, with at most a few per thread
    waiting to be taken."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(function, task))
                if len(pending) >= 3 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def default_workers() -> int:
    """Threads :func:`make_phantom` renders in: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _paint_centres(renderer: _Renderer, workers: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Pass 1: the tissue at every voxel centre gives the label maps and the HU of voxels that
    lie inside one tissue. Returns the HU (float32), the maps ``total``, ``body``, ``verse`` and
    ``tissue`` (uint8) and the voxels ``kji`` (M, 3) next to a change of HU, which pass 2
    (:func:`_supersample_voxels`) averages; none where a voxel has one sub-sample.

    Along axes whose spacing exceeds the cortex, a few more samples per voxel of the spine's and
    muscles' tissues (on the lines through its centre along those axes, closer than the cortex)
    only look for tissue changes: a plate or a fat pocket thinner than a voxel can lie between
    two voxel centres, and when the tissues on either side have the same HU (trabecular bone as
    dense as the disc, an osteoporotic lumbar body) no centre shows a change next to it (a 1 mm
    endplate between the centres of 3 mm slices would not be drawn). The grid is painted in boxes of
    about 32 mm (:func:`_brick`), each of which evaluates only the structures that reach it."""
    shape = renderer.shape
    hu = np.zeros(shape, dtype=np.float32)
    maps = {key: np.zeros(shape, dtype=np.uint8) for key in ("total", "body", "verse", "tissue")}
    probed = len(renderer.probes) > 0
    hu_low, hu_high = (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)) if probed else (hu, hu)
    for box, painted, low, high in _map(renderer.centres, _boxes(shape, _brick(renderer.spec.spacing)), workers):
        where = tuple(slice(*span) for span in box)
        box_shape = tuple(b - a for a, b in box)
        hu[where] = painted["hu"].reshape(box_shape)
        for key in maps:
            maps[key][where] = painted[key].reshape(box_shape)
        if probed:
            hu_low[where], hu_high[where] = low.reshape(box_shape), high.reshape(box_shape)
    if max(renderer.counts) == 1:
        return hu, maps, np.zeros((0, 3), dtype=np.intp)
    boundary = ndimage.maximum_filter(hu_high, size=3) != ndimage.minimum_filter(hu_low, size=3)
    del hu_low, hu_high  # (where probed, two more grids of float32)
    return hu, maps, np.argwhere(boundary)


def _boxes(shape, brick) -> list[tuple[tuple[int, int], ...]]:
    """The grid ``shape`` (k, j, i) cut into boxes of ``brick`` voxels (fewer at the far ends)."""
    return [tuple((int(start), int(min(start + step, size))) for start, step, size in zip(corner, brick, shape))
            for corner in itertools.product(*(range(0, size, step) for size, step in zip(shape, brick)))]


def _supersample_voxels(renderer: _Renderer, kji: np.ndarray, hu: np.ndarray, maps: dict[str, np.ndarray],
                       chunk_voxels: int, workers: int) -> None:
    """Pass 2, partial volume: the voxels ``kji`` (M, 3) of ``hu`` become the mean of their
    sub-voxel samples on a regular grid (the centre sample is among them, the counts being odd),
    visited coarse to fine (see :meth:`_Renderer.supersample`), box by box (the boxes of pass 1),
    each box in tasks of at most ``chunk_voxels`` sub-samples."""
    if not len(kji):
        return
    brick = _brick(renderer.spec.spacing)
    brick_of = kji // brick
    n_bricks = -(-np.asarray(hu.shape, dtype=np.intp) // brick)
    brick_id = (brick_of[:, 0] * n_bricks[1] + brick_of[:, 1]) * n_bricks[2] + brick_of[:, 2]
    del brick_of
    order = np.argsort(brick_id, kind="stable")
    kji, brick_id = kji[order], brick_id[order]
    centre_key = _key(maps["tissue"][tuple(kji.T)], maps["total"][tuple(kji.T)])
    sharp = np.zeros(256, dtype=bool)
    sharp[list(_SHARP_TISSUES)] = True
    near_bone = ndimage.maximum_filter(sharp[maps["tissue"]], size=3)[tuple(kji.T)]
    per_task = max(1, chunk_voxels // len(renderer.offsets))
    starts = np.flatnonzero(np.r_[True, brick_id[1:] != brick_id[:-1]])
    tasks = []
    for start, stop in zip(starts, np.r_[starts[1:], len(kji)]):
        tasks.extend((a, min(a + per_task, stop)) for a in range(int(start), int(stop), per_task))

    def supersample(task):
        a, b = task
        return task, renderer.supersample(kji[a:b], centre_key[a:b], near_bone[a:b])

    for (a, b), mean in _map(supersample, tasks, workers):
        block = kji[a:b]
        hu[block[:, 0], block[:, 1], block[:, 2]] = mean


def _scanner_ct(spec: PhantomSpec, hu: np.ndarray) -> np.ndarray:
    """The CT (int16 HU, clipped to −1024…3071) of the rendered ``hu``: blurred by the Gaussian
    point-spread function of FWHM ``psf_fwhm_mm`` and with Gaussian noise of ``noise_hu`` (seeded
    by ``seed``), where these are set."""
    if spec.psf_fwhm_mm > 0:
        sigma_kji = (spec.psf_fwhm_mm / 2.3548) / np.asarray(spec.spacing, dtype=float)[::-1]
        hu = ndimage.gaussian_filter(hu, sigma=sigma_kji, mode="nearest")
    if spec.noise_hu > 0:
        rng = np.random.default_rng(spec.seed)
        hu += rng.normal(0.0, spec.noise_hu, size=hu.shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)
