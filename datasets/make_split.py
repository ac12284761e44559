"""Make a stratified 70/15/15 ``data_split.json`` from a class-per-folder image tree.

    python -m datasets.make_split --root DATA --dataset ODIR

scans ``DATA/<dataset folder>/<image subfolder>/<class name>/**/<image>`` (folder
names matched to the catalog's class names ignoring case, underscores and
spaces) and writes ``DATA/<dataset folder>/data_split.json``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

from core.errors import UserError
from core.utils import write_json_atomic

from .catalog import get_entry, normalize_classname
from .split_dataset import SPLIT_FILE, dataset_folder

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def make_split(root, dataset, ratios=(0.7, 0.15, 0.15), seed=1, overwrite=False):
    """Write the split file; return ``{split: number of rows}``."""
    entry = get_entry(dataset)
    folder = dataset_folder(root, entry)
    image_dir = os.path.join(folder, entry.image_subdir) if entry.image_subdir else folder
    out = os.path.join(folder, SPLIT_FILE)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not os.path.isdir(image_dir):
        raise UserError(f"image folder not found: {image_dir}; put one sub-folder of images per class there")
    if abs(sum(ratios) - 1.0) > 1e-6 or any(r < 0 for r in ratios):
        raise UserError(f"split ratios must be non-negative and sum to 1, not {ratios}")
    label_of = {normalize_classname(c): i for i, c in enumerate(entry.classnames)}
    found = {}
    for name in sorted(os.listdir(image_dir)):
        path = os.path.join(image_dir, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        key = normalize_classname(name)
        if key not in label_of:
            raise UserError(
                f"folder '{name}' in {image_dir} is not a class of {entry.name}; "
                f"classes: {', '.join(entry.classnames)}"
            )
        files = []
        for dirpath, _, filenames in os.walk(path):
            files += [
                os.path.relpath(os.path.join(dirpath, f), image_dir)
                for f in filenames if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
        found[label_of[key]] = sorted(files)
    missing = [entry.classnames[i] for i in range(entry.num_classes) if not found.get(i)]
    if missing:
        raise UserError(f"no images for class(es) {', '.join(missing)} under {image_dir}")
    rng = random.Random(seed)
    split = {"train": [], "val": [], "test": []}
    for label in sorted(found):
        files = found[label]
        rng.shuffle(files)
        n = len(files)
        n_train = int(round(ratios[0] * n))
        n_val = int(round(ratios[1] * n))
        n_val = min(n_val, n - n_train)
        parts = {"train": files[:n_train], "val": files[n_train:n_train + n_val], "test": files[n_train + n_val:]}
        for key, items in parts.items():
            split[key] += [[p.replace(os.sep, "/"), label, entry.classnames[label]] for p in sorted(items)]
    write_json_atomic(out, split, indent=None)
    return {k: len(v) for k, v in split.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets.make_split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="data root (DATASET.ROOT)")
    parser.add_argument("--dataset", required=True, help="catalog dataset name")
    parser.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        counts = make_split(args.root, args.dataset, tuple(args.ratios), args.seed, args.overwrite)
    except (UserError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"wrote {SPLIT_FILE}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
