"""Sweep scripts and the results aggregator."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_DIR

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
import aggregate  # noqa: E402


def write_result(root, dataset, method, seed, subsample, accuracy, trainer=None, shots=-1, folder=None):
    path = os.path.join(root, dataset, method, folder or f"seed{seed}", subsample)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"trainer": trainer or method, "dataset": dataset, "subsample": subsample, "seed": seed,
                   "num_shots": shots, "accuracy": accuracy, "macro_f1": accuracy / 2}, f)


def test_base2new_summary_means_stds_and_both_harmonic_means(tmp_path):
    root = str(tmp_path)
    for seed, (b, n) in enumerate([(80, 40), (60, 60)], start=1):
        write_result(root, "A", "MedPromptCLIP", seed, "base", b)
        write_result(root, "A", "MedPromptCLIP", seed, "new", n)
    write_result(root, "B", "MedPromptCLIP", 1, "base", 90)
    write_result(root, "B", "MedPromptCLIP", 1, "new", 30)
    data = aggregate.report("base2new", root, quiet=True)
    a = next(r for r in data["per_dataset"] if r["dataset"] == "A")
    assert a["base"] == 70 and a["new"] == 50
    assert a["base_std"] == pytest.approx(14.142, abs=1e-3)
    assert a["hm"] == pytest.approx((2 * 80 * 40 / 120 + 60) / 2)
    avg = data["average"][0]
    assert avg["base"] == 80 and avg["new"] == 40
    assert avg["hm_of_averages"] == pytest.approx(2 * 80 * 40 / 120)
    assert avg["mean_of_hms"] == pytest.approx((a["hm"] + 2 * 90 * 30 / 120) / 2)
    for name in ("summary.csv", "summary.json", "summary.md"):
        assert (tmp_path / name).is_file()
    assert "| MedPromptCLIP |" in (tmp_path / "summary.md").read_text()


def test_fewshot_table_and_plot(tmp_path):
    root = str(tmp_path)
    for seed in (1, 2):
        write_result(root, "A", "ZeroShotCLIP", seed, "all", 30, folder="shots0")
        write_result(root, "A", "MedPromptCLIP", seed, "all", 45, folder="shots0")
        for shots in (1, 4):
            write_result(root, "A", "CoOp", seed, "all", 40 + shots, shots=shots, folder=f"shots{shots}")
            write_result(root, "A", "CoOp+MedPromptCLIP", seed, "all", 50 + shots, trainer="CoOp", shots=shots,
                         folder=f"shots{shots}")
    data = aggregate.report("fewshot", root, quiet=True)
    rows = {(r["dataset"], r["method"], r["shots"]): r["accuracy"] for r in data["rows"]}
    assert rows[("A", "CoOp", 4)] == 44 and rows[("A", "CoOp+MedPromptCLIP", 1)] == 51
    assert rows[("A", "ZeroShotCLIP", 0)] == 30 and rows[("average", "CoOp", 1)] == 41
    png = tmp_path / "fewshot.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_sweep(protocol, target, env, *extra):
    return subprocess.run(["bash", os.path.join(PROJECT_DIR, "scripts", f"{protocol}.sh"), target, *extra],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, **env))


def test_missing_data_stops_before_training(tmp_path):
    start = time.time()
    proc = run_sweep("base2new", "fundus", {"DATA": str(tmp_path / "none"), "OUTPUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and time.time() - start < 60
    assert "ODIR_3x200: 3 classes" in proc.stdout  # listed as skipped, with the reason
    for name in ("ODIR", "f1000images"):
        assert f"dataset {name}:" in proc.stderr
    assert "pmc-clip" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_base2new_sweep_runs_then_skips(tmp_path, demo_root):
    env = {"DATA": demo_root, "OUTPUT": str(tmp_path), "BACKBONE": "tiny-clip", "SEEDS": "1 2",
           "METHODS": "MedPromptCLIP CoOp ZeroShotCLIP", "OPTS": "OPTIM.MAX_EPOCH 1 DEVICE cpu"}
    first = run_sweep("base2new", "demo", env)
    assert first.returncode == 0, first.stderr
    table = first.stdout.split("demo (accuracy %", 1)[1]
    for method in ("MedPromptCLIP", "CoOp", "ZeroShotCLIP"):
        assert method in table
    assert "Average over datasets" in table
    runs = tmp_path / "base2new" / "tiny-clip" / "demo"
    assert len(list(runs.rglob("results.json"))) == 12
    coop = json.loads((runs / "CoOp" / "seed1" / "base" / "results.json").read_text())
    assert coop["num_shots"] == 16 and coop["subsample"] == "base"
    second = run_sweep("base2new", "demo", env)
    assert second.returncode == 0 and second.stdout.count("done before, skipped") == 12
    assert second.stdout.split("demo (accuracy %", 1)[1] == table


def test_unknown_target_and_method(tmp_path):
    proc = run_sweep("zeroshot", "retina", {"OUTPUT": str(tmp_path)})
    assert proc.returncode == 2 and "unknown dataset or group 'retina'" in proc.stderr
    proc = run_sweep("base2new", "demo", {"OUTPUT": str(tmp_path), "METHODS": "CoOpp"})
    assert proc.returncode == 2 and "unknown method(s) in METHODS: CoOpp" in proc.stderr


def test_scripts_run_where_only_python3_exists(tmp_path):
    """Without $PYTHON the scripts find python3 (many systems have no 'python' command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HF_HUB_OFFLINE="1", OUTPUT=str(tmp_path / "out"))
    for protocol in ("base2new", "fewshot", "crossmodal", "zeroshot"):
        proc = subprocess.run(["bash", os.path.join(PROJECT_DIR, "scripts", f"{protocol}.sh"), "nosuchdataset"],
                              cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2 and "unknown dataset or group 'nosuchdataset'" in proc.stderr, proc.stderr


def test_fewshot_sweep_stacks_the_papers_ivlp_setting_on_a_reshaped_source(tmp_path, demo_root):
    env = {"DATA": demo_root, "OUTPUT": str(tmp_path), "BACKBONE": "tiny-clip", "SEEDS": "1", "SHOTS": "1",
           "OPTS": "OPTIM.MAX_EPOCH 1"}
    proc = run_sweep("fewshot", "demo", env)
    assert proc.returncode == 0, proc.stderr
    runs = tmp_path / "fewshot" / "tiny-clip" / "demo"
    stacked = json.loads((runs / "IVLP+MedPromptCLIP" / "shots1" / "seed1" / "results.json").read_text())
    source = runs / "MedPromptCLIP-source" / "seed1"
    assert stacked["init_from"]["checkpoint"].startswith(str(source))
    assert stacked["config"]["TRAINER"]["IVLP"]["N_CTX_TEXT"] == 4
    assert json.loads((source / "results.json").read_text())["config"]["TRAINER"]["MEDPROMPTCLIP"]["N_CTX"] == 4
    assert "IVLP+MedPromptCLIP" in proc.stdout and "MedPromptCLIP-source" not in proc.stdout.split("accuracy %", 1)[1]
