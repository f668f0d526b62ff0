#!/usr/bin/env python
"""Make the demonstration fracture model shipped in ``VertebralFractureScreen/Resources/Models/``.

DEMONSTRATION ONLY: the model is trained on synthetic phantoms, not on patients. It shows how
``vfscreen train`` / ``screen --model`` work end to end and must never be used clinically; every
output of it says so (``demonstration: true`` in the model file and in ``exam.json``).

The script is the whole recipe and is deterministic (fixed seeds):

1. render ``--exams`` phantom spines T12–S1 at 3 mm with the whole body section (so muscles and
   aorta are measured). Exam ``n`` draws, from a generator seeded with ``n``: with probability 0.45
   one or two fractured levels among T12–L4 (shape wedge/biconcave/crush, height loss 0.22–0.5),
   trabecular HU (lower with fractures: 105 ± 25 HU against 150 ± 30 HU; the association of low
   attenuation with fracture that the published model found), autochthon fat fraction (higher with
   fractures), lordosis, noise, a small rotation and contrast;
2. screen them with ``vfscreen cohort`` (given segmentations) into ``features.csv``, with the
   truth's label ``fracture`` (any vertebra with Genant grade ≥ 1) passed through the manifest;
3. train the default model (logistic regression, 5-fold cross-validation, target specificity
   0.95) and save it with ``demonstration = true``.

Run by hand (about 5 minutes on 2 cores)::

    .venv/bin/python Testing/demo_model/make_demo_model.py --work /tmp/vfs-demo-cohort
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from VertebralFractureScreenLib import cohort
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.model.fracture_model import demo_model_path, read_feature_table
from VertebralFractureScreenLib.model.report import summary_lines, write_report
from VertebralFractureScreenLib.model.training import train_model
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, write_phantom

LEVELS = lv.parse_level_range("T12-S1")
FRACTURABLE = ("T12", "L1", "L2", "L3", "L4")
NAME = "demo: synthetic phantom cohort (NOT FOR CLINICAL USE)"
INTENDED_USE = ("DEMONSTRATION ONLY: trained on synthetic phantom spines to show the workflow. Its probabilities "
                "mean nothing for patients; never use it clinically.")


def exam_spec(number: int) -> tuple[PhantomSpec, int]:
    """The phantom of exam ``number`` and its label (1 = at least one fracture)."""
    rng = np.random.default_rng(1000 + number)
    fractured = rng.random() < 0.45
    fractures = ()
    if fractured:
        count = 1 + int(rng.random() < 0.3)
        chosen = rng.choice(FRACTURABLE, size=count, replace=False)
        fractures = tuple(Fracture(str(level), str(rng.choice(["wedge", "biconcave", "crush"])),
                                   float(rng.uniform(0.22, 0.5))) for level in chosen)
    trabecular = float(np.clip(rng.normal(105, 25) if fractured else rng.normal(150, 30), 50, 260))
    fat = float(np.clip(rng.uniform(0.15, 0.35) if fractured else rng.uniform(0.05, 0.25), 0.0, 0.5))
    spec = PhantomSpec(levels=LEVELS, spacing=(3.0, 3.0, 3.0), fov="body", supersampling=3, fractures=fractures,
                       trabecular_hu=trabecular, autochthon_fat_fraction=fat,
                       lordosis_deg=float(rng.uniform(30, 50)), noise_hu=float(rng.uniform(10, 20)),
                       rotation_deg=(float(rng.uniform(-5, 5)), float(rng.uniform(-5, 5)), 0.0),
                       contrast=bool(rng.random() < 0.3), seed=number)
    return spec, int(fractured)


def render(args: tuple[int, Path]) -> tuple[str, int]:
    number, folder = args
    exam_id = f"phantom{number:03d}"
    target = folder / exam_id
    if not (target / "truth.json").exists():
        spec, _ = exam_spec(number)
        write_phantom(spec, target)
    truth = json.loads((target / "truth.json").read_text())
    label = int(any((v.get("genant_grade") or 0) >= 1 for v in truth["vertebrae"]))
    return exam_id, label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for phantoms and screening")
    parser.add_argument("--exams", type=int, default=80)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=demo_model_path())
    args = parser.parse_args(argv)
    phantoms = args.work / "phantoms"
    phantoms.mkdir(parents=True, exist_ok=True)
    print(f"rendering {args.exams} phantoms into {phantoms} ...", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        labels = dict(pool.map(render, [(n, phantoms) for n in range(args.exams)]))
    manifest = args.work / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["exam_id", "ct", "seg", "body_seg", "fracture"])
        for exam_id, label in labels.items():
            folder = phantoms / exam_id
            writer.writerow([exam_id, folder / "ct.nii.gz", folder / "total.nii.gz", folder / "vertebrae_body.nii.gz",
                             label])
    print("screening them ...", flush=True)
    summary = cohort.run_cohort(manifest, args.work / "cohort", workers=args.jobs,
                                settings=cohort.CohortSettings(levels=lv.parse_level_range("T12-L5"), qc=False))
    print(summary.text())
    table = read_feature_table(args.work / "cohort" / cohort.FEATURES_FILE, "fracture")
    result = train_model(table, kind="logistic", folds=5, seed=0, target_specificity=0.95, name=NAME,
                         demonstration=True, intended_use=INTENDED_USE)
    metrics = result.model.training["cross_validation"]
    write_report(args.work / "report", result.model, metrics, table.labels, result.out_of_fold,
                 what="5-fold cross-validation (synthetic phantoms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.model.save(args.out)
    print("\n".join(summary_lines(result.model, metrics, what="5-fold cross-validation (synthetic phantoms)")))
    print(f"demo model written to {args.out}; report in {args.work / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
