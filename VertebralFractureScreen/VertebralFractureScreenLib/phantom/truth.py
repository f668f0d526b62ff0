"""The phantom's truth: the analytic answers every measurement of this product is tested against.

Heights are the endplate distances along the vertebra's cranio-caudal axis, in its mid-sagittal
plane, at 15 / 50 / 85 % of the body's depth from the anterior wall (SPEC §4). A fracture of
fraction ``F`` loses ``F`` of the body's own normal height, so its true Genant grade is that of
``F`` (Genant 1993: grade 1 for 20–25 %, 2 for 25–40 %, 3 above 40 %). Muscles are given per
level slab (between the mid-disc planes). Points and axes are in RAS (mm).

The optional cases add their truth only where the spec draws them (so that the truth of a phantom
without them is what it was before they existed; read them with ``.get``): per vertebra
``lesion`` and ``hardware`` (with ``cement_fraction``) where the spec has lesions or hardware,
``identity``, ``ribs`` (rib-bearing level → rib number)
and ``anatomy`` (:func:`.column.anatomy_truth`) where there are ribs or a lumbosacral transition;
with a contrast phase, ``phase`` (:func:`_phase_truth`) and per vertebra ``trabecular_hu_native``
(its ``trabecular_hu`` is the HU drawn, enhancement included) and ``category_native`` (the
opportunistic category of the unenhanced HU, the truth the phase-adjusted category is held to).
"""

from __future__ import annotations

import numpy as np

from .. import __version__, levels as lv
from ..measure.attenuation import opportunistic_category
from ..measure.grading import genant_grade, is_borderline
from ..measure.morphometry import AP_FRACTIONS, MIDDLE_REGION, PROFILE_FRACTIONS  # where the truth is given, as measured
from .column import anatomy_truth
from .inserts import cement_fraction
from .scene import SpineScene
from .shapes import VertebraModel, _in_fat_lattice


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def _profile_truth(model: VertebraModel) -> dict:
    """The true height profile of a body in its mid-sagittal plane (as
    ``morphometry.VertebraHeights``): heights every 5 % of the depth from 15 to 85 %, the middle
    region's (25–75 %) smallest height and where it lies, and the area between 15 and 85 %."""
    profile = [model.height_at(f) for f in PROFILE_FRACTIONS]
    middle = np.linspace(*MIDDLE_REGION, 501)
    heights = np.array([model.height_at(f) for f in middle])
    span = np.linspace(AP_FRACTIONS["ha"], AP_FRACTIONS["hp"], 701)
    along = np.array([model.height_at(f) for f in span])
    area = (along.sum() - 0.5 * (along[0] + along[-1])) * (span[1] - span[0]) * 2.0 * model.half_depth
    return {"height_profile_mm": profile, "hm_min_mm": float(heights.min()),
            "hm_min_fraction": float(middle[int(np.argmin(heights))]), "sagittal_area_mm2": float(area)}


