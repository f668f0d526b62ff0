"""Image formation of the independent benchmark renderer: a CT scanner looking at the continuous
anatomy of :mod:`.tissue`.

**Grid.** Voxels ``[k, j, i]`` with an IJK→RAS matrix as a DICOM axial series gives it (i towards
the patient's left, j posterior, k superior); the field of view is cropped to the scored
vertebrae plus 6 mm. The patient is rotated in the scanner by the spec's rotation about the
spine's centre.

**Sampling.** The anatomy is evaluated on a grid supersampled by an odd factor per axis (fine
steps ≤ 0.45 mm in-plane, ≤ 0.6 mm along z), with edges ramped over one fine step. Only voxels
within reach of a tissue interface are supersampled; the others hold their centre's tissue, plus
the trabecular texture at every fine point inside bone.

**Point-spread function.** In-plane a Gaussian of the kernel's sigma (``soft`` 0.9 mm,
``standard`` 0.65 mm, ``bone`` 0.45 mm), and for pixels over 1 mm (a resampled series) also the
pixel's box; along z the slice-sensitivity profile: the slice's box (its thickness) convolved
with a Gaussian of 0.4 mm. The blurred image is sampled at the voxel centres.

**Beam hardening.** A cupping offset: ``-cupping * (1 - (r / 170 mm)^2)`` HU at in-plane distance
``r`` from the abdomen's centre (75 mm anterior of the spine), ``cupping`` 8–16 HU per scan.

**Noise.** Gaussian noise with a CT-like noise power spectrum in-plane,
``NPS(f) ∝ f * exp(-(2 pi sigma f)^2)`` (ramp-like, zero at zero frequency, peaking at
``1 / (2 sqrt(2) pi sigma)``: 0.12 c/mm for ``soft``, 0.25 c/mm for ``bone``), formed on a grid of
at most 0.6 mm and averaged into larger pixels, white between slices apart from the slice
profile's overlap, scaled to ``noise_hu`` per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import anatomy as an
from . import tissue
from .build import Spine
from .spec import SpineSpec

KERNEL_SIGMA_MM = {"soft": 0.9, "standard": 0.65, "bone": 0.45}
SSP_SIGMA_MM = 0.4
FINE_STEP_MM = (0.45, 0.45, 0.6)
"""Largest fine step along i, j, k (mm)."""
FOV_MARGIN_MM = 6.0
CHUNK_SLICES = 12


@dataclass
class Grid:
    """The voxel grid: ``shape`` (k, j, i), ``spacing`` (i, j, k) mm, ``ijk_to_ras``, the
    supersampling ``factors`` (i, j, k) and the patient's ``rotation`` (patient → scanner)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    ijk_to_ras: np.ndarray
    factors: tuple[int, int, int]
    rotation: np.ndarray

    @property
    def fine_step(self) -> np.ndarray:
        return np.asarray(self.spacing) / np.asarray(self.factors)

    def centres(self, k0: int, k1: int) -> np.ndarray:
        """Scanner (RAS) coordinates of the voxel centres of slices k0..k1-1, (n, 3) in [k, j, i] order."""
        k, j, i = np.meshgrid(np.arange(k0, k1), np.arange(self.shape[1]), np.arange(self.shape[2]), indexing="ij")
        a = self.ijk_to_ras
        i, j, k = (x.ravel().astype(float)[:, None] for x in (i, j, k))
        return i * a[:3, 0] + j * a[:3, 1] + k * a[:3, 2] + a[:3, 3]

    def sub_offsets(self) -> np.ndarray:
        """RAS offsets (fz*fy*fx, 3) of the fine points of a voxel from its centre, [k, j, i] order."""
        fx, fy, fz = self.factors
        a, b, c = np.meshgrid((np.arange(fz) - (fz - 1) / 2) / fz, (np.arange(fy) - (fy - 1) / 2) / fy,
                              (np.arange(fx) - (fx - 1) / 2) / fx, indexing="ij")
        ijk = np.stack([c.ravel(), b.ravel(), a.ravel()], 1)
        return ijk @ self.ijk_to_ras[:3, :3].T

    def to_patient(self, ras: np.ndarray) -> np.ndarray:
        """Scanner RAS → patient RAS (the rotation is about the spine's centre, the origin)."""
        return an.to_frame(ras, np.zeros(3), self.rotation)


def _odd_factor(spacing: float, step: float) -> int:
    f = int(np.ceil(spacing / step - 1e-9))
    return f if f % 2 == 1 else f + 1


