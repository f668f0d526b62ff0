"""One endplate's outer surface over the body's depth, fitted to the CT (step 4 of :mod:`.morphometry`).

All positions are in the vertebra's local frame (:class:`.frames.VertebraFrame`), mm: ``v``
antero-posterior (the depth), ``w`` cranio-caudal. The endplate is a profile ``w(v)``: either
straight, or the natural cubic spline through its heights (knots) at the three measurement
positions and halfway between them, extended linearly beyond the end knots. A wedge, a crush or
physiological wedging is nearly straight or bent once; a biconcave depression is smooth and
deepest at mid-depth. The voxels around it are modelled by :mod:`.endplate_model` (disc outside,
a cortical plate, trabecular bone), and every voxel of the depth informs the tissues' HU and the
slopes, so the fit holds at 3 mm slices where the few voxels around one measurement position
cannot. :class:`EndplateProfileFit` fits one endplate; :func:`with_mask_endplate` combines the
fit with the mask's endplate.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, stats

from ..geometry import voxel_extent_along
from .endplate_model import (box_density, natural_spline_basis, parabolic_minimum, solve_linear, surface_kernel,
                             tilt_shape, tissue_model, tissue_shares)
from .frames import VertebraFrame

BEND_FALSE_ALARM = 0.001
"""An endplate is fitted bent rather than straight only when the straight fit's excess residual
would arise by noise alone with at most this probability (a chi-squared test, and at least the
Bayesian information criterion). With the criterion alone (about 3 % at 3 mm slices, where an
endplate has about 100 voxels) noise bent flat endplates."""

MIN_BEND_MM = 0.3
"""A bent endplate that dishes into the body (the normal concave endplate, a biconcave
depression) must also depart from the straight fit by at least this much (mm) at some knot. The
threshold is in millimetres, not in voxels: the normal dish is 1–3 mm deep whatever the slices,
and a third of a voxel (1 mm at 3 mm slices, the earlier rule for every bend) fitted most dished
endplates straight at thick and oblique slices, so that Hm read long by up to the dish's depth
(issue 30). 0.3 mm is the old rule's value at 1 mm voxels; on the independent images 0 and 0.3
mm gave the same heights, on the phantom suite 0.3 mm kept flat endplates flat (0.7x0.7x3 mm p90
0.17 mm against 0.18 mm with none)."""

MIN_BEND_VOXELS = 1.0 / 3.0
"""Any other bent endplate (one that bulges towards the disc somewhere more than it dishes) must
depart from the straight fit by at least this fraction of the voxel's extent along the vertebra's
axis (1 mm at 3 mm slices), and at least :data:`MIN_BEND_MM`. The partial-volume model is not
exact (a plate drawn on sub-voxel samples, whole-number HU, neighbouring structures), and with
the thousand voxels of an endplate at 0.7x0.7x3 mm the test above accepts bends that only fit that
misfit: a flat thoracic endplate facing a thin disc bulged by 0.2 mm and moved Ha by 0.75 mm
(``Testing/test_morphometry.py::test_thin_thoracic_discs_at_thick_slices``). Fractures' and
dishes' bends are concave."""

LATERAL_STEPS = 21
"""Grid of curvatures of the lateral search (:meth:`EndplateProfileFit.lateral_offset`), refined by
a parabola."""

LINE_SEARCH_STEP_MM = 0.3
"""Grid step of the endplate fits' line searches (mm); the least-squares polish refines them."""

THOROUGH_BENT_SWEEPS = 4
"""Sweeps of line searches for a bent endplate in a thorough fit (thick slices)."""

PROFILE_STEP_MM = 0.1
"""Grid step (mm) of the endplate's residual profile behind its reported SD at thick slices."""

SWEEP_TOLERANCE_MM = 0.02
"""The endplate fits' line searches stop when a sweep moves no knot by more than this (mm)."""

MASK_ENDPLATE_SD_VOXELS = 0.5
"""Standard deviation of the mask's endplate as a fraction of the voxel's extent along the
vertebra's axis. Each endplate fitted on the CT is combined with the mask's by inverse variance
(:func:`with_mask_endplate`): the fit decides where the noise lets it (its SD is a few hundredths
of a millimetre at 1 mm voxels and rarely above 0.3 mm at 3 mm), the mask where the fit cannot
find the endplate (an osteoporotic body as dense as its thin disc at 3 mm slices: SDs of
1–5 mm). The phantoms' masks (the true shape sampled at voxel centres) give heights within
0.23–0.36 of a voxel RMS; a segmentation model's mask is rarely better than half a voxel, the
value taken."""


