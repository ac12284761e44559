"""One training step of BiomedCoOp, KgCoOp and ProGrad against the methods' definitions.

The reference side uses none of the trainers' code or the prompt layer: text features come from the
backbone's own ``encode_text`` with the context embeddings swapped in by a hook on its token
embedding, image features from ``encode_image``, and each loss is written out from its definition.
The trainer's returned loss and the gradient it leaves on its context must match.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, recipe
from datasets.catalog import readable_classname

BACKBONE = "tiny-clip"


def build(name, demo_root, out, *opts):
    import runs

    return runs.build_trainer([
        "--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
        "--config-file", recipe(name, "demo"), "--output-dir", str(out), "--seed", "1",
        "MODEL.BACKBONE.NAME", BACKBONE, "DATASET.NUM_SHOTS", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "6",
        "DEVICE", "cpu", "OPTIM.WARMUP_EPOCH", "0", *opts,
    ])


def one_batch(trainer, relabel=None):
    trainer.before_train()
    trainer.set_model_mode("train")
    torch.manual_seed(0)
    batch = next(iter(trainer.train_loader_x))
    if relabel is not None:
        batch["label"] = relabel(batch["img"])
    return batch


class Reference:
    """The backbone's own encoders; the first n_ctx tokens after start-of-text replaced by ``ctx``."""

    def __init__(self, trainer):
        self.model = trainer.backbone.model
        self.tokenizer = trainer.backbone.tokenizer
        self.scale = self.model.logit_scale.exp().item()

    def encode(self, texts):
        return self.model.encode_text(self.tokenizer(texts), normalize=True)

    def prompted(self, texts, ctx):
        def swap(module, inputs, output):
            output = output.clone()
            output[:, 1:1 + ctx.shape[0]] = ctx
            return output

        handle = self.model.token_embedding.register_forward_hook(swap)
        try:
            return self.encode(texts)
        finally:
            handle.remove()

    def images(self, images):
        with torch.no_grad():
            return self.model.encode_image(images, normalize=True)


def run_step(trainer, batch):
    """The trainer's step: (summary, context before the step, gradient it left)."""
    ctx = trainer.prompt_learner.ctx
    before = ctx.detach().clone()
    trainer.num_batches, trainer.batch_idx = 2, 0
    summary = trainer.forward_backward(batch)
    return summary, before, ctx.grad.detach().clone()


def close(a, b, what):
    # float32 through a 12-layer tower: agreement to 1e-4 of the values' size.
    scale = max(float(torch.as_tensor(b).abs().max()), 1e-3)
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-4 * scale), what


def class_prompts(trainer):
    return [f"a photo of a {readable_classname(c)}." for c in trainer.classnames]


# ------------------------------------------------------------------------------------------- BiomedCoOp


def test_biomedcoop_step_matches_its_definition(demo_root, tmp_path):
    from clipkit.descriptions import load_descriptions

    lam_sccm, lam_kd, tau, n_prompts = 50.0, 5.0, 0.75, 12
    trainer = build("BiomedCoOp", demo_root, tmp_path, "TRAINER.BIOMEDCOOP.SCCM_LAMBDA", str(lam_sccm),
                    "TRAINER.BIOMEDCOOP.KDSP_LAMBDA", str(lam_kd), "TRAINER.BIOMEDCOOP.TAU", str(tau))
    batch = one_batch(trainer)
    summary, ctx0, grad = run_step(trainer, batch)

    ref = Reference(trainer)
    images, labels = batch["img"], batch["label"]
    ctx = ctx0.clone().requires_grad_(True)
    t = ref.prompted(class_prompts(trainer), ctx)
    f = ref.images(images)
    s = ref.scale
    z = s * f @ t.t()
    descriptions = load_descriptions("demo", trainer.classnames)
    with torch.no_grad():
        feats = torch.stack([ref.encode(d[:n_prompts]) for d in descriptions])  # (C, P, D)
    C, P = feats.shape[:2]
    # Pruning by the definition: a prompt set's score is the batch mean of its best class logit.
    scores = [(s * f @ feats[:, i].t()).max(dim=1).values.mean().item() for i in range(P)]
    mean = sum(scores) / P
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / (P - 1))
    keep = [i for i in range(P) if abs(scores[i] - mean) <= tau * std]
    assert 0 < len(keep) < P, "the test needs a batch where pruning drops some prompt sets"
    assert summary["kept_prompts"] == len(keep)
    teacher_text = F.normalize(feats[:, keep].mean(dim=1), dim=-1)
    zt = s * f @ teacher_text.t()
    sccm_target = F.normalize(feats.mean(dim=1), dim=-1)

    ce = F.cross_entropy(z, labels)
    sccm = ((t - sccm_target) ** 2).sum() / (C * t.shape[1])
    q, p = F.softmax(zt, dim=1), F.softmax(z, dim=1)
    kl = (q * (q.log() - p.log())).sum() / (len(labels) * C)
    loss = ce + lam_sccm * sccm + lam_kd * kl
    (expected_grad,) = torch.autograd.grad(loss, ctx)

    close(summary["loss"], loss.item(), "loss")
    close(summary["sccm"], sccm.item(), "SCCM")
    close(summary["kd"], kl.item(), "KDSP")
    close(grad, expected_grad, "gradient")
    # The direction and scaling are what the test pins: the reverse KL and batchmean differ.
    kl_reverse = (p * (p.log() - q.log())).sum() / (len(labels) * C)
    assert abs(kl_reverse.item() - kl.item()) > 1e-3 * kl.item()
    assert C > 1 and abs(kl.item() * C - kl.item()) > 1e-3 * kl.item()


