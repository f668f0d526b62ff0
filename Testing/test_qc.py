"""The QC picture (SPEC §5 ``qc.png``): the sagittal reformat along the spine puts the anatomy where
the phantom's truth says it is, keeps in-plane lengths, and the rendered PNG is complete.

Small phantoms with coarse voxels and no partial-volume supersampling keep each test to seconds.
"""

from __future__ import annotations

import math
import struct
import sys

import numpy as np
import pytest
from scipy import ndimage

from VertebralFractureScreenLib.report import qc
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.geometry import make_ijk_to_ras, rotation_matrix
from VertebralFractureScreenLib.measure.morphometry import VertebraFrame, VertebraHeights
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom
from VertebralFractureScreenLib.report.qc import QCVertebra, render_qc
from VertebralFractureScreenLib.report.reformat import spine_reformat

LEVELS = ("T12", "L1", "L2", "L3")
TRABECULAR_HU = 160.0  # the phantom's default


def _spec(**changes) -> PhantomSpec:
    base = dict(levels=LEVELS, spacing=(1.5, 1.5, 1.5), supersampling=1, lordosis_deg=60.0,
                rotation_deg=(5.0, -4.0, 10.0), fractures=(Fracture.parse("L1:wedge:0.3"),), seed=1)
    base.update(changes)
    return PhantomSpec(**base)


@pytest.fixture(scope="module")
def lordotic():
    """Strong lordosis, rotated against the grid, a grade-2 wedge fracture of L1, no noise."""
    return make_phantom(_spec())


@pytest.fixture(scope="module")
def scoliotic():
    """Lordosis and a 25° scoliosis, on an oblique grid."""
    return make_phantom(_spec(scoliosis_deg=25.0, grid_orientation="oblique"))


def _truth_rows(phantom) -> list[dict]:
    return phantom.truth["vertebrae"]


def _reformat_from_truth(phantom, **kwargs):
    rows = _truth_rows(phantom)
    return spine_reformat(phantom.ct, phantom.ijk_to_ras, [v["centre_ras"] for v in rows],
                          [v["axes_ras"]["ap"] for v in rows], **kwargs)


def _trabecular_core(reformat, pixel):
    """Image-mm centroid (x, y) and size of the trabecular core (|HU - 160| < 30) around a pixel."""
    core = np.abs(reformat.image - TRABECULAR_HU) < 30.0
    labels, _ = ndimage.label(core)
    r, c = (int(round(v)) for v in pixel)
    label = labels[r, c]
    assert label > 0, f"pixel {r, c} is not inside a trabecular core"
    rows, cols = np.nonzero(labels == label)
    px = reformat.pixel_mm
    return np.array([cols.mean(), rows.mean()]) * px, len(rows) * px * px


@pytest.mark.parametrize("mode", ["curved", "straightened"])
def test_bodies_appear_where_the_truth_puts_them(lordotic, mode):
    reformat = _reformat_from_truth(lordotic, mode=mode, slab_mm=0.0)
    assert reformat.mode == mode
    for v in _truth_rows(lordotic):
        pixel = reformat.ras_to_image(np.asarray(v["centre_ras"]))
        assert abs(reformat.offset_mm(np.asarray(v["centre_ras"]))) < 1e-6  # the surface passes through it
        centroid, area = _trabecular_core(reformat, pixel)
        tolerance = 2.0 if v["fracture"] else 1.0  # a wedge moves the core's centroid off the frame centre
        assert np.allclose(centroid, pixel[::-1] * reformat.pixel_mm, atol=tolerance), v["level"]
        # The core is the body's mid-sagittal section inside its cortex: roughly depth x height.
        core_depth = v["body_depth_mm"] - 2 * 1.0
        assert 0.6 * core_depth * v["hp_mm"] < area < 1.1 * core_depth * v["hp_mm"], v["level"]


