"""A researcher's own class-per-folder dataset through every sweep: checks before compute, honest tables,
summaries per target. Kept cheap: 4 classes of 6 small images, one seed, tiny-clip, one epoch."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import PROJECT_DIR, SUBPROCESS_ENV, read_results, recipe, run_train

CLASSES = ("calm", "spotted", "striped", "dark")
FAST = "OPTIM.MAX_EPOCH 1"


def make_dataset(data, name="MyScans", descriptions=True, per_class=6):
    """DATA/<name>/<class>/*.png, its split and declaration (make_split --folder), optionally descriptions."""
    folder = data / name
    for c, cls in enumerate(CLASSES):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24, 24), (40 * c + 10 * i, 90, 200 - 40 * c)).save(folder / cls / f"{i:02d}.png")
    extra = []
    if descriptions:
        (folder / "descriptions.json").write_text(json.dumps({c: [f"a {c} pattern fills the image."] for c in CLASSES}))
        extra = ["--descriptions", "descriptions.json"]
    made = cli("-m", "datasets.make_split", "--root", data, "--folder", name, "--modality", "dermoscopy", *extra)
    assert made.returncode == 0, made.stderr
    return folder


def cli(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=PROJECT_DIR, capture_output=True, text=True,
                          env=env or SUBPROCESS_ENV, timeout=600)


def sweep(protocol, target, data, out, *extra, **env):
    settings = dict(SUBPROCESS_ENV, PYTHON=sys.executable, DATA=str(data), OUTPUT=str(out), BACKBONE="tiny-clip",
                    SEEDS="1", OPTS=FAST, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", os.path.join(PROJECT_DIR, "scripts", f"{protocol}.sh"), target, *extra],
                          cwd=PROJECT_DIR, capture_output=True, text=True, env=settings, timeout=600)


def sweep_here(monkeypatch, capsys, protocol, target, data, out, **env):
    """scripts/sweep.py's main in this process (for sweeps that stop before training): (exit code, stdout, stderr)."""
    sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
    import sweep as sweep_script

    for key, value in dict(DATA=str(data), OUTPUT=str(out), BACKBONE="tiny-clip", SEEDS="1", OPTS=FAST, **env).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = sweep_script.main([protocol, target])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- every sweep on a declared dataset


def test_fewshot_on_a_folder_dataset_marks_cells_with_fewer_images_than_asked(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_dataset(data)  # 4 training images per class
    proc = sweep("fewshot", "MyScans", data, out, SHOTS="1 8")
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("MyScans: few-shot", 1)[1]
    rows = {line.split("  ")[0]: line for line in table.splitlines() if line[:1].isalpha()}
    for method in ("CoOp", "MaPLe", "IVLP+MedPromptCLIP"):
        cells = rows[method].split()[-2:]
        assert not cells[0].endswith("*") and cells[1].endswith("*"), rows[method]  # 1 shot is honest, 8 is not
        assert f"* {method} on MyScans, 8 shots: 4 class(es) had fewer than 8 training images" in table
    assert "fewer training images than the shots asked: CoOp on MyScans, 8 shots" in proc.stderr
    runs = out / "fewshot" / "tiny-clip" / "MyScans"
    (coop8,) = runs.glob("shots_8/CoOp/*/seed1")
    used = read_results(coop8)["shots_used"]
    assert used["asked"] == 8 and used["min"] == used["max"] == 4 and used["per_class"] == {c: 4 for c in sorted(CLASSES)}
    (coop1,) = runs.glob("shots_1/CoOp/*/seed1")
    assert read_results(coop1)["shots_used"]["min"] == 1
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["target"] == "MyScans" and (runs / "fewshot.png").is_file()
    assert any(r["short_shots"] for r in summary["rows"] if r["shots"] == 8)
    # Aggregating the dataset folder counts the seeds asked for, not the records (the stacking source is no seed),
    # with or without the sweep's list of runs.
    for keep_manifest in (True, False):
        if not keep_manifest:
            (runs / "sweep.json").unlink()
        again = cli("scripts/aggregate.py", "fewshot", runs)
        assert again.returncode == 0, again.stderr
        assert "/2 seeds" not in again.stdout and re.search(r"seeds 1[,;]", again.stdout)


