"""The fracture model: metrics against scikit-learn, cross-validated AUC on a synthetic cohort with a
known signal and without leakage (shuffled labels), JSON round trip to 1e-9, refusal of files
that do not match, ``vfscreen train`` / ``evaluate``, and the model applied in a screening."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureScreenLib.model import fracture_model as fm
from VertebralFractureScreenLib.model import metrics as mm
from VertebralFractureScreenLib.cli import main
from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.model.features import FEATURE_NAMES, FEATURE_VERSION

sklearn = pytest.importorskip("sklearn")
from sklearn.metrics import roc_auc_score  # noqa: E402

from VertebralFractureScreenLib.model.training import evaluate_model, train_model  # noqa: E402


def synthetic_cohort(n: int = 300, seed: int = 1, *, signal: bool = True) -> list[dict]:
    """Exams whose fracture label drives grade, L1 HU and muscle volume (when ``signal``), with
    missing values, noise features, and clinical columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(n):
        fractured = bool(rng.random() < 0.4)
        effect = fractured if signal else bool(rng.random() < 0.4)
        row = dict.fromkeys(FEATURE_NAMES, "")
        row["max_genant_grade"] = int(rng.choice([1, 2, 3])) if effect and rng.random() < 0.7 else int(rng.random() < 0.1)
        row["l1_hu"] = round(float(rng.normal(100 if effect else 150, 30)), 1)
        row["lumbar_mean_hu"] = round(row["l1_hu"] + float(rng.normal(0, 10)), 1)
        row["autochthon_volume_ml_per_cm"] = round(float(rng.normal(20 if effect else 23, 4)), 2) if rng.random() > 0.1 else ""
        row["aorta_hu"] = round(float(rng.normal(45, 10)), 1)
        row["hu_L3"] = "" if rng.random() < 0.2 else round(float(rng.normal(130, 40)), 1)  # noise, partly missing
        row["contrast_enhanced"] = int(rng.random() < 0.3)
        rows.append({"exam_id": f"e{number:03d}", "age": int(rng.normal(70, 8)), "sex": str(rng.choice(["F", "M"])),
                     "fracture": int(fractured), "features_version": FEATURE_VERSION, **row})
    return rows


def write_table(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def table_path(tmp_path_factory) -> Path:
    return write_table(synthetic_cohort(), tmp_path_factory.mktemp("model") / "features.csv")


@pytest.fixture(scope="module", params=["logistic", "gradient_boosting"])
def trained(request, table_path):
    table = fm.read_feature_table(table_path, "fracture")
    return table, train_model(table, kind=request.param, bootstrap_resamples=500)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) * 0.5 + 0.3 * y, 1)  # heavy ties
    assert mm.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert math.isnan(mm.roc_auc([1, 1], [0.2, 0.3]))


def test_operating_points():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    point = mm.operating_point(y, p, 0.5)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (3, 1, 3, 1)
    assert point["sensitivity"] == 0.75 and point["specificity"] == 0.75 and point["ppv"] == 0.75
    threshold = mm.threshold_for_specificity(y, p, 1.0)
    assert threshold == pytest.approx(0.7) and mm.operating_point(y, p, threshold)["specificity"] == 1.0
    assert mm.threshold_for_specificity(y, p, 0.75) == pytest.approx(0.4)  # the most sensitive one
    assert mm.youden_threshold(y, p) == pytest.approx(0.4)  # sensitivity 1, specificity 0.75
    low, high = mm.bootstrap_auc_ci(y, p, resamples=300)
    assert low <= mm.roc_auc(y, p) <= high


# ------------------------------------------------------------------------------------------------
# Training and honest evaluation
# ------------------------------------------------------------------------------------------------


