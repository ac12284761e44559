"""MedPromptCLIP: text-only training, base-to-new, checkpoints, exactness of the batched step."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, TINY_BACKBONES, assert_close, read_results, recipe, run_train
from datasets.catalog import DEMO
from datasets.demo import SPLIT_SIZES

B2N = recipe("MedPromptCLIP", "base2new")
FAST = ["OPTIM.MAX_EPOCH", "12", "OPTIM.WARMUP_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "48"]


def train_args(root, out, backbone, *extra):
    return ["--root", root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG, "--config-file", B2N,
            "--output-dir", out, "--seed", "1", "MODEL.BACKBONE.NAME", backbone, *FAST, "DEVICE", "cpu", *extra]


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_base_training_then_new_class_evaluation(tmp_path, demo_root, capsys, backbone):
    base_out, new_out = str(tmp_path / "base"), str(tmp_path / "new")
    code, err = run_train(*train_args(demo_root, base_out, backbone, "DATASET.SUBSAMPLE_CLASSES", "base"), capsys=capsys)
    assert code == 0, err
    base = read_results(base_out)
    assert base["subsample"] == "base" and base["classnames"] == list(DEMO.classnames[:6])
    assert base["num_samples"] == 6 * SPLIT_SIZES["test"] and 0 <= base["accuracy"] <= 100 and "macro_f1" in base
    log = open(os.path.join(base_out, "log.txt")).read()
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if "] batch [" in line]
    assert len(losses) >= 12 and losses[-1] < losses[0]

    code, err = run_train("--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", B2N, "--output-dir", new_out, "--eval-only", "--model-dir", base_out,
                          "MODEL.BACKBONE.NAME", backbone, "DATASET.SUBSAMPLE_CLASSES", "new", capsys=capsys)
    assert code == 0, err
    new = read_results(new_out)
    assert new["subsample"] == "new" and new["classnames"] == list(DEMO.classnames[6:]) and new["eval_only"]


def test_training_reads_no_image(tmp_path, demo_root, capsys):
    """With every image deleted (only data_split.json left) training still runs when evaluation is skipped."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(demo_root, "demo"), root / "demo", ignore=shutil.ignore_patterns("*.png"))
    assert not list((root / "demo").rglob("*.png"))
    out = str(tmp_path / "out")
    code, err = run_train(*train_args(str(root), out, "tiny-clip", "TEST.NO_TEST", "True"), capsys=capsys)
    assert code == 0, err
    results = read_results(out)
    assert results["accuracy"] is None and results["train_loss"]["loss"] > 0
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-12"))


def build_trainer(tmp_path, demo_root, backbone="tiny-clip", *opts):
    import train

    args = train.build_parser().parse_args(train_args(demo_root, str(tmp_path / "run"), backbone, *opts))
    cfg = train.setup_cfg(args)
    from core.engine import TRAINER_REGISTRY

    trainer = TRAINER_REGISTRY.get("MedPromptCLIP")(cfg)
    trainer.before_train()
    return trainer


def test_base_training_sees_no_new_class_text(tmp_path, demo_root):
    trainer = build_trainer(tmp_path, demo_root, "tiny-clip", "DATASET.SUBSAMPLE_CLASSES", "base")
    demo = json.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "llm_descriptions", "demo.json")))
    new_texts = {t for c in DEMO.classnames[6:] for t in demo[c]}
    base_texts = {t for c in DEMO.classnames[:6] for t in demo[c]}
    assert set(trainer.train_descriptions) == base_texts
    assert not new_texts & set(trainer.train_descriptions)
    assert {c for _, c in trainer.train_rows} == set(DEMO.classnames[:6])
    prompt_text = " ".join(trainer.train_tokens.texts)
    assert not any(c.replace("_", " ") in prompt_text for c in DEMO.classnames[6:])


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_batched_step_equals_per_pair_computation(tmp_path, demo_root, backbone, loss):
    trainer = build_trainer(tmp_path, demo_root, backbone, "TRAINER.MEDPROMPTCLIP.LOSS", loss,
                            "TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT", "3")
    learner = trainer.prompt_learner
    torch.manual_seed(0)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = next(iter(trainer.train_loader_x))
    rows, descs = batch["class_index"][:20], batch["description_index"][:20]
    assert len(torch.unique(rows)) < len(rows)  # several descriptions share a template

    learner.zero_grad()
    batched = trainer.compute_loss(trainer.prompted_features(rows), trainer.description_features[descs])
    batched.backward()
    grads_batched = [p.grad.clone() for p in learner.parameters()]

    learner.zero_grad()
    per_pair = []
    for r in rows.tolist():  # each pair encodes its own template
        f = learner(trainer.text_encoder, trainer.train_tokens.select([r]))
        per_pair.append(F.normalize(f, dim=-1))
    reference = trainer.compute_loss(torch.cat(per_pair), trainer.description_features[descs])
    reference.backward()
    # Equal up to float32 summation order.
    assert_close(batched, reference)
    for a, b in zip(grads_batched, (p.grad for p in learner.parameters())):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * float(a.abs().max()))


