"""Our morphometry on TotalSegmentator's example CT, beside TotalSegmentator's own spine report.

Run by hand: ``.venv/bin/python Testing/benchmarks/bench_real_ct.py [DATA_DIR]`` where DATA_DIR is
the ``totalsegmentator-example`` folder (default: ``../shared/data/totalsegmentator-example``).
Prints per vertebra our Ha/Hm/Hp, grade and flags, and the spine report's heights (its
``anterior``/``middle``/``posterior`` keys), and the time of the measurement.
"""

import json
import sys
import time
from pathlib import Path

from VertebralFractureScreenLib.grading import grade_spine
from VertebralFractureScreenLib.imageio import read_ct, read_labelmap
from VertebralFractureScreenLib.morphometry import measure_heights

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


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "totalsegmentator-example")
