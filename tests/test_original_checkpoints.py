"""Prompts saved by the original CoOp, MaPLe and MedPromptCLIP code: evaluated and stacked on."""
import os
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, assert_close, read_results, recipe, run_train
from core.engine import TRAINER_REGISTRY
from core.errors import UserError

BACKBONE = "tiny-clip"
WIDTH = 64  # tiny-clip's text and vision width
TEXT_KEYS = ("transformer.", "positional_embedding", "ln_final.", "text_projection")


def dassl_save(run_dir, folder, state_dict, epoch=5, scheduler_extra=None):
    """Write a checkpoint the way Dassl does: a warmup scheduler keeps its successor scheduler object."""
    from torch.optim.lr_scheduler import CosineAnnealingLR

    holder = torch.nn.Linear(2, 2)
    optim = torch.optim.SGD(holder.parameters(), lr=0.1, momentum=0.9)
    holder(torch.ones(1, 2)).sum().backward()
    optim.step()
    scheduler = {"successor": CosineAnnealingLR(optim, 5), "warmup_epoch": 1, "cons_lr": 1e-5,
                 "base_lrs": [0.1], "last_epoch": epoch, **(scheduler_extra or {})}
    model_dir = os.path.join(run_dir, folder)
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, f"model.pth.tar-{epoch}")
    torch.save({"state_dict": OrderedDict(state_dict), "epoch": epoch, "optimizer": optim.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    with open(os.path.join(model_dir, "checkpoint"), "w") as f:
        f.write(f"model.pth.tar-{epoch}\n")
    return path


def frozen_clip(backbones):
    return {k: v.clone() for k, v in backbones(BACKBONE).model.state_dict().items()}


def text_encoder_keys(clip):
    return {f"text_encoder.{k}": v for k, v in clip.items() if k.startswith(TEXT_KEYS)}


def medpromptclip_state(backbones, n_ctx=6, depth=9):
    """VLPromptLearner/ of the original MedPromptCLIP: ctx, per-layer VPT_shallow, two copies of the frozen CLIP."""
    torch.manual_seed(3)
    clip = frozen_clip(backbones)
    state = {"prompt_learner.ctx": torch.randn(n_ctx, WIDTH) * 0.1}
    state.update({f"prompt_learner.clip_model_zs.{k}": v for k, v in clip.items()})
    state.update(text_encoder_keys(clip))
    for i in range(1, depth):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, WIDTH) * 0.1
    state["logit_scale"] = clip["logit_scale"]
    return state


def maple_state(backbones, n_ctx=2, depth=9, n_cls=6):
    """MultiModalPromptLearner/ of the original MaPLe: compound prompts, projections, buffers, the whole CLIP."""
    torch.manual_seed(4)
    clip = frozen_clip(backbones)
    state = {"prompt_learner.ctx": torch.randn(n_ctx, WIDTH) * 0.1,
             # The original keeps the first projection in half precision.
             "prompt_learner.proj.weight": (torch.randn(WIDTH, WIDTH) * 0.1).half(),
             "prompt_learner.proj.bias": torch.zeros(WIDTH).half(),
             "prompt_learner.token_prefix": torch.randn(n_cls, 1, WIDTH),
             "prompt_learner.token_suffix": torch.randn(n_cls, 77 - 1 - n_ctx, WIDTH)}
    for i in range(depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n_ctx, WIDTH) * 0.1
        state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(WIDTH, WIDTH) * 0.1
        state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(WIDTH) * 0.1
    state.update(text_encoder_keys(clip))
    state.update({f"image_encoder.{k[len('visual.'):]}": v for k, v in clip.items() if k.startswith("visual.")})
    state["logit_scale"] = clip["logit_scale"]
    return state


def coop_state(n_ctx=4, n_cls=6):
    torch.manual_seed(5)
    return {"ctx": torch.randn(n_ctx, WIDTH) * 0.1, "token_prefix": torch.randn(n_cls, 1, WIDTH),
            "token_suffix": torch.randn(n_cls, 77 - 1 - n_ctx, WIDTH)}


def build(name, config, demo_root, out, *args):
    import train

    parsed = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG, "--config-file", recipe(name, config),
        "--output-dir", str(out), *[str(a) for a in args], "MODEL.BACKBONE.NAME", BACKBONE,
        "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NUM_SHOTS", "1", "DEVICE", "cpu"])
    return TRAINER_REGISTRY.get(name)(train.setup_cfg(parsed))