def test_cranial_is_up_and_anterior_is_left(lordotic):
    reformat = _reformat_from_truth(lordotic, slab_mm=0.0)
    px = reformat.pixel_mm
    pixels = np.array([reformat.ras_to_image(np.asarray(v["centre_ras"])) for v in _truth_rows(lordotic)])
    assert np.all(np.diff(pixels[:, 0]) > 10 / px)  # T12 at the top, L3 at the bottom
    # The arches (phantom: 400 HU) lie to the right of every body: posterior is right.
    arches, count = ndimage.label(np.abs(reformat.image - 400.0) < 30.0)
    sizes = ndimage.sum_labels(np.ones_like(arches), arches, index=np.arange(1, count + 1)) * px * px
    big = [k + 1 for k, size in enumerate(sizes) if size > 100.0]  # not the cortex's edge pixels
    assert len(big) == len(pixels)
    arch_cols = [np.nonzero(arches == k)[1].min() for k in big]
    depth = max(v["body_depth_mm"] for v in _truth_rows(lordotic))
    assert min(arch_cols) > pixels[:, 1].max() + 0.5 * depth / px
    # What lies in front of each body (left of it) is soft tissue.
    for (r, c), v in zip(pixels, _truth_rows(lordotic)):
        front = reformat.image[int(round(r)), : int(c - 0.5 * v["body_depth_mm"] / px) - 2]
        front = front[np.isfinite(front)]
        assert len(front) > 10 and front.max() < 150.0


def test_curved_reformat_shows_the_lordosis_straightened_reformat_removes_it(scoliotic):
    """The straightened reformat puts every body on one column; the curved one shows the curve."""
    straight = _reformat_from_truth(scoliotic, mode="straightened", slab_mm=0.0)
    curved = _reformat_from_truth(scoliotic, mode="curved", slab_mm=0.0)
    straight_x, curved_x = [], []
    for v in _truth_rows(scoliotic):
        centroid, _ = _trabecular_core(straight, straight.ras_to_image(np.asarray(v["centre_ras"])))
        tolerance = 2.0 if v["fracture"] else 1.0
        assert centroid[0] == pytest.approx(45.0, abs=tolerance), v["level"]  # the centre line's column
        straight_x.append(centroid[0])
        centroid, _ = _trabecular_core(curved, curved.ras_to_image(np.asarray(v["centre_ras"])))
        curved_x.append(centroid[0])
    assert np.ptp(straight_x) < 2.5
    assert np.ptp(curved_x) > 4.0


@pytest.mark.parametrize("phantom_name", ["lordotic", "scoliotic"])
def test_height_lines_keep_their_true_length_in_the_curved_reformat(request, phantom_name):
    phantom = request.getfixturevalue(phantom_name)
    reformat = _reformat_from_truth(phantom, slab_mm=0.0)
    for v in _truth_rows(phantom):
        tilt = 0.0
        if phantom_name == "scoliotic":  # a coronal tilt shortens the projected line by its cosine
            tilt = math.asin(abs(float(np.dot(v["axes_ras"]["cc"], reformat._plane["lr"]))))
        for key in qc.HEIGHT_KEYS:
            top, bottom = (np.asarray(p) for p in v["height_points_ras"][key])
            a, b = reformat.ras_to_image(np.stack([top, bottom]))
            length = float(np.linalg.norm(a - b)) * reformat.pixel_mm
            assert length == pytest.approx(v[f"{key}_mm"] * math.cos(tilt), abs=0.05), (v["level"], key)


def test_straightened_reformat_distorts_off_centre_lengths(lordotic):
    """Why the picture defaults to the curved reformat: straightening a lordosis shortens the
    anterior heights and lengthens the posterior ones; the middle height stays true."""
    reformat = _reformat_from_truth(lordotic, mode="straightened", slab_mm=0.0)
    v = next(row for row in _truth_rows(lordotic) if row["level"] == "L2")
    lengths = {}
    for key in qc.HEIGHT_KEYS:
        a, b = reformat.ras_to_image(np.asarray(v["height_points_ras"][key]))
        lengths[key] = float(np.linalg.norm(a - b)) * reformat.pixel_mm
    assert lengths["hm"] == pytest.approx(v["hm_mm"], abs=0.3)
    assert lengths["ha"] < v["ha_mm"] - 0.5
    assert lengths["hp"] > v["hp_mm"] + 0.5


