"""Text encoding cut to the longest sequence of the batch against the full context.

    python benchmarks/truncation.py [--repeats 3]

1. Time of encoding MedPromptCLIP's class prompts (12 classes, 6 context tokens, deep
   prompts to depth 9) on a ViT-B/16-size native text tower (context 77) and a
   BiomedCLIP-shaped BERT-base tower (context 256), with and without truncation.
2. Peak memory of MedPromptCLIP on the BERT tower (target encoding and one training
   epoch), each mode in its own process. On the CPU it is the peak resident memory,
   sampled every millisecond, above the resident memory after the model is built;
   on CUDA it is torch.cuda.max_memory_allocated above the memory before the work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _shapes  # noqa: E402
from _common import PeakMemory, Timer, build_trainer, demo_root, write_descriptions  # noqa: E402


def memory_child(truncate, work):
    """One MedPromptCLIP epoch on the BERT tower; prints the peak memory above the built model as JSON."""
    import functools
    import logging

    from clipkit.prompt_layer import TextEncoder

    if not truncate:
        TextEncoder.forward = functools.partialmethod(TextEncoder.forward, truncate=False)
    _shapes.register()
    root = demo_root(os.path.join(work, "data"))
    desc = write_descriptions(os.path.join(work, "descriptions"), 4)
    trainer = build_trainer("MedPromptCLIP", "specific_modal", root, os.path.join(work, f"out-{truncate}"),
                            "bench-bert-b-16", "DATASET.DESCRIPTIONS_DIR", desc, "TEST.FEATURE_CACHE", "''",
                            "DATALOADER.TRAIN_X.BATCH_SIZE", "256", "OPTIM.MAX_EPOCH", "1", "TRAIN.PRINT_FREQ", "1000")
    logging.getLogger("medpromptclip").setLevel(logging.WARNING)
    trainer.max_epoch = 1
    start = time.perf_counter()
    with PeakMemory(trainer.device) as memory:
        trainer.before_train()
        trainer.run_epoch()
    seconds = time.perf_counter() - start
    print(json.dumps({"bytes": memory.bytes, "seconds": seconds, "pairs": len(trainer.train_loader_x.pairs)}))


def time_prompts(name, repeats):
    import torch

    from clipkit.backbones import load_backbone
    from datasets.catalog import DEMO
    from clipkit.prompt_layer import PromptLearner, PromptTokenizer, TextEncoder, place

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb = load_backbone(name)
    bb.model.to(device)
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    torch.manual_seed(0)
    learner = PromptLearner(te, tok, n_ctx=6, depth=9).to(device)
    tokens = learner.tokens_for(list(DEMO.classnames), DEMO.template).to(device)
    times, feats = {}, {}
    with torch.no_grad():
        for truncate in (True, False):
            best = float("inf")
            for _ in range(repeats):
                with Timer() as t:
                    x = place(te.embed(tokens.ids), tokens.ctx_mask, learner.ctx)
                    feats[truncate] = te(x, tokens.ids, tokens.ctx_mask, list(learner.deep_ctx), truncate=truncate)
                best = min(best, t.seconds)
            times[truncate] = best
    assert torch.allclose(feats[True], feats[False], atol=1e-4, rtol=1e-4)
    used = te.used_length(tokens.ids)
    return times, used, bb.context_length, len(tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
    p.add_argument("--memory-child", choices=("truncated", "full"), help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child == "truncated", args.work)
        return
    _shapes.register()
    print(f"device: {_shapes.device_name()}")
    for name, label in (("bench-vit-b-16", "ViT-B/16 native text tower"), ("bench-bert-b-16", "BERT-base text tower")):
        times, used, context, n = time_prompts(name, args.repeats)
        print(f"{label}: {n} class prompts cut to {used} of {context} positions: truncated {times[True] * 1000:.0f} ms, "
              f"full context {times[False] * 1000:.0f} ms -> {times[False] / times[True]:.1f}x faster (features equal)")
    work = tempfile.mkdtemp(prefix="bench-trunc-")
    memory = {}
    for mode in ("truncated", "full"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", mode, "--work", work],
                             capture_output=True, text=True, check=True).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])
    t, f = memory["truncated"], memory["full"]
    print(f"MedPromptCLIP on the BERT-base tower ({t['pairs']} pairs, targets + 1 epoch): peak memory "
          f"truncated {t['bytes'] / 2**20:.0f} MiB, full context {f['bytes'] / 2**20:.0f} MiB -> "
          f"{f['bytes'] / max(t['bytes'], 1):.1f}x lower; time {t['seconds']:.1f} s vs {f['seconds']:.1f} s")


if __name__ == "__main__":
    main()
