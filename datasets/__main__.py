"""Print the dataset catalog and, with --root, what each dataset has on disk: ``python -m datasets [--root DIR]``.

``python -m datasets --root DIR --check [--dataset NAME]`` also decodes every image the splits list
(in parallel, once: remembered by path, size and modification time) and checks that each dataset's
descriptions file covers its classes; it lists every problem with how to fix it and exits 1 if any.

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
                          outside_message,
                          shipped_split)


def status_of(root, entry):
    """(status, images found/listed, first missing path or None, error line or None) of one dataset under ``root``."""
    path, kind = locate_split(root, entry)
    if entry.generated:
        return "drawn on first use", "-", None, None
    if path is None and entry.split_hint:
        return "no split: the published one is not shipped (see below)", "-", None, None
    if path is None:
        return f"no split: make_split after sorting images into {os.path.join(image_folder(root, entry), '<class>', '')}", "-", None, None
    try:
        split, _ = load_split_file(path)
    except UserError as e:
        return f"unreadable {SPLIT_FILE}: {e}", "-", None, None
    found, listed, first_missing, outside = image_presence(root, entry, split)
    source = "own split" if kind == "own" else "split shipped"
    if outside:
        error = outside_message(entry, path, image_folder(root, entry), outside)
        return f"{source}, {len(outside)} row(s) lead outside the image folder", f"{found}/{listed}", first_missing, error
    if not listed:
        state = "lists no images"
    elif found == listed:
        state = "images present"
    elif found == 0:
        state = "images missing"
    else:
        state = "images partly present"
    return f"{source}, {state}", f"{found}/{listed}", first_missing, None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="", help="data root to check for each dataset's files")
    parser.add_argument("--format", default="simple", help="table format (tabulate), e.g. github")
    parser.add_argument("--check", action="store_true",
                        help="decode every listed image and check the descriptions files (needs --root)")
    parser.add_argument("--dataset", default="",
                        help="with --check: only this dataset or group (default: every dataset with images under --root)")
    args = parser.parse_args(argv)
    if args.check:
        try:
            return check(args.root, args.dataset)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    declared, problems = scan(args.root)
    entries = list(CATALOG.values()) + declared
    rows, missing, errors, unshipped = [], [], [], []
    for entry in entries:
        if args.root:
            status, images, first_missing, error = status_of(args.root, entry)
            if error:
                errors.append(error)
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
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def check(root, target=""):
    """``--check``: every problem of the datasets under ``root`` that would stop or spoil a run; exit status."""
    from .catalog import resolve_target
    from .check import check_data_root, descriptions_problem, how_to_get_descriptions, listed_image_paths, \
        undecodable_images
    from .declared import lookup

    if not root:
        raise UserError("--check needs --root DATA, the folder that holds your dataset folders")
    check_data_root(root)
    declared, scan_problems = scan(root)
    if target:
        if lookup(target, root) is None and target not in GROUPS:
            raise UserError(f"DATA={root} holds no dataset '{target}' (no {os.path.join(root, target, 'dataset.yaml')}) "
                            f"and it is not in the catalog; python -m datasets --root {root} lists what is there")
        entries = [CATALOG.get(n) or lookup(n, root) for n in resolve_target(target)]
    else:
        # Declared datasets, and catalog datasets with at least one image in place.
        entries = [e for e in list(CATALOG.values()) + declared if not e.generated and (e.declared_in or (
            locate_split(root, e)[0] and image_presence(root, e, load_split_file(locate_split(root, e)[0])[0])[0]))]
        if not entries:
            raise UserError(f"DATA={root} holds no dataset with images; python -m datasets --root {root} says what "
                            f"each dataset expects where")
    problems, notes, decoded = list(scan_problems), [], 0
    for entry in entries:
        if entry.generated:
            continue
        path, _ = locate_split(root, entry)
        if path is None:
            option = f"--folder {entry.name}" if entry.declared_in else f"--dataset {entry.name}"
            problems.append(f"{entry.name}: no split; sort its images into "
                            f"{os.path.join(image_folder(root, entry), '<class>', '')} and run "
                            f"python -m datasets.make_split --root {root} {option}")
            continue
        split, _ = load_split_file(path)
        paths = listed_image_paths(root, entry, split)
        bad = undecodable_images(root, paths)
        decoded += len(paths) - len(bad)
        for image, error in bad:
            fix = "put the file there" if error == "missing" else "replace the file with a readable copy"
            problems.append(f"{entry.name}: {image}: {error}; {fix} (or remove it and rerun make_split)")
        file, problem = descriptions_problem(entry.name, entry.classnames)
        if problem == "missing":
            notes.append(f"{entry.name}: no descriptions file {file}: MedPromptCLIP and description zero-shot cannot "
                         f"run on it; generate one: {how_to_get_descriptions(entry.name, root)}")
        elif problem:
            problems.append(f"{entry.name}: {problem}")
    print(f"checked {len(entries)} dataset(s) under DATA={root}: {decoded} image(s) decode")
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