@pytest.mark.parametrize("mode", ["curved", "straightened"])
def test_mapping_is_consistent_with_the_sampled_image_on_an_anisotropic_oblique_grid(mode):
    """Pixel → RAS → pixel round-trips, and the image value is the CT's trilinear value at the
    pixel's RAS position (computed independently on the whole volume)."""
    rng = np.random.default_rng(7)
    ct = ndimage.gaussian_filter(rng.normal(0, 300, size=(60, 90, 80)), 2.0).astype(np.int16)
    ijk_to_ras = make_ijk_to_ras((0.7, 0.7, 3.0), (-20.0, -40.0, -80.0), rotation_matrix(12.0, -8.0, 20.0))
    middle = ijk_to_ras @ np.array([40.0, 45.0, 30.0, 1.0])
    s = np.linspace(-45, 45, 4)
    centres = middle[:3] + np.stack([3 * np.sin(s / 40), 8 * np.cos(s / 30), -s], axis=1)
    ap = np.tile([0.1, 1.0, 0.05], (4, 1))
    reformat = spine_reformat(ct, ijk_to_ras, centres, ap, mode=mode, pixel_mm=0.6, slab_mm=0.0,
                              anterior_mm=10.0, posterior_mm=15.0)
    rows, cols = reformat.shape
    r = rng.uniform(0, rows - 1, 300)
    c = rng.uniform(0, cols - 1, 300)
    ras = reformat.image_to_ras(r, c)
    assert np.allclose(reformat.ras_to_image(ras), np.stack([r, c], axis=1), atol=1e-3)
    assert np.allclose(reformat.offset_mm(ras), 0.0, atol=1e-3)
    ri, ci = np.round(r).astype(int), np.round(c).astype(int)
    ras_pixels = reformat.image_to_ras(ri, ci)
    inverse = np.linalg.inv(ijk_to_ras)
    kji = (ras_pixels @ inverse[:3, :3].T + inverse[:3, 3])[:, ::-1]
    expected = ndimage.map_coordinates(ct.astype(np.float64), kji.T, order=1, mode="constant", cval=np.nan)
    got = reformat.image[ri, ci]
    inside = np.isfinite(expected) & np.all((kji >= 0) & (kji <= np.array(ct.shape) - 1), axis=1)
    assert inside.sum() > 100
    assert np.allclose(got[inside], expected[inside], atol=0.05)


@pytest.mark.parametrize("levels", [("L2",), ("L1", "L2")], ids=["one", "two"])
def test_one_or_two_vertebrae_are_enough(lordotic, levels):
    rows = [v for v in _truth_rows(lordotic) if v["level"] in levels]
    reformat = spine_reformat(lordotic.ct, lordotic.ijk_to_ras, [v["centre_ras"] for v in rows],
                              [v["axes_ras"]["ap"] for v in rows], cc_ras=rows[0]["axes_ras"]["cc"], slab_mm=0.0)
    for v in rows:
        pixel = reformat.ras_to_image(np.asarray(v["centre_ras"]))
        centroid, _ = _trabecular_core(reformat, pixel)
        assert np.allclose(centroid, pixel[::-1] * reformat.pixel_mm, atol=2.0 if v["fracture"] else 1.0)
        for key in qc.HEIGHT_KEYS:  # a body's own axis is the picture's vertical
            a, b = reformat.ras_to_image(np.asarray(v["height_points_ras"][key]))
            assert np.linalg.norm(a - b) * reformat.pixel_mm == pytest.approx(v[f"{key}_mm"], abs=0.6)


def test_a_centre_line_that_turns_back_falls_back_to_straightening():
    ct = np.zeros((40, 40, 40), np.int16)
    centres = np.array([[0, 0, 0], [0, 30, -30], [0, 0, -45], [0, -12, -12]], float)  # curls back on its chord
    ap = np.tile([0.0, 1.0, 0.3], (4, 1))
    reformat = spine_reformat(ct, np.eye(4), centres, ap, mode="curved", slab_mm=0.0)
    assert reformat.mode == "straightened"


# ------------------------------------------------------------------------------------------------
# The picture
# ------------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete file
    return struct.unpack(">II", data[16:24])


