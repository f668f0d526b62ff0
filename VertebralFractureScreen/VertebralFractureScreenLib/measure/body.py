"""One vertebral body's measurement: its depth, its endplates and its heights (steps 3–4 of :mod:`.morphometry`).

Every position is in the vertebra's local frame (:class:`.frames.VertebraFrame`, mm: ``u``
left-right, ``v`` antero-posterior, ``w`` cranio-caudal) unless it says RAS. The depth comes from
the body mask's walls in the mid-sagittal plane; the endplates first from the mask (where its
interpolated occupancy crosses one half), then, with the CT, from the fits of
:class:`.endplate_fit.EndplateProfileFit` on the voxels of the central band, combined with the
mask's (:func:`.endplate_fit.with_mask_endplate`). :class:`BodyMeasurement` works in two steps so
that the exam can fit one cortical plate HU over all its bodies in between
(:func:`.morphometry.measure_heights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..geometry import mask_box, voxel_extent_along, voxel_spacing, voxel_volume_ml
from .endplate_fit import MASK_ENDPLATE_SD_VOXELS, EndplateProfileFit, with_mask_endplate
from .endplate_model import PLANE_SLOPES, fit_plane, plate_hu_residuals
from .frames import CropSampler, Vertebra, VertebraFrame, body_cut, local_grid

AP_FRACTIONS = {"ha": 0.15, "hm": 0.50, "hp": 0.85}
"""Measurement positions: fraction of the body depth from the anterior wall (SPEC §4)."""
HALFWAY_FRACTIONS = (0.675, 0.325)
"""Depth fractions halfway between the measurement positions, in increasing ``v`` (posterior
first): the endplate profiles' other two knots."""
PROFILE_FRACTIONS = np.round(np.arange(0.15, 0.85 + 1e-9, 0.05), 6)
"""Depth fractions (from the anterior wall) at which the height profile and the endplate outline
are reported: every 5 % between the anterior and posterior measurement positions."""
MIDDLE_REGION = (0.25, 0.75)
"""Depth fractions of the middle region, where a depression of an endplate is looked for (its
deepest point, wherever it lies, rather than the fixed middle position)."""

CENTRAL_BAND = 0.15
"""Half-width of the band of lines across the body's left-right width, as a fraction of it."""

LATERAL_DISH_MM = 4.0
"""Deepest lateral dish (mm) an endplate fit may follow across the body's width, as a parabola
over the width ``W`` (curvature ``4·LATERAL_DISH_MM / W²``): the band's endplate is moved to the
mid-sagittal plane by the curvature fitted across the band (SPEC §4 measures the heights in that
plane), at most 3 % of this depth (0.12 mm), because the band spans the central 30 % of the
width. Normal endplates are concave by up to a few millimetres; the bound keeps a Schmorl's node
beside the plane from moving it further."""

THICK_VOXEL_MM = 2.0
"""Voxels spanning more than this along a vertebra's cranio-caudal axis (mm) are thick: there a
bent endplate's heights are not refined locally (the few voxels near one position add more noise
than the profile's approximation costs), the endplate fits search more thoroughly, and the exam's
plate's HU is fitted a second time (phantom benchmark)."""

AXIS_POINT_BAND_MM = 2.0
"""Half-width (mm, left-right) of the walls' windows for :meth:`BodyMeasurement.axis_point`,
at least half a voxel: the walls curve across the body, and the depth is the mid-sagittal
plane's."""

IMPRECISE_HEIGHT_SD_MM = 0.5
"""A vertebra whose endplates were fitted on the CT is flagged ``imprecise_heights`` when a
height's standard deviation from the noise (the noise's part of :attr:`VertebraHeights.ha_sd_mm` …)
exceeds this (mm): two of them, 1 mm, are 4 % of a 25 mm body, more than the grading's borderline
margin. The model's term (:data:`ENDPLATE_MODEL_SD_MM`) is left out: it is the same for every
vertebra of an exam and says nothing about this one."""

