"""Every plain field of a checkpoint is checked before it is used: a wrong epoch, optimizer, scheduler or random
state is one line naming the field, never a traceback and never training silently skipped."""
import shutil

import pytest
import torch

from conftest import DEMO_CFG, recipe, run_train

MAX_EPOCH = "2"


def medprompt_args(root, out, *extra):
    return ["--root", root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", out, "--seed", "1", *extra,
            "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu", "OPTIM.MAX_EPOCH", MAX_EPOCH, "TEST.NO_TEST", "True"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("fields") / "run"
    code, err = run_train(*medprompt_args(demo_root, str(out)))
    assert code == 0, err
    return out


def tampered(finished_run, tmp_path, change):
    """A copy of the finished run whose checkpoint ``change(checkpoint)`` edited; the path of that checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "prompt_learner" / f"model.pth.tar-{MAX_EPOCH}"
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return run, path


def set_field(key, value):
    def change(checkpoint):
        if value is DELETE:
            del checkpoint[key]
        else:
            checkpoint[key] = value
    return change


DELETE = object()


def edit(function):
    def change(checkpoint):
        function(checkpoint)
    return change


def _extra_group(c):
    group = dict(c["optimizer"]["param_groups"][0], params=[99])
    c["optimizer"]["param_groups"].append(group)


def _fewer_params(c):
    c["optimizer"]["param_groups"][0]["params"] = c["optimizer"]["param_groups"][0]["params"][:-1]


def _state_shape(c):
    c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)


def _state_unknown_param(c):
    c["optimizer"]["state"][42] = {"step": torch.tensor(1.0)}


def _lr_text(c):
    c["optimizer"]["param_groups"][0]["lr"] = "fast"


def _scheduler_extra(c):
    c["scheduler"]["optimizer"] = "anything"


def _scheduler_last_epoch_text(c):
    c["scheduler"]["last_epoch"] = "2"


def _scheduler_last_epoch_far(c):
    c["scheduler"]["last_epoch"] = 10**6


def _rng_torch_shape(c):
    c["rng"]["torch"] = torch.zeros(10, dtype=torch.uint8)


def _rng_torch_dtype(c):
    c["rng"]["torch"] = c["rng"]["torch"].float()


def _rng_python(c):
    c["rng"]["python"] = (3, (1, 2, 3), None)


def _rng_numpy(c):
    c["rng"]["numpy"] = ["PCG64", [0] * 624, 0, 0, 0.0]


CASES = [
    ("epoch-text", set_field("epoch", "2"), "epoch is '2', not a count of finished epochs"),
    ("epoch-negative", set_field("epoch", -3), "epoch is -3, not a count of finished epochs"),
    ("epoch-absurd", set_field("epoch", 10**6), "epoch 1000000 is beyond OPTIM.MAX_EPOCH 2"),
    ("epoch-not-the-file-name", set_field("epoch", 1), "epoch 1 differs from the 2 of its file name"),
    ("epoch-missing", set_field("epoch", DELETE), "it records no epoch"),
    ("optimizer-missing", set_field("optimizer", None), "optimizer state is missing"),
    ("optimizer-text", set_field("optimizer", "adamw"), "optimizer is a str, not a dict"),
    ("optimizer-extra-group", edit(_extra_group), "has 2 parameter groups, this optimizer 1"),
    ("optimizer-other-params", edit(_fewer_params), "group 0 holds other parameters than this optimizer's"),
    ("optimizer-state-shape", edit(_state_shape), r"exp_avg is a float32 tensor of shape \(3, 3\), the parameter's"),
    ("optimizer-state-unknown", edit(_state_unknown_param), "state for parameter 42, which this optimizer does not"),
    ("optimizer-lr-text", edit(_lr_text), "group 0 lr is 'fast', not a float"),
    ("scheduler-missing", set_field("scheduler", None), "scheduler state is missing"),
    ("scheduler-extra-field", edit(_scheduler_extra), r"scheduler state has other fields than this run's \(optimizer\)"),
    ("scheduler-last-epoch-text", edit(_scheduler_last_epoch_text), "scheduler state last_epoch is '2', not an int"),
    ("scheduler-last-epoch-far", edit(_scheduler_last_epoch_far), "scheduler has run 1000000 epochs"),
    ("rng-missing", set_field("rng", DELETE), "its random state is missing"),
    ("rng-text", set_field("rng", "seed"), "rng is a str, not a dict"),
    ("rng-torch-shape", edit(_rng_torch_shape), r"torch random state is a uint8 tensor of shape \(10,\)"),
    ("rng-torch-dtype", edit(_rng_torch_dtype), r"torch random state is a float32 tensor"),
    ("rng-python", edit(_rng_python), "Python random state is not"),
    ("rng-numpy", edit(_rng_numpy), "NumPy random state is not MT19937"),
    ("train-loss", set_field("train_loss", {"loss": "low"}), "train_loss is not a mapping of loss names to numbers"),
    ("settings", set_field("settings", ["TRAINER.NAME"]), "settings is a list, not a dict"),
    ("backbone", set_field("backbone", 3), "backbone is an int, not a str"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resume_validates_every_field(change, message, finished_run, tmp_path, demo_root, capsys):
    run, path = tampered(finished_run, tmp_path, change)
    before = sorted(p.name for p in run.rglob("*"))
    code, err = run_train(*medprompt_args(demo_root, str(run)), capsys=capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


def test_untouched_checkpoint_resumes(finished_run, tmp_path, demo_root, capsys):
    run, _ = tampered(finished_run, tmp_path, lambda checkpoint: None)
    code, err = run_train(*medprompt_args(demo_root, str(run)), capsys=capsys)
    assert code == 0, err


@pytest.mark.parametrize("route", ["model-dir", "INIT_WEIGHTS"])
def test_loading_validates_the_fields_too(route, finished_run, tmp_path, demo_root, capsys):
    run, path = tampered(finished_run, tmp_path, set_field("epoch", -1))
    extra = ("--model-dir", str(run)) if route == "model-dir" else ("MODEL.INIT_WEIGHTS", str(path))
    code, err = run_train(*medprompt_args(demo_root, str(tmp_path / "out"), "--eval-only", *extra), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "epoch is -1, not a count of finished epochs" in err, err