def test_cross_validated_auc_finds_the_known_signal(trained):
    table, result = trained
    cv = result.model.training["cross_validation"]
    assert cv["auc"] > 0.9
    assert cv["auc_ci95"][0] < cv["auc"] < cv["auc_ci95"][1]
    assert cv["operating_point"]["specificity"] >= 0.95
    assert result.model.threshold == cv["operating_point"]["threshold"]
    assert set(result.model.features) >= {"max_genant_grade", "l1_hu", "age", "sex"}
    assert "hu_T4" in result.model.training["dropped_features"]  # missing in every exam: left out


@pytest.mark.parametrize("kind", ["logistic", "gradient_boosting"])
def test_shuffled_labels_give_chance_auc(table_path, kind):
    """No leakage: with labels shuffled, every fitted step inside the folds leaves nothing to learn."""
    table = fm.read_feature_table(table_path, "fracture")
    aucs = []
    for seed in range(3):
        table.labels = np.random.default_rng(seed).permutation(table.labels)
        aucs.append(train_model(table, kind=kind, seed=seed, bootstrap_resamples=100).model.training["cross_validation"]["auc"])
    assert abs(np.mean(aucs) - 0.5) < 0.1, aucs


def test_a_cohort_without_signal_has_chance_auc(tmp_path):
    table = fm.read_feature_table(write_table(synthetic_cohort(signal=False, seed=3), tmp_path / "f.csv"), "fracture")
    assert abs(train_model(table, bootstrap_resamples=100).model.training["cross_validation"]["auc"] - 0.5) < 0.1


def test_json_model_gives_the_fitted_pipeline_s_probabilities(trained, tmp_path):
    table, result = trained
    path = result.model.save(tmp_path / "model.json")
    loaded = fm.load_model(path)
    x = table.select(loaded.features)
    assert np.isnan(x).any()  # imputation is exercised
    expected = result.pipeline.predict_proba(x)[:, 1]
    assert np.max(np.abs(loaded.predict_proba(x) - expected)) < 1e-9
    assert np.max(np.abs(result.model.predict_proba(x) - expected)) < 1e-9
    text = path.read_text()
    assert "pickle" not in text and json.loads(text)["format_version"] == fm.MODEL_FORMAT_VERSION


def test_evaluate_on_an_external_cohort(trained, tmp_path):
    _, result = trained
    external = fm.read_feature_table(write_table(synthetic_cohort(200, seed=9), tmp_path / "ext.csv"), "fracture")
    metrics, probabilities = evaluate_model(result.model, external, bootstrap_resamples=200)
    assert metrics["auc"] > 0.9 and metrics["exams"] == 200 and probabilities.shape == (200,)
    assert metrics["operating_point"]["threshold"] == result.model.threshold
    assert metrics["operating_point"]["specificity"] > 0.85


# ------------------------------------------------------------------------------------------------
# Model files that do not match
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dict(table_path) -> dict:
    table = fm.read_feature_table(table_path, "fracture")
    return train_model(table, bootstrap_resamples=50).model.to_dict()


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(format="something else"), "not a VertebralFractureScreen fracture model"),
    (lambda d: d.update(format_version=fm.MODEL_FORMAT_VERSION + 1), "update VertebralFractureScreen or retrain"),
    (lambda d: d.update(feature_version=FEATURE_VERSION + 1), "trained on features of version"),
    (lambda d: d["features"].__setitem__(0, "shoe_size"), "does not compute: shoe_size"),
    (lambda d: d["logistic"]["coefficients"].pop(), "damaged or incomplete"),
    (lambda d: d["scaling"]["scale"].__setitem__(0, 0.0), "damaged or incomplete"),
    (lambda d: d["threshold"].update(value=1.5), "damaged or incomplete"),
    (lambda d: d.update(kind="neural_net"), "unknown model kind"),
])
def test_mismatched_model_files_are_refused(model_dict, tmp_path, change, words):
    data = json.loads(json.dumps(model_dict))
    change(data)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=words):
        fm.load_model(path)