def evaluate(name, config, demo_root, model_dir, out, capsys):
    return run_train("--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
                     "--config-file", recipe(name, config), "--output-dir", out, "--eval-only", "--model-dir", model_dir,
                     "MODEL.BACKBONE.NAME", BACKBONE, "DATASET.SUBSAMPLE_CLASSES", "base", "DEVICE", "cpu",
                     capsys=capsys)


def original_text_features(clip_model, ids, ctx, layer_prompts):
    """Text features computed as the original code does: context after the start token, and before
    each layer i in ``layer_prompts`` those positions replaced by its prompt."""
    n_ctx = ctx.shape[0]
    x = clip_model.token_embedding(ids)
    x = torch.cat([x[:, :1], ctx.expand(len(ids), -1, -1), x[:, 1 + n_ctx:]], dim=1)
    x = x + clip_model.positional_embedding
    for i, block in enumerate(clip_model.transformer.resblocks):
        if i in layer_prompts:
            x = torch.cat([x[:, :1], layer_prompts[i].expand(len(ids), -1, -1), x[:, 1 + n_ctx:]], dim=1)
        x = block(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    return F.normalize(x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ clip_model.text_projection, dim=-1)


def test_dassl_checkpoints_need_the_stand_ins(backbones, tmp_path):
    """A plain weights_only load refuses what Dassl writes (the pickled successor scheduler)."""
    path = dassl_save(tmp_path, "prompt_learner", coop_state())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    from clipkit.original_checkpoints import read_dassl_checkpoint

    assert torch.equal(read_dassl_checkpoint(path)["state_dict"]["ctx"], coop_state()["ctx"])


def test_original_medpromptclip_prompts_evaluate_as_the_original_computes_them(backbones, demo_root, tmp_path, capsys):
    state = medpromptclip_state(backbones)
    run = tmp_path / "original"
    path = dassl_save(run, "VLPromptLearner", state)
    trainer = build("MedPromptCLIP", "base2new", demo_root, tmp_path / "build")
    trainer.load_model(str(run))
    learner = trainer.prompt_learner
    assert torch.equal(learner.ctx.detach(), state["prompt_learner.ctx"])
    for i, p in enumerate(learner.deep_ctx):  # VPT_shallow of layer i + 1 is our deep prompt i
        assert torch.equal(p.detach(), state[f"text_encoder.transformer.resblocks.{i + 1}.VPT_shallow"])
    tokens = learner.tokens_for(trainer.classnames, trainer.dataset_entry.template)
    prompts = {i: state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, 9)}
    with torch.no_grad():
        expected = original_text_features(trainer.backbone.model, tokens.ids, state["prompt_learner.ctx"], prompts)
    assert_close(trainer.class_text_features(), expected)
    info = trainer.run_info["original_checkpoint"]
    assert info["method"] == "MedPromptCLIP" and info["checkpoint"] == path
    assert info["loaded"]["deep_ctx.0"] == "text_encoder.transformer.resblocks.1.VPT_shallow"
    assert info["ignored"]["frozen CLIP tensors"] == len(frozen_clip(backbones)) and info["frozen_clip_matches_backbone"]

    code, err = evaluate("MedPromptCLIP", "base2new", demo_root, run, tmp_path / "eval", capsys)
    assert code == 0, err
    results = read_results(tmp_path / "eval")
    assert results["original_checkpoint"]["method"] == "MedPromptCLIP" and 0 <= results["accuracy"] <= 100


