"""Reading descriptions files ({classname: [descriptions]}): the project's ``llm_descriptions/<dataset>.json``,
a file named by ``DATASET.DESCRIPTIONS_FILE``, or the original release's ``templates/`` folder
(``DATASET.DESCRIPTIONS_DIR original:<folder>``).

A descriptions folder or file may also be a BiomedCoOp checkout or its ``trainers/prompt_templates.py``:
its ``BIOMEDCOOP_TEMPLATES`` dict is then parsed, never run (``clipkit.biomedcoop_prompts``).
"""
from __future__ import annotations

import hashlib
import os

from core.errors import UserError
from core.utils import read_json
from datasets.catalog import DECLARED, normalize_classname

from .backbones import PROJECT_DIR
from .biomedcoop_prompts import load_biomedcoop_prompts, prompt_dictionary_file

# DESCRIPTIONS_DIR prefix for the original release's templates/ folder.
ORIGINAL_PREFIX = "original:"
# Datasets whose file in the original templates/ folder has another name (its configs' GPT_PATH):
# ODIR_3x200 trains on ODIR's descriptions and SkinCancer's file is spelt Skincancer.
ORIGINAL_FILE_NAMES = {"ODIR_3x200": "ODIR", "SkinCancer": "Skincancer"}


def _project_path(path):
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(PROJECT_DIR, path)


def descriptions_source(descriptions_dir="llm_descriptions", descriptions_file=""):
    """'file' (DESCRIPTIONS_FILE), 'original' (the original release's folder) or 'project'."""
    if descriptions_file:
        return "file"
    if descriptions_dir.startswith(ORIGINAL_PREFIX):
        return "original"
    return "project"


def descriptions_path(dataset, descriptions_dir="llm_descriptions", descriptions_file=""):
    """The descriptions file of ``dataset``: ``descriptions_file`` if given, else from the original
    release's folder (``original:<folder>``, its file names), else a declared dataset's own file,
    else ``<descriptions_dir>/<dataset>.json``."""
    if descriptions_file:
        path = _project_path(descriptions_file)
        return prompt_dictionary_file(path) or path
    if descriptions_dir.startswith(ORIGINAL_PREFIX):
        folder = descriptions_dir[len(ORIGINAL_PREFIX):]
        if not folder:
            raise UserError("DATASET.DESCRIPTIONS_DIR original: needs a folder, e.g. original:/path/MedPromptCLIP/templates")
        return os.path.join(_project_path(folder), f"{ORIGINAL_FILE_NAMES.get(dataset, dataset)}.json")
    declared = DECLARED.get(dataset)
    if declared is not None and declared.descriptions:
        return prompt_dictionary_file(declared.descriptions) or declared.descriptions
    directory = _project_path(descriptions_dir)
    if directory.endswith(".py"):
        return directory
    return prompt_dictionary_file(directory) or os.path.join(directory, f"{dataset}.json")


def file_record(dataset, path, source):
    """What results.json says about a descriptions file: dataset, path, sha256 of its bytes, source."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"dataset": dataset, "path": os.path.abspath(path), "sha256": digest, "source": source}


def load_descriptions(dataset, classnames, descriptions_dir="llm_descriptions", descriptions_file="",
                      allow_missing=False, missing_hint=""):
    """Descriptions for each of ``classnames`` (list of lists, same order).

    Class names match file keys after normalizing case, underscores and spacing (the original code
    matched ``key.replace("_", " ").lower()``, so its raw keys such as ``age-related_macular_degeneration``
    match). Classes without descriptions are one error naming all of them, or, with ``allow_missing``,
    get an empty list; ``missing_hint`` ends that error (another way out the caller offers).
    """
    path = descriptions_path(dataset, descriptions_dir, descriptions_file)
    if path.endswith(".py"):
        return load_biomedcoop_prompts(path, classnames, allow_missing=allow_missing, missing_hint=missing_hint)
    if not os.path.isfile(path):
        declared = DECLARED.get(dataset)
        if descriptions_file:
            raise UserError(f"DATASET.DESCRIPTIONS_FILE {path} not found")
        if descriptions_dir.startswith(ORIGINAL_PREFIX):
            raise UserError(
                f"no descriptions for {dataset} in the original release's folder: {path} not found; "
                f"point DATASET.DESCRIPTIONS_DIR original:<folder> at its templates/ folder")
        if declared is not None:
            raise UserError(
                f"no descriptions for {dataset}: {path} not found; generate them with "
                f"python scripts/generate_descriptions.py {dataset} --root <data root> (it writes the file named by "
                f"'descriptions' in {declared.declared_in}, or {path} if none is named)"
            )
        raise UserError(
            f"no descriptions for {dataset}: {path} not found; write it or run "
            f"python scripts/generate_descriptions.py {dataset}"
        )
    data = read_json(path, what="descriptions file")
    if not isinstance(data, dict):
        raise UserError(f"descriptions file {path} must be a JSON object {{classname: [descriptions]}}")
    by_key = {}
    for key, items in data.items():
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise UserError(f"descriptions file {path}: '{key}' must map to a list of strings")
        by_key.setdefault(normalize_classname(key), []).extend(t.strip() for t in items if t.strip())
    output = [by_key.get(normalize_classname(name)) or [] for name in classnames]
    missing = [name for name, items in zip(classnames, output) if not items]
    if missing and not allow_missing:
        unused = [k for k in data if normalize_classname(k) not in {normalize_classname(c) for c in classnames}]
        raise UserError(
            f"{len(missing)} of {len(classnames)} classes of {dataset} have no descriptions in {path}: "
            f"{', '.join(missing)}" + (f" (keys of the file matching no class: {', '.join(unused)})" if unused else "")
            + "; add a list of descriptions under each such key" + (f", or {missing_hint}" if missing_hint else "")
        )
    return output
