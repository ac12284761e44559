"""Print the dataset catalog and, with --root, what each dataset has on disk: ``python -m datasets [--root DIR]``.

Per dataset: where its split comes from (the dataset folder's own data_split.json,
else the paper's split shipped in datasets/splits/), how many of the images the
split lists are found, the folder they are read from, and the first one missing.
Datasets declared in data (DIR/<name>/dataset.yaml, configs/datasets/<name>.yaml)
are listed too. Nothing here imports torch.
"""
import argparse
import os
import sys

from tabulate import tabulate

from core.errors import UserError

from .catalog import CATALOG, GROUPS
from .declared import scan
from .split_files import (SPLIT_FILE, image_folder, image_presence, load_split_file, locate_split, missing_split_message,
                          shipped_split)


def status_of(root, entry):
    """(status, images found/listed, first missing path or None) of one dataset under ``root``."""
    path, kind = locate_split(root, entry)
    if entry.generated:
        return "drawn on first use", "-", None
    if path is None and entry.split_hint:
        return "no split: the published one is not shipped (see below)", "-", None
    if path is None:
        return f"no split: make_split after sorting images into {os.path.join(image_folder(root, entry), '<class>', '')}", "-", None
    try:
        split, _ = load_split_file(path)
    except UserError as e:
        return f"unreadable {SPLIT_FILE}: {e}", "-", None
    found, listed, first_missing = image_presence(root, entry, split)
    source = "own split" if kind == "own" else "split shipped"
    if not listed:
        state = "lists no images"
    elif found == listed:
        state = "images present"
    elif found == 0:
        state = "images missing"
    else:
        state = "images partly present"
    return f"{source}, {state}", f"{found}/{listed}", first_missing


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="", help="data root to check for each dataset's files")
    parser.add_argument("--format", default="simple", help="table format (tabulate), e.g. github")
    args = parser.parse_args(argv)
    declared, problems = scan(args.root)
    entries = list(CATALOG.values()) + declared
    rows, missing, unshipped = [], [], []
    for entry in entries:
        if args.root:
            status, images, first_missing = status_of(args.root, entry)
            rows.append([entry.name, entry.modality, entry.num_classes, status, images, image_folder(args.root, entry)])
            if first_missing:
                missing.append(f"  {entry.name}: {first_missing}")
            if status.startswith("no split: the published"):
                unshipped.append("  " + missing_split_message(args.root, entry, f"--dataset {entry.name}"))
        else:
            split = "shipped" if shipped_split(entry.name) and not entry.generated else "-"
            rows.append([entry.name, entry.modality, entry.num_classes, split,
                         os.path.join(entry.dataset_dir, entry.image_subdir, "")])
    if args.root:
        headers = ["dataset", "modality", "classes", "status", "images found/listed", "image folder"]
    else:
        headers = ["dataset", "modality", "classes", "paper's split", "image folder under the data root"]
    print(tabulate(rows, headers=headers, tablefmt=args.format))
    if missing:
        print("\nfirst missing image per dataset:")
        print("\n".join(missing))
    if unshipped:
        print("\nsplits to fetch:")
        print("\n".join(unshipped))
    print()
    print("groups: " + "; ".join(f"{g} ({len(names)})" for g, names in GROUPS.items()))
    if not args.root:
        print("pass --root DIR to check which images are present")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)


if __name__ == "__main__":
    main()
