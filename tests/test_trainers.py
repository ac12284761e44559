"""Every registered trainer, on each tiny backbone: builds, steps, changes only its prompts, round-trips."""
import os
import re

import pytest
import torch

from conftest import DEMO_CFG, PROJECT_DIR, TINY_BACKBONES, assert_close, read_results, recipe, run_train
from core.engine import TRAINER_REGISTRY, trainable_state_dict

# BiomedCoOp: the demo recipe reads the demo's 12 descriptions per class (the published one reads 50).
RECIPES = {"ZeroShotCLIP": "template", "MedPromptCLIP": "base2new", "BiomedCoOp": "demo"}


def build(name, backbone, demo_root, out, *opts, recipe_name=None):
    import train

    args = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
        "--config-file", recipe(name, recipe_name or RECIPES.get(name, "base2new")), "--output-dir", str(out), "--seed", "1",
        "MODEL.BACKBONE.NAME", backbone, "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DEVICE", "cpu", *opts,
    ])
    cfg = train.setup_cfg(args)
    return TRAINER_REGISTRY.get(name)(cfg)


ALL = TRAINER_REGISTRY.registered_names()
# Prompt learners and zero-shot CLIP; the feature-based trainers learn no prompt (tests/test_feature_trainers.py).
PROMPT_TRAINERS = [n for n in ALL if TRAINER_REGISTRY.get(n).KIND != "feature-based"]
# The one opt-in recipe that also trains backbone weights (the original code's few-shot mode), and exactly
# which backbone tensors it may change: the image tower and the token embedding of either text tower kind.
BACKBONE_TRAINING = {("IVLP", "as_published_fewshot"): ("visual.", "token_embedding.", "text.token_embedding.",
                                                         "text.transformer.embeddings.word_embeddings.")}
CASES = [(n, None) for n in PROMPT_TRAINERS] + list(BACKBONE_TRAINING)


