"""Datasets declared in data, not code.

A dataset outside the catalog is declared by a file next to its split,
``DATASET.ROOT/<name>/dataset.yaml`` (or ``dataset.json``)::

    name: MyData
    modality: dermoscopy                     # a catalog modality gives the template
    template: "a dermoscopy image of {}."    # "{}" is the class name
    classnames: [benign, melanoma]           # in label order
    descriptions: descriptions.json          # optional; relative to this file

or by the same keys under ``DATASET`` (``NAME``, ``MODALITY``, ``TEMPLATE``,
``CLASSNAMES``, ``DESCRIPTIONS_FILE``) in ``configs/datasets/<name>.yaml``.
``python -m datasets.make_split --root DATA --folder MyData`` writes the
declaration and the split for a class-per-folder image tree. Nothing here
imports torch.
"""
from __future__ import annotations

import json
import os

import yaml

from core.errors import UserError

from .catalog import CATALOG, DECLARED, GROUPS, MODALITY_TEMPLATES, CatalogEntry, normalize_classname

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(PROJECT_DIR, "configs", "datasets")
DECLARATION_FILES = ("dataset.yaml", "dataset.yml", "dataset.json")
KEYS = ("name", "modality", "template", "classnames", "descriptions")


def make_entry(name, classnames, modality="", template="", descriptions="", where=""):
    """A validated entry for a declared dataset; ``where`` names the declaring file in errors."""
    if not isinstance(name, str) or not name.strip() or name != os.path.basename(name) or name.startswith("."):
        raise UserError(f"{where}: name must be the dataset's folder name (no '/'), not {name!r}")
    if name in CATALOG:
        raise UserError(
            f"{where}: '{name}' is a catalog dataset; it needs no declaration (rename yours to declare a new one)"
        )
    if name in GROUPS:
        raise UserError(f"{where}: '{name}' names a group of catalog datasets; give your dataset another name")
    if (not isinstance(classnames, (list, tuple)) or not classnames
            or not all(isinstance(c, str) and c.strip() for c in classnames)):
        raise UserError(f"{where}: classnames must be a non-empty list of class names in label order")
    keys = [normalize_classname(c) for c in classnames]
    duplicates = sorted({c for c, k in zip(classnames, keys) if keys.count(k) > 1})
    if duplicates:
        raise UserError(f"{where}: class names {duplicates} are the same once case and underscores are ignored")
    if not isinstance(modality, str) or not isinstance(template, str) or not isinstance(descriptions, str):
        raise UserError(f"{where}: modality, template and descriptions must be strings")
    template = template or MODALITY_TEMPLATES.get(modality, "")
    if not template:
        raise UserError(
            f"{where}: give a template such as \"a {modality or 'medical'} image of {{}}.\" "
            f"(modality '{modality}' has none; catalog modalities: {', '.join(MODALITY_TEMPLATES)})"
        )
    if "{}" not in template:
        raise UserError(f"{where}: template '{template}' has no '{{}}' for the class name")
    return CatalogEntry(
        name=name, modality=modality or "custom", classnames=tuple(classnames), dataset_dir=name,
        template=template, descriptions=descriptions, declared_in=where,
    )


def read_declaration(path):
    """The entry a ``dataset.yaml``/``dataset.json`` declares (registered in ``DECLARED``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"dataset declaration {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise UserError(f"dataset declaration {path} cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"dataset declaration {path} must be a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UserError(f"dataset declaration {path}: unknown key(s) {', '.join(map(str, unknown))}; keys: {', '.join(KEYS)}")
    for key in ("name", "classnames"):
        if key not in data:
            raise UserError(f"dataset declaration {path} has no '{key}'")
    descriptions = data.get("descriptions") or ""
    if isinstance(descriptions, str) and descriptions:
        descriptions = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(descriptions)))
    entry = make_entry(
        data["name"], data["classnames"], data.get("modality") or "", data.get("template") or "",
        descriptions, where=os.path.abspath(path),
    )
    DECLARED[entry.name] = entry
    return entry


def is_declaration(path):
    """True for a dataset.yaml/.json declaration (lower-case keys), False for a config YAML."""
    if os.path.basename(path) in DECLARATION_FILES:
        return True
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "classnames" in data


def declaration_in(folder):
    """Path of the declaration file in ``folder``, or None."""
    for name in DECLARATION_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_in_folder(path, folder):
    """A declaration found in DATASET.ROOT/<folder>/: its name must be the folder's (the data is looked up by name)."""
    entry = read_declaration(path)
    if entry.name != folder:
        raise UserError(f"dataset declaration {path} says name '{entry.name}' but sits in folder '{folder}'; make them the same")
    return entry


