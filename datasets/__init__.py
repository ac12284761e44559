"""The dataset catalog, datasets declared in data, and the one dataset class that reads them.

Importing this package is light (no torch): ``python -m datasets`` and the
split tool start at once. ``datasets.split_dataset`` (imported by the trainers)
defines ``SplitDataset`` and registers every catalog dataset in
``core.data.DATASET_REGISTRY``.
"""
from .catalog import CATALOG, GROUPS, get_entry, normalize_classname, readable_classname, resolve_target


def __getattr__(name):
    if name == "SplitDataset":
        from .split_dataset import SplitDataset

        return SplitDataset
    raise AttributeError(f"module 'datasets' has no attribute '{name}'")


__all__ = ["CATALOG", "GROUPS", "get_entry", "normalize_classname", "readable_classname", "resolve_target", "SplitDataset"]
