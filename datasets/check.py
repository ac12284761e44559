"""Checks before compute: every image a split lists decodes, description files cover the classes a method needs.

Decoding is done once per image, in parallel threads, and remembered by absolute path, size and
modification time in ``DATA/.image_check.json`` (written atomically; a data root that cannot be
written keeps the memo under ``~/.cache/medpromptclip/``), so a second check of unchanged files is
instant. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from core.errors import UserError
from core.utils import write_json_atomic

from .catalog import DECLARED, normalize_classname
from .split_files import image_folder, split_paths

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMO_FILE = ".image_check.json"
MEMO_VERSION = 1


def _memo_path(root):
    root = os.path.abspath(os.path.expanduser(root))
    if os.access(root, os.W_OK):
        return os.path.join(root, MEMO_FILE)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(root.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache, "medpromptclip", f"image_check-{digest}.json")


def _read_memo(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MEMO_VERSION or not isinstance(data.get("images"), dict):
        return {}
    return data["images"]


def decode_error(path):
    """None if the image at ``path`` decodes completely, else what is wrong (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises many kinds for broken files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'cannot be decoded'}"
    return None


def undecodable_images(root, paths, workers=None):
    """[(absolute path, error)] of the files in ``paths`` that are missing or do not decode.

    Each file is decoded once; the result is remembered by path, size and modification time."""
    memo_path = _memo_path(root)
    memo = _read_memo(memo_path)
    bad, todo, stamps = [], [], {}
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        try:
            st = os.stat(path)
        except OSError:
            bad.append((path, "missing"))
            continue
        stamps[path] = [st.st_size, st.st_mtime_ns]
        known = memo.get(path)
        if isinstance(known, list) and len(known) == 3 and known[:2] == stamps[path]:
            if known[2]:
                bad.append((path, known[2]))
        else:
            todo.append(path)
    if todo:
        workers = workers or min(32, (os.cpu_count() or 1) * 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(decode_error, todo))
        for path, error in zip(todo, errors):
            memo[path] = [*stamps[path], error]
            if error:
                bad.append((path, error))
        try:
            write_json_atomic(memo_path, {"version": MEMO_VERSION, "images": memo}, indent=None)
        except OSError:
            pass  # the memo only saves time
    return sorted(bad)


def listed_image_paths(root, entry, split):
    base = image_folder(root, entry)
    return [os.path.join(base, rel) for rel in split_paths(split)]


def descriptions_file(name, descriptions_dir="llm_descriptions"):
    """The descriptions file a dataset's runs read: a declared one, else ``<descriptions_dir>/<name>.json``."""
    declared = DECLARED.get(name)
    if declared is not None and declared.descriptions:
        return declared.descriptions
    directory = descriptions_dir if os.path.isabs(descriptions_dir) else os.path.join(PROJECT_DIR, descriptions_dir)
    return os.path.join(directory, f"{name}.json")


def descriptions_problem(name, classnames):
    """(file, None) if the dataset's descriptions file covers every one of ``classnames``,
    else (file, what is wrong): "missing", or a sentence naming the file and the classes it lacks."""
    path = descriptions_file(name)
    if not os.path.isfile(path):
        return path, "missing"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return path, f"descriptions file {path} is not valid JSON; fix or regenerate it"
    if not isinstance(data, dict):
        return path, f"descriptions file {path} must be a JSON object {{classname: [descriptions]}}"
    covered = {normalize_classname(k) for k, v in data.items()
               if isinstance(v, list) and any(isinstance(t, str) and t.strip() for t in v)}
    lacking = [c for c in classnames if normalize_classname(c) not in covered]
    if lacking:
        return path, (f"descriptions file {path} has no descriptions for class(es) {', '.join(map(repr, lacking))}; "
                      f"add them under those keys")
    return path, None


def how_to_get_descriptions(name, root):
    declared = DECLARED.get(name)
    where = f" (it writes the file named by 'descriptions' in {declared.declared_in}, else llm_descriptions/{name}.json)" \
        if declared is not None else ""
    return f"python scripts/generate_descriptions.py {name} --root {root}{where}"


def check_data_root(root):
    """A one-line error naming DATA if the data root does not exist."""
    if not root or not os.path.isdir(os.path.expanduser(root)):
        raise UserError(f"data root DATA={root} does not exist; set DATA (or --root) to the folder that holds "
                        f"your dataset folders")