def _truth(spec, scene: SpineScene, ijk_to_ras, anatomy_to_ras, shape, total_map) -> dict:
    """The truth of a rendered phantom (written as ``truth.json``): per vertebra present in
    ``total_map`` its heights, normal heights, fracture, grade and geometry in RAS, per muscle
    and slab :func:`_muscle_truth`, and the grid (``shape`` (k, j, i), ``ijk_to_ras``)."""
    rot, shift = anatomy_to_ras[:3, :3], anatomy_to_ras[:3, 3]
    to_ras = lambda p: (rot @ np.asarray(p) + shift).tolist()  # noqa: E731
    present = set(np.unique(total_map).tolist())
    vertebrae = []
    for name in scene.levels:
        model = scene.models[name]
        total_id = scene.column.total_ids[name]
        if total_id not in present:
            continue
        complete = not _touches_border(total_map == total_id)
        heights = {key: model.height_at(f) for key, f in AP_FRACTIONS.items()}
        normal = VertebraModel(name, model.s, model.half_width, model.half_depth, model.ha0, model.hp0, None)
        normal_heights = {key: normal.height_at(f) for key, f in AP_FRACTIONS.items()}
        loss = model.fracture.fraction if model.fracture else 0.0
        points = {}
        for key, f in AP_FRACTIONS.items():
            v = model.half_depth - 2.0 * model.half_depth * f
            top, bottom = model.endplates(0.0, v)
            points[key] = [to_ras(model.centre + model.axes.T @ [0.0, v, float(top)]),
                           to_ras(model.centre + model.axes.T @ [0.0, v, float(bottom)])]
        vertebrae.append({
            "level": name,
            "total_id": total_id,
            "verse_id": scene.column.verse_ids[name],
            "complete": complete,
            "ha_mm": heights["ha"], "hm_mm": heights["hm"], "hp_mm": heights["hp"],
            "ha_hp": heights["ha"] / heights["hp"], "hm_hp": heights["hm"] / heights["hp"],
            "normal_ha_mm": normal_heights["ha"], "normal_hm_mm": normal_heights["hm"],
            "normal_hp_mm": normal_heights["hp"],
            "fracture": None if model.fracture is None else {"shape": model.fracture.shape,
                                                             "fraction": model.fracture.fraction},
            "height_loss": loss,
            "genant_grade": genant_grade(loss),
            "shape": model.fracture.shape if model.fracture and genant_grade(loss) > 0 else "normal",
            "borderline": is_borderline(loss),
            "trabecular_hu": spec.trabecular_hu_of(name) + spec.trabecular_enhancement_hu,
            "cortical_hu": spec.cortical_hu,
            "body_volume_ml": model.volume_mm3() / 1000.0,
            "body_width_mm": 2 * model.half_width,
            "body_depth_mm": 2 * model.half_depth,
            "centre_ras": to_ras(model.centre),
            "axes_ras": {"lr": (rot @ model.axes[0]).tolist(), "ap": (rot @ model.axes[1]).tolist(),
                         "cc": (rot @ model.axes[2]).tolist()},
            "height_points_ras": points,
            **_profile_truth(model),
            **_case_truth(spec, scene, name, to_ras),
        })
    muscles = _muscle_truth(spec, scene, ijk_to_ras, anatomy_to_ras, shape)
    return {
        "software": {"name": "VertebralFractureScreen phantom", "version": __version__},
        "spec": spec.to_json(),
        "definitions": {
            "heights": "endplate distance along the vertebra's cranio-caudal axis in its mid-sagittal plane, "
                       "at 15/50/85 % of the body depth from the anterior wall (mm)",
            "height_loss": "fracture fraction relative to the vertebra's own normal shape",
            "muscle_slab": "between the mid-planes of the discs above and below the level, normal to the spine curve",
            "imat_fraction": "volume fraction of intramuscular fat inside the muscle within the slab",
        },
        "grid": {"shape_kji": list(shape), "ijk_to_ras": np.asarray(ijk_to_ras).tolist()},
        "vertebrae": vertebrae,
        "muscles": muscles,
        "aorta": {"hu": spec.aorta_hu_value, "contrast_enhanced": spec.aorta_hu_value > 150.0,
                  "present": lv.TOTAL_AORTA in present},
        "anatomy_to_ras": np.asarray(anatomy_to_ras).tolist(),
        **_column_truth(spec, scene),
        **_phase_truth(spec, scene, present),
    }


