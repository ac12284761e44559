"""Golden tests of the evaluator's metrics against scikit-learn and a direct ECE computation."""
import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from core.config import get_cfg_default
from core.evaluation import METRICS, build_evaluator, expected_calibration_error

N_CLASSES = 5
ABSENT = 3  # a class with no test image


def evaluate(logits, labels, batch=37):
    cfg = get_cfg_default()
    ev = build_evaluator(cfg, lab2cname={i: f"class{i}" for i in range(logits.shape[1])})
    for start in range(0, len(labels), batch):
        ev.process(torch.as_tensor(logits[start:start + batch]), torch.as_tensor(labels[start:start + batch]))
    return ev.evaluate()


def random_predictions(seed, n=300):
    rng = np.random.default_rng(seed)
    present = [c for c in range(N_CLASSES) if c != ABSENT]
    y = rng.choice(present, n)
    logits = rng.normal(0, 2, (n, N_CLASSES))
    # Informative but imperfect: the true class gets a random boost, and the absent class is
    # sometimes predicted.
    logits[np.arange(n), y] += rng.uniform(0, 4, n)
    logits[:, ABSENT] += rng.uniform(-1, 2.5, n)
    return logits.astype(np.float32), y


def softmax(logits):
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_ece(probs, y, n_bins=15):
    """ECE written out with explicit bin edges (lower open, upper closed)."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs((pred[mask] == y[mask]).mean() - conf[mask].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn_with_a_class_without_images(seed):
    logits, y = random_predictions(seed)
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    assert (pred == ABSENT).any(), "the test needs predictions into the class without images"
    res = evaluate(logits, y)
    present = np.unique(y)
    # float64 probabilities from float32 logits: agreement to a few ulps of values near 100.
    tol = 1e-9 * 100
    assert res["accuracy"] == pytest.approx(100 * np.mean(pred == y), abs=tol)
    assert res["macro_f1"] == pytest.approx(100 * f1_score(y, pred, labels=present, average="macro"), abs=tol)
    assert res["kappa"] == pytest.approx(100 * cohen_kappa_score(y, pred), abs=tol)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present]
    assert res["auc"] == pytest.approx(100 * np.mean(aucs), abs=tol)
    specs = []
    for c in present:
        tn, fp, _, _ = confusion_matrix(y == c, pred == c, labels=[False, True]).ravel()
        specs.append(tn / (tn + fp))
    assert res["specificity"] == pytest.approx(100 * np.mean(specs), abs=tol)
    assert res["ece"] == pytest.approx(100 * reference_ece(probs, y), abs=tol)
    assert res["confusion_matrix"] == confusion_matrix(y, pred, labels=range(N_CLASSES)).tolist()
    for c in present:
        row = res["per_class"][f"class{c}"]
        assert row["support"] == int((y == c).sum())
        assert row["f1"] == pytest.approx(100 * f1_score(y == c, pred == c), abs=tol)
        assert row["auc"] == pytest.approx(100 * roc_auc_score(y == c, probs[:, c]), abs=tol)
    absent = res["per_class"][f"class{ABSENT}"]
    assert absent["support"] == 0 and absent["f1"] is None and absent["auc"] is None
    assert res["classes_without_images"] == [f"class{ABSENT}"]
    # The macro averages leave the absent class out, so they differ from scikit-learn's default labels.
    assert res["macro_f1"] != pytest.approx(100 * f1_score(y, pred, average="macro"), abs=1e-3)
    assert set(METRICS) <= set(res)


def test_auc_ties_and_perfect_separation():
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.array([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]], dtype=np.float32)
    res = evaluate(logits, y)
    assert res["auc"] == pytest.approx(100.0) and res["accuracy"] == 100.0 and res["kappa"] == pytest.approx(100.0)
    # Identical scores for every image: an AUC of one half, as scikit-learn gives.
    flat = np.zeros((6, 3), dtype=np.float32)
    res = evaluate(flat, y)
    assert res["auc"] == pytest.approx(100 * roc_auc_score(y == 0, np.zeros(6)))


def test_one_class_has_no_auc():
    res = evaluate(np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32), np.zeros(10, dtype=np.int64))
    assert res["auc"] is None and res["per_class"]["class0"]["specificity"] is None


def test_ece_of_a_calibrated_and_an_overconfident_model():
    conf = np.full(1000, 0.8)
    assert expected_calibration_error(conf, np.arange(1000) % 5 != 0) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(conf, np.zeros(1000, dtype=bool)) == pytest.approx(0.8)


def test_tables_in_the_chosen_metric(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import PROJECT_DIR
    from test_sweeps import aggregate, write_result

    root = str(tmp_path)
    for seed, (b, n) in enumerate([(80, 40), (60, 60)], start=1):
        write_result(root, "A", "MedPromptCLIP", seed, "base", b)
        write_result(root, "A", "MedPromptCLIP", seed, "new", n)
    # write_result stores macro_f1 = accuracy / 2.
    data = aggregate.report("base2new", root, quiet=True, metric="macro_f1")
    row = data["per_dataset"][0]
    assert (row["base"], row["new"]) == (35, 25) and data["metric"] == "macro_f1"
    assert row["hm"] == pytest.approx((2 * 40 * 20 / 60 + 30) / 2)
    script = os.path.join(PROJECT_DIR, "scripts", "aggregate.py")
    proc = subprocess.run([sys.executable, script, "base2new", root, "--metric", "macro_f1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "macro-F1 %" in proc.stdout and "35.0 ± 7.1" in proc.stdout
    proc = subprocess.run([sys.executable, script, "base2new", root, "--metric", "f1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "macro_f1" in proc.stderr
    # A metric the runs do not hold (older results.json) leaves the rows empty rather than showing accuracy.
    data = aggregate.report("base2new", root, quiet=True, metric="kappa")
    assert data["per_dataset"] == []


def test_aggregator_and_evaluator_offer_the_same_metrics():
    from test_sweeps import aggregate

    assert aggregate.METRICS == METRICS
