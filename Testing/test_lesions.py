"""Lesions and hardware (``measure/lesions.py``) against the phantom's truth.

Each kind (sclerotic focal and diffuse, lytic, cement, screws) at its level at 1 mm, 0.7x0.7x3 mm
and 3 mm voxels with 20 HU of noise; focal lesions of 5–10 mm at 1 mm; no flag on normal,
osteoporotic, contrast-enhanced and fractured spines (a band of compacted trabeculae drawn under
each fractured endplate). The phantoms are short and drawn without partial-volume supersampling so
the file stays fast; ``Testing/benchmarks/bench_lesions.py`` runs 40 fuller ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.geometry import BoxedLabels, find_label_boxes
from VertebralFractureScreenLib.measure.lesions import VertebraLesions, find_lesions
from VertebralFractureScreenLib.measure.morphometry import measure_heights
from VertebralFractureScreenLib.phantom.render import Fracture, Hardware, Lesion, PhantomSpec, SpineScene, make_phantom

SPACINGS = {"1 mm": (1.0, 1.0, 1.0), "0.7x0.7x3": (0.7, 0.7, 3.0), "3 mm": (3.0, 3.0, 3.0)}
FAST = dict(supersampling=1, noise_hu=20.0, autochthon_fat_fraction=0.0, iliopsoas_fat_fraction=0.0)


def screen(spec: PhantomSpec, band_mm: float = 0.0, band_hu: float = 0.0, body_map: bool = True):
    """Render ``spec``, optionally add a band of compacted trabeculae under every fractured endplate
    (``band_mm`` thick, ``band_hu`` denser), measure the heights and find the lesions. Returns
    ``(phantom, ct, level → VertebraLesions)``."""
    phantom = make_phantom(spec)
    ct = phantom.ct if band_mm <= 0 else compaction_bands(phantom, spec, band_mm, band_hu)
    body = phantom.vertebrae_body if body_map else None
    heights = measure_heights(phantom.total, phantom.ijk_to_ras, ct=ct, body_labels=body)
    found = find_lesions(ct, phantom.total, phantom.ijk_to_ras, heights, body_labels=body)
    assert [r.level for r in found] == [h.level for h in heights]
    return phantom, ct, {r.level: r for r in found}


def compaction_bands(phantom, spec: PhantomSpec, band_mm: float, band_hu: float) -> np.ndarray:
    """The CT with ``band_hu`` added to the body's voxels whose centre lies within ``band_mm`` of
    either endplate of a fractured vertebra, along the vertebra's axis (the phantom's own analytic
    endplates), as compacted trabeculae under a fractured endplate read."""
    scene = SpineScene(spec)
    scene.prepare_bounds()
    ijk_to_anatomy = np.linalg.inv(np.asarray(phantom.truth["anatomy_to_ras"])) @ phantom.ijk_to_ras
    ct = phantom.ct.astype(np.float32)
    for vt in phantom.truth["vertebrae"]:
        if not vt.get("fracture"):
            continue
        index = np.nonzero((phantom.total == vt["total_id"]) & (phantom.vertebrae_body == lv.BODY_LABEL))
        points = np.stack(index[::-1], axis=1) @ ijk_to_anatomy[:3, :3].T + ijk_to_anatomy[:3, 3]
        u, v, w = scene.models[vt["level"]].local(points)
        top, bottom = scene.models[vt["level"]].endplates(u, v)
        band = (top - w <= band_mm) | (w - bottom <= band_mm)
        ct[tuple(axis[band] for axis in index)] += band_hu
    return np.clip(np.round(ct), -1024, 3071).astype(np.int16)


def truth_of(phantom) -> dict[str, dict]:
    return {vt["level"]: vt for vt in phantom.truth["vertebrae"]}


# ------------------------------------------------------------------------------------------------
# Every kind at its level
# ------------------------------------------------------------------------------------------------

CASES = dict(levels=lv.parse_level_range("T11-L4"),
             lesions=(Lesion.parse("T12:sclerotic:diffuse:600"), Lesion.parse("L2:sclerotic:12:900"),
                      Lesion.parse("L3:lytic:12:20")),
             hardware=(Hardware.parse("L1:cement"), Hardware.parse("L4:screws")))


@pytest.fixture(scope="module", params=list(SPACINGS))
def cases(request):
    return screen(PhantomSpec(spacing=SPACINGS[request.param], seed=3, **CASES, **FAST))


def test_each_kind_is_found_at_its_level(cases):
    phantom, _, found = cases
    truth = truth_of(phantom)
    for level, result in found.items():
        lesion, hardware = truth[level].get("lesion"), truth[level].get("hardware")
        assert result.suspected_lesion == (lesion["kind"] if lesion else None), (level, result)
        assert result.instrumented == hardware, (level, result)
        assert ("suspected_lesion" in result.flags) == (lesion is not None)
        assert ("instrumented" in result.flags) == (hardware is not None)
    assert found["T11"].flags == () and found["T11"].core_ml > 1.0
    assert found["T12"].diffuse and not found["T12"].focal
    assert found["T12"].lesion_hu == pytest.approx(600.0, abs=15.0)
    sphere_ml = np.pi / 6.0 * 12.0 ** 3 / 1000.0
    for level, low, high in (("L2", 700.0, 1000.0), ("L3", -30.0, 60.0)):
        assert found[level].focal and not found[level].diffuse
        assert 0.4 * sphere_ml <= found[level].lesion_volume_ml <= 1.3 * sphere_ml  # clipped to what is looked at
        assert low <= found[level].lesion_hu <= high
    assert found["L1"].cement_ml > 1.0 and found["L4"].metal_voxels > 20
    for level in ("L1", "L4"):
        assert "lesions_not_assessed" in found[level].flags and found[level].suspected_lesion is None


def test_results_are_small_frozen_records(cases):
    _, _, found = cases
    result = found["L2"]
    assert isinstance(result, VertebraLesions)
    with pytest.raises(AttributeError):
        result.level = "L3"  # frozen
    record = json.loads(json.dumps(result.to_dict()))
    assert record["suspected_lesion"] == "sclerotic" and record["flags"] == ["suspected_lesion"]
    assert 100.0 < record["core_hu"] < 220.0 and 10.0 < record["noise_hu"] < 30.0


def test_the_body_is_found_without_the_vertebrae_body_map():
    phantom, _, found = screen(PhantomSpec(spacing=SPACINGS["3 mm"], seed=4, **CASES, **FAST), body_map=False)
    truth = truth_of(phantom)
    assert {level: (r.suspected_lesion, r.instrumented) for level, r in found.items()} == {
        level: ((truth[level]["lesion"] or {}).get("kind"), truth[level]["hardware"]) for level in found}


def test_only_crops_of_the_ct_are_read():
    """The CT is only ever sliced (never made whole, never indexed otherwise); the body map may be
    held as its box (``geometry.BoxedLabels``)."""

    class SlicesOnly:
        def __init__(self, array):
            self.array, self.shape, self.ndim, self.dtype = array, array.shape, array.ndim, array.dtype

        def __getitem__(self, key):
            assert isinstance(key, tuple) and all(isinstance(s, slice) for s in key), key
            crop = self.array[key]
            assert crop.size < self.array.size / 3, "a crop of most of the volume"
            return crop

        def __array__(self, dtype=None, copy=None):
            raise AssertionError("the whole CT was asked for")

    spec = PhantomSpec(spacing=SPACINGS["3 mm"], seed=5, **CASES, **FAST)
    phantom = make_phantom(spec)
    heights = measure_heights(phantom.total, phantom.ijk_to_ras, ct=phantom.ct, body_labels=phantom.vertebrae_body)
    boxes = find_label_boxes(phantom.total)
    found = find_lesions(SlicesOnly(phantom.ct), phantom.total, phantom.ijk_to_ras, heights,
                         body_labels=BoxedLabels.of(phantom.vertebrae_body), label_boxes=boxes)
    plain = find_lesions(phantom.ct, phantom.total, phantom.ijk_to_ras, heights, body_labels=phantom.vertebrae_body)
    assert [r.to_dict() for r in found] == [r.to_dict() for r in plain]


# ------------------------------------------------------------------------------------------------
# Focal lesions of 5-10 mm and of 10 mm and more
# ------------------------------------------------------------------------------------------------


def test_lesions_of_5_to_10_mm_are_found_at_1_mm():
    lesions = ("T12:sclerotic:6:900", "L1:lytic:7:20", "L2:sclerotic:9:500", "L3:lytic:8:40")
    phantom, _, found = screen(PhantomSpec(levels=lv.parse_level_range("T11-L4"), spacing=SPACINGS["1 mm"], seed=6,
                                           lesions=tuple(Lesion.parse(text) for text in lesions), **FAST))
    for level, result in found.items():
        lesion = truth_of(phantom)[level].get("lesion")
        assert result.suspected_lesion == (lesion["kind"] if lesion else None), (level, result)
        if lesion:
            assert result.focal
            sphere_ml = np.pi / 6.0 * lesion["diameter_mm"] ** 3 / 1000.0
            assert 0.4 * sphere_ml <= result.lesion_volume_ml <= 1.6 * sphere_ml, (level, result)


@pytest.mark.parametrize("spacing", ["0.7x0.7x3", "3 mm"])
def test_lesions_of_10_mm_and_more_are_found_at_thick_slices(spacing):
    lesions = ("T12:lytic:10:40", "L1:sclerotic:10:500", "L2:lytic:16:-40", "L3:sclerotic:20:420")
    phantom, _, found = screen(PhantomSpec(levels=lv.parse_level_range("T11-L4"), spacing=SPACINGS[spacing], seed=7,
                                           lesions=tuple(Lesion.parse(text) for text in lesions), **FAST))
    truth = truth_of(phantom)
    assert {level: r.suspected_lesion for level, r in found.items()} == {
        level: (truth[level]["lesion"] or {}).get("kind") for level in found}


# ------------------------------------------------------------------------------------------------
# No flag where there is nothing
# ------------------------------------------------------------------------------------------------

NORMAL_SPINES = {
    "normal": dict(trabecular_hu=160.0),
    "osteoporotic": dict(trabecular_hu=70.0),
    "contrast": dict(trabecular_hu=185.0, contrast=True),  # enhanced bone: 10-30 HU more
}


@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("kind", list(NORMAL_SPINES))
def test_no_flag_on_spines_without_lesions(kind, spacing):
    spec = PhantomSpec(levels=lv.parse_level_range("T10-L3"), spacing=SPACINGS[spacing], seed=8,
                       **NORMAL_SPINES[kind], **FAST)
    _, _, found = screen(spec)
    assert {level: r.flags for level, r in found.items() if r.flags} == {}


FRACTURES = ("T11:wedge:0.22", "L1:crush:0.45", "L3:biconcave:0.3")  # grades 1, 3, 2


@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_no_flag_on_fractured_spines_with_compacted_endplates(spacing):
    """Wedge, crush and biconcave fractures of grades 1-3 in osteoporotic bone (90 HU), with 3 mm of
    compacted trabeculae, 250 HU denser, under each of their endplates."""
    spec = PhantomSpec(levels=lv.parse_level_range("T10-L4"), spacing=SPACINGS[spacing], seed=9, trabecular_hu=90.0,
                       fractures=tuple(Fracture.parse(text) for text in FRACTURES), **FAST)
    _, ct, found = screen(spec, band_mm=3.0, band_hu=250.0)
    assert {level: r.suspected_lesion or r.instrumented for level, r in found.items()
            if r.suspected_lesion or r.instrumented} == {}
    assert all(r.flags in ((), ("lesions_not_assessed",)) for r in found.values())
    assert sum(not r.flags for r in found.values()) >= 5  # most are assessed, the crushed one may not be


def test_screening_counts_no_pathological_fracture_and_keeps_cement_out_of_the_bone_summary():
    """A crushed L1 with a sclerotic lesion is reported as possibly pathological, not as an
    osteoporotic fracture; L2 with cement gives no HU to the bone summary (issue 28, point 2)."""
    from VertebralFractureScreenLib.exam.screening import screen_exam
    from VertebralFractureScreenLib.io.volume import Volume
    from VertebralFractureScreenLib.phantom.render import Fracture, Hardware, Lesion, PhantomSpec, make_phantom

    phantom = make_phantom(PhantomSpec(levels=("T11", "T12", "L1", "L2", "L3", "L4"), spacing=(1.0, 1.0, 1.0),
                                       supersampling=1, noise_hu=15.0, fractures=(Fracture.parse("L1:crush:0.35"),),
                                       lesions=(Lesion.parse("L1:sclerotic:14:900"),),
                                       hardware=(Hardware.parse("L2:cement"),)))
    result = screen_exam(Volume(phantom.ct, phantom.ijk_to_ras), seg=Volume(phantom.total, phantom.ijk_to_ras),
                         body_seg=Volume(phantom.vertebrae_body, phantom.ijk_to_ras))
    rows = {r["level"]: r for r in result.vertebrae}
    assert "suspected_lesion" in rows["L1"]["flags"] and rows["L1"]["genant_grade"] >= 2
    assert "instrumented" in rows["L2"]["flags"]
    fracture = result.exam["fracture"]
    assert fracture["possibly_pathological_levels"] == ["L1"] and "L1" not in fracture["fractured_levels"]
    bone = result.exam["bone"]
    assert "L2" not in bone["lumbar_levels"] and bone["excluded_lumbar"]["L2"] == "cement or screws"
    assert result.exam["review"]["needed"] and any("L1" in r for r in result.exam["review"]["reasons"])


def test_a_fracture_too_collapsed_to_check_for_a_lesion_asks_for_a_review():
    """A T10 crushed by 45 % at 3 mm voxels leaves no core to look for a lesion in: the fracture
    is still graded and counted, but its row says `lesions_not_assessed` and the exam asks for a
    review (it may be pathological); the unfractured vertebrae carry no such flag."""
    from VertebralFractureScreenLib.exam.screening import screen_exam
    from VertebralFractureScreenLib.io.volume import Volume

    levels = lv.parse_level_range("T9-L1")
    phantom = make_phantom(PhantomSpec(levels=levels, spacing=(3.0, 3.0, 3.0), trabecular_hu=110.0, noise_hu=10.0,
                                       fractures=(Fracture.parse("T10:crush:0.45"),), seed=23))
    result = screen_exam(Volume(phantom.ct, phantom.ijk_to_ras), seg=phantom.total, body_seg=phantom.vertebrae_body,
                         exam_id="collapsed", levels=levels)
    rows = {row["level"]: row for row in result.vertebrae}
    assert rows["T10"]["genant_grade"] == 3 and "lesions_not_assessed" in rows["T10"]["flags"]
    assert result.exam["fracture"]["fractured_levels"] == ["T10"]  # counted: nothing says it is pathological
    assert not any("lesions_not_assessed" in rows[level]["flags"] for level in rows if level != "T10")
    assert "fracture whose body could not be checked for a lesion: T10" in result.exam["review"]["reasons"]