def test_pickles_and_missing_files_are_refused(tmp_path):
    import pickle

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"format": fm.MODEL_FORMAT}))
    with pytest.raises(InputError, match="not JSON"):
        fm.load_model(path)
    with pytest.raises(InputError, match="cannot read the model file"):
        fm.load_model(tmp_path / "none.json")


@pytest.mark.parametrize("edit, words", [
    (lambda rows: [r.pop("fracture") for r in rows], "no label column 'fracture'"),
    (lambda rows: [r.update(fracture=1) for r in rows], "needs exams of both classes"),
    (lambda rows: rows[0].update(fracture="maybe"), "is not 1/0, true/false or yes/no"),
    (lambda rows: [r.update(features_version=FEATURE_VERSION + 1) for r in rows], "holds features of version"),
])
def test_feature_tables_that_cannot_train_are_one_sentence(tmp_path, edit, words):
    rows = synthetic_cohort(20)
    edit(rows)
    with pytest.raises(InputError, match=words):
        fm.read_feature_table(write_table(rows, tmp_path / "f.csv"), "fracture")


def test_unlabelled_rows_are_left_out_and_counted(tmp_path):
    rows = synthetic_cohort(30)
    rows[0]["fracture"] = rows[1]["fracture"] = ""
    table = fm.read_feature_table(write_table(rows, tmp_path / "f.csv"), "fracture")
    assert len(table.exam_ids) == 28 and table.dropped_unlabelled == 2 and table.label == "fracture"
    sex = table.values[:, table.columns.index("sex")]
    assert set(np.unique(sex)) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def test_train_and_evaluate_commands(table_path, tmp_path, capsys):
    model_path = tmp_path / "fracture_model.json"
    assert main(["train", str(table_path), "--label", "fracture", "--out", str(model_path), "--folds", "4"]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "specificity" in out and model_path.exists()
    report = tmp_path / "fracture_model_report"
    assert {p.name for p in report.iterdir()} == {"roc.png", "calibration.png", "report.txt", "report.html"}
    assert (report / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fm.load_model(model_path).training["cross_validation"]["folds"] == 4
    external = write_table(synthetic_cohort(100, seed=5), tmp_path / "external.csv")
    assert main(["evaluate", str(model_path), str(external), "--label", "fracture"]) == 0
    assert "evaluation on external.csv: 100 exams" in capsys.readouterr().out
    assert (tmp_path / "external_evaluation" / "report.html").exists()
    assert main(["train", str(table_path), "--label", "nothing", "--out", str(tmp_path / "m.json")]) == 2
    assert "no label column 'nothing'" in capsys.readouterr().err
    assert main(["train", str(table_path), "--label", "fracture", "--out", str(tmp_path / "m.json"),
                 "--folds", "500"]) == 2
    assert "500-fold cross-validation needs" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_a_small_cohort_is_warned_and_the_header_says_each_thing_once(tmp_path, capsys):
    """12 exams with a strong signal: a perfect cross-validated AUC on so few exams is a check that
    the pipeline runs, and the report says so; 300 exams carry no such warning."""
    small = write_table(synthetic_cohort(12, seed=3), tmp_path / "small.csv")
    assert main(["train", str(small), "--label", "fracture", "--out", str(tmp_path / "m.json"), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("fracture model trained on 12 exams (") and header.count("logistic") == 1, header
    assert "warning: too few exams for a reliable AUC" in out
    assert "too few exams" in (tmp_path / "m_report" / "report.txt").read_text()
    large = fm.read_feature_table(write_table(synthetic_cohort(), tmp_path / "large.csv"), "fracture")
    result = train_model(large, kind="logistic", bootstrap_resamples=200)
    from VertebralFractureScreenLib.model.report import small_sample_note
    assert small_sample_note(result.model.training["cross_validation"]) is None


def test_apply_imputes_and_lists_missing_features(trained):
    _, result = trained
    model = result.model
    output = model.apply({"l1_hu": 95.0, "max_genant_grade": 3, "sex": "F"})
    assert output["imputed_features"] == [name for name in model.features if name not in ("l1_hu", "max_genant_grade", "sex")]
    row = np.array(model.imputation_median, dtype=float)
    row[model.features.index("l1_hu")], row[model.features.index("max_genant_grade")] = 95.0, 3.0
    row[model.features.index("sex")] = 1.0
    assert output["probability"] == pytest.approx(float(model.predict_proba(row[None])[0]), abs=1e-12)
    assert output["positive"] == (output["probability"] >= model.threshold)
    assert output["demonstration"] is False and "Not a medical device" in output["note"]


def test_the_shipped_demo_model_is_marked_and_loads():
    model = fm.load_model(fm.demo_model_path())
    assert model.demonstration and "NOT FOR CLINICAL USE" in model.name and "DEMONSTRATION" in model.intended_use
    assert model.training["cross_validation"]["auc"] > 0.9
    assert fm.resolve_model("demo").name == model.name


# ------------------------------------------------------------------------------------------------
# Feature versions: a model of version 1 keeps working
# ------------------------------------------------------------------------------------------------


def test_the_version_1_demo_model_applies_to_version_2_features():
    from VertebralFractureScreenLib.model.features import FEATURE_NAMES_BY_VERSION, exam_features

    model = fm.resolve_model("demo")
    assert model.feature_version == 1 and set(model.features) <= set(FEATURE_NAMES_BY_VERSION[1])
    exam = {"bone": {"l1_hu": 95.0, "lumbar_mean_hu": 101.0, "l1_hu_for_phase": 77.0, "lumbar_mean_hu_for_phase": 83.0},
            "contrast": {"aorta_hu": 190.0, "contrast_enhanced": True, "phase": "portal_venous",
                         "phase_confident": True, "phase_candidates": ["portal_venous"]},
            "muscle": {}}
    rows = [{"level": "L1", "complete": True, "genant_grade": 2, "height_loss": 0.3, "trabecular_hu_mean": 95.0}]
    old, new = model.apply(exam_features(exam, rows, version=1)), model.apply(exam_features(exam, rows))
    assert old == new and 0.0 < new["probability"] < 1.0
    assert new["provenance"]["feature_version"] == 1


def test_feature_versions_of_model_files(model_dict, tmp_path):
    from VertebralFractureScreenLib.model.features import FEATURE_NAMES_BY_VERSION

    assert model_dict["feature_version"] == FEATURE_VERSION == 2
    path = tmp_path / "model.json"
    for version, accepted in ((1, True), (2, True), (0, False), (True, False), ("2", False)):
        data = json.loads(json.dumps(model_dict))
        data["feature_version"] = version
        path.write_text(json.dumps(data))
        if accepted:
            assert fm.load_model(path).feature_version == version
        else:
            with pytest.raises(InputError, match="trained on features of version"):
                fm.load_model(path)
    data = json.loads(json.dumps(model_dict))
    data.update(feature_version=1)
    data["features"][0] = "phase_arterial"  # a feature of version 2 in a model of version 1
    assert "phase_arterial" not in FEATURE_NAMES_BY_VERSION[1]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="does not compute: phase_arterial"):
        fm.load_model(path)


def test_a_version_1_features_table_still_trains(tmp_path):
    from VertebralFractureScreenLib.model.features import FEATURE_NAMES_BY_VERSION

    rows = [{key: value for key, value in row.items() if key not in FEATURE_NAMES or key in FEATURE_NAMES_BY_VERSION[1]}
            for row in synthetic_cohort(40)]
    for row in rows:
        row["features_version"] = 1
    table = fm.read_feature_table(write_table(rows, tmp_path / "v1.csv"), "fracture")
    assert set(table.columns) - {"age", "sex"} <= set(FEATURE_NAMES_BY_VERSION[1])
    rows[0]["features_version"] = 2  # one file, one version
    with pytest.raises(InputError, match="holds features of version 1, 2"):
        fm.read_feature_table(write_table(rows, tmp_path / "mixed.csv"), "fracture")
