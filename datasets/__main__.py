"""Print the dataset catalog: ``python -m datasets [--root DIR]``."""
import argparse
import os

from tabulate import tabulate

from .catalog import CATALOG, GROUPS
from .split_dataset import SPLIT_FILE, dataset_folder


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__)
    parser.add_argument("--root", default="", help="data root to check for each dataset's files")
    parser.add_argument("--format", default="simple", help="table format (tabulate), e.g. github")
    args = parser.parse_args(argv)
    rows = []
    for entry in CATALOG.values():
        if args.root:
            folder = dataset_folder(args.root, entry)
            if os.path.isfile(os.path.join(folder, SPLIT_FILE)):
                present = "yes"
            elif entry.generated:
                present = "on first use"
            elif os.path.isdir(folder):
                present = f"no {SPLIT_FILE}"
            else:
                present = "no"
        else:
            present = "-"
        rows.append([entry.name, entry.modality, entry.num_classes, entry.dataset_dir, present])
    print(tabulate(rows, headers=["dataset", "modality", "classes", "folder", "data present"], tablefmt=args.format))
    print()
    print("groups: " + "; ".join(f"{g} ({len(names)})" for g, names in GROUPS.items()))
    if not args.root:
        print("pass --root DIR to check which datasets are present")


if __name__ == "__main__":
    main()
