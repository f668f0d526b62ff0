"""Our morphometry on TotalSegmentator's example CT, beside TotalSegmentator's own spine report.

Run by hand: ``.venv/bin/python Testing/benchmarks/bench_real_ct.py [DATA_DIR]`` where DATA_DIR is
the ``totalsegmentator-example`` folder (default: ``../shared/data/totalsegmentator-example``).
Prints per vertebra our Ha/Hm/Hp, grade and flags, and the spine report's heights (its
``anterior``/``middle``/``posterior`` keys), and the time of the measurement.

Then bone attenuation, contrast and muscles: per vertebra the trabecular ROI's HU beside the spine
report's ``intensity`` (its mean and median HU over the whole vertebral body, cortex included), the
bone summary, the aorta's HU and contrast flag, and the muscles per level. The spine report's
masks hold only the vertebrae, so the aorta and the muscles come from TotalSegmentator's full
``total`` segmentation of the same CT (``example_seg_fast_force_split.nii.gz``, fast model).
"""

import json
import sys
import time
from pathlib import Path

from VertebralFractureScreenLib.measure import attenuation, muscles
from VertebralFractureScreenLib.measure.grading import grade_spine
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap
from VertebralFractureScreenLib.measure.morphometry import measure_heights

REPO = Path(__file__).resolve().parents[2]


def main(data: Path) -> None:
    ct = read_ct(data / "example_ct.nii.gz")
    labels = read_labelmap(data / "spine_report" / "totalseg.nii.gz", reference=ct)
    bodies = read_labelmap(data / "spine_report" / "totalseg_vertebrae_body.nii.gz", reference=ct)
    report = json.loads((data / "spine_report" / "spine_report.json").read_text())["results"]
    started = time.perf_counter()
    heights = measure_heights(labels.array, ct.ijk_to_ras, body_labels=bodies.array, ct=ct.array)
    elapsed = time.perf_counter() - started
    grades = {g.level: g for g in grade_spine(heights)}
    print(f"morphometry of {len(heights)} vertebrae in {elapsed:.2f} s")
    print("level complete   Ha    Hm    Hp  grade shape      | spine report Ha   Hm   Hp | flags")
    for h in heights:
        g = grades[h.level]
        ts = [report.get(f"vertebrae_{h.level}_height_{k}_mm") for k in ("anterior", "middle", "posterior")]
        ts_text = " ".join(f"{v:4.1f}" if v is not None else "   —" for v in ts)
        grade = "—" if g.genant_grade is None else str(g.genant_grade)
        print(f"{h.level:<5} {h.complete!s:<8} {h.ha_mm:5.1f} {h.hm_mm:5.1f} {h.hp_mm:5.1f}  {grade:>5} {g.shape:<10} |"
              f"            {ts_text} | {', '.join(h.flags + g.flags)}")
    attenuation_report(data, ct, labels, bodies, heights, list(grades.values()), report)


def attenuation_report(data: Path, ct, labels, bodies, heights, grades, report: dict) -> None:
    """Trabecular ROIs, bone summary, contrast and muscles (see the module docstring)."""
    total = read_labelmap(data / "example_seg_fast_force_split.nii.gz", reference=ct)
    started = time.perf_counter()
    rois = attenuation.measure_trabecular(ct.array, labels.array, ct.ijk_to_ras, heights, body_labels=bodies.array,
                                          grades=grades)
    contrast = attenuation.measure_contrast(ct.array, total.array, ct.ijk_to_ras)
    summary = attenuation.bone_summary(rois, contrast)
    rows = muscles.measure_muscles(ct.array, total.array, ct.ijk_to_ras, heights)
    elapsed = time.perf_counter() - started
    print(f"\nattenuation, contrast and muscles in {elapsed:.2f} s")
    print("level  trabecular ROI: mean   SE median   SD  voxels  ml | spine report body: mean median | flags")
    for r in rois:
        ts_mean = report.get(f"vertebrae_{r.level}_intensity")
        ts_median = report.get(f"vertebrae_{r.level}_intensity_median")
        ts_text = f"{ts_mean:6.1f} {ts_median:6.1f}" if ts_mean is not None else "     —      —"
        print(f"{r.level:<6} {r.mean_hu:21.1f} {r.mean_hu_se:4.1f} {r.median_hu:6.1f} {r.sd_hu:5.1f} {r.voxels:6d} "
              f"{r.volume_ml:4.1f} |"
              f"                  {ts_text} | {', '.join(r.flags)}")
    print(f"bone: L1 HU {summary.l1_hu} ± {summary.l1_hu_se} SE ({summary.l1_level}) -> {summary.category}"
          f"{' (uncertain)' if summary.category_uncertain else ''}; lumbar mean "
          f"{summary.lumbar_mean_hu} over {', '.join(summary.lumbar_levels)}; warnings: {summary.warnings or '-'}")
    print(f"contrast: aorta {contrast.aorta_hu} HU over {contrast.aorta_voxels} voxels -> contrast_enhanced "
          f"{contrast.contrast_enhanced} {contrast.warnings or ''}")
    print("muscle            level   volume ml  mean HU (SE)    lean HU (SE)    IMAT  fat fr. | flags")
    for m in rows:
        print(f"{m.muscle:<17} {m.level:<7} {m.volume_ml:9.1f} {m.mean_hu:8.1f} ({m.mean_hu_se:4.2f}) "
              f"{m.lean_hu:8.1f} ({m.lean_hu_se:4.2f}) {m.imat_fraction:6.3f} {m.fat_fraction:7.3f} | {', '.join(m.flags)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "totalsegmentator-example")
