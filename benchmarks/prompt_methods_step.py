"""Per-run cost of the image-trained prompt learners: build (teacher features), seconds per step, peak memory.

    python benchmarks/prompt_methods_step.py                               # demo-clip, demo recipes
    python benchmarks/prompt_methods_step.py --backbone bench-bert-b-16    # BiomedCLIP's size, random weights
    python benchmarks/prompt_methods_step.py --backbone bench-bert-b-16 --batch-size 4 --steps 3

Each method runs in its own process on the demo data: its trainer is built (with the published
few-shot recipe for the real-size backbone, the demo recipe for demo-clip; BiomedCoOp reads 50
descriptions per class for the real-size backbone), then one warm-up step and ``--steps`` timed
training steps at the recipe's batch size (or ``--batch-size``). Peak memory is measured above the
built trainer: torch.cuda.max_memory_allocated on CUDA, the peak resident memory on the CPU.
The last lines estimate the training time of BiomedCoOp's whole benchmark (few-shot 1-16 shots and
base-to-new, 3 seeds, 11 / 10 datasets, the published split sizes and recipes) from the measured
seconds per image.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _shapes  # noqa: E402
from _common import PeakMemory, build_trainer, demo_root, write_descriptions  # noqa: E402

METHODS = ("CoOp", "KgCoOp", "ProGrad", "BiomedCoOp")


def child(method, backbone, batch_size, steps, work):
    """One method's build and steps; prints a JSON line."""
    import logging

    import torch

    _shapes.register()
    root = demo_root(os.path.join(work, "data"))
    real = backbone != "demo-clip"
    opts = ["TEST.FEATURE_CACHE", "''", "TRAIN.PRINT_FREQ", "1000", "DATASET.NUM_SHOTS", "16"]
    if method == "BiomedCoOp" and real:
        opts += ["DATASET.DESCRIPTIONS_DIR", write_descriptions(os.path.join(work, "descriptions"), 50)]
    if batch_size:
        opts += ["DATALOADER.TRAIN_X.BATCH_SIZE", str(batch_size)]
    recipe = "vit_b16" if method == "CoOp" else ("fewshot" if real else "demo")
    start = time.perf_counter()
    trainer = build_trainer(method, recipe, root, os.path.join(work, f"out-{method}"), backbone, *opts)
    built = time.perf_counter() - start
    logging.getLogger("medpromptclip").setLevel(logging.WARNING)
    trainer.before_train()
    trainer.set_model_mode("train")
    trainer.num_batches, trainer.batch_idx = 10 ** 6, 0
    batches = iter(trainer.train_loader_x)
    batch = next(batches)
    trainer.forward_backward(batch)  # warm-up
    with PeakMemory(trainer.device) as memory:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.forward_backward(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    print(json.dumps({"method": method, "batch": len(batch["label"]), "build_s": built, "step_s": seconds,
                      "peak_bytes": memory.bytes, "device": _shapes.device_name()}))


# BiomedCoOp's benchmark: training images per class (published splits; OCTMNIST from its documentation).
SUITE_TRAIN = {
    "BTMRI": [660, 669, 728, 797], "BUSI": [218, 105, 66], "CHMNIST": [312] * 8,
    "COVID_19_BiomedCoOp": [1808, 3006, 672, 5096], "CTKidney": [1854, 688, 1141, 2538],
    "DermaMNIST": [227, 359, 769, 80, 779, 4693, 99], "KneeXray": [2286, 1046, 1516, 757, 173],
    "Kvasir": [250] * 8, "LungColon": [2500] * 5, "OCTMNIST": [1000] * 4, "RETINA": [549, 503, 519, 537],
}
# Published recipes: (batch, few-shot epochs, base-to-new epochs).
RECIPES = {"CoOp": (32, 100, 50), "KgCoOp": (128, 100, 50), "ProGrad": (128, 100, 50), "BiomedCoOp": (4, 100, 50)}


def suite_images(method, seeds=3, shots=(1, 2, 4, 8, 16)):
    """(training steps, training images) of the whole benchmark for one method (Dassl's drop_last rule)."""
    batch, fs_epochs, b2n_epochs = RECIPES[method]

    def run(n, epochs):
        per_epoch = n // batch if n >= batch else 1
        return per_epoch * epochs, per_epoch * epochs * min(batch, n)

    steps = images = 0
    for name, counts in SUITE_TRAIN.items():
        for k in shots:
            s, i = run(sum(min(k, c) for c in counts), fs_epochs)
            steps, images = steps + seeds * s, images + seeds * i
        if name != "BUSI":
            base = counts[:math.ceil(len(counts) / 2)]
            s, i = run(sum(min(16, c) for c in base), b2n_epochs)
            steps, images = steps + seeds * s, images + seeds * i
    return steps, images


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo-clip", help="demo-clip or bench-bert-b-16 (BiomedCLIP's size)")
    p.add_argument("--batch-size", type=int, default=0, help="images per step (default: the recipe's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--methods", default=" ".join(METHODS))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-methods-")
    if args.child:
        return child(args.child, args.backbone, args.batch_size, args.steps, work)
    results = []
    for method in args.methods.split():
        out = subprocess.run([sys.executable, __file__, "--child", method, "--backbone", args.backbone,
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device: {results[0]['device']}; backbone {args.backbone}")
    print(f"{'method':<12}{'batch':>6}{'build s':>9}{'s/step':>9}{'ms/image':>10}{'peak MiB':>10}")
    for r in results:
        print(f"{r['method']:<12}{r['batch']:>6}{r['build_s']:>9.1f}{r['step_s']:>9.3f}"
              f"{1000 * r['step_s'] / r['batch']:>10.1f}{r['peak_bytes'] / 2 ** 20:>10.0f}")
    print("BiomedCoOp's benchmark (few-shot 1-16 shots + base-to-new, 3 seeds), training only, at the "
          "measured seconds per image:")
    for r in results:
        steps, images = suite_images(r["method"])
        hours = images * r["step_s"] / r["batch"] / 3600
        print(f"  {r['method']:<12}{steps:>9} steps, {images:>10} images -> {hours:.1f} h")


if __name__ == "__main__":
    main()