def test_original_maple_checkpoint_maps_prompts_and_projections(backbones, demo_root, tmp_path, capsys):
    state = maple_state(backbones)
    run = tmp_path / "original"
    dassl_save(run, "MultiModalPromptLearner", state, epoch=2)
    trainer = build("MaPLe", "base2new", demo_root, tmp_path / "build")
    trainer.load_model(str(run))
    learner = trainer.prompt_learner
    assert torch.equal(learner.text.ctx.detach(), state["prompt_learner.ctx"])
    assert torch.equal(learner.couplers[0].weight.detach(), state["prompt_learner.proj.weight"].float())
    for i in range(8):
        assert torch.equal(learner.text.deep_ctx[i].detach(), state[f"prompt_learner.compound_prompts_text.{i}"])
        assert torch.equal(learner.couplers[i + 1].bias.detach(),
                           state[f"prompt_learner.compound_prompt_projections.{i}.bias"])
    ignored = trainer.run_info["original_checkpoint"]["ignored"]
    assert ignored["buffers"] == ["prompt_learner.token_prefix", "prompt_learner.token_suffix"]
    code, err = evaluate("MaPLe", "base2new", demo_root, run, tmp_path / "eval", capsys)
    assert code == 0, err
    assert read_results(tmp_path / "eval")["original_checkpoint"]["method"] == "MaPLe"
    code, err = evaluate("CoOp", "base2new", demo_root, run, tmp_path / "wrong", capsys)
    assert code == 2 and "prompts of the original MaPLe code; evaluate them with --trainer MaPLe" in err


def test_original_coop_checkpoint_evaluates(demo_root, tmp_path, capsys):
    state = coop_state()
    run = tmp_path / "original"
    dassl_save(run, "prompt_learner", state, epoch=50)
    code, err = evaluate("CoOp", "base2new", demo_root, run, tmp_path / "eval", capsys)
    assert code == 0, err
    record = read_results(tmp_path / "eval")["original_checkpoint"]
    assert record["method"] == "CoOp" and record["loaded"] == {"ctx": "ctx"}
    assert record["ignored"]["buffers"] == ["token_prefix", "token_suffix"]
    trainer = build("CoOp", "base2new", demo_root, tmp_path / "build")
    trainer.load_model(str(run))
    assert torch.equal(trainer.prompt_learner.ctx.detach(), state["ctx"])


@pytest.mark.parametrize("name", ["CoOp", "MaPLe"])
def test_stacking_on_original_medpromptclip_prompts(name, backbones, demo_root, tmp_path, capsys):
    state = medpromptclip_state(backbones)
    run = tmp_path / "original"
    dassl_save(run, "VLPromptLearner", state)
    trainer = build(name, "stacked", demo_root, tmp_path / "build", "--init-from", run)
    text = trainer.prompt_learner if name == "CoOp" else trainer.prompt_learner.text
    assert torch.equal(text.ctx.detach(), state["prompt_learner.ctx"])
    for i, p in enumerate(text.deep_ctx):
        assert torch.equal(p.detach(), state[f"text_encoder.transformer.resblocks.{i + 1}.VPT_shallow"])
    info = trainer.run_info["init_from"]
    assert info["original"]["method"] == "MedPromptCLIP" and info["loaded"][0] == "ctx"
    if name == "MaPLe":
        out = tmp_path / "stacked"
        code, err = run_train("--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
                              "--config-file", recipe(name, "stacked"), "--output-dir", out, "--init-from", run,
                              "MODEL.BACKBONE.NAME", BACKBONE, "DATASET.NUM_SHOTS", "1", "OPTIM.MAX_EPOCH", "1",
                              "TEST.NO_TEST", "True", "DEVICE", "cpu", capsys=capsys)
        assert code == 0, err
        assert read_results(out)["init_from"]["original"]["checkpoint"].endswith("VLPromptLearner/model.pth.tar-5")


