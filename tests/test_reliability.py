"""Results that can be trusted: checkpoints run no code and load strictly, data stay in their folder,
resumed runs are exact, failures are one line and leave nothing behind."""
import errno
import json
import logging
import os
import re
import socket
import tempfile

import pytest
import torch

from conftest import DEMO_CFG, PROJECT_DIR, read_results, recipe, run_train
from core.data import DATASET_REGISTRY, DatasetWrapper
from core.errors import UserError
from datasets.demo import draw_image, generate_demo

B2N = recipe("MedPromptCLIP", "base2new")
HEAD_CT_CFG = os.path.join(PROJECT_DIR, "configs", "datasets", "Head_CT.yaml")
DEAD_PID = 2**22 + 11  # above Linux's largest pid: never a running process


def medprompt_args(root, out, *extra):
    return ["--root", root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG, "--config-file", B2N,
            "--output-dir", out, "--seed", "1", *extra, "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu"]


def one_error_line(err):
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- checkpoints run no code

class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_run(folder, marker, state_dict=None):
    """A run folder whose latest checkpoint carries a code payload beside plausible tensors."""
    model_dir = folder / "prompt_learner"
    model_dir.mkdir(parents=True)
    state = state_dict if state_dict is not None else {"ctx": torch.zeros(6, 64)}
    torch.save({"state_dict": state, "epoch": 1, "payload": Payload(str(marker))}, model_dir / "model.pth.tar-1")
    (model_dir / "checkpoint").write_text("model.pth.tar-1\n")
    return folder


@pytest.mark.parametrize("path", ["resume", "model-dir", "init-from", "INIT_WEIGHTS"])
def test_crafted_checkpoint_runs_no_code(tmp_path, demo_root, capsys, path):
    marker = tmp_path / "marker"
    run = crafted_run(tmp_path / "crafted", marker)
    out = str(tmp_path / "out")
    if path == "resume":
        args = medprompt_args(demo_root, str(run), "OPTIM.MAX_EPOCH", "1")
    elif path == "model-dir":
        args = medprompt_args(demo_root, out, "--eval-only", "--model-dir", str(run))
    elif path == "INIT_WEIGHTS":
        args = medprompt_args(demo_root, out, "--eval-only", "MODEL.INIT_WEIGHTS",
                              str(run / "prompt_learner" / "model.pth.tar-1"))
    else:
        args = ["--root", demo_root, "--trainer", "CoOp", "--dataset-config-file", DEMO_CFG,
                "--config-file", recipe("CoOp", "stacked"), "--output-dir", out, "--init-from", str(run),
                "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.NUM_SHOTS", "1", "DEVICE", "cpu", "OPTIM.MAX_EPOCH", "1",
                "TEST.NO_TEST", "True"]
    code, err = run_train(*args, capsys=capsys)
    assert not marker.exists()
    assert code == 2 and one_error_line(err), err
    assert "model.pth.tar-1" in err and "not loaded" in err


def test_checkpoint_pointer_names_only_a_file_beside_it(tmp_path, demo_root, capsys):
    source = tmp_path / "source"
    assert run_train(*medprompt_args(demo_root, str(source), "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True"),
                     capsys=capsys)[0] == 0
    other = tmp_path / "other" / "prompt_learner"
    other.mkdir(parents=True)
    (other / "checkpoint").write_text("../../source/prompt_learner/model.pth.tar-1\n")
    code, err = run_train(*medprompt_args(demo_root, str(tmp_path / "out"), "--eval-only", "--model-dir",
                                          str(tmp_path / "other")), capsys=capsys)
    assert code == 2 and one_error_line(err) and "not a file of" in err
    # A link beside the pointer that leads elsewhere is refused too.
    (other / "model.pth.tar-1").symlink_to(source / "prompt_learner" / "model.pth.tar-1")
    (other / "checkpoint").write_text("model.pth.tar-1\n")
    code, err = run_train(*medprompt_args(demo_root, str(tmp_path / "out"), "--eval-only", "--model-dir",
                                          str(tmp_path / "other")), capsys=capsys)
    assert code == 2 and "not a file of" in err