class EndplateProfileFit:
    """The fit of one endplate's profile to the CT values of the voxels around it.

    ``values`` (HU) are the voxels at local ``(u, v, w)`` ``local`` (N, 3, mm); ``direction`` is
    +1 for a superior endplate (body below), -1 for an inferior one; ``knots_v`` the measurement
    positions (local ``v``, mm, any order). Each voxel's HU is ``a·(1 - inside) + t·(inside -
    plate) + plate_hu·plate`` (:mod:`.endplate_model`, a plate of ``cortex_mm``); ``t`` and ``a``
    (unless ``disc_hu`` fixes it) are solved by least squares for each candidate profile;
    ``plate_hu`` is the exam's, or, when None, free too (as a contrast over the bone, which must
    be positive). The knots are searched within ``search`` (mm) of the mask's endplate, where the
    fit looks (beyond it, a thin disc away, lies the neighbour's endplate); ``sweeps`` bounds the
    line searches' sweeps and ``thorough`` searches more widely (thick slices, where an endplate
    has a few hundred voxels). :meth:`fit` runs the fit.

    The profile's knots ``kv`` are the measurement positions in increasing ``v`` with one halfway
    between each two: with the three alone a biconcave depression was fitted as a triangle, and a
    piecewise linear profile through five overshot at its deepest knot, hence the spline."""

    def __init__(self, values: np.ndarray, local: np.ndarray, direction: int, knots_v: np.ndarray,
                 frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float, search: float,
                 plate_hu: float | None, disc_hu: float | None = None, sweeps: int = 1, thorough: bool = False):
        self.values, self.direction, self.frame, self.ijk_to_ras = values, direction, frame, ijk_to_ras
        self.cortex_mm, self.search, self.plate_hu, self.disc_hu = cortex_mm, search, plate_hu, disc_hu
        self.sweeps, self.thorough = sweeps, thorough
        self.order = np.argsort(knots_v)
        self.measured_v = measured_v = np.asarray(knots_v, dtype=float)[self.order]
        self.kv = kv = np.empty(2 * len(measured_v) - 1)
        kv[0::2], kv[1::2] = measured_v, 0.5 * (measured_v[1:] + measured_v[:-1])
        self.u, self.v, self.w = local[:, 0], local[:, 1], local[:, 2]
        self.segment = np.clip(np.searchsorted(kv, self.v) - 1, 0, len(kv) - 2)
        self.dv = np.diff(kv)
        # The profile is linear in its knots: surface(v) = basis(v) @ knots, so a line search only
        # adds a multiple of basis @ direction.
        self.basis = natural_spline_basis(kv, self.v)
        self.free, self.disc_fixed = plate_hu is None, disc_hu is not None
        self.offsets = np.arange(-search, search + 1e-9, LINE_SEARCH_STEP_MM)
        self.shift, self.tilt = np.ones(len(kv)), tilt_shape(kv, kv)
        self.knot_moves = list(np.eye(len(kv)))

    def in_window(self, candidates: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Whether each candidate profile (rows of knots, local ``w`` mm) keeps every knot within
        ``search`` of ``centre``: the fit looks only near the mask's endplate, because beyond it
        lies the neighbour's."""
        return np.all(np.abs(np.atleast_2d(candidates) - centre) <= self.search + 1e-9, axis=1)

    def kernel(self, knots: np.ndarray) -> tuple:
        """The partial-volume share along the mean normal of the profile ``knots`` (local ``w`` at
        ``kv``, mm; :func:`.endplate_model.surface_kernel`) and, per voxel, the factor from a
        difference in ``w`` (mm) to the depth inside the body along its segment's normal (signed
        by ``direction``): one kernel for the whole profile, because its slopes vary little."""
        slopes = np.diff(knots) / self.dv
        cdf = surface_kernel(self.frame, float(np.mean(slopes)), self.ijk_to_ras)
        return cdf, self.direction / np.sqrt(1.0 + slopes[self.segment] ** 2)

    def residuals(self, surfaces: np.ndarray, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residual sum of squares (HU²) and disc HU for candidate surfaces ``(K, N)`` (each voxel's
        surface ``w``, local mm) near the profile ``knots``, whose slopes set the partial-volume
        kernel and the distance along the normal (taken from ``knots`` because they vary little
        within a line search, which keeps each candidate one linear solve). Inf where the free
        plate is not brighter than the bone."""
        cdf, scale = self.kernel(knots)
        depth = scale * (surfaces - self.w)  # inside the body, mm
        inside, plate = tissue_shares(cdf, depth, self.cortex_mm)
        columns, target = tissue_model(self.values[None, :], inside, plate, self.plate_hu, self.disc_hu)
        coef, residual = solve_linear(columns, np.broadcast_to(target, inside.shape))
        if self.free:
            residual[~(coef[:, -1] > 0)] = np.inf
        return residual, (np.full(len(coef), self.disc_hu) if self.disc_fixed else coef[:, 0])

    def evaluated(self, knots: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The profile ``knots`` (local ``w`` at ``kv``, mm) with its residual (HU²) and disc HU: the
        triple every step of the fit passes on, so that the best one can be kept."""
        residual, discs = self.residuals((self.basis @ knots)[None, :], knots)
        return knots, float(residual[0]), float(discs[0])

    def line_searches(self, knots: np.ndarray, directions: list[np.ndarray], centre: np.ndarray,
                      sweeps: int | None = None) -> tuple[np.ndarray, float, float]:
        """Line searches along ``directions`` (moves of the knots, mm per unit) on a grid of
        :data:`LINE_SEARCH_STEP_MM` within ``search`` of ``centre``, each refined by a parabola,
        repeated until a sweep moves no knot by more than :data:`SWEEP_TOLERANCE_MM` (at most
        ``sweeps`` times, default the fit's); the final knots, residual and disc HU. A grid
        search first, because the residual has local minima a gradient method would stop in."""
        for _ in range(self.sweeps if sweeps is None else sweeps):
            start = knots.copy()
            for direction_k in directions:
                candidates = knots[None, :] + self.offsets[:, None] * direction_k[None, :]
                surfaces = (self.basis @ knots)[None, :] + self.offsets[:, None] * (self.basis @ direction_k)[None, :]
                residual, _ = self.residuals(surfaces, knots)
                residual[~self.in_window(candidates, centre)] = np.inf
                if np.isfinite(residual).any():
                    knots = knots + parabolic_minimum(self.offsets, residual) * direction_k
            if np.max(np.abs(knots - start)) < SWEEP_TOLERANCE_MM:
                break
        return self.evaluated(knots)

    def projected(self, knots: np.ndarray, span: np.ndarray) -> VariableProjection:
        """The residual vector and its Jacobian as functions of the move ``span @ p`` of the profile
        ``knots`` (:class:`VariableProjection`), for the least-squares polish and the covariance."""
        return VariableProjection(self, knots, span)

    def polish(self, knots: np.ndarray, rss: float, disc: float, directions: list[np.ndarray],
               centre: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Least-squares refinement of ``knots`` (local ``w``, mm) within the span of
        ``directions`` (the line searches' grid result ``knots, rss, disc`` is the start): the
        knots are correlated, and line searches along fixed directions converge slowly (two sweeps
        could leave a flat endplate bent by most of a millimetre at 3 mm slices). Kept only when
        it lowers the residual and stays within ``search`` of ``centre``."""
        if not np.isfinite(rss):
            return knots, rss, disc
        span = np.stack(directions, axis=1)
        projection = self.projected(knots, span)
        fit = optimize.least_squares(projection.residual, np.zeros(span.shape[1]), jac=projection.jacobian,
                                     x_scale=0.1, xtol=1e-4, max_nfev=60)
        polished = knots + span @ fit.x
        if not self.in_window(polished, centre)[0]:
            return knots, rss, disc
        result = self.evaluated(polished)
        return result if result[1] < rss else (knots, rss, disc)

    def knot_sd(self, knots: np.ndarray, directions: list[np.ndarray], centre: np.ndarray) -> np.ndarray:
        """Standard deviation (mm) of each knot of the fitted profile ``knots`` from the noise of the
        voxel values: the least-squares covariance ``s² (JᵀJ)⁻¹`` of the moves along
        ``directions``, with ``s²`` the residual variance (HU²), mapped to the knots; with
        ``thorough`` at least :meth:`profile_sd` (within ``search`` of ``centre``, where the fit
        looked), because at thick slices the residual is bumpy and the covariance too small. Inf
        where the data do not determine the profile."""
        span = np.stack(directions, axis=1)
        projection = self.projected(knots, span)
        p0 = np.zeros(span.shape[1])
        residual, jac = projection.residual(p0), projection.jacobian(p0)
        linear = 1 + (not self.disc_fixed) + self.free  # the tissue model's coefficients (tissue_model)
        dof = len(residual) - span.shape[1] - linear
        normal = jac.T @ jac
        if dof <= 0 or np.linalg.cond(normal) > 1e12:
            return np.full(len(knots), np.inf)
        variance = residual @ residual / dof
        covariance = span @ np.linalg.inv(normal) @ span.T * variance
        sd = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        if self.thorough:
            sd = np.maximum(sd, self.profile_sd(knots, len(directions) > 2, variance, centre))
        return sd

    def profile_sd(self, knots: np.ndarray, bent: bool, variance: float, centre: np.ndarray) -> np.ndarray:
        """Per knot, the spread (mm) of the residual's relative likelihood
        ``exp(-(rss - rss_min) / 2σ²)`` (``σ²``: ``variance``, HU²) along a shift and a tilt of the
        whole endplate and, when ``bent``, moves of each knot alone: the root mean square of the
        move over a grid of :data:`PROFILE_STEP_MM`, as far as the fit looked (``search`` around
        ``centre``). Unlike the covariance (the residual's curvature at its optimum) it sees a
        residual made bumpy by the noise across a thick slice, where the fit jumps between nearby
        minima from one noise draw to the next."""
        steps = np.arange(1, int(self.search / PROFILE_STEP_MM) + 1) * PROFILE_STEP_MM
        steps = np.concatenate([-steps[::-1], [0.0], steps])
        moves = [self.shift, self.tilt] + (list(np.eye(len(knots))) if bent else [])
        sd = np.zeros(len(knots))
        for move in moves:
            candidates = knots[None, :] + steps[:, None] * move[None, :]
            surfaces = (self.basis @ knots)[None, :] + steps[:, None] * (self.basis @ move)[None, :]
            rss, _ = self.residuals(surfaces, knots)
            rss[~self.in_window(candidates, centre)] = np.inf
            finite = np.isfinite(rss)
            if not finite[len(steps) // 2]:
                continue
            likelihood = np.exp(-(rss[finite] - rss[finite].min()) / (2.0 * variance))
            spread = float(np.sqrt(np.sum(likelihood * steps[finite] ** 2) / np.sum(likelihood)))
            sd = np.maximum(sd, spread * np.abs(move))
        return sd

    def fit_straight(self, guess_line: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The straight endplate (knots, residual, disc HU), searched near ``guess_line`` (the
        straight line closest to the mask's endplate, local ``w`` at ``kv``, mm): with
        ``thorough`` from the best of the whole grid of shifts and tilts within the window (its
        corners, a full shift plus a full tilt, left out: they reach twice as far at the end
        knots, where a flat endplate was tilted onto its neighbour), else by line searches; then
        polished. Thick slices need the grid because line searches stall in local minima there."""
        straight_start = None
        if self.thorough:
            grid = (guess_line[None, None, :] + self.offsets[:, None, None] * self.shift[None, None, :]
                    + self.offsets[None, :, None] * self.tilt[None, None, :]).reshape(-1, len(self.kv))
            grid = grid[self.in_window(grid, guess_line)]  # holds guess_line itself (no shift, no tilt)
            residual, _ = self.residuals(grid @ self.basis.T, guess_line)
            straight_start = self.evaluated(grid[int(np.argmin(residual))]) if np.isfinite(residual).any() else None
        if straight_start is None:
            straight_start = self.line_searches(guess_line, [self.shift, self.tilt], guess_line)
        return self.polish(*straight_start, [self.shift, self.tilt], guess_line)

    def fit_bent(self, guess: np.ndarray, straight: np.ndarray, rss_straight: float) -> tuple[np.ndarray, float, float]:
        """The bent endplate (knots, residual, disc HU), searched near the mask's endplate ``guess``
        (local ``w`` at ``kv``, mm): shift and tilt, then each knot, then polished; with
        ``thorough`` also from the ``straight`` fit (when it has a finite ``rss_straight``) with
        :data:`THOROUGH_BENT_SWEEPS` sweeps, the better kept, because from the mask alone the
        knots stalled in local minima at thick slices."""
        bent_sweeps = THOROUGH_BENT_SWEEPS if self.thorough else self.sweeps
        bent_start, _, _ = self.line_searches(guess.copy(), [self.shift, self.tilt], guess)
        bent = self.polish(*self.line_searches(bent_start, self.knot_moves, guess, bent_sweeps), self.knot_moves,
                           guess)
        if self.thorough and np.isfinite(rss_straight):
            other = self.polish(*self.line_searches(straight.copy(), self.knot_moves, guess, bent_sweeps),
                                self.knot_moves, guess)
            if other[1] < bent[1]:
                bent = other
        return bent

    def bend_is_real(self, straight: np.ndarray, rss_straight: float, bent: np.ndarray | None,
                     rss_bent: float) -> bool:
        """Whether the data ask for the bent profile: its residual (HU²) is finite and, unless the
        straight one's is not, lower by more than noise would make it (:data:`BEND_FALSE_ALARM`,
        at least the Bayesian information criterion) and it departs from the straight knots (mm)
        by at least :data:`MIN_BEND_MM` when it dishes into the body below the chord between its end
        knots more than it bulges above it, else :data:`MIN_BEND_VOXELS` of a voxel: noise and the
        model's misfit must not bend a flat endplate."""
        n = len(self.values)
        extra = len(self.kv) - 2  # parameters the bent profile has beyond the straight one
        evidence = max(extra * np.log(n), float(stats.chi2.isf(BEND_FALSE_ALARM, extra)))
        dish = False
        if bent is not None:  # below the chord between its end knots, into the body (> 0)
            chord = bent[0] + (bent[-1] - bent[0]) * (self.kv - self.kv[0]) / (self.kv[-1] - self.kv[0])
            dip = -self.direction * (bent - chord)[1:-1]
            dish = bool(dip.max() >= -dip.min())
        min_bend = MIN_BEND_MM if dish else max(MIN_BEND_MM, MIN_BEND_VOXELS * voxel_extent_along(
            self.frame.cc, self.ijk_to_ras))
        return bool(np.isfinite(rss_bent) and (
            not np.isfinite(rss_straight)
            or (n * np.log(max(rss_straight, 1e-9) / max(rss_bent, 1e-9)) > evidence
                and np.max(np.abs(bent - straight)) >= min_bend)))

    def lateral_offset(self, knots: np.ndarray, centre_u: float, max_curvature: float) -> float:
        """How far (mm along ``w``) the endplate lies in the mid-sagittal plane ``u = centre_u``
        beyond the profile ``knots`` fitted over the whole band: the profile's voxels span the
        band's width, so it is the endplate averaged across the band, and a dished endplate is
        deepest in the middle. The surface gets a lateral parabola ``c·((u - centre_u)² - m)``
        (``m`` the voxels' mean of ``(u - centre_u)²``, so that the band's mean stays put) with
        ``c`` searched on :data:`LATERAL_STEPS` curvatures within ``±max_curvature`` (1/mm) and
        refined by a parabola; the offset is ``-c·m``. The bound keeps a Schmorl's node beside the
        plane from dragging the plane into its pit by more than a dish could."""
        q = (self.u - centre_u) ** 2
        mean_q = float(q.mean())
        if not (mean_q > 0.0 and max_curvature > 0.0):
            return 0.0
        curvatures = np.linspace(-max_curvature, max_curvature, LATERAL_STEPS)
        surfaces = (self.basis @ knots)[None, :] + curvatures[:, None] * (q - mean_q)[None, :]
        residual, _ = self.residuals(surfaces, knots)
        if not np.isfinite(residual).any():
            return 0.0
        curvature = float(np.clip(parabolic_minimum(curvatures, residual), -max_curvature, max_curvature))
        return -curvature * mean_q

    def refine_locally(self, knots: np.ndarray, disc: float, local_half: float) -> np.ndarray:
        """A bent profile's knots (local ``w``, mm) each refined on the voxels within ``local_half``
        (mm along ``v``) of its position, with the profile's ``disc`` HU, the plate's HU and the
        local slope fixed (a grid of 0.05 mm within 1 mm, refined by a parabola; knots with fewer
        than 8 voxels kept): a bent endplate (a biconcave fracture) is only approximately the
        spline, and the voxels near one position know its height best."""
        slopes = np.diff(knots) / self.dv
        local_slopes = [slopes[0]] + [0.5 * (a + b) for a, b in zip(slopes[:-1], slopes[1:])] + [slopes[-1]]
        refined = knots.copy()
        steps = np.arange(-1.0, 1.0 + 1e-9, 0.05)
        v, w = self.v, self.w
        for k, slope in enumerate(local_slopes):
            near = np.abs(v - self.kv[k]) <= local_half
            if np.count_nonzero(near) < 8:
                continue
            cdf = surface_kernel(self.frame, slope, self.ijk_to_ras)
            surface = knots[k] + steps[:, None] + slope * (v[near] - self.kv[k])[None, :]
            depth = self.direction * (surface - w[near][None, :]) / np.sqrt(1.0 + slope * slope)
            inside, plate = tissue_shares(cdf, depth, self.cortex_mm)
            _, residual = solve_linear(*tissue_model(self.values[near][None, :], inside, plate, self.plate_hu, disc))
            if np.isfinite(residual).any():
                refined[k] = knots[k] + parabolic_minimum(steps, residual)
        return refined

    def fit(self, edges_guess: np.ndarray, local_half: float | None = None, straight_only: bool = False,
            halfway: bool = False, lateral: tuple[float, float] | None = None) -> tuple | None:
        """Fit the endplate from the mask's endplate ``edges_guess`` (local ``w`` at ``knots_v``,
        mm, same order): the straight profile (:meth:`fit_straight`) and, unless
        ``straight_only``, the bent one (:meth:`fit_bent`), which is kept only when the data ask
        for it (:meth:`bend_is_real`); a kept bent profile is refined locally
        (:meth:`refine_locally`) when ``local_half`` is given and the plate's HU is known. With
        ``lateral`` (``centre_u``, ``max_curvature``) the profile is moved to the mid-sagittal
        plane (:meth:`lateral_offset`).

        Returns the surface's ``w`` at ``knots_v`` (same order), the disc HU and the standard
        deviation of the surface at ``knots_v`` from the noise (:meth:`knot_sd`; mm, inf where the
        data do not determine it), or None when fewer than 8 voxels are given or no fit has a
        bright plate. With ``halfway`` a fourth element follows: the surface's ``w`` at the knots
        halfway between consecutive measurement positions, in increasing ``v``."""
        if len(self.values) < 8:
            return None
        guess = np.interp(self.kv, self.measured_v, np.asarray(edges_guess, dtype=float)[self.order])
        # The straight endplate is searched near the straight line closest to the mask's endplate
        # (bent by up to a voxel at thick slices), the bent one near the mask's endplate itself.
        line = np.stack([self.shift, self.tilt], axis=1)
        guess_line = line @ np.linalg.lstsq(line, guess, rcond=None)[0]
        straight, rss_straight, disc_straight = self.fit_straight(guess_line)
        bent, rss_bent, disc_bent = (None, np.inf, None) if straight_only else self.fit_bent(guess, straight,
                                                                                               rss_straight)
        if self.bend_is_real(straight, rss_straight, bent, rss_bent):
            knots, disc, sd = bent, disc_bent, self.knot_sd(bent, self.knot_moves, guess)
            if local_half is not None and not self.free:
                knots = self.refine_locally(knots, disc, local_half)
        elif np.isfinite(rss_straight):
            knots, disc, sd = straight, disc_straight, self.knot_sd(straight, [self.shift, self.tilt], guess_line)
        else:
            return None
        if lateral is not None:
            knots = knots + self.lateral_offset(knots, *lateral)
        result, result_sd = np.empty(len(self.measured_v)), np.empty(len(self.measured_v))
        result[self.order], result_sd[self.order] = knots[0::2], sd[0::2]
        if halfway:
            return result, disc, result_sd, knots[1::2].copy()
        return result, disc, result_sd


class VariableProjection:
    """An endplate's residual vector (HU, one per voxel) and its Jacobian (HU per unit of ``p``) as
    functions of ``p``, the move ``span @ p`` (local ``w``, mm) of the profile ``knots``
    (``span``: (knots, P)), with the tissue model's linear coefficients solved for each ``p``
    (variable projection): the nonlinear search then runs over the few knot moves alone. The
    slopes, the partial-volume kernel and the distance along the normal are those of ``knots``."""

    def __init__(self, fit: EndplateProfileFit, knots: np.ndarray, span: np.ndarray):
        self.fit, self.knots, self.span = fit, knots, span
        self.cdf, self.scale = fit.kernel(knots)
        self.moves = self.scale[:, None] * (fit.basis @ span)  # d depth / d p, (N, P)
        self._key, self._parts = None, None

    def parts(self, p: np.ndarray) -> tuple:
        """Depth (mm inside the body), design matrix, its Gram matrix, whether that is solvable,
        the linear coefficients (HU) and the residual vector (HU) at ``p``; the last ``p``'s are
        kept, because the optimiser asks for the residual and the Jacobian at the same point."""
        key = p.tobytes()
        if key != self._key:
            fit = self.fit
            depth = self.scale * (fit.basis @ (self.knots + self.span @ p) - fit.w)
            inside, plate = tissue_shares(self.cdf, depth, fit.cortex_mm)
            columns, target = tissue_model(fit.values, inside, plate, fit.plate_hu, fit.disc_hu)
            design = np.stack(columns, axis=1)
            gram = design.T @ design
            solvable = np.linalg.cond(gram) < 1e12
            coef = np.linalg.solve(gram, design.T @ target) if solvable else np.zeros(len(gram))
            self._key, self._parts = key, (depth, design, gram, solvable, coef, target - design @ coef)
        return self._parts

    def residual(self, p: np.ndarray) -> np.ndarray:
        """The residual vector (HU, one per voxel) at ``p``."""
        return self.parts(p)[-1]

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """The residual's Jacobian (HU per unit of ``p``) by Kaufman's approximation: the derivative
        with the linear coefficients held, projected off the design's columns (cheaper than the
        exact variable-projection Jacobian and as good near the optimum)."""
        depth, design, gram, solvable, coef, _ = self.parts(p)
        fit = self.fit
        d_inside = box_density(self.cdf, depth)
        d_plate = d_inside - box_density(self.cdf, depth - fit.cortex_mm)
        if fit.free:  # HU = a + b·inside + c·plate
            inside_weight, plate_weight = coef[-2], coef[-1]
        else:  # HU = a·(1 - inside) + t·(inside - plate) + plate_hu·plate
            disc = fit.disc_hu if fit.disc_fixed else coef[0]
            inside_weight, plate_weight = coef[-1] - disc, fit.plate_hu - coef[-1]
        jac = -(inside_weight * d_inside + plate_weight * d_plate)[:, None] * self.moves
        if solvable:
            jac -= design @ np.linalg.solve(gram, design.T @ jac)
        return jac


def with_mask_endplate(fitted: np.ndarray, fitted_sd: np.ndarray, mask: np.ndarray,
                       mask_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance combination of an endplate fitted on the CT (``fitted``, its SD from the
    noise ``fitted_sd``; 0: exact, inf or NaN: undetermined) with the mask's (``mask``, SD
    ``mask_sd``), per knot (local ``w``, mm). Returns the combined endplate and its SD (mm): the
    fit decides where the noise lets it, the mask where the fit cannot find the endplate."""
    fitted_sd = np.where(np.isnan(fitted_sd), np.inf, fitted_sd)
    exact = fitted_sd == 0.0
    with np.errstate(divide="ignore"):
        weight = np.where(exact, 0.0, 1.0 / fitted_sd ** 2)
    mask_weight = 1.0 / mask_sd ** 2
    combined = (weight * fitted + mask_weight * mask) / (weight + mask_weight)
    combined_sd = 1.0 / np.sqrt(weight + mask_weight)
    return np.where(exact, fitted, combined), np.where(exact, 0.0, combined_sd)
