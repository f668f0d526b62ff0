"""The phantom's anatomy as a scene: vertebrae, discs, tubes that follow the spine curve and the
body envelope, and :meth:`SpineScene.paint`, which gives the tissue, HU and labels of any points.

Everything is in the anatomy frame (mm, see :mod:`.anatomy` for the frames and dimensions):

* vertebral bodies (:class:`.shapes.VertebraModel`) with a cortical shell of ``cortex_mm``
  around a trabecular core; physiological wedging at T6–T9 and T11–L1 and L5's short posterior
  wall;
* intervertebral discs filling the space between adjacent endplates;
* posterior elements (pedicles, lamina, spinous and transverse processes) around a spinal canal
  (CSF) holding the spinal cord down to the L1/L2 disc;
* autochthonous back muscles and iliopsoas as tubes that follow the spine curve, with
  intramuscular fat as a lattice of spheres occupying a chosen volume fraction;
* the aorta (native or contrast-enhanced) down to L4, and a body envelope with subcutaneous fat;
* the optional cases: ribs (:mod:`.ribs`), lesions, cement and screws in a vertebra
  (:mod:`.inserts`), a column with 4 or 6 lumbar vertebrae or a T13 (:mod:`.column`), and with a
  contrast phase the vena cava, portal vein and kidneys (:mod:`.organs`).

Each structure is evaluated only on points whose box it can reach, from the top of the painter's
order down, each point by the first structure that holds it. The HU of a painted tissue is the
spec's (:meth:`.spec.PhantomSpec.tissue_hu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import levels as lv
from .anatomy import SpineCurve, layout_levels, level_dimensions
from .column import column_of
from .inserts import insert_keys, insert_parts
from .organs import hu_keys, make_kidneys, paint_kidneys, vessel_tubes, widen_box
from .ribs import FOV_LENGTH_MM, RIB_RADIUS_MM, make_rib, paint_ribs
from .shapes import VertebraModel, _boxes_meet, _dot, _in_box, _in_fat_lattice
from .spec import TISSUES, VERSE_SACRUM, PhantomSpec

_HINTED_ITERATIONS = 3
"""Newton iterations for a foot point on the spine curve from a hint a few millimetres off (see
:meth:`SpineScene.paint`)."""


@dataclass
class Tube:
    """A structure that follows the spine curve: elliptic cross-section (semi-axes ``r_ap``,
    ``r_lr``) centred at offsets ``(c_ap, c_lr)`` from the curve, all functions of arc length."""

    name: str
    s_range: tuple[float, float]
    c_ap: callable
    c_lr: callable
    r_ap: callable
    r_lr: callable
    tissue: int  # a TISSUES code; its HU is the spec's (PhantomSpec.tissue_hu)
    total_label: int = 0
    fat_fraction: float = 0.0
    lattice_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def inside(self, s, n_ap, n_lr):
        ok = (s >= self.s_range[0]) & (s <= self.s_range[1])
        return ok & (((n_ap - self.c_ap(s)) / self.r_ap(s)) ** 2 + ((n_lr - self.c_lr(s)) / self.r_lr(s)) ** 2 <= 1.0)


class SpineScene:
    """The phantom's anatomy: vertebrae, discs, tubes and envelope, in the anatomy frame."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed + 1)
        fractures = {f.level: f for f in spec.fractures}
        # 1. Shapes of all levels C7–S1 (the anatomy does not depend on which levels are drawn).
        self.column = column_of(spec)
        all_levels = list(self.column.names)
        models: dict[str, VertebraModel] = {}
        for name in all_levels:
            dims = level_dimensions(name)
            ratio = dims.normal_ha_hp if spec.physiological_wedging else 1.0
            hp0 = 2.0 * dims.height_mm / (1.0 + ratio)
            models[name] = VertebraModel(name, 0.0, dims.width_mm / 2, dims.depth_mm / 2, ratio * hp0, hp0,
                                         fractures.get(name))
        extents = {name: m.extents() for name, m in models.items()}
        centres = layout_levels({n: e[0] for n, e in extents.items()}, {n: e[1] for n, e in extents.items()},
                                all_levels)
        self.curve = SpineCurve(centres, spec.lordosis_deg, spec.kyphosis_deg, spec.scoliosis_deg)
        for name, model in models.items():
            model.s = centres[name]
            c, e_lr, e_ap, e_cc = self.curve.frame(model.s)
            model.centre, model.axes = c, np.stack([e_lr, e_ap, e_cc])
        self.models = models
        self.extents = extents
        self.levels = self.column.drawn(spec.levels)  # drawn levels, cranial first
        if not self.levels:
            raise ValueError(f"none of the levels {', '.join(spec.levels)} is in this spine")
        # Disc mid-planes: arc length halfway between the adjacent endplates.
        self.disc_mid_s: dict[tuple[str, str], float] = {}
        for upper, lower in zip(all_levels[:-1], all_levels[1:]):
            top_of_lower = centres[lower] + extents[lower][0]
            bottom_of_upper = centres[upper] - extents[upper][1]
            self.disc_mid_s[(upper, lower)] = 0.5 * (top_of_lower + bottom_of_upper)
        first, last = self.levels[0], self.levels[-1]
        self.s_low = self._slab_limits(last)[0] - spec.fov_margin_mm
        self.s_high = self._slab_limits(first)[1] + spec.fov_margin_mm
        self.tubes = self._make_tubes(rng)
        self.kidneys = make_kidneys(self) if spec.phase is not None else []
        self.ribs = [make_rib(models[name], level_dimensions(name), side, self.column.ribs[name])
                     for name in self.levels if name in self.column.ribs for side in ("left", "right")]
        self._reach = None  # set by prepare_bounds

    # -- geometry helpers -----------------------------------------------------------------------
    def _slab_limits(self, level: str) -> tuple[float, float]:
        """Arc lengths of the mid-disc planes below and above ``level`` (its muscle slab)."""
        names = self.column.names
        index = names.index(level)
        model = self.models[level]
        top, bottom = self.extents[level]
        above = self.disc_mid_s.get((names[index - 1], level)) if index > 0 else None
        below = self.disc_mid_s.get((level, names[index + 1])) if index + 1 < len(names) else None
        if above is None:
            above = model.s + top + level_dimensions(level).disc_below_mm / 2
        if below is None:
            below = model.s - bottom - 5.0
        return below, above

    def _level_profile(self, value_of_level) -> callable:
        """Piecewise-linear function of arc length through per-level values at body centres."""
        names = sorted(self.models, key=lambda n: self.models[n].s)
        xs = np.array([self.models[n].s for n in names])
        ys = np.array([value_of_level(n) for n in names], dtype=float)
        return lambda s: np.interp(s, xs, ys)

    def _make_tubes(self, rng) -> list[Tube]:
        spec = self.spec
        dims = level_dimensions
        s_all = (self.curve.s[0] + 1.0, self.curve.s[-1] - 1.0)
        half_depth = self._level_profile(lambda n: dims(n).depth_mm / 2)
        half_width = self._level_profile(lambda n: dims(n).width_mm / 2)
        canal_ap = self._level_profile(lambda n: dims(n).canal_half_depth_mm)
        canal_lr = self._level_profile(lambda n: dims(n).canal_half_width_mm)
        lamina = self._level_profile(lambda n: dims(n).lamina_thickness_mm)
        lumbar = self._level_profile(lambda n: 1.0 if n.startswith(("L", "S")) else 0.0)
        canal_centre = lambda s: -(half_depth(s) + canal_ap(s))  # noqa: E731
        # Autochthon: behind the lamina, beside the spinous process (half-thickness 3 mm).
        auto_r_ap = lambda s: 12.0 + 8.0 * lumbar(s)  # noqa: E731
        auto_r_lr = lambda s: 15.0 + 7.0 * lumbar(s)  # noqa: E731
        auto_ap = lambda s: canal_centre(s) - canal_ap(s) - lamina(s) - 1.5 - auto_r_ap(s)  # noqa: E731
        # Iliopsoas: lateral to the bodies from T12 down, growing to L5.
        s_t12, s_l5 = self.models["T12"].s, self.models[self.column.last_lumbar()].s  # L5, or L4 / L6
        psoas_r_lr = lambda s: np.interp(s, [s_l5, s_t12], [20.0, 5.0])  # noqa: E731
        psoas_r_ap = lambda s: 0.9 * psoas_r_lr(s)  # noqa: E731
        psoas_lr = lambda s: half_width(s) + psoas_r_lr(s) + 2.0  # noqa: E731
        conus_s = self.disc_mid_s[("L1", "L2")]
        aorta_bifurcation_s = self.models["L4"].s
        const = lambda value: (lambda s: np.full_like(np.asarray(s, dtype=float), value))  # noqa: E731
        t = TISSUES
        tubes = []
        for side, sign, auto_label, psoas_label in (("left", -1.0, lv.TOTAL_AUTOCHTHON_LEFT, lv.TOTAL_ILIOPSOAS_LEFT),
                                                    ("right", 1.0, lv.TOTAL_AUTOCHTHON_RIGHT, lv.TOTAL_ILIOPSOAS_RIGHT)):
            tubes.append(Tube(f"autochthon_{side}", s_all, auto_ap,
                              (lambda sg: lambda s: sg * (3.0 + 2.0 + auto_r_lr(s)))(sign),
                              auto_r_ap, auto_r_lr, t["muscle"], auto_label,
                              spec.autochthon_fat_fraction, rng.uniform(0, spec.imat_period_mm, 3)))
            tubes.append(Tube(f"iliopsoas_{side}", (s_all[0], s_t12), const(2.0),
                              (lambda sg: lambda s: sg * psoas_lr(s))(sign),
                              psoas_r_ap, psoas_r_lr, t["muscle"], psoas_label,
                              spec.iliopsoas_fat_fraction, rng.uniform(0, spec.imat_period_mm, 3)))
        tubes.append(Tube("aorta", (aorta_bifurcation_s, s_all[1]), lambda s: half_depth(s) + 14.0 + 11.0,
                          const(-16.0), const(11.0), const(11.0), t["blood"], lv.TOTAL_AORTA))
        tubes.append(Tube("canal", s_all, canal_centre, const(0.0), canal_ap, canal_lr, t["csf"]))
        tubes.append(Tube("spinal_cord", (conus_s, s_all[1]), canal_centre, const(0.0), const(4.5), const(4.5),
                          t["spinal_cord"], lv.TOTAL_SPINAL_CORD))
        if spec.phase is not None:
            tubes.extend(vessel_tubes(self, Tube, half_depth))
        # Clip every tube to the drawn stretch of spine.
        for tube in tubes:
            tube.s_range = (max(tube.s_range[0], self.s_low - 80.0), min(tube.s_range[1], self.s_high + 80.0))
        return [tube for tube in tubes if tube.s_range[0] < tube.s_range[1]]

    # -- painting -------------------------------------------------------------------------------
    def paint(self, q: np.ndarray, s_hint: np.ndarray | None = None,
              box: tuple[np.ndarray, np.ndarray] | None = None, hint_iterations: int = _HINTED_ITERATIONS,
              want_s: bool = False) -> dict[str, np.ndarray]:
        """Tissue, HU and labels of anatomy-frame points ``q`` (N, 3), by painter's order:
        envelope, kidneys, tubes, ribs, discs, vertebrae (posterior elements, body, what is
        inserted into it), sacrum.

        ``s_hint`` (N,): arc lengths within a few millimetres of the points' foot points on the
        spine curve (NaN: none), from which ``hint_iterations`` Newton steps find them; ``box``:
        ``(lo, hi)``, a box known to hold the points (default: their bounding box);
        ``want_s``: also return ``"s"``, the foot points' arc lengths (NaN where the points are
        far from every tube).

        The structures are evaluated from the top of that order down, each on the points that no
        structure above it has taken, and only where the box holding all it paints (see
        :meth:`prepare_bounds`) meets the points' bounding box. A point's result does not depend
        on the other points. A painted point's HU is its tissue's (:meth:`.PhantomSpec.tissue_hu`)."""
        if self._reach is None:
            self.prepare_bounds()
        spec = self.spec
        q = np.asarray(q, dtype=float)
        n = len(q)
        out = {
            "hu": np.full(n, spec.tissue_hu(TISSUES["air"]), dtype=np.float32),
            "tissue": np.zeros(n, dtype=np.uint8),
            "total": np.zeros(n, dtype=np.uint8),
            "body": np.zeros(n, dtype=np.uint8),
            "verse": np.zeros(n, dtype=np.uint8),
        }
        if want_s:
            out["s"] = np.full(n, np.nan)
        if not n:
            return out

        def put(index, tissue, total=0, body=0, verse=0, level=None):
            out["hu"][index] = spec.tissue_hu(tissue, level)
            out["tissue"][index] = tissue
            out["total"][index] = total
            out["body"][index] = body
            out["verse"][index] = verse

        lo, hi = (q.min(axis=0), q.max(axis=0)) if box is None else box
        free = np.arange(n)  # points no structure has taken yet
        free = self._paint_spine(q, free, lo, hi, put)
        if self.ribs and len(free):
            free = paint_ribs(self.ribs, q, free, lo, hi, spec.cortex_mm, put)
        if len(free):
            free = self._paint_tubes(q, free, lo, hi, put, s_hint, hint_iterations, out.get("s"))
        if self.kidneys and len(free):
            free = paint_kidneys(self.kidneys, q, free, lo, hi, put)
        if len(free):
            self._paint_envelope(q, free, lo, hi, put)
        return out

    def _paint_spine(self, q, free, lo, hi, put) -> np.ndarray:
        """Paint the points ``q[free]`` that the drawn vertebrae hold, the last drawn first, then
        those the discs between drawn neighbours hold; returns the others."""
        reach = self._reach
        n_discs = len(reach["discs"])
        meets = _boxes_meet(lo, hi, reach["frames"])
        for name, ok in zip(self.levels[::-1], meets[n_discs:][::-1]):
            if ok and len(free):
                free = self._paint_vertebra(q, free, name, put)
        for (upper, lower), frame, ok in zip(reach["discs"], reach["disc_frames"], meets[:n_discs]):
            if ok and len(free):
                disc = self._disc(q[free], upper, lower, frame)
                put(free[disc], TISSUES["disc"], 0, lv.DISC_LABEL, 0)
                free = free[~disc]
        return free

    def _paint_tubes(self, q, free, lo, hi, put, s_hint, hint_iterations, s_out) -> np.ndarray:
        """Paint the points ``q[free]`` that the tubes hold, the last made first: one foot-point
        computation for all of them, on the points in the boxes of the stretches that meet the
        box ``lo``–``hi``; the foot points' arc lengths go to ``s_out`` (if given). Returns the
        points left."""
        tubes = []
        for tube, (seg_lo, seg_hi) in zip(self.tubes, self._reach["tubes"]):
            meets = np.all((seg_lo <= hi) & (seg_hi >= lo), axis=1)
            if meets.any():
                tubes.append((tube, seg_lo[meets].min(axis=0), seg_hi[meets].max(axis=0)))
        if not tubes:
            return free
        box_lo = np.maximum(self._tube_lo, np.min([b[1] for b in tubes], axis=0))
        box_hi = np.minimum(self._tube_hi, np.max([b[2] for b in tubes], axis=0))
        near = _in_box(q[free], box_lo, box_hi)
        if not near.any():
            return free
        index, free = free[near], free[~near]
        qn = q[index]
        s, n_ap, n_lr = self._tube_coordinates(qn, None if s_hint is None else s_hint[index], hint_iterations)
        if s_out is not None:
            s_out[index] = s
        left = np.ones(len(index), dtype=bool)
        for tube, tube_lo, tube_hi in tubes[::-1]:
            sub = np.flatnonzero(left & _in_box(qn, tube_lo, tube_hi))
            if not len(sub):
                continue
            sub = sub[tube.inside(s[sub], n_ap[sub], n_lr[sub])]
            if not len(sub):
                continue
            left[sub] = False
            put(index[sub], tube.tissue, tube.total_label)
            if tube.fat_fraction > 0:
                fat = _in_fat_lattice(qn[sub], self.spec.imat_period_mm, tube.fat_fraction, tube.lattice_offset)
                put(index[sub][fat], TISSUES["intramuscular_fat"], tube.total_label)
        return np.concatenate([free, index[left]])

    def _paint_envelope(self, q, free, lo, hi, put) -> None:
        """Paint the points ``q[free]`` inside the body envelope: an ellipse in the transverse
        plane following the spine's AP position, soft tissue inside a shell of subcutaneous fat."""
        outer, inner = self._envelope_state(lo, hi)
        if inner is False and outer is False:
            return
        qf = q[free]
        if inner is None or outer is None:
            y_spine = np.interp(qf[:, 2], self.curve.points[:, 2], self.curve.points[:, 1])
        if inner is None:
            inside = ((qf[:, 0] / 160.0) ** 2 + ((qf[:, 1] - y_spine - 45.0) / 135.0) ** 2 <= 1.0)
        else:
            inside = np.full(len(free), inner)
        put(free[inside], TISSUES["soft_tissue"])
        if outer is None:
            ex, ey = qf[:, 0] / 175.0, (qf[:, 1] - y_spine - 45.0) / 150.0
            fat = ~inside & (ex ** 2 + ey ** 2 <= 1.0)
        else:
            fat = ~inside & outer
        put(free[fat], TISSUES["subcutaneous_fat"])

    def _tube_coordinates(self, q, hint, hint_iterations):
        """:meth:`SpineCurve.tube_coordinates` of points ``q``, from the hints where finite."""
        if hint is None:
            return self.curve.tube_coordinates(q)
        hinted = np.isfinite(hint)
        if hinted.all():
            return self.curve.tube_coordinates(q, hint_iterations, hint)
        out = tuple(np.empty(len(q)) for _ in range(3))
        for subset, result in ((hinted, self.curve.tube_coordinates(q[hinted], hint_iterations, hint[hinted])),
                               (~hinted, self.curve.tube_coordinates(q[~hinted]))):
            for array, values in zip(out, result):
                array[subset] = values
        return out

    def _paint_vertebra(self, q, free, name, put) -> np.ndarray:
        """Paint the points ``q[free]`` that vertebra ``name`` holds; returns the others."""
        spec = self.spec
        t = TISSUES
        model = self.models[name]
        total_id = self.column.total_ids[name]
        verse_id = self.column.verse_ids[name]
        top_extent, bottom_extent = self._w_extent(name)
        w = _dot(q[free], model.axes[2]) - model.axes[2] @ model.centre
        near = (w <= top_extent + 1.0) & (w >= -bottom_extent - 1.0)
        if not near.any():
            return free
        close = free[near]
        w = w[near]
        qc = q[close]
        u = _dot(qc, model.axes[0]) - model.axes[0] @ model.centre
        v = _dot(qc, model.axes[1]) - model.axes[1] @ model.centre
        d = level_dimensions(name)
        b, hp0 = model.half_depth, model.hp0
        w_lo, w_hi = -0.30 * hp0, 0.35 * hp0
        canal_front, canal_back = -b, -b - 2.0 * d.canal_half_depth_mm
        ped_in, ped_out = d.canal_half_width_mm, d.canal_half_width_mm + d.pedicle_width_mm
        in_w = (w >= w_lo) & (w <= w_hi)
        pedicles = in_w & (np.abs(u) >= ped_in) & (np.abs(u) <= ped_out) & (v <= canal_front + 1.0) & (v >= canal_back)
        lamina = in_w & (np.abs(u) <= ped_out) & (v < canal_back) & (v >= canal_back - d.lamina_thickness_mm)
        spinous = ((w >= -0.35 * hp0) & (w <= 0.25 * hp0) & (np.abs(u) <= 3.0)
                   & (v < canal_back - d.lamina_thickness_mm)
                   & (v >= canal_back - d.lamina_thickness_mm - d.spinous_length_mm))
        transverse_v = -b - d.canal_half_depth_mm
        transverse = ((np.abs(w) <= 0.15 * hp0) & (np.abs(u) > ped_out)
                      & (np.abs(u) <= ped_out + d.transverse_length_mm) & (np.abs(v - transverse_v) <= 4.0))
        posterior = pedicles | lamina | spinous | transverse
        if name == "S1":
            posterior = pedicles | lamina  # the sacrum's dorsal parts are not modelled in detail
        body, core = model.body_and_core(u, v, w, spec.cortex_mm)
        below = np.zeros(len(close), dtype=bool)
        if name == "S1":
            bottom = model.endplates(u, v)[1]
            below = (np.abs(u) <= model.half_width + 15.0) & (np.abs(v) <= b) & (w < bottom) & (w >= bottom - 50.0)
        # Within the vertebra, later parts cover earlier ones: sacrum over body over posterior.
        put(close[posterior & ~body & ~below], t["posterior_bone"], total_id, 0, verse_id)
        put(close[body & ~core & ~below], t["cortical_bone"], total_id, lv.BODY_LABEL, verse_id)
        put(close[core & ~below], t["trabecular_bone"], total_id, lv.BODY_LABEL, verse_id, level=name)
        put(close[below], t["sacrum"], lv.TOTAL_SACRUM, 0, VERSE_SACRUM)
        held = posterior | body | below
        for mask, tissue, labelled in insert_parts(spec, model, d, u, v, w, core):  # lesion, cement, screws
            if labelled:
                put(close[mask & body], tissue, total_id, lv.BODY_LABEL, verse_id, level=name)
            put(close[mask & ~body if labelled else mask], tissue, *((total_id, 0, verse_id) if labelled else ()),
                level=name)
            held |= mask
        taken = np.zeros(len(free), dtype=bool)
        taken[np.flatnonzero(near)[held]] = True
        return free[~taken]

    def hu_of_keys(self) -> np.ndarray:
        """HU of every ``(tissue << 8) | total`` a point can be painted with, by
        :meth:`.PhantomSpec.tissue_hu` (the tissue and the ``total`` label fix the HU: trabecular
        bone's through the vertebra's label); other entries are NaN."""
        t = TISSUES
        painted = [(t["air"], 0, None), (t["subcutaneous_fat"], 0, None), (t["soft_tissue"], 0, None),
                   (t["disc"], 0, None), (t["sacrum"], lv.TOTAL_SACRUM, None)]
        for tube in self.tubes:
            painted.append((tube.tissue, tube.total_label, None))
            if tube.fat_fraction > 0:
                painted.append((t["intramuscular_fat"], tube.total_label, None))
        for name in self.levels:
            total = self.column.total_ids[name]
            painted += [(tissue, total, name)
                        for tissue in (t["posterior_bone"], t["cortical_bone"], t["trabecular_bone"])]
            painted += [(tissue, total if labelled else 0, name) for tissue, labelled in insert_keys(self.spec, name)]
        for rib in self.ribs:
            painted += [(t["cortical_bone"], rib.total_label, None), (t["rib_marrow"], rib.total_label, rib.marrow_level)]
        painted += hu_keys(self.kidneys)
        table = np.full(1 << 16, np.nan, dtype=np.float32)
        for tissue, total, level in painted:
            key, hu = (tissue << 8) | total, self.spec.tissue_hu(tissue, level)
            if not np.isnan(table[key]) and table[key] != np.float32(hu):
                raise ValueError(f"two structures labelled {total} (L5 and L6 share L5's) differ in the HU of "
                                 f"tissue {tissue}: give them the same trabecular HU and lesion HU")
            table[key] = hu
        return table

    def _w_extent(self, name: str) -> tuple[float, float]:
        """Superior and inferior reach of a vertebra from its centre along its axis (mm)."""
        top_extent, bottom_extent = self.extents[name]
        if name == "S1":
            bottom_extent += 51.0  # the sacrum hangs below S1
        return top_extent, bottom_extent

    def _disc(self, q, upper, lower, frame=None):
        mu, ml = self.models[upper], self.models[lower]
        c, e_lr, e_ap, e_cc = self.curve.frame(self.disc_mid_s[(upper, lower)]) if frame is None else frame
        d = q - c
        w_mid = _dot(d, e_cc)
        close = np.nonzero(np.abs(w_mid) <= 25.0)[0]
        mask = np.zeros(len(q), dtype=bool)
        if not len(close):
            return mask
        dc = d[close]
        a = 0.5 * (mu.half_width + ml.half_width)
        b = 0.5 * (mu.half_depth + ml.half_depth)
        in_ellipse = (_dot(dc, e_lr) / a) ** 2 + (_dot(dc, e_ap) / b) ** 2 <= 1.0
        ul, vl, wl = ml.local(q[close])
        uu, vu, wu = mu.local(q[close])
        above_lower = wl > ml.endplates(ul, vl)[0]
        below_upper = wu < mu.endplates(uu, vu)[1]
        mask[close] = in_ellipse & above_lower & below_upper
        return mask

    def _envelope_state(self, lo, hi) -> tuple[bool | None, bool | None]:
        """Whether the box ``lo``–``hi`` lies wholly inside (True) or wholly outside (False) the
        outer and the inner body ellipse, or None where it may cross one."""
        zs, ys = self.curve.points[:, 2], self.curve.points[:, 1]  # z increases along the curve
        first, last = np.searchsorted(zs, [lo[2], hi[2]], side="right")
        y_spine = np.concatenate([np.interp([lo[2], hi[2]], zs, ys), ys[first:last]])
        x_range = (lo[0], hi[0])
        y_range = (lo[1] - y_spine.max() - 45.0, hi[1] - y_spine.min() - 45.0)
        states = []
        for rx, ry in ((175.0, 150.0), (160.0, 135.0)):
            far = max(x * x for x in x_range) / rx ** 2 + max(y * y for y in y_range) / ry ** 2
            near = (min(max(0.0, x_range[0]), x_range[1]) ** 2 / rx ** 2
                    + min(max(0.0, y_range[0]), y_range[1]) ** 2 / ry ** 2)
            states.append(True if far <= 1.0 - 1e-9 else False if near > 1.0 + 1e-9 else None)
        return states[0], states[1]

    # -- bounding boxes -------------------------------------------------------------------------
    def prepare_bounds(self):
        """Anatomy-frame boxes: of the tubes (to skip far points), of the drawn spine (vertebrae
        and tubes along the drawn stretch) and of the whole body section; and the reach of every
        structure that :meth:`paint` tests before evaluating it: per tube, boxes around ~10 mm
        stretches of it; per disc and vertebra, a box in its own frame holding all it paints."""
        def tube_surface(s_lo, s_hi):
            pts = []
            for tube in self.tubes:
                s = np.linspace(max(s_lo, tube.s_range[0]), min(s_hi, tube.s_range[1]), 200)
                for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
                    n_ap = tube.c_ap(s) + tube.r_ap(s) * np.cos(angle)
                    n_lr = tube.c_lr(s) + tube.r_lr(s) * np.sin(angle)
                    pts.append(self.curve.from_tube_coordinates(s, n_ap, n_lr))
            return np.concatenate(pts)

        everywhere = tube_surface(-np.inf, np.inf)
        self._tube_lo, self._tube_hi = everywhere.min(axis=0) - 2.0, everywhere.max(axis=0) + 2.0
        drawn = tube_surface(self.s_low, self.s_high)
        # Every drawn vertebra, posterior elements included, must fit in the field of view.
        corners = [self.curve.sample(np.array([self.s_low, self.s_high]), self.curve.points)]
        for name in self.levels:
            m, d = self.models[name], level_dimensions(name)
            lateral = d.canal_half_width_mm + d.pedicle_width_mm + d.transverse_length_mm
            back = -(m.half_depth + 2 * d.canal_half_depth_mm + d.lamina_thickness_mm + d.spinous_length_mm)
            top, bottom = self.extents[name]
            local = np.array([[u, v, w] for u in (-lateral, lateral) for v in (back, m.half_depth)
                              for w in (-bottom - (50.0 if name == "S1" else 0.0), top)])
            corners.append(m.centre + local @ m.axes)
        for rib in self.ribs:  # the ribs' medial parts
            line = rib.centre_line(FOV_LENGTH_MM)
            corners += [line - RIB_RADIUS_MM, line + RIB_RADIUS_MM]
        corners = np.concatenate(corners)
        z_lo, z_hi = corners[:, 2].min(), corners[:, 2].max()
        lo = np.minimum(corners.min(axis=0), drawn.min(axis=0)) - 3.0
        hi = np.maximum(corners.max(axis=0), drawn.max(axis=0)) + 3.0
        lo[2], hi[2] = z_lo, z_hi
        widen_box(self.kidneys, lo, hi)
        self.spine_box = (lo, hi)
        y = self.curve.points[:, 1]
        self.body_box = (np.array([-176.0, y.min() + 45.0 - 151.0, z_lo]),
                         np.array([176.0, y.max() + 45.0 + 151.0, z_hi]))
        self._reach = self._structure_reach()

    def _structure_reach(self) -> dict:
        """Boxes holding everything each tube, disc and vertebra paints (see :meth:`paint`).

        A tube's cross-sections, sampled every 0.5 mm of arc length on 48 points of their rim,
        are boxed per ~10 mm stretch, with 1 mm to spare (far more than the rim moves between
        samples). Discs and vertebrae: boxes in their own frames (u, v, w) from their defining
        inequalities, with 1 µm to spare for rounding."""
        angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        tubes = []
        for tube in self.tubes:
            s0, s1 = tube.s_range
            edges = np.linspace(s0, s1, max(2, int(np.ceil((s1 - s0) / 10.0)) + 1))
            per = max(2, int(np.ceil((edges[1] - edges[0]) / 0.5)) + 1)
            s = np.concatenate([np.linspace(a, b, per) for a, b in zip(edges[:-1], edges[1:])])
            s_rim, angle = np.repeat(s, len(angles)), np.tile(angles, len(s))
            rim = self.curve.from_tube_coordinates(s_rim, tube.c_ap(s_rim) + tube.r_ap(s_rim) * np.cos(angle),
                                                   tube.c_lr(s_rim) + tube.r_lr(s_rim) * np.sin(angle))
            rim = rim.reshape(len(edges) - 1, per * len(angles), 3)
            tubes.append((rim.min(axis=1) - 1.0, rim.max(axis=1) + 1.0))
        discs, disc_frames, frames = [], [], []
        place = {name: index for index, name in enumerate(self.column.names)}
        for upper, lower in zip(self.levels[:-1], self.levels[1:]):
            if place[lower] - place[upper] != 1:
                continue
            mu, ml = self.models[upper], self.models[lower]
            frame = self.curve.frame(self.disc_mid_s[(upper, lower)])
            a, b = 0.5 * (mu.half_width + ml.half_width), 0.5 * (mu.half_depth + ml.half_depth)
            discs.append((upper, lower))
            disc_frames.append(frame)
            frames.append((frame[0], np.stack(frame[1:]), np.array([-a, -b, -25.0]), np.array([a, b, 25.0])))
        for name in self.levels:
            m, d = self.models[name], level_dimensions(name)
            top, bottom = self._w_extent(name)
            ped_out = d.canal_half_width_mm + d.pedicle_width_mm
            lateral = max(ped_out + d.transverse_length_mm, m.half_width + (15.0 if name == "S1" else 0.0), 3.0)
            back = -m.half_depth - 2.0 * d.canal_half_depth_mm - d.lamina_thickness_mm - d.spinous_length_mm
            frames.append((m.centre, m.axes, np.array([-lateral, back, -bottom - 1.0]),
                           np.array([lateral, m.half_depth, top + 1.0])))
        frames = {"centre": np.array([f[0] for f in frames]).reshape(-1, 3),
                  "axes": np.array([f[1] for f in frames]).reshape(-1, 3, 3),
                  "lo": np.array([f[2] for f in frames]).reshape(-1, 3) - 1e-3,
                  "hi": np.array([f[3] for f in frames]).reshape(-1, 3) + 1e-3}
        return {"tubes": tubes, "discs": discs, "disc_frames": disc_frames, "frames": frames}

    def fov_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box the field of view covers: the drawn vertebrae and the tubes along
        the drawn stretch (fov='spine'), or the whole body section over that height ('body')."""
        return self.body_box if self.spec.fov == "body" else self.spine_box