def _phase_truth(spec, scene: SpineScene, present: set) -> dict:
    """With a contrast phase: the phase, the HU of its structures, the trabecular enhancement, and
    the ``total`` id of each drawn structure with whether it lies in the image."""
    if spec.phase is None:
        return {}
    from .spec import PHASE_STRUCTURES

    labels = {"aorta": lv.TOTAL_AORTA, "inferior_vena_cava": lv.TOTAL_INFERIOR_VENA_CAVA,
              "portal_vein_and_splenic_vein": lv.TOTAL_PORTAL_SPLENIC_VEIN}
    labels.update({kidney.name: kidney.total_label for kidney in scene.kidneys})
    return {"phase": {"phase": spec.phase, "hu": {name: spec.phase_structure_hu(name) for name in PHASE_STRUCTURES},
                      "trabecular_enhancement_hu": spec.trabecular_enhancement_hu, "labels": labels,
                      "present": {name: label in present for name, label in labels.items()}}}


def _case_truth(spec, scene: SpineScene, name: str, to_ras) -> dict:
    """A vertebra's truth of the optional cases the spec draws (see the module docstring)."""
    out = {}
    model = scene.models[name]
    if spec.lesions:
        lesion = spec.lesion_of(name)
        out["lesion"] = None if lesion is None else {
            "kind": lesion.kind, "diameter_mm": None if lesion.diffuse else lesion.diameter_mm, "hu": lesion.hu,
            "diffuse": lesion.diffuse, "centre_ras": to_ras(model.centre + model.axes[2] * model.mid_height()[0])}
    if spec.hardware:
        hardware = spec.hardware_of(name)
        out["hardware"] = None if hardware is None else hardware.kind
        out["cement_fraction"] = (cement_fraction(model, spec.cortex_mm)
                                  if hardware is not None and hardware.kind == "cement" else None)
    if _numbered(spec):
        out["identity"] = scene.column.identities[name]
    if spec.phase is not None:
        out["trabecular_hu_native"] = spec.trabecular_hu_of(name)
        out["category_native"] = opportunistic_category(spec.trabecular_hu_of(name))
    return out


def _numbered(spec) -> bool:
    """Whether the truth tells the column's numbering: where it has ribs or a lumbosacral transition."""
    return bool(spec.rib_pairs) or spec.lumbar_vertebrae != 5


def _column_truth(spec, scene: SpineScene) -> dict:
    """The column's truth where it has ribs or a lumbosacral transition (see the module docstring)."""
    if not _numbered(spec):
        return {}
    return {"ribs": {name: scene.column.ribs[name] for name in scene.levels if name in scene.column.ribs},
            "anatomy": anatomy_truth(spec, scene.column, scene.levels)}


