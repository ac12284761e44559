"""A run's identity is what it reads: content digests of its inputs and its trainer's settings, no paths."""
import json
import os
import shutil
import subprocess
import sys

from conftest import DEMO_CFG, PROJECT_DIR, read_results, recipe, run_train

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))


def identity_of(*argv):
    import train

    args = train.build_parser().parse_args([str(a) for a in argv])
    return train.identity_hash(train.run_identity(train.setup_cfg(args), args))


def copy_demo(demo_root, where):
    shutil.copytree(os.path.join(demo_root, "demo"), os.path.join(where, "demo"))
    return str(where)


def rotate_descriptions(path):
    """Give every class the descriptions of the next class: same keys, same texts, other content per class."""
    data = json.load(open(path))
    keys = list(data)
    values = [data[k] for k in keys]
    json.dump(dict(zip(keys, values[1:] + values[:1])), open(path, "w"), indent=1)


def sweep(env):
    return subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "base2new", "demo"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", BACKBONE="tiny-clip", SEEDS="1", **env))


def started(proc):
    return sorted(line.split("  (log")[0][len("start  "):] for line in proc.stdout.splitlines()
                  if line.startswith("start  "))


def new_accuracy(output, method):
    (path,) = (p for p in (os.path.join(d, "results.json") for d, _, files in os.walk(output) if "results.json" in files)
               if f"{os.sep}{method}{os.sep}" in p and p.endswith(f"{os.sep}new{os.sep}results.json"))
    return json.load(open(path))["accuracy"]


def test_sweep_reruns_what_changed_content_and_nothing_for_moved_data(tmp_path, demo_root):
    data = copy_demo(demo_root, tmp_path / "data")
    descriptions = tmp_path / "descriptions"
    descriptions.mkdir()
    shutil.copy(os.path.join(PROJECT_DIR, "llm_descriptions", "demo.json"), descriptions / "demo.json")
    env = {"DATA": data, "OUTPUT": str(tmp_path / "out"), "METHODS": "MedPromptCLIP CoOp",
           "OPTS": f"OPTIM.MAX_EPOCH 1 DATASET.DESCRIPTIONS_DIR {descriptions}"}
    first = sweep(env)
    assert first.returncode == 0, first.stderr
    assert len(started(first)) == 4

    # Other descriptions: MedPromptCLIP trains (and evaluates) again; CoOp, which never reads them, does not.
    rotate_descriptions(descriptions / "demo.json")
    second = sweep(env)
    assert second.returncode == 0, second.stderr
    assert started(second) == ["MedPromptCLIP demo seed 1 test new", "MedPromptCLIP demo seed 1 train base"]
    assert second.stdout.count("reused CoOp") == 2
    fresh = sweep(dict(env, OUTPUT=str(tmp_path / "fresh"), METHODS="MedPromptCLIP"))
    assert fresh.returncode == 0, fresh.stderr
    assert new_accuracy(env["OUTPUT"], "MedPromptCLIP") == new_accuracy(str(tmp_path / "fresh"), "MedPromptCLIP")

    # The data folder moved (the output root too): nothing runs again.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(data, moved / "data")
    shutil.move(env["OUTPUT"], moved / "out")
    env.update(DATA=str(moved / "data"), OUTPUT=str(moved / "out"))
    third = sweep(env)
    assert third.returncode == 0, third.stderr
    assert started(third) == [] and third.stdout.count("reused ") == 4
    assert os.path.isfile(moved / "out" / ".input_digests.json")

    # Another split file under the same name: every run of the dataset runs again.
    split_path = moved / "data" / "demo" / "data_split.json"
    split = json.load(open(split_path))
    split["test"] = split["test"][1:]
    json.dump(split, open(split_path, "w"))
    fourth = sweep(dict(env, METHODS="CoOp"))
    assert fourth.returncode == 0, fourth.stderr
    assert started(fourth) == ["CoOp demo seed 1 test new", "CoOp demo seed 1 train base"]


def zs(root, out, mode, *extra):
    return ["--root", root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("ZeroShotCLIP", mode), "--output-dir", out, "--eval-only", *extra]


