"""MedPromptCLIP's training epoch against a per-pair reference, on a ViT-B/16-size text tower.

    python benchmarks/medpromptclip_step.py [--pairs-timed 16]

The trainer encodes the description targets once per run, encodes each distinct class
prompt once per batch, and cuts every batch to its longest sequence. The reference does
what a straightforward implementation does: for each (class, description) pair it
encodes the prompt and the description at the full context and back-propagates. Both
use the same classes, prompts, targets and loss arithmetic; the script first asserts
that they give the same loss on the same pairs, then times them. The reference's epoch
is its measured time per pair times the number of pairs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _shapes  # noqa: E402
from _common import Timer, build_trainer, demo_root, write_descriptions  # noqa: E402


def reference_loss_and_backward(trainer, class_rows, description_rows):
    """Per pair: full-context prompt and target encodings, loss / n back-propagated pair by pair."""
    import torch
    import torch.nn.functional as F

    te, learner = trainer.text_encoder, trainer.prompt_learner
    tok = trainer.prompt_tokenizer
    n, total = len(class_rows), 0.0
    for c, d in zip(class_rows.tolist(), description_rows.tolist()):
        tokens = trainer.train_tokens.select([c])
        emb = te.embed(tokens.ids)
        from clipkit.prompt_layer import place

        emb = place(emb, tokens.ctx_mask, learner.ctx)
        prompted = F.normalize(te(emb, tokens.ids, tokens.ctx_mask, list(learner.deep_ctx), truncate=False).float(), dim=-1)
        with torch.no_grad():
            ids = tok([trainer.train_descriptions[d]]).to(trainer.device)
            target = F.normalize(te(te.embed(ids), ids, truncate=False).float(), dim=-1)
        loss = F.l1_loss(prompted, target) / n
        loss.backward()
        total += loss.item()
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs-timed", type=int, default=16, help="pairs of the reference that are timed")
    p.add_argument("--descriptions", type=int, default=50, help="descriptions per class")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    import torch

    _shapes.register()
    work = tempfile.mkdtemp(prefix="bench-step-")
    root = demo_root(os.path.join(work, "data"))
    desc = write_descriptions(os.path.join(work, "descriptions"), args.descriptions)
    trainer = build_trainer("MedPromptCLIP", "specific_modal", root, os.path.join(work, "out"), "bench-vit-b-16",
                            "DATASET.DESCRIPTIONS_DIR", desc, "TEST.FEATURE_CACHE", "''",
                            "DATALOADER.TRAIN_X.BATCH_SIZE", str(args.batch_size), "OPTIM.MAX_EPOCH", "1",
                            "TRAIN.PRINT_FREQ", "1000")
    logging.getLogger("medpromptclip").setLevel(logging.WARNING)
    trainer.max_epoch = 1
    with Timer() as targets:
        trainer.before_train()
    pairs = trainer.train_loader_x.pairs
    print(f"device: {_shapes.device_name()}")
    print(f"text tower: ViT-B/16 size (random weights), {len(trainer.train_rows)} classes x {args.descriptions} "
          f"descriptions = {len(pairs)} pairs, batch {args.batch_size}")

    # Same pairs, same loss: the trainer's batched step against the per-pair reference.
    sample = pairs[:args.pairs_timed]
    trainer.prompt_learner.zero_grad()
    batched = trainer.compute_loss(trainer.prompted_features(sample[:, 0].to(trainer.device)),
                                   trainer.description_features[sample[:, 1].to(trainer.device)])
    batched.backward()
    grads = [q.grad.clone() for q in trainer.prompt_learner.parameters()]
    trainer.prompt_learner.zero_grad()
    with Timer() as ref:
        reference = reference_loss_and_backward(trainer, sample[:, 0], sample[:, 1])
    assert abs(reference - batched.item()) <= 1e-5 * max(1.0, abs(reference)), (reference, batched.item())
    assert all(torch.allclose(a, q.grad, rtol=1e-3, atol=1e-6 * float(a.abs().max()))
               for a, q in zip(grads, trainer.prompt_learner.parameters()))
    print(f"loss on {len(sample)} pairs: trainer {batched.item():.6f}, reference {reference:.6f} (equal; gradients equal)")
    trainer.prompt_learner.zero_grad()

    with Timer() as epoch:
        trainer.run_epoch()
    per_pair = ref.seconds / len(sample)
    reference_epoch = per_pair * len(pairs)
    print(f"reference: {per_pair * 1000:.1f} ms per pair -> {reference_epoch:.1f} s per epoch ({len(pairs)} pairs)")
    print(f"trainer: epoch {epoch.seconds:.2f} s (+ {targets.seconds:.2f} s once per run for the {len(pairs)} targets)")
    print(f"ratio: epoch {reference_epoch / epoch.seconds:.0f}x; "
          f"epoch including the one-off target encoding {reference_epoch / (epoch.seconds + targets.seconds):.0f}x")


if __name__ == "__main__":
    main()