def test_description_targets_are_encoded_once(tmp_path, demo_root, monkeypatch):
    trainer = build_trainer(tmp_path, demo_root)
    calls = []
    original = trainer.backbone.model.encode_text
    monkeypatch.setattr(trainer.backbone.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer.train(0, 3)
    assert calls == []


def test_checkpoint_holds_only_prompts_and_round_trips(tmp_path, demo_root, capsys):
    out = str(tmp_path / "run")
    code, err = run_train(*train_args(demo_root, out, "tiny-clip", "TEST.NO_TEST", "True"), capsys=capsys)
    assert code == 0, err
    path = os.path.join(out, "prompt_learner", "model.pth.tar-12")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == {"ctx"} | {f"deep_ctx.{i}" for i in range(8)}
    assert ckpt["state_dict"]["ctx"].shape == (6, 64)
    assert os.path.getsize(path) < 100_000

    trainer = build_trainer(tmp_path / "fresh", demo_root)
    assert not torch.equal(trainer.prompt_learner.ctx, ckpt["state_dict"]["ctx"])
    trainer.load_model(out)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(trainer.prompt_learner.state_dict()[k], v)


def test_interrupted_run_resumes_to_the_same_prompts(tmp_path, demo_root, capsys, monkeypatch):
    from trainers.medpromptclip import MedPromptCLIP

    opts = ["TEST.NO_TEST", "True", "OPTIM.MAX_EPOCH", "6", "TRAIN.CHECKPOINT_FREQ", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "16"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run_train(*train_args(demo_root, straight, "tiny-clip", *opts), capsys=capsys)[0] == 0

    original = MedPromptCLIP.after_epoch

    def stop_after_three(self):
        original(self)
        if self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(MedPromptCLIP, "after_epoch", stop_after_three)
    assert run_train(*train_args(demo_root, resumed, "tiny-clip", *opts), capsys=capsys)[0] == 130
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    monkeypatch.setattr(MedPromptCLIP, "after_epoch", original)
    assert run_train(*train_args(demo_root, resumed, "tiny-clip", *opts), capsys=capsys)[0] == 0
    log = open(os.path.join(resumed, "log.txt")).read()
    assert "resumed prompt_learner from model.pth.tar-3" in log

    a = torch.load(os.path.join(straight, "prompt_learner", "model.pth.tar-6"), weights_only=False)["state_dict"]
    b = torch.load(os.path.join(resumed, "prompt_learner", "model.pth.tar-6"), weights_only=False)["state_dict"]
    for k in a:
        assert_close(a[k], b[k])

    # Resuming these checkpoints with another schedule is refused (in their own folder, another schedule is
    # another run: the old one is moved aside, see test_run_identity.py).
    code, err = run_train("--resume", resumed, *train_args(demo_root, str(tmp_path / "longer"), "tiny-clip", *opts[:2],
                                                           "OPTIM.MAX_EPOCH", "9"), capsys=capsys)
    assert code == 2 and "OPTIM.MAX_EPOCH 6 -> 9" in err


def test_multi_modal_pools_descriptions_and_transfers(tmp_path, demo_root, capsys):
    """Prompts trained on pooled descriptions evaluate on another dataset's classes."""
    trainer = build_trainer(tmp_path, demo_root, "tiny-clip", "TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES", "['demo', 'Head_CT']")
    assert {n for n, _ in trainer.train_rows} == {"demo", "Head_CT"}
    assert "a CT image of Brain bleeding." in trainer.train_tokens.texts
    code, err = run_train(*train_args(demo_root, str(tmp_path / "b"), "tiny-clip", "DATASET.SUBSAMPLE_CLASSES", "base",
                                      "TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES", "['eye']"), capsys=capsys)
    assert code == 2 and "base-to-new training reads only" in err


def test_one_backbone_copy_and_cached_image_features(tmp_path, demo_root):
    trainer = build_trainer(tmp_path, demo_root)
    backbone_storage = {p.data_ptr() for p in trainer.backbone.model.parameters()}
    for module in (trainer.text_encoder, trainer.image_encoder):
        assert {p.data_ptr() for p in module.parameters()} <= backbone_storage
    calls = []
    forward = trainer.image_encoder.forward
    trainer.image_encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    first = trainer.test()
    n = len(calls)
    second = trainer.test()
    assert n > 0 and len(calls) == n  # the second evaluation encodes no image
    assert first["accuracy"] == second["accuracy"]


def test_mixed_precision_on_cpu_runs_and_fp16_needs_cuda(tmp_path, demo_root, capsys):
    out = str(tmp_path / "amp")
    code, err = run_train(*train_args(demo_root, out, "tiny-clip", "TRAINER.MEDPROMPTCLIP.PREC", "amp",
                                      "OPTIM.MAX_EPOCH", "2"), capsys=capsys)
    assert code == 0, err
    assert "precision amp on cpu" in open(os.path.join(out, "log.txt")).read()
    trainer = build_trainer(tmp_path, demo_root, "tiny-clip", "TRAINER.MEDPROMPTCLIP.PREC", "amp")
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu")
        feats = trainer.prompted_features(torch.tensor([0, 1]))
    assert feats.dtype == torch.float32  # normalized outside autocast for the loss
    if not torch.cuda.is_available():
        code, err = run_train(*train_args(demo_root, str(tmp_path / "fp16"), "tiny-clip",
                                          "TRAINER.MEDPROMPTCLIP.PREC", "fp16"), capsys=capsys)
        assert code == 2 and "PREC fp16 needs a CUDA device" in err