def _muscle_truth(spec, scene: SpineScene, ijk_to_ras, anatomy_to_ras, shape, step: float = 0.5) -> list[dict]:
    """Per muscle and level slab: volume (ml, by the tube's exact volume element), lean HU, fat
    fraction (fine sampling) and the fraction of the slab's volume inside the field of view.

    ``slab_planes_ras`` gives the slab's limits in RAS: the mid-disc planes ``below`` and
    ``above`` (normal to the spine curve), each as a ``point`` on the curve and a unit ``normal``
    pointing cranially; the slab is where ``(x - below.point) · below.normal >= 0`` and
    ``(x - above.point) · above.normal <= 0`` (near the spine)."""
    rot, shift = anatomy_to_ras[:3, :3], anatomy_to_ras[:3, 3]

    def plane(s_value: float) -> dict:
        c, _, _, e_cc = scene.curve.frame(s_value)
        return {"point": (rot @ c + shift).tolist(), "normal": (rot @ e_cc).tolist()}

    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    anatomy_to_ijk = ras_to_ijk @ anatomy_to_ras
    nk, nj, ni = shape
    rows = []
    lumbar: dict[str, list[float]] = {}
    for name in scene.levels:
        if name == "S1":
            continue
        s_lo, s_hi = scene._slab_limits(name)
        s = np.arange(s_lo + step / 2, s_hi, step)
        for tube in scene.tubes:
            if tube.total_label not in (lv.TOTAL_AUTOCHTHON_LEFT, lv.TOTAL_AUTOCHTHON_RIGHT,
                                        lv.TOTAL_ILIOPSOAS_LEFT, lv.TOTAL_ILIOPSOAS_RIGHT):
                continue
            ss = s[(s >= tube.s_range[0]) & (s <= tube.s_range[1])]
            if not len(ss):
                continue
            # Exact volume: the volume element is linear in the offsets, so its mean over the
            # ellipse is its value at the centre; area = π r_ap r_lr.
            area = np.pi * tube.r_ap(ss) * tube.r_lr(ss)
            jac = scene.curve.tube_volume_element(ss, tube.c_ap(ss), tube.c_lr(ss))
            volume = float(np.sum(area * jac) * step)
            # Fat fraction and FOV share by sampling the cross-sections.
            grid = np.arange(-1.0 + step / 40, 1.0, step / 20.0)
            gu, gv = np.meshgrid(grid, grid)
            disk = gu**2 + gv**2 <= 1.0
            gu, gv = gu[disk], gv[disk]
            fat_w = total_w = fov_w = 0.0
            curve = scene.curve
            for s_value in ss[:: max(1, int(round(1.0 / step)))]:  # one cross-section per mm
                # (curve.from_tube_coordinates and curve.tube_volume_element at one arc length,
                # their per-point arithmetic unchanged)
                sv = np.array([s_value])
                n_ap = tube.c_ap(sv) + tube.r_ap(sv) * gu
                n_lr = tube.c_lr(sv) + tube.r_lr(sv) * gv
                e_ap, e_lr = curve.sample(sv, curve.e_ap), curve.sample(sv, curve.e_lr)
                q = curve.sample(sv, curve.points) + n_ap[:, None] * e_ap + n_lr[:, None] * e_lr
                dt = curve.sample(sv, curve.dtangent)
                weight = (1.0 - n_ap * np.einsum("ij,ij->i", dt, e_ap)
                          - n_lr * np.einsum("ij,ij->i", dt, e_lr))
                fat = _in_fat_lattice(q, spec.imat_period_mm, tube.fat_fraction, tube.lattice_offset)
                ijk = q @ anatomy_to_ijk[:3, :3].T + anatomy_to_ijk[:3, 3]
                inside = np.all((ijk > -0.5) & (ijk < np.array([ni, nj, nk]) - 0.5), axis=1)
                total_w += weight.sum()
                fat_w += weight[fat].sum() if tube.fat_fraction > 0 else 0.0
                fov_w += weight[inside].sum()
            fraction = fat_w / total_w if tube.fat_fraction > 0 else 0.0
            in_fov = fov_w / total_w
            rows.append({"muscle": tube.name, "level": name, "volume_ml": volume / 1000.0,
                         "lean_hu": spec.muscle_hu, "fat_hu": spec.fat_hu, "imat_fraction": fraction,
                         "fov_fraction": in_fov, "slab_mm": [s_lo, s_hi],
                         "slab_planes_ras": {"below": plane(s_lo), "above": plane(s_hi)}})
            if name in lv.LUMBAR_LEVELS:
                lumbar.setdefault(tube.name, []).append((volume / 1000.0, fraction, in_fov, name))
    for muscle, parts in lumbar.items():
        if {p[3] for p in parts} != set(lv.LUMBAR_LEVELS):
            continue
        vol = sum(p[0] for p in parts)
        rows.append({"muscle": muscle, "level": "lumbar", "volume_ml": vol, "lean_hu": spec.muscle_hu,
                     "fat_hu": spec.fat_hu, "imat_fraction": sum(p[0] * p[1] for p in parts) / vol,
                     "fov_fraction": sum(p[0] * p[2] for p in parts) / vol,
                     "slab_mm": [scene._slab_limits("L5")[0], scene._slab_limits("L1")[1]],
                     "slab_planes_ras": {"below": plane(scene._slab_limits("L5")[0]),
                                         "above": plane(scene._slab_limits("L1")[1])}})
    return rows