def _config_declaration(path):
    """The entry declared by DATASET keys of a configs/datasets YAML, or None if it declares none."""
    try:
        with open(path, encoding="utf-8") as f:
            node = (yaml.safe_load(f) or {}).get("DATASET") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(node, dict) or not node.get("CLASSNAMES"):
        return None
    entry = make_entry(
        node.get("NAME", ""), node["CLASSNAMES"], node.get("MODALITY", ""), node.get("TEMPLATE", ""),
        _file_relative(node.get("DESCRIPTIONS_FILE", ""), path), where=os.path.abspath(path),
    )
    DECLARED[entry.name] = entry
    return entry


def _file_relative(path, yaml_path):
    """A path written in a YAML file, relative to that file's folder."""
    if not path or not isinstance(path, str):
        return path or ""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(yaml_path)), path))


def merge_dataset_file(cfg, path):
    """Merge ``--dataset-config-file``: a declaration (dataset.yaml) or a config YAML with DATASET keys.

    Paths it holds (DESCRIPTIONS_FILE) resolve against the file's folder, wherever the command runs."""
    from core.config import _read_yaml, merge_from_file

    if os.path.isfile(path) and is_declaration(path):
        return apply_declaration(cfg, path)
    merge_from_file(cfg, path)
    written = ((_read_yaml(path).get("DATASET") or {}) if os.path.isfile(path) else {}).get("DESCRIPTIONS_FILE")
    if isinstance(written, str) and written:
        cfg.DATASET.DESCRIPTIONS_FILE = _file_relative(written, path)
    return None


def _project_path(path):
    if not path:
        return ""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(PROJECT_DIR, path)


def lookup(name, root=""):
    """The entry of a catalog or declared dataset, or None: catalog, then ROOT/<name>/, then configs/datasets/."""
    if name in CATALOG:
        return CATALOG[name]
    if root:
        path = declaration_in(os.path.join(os.path.abspath(os.path.expanduser(root)), name))
        if path:
            return _read_in_folder(path, name)
    config = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if os.path.isfile(config):
        entry = _config_declaration(config)
        if entry is not None:
            return entry
    return DECLARED.get(name)


def entry_for_cfg(cfg):
    """The dataset a config names: declared by its DATASET keys, in the catalog, or declared next to its data."""
    d = cfg.DATASET
    if d.CLASSNAMES:
        known = DECLARED.get(d.NAME)
        entry = make_entry(d.NAME, list(d.CLASSNAMES), d.MODALITY, d.TEMPLATE, _project_path(d.DESCRIPTIONS_FILE),
                           where=known.declared_in if known else "config DATASET keys")
        DECLARED[entry.name] = entry
        return entry
    entry = lookup(d.NAME, d.ROOT)
    if entry is None:
        from .catalog import get_entry

        try:
            get_entry(d.NAME)
        except KeyError as e:
            raise UserError(e.args[0]) from None
    return entry


def apply_declaration(cfg, path):
    """Set the DATASET keys of ``cfg`` from a declaration file (``--dataset-config-file DATA/X/dataset.yaml``)."""
    entry = read_declaration(path)
    d = cfg.DATASET
    d.NAME, d.CLASSNAMES, d.MODALITY, d.TEMPLATE = entry.name, tuple(entry.classnames), entry.modality, entry.template
    d.DESCRIPTIONS_FILE = entry.descriptions
    folder = os.path.dirname(os.path.abspath(path))
    if not d.ROOT and os.path.basename(folder) == entry.name:
        d.ROOT = os.path.dirname(folder)
    return entry


def scan(root=""):
    """Declared datasets under ``root`` and in configs/datasets: (entries, problems), both lists."""
    entries, problems = [], []
    candidates = []
    if root and os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = declaration_in(os.path.join(root, name))
            if path and name not in CATALOG:
                candidates.append((lambda p, folder=name: _read_in_folder(p, folder), path))
    if os.path.isdir(CONFIG_DIR):
        for name in sorted(os.listdir(CONFIG_DIR)):
            if name.endswith(".yaml") and name[:-5] not in CATALOG:
                candidates.append((_config_declaration, os.path.join(CONFIG_DIR, name)))
    seen = set()
    for read, path in candidates:
        try:
            entry = read(path)
        except UserError as e:
            problems.append(str(e))
            continue
        if entry is not None and entry.name not in seen:
            seen.add(entry.name)
            entries.append(entry)
    return entries, problems


def dataset_config_file(name):
    """The file that names dataset ``name`` for train.py's --dataset-config-file."""
    config = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if os.path.isfile(config) or name in CATALOG:
        return config
    entry = DECLARED.get(name)
    if entry is not None and entry.declared_in and os.path.isfile(entry.declared_in):
        return entry.declared_in
    return config