def test_biomedcoop_text_dropout_switch(demo_root, tmp_path):
    """TEXT_DROPOUT True: the learned prompts' features are computed with the text tower's dropout on."""
    trainer = build("BiomedCoOp", demo_root, tmp_path, "MODEL.BACKBONE.NAME", "tiny-bert-clip",
                    "TRAINER.BIOMEDCOOP.TEXT_DROPOUT", "True")
    modes = []
    handle = trainer.text_encoder.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    summary, _, _ = run_step(trainer, one_batch(trainer))
    handle.remove()
    assert math.isfinite(summary["loss"]) and modes == [True]
    assert not trainer.text_encoder.training
    torch.manual_seed(0)
    a, b = trainer.student_text_features(), trainer.student_text_features()
    assert not torch.allclose(a, b)  # dropout: two passes differ
    assert torch.equal(trainer.class_text_features(), trainer.class_text_features())


def test_biomedcoop_needs_enough_descriptions(demo_root, tmp_path):
    from core.errors import UserError

    with pytest.raises(UserError, match=r"BiomedCoOp uses 50 descriptions per class, but .*demo.json has 12 for"):
        build("BiomedCoOp", demo_root, tmp_path, "TRAINER.BIOMEDCOOP.N_PROMPTS", "50")


# ------------------------------------------------------------------------------------------- KgCoOp


def test_kgcoop_step_matches_its_definition(demo_root, tmp_path):
    w = 3.0
    trainer = build("KgCoOp", demo_root, tmp_path, "TRAINER.KGCOOP.W", str(w))
    batch = one_batch(trainer)
    summary, ctx0, grad = run_step(trainer, batch)

    ref = Reference(trainer)
    ctx = ctx0.clone().requires_grad_(True)
    t = ref.prompted(class_prompts(trainer), ctx)
    f = ref.images(batch["img"])
    with torch.no_grad():
        template = trainer.dataset_entry.template
        anchor = ref.encode([template.format(readable_classname(c)) for c in trainer.classnames])
    ce = F.cross_entropy(ref.scale * f @ t.t(), batch["label"])
    kg = sum(((t[c] - anchor[c]) ** 2).sum() for c in range(len(t))) / len(t)
    loss = ce + w * kg
    (expected_grad,) = torch.autograd.grad(loss, ctx)
    assert kg.item() > 1e-3  # the anchor prompt differs from the learned one
    close(summary["loss"], loss.item(), "loss")
    close(summary["kg"], kg.item(), "distance")
    close(grad, expected_grad, "gradient")


# ------------------------------------------------------------------------------------------- ProGrad


def zero_shot_logits(trainer, ref, images):
    template = trainer.dataset_entry.template
    with torch.no_grad():
        text = ref.encode([template.format(readable_classname(c)) for c in trainer.classnames])
        return ref.scale * ref.images(images) @ text.t()


@pytest.mark.parametrize("teacher", ["zero-shot", "student"])
def test_prograd_step_matches_its_definition(teacher, demo_root, tmp_path):
    T, lam = 2.0, 1.0
    trainer = build("ProGrad", demo_root, tmp_path, "TRAINER.PROGRAD.T", str(T), "TRAINER.PROGRAD.TEACHER", teacher)
    ref = Reference(trainer)
    # Labels the zero-shot model finds least likely: the cross-entropy gradient then conflicts with it.
    batch = one_batch(trainer, relabel=lambda images: zero_shot_logits(trainer, ref, images).argmin(dim=1))
    summary, ctx0, grad = run_step(trainer, batch)

    ctx = ctx0.clone().requires_grad_(True)
    t = ref.prompted(class_prompts(trainer), ctx)
    z = ref.scale * ref.images(batch["img"]) @ t.t()
    zt = zero_shot_logits(trainer, ref, batch["img"]) if teacher == "zero-shot" else z.detach()
    ce = F.cross_entropy(z, batch["label"])
    kl = (F.softmax(zt / T, dim=1) * -F.log_softmax(z / T, dim=1)).sum(dim=1).mean() * T * T
    (g_ce,) = torch.autograd.grad(ce, ctx, retain_graph=True)
    (g_kl,) = torch.autograd.grad(kl, ctx)
    dot = (g_ce * g_kl).sum()
    if teacher == "zero-shot":
        assert dot < 0, "the test needs a conflicting step"
        expected = g_ce - lam * dot / (g_kl * g_kl).sum() * g_kl
        assert abs((expected * g_kl).sum()) <= 1e-4 * g_ce.norm() * g_kl.norm()  # nothing left against g_kl
    else:
        # The published BiomedCLIP variant: the teacher is the student, whose pull on itself is nil.
        assert g_kl.norm() <= 1e-5 * g_ce.norm()
        expected = g_ce
    close(summary["loss"], ce.item(), "cross-entropy")
    close(summary["kl"], kl.item(), "distillation")
    close(grad, expected, "projected gradient")
    if teacher == "zero-shot":
        assert not torch.allclose(grad, g_ce, rtol=1e-3, atol=1e-3 * float(g_ce.abs().max()))


def test_projection_on_hand_made_vectors():
    from trainers.prograd import project

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert torch.allclose(project(a, b, 1.0), torch.tensor([0.5, 0.5]))
    assert torch.allclose(project(a, b, 0.5), torch.tensor([0.75, 0.25]))
    assert torch.equal(project(a, torch.tensor([1.0, 1.0]), 1.0), a)  # no conflict: unchanged