# ---------------------------------------------------------------- strict loading

def test_loading_needs_every_tensor_and_the_same_settings(tmp_path, demo_root, capsys):
    shallow = tmp_path / "shallow"
    code, err = run_train(*medprompt_args(demo_root, str(shallow), "TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT", "1",
                                          "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True"), capsys=capsys)
    assert code == 0, err
    path = shallow / "prompt_learner" / "model.pth.tar-1"
    saved = torch.load(path, weights_only=True)
    assert saved["trainer"] == "MedPromptCLIP" and saved["backbone"] == "tiny-clip"
    assert saved["settings"]["TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT"] == 1
    out = tmp_path / "deep"
    code, err = run_train(*medprompt_args(demo_root, str(out), "--eval-only", "--model-dir", str(shallow)),
                          capsys=capsys)
    assert code == 2 and one_error_line(err) and "TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT 1" in err
    assert not (out / "results.json").exists()

    # Without recorded settings the missing tensors themselves are named.
    del saved["settings"]
    torch.save(saved, path)
    code, err = run_train(*medprompt_args(demo_root, str(out), "--eval-only", "--model-dir", str(shallow)),
                          capsys=capsys)
    assert code == 2 and "lacks tensors" in err and "deep_ctx.0" in err


def test_empty_state_dict_is_refused_also_on_resume(tmp_path, demo_root, capsys):
    run = tmp_path / "run" / "prompt_learner"
    run.mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 1}, run / "model.pth.tar-1")
    (run / "checkpoint").write_text("model.pth.tar-1\n")
    code, err = run_train(*medprompt_args(demo_root, str(tmp_path / "run"), "OPTIM.MAX_EPOCH", "1"), capsys=capsys)
    assert code == 2 and one_error_line(err) and "holds no tensors" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path, demo_root, capsys):
    run = tmp_path / "run" / "prompt_learner"
    run.mkdir(parents=True)
    (run / "model.pth.tar-3").write_bytes(b"PK\x03\x04 cut short")
    (run / "checkpoint").write_text("model.pth.tar-3\n")
    code, err = run_train(*medprompt_args(demo_root, str(tmp_path / "run"), "OPTIM.MAX_EPOCH", "3"), capsys=capsys)
    assert code == 2 and one_error_line(err)
    assert str(run / "model.pth.tar-3") in err and "delete it" in err and str(run / "checkpoint") in err


# ---------------------------------------------------------------- data stay inside their folder

def head_ct(root, rows):
    folder = root / "Head_CT"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        draw_image("xray_ring", i, size=16).save(folder / "img" / f"{i}.png")
    (folder / "data_split.json").write_text(json.dumps({"train": rows, "val": [], "test": rows}))
    return folder


def head_ct_cfg(root, **overrides):
    from core.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.SEED = str(root), "Head_CT", 1
    for key, value in overrides.items():
        setattr(cfg.DATASET, key, value)
    return cfg


ROWS = [[f"img/{i}.png", i % 2, ["Normal_brain", "Brain_bleeding"][i % 2]] for i in range(6)]


@pytest.mark.parametrize("bad", ["../../../etc/hostname", "/etc/hostname", "img/outside.png"])
def test_split_rows_stay_inside_the_image_folder(tmp_path, capsys, bad):
    folder = head_ct(tmp_path / "data", ROWS + [[bad, 0, "Normal_brain"]])
    outside = tmp_path / "elsewhere.png"
    draw_image("xray_ring", 9, size=16).save(outside)
    (folder / "img" / "outside.png").symlink_to(outside)
    out = tmp_path / "out"
    code, err = run_train("--root", tmp_path / "data", "--trainer", "ZeroShotCLIP", "--dataset-config-file", HEAD_CT_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "MODEL.BACKBONE.NAME", "tiny-clip", capsys=capsys)
    assert code == 2 and one_error_line(err)
    assert "train row 6" in err and "outside the image folder" in err
    assert not (out / "results.json").exists()