def test_crossmodal_zeroshot_and_single_runs_on_a_folder_dataset(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    folder = make_dataset(data)
    cross = sweep("crossmodal", "MyScans", data, out)
    assert cross.returncode == 0, cross.stderr
    header = cross.stdout.split("accuracy % (mean ± std over seeds)", 1)[1].splitlines()[1]
    for method in ("ZeroShotCLIP (template)", "ZeroShotCLIP (descriptions)", "MedPromptCLIP"):
        assert method in header
    zero = sweep("zeroshot", "MyScans", data, out)
    assert zero.returncode == 0, zero.stderr
    assert "ZeroShotCLIP (ensemble)" in zero.stdout and "ZeroShotCLIP (descriptions)" in zero.stdout
    # Single runs take the declaration as the dataset file; its descriptions path is relative to it.
    single = tmp_path / "single"
    code, err = run_train("--root", data, "--trainer", "MedPromptCLIP", "--dataset-config-file", folder / "dataset.yaml",
                          "--config-file", recipe("MedPromptCLIP", "specific_modal"), "--output-dir", single,
                          "--seed", "1", "MODEL.BACKBONE.NAME", "tiny-clip", *FAST.split(), capsys=capsys)
    assert code == 0, err
    result = read_results(single)
    assert result["dataset"] == "MyScans" and result["num_samples"] == 4 and result["accuracy"] is not None


def test_dataset_yaml_paths_resolve_against_the_files_folder(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, name="Scans3", descriptions=False)
    (data / "Scans3" / "dataset.yaml").unlink()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "scans3_descriptions.json").write_text(json.dumps({c: [f"{c} texture."] for c in CLASSES}))
    config = configs / "Scans3.yaml"
    config.write_text('DATASET:\n  NAME: "Scans3"\n  MODALITY: "ct"\n  DESCRIPTIONS_FILE: "scans3_descriptions.json"\n'
                      '  CLASSNAMES: ["calm", "dark", "spotted", "striped"]\n')
    code, err = run_train("--root", data, "--trainer", "ZeroShotCLIP", "--dataset-config-file", config,
                          "--config-file", recipe("ZeroShotCLIP", "descriptions"), "--output-dir", tmp_path / "out",
                          "--eval-only", "MODEL.BACKBONE.NAME", "tiny-clip", capsys=capsys)
    assert code == 0, err
    assert read_results(tmp_path / "out")["config"]["DATASET"]["DESCRIPTIONS_FILE"] == str(configs / "scans3_descriptions.json")


# ---------------------------------------------------------------- checks before compute


def test_check_decodes_every_image_once_and_remembers(tmp_path, monkeypatch):
    from datasets import check

    data = tmp_path / "data"
    folder = make_dataset(data)
    truncate(folder / "dark" / "03.png")
    proc = cli("-m", "datasets", "--root", data, "--check")
    assert proc.returncode == 1
    assert str(folder / "dark" / "03.png") in proc.stderr and "23 image(s) decode" in proc.stdout
    assert (data / check.MEMO_FILE).is_file()

    calls = []
    real = check.decode_error
    monkeypatch.setattr(check, "decode_error", lambda p: calls.append(p) or real(p))
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    bad = check.undecodable_images(str(data), paths)
    assert [p for p, _ in bad] == [str(folder / "dark" / "03.png")] and calls == []  # all remembered
    (folder / "calm" / "00.png").write_bytes((folder / "calm" / "01.png").read_bytes() + b"\0")  # changed: size
    check.undecodable_images(str(data), paths)
    assert calls == [str(folder / "calm" / "00.png")]


def test_check_reports_descriptions_missing_a_class_and_names_data(tmp_path):
    data = tmp_path / "data"
    folder = make_dataset(data)
    (folder / "descriptions.json").write_text(json.dumps({"calm": ["x."], "dark": ["y."], "striped": ["z."]}))
    proc = cli("-m", "datasets", "--root", data, "--check", "--dataset", "MyScans")
    assert proc.returncode == 1 and "has no descriptions for class(es) 'spotted'" in proc.stderr
    assert str(folder / "descriptions.json") in proc.stderr
    proc = cli("-m", "datasets", "--root", tmp_path / "nowhere", "--check")
    assert proc.returncode == 2 and f"DATA={tmp_path / 'nowhere'} does not exist" in proc.stderr
    proc = cli("-m", "datasets", "--root", data, "--check", "--dataset", "Other")
    assert proc.returncode == 2 and f"DATA={data} holds no dataset 'Other'" in proc.stderr


