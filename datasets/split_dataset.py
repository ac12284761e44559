"""One dataset class for every benchmark: reads ``<root>/<dataset_dir>/data_split.json``.

The split file maps ``train``/``val``/``test`` to rows
``[relative_image_path, label, classname]``; paths are relative to
``<root>/<dataset_dir>/<image_subdir>``.
"""
from __future__ import annotations

import hashlib
import os

from core.data import FEWSHOT_DIR, DatasetBase, Datum, FolderGuard, load_or_sample_fewshot, subsample_classnames
from core.errors import UserError
from core.utils import logger, read_json

from .catalog import normalize_classname

SPLIT_FILE = "data_split.json"


def dataset_folder(root, entry):
    return os.path.join(os.path.abspath(os.path.expanduser(root)), entry.dataset_dir)


def read_split_rows(split_path, entry):
    """Validated ``{split: [(relpath, label, classname)]}`` from a split file."""
    split = read_json(split_path, what="split file")
    if not isinstance(split, dict) or "train" not in split or "test" not in split:
        raise UserError(f"split file {split_path} must be a JSON object with keys train, val and test")
    expected = [normalize_classname(c) for c in entry.classnames]
    rows_by_split = {}
    for key in ("train", "val", "test"):
        rows = split.get(key, [])
        if not isinstance(rows, list):
            raise UserError(f"split file {split_path}: '{key}' must be a list of [relative_path, label, classname] rows")
        checked = []
        for i, row in enumerate(rows):
            if (not isinstance(row, (list, tuple)) or len(row) != 3 or not isinstance(row[0], str)
                    or isinstance(row[1], bool) or not isinstance(row[1], int) or not isinstance(row[2], str)):
                raise UserError(
                    f"split file {split_path}: {key} row {i} is {row!r}; each row must be [relative_path, label, classname]"
                )
            path, label, classname = row
            if not 0 <= label < len(expected):
                raise UserError(
                    f"split file {split_path}: {key} row {i} has label {label}, but {entry.name} has "
                    f"{len(expected)} classes (labels 0..{len(expected) - 1})"
                )
            if normalize_classname(classname) != expected[label]:
                raise UserError(
                    f"split file {split_path}: {key} row {i} says label {label} is '{classname}', but label {label} "
                    f"of {entry.name} is '{entry.classnames[label]}'; fix the row or the catalog"
                )
            checked.append((path, label, classname))
        rows_by_split[key] = checked
    return rows_by_split


def check_rows_inside(split_path, image_dir, rows_by_split):
    """Raise a UserError naming the first row whose path leads outside ``image_dir`` (links resolved)."""
    guard = FolderGuard(image_dir)
    for key, rows in rows_by_split.items():
        for i, (path, _, _) in enumerate(rows):
            if guard.resolve(path) is None:
                raise UserError(
                    f"split file {split_path}: {key} row {i} path {path[:120]!r} leads outside the image folder "
                    f"{image_dir}; rows must be paths inside it, without '..' or links to elsewhere"
                )


class SplitDataset(DatasetBase):
    """A catalog entry's images, few-shot sampled and base/new subsampled as configured."""

    def __init__(self, cfg, entry):
        self.entry = entry
        self.dataset_dir = entry.dataset_dir
        root = cfg.DATASET.ROOT
        if not root:
            raise UserError("DATASET.ROOT is not set; pass --root <folder holding the datasets>")
        folder = dataset_folder(root, entry)
        self.prepare(cfg, folder)
        split_path = os.path.join(folder, SPLIT_FILE)
        if not os.path.isdir(os.path.dirname(folder)):
            raise UserError(f"data root not found: {os.path.dirname(folder)}; check --root / DATASET.ROOT")
        if not os.path.isdir(folder):
            raise UserError(
                f"dataset folder not found: {folder}; put {entry.name} there with its {SPLIT_FILE} "
                f"(python -m datasets.make_split builds one from a class-per-folder image tree)"
            )
        if not os.path.isfile(split_path):
            raise UserError(
                f"split file missing: {split_path}; put the images in one folder per class under "
                f"{os.path.join(folder, entry.image_subdir)} and run "
                f"python -m datasets.make_split --root {root} --dataset {entry.name}"
            )
        rows = read_split_rows(split_path, entry)
        with open(split_path, "rb") as f:
            split_digest = hashlib.sha1(f.read()).hexdigest()
        image_dir = os.path.join(folder, entry.image_subdir) if entry.image_subdir else folder
        check_rows_inside(split_path, image_dir, rows)
        to_datum = lambda items: [Datum(os.path.join(image_dir, p), y, 0, c, split_path) for p, y, c in items]
        train, val, test = to_datum(rows["train"]), to_datum(rows["val"]), to_datum(rows["test"])
        if not train and not test:
            raise UserError(f"split file {split_path} has no train and no test rows")

        num_shots = cfg.DATASET.NUM_SHOTS
        if num_shots >= 1:
            seed = cfg.SEED if cfg.SEED >= 0 else 1
            cache = os.path.join(folder, FEWSHOT_DIR, f"shot_{num_shots}-seed_{seed}.json")
            train, val = load_or_sample_fewshot(self, cache, train, val, num_shots, seed, split_digest, image_dir=image_dir)

        subsample = cfg.DATASET.SUBSAMPLE_CLASSES
        # Cut on the catalog's labels, so a class without rows cannot shift the names of the others.
        train, val, test = self.subsample_classes(train, val, test, subsample=subsample,
                                                  labels=range(entry.num_classes))
        classnames = self.subsample_classnames(subsample)
        logger.info(
            f"dataset {entry.name}: {len(classnames)} classes ({subsample}), "
            f"train {len(train)}, val {len(val)}, test {len(test)}"
        )
        super().__init__(train_x=train, val=val, test=test, classnames=classnames)

    def prepare(self, cfg, folder):
        """Hook for datasets that create their files on first use."""

    def subsample_classnames(self, subsample):
        return subsample_classnames(self.entry.classnames, subsample)
