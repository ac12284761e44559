"""One dataset class for every benchmark: reads ``<root>/<dataset_dir>/data_split.json``.

The split file maps ``train``/``val``/``test`` to rows
``[relative_image_path, label, classname]``; paths are relative to
``<root>/<dataset_dir>/<image_subdir>``. Without that file the paper's split
shipped in ``datasets/splits/`` is read (see ``datasets/split_files.py``).
Importing this module registers every catalog dataset.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter

from core.data import DATASET_REGISTRY, FEWSHOT_DIR, DatasetBase, Datum, FolderGuard, load_or_sample_fewshot, subsample_classnames
from core.errors import UserError
from core.utils import logger

from .catalog import CATALOG, normalize_classname
from .declared import entry_for_cfg
from .demo import generate_demo
from .split_files import (SPLIT_FILE, dataset_folder, image_folder, is_image, load_split_file, locate_split,  # noqa: F401
                          missing_split_message)


def read_split_rows(split_path, entry, split=None):
    """Validated ``{split: [(relpath, label, classname)]}`` from a split file (or its already loaded content)."""
    if split is None:
        split, _ = load_split_file(split_path)
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
        if not os.path.isdir(os.path.dirname(folder)):
            raise UserError(f"data root not found: {os.path.dirname(folder)}; check --root / DATASET.ROOT")
        image_dir = image_folder(root, entry)
        split_path, kind = locate_split(root, entry)
        if split_path is None:
            option = f"--dataset {entry.name}" if entry.name in CATALOG else f"--folder {entry.dataset_dir}"
            raise UserError(missing_split_message(root, entry, option))
        split, split_digest = load_split_file(split_path)
        rows = read_split_rows(split_path, entry, split)
        check_rows_inside(split_path, image_dir, rows)
        others = [r[0] for key in rows for r in rows[key] if not is_image(r[0])]
        if others:
            # Listed by the tool that made the split, but no image can be read from them.
            logger.info(f"{split_path}: {len(others)} listed file(s) are not images (e.g. {others[0]}); left out")
            rows = {key: [r for r in items if is_image(r[0])] for key, items in rows.items()}
        listed = [r[0] for key in ("train", "val", "test") for r in rows[key]]
        which = "shipped split" if kind == "shipped" else "split"
        if not os.path.isdir(image_dir):
            example = os.path.join(image_dir, listed[0]) if listed else os.path.join(image_dir, "<class>", "<image>")
            raise UserError(
                f"images of {entry.name} not found: the {which} {split_path} lists them under "
                f"{os.path.join(image_dir, '')} (e.g. {example}); put them there "
                f"(python -m datasets --root {root} shows what is found)"
            )
        missing = [p for p in listed if not os.path.isfile(os.path.join(image_dir, p))]
        if missing:
            # Not an error here: text-only training reads no image; reading a missing one is.
            warnings.warn(
                f"{len(missing)} of the {len(listed)} images the {which} {split_path} lists are missing under "
                f"{os.path.join(image_dir, '')} (first: {missing[0]})",
                stacklevel=2,
            )
        # Which split a run read, for results.json: the dataset folder's own file or the shipped one.
        self.split_source, self.split_file, self.split_sha256 = kind, split_path, split_digest
        self.image_dir = image_dir
        to_datum = lambda items: [Datum(os.path.join(image_dir, p), y, 0, c, split_path) for p, y, c in items]
        train, val, test = to_datum(rows["train"]), to_datum(rows["val"]), to_datum(rows["test"])
        if not train and not test:
            raise UserError(f"split file {split_path} has no train and no test rows")

        num_shots = cfg.DATASET.NUM_SHOTS
        if num_shots >= 1:
            self.warn_short_classes(train, num_shots, cfg.DATASET.SUBSAMPLE_CLASSES)
            seed = cfg.SEED if cfg.SEED >= 0 else 1
            # One draw per shots and seed, shared by the few-shot and base-to-new runs. Datasets sharing a
            # folder (COVID_19 and COVID_19_BiomedCoOp) keep their draws apart.
            fewshot_dir = os.path.join(folder, FEWSHOT_DIR, *([entry.name] if entry.name != entry.dataset_dir else []))
            cache = os.path.join(fewshot_dir, f"shot_{num_shots}-seed_{seed}.json")
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

    def warn_short_classes(self, train, num_shots, subsample):
        """One warning naming the used classes with fewer training images than the shots asked for."""
        counts = Counter(d.label for d in train)
        kept = subsample_classnames(list(range(self.entry.num_classes)), subsample)
        short = [(self.entry.classnames[y], counts.get(y, 0)) for y in kept if counts.get(y, 0) < num_shots]
        if short:
            warnings.warn(
                f"DATASET.NUM_SHOTS {num_shots}: "
                + ", ".join(f"class '{c}' has {n} training image(s), all {n} used" for c, n in short),
                stacklevel=2,
            )

    def prepare(self, cfg, folder):
        """Hook for datasets that create their files on first use."""

    def subsample_classnames(self, subsample):
        return subsample_classnames(self.entry.classnames, subsample)


class DemoDataset(SplitDataset):
    def prepare(self, cfg, folder):
        generate_demo(folder)


def _factory(entry):
    cls = DemoDataset if entry.generated else SplitDataset

    def build(cfg):
        return cls(cfg, entry)

    build.__name__ = entry.name
    build.entry = entry
    return build


def build_declared(cfg):
    """A dataset declared in data (datasets/declared.py), found from the config."""
    return SplitDataset(cfg, entry_for_cfg(cfg))


def register_declared(name):
    """Make ``DATASET_REGISTRY.get(name)`` build the declared dataset ``name``."""
    if name not in DATASET_REGISTRY:
        DATASET_REGISTRY.register(build_declared, name=name)


for _entry in CATALOG.values():
    DATASET_REGISTRY.register(_factory(_entry), name=_entry.name)