ENDPLATE_MODEL_SD_MM = 0.13
ENDPLATE_MODEL_SD_VOXELS = 0.18
"""The model's own error of one CT-fitted endplate: an SD of ``ENDPLATE_MODEL_SD_MM`` (mm) and
``ENDPLATE_MODEL_SD_VOXELS`` of the voxel's extent along the vertebra's axis in quadrature
(:meth:`BodyMeasurement.model_sd`). A height's reported SD (:attr:`VertebraHeights.ha_sd_mm`, so
``grade_uncertain`` follows) is the larger of its SD from the noise and the two endplates' model
SDs in quadrature. The first term is the cortical plate's unknown thickness (0.5–1.5 mm against
the model's 1 mm; the images do not tell it from the scanner's blur, ``docs/validation.md``), of
which half moves the surface; the second the partial-volume model's misfit across a voxel (a
dished, rimmed endplate drawn through a thick slice). The larger, not the sum in quadrature:
where the noise's SD is large (3 mm slices) it is the residual's likelihood spread, whose
residual variance already holds the misfit, and the sum over-covered (98 % within two SDs). Both
constants were measured on the independently rendered spines of ``bench_independent.py``
(issue 30), per spacing group, as what puts about 95 % of the height errors within two SDs (1 mm
voxels: a quadrature floor of 0.31 mm per height; 3 mm along the axis: 0.76–0.87 mm); never on
the phantom suite, whose images are the fit's own model."""

REFIT_REACH_MM = 1.0
"""When the plate's HU is fitted again on fitted endplates, each may shift, and tilt its end
knots, by up to this much (mm): the first fits, made with a plate 10 % off, were off by up
to 0.9 mm."""

# Plausibility limits of a vertebral body (adult T1–S1).
MIN_BODY_VOLUME_ML = 2.0
HEIGHT_LIMITS_MM = (4.0, 60.0)
DEPTH_LIMITS_MM = (8.0, 70.0)