def test_fewshot_cache_is_checked_against_the_split(tmp_path):
    root = tmp_path / "data"
    folder = head_ct(root, ROWS)
    build = DATASET_REGISTRY.get("Head_CT")
    first = build(head_ct_cfg(root, NUM_SHOTS=1))
    expected = [(d.impath, d.label) for d in first.train_x]
    cache = folder / "split_fewshot" / "shot_1-seed_1.json"
    data = json.loads(cache.read_text())
    assert all(not os.path.isabs(row[0]) and ".." not in row[0] for row in data["train"])

    # Swapped labels: not rows of the split, so the sample is drawn again.
    for row in data["train"]:
        row[1] = 1 - row[1]
        row[2] = ["Normal_brain", "Brain_bleeding"][row[1]]
    cache.write_text(json.dumps(data))
    again = build(head_ct_cfg(root, NUM_SHOTS=1))
    assert [(d.impath, d.label) for d in again.train_x] == expected
    assert json.loads(cache.read_text())["train"][0][1] == expected[0][1]

    # A row leading out of the image folder is an error naming the cache and the row.
    data = json.loads(cache.read_text())
    data["train"][0][0] = "../../../etc/hostname"
    cache.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"few-shot cache .*shot_1-seed_1.json: train row 0 .*outside"):
        build(head_ct_cfg(root, NUM_SHOTS=1))


def test_unreadable_image_of_a_fewshot_cache_names_the_cache(tmp_path):
    root = tmp_path / "data"
    head_ct(root, ROWS)
    build = DATASET_REGISTRY.get("Head_CT")
    build(head_ct_cfg(root, NUM_SHOTS=1))  # writes the cache
    ds = build(head_ct_cfg(root, NUM_SHOTS=1))  # reads it
    with open(ds.train_x[0].impath, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UserError) as info:
        DatasetWrapper(ds.train_x, lambda im: im)[0]
    assert "cannot read image" in str(info.value) and "shot_1-seed_1.json" in str(info.value)


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("name", ["CoOp", "CoCoOp", "IVLP", "MaPLe"])
def test_killed_image_trainer_resumes_bit_identical(tmp_path, demo_root, capsys, monkeypatch, name):
    from core.engine import SimpleTrainer

    trainer_cls = __import__("core.engine", fromlist=["TRAINER_REGISTRY"]).TRAINER_REGISTRY.get(name)

    def args(out):
        return ["--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
                "--config-file", recipe(name, "base2new"), "--output-dir", out, "--seed", "1",
                "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu", "DATASET.NUM_SHOTS", "2",
                "DATASET.SUBSAMPLE_CLASSES", "base", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATALOADER.NUM_WORKERS", "0",
                "OPTIM.MAX_EPOCH", "3", "OPTIM.WARMUP_EPOCH", "0", "TRAIN.CHECKPOINT_FREQ", "1", "TEST.SPLIT", "val"]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(*args(straight), capsys=capsys)[0] == 0

    original_after_epoch, original_test = trainer_cls.after_epoch, SimpleTrainer.test

    def killed_after_first_checkpoint(self):
        original_after_epoch(self)
        if self.epoch == 0:
            raise KeyboardInterrupt

    def killed_before_results(self, split=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_cls, "after_epoch", killed_after_first_checkpoint)
    assert run_train(*args(resumed), capsys=capsys)[0] == 130
    monkeypatch.setattr(trainer_cls, "after_epoch", original_after_epoch)
    monkeypatch.setattr(SimpleTrainer, "test", killed_before_results)  # killed after the last checkpoint
    assert run_train(*args(resumed), capsys=capsys)[0] == 130
    monkeypatch.setattr(SimpleTrainer, "test", original_test)
    assert run_train(*args(resumed), capsys=capsys)[0] == 0

    a = torch.load(straight / "prompt_learner" / "model.pth.tar-3", weights_only=True)["state_dict"]
    b = torch.load(resumed / "prompt_learner" / "model.pth.tar-3", weights_only=True)["state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_results(straight), read_results(resumed)
    assert rb["train_loss"] == ra["train_loss"]
    assert (rb["accuracy"], rb["macro_f1"]) == (ra["accuracy"], ra["macro_f1"])


# ---------------------------------------------------------------- clean failures

def zeroshot_args(root, out):
    return ["--root", root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
            "MODEL.BACKBONE.NAME", "tiny-clip", "TEST.SPLIT", "val"]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, demo_root, capsys, monkeypatch):
    out = tmp_path / "out"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, err = run_train(*zeroshot_args(demo_root, out), capsys=capsys)
    assert code == 2 and one_error_line(err)
    assert "No space left on device" in err and str(out / "results.json") in err and "free disk space" in err
    # The log, and at most the feature cache's folders and lock files: no result, no partial file.
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [p for p in left if not p.endswith(".lock")] == ["log.txt"]


