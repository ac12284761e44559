"""Per-run seconds of the feature-based methods with a cold and a warm image-feature cache.

    python benchmarks/feature_methods.py [--only demo|real]

For each of CLIP-Adapter, Tip-Adapter, Tip-Adapter-F, LP and LP++, two runs share one feature-cache
folder that starts empty: the cold run encodes every image it needs (the augmented views of the
few-shot training images, the validation and the evaluated images), as a method without the cache
would on every run; the warm run reads them all and encodes none. Timed: training and evaluation
(trainer.train() and trainer.test()); building the trainer (loading the backbone) is not. Both runs
must give the same accuracy. Settings:

- demo: demo-clip on the demo data, 4 shots, all 12 classes, the demo recipes, the test split (360 images).
- real: a random-weight model of BiomedCLIP's shape (ViT-B/16 image tower at 224 px, BERT-base text
  tower), 1 shot of the 6 base classes, evaluated on the validation split (6 images), the demo recipes
  with 2 epochs for CLIP-Adapter and Tip-Adapter-F (2 augmented views per image), so that it runs in a
  few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _shapes  # noqa: E402
from _common import Timer, build_trainer, demo_root  # noqa: E402

METHODS = ("CLIP-Adapter", "Tip-Adapter", "Tip-Adapter-F", "LP", "LP++")
SETTINGS = {
    "demo": ("demo-clip", ["DATASET.NUM_SHOTS", "4"], {}),
    "real": ("bench-bert-b-16", ["DATASET.NUM_SHOTS", "1", "DATASET.SUBSAMPLE_CLASSES", "base", "TEST.SPLIT", "val"],
             {"CLIP-Adapter": ["OPTIM.MAX_EPOCH", "2"], "Tip-Adapter-F": ["OPTIM.MAX_EPOCH", "2"]}),
}


def one_run(method, root, out, cache, backbone, opts):
    # The run's log goes to its log.txt; this script prints only its table.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = build_trainer(method, "demo", root, out, backbone, *opts, extra_args=("--feature-cache", cache))
    logging.getLogger("medpromptclip").setLevel(logging.WARNING)
    with Timer() as t:
        trainer.train()
        result = trainer.test()
    return t.seconds, result, trainer.run_info["images_encoded"], trainer.run_info["images_from_feature_cache"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(SETTINGS), help="run one setting only")
    args = p.parse_args()
    _shapes.register()
    work = tempfile.mkdtemp(prefix="bench-feature-methods-")
    root = demo_root(os.path.join(work, "data"))
    print(f"device: {_shapes.device_name()}")
    for setting, (backbone, opts, per_method) in SETTINGS.items():
        if args.only and setting != args.only:
            continue
        print(f"\n{setting} ({backbone}):")
        print(f"{'method':<14} {'cold s':>8} {'warm s':>8} {'cold/warm':>10} {'encoded cold':>13} {'encoded warm':>13} {'accuracy':>9}")
        for method in METHODS:
            cache = os.path.join(work, setting, method, "feature_cache")
            run_opts = opts + per_method.get(method, [])
            cold = one_run(method, root, os.path.join(work, setting, method, "cold"), cache, backbone, run_opts)
            warm = one_run(method, root, os.path.join(work, setting, method, "warm"), cache, backbone, run_opts)
            assert warm[2] == 0, f"{method}: the warm run encoded {warm[2]} images"
            assert cold[1]["accuracy"] == warm[1]["accuracy"], f"{method}: cold and warm runs differ"
            print(f"{method:<14} {cold[0]:>8.2f} {warm[0]:>8.2f} {cold[0] / warm[0]:>9.0f}x {cold[2]:>13} {warm[2]:>13} "
                  f"{cold[1]['accuracy']:>8.2f}%", flush=True)


if __name__ == "__main__":
    main()