def _pixels(path) -> np.ndarray:
    from matplotlib.image import imread

    return (imread(str(path))[..., :3] * 255).round().astype(int)


def _count_colour(pixels: np.ndarray, hex_colour: str, tolerance: int = 12) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int(np.sum(np.all(np.abs(pixels - rgb) <= tolerance, axis=-1)))


def _qc_from_truth(phantom, grades: dict[str, int | None], hu: dict[str, float] | None = None) -> list[QCVertebra]:
    records = []
    for v in _truth_rows(phantom):
        grade = grades.get(v["level"], 0)
        records.append(QCVertebra(
            level=v["level"], complete=True, centre_ras=np.asarray(v["centre_ras"]),
            ap_ras=np.asarray(v["axes_ras"]["ap"]), cc_ras=np.asarray(v["axes_ras"]["cc"]),
            height_lines_ras={k: tuple(np.asarray(p) for p in v["height_points_ras"][k]) for k in qc.HEIGHT_KEYS},
            ha_mm=v["ha_mm"], hm_mm=v["hm_mm"], hp_mm=v["hp_mm"], genant_grade=grade,
            shape="wedge" if grade else "normal", height_loss=v["height_loss"],
            trabecular_hu=(hu or {}).get(v["level"], math.nan)))
    return records


def test_render_qc_writes_a_complete_png_with_grade_colours(lordotic, tmp_path):
    normal = tmp_path / "normal.png"
    fractured = tmp_path / "fractured.png"
    render_qc(lordotic.ct, lordotic.ijk_to_ras, _qc_from_truth(lordotic, {}), normal, title="exam 1")
    render_qc(lordotic.ct, lordotic.ijk_to_ras, _qc_from_truth(lordotic, {"L1": 3}, {"L1": 142.0}), fractured,
              title="exam 1\ncontrast-enhanced")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fractured.png", "normal.png"]  # no temporary files
    for path in (normal, fractured):
        width, height = _png_size(path)
        assert 500 <= width <= 2500 and 600 <= height <= 1600
    # The legend always shows each grade colour once; a grade-3 vertebra adds red lines and its label.
    red = qc.GRADE_COLOURS[3]
    assert _count_colour(_pixels(fractured), red) > _count_colour(_pixels(normal), red) + 300
    green = qc.GRADE_COLOURS[0]
    assert _count_colour(_pixels(normal), green) > _count_colour(_pixels(fractured), green) + 300


def test_render_qc_replaces_an_existing_file_and_reports_unwritable_targets(lordotic, tmp_path):
    out = tmp_path / "qc.png"
    out.write_bytes(b"old")
    render_qc(lordotic.ct, lordotic.ijk_to_ras, _qc_from_truth(lordotic, {}), out)
    assert _png_size(out)[0] > 0
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        render_qc(lordotic.ct, lordotic.ijk_to_ras, _qc_from_truth(lordotic, {}), blocker / "qc.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder", "qc.png"]