def test_read_only_output_folder_is_one_line(tmp_path, demo_root, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: fail every write as a read-only file system does
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(out / "log.txt"))

        monkeypatch.setattr(logging.FileHandler, "_open", refuse)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        out.chmod(0o555)
    code, err = run_train(*zeroshot_args(demo_root, out), capsys=capsys)
    out.chmod(0o755)
    assert code == 2 and one_error_line(err) and str(out) in err and "writable" in err


def test_next_start_removes_what_killed_runs_left(tmp_path, demo_root, capsys):
    # Temporary files are named .<target>.<host>.<pid>.<random>.tmp
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    out = tmp_path / "out"
    (out / "prompt_learner").mkdir(parents=True)
    stale = out / "prompt_learner" / f".model.pth.tar-2.{host}.{DEAD_PID}.abc123.tmp"
    live = out / f".results.json.{host}.{os.getpid()}.xyz789.tmp"
    other_host = out / f".results.json.{host}x.{DEAD_PID}.xyz789.tmp"
    for path in (stale, live, other_host):
        path.write_bytes(b"partial")
    assert run_train(*zeroshot_args(demo_root, out), capsys=capsys)[0] == 0
    assert not stale.exists() and live.exists() and other_host.exists()

    parent = tmp_path / "data"
    half_drawn = parent / f".demo.{host}.{DEAD_PID}.q1w2e3.tmp"
    (half_drawn / "images").mkdir(parents=True)
    umask = os.umask(0o022)
    try:
        assert generate_demo(str(parent / "demo"))
    finally:
        os.umask(umask)
    assert not half_drawn.exists() and sorted(p.name for p in parent.iterdir()) == ["demo"]
    assert (parent / "demo").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- the suite on a CUDA machine

def test_test_helpers_pin_the_cpu_where_cuda_is_available(tmp_path, demo_root, monkeypatch):
    import train
    from test_trainers import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build("CoOp", "tiny-clip", demo_root, tmp_path).device.type == "cpu"
    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 0)
    run_train("--eval-only", "OPTIM.MAX_EPOCH", "1")
    assert seen[0][-2:] == ["DEVICE", "cpu"]


def test_float_tolerance_scales_with_dtype_and_magnitude():
    """A rounding difference of a few ulps passes at any magnitude; a real difference does not."""
    from conftest import assert_close, float_tolerance

    for scale in (1e-3, 2.0, 300.0):
        reference = torch.linspace(-scale, scale, 17)
        nudged = reference + 6 * torch.finfo(torch.float32).eps * scale  # what another CPU's summation order gives
        assert_close(nudged, reference)
        with pytest.raises(AssertionError):
            assert_close(reference + 1e-3 * scale, reference)
    assert float_tolerance(torch.ones(3, dtype=torch.float16)) > 1000 * float_tolerance(torch.ones(3))


def test_subprocess_commands_in_tests_see_no_gpu():
    from conftest import SUBPROCESS_ENV

    assert SUBPROCESS_ENV["CUDA_VISIBLE_DEVICES"] == "" and SUBPROCESS_ENV["HF_HUB_OFFLINE"] == "1"
