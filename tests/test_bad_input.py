"""Each user mistake: one clear line, a non-zero exit, and no results.json."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_CFG, PROJECT_DIR, recipe, run_train
from datasets.demo import draw_image

ZS = recipe("ZeroShotCLIP", "template")


def zeroshot_args(root, out, *extra, dataset_cfg=DEMO_CFG):
    return ["--root", root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", dataset_cfg,
            "--config-file", ZS, "--output-dir", out, "--eval-only", *extra]


def head_ct(root, split):
    folder = os.path.join(root, "Head_CT")
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in range(2):
        draw_image("tissue_blob", i, size=16).save(os.path.join(folder, "img", f"{i}.png"))
    if split is not None:
        with open(os.path.join(folder, "data_split.json"), "w") as f:
            f.write(split if isinstance(split, str) else json.dumps(split))
    return os.path.join(PROJECT_DIR, "configs", "datasets", "Head_CT.yaml")


GOOD_ROWS = [["img/0.png", 0, "Normal_brain"], ["img/1.png", 1, "Brain_bleeding"]]

CASES = {
    "missing root": (lambda r: (os.path.join(r, "nope"), DEMO_CFG.replace("demo.yaml", "NCT.yaml")), "data root not found"),
    "missing dataset folder": (lambda r: (r, DEMO_CFG.replace("demo.yaml", "NCT.yaml")), "NCT/<class>/, and run python -m datasets.make_split"),
    "shipped split, image folder missing": (lambda r: (r, DEMO_CFG.replace("demo.yaml", "ODIR.yaml")),
                                            os.path.join("datasets", "splits", "ODIR.json.gz") + " lists them under "),
    "shipped split, images missing": (lambda r: (r, head_ct(r, None)), "image file missing"),
    "malformed split": (lambda r: (r, head_ct(r, "{ not json")), "not valid JSON"),
    "bad row": (lambda r: (r, head_ct(r, {"train": [["a.png", "zero", "x"]], "test": []})), "each row must be"),
    "label disagrees with class": (
        lambda r: (r, head_ct(r, {"train": GOOD_ROWS, "test": [["img/0.png", 0, "Brain_bleeding"]]})),
        "label 0 is 'Brain_bleeding', but label 0 of Head_CT is 'Normal_brain'"),
    "label out of range": (lambda r: (r, head_ct(r, {"train": [["img/0.png", 5, "x"]], "test": []})), "has label 5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data(tmp_path, capsys, case):
    make, message = CASES[case]
    root, dataset_cfg = make(str(tmp_path))
    out = str(tmp_path / "out")
    code, err = run_train(*zeroshot_args(root, out, dataset_cfg=dataset_cfg), capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_unreadable_image(tmp_path, capsys):
    dataset_cfg = head_ct(str(tmp_path), {"train": GOOD_ROWS, "test": GOOD_ROWS})
    with open(tmp_path / "Head_CT" / "img" / "1.png", "wb") as f:
        f.write(b"not an image")
    out = str(tmp_path / "out")
    code, err = run_train(*zeroshot_args(str(tmp_path), out, "MODEL.BACKBONE.NAME", "tiny-clip", dataset_cfg=dataset_cfg),
                          capsys=capsys)
    assert code == 2 and "cannot read image" in err and "1.png" in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "results.json"))


@pytest.mark.parametrize("extra, message", [
    (["--trainer", "NoSuchTrainer"], "unknown trainer 'NoSuchTrainer'"),
    (["MODEL.BACKBONE.NAME", "no-such-backbone"], "unknown backbone 'no-such-backbone'"),
    (["OPTIM.NO_SUCH_KEY", "1"], "unknown config key OPTIM.NO_SUCH_KEY"),
    (["MODEL.BACKBONE.NAME", "biomedclip"], "backbone 'biomedclip'"),
    (["TRAINER.ZEROSHOTCLIP.PROMPT", "magic"], "PROMPT must be one of"),
])
def test_bad_names(tmp_path, demo_root, capsys, extra, message):
    out = str(tmp_path / "out")
    args = zeroshot_args(demo_root, out)
    if extra[0].startswith("--"):
        args = args[:2] + extra + args[4:]
    else:
        args += extra
    code, err = run_train(*args, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_unknown_dataset_config(tmp_path, demo_root, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text('DATASET:\n  NAME: "NoSuchSet"\n')
    code, err = run_train(*zeroshot_args(demo_root, str(tmp_path / "out"), dataset_cfg=str(cfg)), capsys=capsys)
    assert code == 2 and "unknown dataset 'NoSuchSet'" in err


def test_missing_descriptions_name_the_class_and_file(tmp_path, demo_root, capsys):
    desc = tmp_path / "desc"
    desc.mkdir()
    (desc / "demo.json").write_text(json.dumps({"Z5": ["dark streaks"]}))
    code, err = run_train(*zeroshot_args(demo_root, str(tmp_path / "out"), "TRAINER.ZEROSHOTCLIP.PROMPT", "descriptions",
                                         "DATASET.DESCRIPTIONS_DIR", str(desc)), capsys=capsys)
    assert code == 2 and "11 of 12 classes of demo have no descriptions" in err and str(desc / "demo.json") in err
    assert "J2" in err and len(err.strip().splitlines()) == 1


def test_cli_exit_code_and_single_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *zeroshot_args(str(tmp_path / "none"), str(tmp_path / "out"),
                                                                      dataset_cfg=DEMO_CFG.replace("demo.yaml", "NCT.yaml"))],
                          cwd=PROJECT_DIR, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: data root not found")


@pytest.mark.parametrize("opts, message", [
    (["DATALOADER.TEST.BATCH_SIZE", "0"], "batch size must be at least 1"),
    (["DATALOADER.NUM_WORKERS", "-2"], "NUM_WORKERS must be -1 (automatic), 0 or more"),
    (["INPUT.PIXEL_STD", "(0.0, 0.0, 0.0)"], "std above 0"),
    (["TEST.SPLIT", "foo"], "TEST.SPLIT must be test or val"),
])
def test_bad_values(tmp_path, demo_root, capsys, opts, message):
    out = str(tmp_path / "out")
    code, err = run_train(*zeroshot_args(demo_root, out, *opts), capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_learned_prompts_need_a_model_dir_and_epochs(tmp_path, demo_root, capsys):
    args = ["--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", str(tmp_path / "out")]
    code, err = run_train(*args, "--eval-only", capsys=capsys)
    assert code == 2 and "needs --model-dir" in err
    code, err = run_train(*args, "OPTIM.MAX_EPOCH", "0", capsys=capsys)
    assert code == 2 and "MAX_EPOCH must be at least 1" in err
    assert not (tmp_path / "out" / "results.json").exists()