def test_bad_original_checkpoints_are_one_clear_error(backbones, demo_root, tmp_path, capsys):
    cases = []
    unknown = medpromptclip_state(backbones)
    unknown["prompt_learner.something_else"] = torch.zeros(3)
    cases.append(("unknown", unknown, {}, "holds 'prompt_learner.something_else', which is neither a prompt"))
    shallow = medpromptclip_state(backbones, depth=3)
    cases.append(("shallow", shallow, {}, "has no deep_ctx.2, deep_ctx.3, deep_ctx.4 ... for this MedPromptCLIP run"))
    # A pickled object that no Dassl checkpoint holds is not unpickled.
    cases.append(("foreign", medpromptclip_state(backbones), {"module": torch.nn.Identity()},
                  "holds a pickled torch.nn.modules.linear.Identity"))
    for label, state, extra, message in cases:
        run = tmp_path / label
        dassl_save(run, "VLPromptLearner", state, scheduler_extra=extra)
        out = tmp_path / f"eval-{label}"
        code, err = evaluate("MedPromptCLIP", "base2new", demo_root, run, out, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (label, err)
        assert not (out / "results.json").exists()


def test_original_ivlp_and_cocoop_tensors_map(backbones, demo_root, tmp_path):
    torch.manual_seed(6)
    clip = frozen_clip(backbones)
    ivlp = {"prompt_learner.ctx": torch.randn(2, WIDTH), "image_encoder.VPT": torch.randn(2, WIDTH),
            "prompt_learner.token_prefix": torch.zeros(6, 1, WIDTH), "logit_scale": clip["logit_scale"]}
    for i in range(1, 9):
        ivlp[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(2, WIDTH)
        ivlp[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(2, WIDTH)
    ivlp.update({f"image_encoder.{k[len('visual.'):]}": v for k, v in clip.items() if k.startswith("visual.")})
    dassl_save(tmp_path / "ivlp", "VLPromptLearner", ivlp)
    trainer = build("IVLP", "base2new", demo_root, tmp_path / "build-ivlp",  # the checkpoint's depth 9
                    "TRAINER.IVLP.PROMPT_DEPTH_TEXT", 9, "TRAINER.IVLP.PROMPT_DEPTH_VISION", 9)
    trainer.load_model(str(tmp_path / "ivlp"))
    assert trainer.run_info["original_checkpoint"]["method"] == "IVLP"
    assert torch.equal(trainer.prompt_learner.vision[0].detach(), ivlp["image_encoder.VPT"])
    assert torch.equal(trainer.prompt_learner.vision[3].detach(), ivlp["image_encoder.transformer.resblocks.3.VPT_shallow"])
    assert torch.equal(trainer.prompt_learner.text.deep_ctx[0].detach(),
                       ivlp["text_encoder.transformer.resblocks.1.VPT_shallow"])

    cocoop = coop_state()
    cocoop.update({"meta_net.linear1.weight": torch.randn(4, 64), "meta_net.linear1.bias": torch.randn(4),
                   "meta_net.linear2.weight": torch.randn(WIDTH, 4), "meta_net.linear2.bias": torch.randn(WIDTH)})
    dassl_save(tmp_path / "cocoop", "prompt_learner", cocoop)
    trainer = build("CoCoOp", "base2new", demo_root, tmp_path / "build-cocoop")
    trainer.load_model(str(tmp_path / "cocoop"))
    assert trainer.run_info["original_checkpoint"]["method"] == "CoCoOp"
    assert torch.equal(trainer.prompt_learner.meta_net[2].weight.detach(), cocoop["meta_net.linear2.weight"])
    assert torch.equal(trainer.prompt_learner.text.ctx.detach(), cocoop["ctx"])


@pytest.mark.parametrize("frozen", ["another backbone", "none saved"])
def test_stacking_on_original_prompts_checks_their_frozen_clip(frozen, backbones, demo_root, tmp_path):
    state = medpromptclip_state(backbones)
    keep = ("prompt_learner.ctx", "VPT_shallow")
    if frozen == "another backbone":
        state = {k: v if any(part in k for part in keep) else v + 1 for k, v in state.items()}
        message = "the frozen CLIP saved in .* is not backbone tiny-clip"
    else:
        state = {k: v for k, v in state.items() if any(part in k for part in keep)}
        message = "holds no frozen CLIP to tell which backbone"
    run = tmp_path / "original"
    dassl_save(run, "VLPromptLearner", state)
    with pytest.raises(UserError, match=message) as info:
        build("CoOp", "stacked", demo_root, tmp_path / "build", "--init-from", run)
    assert "\n" not in str(info.value)
