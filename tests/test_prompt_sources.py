"""Where a run takes prompts from (--model-dir, MODEL.INIT_WEIGHTS, --init-from, resume): a TorchScript file there
is one clean line, and stacked prompts must come from the same backbone."""
import re
import shutil
import warnings

import pytest
import torch

from conftest import DEMO_CFG, recipe, run_train


def medprompt_args(root, out, *extra):
    return ["--root", root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", out, "--seed", "1", *extra,
            "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu"]


def stack_args(root, out, source, *extra):
    return ["--root", root, "--trainer", "CoOp", "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe("CoOp", "stacked"), "--output-dir", out, "--init-from", source, *extra,
            "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.NUM_SHOTS", "1", "DEVICE", "cpu", "OPTIM.MAX_EPOCH", "1",
            "TEST.NO_TEST", "True"]


def run_quietly(args, capsys):
    """run_train, also returning every warning raised on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_train(*args, capsys=capsys)
    return code, err, [str(w.message) for w in caught]


def torchscript_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(6, 64)), str(path))
    return path


@pytest.mark.parametrize("route", ["model-dir", "model-dir-original", "INIT_WEIGHTS", "init-from", "resume"])
def test_torchscript_file_as_prompt_checkpoint_is_one_clean_line(route, tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    folder = "VLPromptLearner" if route == "model-dir-original" else "prompt_learner"
    path = torchscript_file(run / folder / "model.pth.tar-1")
    (run / folder / "checkpoint").write_text("model.pth.tar-1\n")
    out = str(tmp_path / "out")
    if route.startswith("model-dir"):
        args = medprompt_args(demo_root, out, "--eval-only", "--model-dir", str(run))
    elif route == "INIT_WEIGHTS":
        args = medprompt_args(demo_root, out, "--eval-only", "MODEL.INIT_WEIGHTS", str(path))
    elif route == "init-from":
        args = stack_args(demo_root, out, str(run))
    else:
        args = medprompt_args(demo_root, str(run), "OPTIM.MAX_EPOCH", "1")
    code, err, caught = run_quietly(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: checkpoint {path} is a TorchScript archive"), err
    assert "give the output folder of a training run" in err
    assert not [w for w in caught if "TorchScript" in w or "torch.jit" in w], caught


# ---------------------------------------------------------------- --init-from checks the backbone

@pytest.fixture(scope="module")
def medprompt_source(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("source") / "medprompt"
    code, err = run_train(*medprompt_args(demo_root, str(out), "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True"))
    assert code == 0, err
    return out


def source_copy(medprompt_source, tmp_path, change=None, results=True):
    """The source run without its results.json (unless ``results``) and its checkpoint edited by ``change``."""
    run = tmp_path / "source"
    shutil.copytree(medprompt_source, run)
    if not results:
        (run / "results.json").unlink()
    path = run / "prompt_learner" / "model.pth.tar-1"
    if change:
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)
    return run


def forget_backbone(checkpoint):
    del checkpoint["backbone"]
    del checkpoint["settings"]["MODEL.BACKBONE.NAME"]


def other_backbone(checkpoint):
    checkpoint["backbone"] = checkpoint["settings"]["MODEL.BACKBONE.NAME"] = "tiny-bert-clip"


def test_init_from_without_any_record_of_the_backbone_is_refused(medprompt_source, tmp_path, demo_root, capsys):
    run = source_copy(medprompt_source, tmp_path, forget_backbone, results=False)
    code, err = run_train(*stack_args(demo_root, str(tmp_path / "out"), str(run)), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(r"neither a results.json nor its checkpoint .* records the backbone", err), err
    assert not (tmp_path / "out" / "results.json").exists()


def test_init_from_checks_the_backbone_its_checkpoint_records(medprompt_source, tmp_path, demo_root, capsys):
    run = source_copy(medprompt_source, tmp_path, other_backbone, results=False)
    code, err = run_train(*stack_args(demo_root, str(tmp_path / "out"), str(run)), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained with backbone tiny-bert-clip, this run uses tiny-clip" in err


def test_init_from_with_the_backbone_recorded_only_in_the_checkpoint_stacks(medprompt_source, tmp_path, demo_root,
                                                                            capsys):
    run = source_copy(medprompt_source, tmp_path, results=False)
    code, err = run_train(*stack_args(demo_root, str(tmp_path / "out"), str(run)), capsys=capsys)
    assert code == 0, err