def test_identity_holds_digests_of_what_the_trainer_reads(tmp_path, demo_root):
    descriptions = tmp_path / "d"
    descriptions.mkdir()
    shutil.copy(os.path.join(PROJECT_DIR, "llm_descriptions", "demo.json"), descriptions / "demo.json")
    opts = ["DATASET.DESCRIPTIONS_DIR", str(descriptions)]
    before = {mode: identity_of(*zs(demo_root, tmp_path / "o", mode, *opts)) for mode in ("template", "descriptions")}
    rotate_descriptions(descriptions / "demo.json")
    after = {mode: identity_of(*zs(demo_root, tmp_path / "o", mode, *opts)) for mode in ("template", "descriptions")}
    assert after["template"] == before["template"] and after["descriptions"] != before["descriptions"]

    # Another trainer's settings are not this trainer's identity; its own are.
    base = zs(demo_root, tmp_path / "o", "template")
    assert identity_of(*base, "TRAINER.COOP.N_CTX", "3") == identity_of(*base)
    assert identity_of(*base, "TRAINER.ZEROSHOTCLIP.TEMPLATES", "['a {}.']") != identity_of(*base)

    # A weights file: its content counts, not where it lies or what it is called.
    weights = os.path.join(PROJECT_DIR, "configs", "backbones", "demo-clip")
    (name,) = [n for n in os.listdir(weights) if n.endswith((".safetensors", ".pt", ".bin"))]
    here = tmp_path / "w1" / name
    here.parent.mkdir()
    shutil.copy(os.path.join(weights, name), here)
    there = tmp_path / "w2" / "other" / ("renamed" + os.path.splitext(name)[1])
    there.parent.mkdir(parents=True)
    shutil.copy(here, there)
    args = [*base, "MODEL.BACKBONE.NAME", "demo-clip", "MODEL.BACKBONE.PRETRAINED"]
    assert identity_of(*args, here) == identity_of(*args, there)
    with open(there, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert identity_of(*args, here) != identity_of(*args, there)

    # No absolute path anywhere in it.
    import train

    parsed = train.build_parser().parse_args([str(a) for a in ["--model-dir", tmp_path / "m", *args, here]])
    text = json.dumps(train.run_identity(train.setup_cfg(parsed), parsed))
    assert str(tmp_path) not in text and demo_root not in text and PROJECT_DIR not in text


def test_digests_are_kept_by_path_size_and_mtime(tmp_path, monkeypatch):
    from core import digests

    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1000)
    store = str(tmp_path / "out" / ".input_digests.json")
    digests.use_store(store)
    first = digests.file_sha256(str(path))
    digests.save_store()
    monkeypatch.setattr(digests, "_DIGESTS", {})
    digests.use_store(store)  # another process: read from the store, the file is not read again
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read again")))
    assert digests.file_sha256(str(path)) == first
    monkeypatch.undo()
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(1, 1))
    assert digests.file_sha256(str(path)) != first


def test_rerun_with_other_settings_moves_the_old_run_aside(tmp_path, demo_root, capsys):
    out = tmp_path / "run"

    def medprompt(*extra):
        return ["--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
                "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", out, "--seed", "1",
                "MODEL.BACKBONE.NAME", "tiny-clip", "OPTIM.MAX_EPOCH", "1", "TEST.SPLIT", "val", *extra]

    assert run_train(*medprompt("TRAINER.MEDPROMPTCLIP.LOSS", "l1"), capsys=capsys)[0] == 0
    l1 = read_results(out)
    code, _ = run_train(*medprompt("TRAINER.MEDPROMPTCLIP.LOSS", "mse"), capsys=capsys)
    assert code == 0
    mse = read_results(out)
    # Trained again under the new loss, not the old prompts evaluated under the new label.
    assert mse["config"]["TRAINER"]["MEDPROMPTCLIP"]["LOSS"] == "mse" and mse["train_loss"] != l1["train_loss"]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert read_results(aside)["train_loss"] == l1["train_loss"]
    log = (out / "log.txt").read_text()
    assert log.count("held a run with other settings or inputs") == 1 and str(aside) in log

    # The same settings again: resumed from its own checkpoint, nothing moved.
    assert run_train(*medprompt("TRAINER.MEDPROMPTCLIP.LOSS", "mse"), capsys=capsys)[0] == 0
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]) == 1
    assert read_results(out)["accuracy"] == mse["accuracy"]
