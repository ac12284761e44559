"""Reading BiomedCoOp's prompt dictionary from a user's copy of its repository.

The original code keeps its LLM sentences as a Python dict literal, ``BIOMEDCOOP_TEMPLATES =
{classname: [sentences]}`` in ``trainers/prompt_templates.py``. This module reads that literal with
``ast`` only: the file is parsed, never imported or run, and anything in the dict that is not a plain
string literal (a name, a call, a comprehension, an f-string, ``**`` unpacking) is refused.

    python -m clipkit.biomedcoop_prompts /path/to/BiomedCoOp             # classes and sentence counts
    python -m clipkit.biomedcoop_prompts /path/to/BiomedCoOp --out x.json --classnames "glioma tumor" ...

Trainers read it through ``clipkit.descriptions``: set ``DATASET.DESCRIPTIONS_DIR`` (or a declared
dataset's ``DESCRIPTIONS_FILE``) to the checkout or to its ``prompt_templates.py``.
"""
from __future__ import annotations

import ast
import os

from core.errors import UserError

VARIABLE = "BIOMEDCOOP_TEMPLATES"
RELATIVE_PATH = os.path.join("trainers", "prompt_templates.py")
ONLY_LITERALS = "only a literal {classname: [sentences]} is read (the file is never run)"