def test_render_qc_does_not_touch_the_users_matplotlib_state(lordotic, tmp_path):
    import matplotlib

    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = matplotlib.rcParams._get("backend")  # the raw value, without resolving it
    render_qc(lordotic.ct, lordotic.ijk_to_ras, _qc_from_truth(lordotic, {}), tmp_path / "qc.png")
    assert matplotlib.rcParams._get("backend") == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_render_qc_from_morphometry_records_with_incomplete_and_unmeasured_vertebrae(tmp_path):
    """VertebraHeights + grades + an HU mapping on a 1 x 1 x 3 mm oblique grid, with a vertebra
    cut by the field of view, one whose heights are NaN and one without a frame."""
    phantom = make_phantom(_spec(levels=("L1", "L2", "L3"), spacing=(1.0, 1.0, 3.0), grid_orientation="oblique",
                                 lordosis_deg=40.0))
    heights = []
    for v in _truth_rows(phantom):
        axes = v["axes_ras"]
        frame = VertebraFrame(np.asarray(v["centre_ras"]), np.asarray(axes["lr"]), np.asarray(axes["ap"]),
                              np.asarray(axes["cc"]))
        lines = {k: tuple(np.asarray(p) for p in v["height_points_ras"][k]) for k in qc.HEIGHT_KEYS}
        heights.append(VertebraHeights(v["level"], v["total_id"], True, v["ha_mm"], v["hm_mm"], v["hp_mm"],
                                       frame=frame, height_lines_ras=lines))
    heights[0].complete = False
    heights[0].flags.append("touches_field_of_view_edge")
    heights[1].hm_mm = math.nan
    heights[1].height_lines_ras.pop("hm")
    heights.append(VertebraHeights("L4", 28, False, flags=["implausible_body_volume"]))
    out = tmp_path / "qc.png"
    render_qc(phantom.ct, phantom.ijk_to_ras, heights, out, hu={"L2": 120.0, "L3": 131.0})
    assert _png_size(out)[1] > 500
    records = qc.qc_vertebrae(heights, hu={"L3": 131.0, "L4": math.nan})
    labels = {r.level: qc.vertebra_label(r) for r in records}
    assert labels["L1"][0] == "L1  incomplete · cut by FOV"
    assert labels["L2"][0] == "L2  incomplete · heights missing"
    assert labels["L2"][1] == f"Ha/Hm/Hp {heights[1].ha_mm:.1f}/–/{heights[1].hp_mm:.1f} mm"
    assert labels["L3"][0].startswith("L3  G") and labels["L3"][1].startswith("HU 131 · Ha/Hm/Hp")
    assert records[3].centre_ras is None


def test_vertebra_label_reads_level_grade_shape_loss_and_hu():
    v = QCVertebra("L1", True, genant_grade=2, shape="wedge", height_loss=0.312, trabecular_hu=141.6,
                   ha_mm=19.04, hm_mm=24.1, hp_mm=27.6)
    assert qc.vertebra_label(v) == ("L1  G2  wedge  31%", "HU 142 · Ha/Hm/Hp 19.0/24.1/27.6 mm")
    v = QCVertebra("L3", True, genant_grade=1, shape="crush", height_loss=0.22, borderline=True)
    assert qc.vertebra_label(v) == ("L3  G1  crush  22% *", "")
    v = QCVertebra("L2", True, genant_grade=0, shape="normal", height_loss=0.02, ha_mm=25.0, hm_mm=25.0, hp_mm=25.0,
                   flags=["imprecise_heights"])
    assert qc.vertebra_label(v) == ("L2  G0  2%  · heights imprecise", "Ha/Hm/Hp 25.0/25.0/25.0 mm")
    v.flags.append("grade_uncertain")  # what matters more: the grade itself is open
    assert qc.vertebra_label(v)[0] == "L2  G0  2%  · grade uncertain"
    v = QCVertebra("L4", True, genant_grade=0, shape="normal", height_loss=0.04)
    assert qc.vertebra_label(v)[0] == "L4  G0  4%"
    assert qc.vertebra_label(QCVertebra("S1", True, flags=["not_graded"]))[0] == "S1  not graded"
    # an implausible body's heights mean nothing: they are not printed (the first-day T11 "3.6/4.1/4.6 mm")
    v = QCVertebra("T11", False, ha_mm=3.6, hm_mm=4.1, hp_mm=4.6, trabecular_hu=80.0, flags=["implausible_height"])
    assert qc.vertebra_label(v) == ("T11  incomplete · implausible height", "HU 80 · heights not measurable")


def test_render_qc_needs_a_placed_vertebra(lordotic, tmp_path):
    with pytest.raises(InputError, match="at least one vertebra"):
        render_qc(lordotic.ct, lordotic.ijk_to_ras, [QCVertebra("L1")], tmp_path / "qc.png")
    assert not any(tmp_path.iterdir())