@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "crossmodal", "zeroshot"])
def test_a_broken_image_or_description_file_stops_every_sweep_before_its_first_run(tmp_path, protocol, monkeypatch,
                                                                                    capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    folder = make_dataset(data)
    truncate(folder / "spotted" / "02.png")
    (folder / "descriptions.json").write_text(json.dumps({c: ["texture."] for c in CLASSES if c != "calm"}))
    code, stdout, stderr = sweep_here(monkeypatch, capsys, protocol, "MyScans", data, out,
                                      METHODS="ZeroShotCLIP MedPromptCLIP CoOp")
    assert code == 2, stdout + stderr
    assert f"{folder / 'spotted' / '02.png'} cannot be decoded" in stderr
    assert "no descriptions for class(es) 'calm'" in stderr and "nothing was started" in stderr
    assert not out.exists()


def test_a_sweep_names_data_when_it_lacks_the_dataset(tmp_path, monkeypatch, capsys):
    from datasets.catalog import DECLARED

    for name in list(DECLARED):  # a fresh sweep process knows no declared dataset before it reads DATA
        monkeypatch.delitem(DECLARED, name)
    code, _, stderr = sweep_here(monkeypatch, capsys, "fewshot", "MyScans", tmp_path / "nowhere", tmp_path / "out")
    assert code == 2 and f"DATA={tmp_path / 'nowhere'} does not exist" in stderr
    (tmp_path / "data").mkdir()
    code, _, stderr = sweep_here(monkeypatch, capsys, "zeroshot", "MyScans", tmp_path / "data", tmp_path / "out")
    assert code == 2 and f"DATA={tmp_path / 'data'} has no folder MyScans/" in stderr


# ---------------------------------------------------------------- rows that cannot run, summaries per target


def test_rows_without_descriptions_run_only_when_asked_and_targets_keep_their_summaries(tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    make_dataset(data, name="Described")
    make_dataset(data, descriptions=False)
    first = sweep("zeroshot", "Described", data, out)
    assert first.returncode == 0, first.stderr
    root = out / "zeroshot" / "tiny-clip"
    kept = {name: (root / "Described" / name).read_bytes() for name in ("summary.md", "summary.json", "sweep.json")}

    refused = sweep("zeroshot", "MyScans", data, out)
    assert refused.returncode == 2
    assert "ZeroShotCLIP (descriptions) on MyScans: no descriptions file" in refused.stderr
    assert "generate_descriptions.py MyScans" in refused.stderr and "--skip-unavailable" in refused.stderr
    assert not (root / "MyScans").exists()

    ran = sweep("zeroshot", "MyScans", data, out, SKIP_UNAVAILABLE="1")
    assert ran.returncode == 0, ran.stderr
    assert "skipped 1 row(s)" in ran.stdout
    header = ran.stdout.split("accuracy % (mean ± std over seeds)", 1)[1].splitlines()[1]
    assert "ZeroShotCLIP (template)" in header and "(ensemble)" in header and "(descriptions)" not in header
    assert json.loads((root / "MyScans" / "sweep.json").read_text())["skipped"] == ["ZeroShotCLIP (descriptions) on MyScans"]
    assert {name: (root / "Described" / name).read_bytes() for name in kept} == kept  # the other target's summaries
    code, stdout, _ = sweep_here(monkeypatch, capsys, "zeroshot", "MyScans", data, out, SKIP_UNAVAILABLE="")
    assert code == 2
    import sweep as sweep_script

    assert sweep_script.main(["zeroshot", "MyScans", "--skip-unavailable"]) == 0  # the flag, as the variable
    assert "reused " in capsys.readouterr().out

    several = cli("scripts/aggregate.py", "zeroshot", root)
    assert several.returncode == 1 and "several targets (Described, MyScans); choose one with --target" in several.stderr
    again = cli("scripts/aggregate.py", "zeroshot", root, "--dataset", "Described")
    assert again.returncode == 0 and "Described" in again.stdout and "MyScans" not in again.stdout
