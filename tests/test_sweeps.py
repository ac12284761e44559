"""Sweep scripts and the results aggregator."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_DIR, SUBPROCESS_ENV

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
import aggregate  # noqa: E402
import sweep  # noqa: E402,F401
from trainers.recipes import recipe_file  # noqa: E402


def write_result(root, dataset, method, seed, subsample, accuracy, trainer=None, shots=-1, folder=None, kind=None):
    path = os.path.join(root, dataset, method, folder or f"seed{seed}", subsample)
    os.makedirs(path, exist_ok=True)
    trainer = trainer or method.split(" ")[0].split("+")[0]
    kind = kind or {"ZeroShotCLIP": "zero-shot", "MedPromptCLIP": "text-only"}.get(trainer, "image-trained")
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"trainer": trainer, "method": method, "kind": kind, "dataset": dataset,
                   "subsample": subsample, "seed": seed, "num_shots": shots, "accuracy": accuracy,
                   "macro_f1": accuracy / 2, "identity": {"seed": seed, "folder": path}, "finished": "now",
                   "backbone": "tiny-clip", "epochs": 2, "split": "test", "num_samples": 10}, f)
    return path


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
        if seed == 1:
            write_result(root, "A", "ZeroShotCLIP (template)", seed, "all", 30, folder=f"shots0/seed{seed}")
        write_result(root, "A", "MedPromptCLIP", seed, "all", 45, folder=f"shots0/seed{seed}")
        for shots in (1, 4):
            write_result(root, "A", "CoOp", seed, "all", 40 + shots, shots=shots, folder=f"shots{shots}/seed{seed}")
            write_result(root, "A", "CoOp+MedPromptCLIP", seed, "all", 50 + shots, trainer="CoOp", shots=shots,
                         folder=f"shots{shots}/seed{seed}")
    data = aggregate.report("fewshot", root, quiet=True)
    rows = {(r["dataset"], r["method"], r["shots"]): r["accuracy"] for r in data["rows"]}
    assert rows[("A", "CoOp", 4)] == 44 and rows[("A", "CoOp+MedPromptCLIP", 1)] == 51
    assert rows[("A", "ZeroShotCLIP (template)", 0)] == 30
    assert data["problems"] == []
    table = (tmp_path / "summary.md").read_text()
    # One dataset: no average section; a zero-shot reference has one seed and is not marked incomplete.
    assert "average" not in table and "1/2" not in table and "backbone tiny-clip, seeds 1 2" in table
    png = tmp_path / "fewshot.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_incomplete_seeds_are_marked_and_broken_runs_fail(tmp_path):
    root = str(tmp_path)
    for seed in (1, 2):
        # The label comes from results.json, whatever the folder is called.
        write_result(root, "A", "CoOp", seed, "base", 80, folder=f"anything/seed{seed}")
        write_result(root, "A", "CoOp", seed, "new", 60, folder=f"anything/seed{seed}")
    write_result(root, "B", "CoOp", 1, "base", 70)
    write_result(root, "B", "CoOp", 1, "new", 50)
    cut = write_result(root, "B", "CoOp", 2, "base", 70)
    with open(os.path.join(cut, "results.json"), "r+") as f:
        f.truncate(40)
    proc = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "aggregate.py"), "base2new", root],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "1 of the runs asked for are missing or broken" in proc.stderr and cut in proc.stderr
    b_table = proc.stdout.split("B: base-to-new", 1)[1].split("Average", 1)[0]
    assert "CoOp" in b_table and "1/2" in b_table
    a_table = proc.stdout.split("A: base-to-new", 1)[1].split("B: base-to-new", 1)[0]
    assert "/2" not in a_table and "anything" not in proc.stdout


def test_manifest_rejects_runs_with_other_settings(tmp_path):
    from train import identity_hash

    root = str(tmp_path)
    runs = []
    for subsample in ("base", "new"):
        path = write_result(root, "A", "MedPromptCLIP", 1, subsample, 50)
        runs.append({"path": os.path.relpath(path, root), "identity": identity_hash({"seed": 1, "folder": path})})
    runs[1]["identity"] = identity_hash({"seed": 1, "folder": "elsewhere"})
    manifest = {"protocol": "base2new", "seeds": [1], "runs": runs}
    data = aggregate.report("base2new", root, quiet=True, manifest=manifest)
    assert len(data["problems"]) == 1 and "other settings" in data["problems"][0]
    assert data["per_dataset"][0]["seeds"] == 0 and data["per_dataset"][0]["new"] is None


@pytest.mark.parametrize("name", sorted(__import__("core.engine").engine.TRAINER_REGISTRY.registered_names()))
def test_every_trainer_declares_what_sweeps_read(name):
    from core.engine import TRAINER_REGISTRY
    from trainers.recipes import PROTOCOLS, recipe_file

    cls = TRAINER_REGISTRY.get(name)
    assert cls.KIND in aggregate.KINDS
    assert set(cls.RECIPES) <= set(PROTOCOLS) and set(cls.RECIPES_BY_SHOTS) <= set(cls.RECIPES)
    assert set(cls.DEFAULT_IN) <= set(cls.RECIPES)
    assert ("stacked" in cls.RECIPES) <= (cls.PROMPT_SHAPE_KEYS is not None)
    # Declarations name the trainer's own config node (a subclass re-declares them).
    assert cls.PROMPT_SHAPE_KEYS is None or cls.PROMPT_SHAPE_KEYS[0] == cls.cfg_key
    # Every recipe it declares is a file, on real data and on the demo.
    for protocol in cls.RECIPES:
        for shots in (None, *cls.RECIPES_BY_SHOTS.get(protocol, {})):
            for dataset in ("ODIR", "demo"):
                assert os.path.isfile(recipe_file(name, protocol, dataset, shots)), (protocol, dataset, shots)


def test_backbones_load_once_and_each_run_gets_its_own_copy(monkeypatch):
    import torch

    from clipkit import backbones as _backbones

    built = []
    real = _backbones._build_backbone
    monkeypatch.setattr(_backbones, "_build_backbone", lambda *a: built.append(a) or real(*a))
    with _backbones.keep_loaded_backbones():
        first = _backbones.load_backbone("tiny-clip")
        first.model.half()  # what PREC fp16 does to the model it was given
        second = _backbones.load_backbone("tiny-clip")
    third = _backbones.load_backbone("tiny-clip")
    assert len(built) == 2  # once inside the block, once after it
    assert second.model is not first.model and next(second.model.parameters()).dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(second.model.state_dict().values(), third.model.state_dict().values()))


def test_run_lock_waits_for_a_live_owner_and_takes_a_stale_one(tmp_path):
    import socket
    import threading

    import _launch

    folder = str(tmp_path / "run")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(folder)
        with open(os.path.join(folder, _launch.LOCK_FILE), "w") as f:
            json.dump({"pid": owner.pid, "host": socket.gethostname()}, f)
        lock = _launch.RunLock(folder)
        assert lock.try_acquire() == {"pid": owner.pid, "host": socket.gethostname()}
        threading.Timer(1.0, lambda: (owner.kill(), owner.wait())).start()  # dies, and is reaped
        deadline = time.time() + 30
        while lock.try_acquire() is not True:
            assert time.time() < deadline
            time.sleep(0.2)
        assert json.load(open(lock.path))["pid"] == os.getpid()
        assert _launch.RunLock(folder).try_acquire()["pid"] == os.getpid()  # a second taker waits
        lock.release()
        assert not os.path.exists(lock.path)
    finally:
        owner.kill()
        owner.wait()


def run_sweep(protocol, target, env, *extra):
    return subprocess.run(["bash", os.path.join(PROJECT_DIR, "scripts", f"{protocol}.sh"), target, *extra],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(SUBPROCESS_ENV, PYTHON=sys.executable, **env))


def test_missing_data_stops_before_training(tmp_path):
    start = time.time()
    proc = run_sweep("base2new", "fundus", {"DATA": str(tmp_path / "none"), "OUTPUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and time.time() - start < 60
    assert "ODIR_3x200: 3 classes" in proc.stdout  # listed as skipped, with the reason
    for name in ("ODIR", "f1000images"):
        assert f"dataset {name}:" in proc.stderr
    assert "pmc-clip" in proc.stderr
    assert not (tmp_path / "out").exists()


def table_of(stdout):
    return stdout.split("demo: base-to-new", 1)[1]


def test_base2new_sweep_reuses_only_matching_complete_runs(tmp_path, demo_root):
    env = {"DATA": demo_root, "OUTPUT": str(tmp_path), "BACKBONE": "tiny-clip", "SEEDS": "1 2",
           "METHODS": "MedPromptCLIP CoOp ZeroShotCLIP", "OPTS": "OPTIM.MAX_EPOCH 1 DEVICE cpu"}
    first = run_sweep("base2new", "demo", env)
    assert first.returncode == 0, first.stderr
    table = table_of(first.stdout)
    assert table.startswith(", backbone tiny-clip, seeds 1 2, test split (base ")
    for method in ("ZeroShotCLIP (template)", "ZeroShotCLIP (descriptions)", "MedPromptCLIP", "CoOp"):
        assert f"\n{method} " in table
    assert "Average over datasets" in table
    runs = tmp_path / "base2new" / "tiny-clip" / "demo"
    # Zero-shot evaluation has no randomness: one seed (template and descriptions); the others two seeds,
    # base and new.
    assert len(list(runs.rglob("results.json"))) == 12
    assert first.stdout.count("start  ") == 12 and "12/12" in first.stderr  # a line per run, a bar over runs
    tag = sweep.opts_tag(["OPTIM.MAX_EPOCH", "1"])
    recipe = os.path.splitext(os.path.basename(recipe_file("CoOp", "base2new", "demo")))[0]
    coop_base = runs / "shots_16" / "CoOp" / f"{recipe}-{tag}" / "seed1" / "base"
    assert f"start  CoOp demo seed 1 train base  (log: {coop_base / 'log.txt'})" in first.stdout
    coop = json.loads((coop_base / "results.json").read_text())
    assert coop["num_shots"] == 16 and coop["subsample"] == "base" and coop["method"] == "CoOp"
    assert coop["identity"]["config"]["OPTIM"]["MAX_EPOCH"] == 1

    second = run_sweep("base2new", "demo", env)
    assert second.returncode == 0 and second.stdout.count("reused ") == 12 and "start  " not in second.stdout
    assert table_of(second.stdout) == table

    # A results.json cut short is redone (its evaluation on new classes loads the same prompts: reused).
    text = (coop_base / "results.json").read_text()
    (coop_base / "results.json").write_text(text[: len(text) // 2])
    third = run_sweep("base2new", "demo", dict(env, METHODS="CoOp", SEEDS="1"))
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("start  ") == 1 and "rerun  CoOp demo seed 1 train base: results.json is not valid" in third.stdout
    assert third.stdout.count("reused ") == 1
    assert json.loads((coop_base / "results.json").read_text())["identity"] == coop["identity"]

    # Other settings never reuse these runs: they get folders of their own.
    fourth = run_sweep("base2new", "demo", dict(env, METHODS="MedPromptCLIP", SEEDS="1",
                                                 OPTS="OPTIM.MAX_EPOCH 1 TRAINER.MEDPROMPTCLIP.N_CTX 2"))
    assert fourth.returncode == 0, fourth.stderr
    assert fourth.stdout.count("start  ") == 2 and "reused" not in fourth.stdout
    assert len(list((runs / "shots_0" / "MedPromptCLIP").iterdir())) == 2


def test_two_sweeps_at_once_run_each_run_once(tmp_path, demo_root):
    env = dict(SUBPROCESS_ENV, DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip",
               SEEDS="1", METHODS="MedPromptCLIP", OPTS="OPTIM.MAX_EPOCH 2")
    command = ["bash", os.path.join(PROJECT_DIR, "scripts", "base2new.sh"), "demo"]
    procs = [subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = outs[0][0] + outs[1][0]
    assert stdout.count("start  ") == 2 and stdout.count("reused ") == 2
    logs = list((tmp_path / "base2new").rglob("log.txt"))
    assert len(logs) == 2
    for log in logs:
        assert log.read_text().count("command: ") == 1  # one process wrote it
    assert table_of(outs[0][0]) == table_of(outs[1][0])


def test_parallel_and_submitit_launchers_give_the_same_table(tmp_path, demo_root):
    env = {"DATA": demo_root, "BACKBONE": "tiny-clip", "SEEDS": "1", "METHODS": "ZeroShotCLIP MedPromptCLIP",
           "OPTS": "OPTIM.MAX_EPOCH 1"}
    pool = run_sweep("base2new", "demo", dict(env, OUTPUT=str(tmp_path / "pool"), LAUNCHER="local:2"))
    assert pool.returncode == 0, pool.stderr
    # submitit's local executor runs the jobs as local processes, as SLURM would on nodes.
    slurm = run_sweep("base2new", "demo", dict(env, OUTPUT=str(tmp_path / "slurm"), LAUNCHER="slurm",
                                               SUBMITIT_CLUSTER="local"))
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.count("queued ") == 6 and slurm.stdout.count("done   ") == 6
    assert table_of(pool.stdout).replace(str(tmp_path / "pool"), "") == table_of(slurm.stdout).replace(
        str(tmp_path / "slurm"), "")
    status = run_sweep("base2new", "demo", dict(env, OUTPUT=str(tmp_path / "slurm"), SEEDS="1 2"), "--status")
    assert status.returncode == 0, status.stderr
    assert "8 runs: 6 done, 0 running, 0 failed, 2 pending" in status.stdout
    assert "pending  MedPromptCLIP demo seed 2 train base" in status.stdout


def test_ctrl_c_stops_a_sweep_with_one_line(tmp_path, demo_root):
    env = dict(SUBPROCESS_ENV, DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip",
               SEEDS="1", METHODS="CoOp", OPTS="OPTIM.MAX_EPOCH 200")
    proc = subprocess.Popen(["bash", os.path.join(PROJECT_DIR, "scripts", "base2new.sh"), "demo"], cwd=PROJECT_DIR,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("start  "):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted; rerun to resume" and "Traceback" not in err
    assert not list(tmp_path.rglob("run.lock")) and not list(tmp_path.rglob("results.json"))


def test_a_failing_run_is_reported_and_shown_by_status(tmp_path, demo_root):
    env = {"DATA": demo_root, "OUTPUT": str(tmp_path), "BACKBONE": "tiny-clip", "SEEDS": "1", "METHODS": "ZeroShotCLIP",
           "OPTS": "TRAINER.ZEROSHOTCLIP.PROMPT bogus"}
    proc = run_sweep("base2new", "demo", env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for mode in ("template", "descriptions"):  # base-to-new ZeroShotCLIP rows
        assert f"FAILED ZeroShotCLIP {mode} demo seed 1 base: TRAINER.ZEROSHOTCLIP.PROMPT must be one of" in proc.stdout
        assert (f"FAILED ZeroShotCLIP {mode} demo seed 1 new: not run: ZeroShotCLIP {mode} demo seed 1 base failed"
                in proc.stdout)
    status = run_sweep("base2new", "demo", env, "--status")
    assert "4 runs: 0 done, 0 running, 2 failed, 2 pending" in status.stdout


def test_unknown_target_and_method(tmp_path):
    proc = run_sweep("zeroshot", "retina", {"OUTPUT": str(tmp_path)})
    assert proc.returncode == 2 and "unknown dataset or group 'retina'" in proc.stderr
    proc = run_sweep("base2new", "demo", {"OUTPUT": str(tmp_path), "METHODS": "CoOpp"})
    assert proc.returncode == 2 and "unknown method(s) in METHODS: CoOpp" in proc.stderr


def test_scripts_run_where_only_python3_exists(tmp_path):
    """Without $PYTHON the scripts find python3 (many systems have no 'python' command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A wrapper, not a symlink: a virtual environment's interpreter finds its packages only when started
    # from its own folder.
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "PYTHON"}
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
    (stacked_dir,) = runs.glob("shots_1/IVLP+MedPromptCLIP/*/seed1")
    stacked = json.loads((stacked_dir / "results.json").read_text())
    (source,) = runs.glob("shots_0/MedPromptCLIP-source/*/seed1")
    assert stacked["init_from"]["checkpoint"].startswith(str(source))
    assert stacked["config"]["TRAINER"]["IVLP"]["N_CTX_TEXT"] == 4
    assert json.loads((source / "results.json").read_text())["config"]["TRAINER"]["MEDPROMPTCLIP"]["N_CTX"] == 4
    assert "IVLP+MedPromptCLIP" in proc.stdout and "MedPromptCLIP-source" not in proc.stdout.split("accuracy %", 1)[1]


def test_aggregate_options_and_any_metric_of_results_json(tmp_path):
    helped = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "aggregate.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for option in ("--target", "--dataset", "--metric", *aggregate.METRICS):
        assert option in helped.stdout
    root = str(tmp_path / "A-sweep")
    for subsample, acc in (("base", 80), ("new", 40)):
        write_result(root, "A", "CoOp", 1, subsample, acc)  # macro_f1 is half the accuracy
    data = aggregate.report("base2new", root, quiet=True, metric="macro_f1")
    row = data["per_dataset"][0]
    assert (row["base"], row["new"]) == (40, 20) and row["hm"] == pytest.approx(2 * 40 * 20 / 60)
    assert "macro-F1 %" in (tmp_path / "A-sweep" / "summary.md").read_text()
    proc = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "aggregate.py"), "base2new", root,
                           "--metric", "macro_f1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "26.7" in proc.stdout  # HM of 40 and 20
    bad = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "aggregate.py"), "base2new", root,
                          "--target", "B"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no target 'B'" in bad.stderr
