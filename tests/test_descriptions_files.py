"""Every catalog dataset has a descriptions file covering every class, clean and within the context."""
import json
import os

import pytest
from open_clip.tokenizer import SimpleTokenizer

from conftest import PROJECT_DIR
from datasets.catalog import CATALOG, normalize_classname

TOKENIZER = SimpleTokenizer()


@pytest.mark.parametrize("name", list(CATALOG))
def test_descriptions_cover_every_class(name):
    path = os.path.join(PROJECT_DIR, "llm_descriptions", f"{name}.json")
    assert os.path.isfile(path), f"missing {path}"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    keys = {normalize_classname(k): v for k, v in data.items()}
    assert len(keys) == len(data), "two keys normalize to the same class"
    for classname in CATALOG[name].classnames:
        items = keys.get(normalize_classname(classname))
        assert items, f"{name}: no descriptions for '{classname}'"
        assert len(items) >= 10, f"{name}/{classname}: only {len(items)} descriptions"
        assert all(isinstance(t, str) and t.strip() for t in items), f"{name}/{classname}: empty entry"
        normalized = [" ".join(t.lower().split()) for t in items]
        assert len(set(normalized)) == len(normalized), f"{name}/{classname}: duplicate descriptions"
        for text in items:
            # 77 positions with the start and end tokens: at most 75 text tokens, never truncated.
            assert len(TOKENIZER.encode(text)) <= 75, f"{name}/{classname}: too long: {text}"