def make_grid(spine: Spine, spec: SpineSpec) -> Grid:
    """The field of view around the scored vertebrae (bodies and posterior elements) in the
    scanner, for the spec's spacing and rotation."""
    rx, ry, rz = spec.rotation_deg
    rot = an.rotation("z", rz) @ an.rotation("y", ry) @ an.rotation("x", rx)
    points = []
    for v in spine.vertebrae:
        if not v.scored:
            continue
        ends = v.capsules[:, :6].reshape(-1, 3)
        r = v.capsules[:, 6].max()
        box = np.array([[sx * (v.a * 1.15), sy, sz * 0.5 * max(v.h_ant, v.h_post)]
                        for sx in (-1, 1) for sy in (-v.b_a * 1.15, v.b_p) for sz in (-1, 1)])
        local = np.vstack([box, ends + r, ends - r])
        points.append(v.origin + local @ v.axes.T)
    scanner = np.vstack(points) @ rot.T
    lo, hi = scanner.min(0) - FOV_MARGIN_MM, scanner.max(0) + FOV_MARGIN_MM
    spacing = np.asarray(spec.spacing, dtype=float)
    n = np.ceil((hi - lo) / spacing).astype(int) + 1
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    ijk_to_ras[:3, 3] = [hi[0], hi[1], lo[2]]
    factors = tuple(_odd_factor(s, m) for s, m in zip(spacing, FINE_STEP_MM))
    return Grid((int(n[2]), int(n[1]), int(n[0])), tuple(spacing), ijk_to_ras, factors, rot)


@dataclass
class VoxelMaps:
    """Per voxel of the grid: the image before noise (HU), the occupancy of the most present
    vertebra and its id, of bodies and of discs (partial volumes, 0–1), and the drawn trabecular
    HU at the centre (NaN away from the bodies)."""

    ct: np.ndarray
    vert_occ: np.ndarray
    vert_id: np.ndarray
    body_occ: np.ndarray
    disc_occ: np.ndarray
    trab_hu: np.ndarray


