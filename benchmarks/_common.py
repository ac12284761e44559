"""Building trainers for the benchmarks through train.py's own config path, on the demo data."""
from __future__ import annotations

import json
import os
import time

from _shapes import PROJECT_DIR

WORDS = ("bright", "dark", "small", "large", "round", "irregular", "scattered", "clustered", "central", "peripheral",
         "yellow", "red", "pale", "dense", "faint", "sharp", "blurred", "multiple", "single", "linear")


def demo_root(folder):
    from datasets.catalog import DEMO
    from datasets.demo import generate_demo

    path = os.path.join(folder, DEMO.dataset_dir)
    if not os.path.isfile(os.path.join(path, "data_split.json")):
        generate_demo(path)
    return folder


def write_descriptions(folder, per_class):
    """A demo descriptions file with ``per_class`` distinct descriptions of 12 to 30 words per class."""
    from datasets.catalog import DEMO

    data = {}
    for c, name in enumerate(DEMO.classnames):
        texts = []
        for i in range(per_class):
            words = [WORDS[(i * 7 + c * 3 + k * k) % len(WORDS)] for k in range(4 + (i * 5 + c) % 19)]
            texts.append(f"A synthetic image of {name.replace('_', ' ')} with " + " ".join(words) + " findings.")
        data[name] = texts
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    return folder


def build_trainer(trainer, recipe, root, output_dir, backbone, *opts, extra_args=()):
    from runs import build_trainer as build

    return build([
        "--root", root, "--trainer", trainer, "--seed", "1",
        "--dataset-config-file", os.path.join(PROJECT_DIR, "configs", "datasets", "demo.yaml"),
        "--config-file", os.path.join(PROJECT_DIR, "configs", "trainers", trainer, f"{recipe}.yaml"),
        "--output-dir", output_dir, *extra_args, "MODEL.BACKBONE.NAME", backbone, "VERBOSE", "False", *opts,
    ])


class Timer:
    """Wall time of a block; on CUDA it waits for the queued kernels at both ends."""

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def rss_bytes():
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory a block uses above what was in use when it started: torch.cuda.max_memory_allocated on
    CUDA, else the resident memory sampled every millisecond by a thread. ``device``: the torch device."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        self.before_rss, self.peak, self.stop = rss_bytes(), 0, threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.001)

        self.sampler = threading.Thread(target=sample, daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.stop.set()
        self.sampler.join()
        self.bytes = (torch.cuda.max_memory_allocated() - self.before if self.cuda
                      else max(self.peak, rss_bytes()) - self.before_rss)