def test_registry_holds_every_method():
    assert {"ZeroShotCLIP", "MedPromptCLIP", "CoOp", "CoCoOp", "IVLP", "MaPLe"} <= set(ALL)
    for name in ALL:
        assert os.path.isdir(os.path.join(PROJECT_DIR, "configs", "trainers", name)), f"no recipes for {name}"


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("name,recipe_name", CASES, ids=[n + (f"-{r}" if r else "") for n, r in CASES])
def test_trainer_step_changes_only_its_prompts(name, recipe_name, backbone, demo_root, tmp_path):
    torch.manual_seed(0)
    trained = BACKBONE_TRAINING.get((name, recipe_name), ())
    # A learning rate large enough that every update is visible in float32.
    trainer = build(name, backbone, demo_root, tmp_path, "OPTIM.WARMUP_EPOCH", "0", "OPTIM.LR", "0.05",
                    recipe_name=recipe_name)
    frozen = {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}
    images = torch.randn(3, 3, *trainer.backbone.image_size)
    logits = trainer.model_inference(images)
    assert logits.shape == (3, 6) and torch.isfinite(logits).all()
    if name == "ZeroShotCLIP":
        assert not any(p.requires_grad for p in trainer.backbone.model.parameters())
        return

    learnable = {k: v.clone() for k, v in trainable_state_dict(trainer.prompt_learner).items()}
    assert learnable
    trainer.before_train()
    trainer.set_model_mode("train")
    trainer.num_batches, trainer.batch_idx = 1, 0
    summary = trainer.forward_backward(next(iter(trainer.train_loader_x)))
    assert torch.isfinite(torch.tensor(summary["loss"]))

    after = trainable_state_dict(trainer.prompt_learner)
    assert set(after) == set(learnable)
    grads = {k: p.grad for k, p in trainer.prompt_learner.named_parameters() if p.requires_grad}
    # Every learnable tensor that got a gradient moved (a ReLU unit may be silent for one batch).
    stuck = [k for k in after if grads[k] is not None and grads[k].abs().sum() > 0 and torch.equal(after[k], learnable[k])]
    assert stuck == [], f"parameters with a gradient that did not move: {stuck}"
    context = [k for k in after if k.endswith("ctx") or ".ctx" in k]
    assert context and all(not torch.equal(after[k], learnable[k]) for k in context)
    changed = {k for k, v in trainer.backbone.model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert not {k for k in changed if not k.startswith(trained)}, f"frozen weights changed: {sorted(changed)[:5]}"
    if trained:
        # Both trained parts moved: the image tower's weights and the token embedding.
        assert any(k.startswith("visual.") for k in changed)
        assert any(k.startswith(trained[1:]) for k in changed)

    # save / load round trip into a fresh trainer
    trainer.save_model(0, str(tmp_path / "ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "prompt_learner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    assert set(saved) == set(after)
    fresh = build(name, backbone, demo_root, tmp_path / "fresh", recipe_name=recipe_name)
    if trained:  # a fresh backbone: only the checkpoint can give it the fine-tuned weights
        assert not torch.equal(fresh.backbone.model.state_dict()[min(changed)], trainer.backbone.model.state_dict()[min(changed)])
    fresh.load_model(str(tmp_path / "ckpt"))
    for k, v in trainable_state_dict(fresh.prompt_learner).items():
        assert torch.equal(v, after[k])
    torch.manual_seed(1)
    images = torch.randn(2, 3, *trainer.backbone.image_size)
    trainer.set_model_mode("eval")
    assert_close(fresh.model_inference(images), trainer.model_inference(images))
    for k in changed:
        assert torch.equal(fresh.backbone.model.state_dict()[k].cpu(), trainer.backbone.model.state_dict()[k].cpu())


@pytest.mark.parametrize("name", ["CoOp", "IVLP", "MaPLe"])
def test_stacking_loads_medpromptclip_prompts(name, demo_root, tmp_path, capsys):
    from trainers.recipes import resolve, source_overrides

    # The source gets the stacked recipe's text prompt shape, as the few-shot sweep gives it.
    reshape = source_overrides(resolve("MedPromptCLIP", recipe("MedPromptCLIP", "base2new"), DEMO_CFG), name,
                               resolve(name, recipe(name, "stacked"), DEMO_CFG))
    assert bool(reshape) == (name == "IVLP")  # IVLP's paper setting has 4 text tokens, the others 6
    source = tmp_path / "medprompt"
    code, err = run_train("--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", source, "--seed", "1",
                          "OPTIM.MAX_EPOCH", "2", "TEST.NO_TEST", "True", *reshape, capsys=capsys)
    assert code == 0, err
    saved = torch.load(source / "prompt_learner" / "model.pth.tar-2", weights_only=False)["state_dict"]
    import train

    args = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
        "--config-file", recipe(name, "stacked"), "--output-dir", str(tmp_path / "stack"), "--init-from", str(source),
        "DATASET.NUM_SHOTS", "2", "DEVICE", "cpu",
    ])
    trainer = TRAINER_REGISTRY.get(name)(train.setup_cfg(args))
    text = trainer.prompt_learner if name == "CoOp" else trainer.prompt_learner.text
    assert torch.equal(text.ctx.detach().cpu(), saved["ctx"])
    if name != "CoOp":
        for i, p in enumerate(text.deep_ctx):
            assert torch.equal(p.detach().cpu(), saved[f"deep_ctx.{i}"])
    assert trainer.run_info["init_from"]["loaded"][0] == "ctx"

    out = tmp_path / "stack_run"
    code, err = run_train("--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe(name, "stacked"), "--output-dir", out, "--init-from", source,
                          "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1", capsys=capsys)
    assert code == 0, err
    assert read_results(out)["init_from"]["checkpoint"].endswith("model.pth.tar-2")
    # The log reports how fast images went through training and evaluation.
    log = (out / "log.txt").read_text()
    assert "images/s)" in log.split("] batch [", 1)[1].splitlines()[0]
    assert re.search(r"evaluated \d+ images in [\d.]+s \(\d+ images/s\)", log)


def test_stacking_shape_mismatch_is_one_clear_error(demo_root, tmp_path, capsys):
    source = tmp_path / "medprompt"
    code, _ = run_train("--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
                        "--config-file", recipe("MedPromptCLIP", "base2new"), "--output-dir", source,
                        "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True", capsys=capsys)
    assert code == 0
    out = tmp_path / "maple"
    code, err = run_train("--root", demo_root, "--trainer", "MaPLe", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("MaPLe", "base2new"), "--output-dir", out, "--init-from", source,
                          capsys=capsys)
    assert code == 2 and "has shape (6, 64) but MaPLe expects (2, 64)" in err
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("name", ["MaPLe", "IVLP"])
def test_visual_prompt_methods_on_a_timm_image_tower(name, demo_root, tmp_path):
    """BiomedCLIP's shape: timm ViT image tower and BERT text tower."""
    trainer = build(name, "tiny-timm-clip", demo_root, tmp_path, "OPTIM.WARMUP_EPOCH", "0")
    assert trainer.image_encoder.kind == "timm"
    trainer.before_train()
    trainer.set_model_mode("train")
    trainer.num_batches, trainer.batch_idx = 1, 0
    before = {k: v.clone() for k, v in trainable_state_dict(trainer.prompt_learner).items()}
    summary = trainer.forward_backward(next(iter(trainer.train_loader_x)))
    assert torch.isfinite(torch.tensor(summary["loss"]))
    vision = [k for k in before if k.startswith(("couplers", "vision"))]
    assert vision and all(not torch.equal(before[k], trainable_state_dict(trainer.prompt_learner)[k]) for k in vision)


def test_stacking_needs_a_medpromptclip_run(demo_root, tmp_path, capsys):
    coop = tmp_path / "coop"
    code, _ = run_train("--root", demo_root, "--trainer", "CoOp", "--dataset-config-file", DEMO_CFG,
                        "--config-file", recipe("CoOp", "stacked"), "--output-dir", coop, "DATASET.NUM_SHOTS", "1",
                        "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True", capsys=capsys)
    assert code == 0
    code, err = run_train("--root", demo_root, "--trainer", "CoOp", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("CoOp", "stacked"), "--output-dir", tmp_path / "x",
                          "--init-from", coop, "DATASET.NUM_SHOTS", "1", capsys=capsys)
    assert code == 2 and "is a CoOp run; give a MedPromptCLIP output folder" in err


def test_as_published_fewshot_run_is_evaluated_with_its_fine_tuned_encoder(demo_root, tmp_path, capsys):
    """The original few-shot mode: its checkpoint carries the trained encoder; --model-dir evaluation reuses it."""
    common = ["--root", demo_root, "--trainer", "IVLP", "--dataset-config-file", DEMO_CFG]
    out = tmp_path / "run"
    code, err = run_train(*common, "--config-file", recipe("IVLP", "as_published_fewshot"), "--output-dir", out,
                          "--seed", "1", "DATASET.NUM_SHOTS", "1", "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "1e-3", capsys=capsys)
    assert code == 0, err
    trained = read_results(out)
    assert trained["method"] == "IVLP (fine-tuned image encoder + token embedding)"
    saved = torch.load(out / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert any(k.startswith("image_tower.") for k in saved) and any(k.startswith("token_embedding.") for k in saved)

    again = tmp_path / "eval"
    code, err = run_train(*common, "--config-file", recipe("IVLP", "as_published_fewshot"), "--output-dir", again,
                          "--eval-only", "--model-dir", out, "DATASET.NUM_SHOTS", "1", capsys=capsys)
    assert code == 0, err
    evaluated = read_results(again)
    for key in ("accuracy", "macro_f1", "confusion_matrix"):
        assert evaluated[key] == trained[key]

    # A prompts-only recipe cannot take these weights: one line, no results.
    wrong = tmp_path / "wrong"
    code, err = run_train(*common, "--config-file", recipe("IVLP", "stacked"), "--output-dir", wrong,
                          "--eval-only", "--model-dir", out, "DATASET.NUM_SHOTS", "1", capsys=capsys)
    assert code == 2 and "FINETUNE_IMAGE_ENCODER True in the checkpoint" in err
    assert not (wrong / "results.json").exists()