def prompt_dictionary_file(path):
    """The ``prompt_templates.py`` that ``path`` names (the file, its ``trainers/`` folder or the checkout), or None."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return path if path.endswith(".py") else None
    for candidate in (os.path.join(path, RELATIVE_PATH), os.path.join(path, "prompt_templates.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _describe(node):
    kinds = {
        ast.Call: "a function call", ast.Name: "a variable name", ast.Attribute: "an attribute",
        ast.ListComp: "a list comprehension", ast.DictComp: "a dict comprehension",
        ast.GeneratorExp: "a generator expression", ast.JoinedStr: "an f-string", ast.BinOp: "an operator expression",
        ast.Subscript: "a subscript", ast.Starred: "a starred expression", ast.Lambda: "a lambda",
    }
    for kind, words in kinds.items():
        if isinstance(node, kind):
            return words
    if isinstance(node, ast.Constant):
        return f"a {type(node.value).__name__} constant"
    return f"a {type(node).__name__} expression"


def _find_assignment(tree):
    """The value node of the last top-level ``BIOMEDCOOP_TEMPLATES = ...`` (as Python would keep it), or None."""
    found = None
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == VARIABLE for t in statement.targets):
                found = statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            if isinstance(statement.target, ast.Name) and statement.target.id == VARIABLE:
                found = statement.value
    return found


def read_prompt_dictionary(path):
    """``{classname: [sentences]}`` from the ``BIOMEDCOOP_TEMPLATES`` literal of ``path`` (file or checkout).

    Keys keep their exact spelling (the original looks classes up case-sensitively); a key given twice
    keeps its last list, as Python would.
    """
    source_file = prompt_dictionary_file(path)
    if source_file is None:
        raise UserError(
            f"{path} is neither a prompt_templates.py nor a BiomedCoOp checkout (no {RELATIVE_PATH} in it); "
            f"give the repository folder or its {RELATIVE_PATH}"
        )
    try:
        with open(source_file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{source_file} is not UTF-8 text; "
                        f"give the prompt_templates.py of a BiomedCoOp checkout") from None
    except OSError as e:
        raise UserError(f"cannot read {source_file}: {e.strerror}") from None
    try:
        tree = ast.parse(text, filename=source_file)
    except SyntaxError as e:
        raise UserError(f"{source_file} line {e.lineno}: not valid Python ({e.msg}); "
                        f"give an unmodified prompt_templates.py") from None
    except (RecursionError, MemoryError, ValueError):
        raise UserError(f"{source_file} is too deeply nested or malformed to parse; "
                        f"give an unmodified prompt_templates.py") from None
    value = _find_assignment(tree)
    if value is None:
        raise UserError(f"{source_file} has no top-level {VARIABLE} = {{...}}; "
                        f"give the prompt_templates.py of a BiomedCoOp checkout")
    where = f"{source_file} line {getattr(value, 'lineno', '?')}"
    if not isinstance(value, ast.Dict):
        raise UserError(f"{where}: {VARIABLE} is {_describe(value)}, not a dict literal; {ONLY_LITERALS}")
    prompts = {}
    for key, item in zip(value.keys, value.values):
        if key is None:
            raise UserError(f"{source_file} line {item.lineno}: {VARIABLE} unpacks {_describe(item)} with **; "
                            f"{ONLY_LITERALS}")
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise UserError(f"{source_file} line {key.lineno}: a key of {VARIABLE} is {_describe(key)}, "
                            f"not a string literal; {ONLY_LITERALS}")
        if not isinstance(item, (ast.List, ast.Tuple)):
            raise UserError(f"{source_file} line {item.lineno}: '{key.value}' maps to {_describe(item)}, "
                            f"not a list of string literals; {ONLY_LITERALS}")
        sentences = []
        for element in item.elts:
            if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
                raise UserError(f"{source_file} line {element.lineno}: a sentence of '{key.value}' is "
                                f"{_describe(element)}, not a string literal; {ONLY_LITERALS}")
            sentences.append(element.value)
        prompts[key.value] = sentences
    return prompts


def load_biomedcoop_prompts(path, classnames, allow_missing=False, missing_hint=""):
    """Sentences for each of ``classnames`` (list of lists, same order) from the original's prompt dictionary.

    Class names must match the keys exactly, as in the original code. Every missing class is named in
    one error, with the key that differs only in case or underscores where there is one; with
    ``allow_missing`` a missing class gets an empty list instead. ``missing_hint`` ends that error.
    """
    from datasets.catalog import normalize_classname

    prompts = read_prompt_dictionary(path)
    source_file = prompt_dictionary_file(path)
    missing = [name for name in classnames if not prompts.get(name)]
    if missing and not allow_missing:
        by_normalized = {normalize_classname(k): k for k in prompts}
        parts = []
        for name in missing:
            near = by_normalized.get(normalize_classname(name))
            if name in prompts:
                parts.append(f"'{name}' (empty list)")
            elif near is not None:
                parts.append(f"'{name}' (the file has '{near}'; keys are case-sensitive)")
            else:
                parts.append(f"'{name}'")
        raise UserError(f"{VARIABLE} in {source_file} has no sentences for {len(missing)} of {len(classnames)} "
                        f"classes: {', '.join(parts)}; use a dataset whose class names are its keys, "
                        f"or a descriptions JSON" + (f", or {missing_hint}" if missing_hint else ""))
    return [list(prompts.get(name) or []) for name in classnames]


def main(argv=None):
    import argparse
    import sys

    from core.utils import write_error_message, write_json_atomic

    parser = argparse.ArgumentParser(
        prog="python -m clipkit.biomedcoop_prompts",
        description=f"Read {VARIABLE} from a BiomedCoOp checkout without running it: list its classes, "
                    f"or write them as a descriptions JSON {{classname: [sentences]}}.")
    parser.add_argument("path", help=f"the checkout, or its {RELATIVE_PATH}")
    parser.add_argument("--classnames", nargs="+", help="classes to take, in order (default: every key)")
    parser.add_argument("--out", help="write {classname: [sentences]} here as JSON")
    args = parser.parse_args(argv)
    try:
        prompts = read_prompt_dictionary(args.path)
        names = args.classnames or list(prompts)
        selected = dict(zip(names, load_biomedcoop_prompts(args.path, names)))
        if args.out:
            try:
                write_json_atomic(args.out, selected, indent=1)
            except OSError as e:
                raise UserError(write_error_message(e)) from None
            print(f"wrote {len(selected)} classes to {args.out}")
        else:
            for name, sentences in selected.items():
                print(f"{len(sentences):4d}  {name}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
