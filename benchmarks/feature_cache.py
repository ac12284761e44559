"""Evaluation with the image-feature cache against evaluation that encodes the images.

    python benchmarks/feature_cache.py [--split val]

Two ZeroShotCLIP runs on the demo data with a ViT-B/16-size image tower (random
weights), sharing one empty feature-cache folder: the first run encodes every image of
the split and stores the features, the second reads them and skips the image encoder.
Only evaluation (trainer.test()) is timed; both runs must give the same accuracy.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _shapes  # noqa: E402
from _common import Timer, build_trainer, demo_root  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=("val", "test"), help="split evaluated (demo: val 60, test 180 images)")
    p.add_argument("--backbone", default="bench-vit-b-16")
    args = p.parse_args()
    _shapes.register()
    work = tempfile.mkdtemp(prefix="bench-cache-")
    root = demo_root(os.path.join(work, "data"))
    cache = os.path.join(work, "feature_cache")
    results, seconds = [], []
    for run in ("first", "second"):
        trainer = build_trainer("ZeroShotCLIP", "template", root, os.path.join(work, run), args.backbone,
                                "TEST.SPLIT", args.split, extra_args=("--eval-only", "--feature-cache", cache))
        logging.getLogger("medpromptclip").setLevel(logging.WARNING)
        with Timer() as t:
            results.append(trainer.test())
        seconds.append(t.seconds)
        state = trainer.run_info["feature_cache"][args.split]
        print(f"{run} evaluation: {t.seconds:.2f} s, {results[-1]['num_samples']} images, "
              f"{state['encoded']} encoded, {state['from_cache']} from the cache")
    assert results[0]["accuracy"] == results[1]["accuracy"]
    print(f"device: {_shapes.device_name()}")
    print(f"ratio: the cached evaluation is {seconds[0] / seconds[1]:.0f}x faster (same accuracy, "
          f"{results[0]['accuracy']:.2f}%)")


if __name__ == "__main__":
    main()