def test_the_picture_shows_the_basis_of_a_fracture_grade(lordotic, tmp_path):
    """A fractured vertebra (the phantom's 30 % L1 wedge) gets its measured outline, the expected
    superior endplate from its neighbours and its lost part drawn; a normal one gets none of them
    (issue 32). The expected endplate lies where the normal body's would: about the neighbours'
    height above the inferior endplate, anteriorly 30 % above the measured one."""
    from VertebralFractureScreenLib.measure.grading import grade_spine
    from VertebralFractureScreenLib.measure.morphometry import measure_heights

    heights = measure_heights(lordotic.total, lordotic.ijk_to_ras, body_labels=lordotic.vertebrae_body,
                              ct=lordotic.ct)
    grades = grade_spine(heights)
    records = {r.level: r for r in qc.qc_vertebrae(heights, grades)}
    truth = {v["level"]: v for v in _truth_rows(lordotic)}
    l1 = records["L1"]
    assert l1.genant_grade == 2 and l1.expected_superior_ras is not None
    cc = np.asarray(truth["L1"]["axes_ras"]["cc"])
    anterior_expected = (l1.expected_superior_ras[0] - l1.outline_ras["inferior"][0]) @ cc
    anterior_measured = (l1.outline_ras["superior"][0] - l1.outline_ras["inferior"][0]) @ cc
    assert anterior_expected == pytest.approx(truth["L1"]["normal_ha_mm"], rel=0.08)
    assert 1.0 - anterior_measured / anterior_expected == pytest.approx(0.3, abs=0.05)
    assert l1.lost[0] and not l1.lost[-1]  # the wedge lost its anterior height, kept its posterior
    out, normal_only = tmp_path / "basis.png", tmp_path / "normal.png"
    render_qc(lordotic.ct, lordotic.ijk_to_ras, list(records.values()), out)
    for r in records.values():
        r.genant_grade = 0 if r.genant_grade is not None else None
    render_qc(lordotic.ct, lordotic.ijk_to_ras, list(records.values()), normal_only)
    pixels = _pixels(out)
    assert _count_colour(pixels, qc.LOST_COLOUR) > 20 + _count_colour(_pixels(normal_only), qc.LOST_COLOUR)
    assert _count_colour(pixels, qc.EXPECTED_COLOUR) > 20 + _count_colour(_pixels(normal_only), qc.EXPECTED_COLOUR)


# ------------------------------------------------------------------------------------------------
# Names clear of lines, cut vertebrae, short scans (the first-day QC defects, issue 27)
# ------------------------------------------------------------------------------------------------


def _height_lines(figure) -> list:
    """The height lines drawn on the image (the only lines with end caps)."""
    return [line for line in figure.axes[0].lines if line.get_marker() == "_"]


def _names_crossed_by_lines(figure, levels) -> list[str]:
    """The level names on the image whose drawn box a height line crosses."""
    from matplotlib.path import Path as MplPath

    renderer = figure.canvas.get_renderer()
    paths = [MplPath(line.get_transform().transform(line.get_xydata())) for line in _height_lines(figure)]
    crossed = []
    for text in figure.axes[0].texts:
        if text.get_text() in levels:
            box = text.get_window_extent(renderer)
            if any(path.intersects_bbox(box, filled=False) for path in paths):
                crossed.append(text.get_text())
    return crossed


def _scan_top_edge_rows(figure) -> np.ndarray:
    """Per image column that shows the scan, the first row inside the scan."""
    inside = ~np.ma.getmaskarray(figure.axes[0].images[0].get_array())
    columns = np.flatnonzero(inside.any(axis=0))
    return np.argmax(inside[:, columns], axis=0)


def _heading(figure) -> str:
    return " ".join(text.get_text() for text in figure.texts)


def test_a_name_moves_forward_until_no_line_crosses_it():
    # A vertical line through the name's box: the name ends 1.5 mm in front of it.
    vertical = np.array([[20.0, 0.0], [20.0, 30.0]])
    assert qc.clear_of_lines(22.0, 15.0, 6.0, 3.0, [vertical], 0.0) == pytest.approx(18.5)
    # A line above or below the box, or behind it, does not move it.
    assert qc.clear_of_lines(22.0, 40.0, 6.0, 3.0, [vertical], 0.0) == 22.0
    assert qc.clear_of_lines(12.0, 15.0, 6.0, 3.0, [vertical], 0.0) == 12.0
    # A tilted line is avoided where it crosses the box's height; two lines in a row push it on.
    tilted = np.array([[10.0, 0.0], [30.0, 40.0]])  # x = 17.5 … 20.5 over the band y = 18 ± (1.5 + 1.5)
    assert qc.clear_of_lines(25.0, 18.0, 4.0, 3.0, [tilted], 0.0) == pytest.approx(16.0)
    assert qc.clear_of_lines(25.0, 15.0, 4.0, 3.0, [vertical, vertical - [4.0, 0.0]], 0.0) == pytest.approx(14.5)
    # Never out of the image.
    assert qc.clear_of_lines(22.0, 15.0, 6.0, 3.0, [vertical], 16.0) == 22.0


