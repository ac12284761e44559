"""Registers every catalog dataset (and the synthetic demo) in ``DATASET_REGISTRY``."""
from core.data import DATASET_REGISTRY

from .catalog import CATALOG, GROUPS, get_entry, normalize_classname, readable_classname, resolve_target
from .demo import generate_demo
from .split_dataset import SplitDataset


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


for _entry in CATALOG.values():
    DATASET_REGISTRY.register(_factory(_entry), name=_entry.name)

__all__ = ["CATALOG", "GROUPS", "get_entry", "normalize_classname", "readable_classname", "resolve_target", "SplitDataset"]
