"""Make ``data_split.json`` from a class-per-folder image tree with the paper's split algorithm.

    python -m datasets.make_split --root DATA --dataset NCT       # a catalog dataset
    python -m datasets.make_split --root DATA --folder MyData     # a dataset of your own

Class folders are sorted by name (for --folder, label = position in that order;
for --dataset, the catalog's label of the folder's class name, matched ignoring
case, underscores and spaces). Each class's files (sub-folders included, hidden
files left out) are sorted by relative path and split with
``sklearn.model_selection.train_test_split(files, test_size=0.3, random_state=42)``;
the held-out 30% is split again with ``test_size=0.5, random_state=42`` into
val (first part) and test (second part). Rows are ``[class/file, label, class]``.
Rebuilt from the same files, 13 of the 22 splits shipped in datasets/splits/
come back byte for byte; the other 9 (ODIR, ODIR_3x200, f1000images and
modaldiff, whose rows differ; Head_CT, MIAS, OCT_C8, SLID_E and SLO, not one
folder per class) were made otherwise, so use the shipped file for them.

--dataset reads DATA/<dataset folder>/<image subfolder>/<class>/; --folder reads
DATA/MyData/<class>/ and also writes DATA/MyData/dataset.yaml, the declaration
that lets every trainer, sweep and tool use the dataset by its name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from core.errors import UserError
from core.utils import atomic_open

from .catalog import CATALOG, MODALITY_TEMPLATES, get_entry, normalize_classname
from .split_files import IMAGE_EXTENSIONS, SPLIT_FILE, dataset_folder, image_folder, own_split_path
# The paper's split: 70% train, then the held-out 30% halved into val and test.
PAPER_RATIOS = (0.7, 0.15, 0.15)
PAPER_SEED = 42
# Folders the project itself writes next to the class folders.
SKIPPED_FOLDERS = {"split_fewshot"}
DEFAULT_TEMPLATE = "a medical image of {}."


def class_folders(image_dir):
    """Sorted class folder names of a class-per-folder tree."""
    if not os.path.isdir(image_dir):
        raise UserError(f"image folder not found: {image_dir}; put one sub-folder of images per class there")
    names = sorted(
        n for n in os.listdir(image_dir)
        if os.path.isdir(os.path.join(image_dir, n)) and not n.startswith(".") and n not in SKIPPED_FOLDERS
    )
    if not names:
        raise UserError(f"no class folders in {image_dir}; put one sub-folder of images per class there")
    return names


def class_files(class_dir, images_only=False):
    """Sorted file paths relative to ``class_dir`` ('/'-separated), hidden files and folders left out."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if images_only and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            files.append(os.path.relpath(os.path.join(dirpath, name), class_dir).replace(os.sep, "/"))
    return sorted(files)


def split_files(files, ratios=PAPER_RATIOS, seed=PAPER_SEED, what="class"):
    """(train, val, test) lists of one class, in the order train_test_split returns them."""
    from sklearn.model_selection import train_test_split

    train_r, val_r, test_r = ratios
    # Rounded so that 0.7/0.15/0.15 gives exactly the paper's 0.3 and 0.5.
    held_out = round(val_r + test_r, 6)
    try:
        if held_out == 0:
            return list(files), [], []
        train, rest = train_test_split(files, test_size=held_out, random_state=seed)
        if val_r == 0 or test_r == 0:
            return train, (rest if test_r == 0 else []), (rest if val_r == 0 else [])
        val, test = train_test_split(rest, test_size=round(test_r / held_out, 6), random_state=seed)
    except ValueError:
        raise UserError(
            f"{what} has {len(files)} file(s), too few to split {train_r:g}/{val_r:g}/{test_r:g} "
            f"(at least 4 are needed for the default); add images or remove the class"
        ) from None
    return train, val, test


def build_split(image_dir, label_of, ratios=PAPER_RATIOS, seed=PAPER_SEED, images_only=False):
    """``{train, val, test: rows}`` for the class folders of ``image_dir``; ``label_of(folder)`` gives the label."""
    split = {"train": [], "val": [], "test": []}
    folders = class_folders(image_dir)
    labels = [label_of(folder) for folder in folders]  # every folder name checked before any file is read
    for folder, label in zip(folders, labels):
        files = class_files(os.path.join(image_dir, folder), images_only)
        if not files:
            raise UserError(f"class folder {os.path.join(image_dir, folder)} holds no files")
        parts = split_files(files, ratios, seed, what=f"class folder {os.path.join(image_dir, folder)}")
        for key, part in zip(("train", "val", "test"), parts):
            split[key] += [[f"{folder}/{name}", label, folder] for name in part]
    return split


