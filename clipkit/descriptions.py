"""Reading ``llm_descriptions/<dataset>.json`` files ({classname: [descriptions]}).

A descriptions folder or file may also be a BiomedCoOp checkout or its ``trainers/prompt_templates.py``:
its ``BIOMEDCOOP_TEMPLATES`` dict is then parsed, never run (``clipkit.biomedcoop_prompts``).
"""
from __future__ import annotations

import os

from core.errors import UserError
from core.utils import read_json
from datasets.catalog import DECLARED, normalize_classname

from .backbones import PROJECT_DIR
from .biomedcoop_prompts import load_biomedcoop_prompts, prompt_dictionary_file


def descriptions_path(dataset, descriptions_dir="llm_descriptions"):
    """A declared dataset's own descriptions file, else ``<descriptions_dir>/<dataset>.json``.

    Either may name a BiomedCoOp checkout or its prompt_templates.py; the path is then that .py file.
    """
    declared = DECLARED.get(dataset)
    if declared is not None and declared.descriptions:
        return prompt_dictionary_file(declared.descriptions) or declared.descriptions
    directory = descriptions_dir if os.path.isabs(descriptions_dir) else os.path.join(PROJECT_DIR, descriptions_dir)
    if directory.endswith(".py"):
        return directory
    return prompt_dictionary_file(directory) or os.path.join(directory, f"{dataset}.json")


def load_descriptions(dataset, classnames, descriptions_dir="llm_descriptions"):
    """Descriptions for each of ``classnames`` (list of lists, same order).

    Class names match file keys after normalizing case, underscores and
    spaces. A class with no descriptions is an error naming the class and file.
    """
    path = descriptions_path(dataset, descriptions_dir)
    if path.endswith(".py"):
        return load_biomedcoop_prompts(path, classnames)
    if not os.path.isfile(path):
        declared = DECLARED.get(dataset)
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
    output = []
    for name in classnames:
        items = by_key.get(normalize_classname(name))
        if not items:
            raise UserError(f"class '{name}' has no descriptions in {path}; add a list of descriptions under that key")
        output.append(items)
    return output