@dataclass
class VertebraHeights:
    """Morphometry of one vertebral body. Heights in mm (NaN when not measured)."""

    level: str
    label: int
    complete: bool
    ha_mm: float = float("nan")
    hm_mm: float = float("nan")
    hp_mm: float = float("nan")
    depth_mm: float = float("nan")
    width_mm: float = float("nan")
    body_volume_ml: float = float("nan")
    frame: VertebraFrame | None = None
    height_lines_ras: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Superior and inferior end point (RAS mm) of each measured height line, keyed ha/hm/hp."""
    endplate_method: str = ""
    flags: list[str] = field(default_factory=list)
    ha_sd_mm: float = float("nan")
    hm_sd_mm: float = float("nan")
    hp_sd_mm: float = float("nan")
    """Standard deviations (mm) of the heights: the larger of the SD from the CT's noise (the two
    endplate fits' least-squares covariance, at thick slices at least their residual's likelihood
    spread; each fit combined with the mask's endplate, :data:`.endplate_fit.MASK_ENDPLATE_SD_VOXELS`)
    and the SD from the model's own errors (:data:`ENDPLATE_MODEL_SD_MM`,
    :data:`ENDPLATE_MODEL_SD_VOXELS`, measured on independently rendered images); NaN where an
    endplate comes from the mask alone."""
    height_profile_mm: tuple[float, ...] = ()
    """Height (mm) at each of :data:`PROFILE_FRACTIONS` of the depth, from the endplate profiles
    (natural splines through their five knots); empty when the endplates were not found."""
    hm_min_mm: float = float("nan")
    hm_min_fraction: float = float("nan")
    """The smallest height over the middle region (:data:`MIDDLE_REGION`) and its depth fraction:
    where a depressed endplate is deepest."""
    sagittal_area_mm2: float = float("nan")
    """Area of the body's mid-sagittal outline between 15 and 85 % of its depth (mm²): the
    integral of the height profile, the CT's analogue of a radiograph's projected area."""
    endplate_depression_mm: tuple[float, float] = (float("nan"), float("nan"))
    """Superior and inferior endplate's deepest point in the middle region below the chord
    between its anterior and posterior measurement positions (mm, positive towards the body's
    centre; 0 or negative for a flat or convex endplate)."""
    endplate_outline_ras: dict[str, np.ndarray] = field(default_factory=dict)
    """The superior and inferior endplates in the mid-sagittal plane (RAS mm, one point per
    :data:`PROFILE_FRACTIONS`), keyed ``superior``/``inferior``: the measured outline the QC
    picture draws."""
    axis_point_ras: np.ndarray | None = None
    """The body's middle on the spine's centre line (RAS mm): in the mid-sagittal plane, at the
    middle of the Hm line's height, halfway between the anterior and posterior walls as fitted on
    the CT (:meth:`BodyMeasurement.axis_point`, sub-voxel); the Hm line's midpoint (walls from the
    mask) without the CT or when a wall fit fails. None without height lines."""
    axis_point_from_ct: bool = False
    """Whether :attr:`axis_point_ras` comes from the CT-fitted walls."""
    voxel_extent_mm: tuple[float, float, float] = (float("nan"),) * 3
    """The voxel's extent (mm) along the frame's left-right, antero-posterior and cranio-caudal
    axes (:func:`.geometry.voxel_extent_along`): how finely the body was sampled in its own frame."""


class BodyMeasurement:
    """Measurement of one vertebral body in two steps: the geometry (body, depth, the band's voxels)
    when made, then the heights in :meth:`finish` with the exam's endplate plate HU."""

    def __init__(self, vertebra: Vertebra, frame: VertebraFrame, sample: CropSampler, labels_crop: np.ndarray,
                 ct_crop: np.ndarray | None, ijk_to_ras: np.ndarray, cortex_mm: float):
        """The body's geometry in its frame (mm): volume, width, the central band, the depth's walls
        from the mask's occupancy, the CT's voxels of the central band with their local
        coordinates (``ct_crop``: HU on the crop, None without the CT), and the mask's endplates."""
        self.vertebra, self.frame, self.sample = vertebra, frame, sample
        self.ijk_to_ras, self.cortex_mm, self.has_ct = ijk_to_ras, cortex_mm, ct_crop is not None
        cut = body_cut(vertebra)
        # A mask off its bone (flag mask_off_bone) gives the mask's heights, not the bone's: never graded.
        result = VertebraHeights(vertebra.level, vertebra.label,
                                 complete=not cut and "mask_off_bone" not in vertebra.flags, frame=frame,
                                 flags=list(vertebra.flags))
        if cut:
            result.flags.append("touches_field_of_view_edge")
        self.result = result
        result.body_volume_ml = float(vertebra.body.sum()) * voxel_volume_ml(ijk_to_ras)
        self.s_w = s_w = voxel_extent_along(frame.cc, ijk_to_ras)
        # Local coordinates only around the body (the endplate fits look up to 2 s_w + 1.5 mm beyond).
        reach = np.ceil((2.5 * s_w + 3.0) / voxel_spacing(ijk_to_ras)).astype(int)[::-1]  # (k, j, i)
        box = mask_box(vertebra.body)
        box = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(box, reach, vertebra.body.shape))
        box_to_ras = np.linalg.inv(sample.ras_to_crop)
        box_to_ras[:3, 3] += box_to_ras[:3, :3] @ np.array([box[2].start, box[1].start, box[0].start], dtype=float)
        body = vertebra.body[box]
        grid = local_grid(frame, box_to_ras, body.shape)
        local = grid[body].astype(float)
        self.s_v = s_v = voxel_extent_along(frame.ap, ijk_to_ras)
        s_u = voxel_extent_along(frame.lr, ijk_to_ras)
        result.voxel_extent_mm = (float(s_u), float(s_v), float(s_w))
        fine = 0.2
        u_lo, u_hi = np.percentile(local[:, 0], [0.5, 99.5])
        width = u_hi - u_lo + s_u
        self.u_mid = u_mid = 0.5 * (u_lo + u_hi)
        self.w_lo, self.w_hi = w_lo, w_hi = local[:, 2].min(), local[:, 2].max()
        v_lo, v_hi = local[:, 1].min(), local[:, 1].max()
        self.band = band = max(CENTRAL_BAND * width, 1.0)
        self.us = u_mid + np.linspace(-band, band, 7)
        self.body_f = body_f = vertebra.body.astype(np.float32)  # whole crop: the sampler's frame

        # Depth: per row of the height (rims excluded), the walls are where the occupancy averaged
        # over the mid-sagittal lines crosses one half. The posterior wall is the median row's; the
        # anterior wall the 85th percentile's, because a wedge fracture leaves the anterior wall
        # only in the lowest rows (a few rows at least survive up to a 70 % wedge).
        vs = np.arange(v_lo - 2 * s_v, v_hi + 2 * s_v, fine)
        rim = min(s_w, 0.2 * (w_hi - w_lo))
        ws = np.linspace(w_lo + rim, w_hi - rim, 15)
        depth_us = u_mid + np.linspace(-1.0, 1.0, 3) * max(0.05 * width, 1.0)
        uu, vv, ww = np.meshgrid(depth_us, vs, ws, indexing="ij")
        occupancy = sample(body_f, frame.to_ras(np.stack([uu.ravel(), vv.ravel(), ww.ravel()], axis=1)))
        rows = occupancy.reshape(uu.shape).mean(axis=0).T  # (w rows, v)
        rows = rows[rows.max(axis=1) >= 0.5]
        centres = np.argmax(rows, axis=1)
        anterior, posterior = crossings(rows, vs, centres, +1), crossings(rows, vs, centres, -1)
        self.v_ant = float(np.nanpercentile(anterior, 85)) if len(rows) else float("nan")
        self.v_post = float(np.nanmedian(posterior)) if len(rows) else float("nan")
        result.width_mm = float(width)
        result.depth_mm = float(self.v_ant - self.v_post)
        self.ws = np.arange(w_lo - 2.5 * s_w - 3.0, w_hi + 2.5 * s_w + 3.0, fine)
        if ct_crop is not None:
            # Voxels of the central band only (all fits look there), with their local coordinates.
            in_band = np.abs(grid[..., 0] - u_mid) <= band + 1e-3
            self.voxel_local = grid[in_band]  # float32: ample for mm, half the memory of 17 bodies' voxels
            self.ct_flat = ct_crop[box][in_band]
            self.other_body_flat = np.isin(labels_crop[box][in_band], (0, vertebra.label), invert=True)
        self.mask_endplates()
        self.body_f = None  # the crop-sized occupancy map is not needed any more

    def wall_plate_hu(self) -> float | None:
        """The cortical plate's HU fitted on this body's anterior and posterior walls."""
        if not self.has_ct:
            return None
        return _wall_plate_hu(self.ct_flat, self.voxel_local, self.frame, self.ijk_to_ras, self.u_mid,
                              self.band, self.v_ant, self.v_post, self.w_lo, self.w_hi, self.s_v, self.cortex_mm)

    def mask_endplates(self) -> None:
        """The mask's endplates at each measurement position (median over the bundle of lines):
        ``knots_v`` (3,) and ``edges`` (3, 2: superior, inferior), the starting point of the fits."""
        result, frame, sample = self.result, self.frame, self.sample
        knots_v, mask_edges = [], []
        for fraction in (*AP_FRACTIONS.values(), *HALFWAY_FRACTIONS):
            v_f = self.v_ant - fraction * (self.v_ant - self.v_post)
            vs_f = v_f + np.array([-0.025, 0.0, 0.025]) * result.depth_mm
            uu, vv, ww = np.meshgrid(self.us, vs_f, self.ws, indexing="ij")
            occ = sample(self.body_f, frame.to_ras(np.stack([uu.ravel(), vv.ravel(), ww.ravel()], axis=1)))
            knots_v.append(v_f)
            mask_edges.append(_mask_edges(occ.reshape(-1, len(self.ws)), self.ws))
        n = len(AP_FRACTIONS)
        self.knots_v, self.mask_edges = np.array(knots_v[:n]), np.array(mask_edges[:n])
        self.halfway_v, self.halfway_mask_edges = np.array(knots_v[n:]), np.array(mask_edges[n:])
        self.forget_fits()

    def fit_endplates(self, plate_hu: float | None, disc_hu: float | None = None,
                      straight_only: bool = False) -> list[tuple[int, float]]:
        """Fit the endplates not fitted yet on the CT (:class:`.endplate_fit.EndplateProfileFit`; straight
        ones only with ``straight_only``). An endplate whose disc is not seen beyond it (a thin
        disc at thick slices, the field of view) is fitted only when ``disc_hu`` is given: the
        exam's disc HU, or NaN when none is known (then the fit finds it). Returns
        ``(direction, disc HU)`` of the fits made with the disc in view (direction +1 superior,
        -1 inferior)."""
        discs = []
        if not self.has_ct or not np.all(np.isfinite(self.mask_edges)):
            return discs
        for side, direction in enumerate((+1, -1)):
            if self.fitted[side]:
                continue
            fit = self._fit_profile(direction, self.mask_edges[:, side], plate_hu, disc_hu, straight_only)
            if fit is not None:
                edges, disc, sd, halfway = fit
                self.edges[:, side], self.edge_sd[:, side] = with_mask_endplate(
                    edges, sd, self.mask_edges[:, side], MASK_ENDPLATE_SD_VOXELS * self.s_w)
                # The halfway knots move with the combination's shift of their two neighbours.
                order = np.argsort(self.knots_v)
                shift = (self.edges[:, side] - edges)[order]
                self.halfway_edges[:, side] = halfway + np.interp(self.halfway_v, self.knots_v[order], shift)
                self.fitted[side] = True
                if disc_hu is None:
                    discs.append((direction, disc))
        return discs

    def finish(self) -> VertebraHeights:
        """Heights Ha, Hm, Hp and their lines from the endplates found."""
        result, frame = self.result, self.frame
        noise_sd = {}
        for (key, v_f), (top, bottom), (sd_top, sd_bottom) in zip(zip(AP_FRACTIONS, self.knots_v), self.edges,
                                                                   self.edge_sd):
            if not np.isfinite(top - bottom):
                continue
            if top - bottom <= 0.0:
                # The superior endplate found at or below the inferior one (a body cut by the field
                # of view, a broken mask): that is no height, so none is reported, not a negative one.
                if "endplates_cross" not in result.flags:
                    result.flags.append("endplates_cross")
                continue
            setattr(result, f"{key}_mm", float(top - bottom))
            noise_sd[key] = float(np.hypot(sd_top, sd_bottom))
            setattr(result, f"{key}_sd_mm", float(np.fmax(noise_sd[key], np.sqrt(2.0) * self.model_sd()))
                    if np.isfinite(noise_sd[key]) else float("nan"))
            result.height_lines_ras[key] = (frame.to_ras(np.array([[self.u_mid, v_f, top]]))[0],
                                           frame.to_ras(np.array([[self.u_mid, v_f, bottom]]))[0])
        fitted = sum(self.fitted)
        result.endplate_method = "ct" if fitted == 2 else ("mixed" if fitted else "mask")
        if self.has_ct and result.endplate_method != "ct":
            result.flags.append("endplate_from_mask")
        if fitted == 2 and not max(noise_sd.get(key, np.nan) for key in AP_FRACTIONS) <= IMPRECISE_HEIGHT_SD_MM:
            result.flags.append("imprecise_heights")
        result.axis_point_ras, result.axis_point_from_ct = self.axis_point()
        self.profile()
        _check_plausible(result)
        return result

    def model_sd(self) -> float:
        """The SD (mm) of one CT-fitted endplate from the model's own errors
        (:data:`ENDPLATE_MODEL_SD_MM` and :data:`ENDPLATE_MODEL_SD_VOXELS` of the voxel's extent
        along the vertebra's axis, in quadrature): a height's SD is at least two of them in
        quadrature."""
        return float(np.hypot(ENDPLATE_MODEL_SD_MM, ENDPLATE_MODEL_SD_VOXELS * self.s_w))

    def profile(self) -> None:
        """The height profile, the deepest point of the middle region, the sagittal area, the
        endplates' depressions and outline, from the two endplate profiles: natural cubic splines
        through their five knots (the measurement positions and halfway between), the curve the
        CT fit itself uses."""
        from scipy.interpolate import CubicSpline

        result = self.result
        v = np.concatenate([self.knots_v, self.halfway_v])
        edges = np.concatenate([self.edges, self.halfway_edges])
        if not np.all(np.isfinite(edges)) or not np.all(edges[:, 0] > edges[:, 1]):
            return
        order = np.argsort(v)
        top, bottom = (CubicSpline(v[order], edges[order, side], bc_type="natural") for side in (0, 1))
        depth = self.v_ant - self.v_post
        v_of = lambda fraction: self.v_ant - np.asarray(fraction) * depth  # noqa: E731
        heights = top(v_of(PROFILE_FRACTIONS)) - bottom(v_of(PROFILE_FRACTIONS))
        result.height_profile_mm = tuple(float(h) for h in heights)
        fine = np.linspace(*MIDDLE_REGION, 101)
        v_fine = v_of(fine)
        top_fine, bottom_fine = top(v_fine), bottom(v_fine)
        middle = top_fine - bottom_fine
        deepest = int(np.argmin(middle))
        result.hm_min_mm, result.hm_min_fraction = float(middle[deepest]), float(fine[deepest])
        span = np.linspace(AP_FRACTIONS["ha"], AP_FRACTIONS["hp"], 141)
        along = top(v_of(span)) - bottom(v_of(span))
        result.sagittal_area_mm2 = float((along.sum() - 0.5 * (along[0] + along[-1])) * (span[1] - span[0]) * depth)
        v_a, v_p = v_of(AP_FRACTIONS["ha"]), v_of(AP_FRACTIONS["hp"])
        chord_t = np.interp(v_fine, [v_p, v_a], [top(v_p), top(v_a)])
        chord_b = np.interp(v_fine, [v_p, v_a], [bottom(v_p), bottom(v_a)])
        result.endplate_depression_mm = (float(np.max(chord_t - top_fine)), float(np.max(bottom_fine - chord_b)))
        points = v_of(PROFILE_FRACTIONS)
        u = np.full_like(points, self.u_mid)
        result.endplate_outline_ras = {
            "superior": self.frame.to_ras(np.stack([u, points, top(points)], axis=1)),
            "inferior": self.frame.to_ras(np.stack([u, points, bottom(points)], axis=1))}

    def axis_point(self) -> tuple[np.ndarray | None, bool]:
        """The body's middle on the spine's centre line (see :attr:`VertebraHeights.axis_point_ras`)
        and whether the CT placed it.

        The mask's walls are off by up to half an in-plane voxel, the same on every row of an
        upright body, so the point is placed between walls fitted on the CT. Each wall is fitted
        like an endplate (:func:`.endplate_model.fit_plane`: disc for the soft tissue outside,
        cortical plate, trabecular bone inside) on the voxels within :data:`AXIS_POINT_BAND_MM` of
        the mid-sagittal plane and the middle two fifths of its own height line (Ha for the
        anterior wall, Hp for the posterior one, so that a wedge's low anterior wall is still
        met)."""
        (ha_top, ha_bottom), (hm_top, hm_bottom), (hp_top, hp_bottom) = self.edges  # local w, rows as AP_FRACTIONS
        if not np.isfinite(hm_top - hm_bottom):
            return None, False
        w_mid = 0.5 * (hm_top + hm_bottom)
        midpoint = self.frame.to_ras(np.array([[self.u_mid, self.knots_v[1], w_mid]]))[0]
        if not self.has_ct or not np.isfinite(ha_top - ha_bottom + hp_top - hp_bottom):
            return midpoint, False
        band = max(AXIS_POINT_BAND_MM, 0.5 * self.result.voxel_extent_mm[0])
        walls = [_fit_wall(self.ct_flat, self.voxel_local, self.frame, self.ijk_to_ras, direction, edge, self.u_mid,
                           band, 0.5 * (top + bottom), 0.2 * abs(top - bottom), self.s_v, self.cortex_mm,
                           slopes=(0.0,))[0]
                 for direction, edge, top, bottom in ((+1, self.v_ant, ha_top, ha_bottom),
                                                      (-1, self.v_post, hp_top, hp_bottom))]
        if not np.all(np.isfinite(walls)):
            return midpoint, False
        return self.frame.to_ras(np.array([[0.0, 0.5 * (walls[0] + walls[1]), w_mid]]))[0], True

    def forget_fits(self) -> None:
        """Back to the mask's endplates, before fitting again with another plate HU."""
        self.edges = self.mask_edges.copy()
        self.halfway_edges = self.halfway_mask_edges.copy()
        self.edge_sd = np.full_like(self.mask_edges, np.nan)  # unknown for the mask's endplates
        self.fitted = [False, False]

    def plate_hu_profiles(self, plate_hus: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Per endplate whose disc is seen: its residual sum of squares (HU²) as a function of the
        cortical plate's HU (one value per entry of ``plate_hus``) and its voxel count. For each
        plate HU the endplate moves to its best fit (:func:`.endplate_model.plate_hu_residuals`): shifted along
        its axis from the mask's profile, or shifted and tilted from its fit."""
        if not self.has_ct or not np.all(np.isfinite(self.mask_edges)):
            return []
        profiles = []
        for side, direction in enumerate((+1, -1)):
            window, disc_seen = self._endplate_window(direction, self.mask_edges[:, side])
            count = int(np.count_nonzero(window))
            if not disc_seen or count < 8:
                continue
            rss = plate_hu_residuals(self.ct_flat[window], self.voxel_local[window], direction, self.knots_v,
                                     self.edges[:, side], self.frame, self.ijk_to_ras, self.cortex_mm,
                                     (REFIT_REACH_MM if self.fitted[side] else 0.5 * self.s_w + 0.8), plate_hus,
                                     tilt_search=REFIT_REACH_MM if self.fitted[side] else 0.0)
            if np.all(np.isfinite(rss)):
                profiles.append((rss, count))
        return profiles

    def _endplate_window(self, direction: int, mask_edges: np.ndarray) -> tuple[np.ndarray, bool]:
        """The central band's voxels around one endplate (a boolean over ``voxel_local``) and
        whether the disc is seen beyond it."""
        local, s_w, knots_v = self.voxel_local, self.s_w, self.knots_v
        clear = 0.5 * self.s_v + self.cortex_mm + 0.5  # keep off the anterior and posterior walls' cortex
        near = ((np.abs(local[:, 0] - self.u_mid) <= self.band) & (local[:, 1] <= self.v_ant - clear)
                & (local[:, 1] >= self.v_post + clear))
        order = np.argsort(knots_v)
        mask_w = np.interp(local[:, 1], knots_v[order], mask_edges[order])
        w_rel = direction * (local[:, 2] - mask_w)  # mm beyond the mask's endplate
        reach = 2.0 * s_w + 1.5
        limit = _outer_limits(local[:, 1], w_rel, near & self.other_body_flat, reach, self.s_v)
        window = near & (w_rel >= -reach) & (w_rel <= limit - 0.5 * s_w)
        # The disc must be seen beyond the endplate, or its intensity and the endplate's position
        # cannot be told apart: then the exam's disc HU is needed.
        outside = np.count_nonzero(window & (w_rel > 0.5 * s_w))
        return window, bool(outside >= max(4, 0.1 * np.count_nonzero(window)))

    def _fit_profile(self, direction: int, mask_edges: np.ndarray, plate_hu: float | None,
                     disc_hu: float | None,
                     straight_only: bool = False) -> tuple[np.ndarray, float, np.ndarray] | None:
        """One endplate's outer surface at the measurement positions, the disc HU and the surface's
        SD from the noise, fitted on the voxels of the central band around it; None when the disc
        is not seen and ``disc_hu`` is None, or when the fit fails. ``disc_hu`` fixes the disc HU
        only where the disc is not seen (NaN: fitted there too)."""
        window, disc_seen = self._endplate_window(direction, mask_edges)
        if not disc_seen and disc_hu is None:
            return None
        if disc_seen or np.isnan(disc_hu):  # NaN: the exam has no disc HU, fit it here too
            disc_hu = None
        s_w = self.s_w
        fit = EndplateProfileFit(self.ct_flat[window], self.voxel_local[window], direction, self.knots_v, self.frame,
                                 self.ijk_to_ras, self.cortex_mm, 0.5 * s_w + 0.8, plate_hu, disc_hu,
                                 thorough=s_w > THICK_VOXEL_MM)
        width = self.result.width_mm
        lateral = None if straight_only else (self.u_mid, 4.0 * LATERAL_DISH_MM / width ** 2)
        return fit.fit(mask_edges, local_half=max(0.05 * self.result.depth_mm, self.s_v) if s_w <= THICK_VOXEL_MM
                       else None, straight_only=straight_only, halfway=True, lateral=lateral)


def crossings(profiles: np.ndarray, coords: np.ndarray, starts: np.ndarray, direction: int,
              level: float = 0.5) -> np.ndarray:
    """Per row of ``profiles`` (``(L, W)`` samples at ``coords``), the position where it first falls
    below ``level`` walking from index ``starts[row]`` in ``direction`` (+1 or -1); linear
    interpolation between samples. NaN where it never does."""
    rows = np.arange(profiles.shape[0])
    columns = np.arange(profiles.shape[1])
    beyond = (direction * (columns[None, :] - starts[:, None]) > 0) & (profiles < level)
    if direction > 0:
        after = np.argmax(beyond, axis=1)
    else:
        after = profiles.shape[1] - 1 - np.argmax(beyond[:, ::-1], axis=1)
    before = np.clip(after - direction, 0, profiles.shape[1] - 1)
    a, b = profiles[rows, before], profiles[rows, after]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(a != b, (a - level) / (a - b), 0.5)
    out = coords[before] + t * (coords[after] - coords[before])
    return np.where(beyond.any(axis=1), out, np.nan)


def _mask_edges(occupancy: np.ndarray, ws: np.ndarray) -> tuple[float, float]:
    """Superior and inferior endplate of a bundle of cranio-caudal lines through the body mask
    (rows of ``occupancy`` sampled at ``ws``): where the occupancy crosses one half walking out
    from the body's centre (or from the line's nearest inside sample), median over the lines."""
    start = int(np.argmin(np.abs(ws)))
    inside = occupancy >= 0.5
    lines = inside.any(axis=1)
    if not lines.any():
        return float("nan"), float("nan")
    occupancy, inside = occupancy[lines], inside[lines]
    distance = np.where(inside, np.abs(np.arange(len(ws)) - start)[None, :], len(ws))
    starts = np.argmin(distance, axis=1)
    tops, bottoms = crossings(occupancy, ws, starts, +1), crossings(occupancy, ws, starts, -1)
    return float(np.nanmedian(tops)), float(np.nanmedian(bottoms))


def _outer_limits(v: np.ndarray, w_rel: np.ndarray, other: np.ndarray, reach: float, bin_mm: float) -> np.ndarray:
    """Per voxel, how far beyond the endplate (mm) a fit may look: ``reach``, but no further than
    halfway to the next vertebra in the same column (bins of ``bin_mm`` along ``v`` and their
    neighbours)."""
    bins = np.floor((v - v.min()) / bin_mm).astype(int)
    nearest = np.full(bins.max() + 3, np.inf)
    beyond = other & (w_rel > 0)
    np.minimum.at(nearest, bins[beyond] + 1, w_rel[beyond])
    nearest = np.minimum(np.minimum(nearest[:-2], nearest[1:-1]), nearest[2:])
    return np.minimum(reach, 0.5 * nearest[bins])


def _fit_wall(ct_flat, voxel_local, frame, ijk_to_ras, direction: int, edge: float, u_mid: float, band: float,
              w_centre: float, w_half: float, s_v: float, cortex_mm: float,
              slopes: np.ndarray = PLANE_SLOPES) -> tuple[float, float]:
    """The anterior (``direction`` +1) or posterior (-1) wall fitted like an endplate
    (:func:`.endplate_model.fit_plane`, the wall's normal playing the cranio-caudal axis) on the
    voxels within ``band`` of ``u_mid``, ``w_half`` of ``w_centre`` and two voxels plus 1.5 mm of
    the mask's wall ``edge`` (local mm). Returns the wall's position ``v`` and the plate's HU (NaN when no fit)."""
    if not np.isfinite(edge):
        return float("nan"), float("nan")
    swapped = VertebraFrame(frame.centre, -frame.lr, frame.cc, frame.ap)  # wall normal plays "cc"
    rel = direction * (voxel_local[:, 1] - edge)
    reach = 2.0 * s_v + 1.5
    window = ((np.abs(voxel_local[:, 0] - u_mid) <= band) & (np.abs(voxel_local[:, 2] - w_centre) <= w_half)
              & (rel >= -reach) & (rel <= reach))
    local = voxel_local[window][:, [0, 2, 1]] * np.array([-1.0, 1.0, 1.0])
    wall, _, plate_hu = fit_plane(ct_flat[window], local, direction, edge, 0.0, 0.0, swapped, ijk_to_ras,
                                  cortex_mm, 0.5 * s_v + 0.3, slopes=slopes)
    return wall, plate_hu


def _wall_plate_hu(ct_flat, voxel_local, frame, ijk_to_ras, u_mid, band, v_ant, v_post, w_lo, w_hi, s_v,
                   cortex_mm) -> float | None:
    """HU of the cortical plate (for a plate of ``cortex_mm``) fitted on the anterior and
    posterior walls (:func:`_fit_wall`, the middle two fifths of the body's height), where the
    grid is usually finer than across the endplates. Median of the walls that give a fit; None
    when neither does."""
    plate_hus = [_fit_wall(ct_flat, voxel_local, frame, ijk_to_ras, direction, edge, u_mid, band, 0.5 * (w_lo + w_hi),
                           0.2 * (w_hi - w_lo), s_v, cortex_mm)[1]
                 for direction, edge in ((+1, v_ant), (-1, v_post))]
    plate_hus = [c for c in plate_hus if np.isfinite(c)]
    return float(np.median(plate_hus)) if plate_hus else None


def _check_plausible(result: VertebraHeights) -> None:
    """Mark ``result`` incomplete, with the reasons as flags, when its heights are not all measured
    or outside :data:`HEIGHT_LIMITS_MM`, its depth outside :data:`DEPTH_LIMITS_MM` or its body
    smaller than :data:`MIN_BODY_VOLUME_ML`: such a body is not an adult vertebral body (T1–S1)
    as measured, and is not graded."""
    reasons = []
    heights = [result.ha_mm, result.hm_mm, result.hp_mm]
    if not all(np.isfinite(heights)):
        reasons.append("heights_not_measurable")
    elif min(heights) < HEIGHT_LIMITS_MM[0] or max(heights) > HEIGHT_LIMITS_MM[1]:
        reasons.append("implausible_height")
    if not (DEPTH_LIMITS_MM[0] <= result.depth_mm <= DEPTH_LIMITS_MM[1]):
        reasons.append("implausible_depth")
    if result.body_volume_ml < MIN_BODY_VOLUME_ML:
        reasons.append("implausible_body_volume")
    if reasons:
        result.complete = False
        result.flags.extend(reasons)
