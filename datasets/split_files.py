"""Where a dataset's split comes from and what it lists, without importing torch.

A split is ``{"train"|"val"|"test": [[relative_image_path, label, classname], ...]}``.
The dataset folder's own ``data_split.json`` wins; otherwise the split the
paper used, shipped as ``datasets/splits/<name>.json.gz``, is read.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os

from core.errors import UserError

SPLIT_FILE = "data_split.json"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".gif"}
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


def dataset_folder(root, entry):
    return os.path.join(os.path.abspath(os.path.expanduser(root)), entry.dataset_dir)


def image_folder(root, entry):
    """The folder the split's relative image paths start from."""
    folder = dataset_folder(root, entry)
    return os.path.join(folder, entry.image_subdir) if entry.image_subdir else folder


def own_split_path(root, entry):
    """Where the dataset folder's own split file is (data_split.json unless the row names another)."""
    return os.path.join(dataset_folder(root, entry), entry.split_file or SPLIT_FILE)


def missing_split_message(root, entry, option):
    """What to do when a dataset has no split: fetch the published one (if its row says where) or make one."""
    make = (f"put its images in one folder per class, {os.path.join(image_folder(root, entry), '<class>', '')}, "
            f"and run python -m datasets.make_split --root {root} {option}")
    if entry.split_hint:
        return (f"no split for {entry.name}: {entry.split_hint.format(path=own_split_path(root, entry))}; "
                f"or {make} (a split of its own, not the published one)")
    return f"no split for {entry.name}: {make}"


def shipped_split(name):
    """Path of the shipped split of dataset ``name``, or None."""
    path = os.path.join(SHIPPED_DIR, f"{name}.json.gz")
    return path if os.path.isfile(path) else None


def locate_split(root, entry):
    """(path, kind) of the split a run reads: kind "own" or "shipped"; (None, None) if there is none."""
    own = own_split_path(root, entry)
    if os.path.isfile(own):
        return own, "own"
    shipped = shipped_split(entry.name)
    if shipped and not entry.generated:
        return shipped, "shipped"
    return None, None


def load_split_file(path):
    """(split object, sha256 of its JSON text) from a ``.json`` or ``.json.gz`` file.

    The digest is of the uncompressed text, so a shipped split and the same
    file unpacked into a dataset folder have the same sha256.
    """
    if not os.path.isfile(path):
        raise UserError(f"split file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
        return json.loads(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()
    except json.JSONDecodeError as e:
        raise UserError(f"split file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or regenerate it") from None
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise UserError(f"split file {path} cannot be read ({type(e).__name__}); fix or regenerate it") from None


def is_image(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def split_paths(split):
    """Every relative image path a split lists (train, val, test), in order.

    Malformed rows and files that are not images (the paper's Breast_Ultrasound
    split lists three .zip files) are skipped, as runs skip them.
    """
    paths = []
    if isinstance(split, dict):
        for key in ("train", "val", "test"):
            rows = split.get(key)
            if isinstance(rows, list):
                paths += [r[0] for r in rows if isinstance(r, (list, tuple)) and r and isinstance(r[0], str) and is_image(r[0])]
    return paths


def image_presence(root, entry, split):
    """(found, listed, first missing absolute path or None) for the images a split lists."""
    base = image_folder(root, entry)
    paths = split_paths(split)
    found, first_missing = 0, None
    for rel in paths:
        path = os.path.join(base, rel)
        if os.path.isfile(path):
            found += 1
        elif first_missing is None:
            first_missing = path
    return found, len(paths), first_missing