def write_split(path, split):
    """Written as the shipped splits are (compact JSON), so an identical split has the same sha256."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(split, separators=(",", ":")))


def check_ratios(ratios):
    if len(ratios) != 3 or abs(sum(ratios) - 1.0) > 1e-6 or any(r < 0 for r in ratios) or ratios[0] == 0:
        raise UserError(f"split ratios must be three non-negative numbers summing to 1, train above 0, not {tuple(ratios)}")


def make_split(root, dataset, ratios=PAPER_RATIOS, seed=PAPER_SEED, overwrite=False, images_only=False):
    """Write a catalog dataset's split file; return ``{split: number of rows}``."""
    check_ratios(ratios)
    entry = get_entry(dataset)
    image_dir = image_folder(root, entry)
    out = own_split_path(root, entry)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    label_by_key = {normalize_classname(c): i for i, c in enumerate(entry.classnames)}

    def label_of(folder):
        key = normalize_classname(folder)
        if key not in label_by_key:
            raise UserError(
                f"folder '{folder}' in {image_dir} is not a class of {entry.name}; classes: {', '.join(entry.classnames)}"
            )
        return label_by_key[key]

    split = build_split(image_dir, label_of, ratios, seed, images_only)
    present = {row[1] for rows in split.values() for row in rows}
    missing = [c for i, c in enumerate(entry.classnames) if i not in present]
    if missing:
        raise UserError(
            f"no images for class(es) {', '.join(missing)} of {entry.name}: "
            f"expected folders {os.path.join(image_dir, '<class>', '')} for every class"
        )
    write_split(out, split)
    return {k: len(v) for k, v in split.items()}


def make_folder_dataset(root, folder, modality="", template="", descriptions="", ratios=PAPER_RATIOS,
                        seed=PAPER_SEED, overwrite=False, images_only=False):
    """Write DATA/<folder>/data_split.json and dataset.yaml for a class-per-folder tree; return the row counts."""
    import yaml

    from .declared import make_entry

    check_ratios(ratios)
    if folder in CATALOG:
        raise UserError(f"'{folder}' is a catalog dataset; use --dataset {folder}")
    data_dir = os.path.join(os.path.abspath(os.path.expanduser(root)), folder)
    out = os.path.join(data_dir, SPLIT_FILE)
    declaration = os.path.join(data_dir, "dataset.yaml")
    for path in (out, declaration):
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
    classes = class_folders(data_dir)
    if not template and modality not in MODALITY_TEMPLATES:
        template = f"a {modality} image of {{}}." if modality else DEFAULT_TEMPLATE
    # Validates the name, the class names and the template before anything is written.
    entry = make_entry(folder, classes, modality, template, descriptions, where=declaration)
    split = build_split(data_dir, classes.index, ratios, seed, images_only)
    write_split(out, split)
    fields = {"name": entry.name, "modality": entry.modality, "template": entry.template,
              "classnames": list(entry.classnames)}
    if descriptions:
        fields["descriptions"] = descriptions
    with atomic_open(declaration, "w", encoding="utf-8") as f:
        f.write("# Dataset declaration written by python -m datasets.make_split; edit freely.\n"
                "# classnames are in label order (the labels of data_split.json); descriptions (optional)\n"
                "# is a {classname: [descriptions]} file, relative to this folder.\n")
        yaml.safe_dump(fields, f, sort_keys=False, allow_unicode=True)
    return {k: len(v) for k, v in split.items()}


def non_images(path):
    """Listed files that are not images by extension (the paper's tool listed every file)."""
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    return [r[0] for rows in split.values() for r in rows if os.path.splitext(r[0])[1].lower() not in IMAGE_EXTENSIONS]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets.make_split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="data root (DATASET.ROOT)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", help="catalog dataset name")
    which.add_argument("--folder", help="folder under --root of a dataset of your own; its name is the dataset's name")
    parser.add_argument("--modality", default="", help="--folder: imaging modality, e.g. fundus or dermoscopy")
    parser.add_argument("--template", default="",
                        help="--folder: zero-shot prompt with {} for the class name (default: the catalog modality's, "
                             "else 'a <modality> image of {}.')")
    parser.add_argument("--descriptions", default="",
                        help="--folder: descriptions file {classname: [descriptions]}, relative to the dataset folder")
    parser.add_argument("--ratios", type=float, nargs=3, default=PAPER_RATIOS, metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions (default: the paper's 0.7 0.15 0.15)")
    parser.add_argument("--seed", type=int, default=PAPER_SEED, help="random_state of train_test_split (default: the paper's 42)")
    parser.add_argument("--images-only", action="store_true",
                        help="list only files with an image extension (the paper's splits list every file)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        if args.dataset:
            counts = make_split(args.root, args.dataset, tuple(args.ratios), args.seed, args.overwrite, args.images_only)
            folder = dataset_folder(args.root, get_entry(args.dataset))
        else:
            counts = make_folder_dataset(args.root, args.folder, args.modality, args.template, args.descriptions,
                                         tuple(args.ratios), args.seed, args.overwrite, args.images_only)
            folder = os.path.join(os.path.abspath(os.path.expanduser(args.root)), args.folder)
    except (UserError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    out = os.path.join(folder, SPLIT_FILE)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.folder:
        print(f"wrote {os.path.join(folder, 'dataset.yaml')}; use it with --dataset-config-file or by name "
              f"(e.g. bash scripts/base2new.sh {args.folder} with DATA={args.root})")
    others = non_images(out)
    if others:
        print(f"warning: {len(others)} listed file(s) are not images by extension (e.g. {others[0]}); "
              f"rerun with --images-only --overwrite to leave them out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