def _blur_and_sample(fine: np.ndarray, grid: Grid, sigma_psf: float, sigma_ssp: float) -> np.ndarray:
    """PSF and slice profile on the fine block ``[K, J, I]``, then the voxel centres: each axis
    filtered and decimated in turn (the filters are separable)."""
    fx, fy, fz = grid.factors
    hx, hy, hz = grid.fine_step
    out = ndimage.uniform_filter1d(fine, fz, axis=0, mode="nearest") if fz > 1 else fine
    out = ndimage.gaussian_filter1d(out, sigma_ssp / hz, axis=0, mode="nearest")
    out = out[(fz - 1) // 2::fz]
    for axis, f, h, pixel in ((1, fy, hy, grid.spacing[1]), (2, fx, hx, grid.spacing[0])):
        if pixel > 1.0 + 1e-6 and f > 1:
            out = ndimage.uniform_filter1d(out, f, axis=axis, mode="nearest")
        out = ndimage.gaussian_filter1d(out, sigma_psf / h, axis=axis, mode="nearest")
        out = np.take(out, np.arange((f - 1) // 2, out.shape[axis], f), axis=axis)
    return out


def _place(fine6: np.ndarray, flat_index: np.ndarray, shape2: tuple[int, int], values: np.ndarray, add=False):
    """Write (or add) per-voxel blocks ``values`` (n, fz, fy, fx) into the 6-d fine block."""
    kk, rest = np.divmod(flat_index, shape2[0] * shape2[1])
    jj, ii = np.divmod(rest, shape2[1])
    if add:
        fine6[kk, :, jj, :, ii, :] += values
    else:
        fine6[kk, :, jj, :, ii, :] = values


def _batches(index: np.ndarray, per_voxel: int, budget: int = 1_200_000):
    step = max(1, budget // per_voxel)
    for start in range(0, index.size, step):
        yield index[start:start + step]


def _render_chunk(spine: Spine, grid: Grid, ka: int, kb: int):
    """The fine block of slices ``ka..kb-1`` (before blurring) and their voxel maps."""
    fx, fy, fz = grid.factors
    nk, (nj, ni) = kb - ka, grid.shape[1:]
    per_voxel = fx * fy * fz
    h = float(np.mean(grid.fine_step))
    centres = grid.to_patient(grid.centres(ka, kb))
    t = tissue.evaluate(spine, centres, h, distance=True)
    near = t.iface < 0.5 * float(np.linalg.norm(grid.spacing)) + h + 0.25
    fine = np.empty((nk, fz, nj, fy, ni, fx), np.float32)
    fine[:] = t.hu.reshape(nk, 1, nj, 1, ni, 1)
    maps = [t.vert_occ.copy(), t.vert_id.copy(), t.body_occ.copy(), t.disc_occ.copy(), t.trab_hu]
    offsets = grid.to_patient(grid.sub_offsets())
    pure = np.flatnonzero(~near & (t.trab_index >= 0))
    for index in np.unique(t.trab_index[pure]):
        v = spine.vertebrae[index]
        for idx in _batches(pure[t.trab_index[pure] == index], per_voxel):
            sub = (centres[idx][:, None, :] + offsets[None]).reshape(-1, 3)
            texture = an.texture_at(v, v.local(sub)).reshape(idx.size, per_voxel)
            delta = texture - an.texture_at(v, v.local(centres[idx]))[:, None]
            _place(fine, idx, (nj, ni), delta.reshape(idx.size, fz, fy, fx).astype(np.float32), add=True)
    for idx in _batches(np.flatnonzero(near), per_voxel):
        sub = tissue.evaluate(spine, (centres[idx][:, None, :] + offsets[None]).reshape(-1, 3), h)
        _place(fine, idx, (nj, ni), sub.hu.reshape(idx.size, fz, fy, fx))
        occ = sub.vert_occ.reshape(idx.size, per_voxel)
        maps[0][idx] = occ.mean(1)
        maps[1][idx] = np.max(np.where(occ > 0, sub.vert_id.reshape(idx.size, per_voxel), 0), axis=1)
        maps[2][idx] = sub.body_occ.reshape(idx.size, per_voxel).mean(1)
        maps[3][idx] = sub.disc_occ.reshape(idx.size, per_voxel).mean(1)
    return fine.reshape(nk * fz, nj * fy, ni * fx), [m.reshape(nk, nj, ni) for m in maps], int(near.sum())


def _cupping(spine: Spine, grid: Grid, cupping_hu: float) -> np.ndarray:
    """The beam-hardening offset (HU) per voxel (see the module docstring)."""
    nk, nj, ni = grid.shape
    centre = grid.rotation @ spine.abdomen_centre
    axis = grid.rotation @ np.array([0.0, 0.0, 1.0])
    x = grid.ijk_to_ras[0, 3] + grid.ijk_to_ras[0, 0] * np.arange(ni)
    y = grid.ijk_to_ras[1, 3] + grid.ijk_to_ras[1, 1] * np.arange(nj)
    z = grid.ijk_to_ras[2, 3] + grid.ijk_to_ras[2, 2] * np.arange(nk)
    t = (z - centre[2]) / axis[2]
    cx, cy = centre[0] + t * axis[0], centre[1] + t * axis[1]
    r2 = (x[None, None, :] - cx[:, None, None]) ** 2 + (y[None, :, None] - cy[:, None, None]) ** 2
    return (-cupping_hu * np.clip(1.0 - r2 / 170.0 ** 2, 0.0, None)).astype(np.float32)


def psf_sigmas(spec: SpineSpec) -> tuple[float, float]:
    """In-plane PSF sigma and the slice profile's Gaussian sigma (mm) of the spec's kernel."""
    if "psf" in spec.ablate:
        return 0.05, 0.05
    return KERNEL_SIGMA_MM[spec.kernel], SSP_SIGMA_MM


def render_volume(spine: Spine, spec: SpineSpec, grid: Grid, cupping_hu: float) -> tuple[VoxelMaps, dict]:
    """The noise-free image and the voxel maps, slab by slab (see the module docstring)."""
    nk, nj, ni = grid.shape
    sz = grid.spacing[2]
    halo = int(np.ceil((0.5 * sz + 4.0 * SSP_SIGMA_MM) / sz))
    per_slice = int(np.prod(grid.factors)) * nj * ni
    chunk = max(2, 10_000_000 // per_slice - 2 * halo)
    ct = np.empty(grid.shape, np.float32)
    maps = [np.empty(grid.shape, np.float32), np.empty(grid.shape, np.int16), np.empty(grid.shape, np.float32),
            np.empty(grid.shape, np.float32), np.empty(grid.shape, np.float32)]
    near_voxels = 0
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        ka, kb = max(0, k0 - halo), min(nk, k1 + halo)
        fine, chunk_maps, near = _render_chunk(spine, grid, ka, kb)
        near_voxels += near
        ct[k0:k1] = _blur_and_sample(fine, grid, *psf_sigmas(spec))[k0 - ka:k1 - ka]
        for out, m in zip(maps, chunk_maps):
            out[k0:k1] = m[k0 - ka:k1 - ka]
    offset = _cupping(spine, grid, cupping_hu)
    ct += offset
    maps[4] += offset
    info = {"supersampled_voxels": near_voxels, "voxels": int(np.prod(grid.shape)), "chunk_slices": chunk}
    return VoxelMaps(ct, *maps), info


def correlated_noise(shape: tuple[int, int, int], spacing, kernel: str, sd: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Noise of SD ``sd`` HU per voxel with the kernel's noise power spectrum (module docstring)."""
    if sd <= 0:
        return np.zeros(shape, np.float32)
    sx, sy, sz = spacing
    m = _odd_factor(max(sx, sy), 0.6) if max(sx, sy) > 1.0 else 1
    nk, nj, ni = shape
    white = rng.standard_normal((nk, nj * m, ni * m)).astype(np.float32)
    fy = np.fft.fftfreq(nj * m, sy / m)[:, None]
    fx = np.fft.rfftfreq(ni * m, sx / m)[None, :]
    f = np.hypot(fx, fy)
    sigma = KERNEL_SIGMA_MM[kernel]
    gain = np.sqrt(f * np.exp(-(2 * np.pi * sigma * f) ** 2)).astype(np.float32)
    noise = np.fft.irfft2(np.fft.rfft2(white, axes=(1, 2)) * gain, s=(nj * m, ni * m), axes=(1, 2))
    if m > 1:
        noise = noise.reshape(nk, nj, m, ni, m).mean(axis=(2, 4))
    if sz < 2.0:
        noise = ndimage.gaussian_filter1d(noise, SSP_SIGMA_MM / sz, axis=0, mode="wrap")
    return (noise * (sd / noise.std())).astype(np.float32)


def _threshold(occ: np.ndarray, shift_voxels: np.ndarray) -> np.ndarray:
    """A segmentation model's mask of a structure of partial volume ``occ``: its smoothed
    occupancy (σ 0.6 voxel) thresholded at 0.5 after moving the boundary outwards by
    ``shift_voxels`` (per voxel, in voxels along the boundary's normal in index space; the
    occupancy change is capped at ±0.45, about ±0.75 voxel, so that nothing appears away from
    the structure)."""
    p = ndimage.gaussian_filter(occ.astype(np.float32), 0.6)
    edge = (p > 0.3) & (p < 0.7)
    if not edge.any():
        return p > 0.5
    grad = np.sqrt(sum(g ** 2 for g in np.gradient(p)))
    return p + np.clip(shift_voxels * float(np.median(grad[edge])), -0.45, 0.45) > 0.5


def label_maps(maps: VoxelMaps, spec: SpineSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """``total`` vertebra labels and the ``vertebrae_body`` map (1 bodies, 2 discs) as a
    segmentation model gives them: each boundary moved by a smooth random field (correlation
    1.5 voxels, SD ``label_jitter_voxels``) plus a per-scan bias (``label_bias_voxels``, drawn
    in ±0.2 voxel when None). Returns the two maps and the bias."""
    bias = spec.label_bias_voxels if spec.label_bias_voxels is not None else float(rng.uniform(-0.2, 0.2))
    jitter = spec.label_jitter_voxels
    if "label_jitter" in spec.ablate:
        bias, jitter = 0.0, 0.0

    def shift():
        field = ndimage.gaussian_filter(rng.standard_normal(maps.ct.shape).astype(np.float32), 1.5)
        return bias + jitter * field / field.std()

    bone = _threshold(maps.vert_occ, shift())
    ids = maps.vert_id.copy()
    if (bone & (ids == 0)).any():
        _, nearest = ndimage.distance_transform_edt(ids == 0, return_indices=True)
        ids = ids[tuple(nearest)]
    total = np.where(bone, ids, 0).astype(np.uint8)
    body = _threshold(maps.body_occ, shift())
    disc = _threshold(maps.disc_occ, shift()) & ~body
    body_labels = np.zeros(maps.ct.shape, np.uint8)
    body_labels[body] = 1
    body_labels[disc] = 2
    return total, body_labels, bias