def test_a_cut_vertebra_gets_no_lines_and_no_heights(lordotic):
    """A body cut by the scan has heights of the part inside it: no lines ending on the scan's edge,
    no numbers in its label; its level name stays clear of its neighbours' lines."""
    records = _qc_from_truth(lordotic, {"T12": None})
    records[0].complete = False
    records[0].flags = ["body_cut", "endplate_cut_superior", "touches_field_of_view_edge"]
    figure = qc.qc_figure(lordotic.ct, lordotic.ijk_to_ras, records)
    assert len(_height_lines(figure)) == 3 * (len(records) - 1)
    assert qc.vertebra_label(records[0]) == ("T12  incomplete · cut by FOV", "")
    assert _names_crossed_by_lines(figure, LEVELS) == []


def test_a_scan_shorter_than_two_bodies_is_shown_on_its_own_sagittal_plane(lordotic):
    """20 slices (30 mm) of the lordotic phantom: no body lies whole in them; the centre line through
    the cut bodies' centres would tilt the picture into a diagonal band. The scan's own sagittal
    plane shows it as a horizontal band, and the heading says so."""
    from VertebralFractureScreenLib.measure.morphometry import measure_heights

    k0 = lordotic.ct.shape[0] // 2 - 10
    crop = np.asarray(lordotic.ijk_to_ras, float).copy()
    crop[:3, 3] += k0 * crop[:3, 2]
    ct, total = lordotic.ct[k0:k0 + 20], lordotic.total[k0:k0 + 20]
    heights = measure_heights(total, crop, ct=ct)
    assert sum(not qc.ENDPLATE_CUT_FLAGS.intersection(h.flags) for h in heights) < 2
    figure = qc.qc_figure(ct, crop, heights)
    top = _scan_top_edge_rows(figure)
    assert len(top) > 100 and np.ptp(top) <= 2  # horizontal, to a pixel or two
    assert "The scan covers 28 mm cranio-caudally" in _heading(figure)
    assert "sagittal plane of the scan" in _heading(figure).lower()
    # A scan with two whole bodies keeps the view along the spine.
    assert "The scan covers" not in _heading(qc.qc_figure(lordotic.ct, lordotic.ijk_to_ras,
                                                          _qc_from_truth(lordotic, {})))


def test_the_example_ct_pictures_have_no_first_day_defects(example_data):
    """The shared example CT (T11 and T12 cut at the top): no lines for the cut bodies and no name
    crossed by a line; its 20-slice DICOM series: a horizontal band and the heading's note."""
    from VertebralFractureScreenLib.exam.screening import screen_exam

    full = screen_exam(example_data / "example_ct.nii.gz", seg=example_data / "example_seg_fast_force_split.nii.gz")
    figure = qc.qc_figure(full.inputs.ct.array, full.inputs.ct.ijk_to_ras, full.heights, grades=full.grades)
    graded = [h.level for h, g in zip(full.heights, full.grades) if g.genant_grade is not None]
    assert {"T11", "T12"}.isdisjoint(graded) and len(_height_lines(figure)) == 3 * len(graded)
    assert _names_crossed_by_lines(figure, [h.level for h in full.heights]) == []
    assert "The scan covers" not in _heading(figure)

    short = screen_exam(example_data / "example_ct_dicom", seg=example_data / "example_seg_dicom.nii.gz")
    figure = qc.qc_figure(short.inputs.ct.array, short.inputs.ct.ijk_to_ras, short.heights, grades=short.grades)
    assert np.ptp(_scan_top_edge_rows(figure)) <= 2
    assert "The scan covers 38 mm cranio-caudally" in _heading(figure)
