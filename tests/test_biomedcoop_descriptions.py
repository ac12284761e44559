"""The descriptions written for the BiomedCoOp suite: 50 distinct sentences per class, each within both text towers."""
import json
import os
import re

import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import BertTokenizer

from conftest import PROJECT_DIR
from datasets.catalog import CATALOG, DECLARED, normalize_classname

# File name -> class names in label order, spelled exactly as in the suite's split files.
SUITE = {
    "BTMRI": ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
    "BUSI": ["benign tumor", "malignant tumor", "normal scan"],
    "CHMNIST": ["adipose tissue", "complex stroma", "debris", "empty background", "immune cells",
                "normal mucosal glands", "simple stroma", "tumour epithelium"],
    "COVID_19_BiomedCoOp": ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"],
    "CTKidney": ["cyst kidney", "kidney stone", "kidney tumor", "normal kidney"],
    "DermaMNIST": ["actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma", "melanoma",
                   "melanocytic nevus", "vascular lesion"],
    "KneeXray": ["healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis", "moderate osteoarthritis",
                 "severe osteoarthritis"],
    "Kvasir": ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus",
               "normal z line", "polyps", "ulcerative colitis"],
    "LungColon": ["colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma", "lung benign tissue",
                  "lung squamous cell carcinoma"],
    "OCTMNIST": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"],
    "RETINA": ["diabetic retinopathy", "glaucoma", "cataract", "normal retina"],
}
PER_CLASS = 50
MAX_WORDS = 40
CLIP_TOKENS = 75   # CLIP's 77 positions less the start and end tokens
BERT_TOKENS = 254  # BiomedCLIP's 256 positions less [CLS] and [SEP]

CLIP_TOKENIZER = SimpleTokenizer()
# The tiny test tower's WordPiece vocabulary has ~2,600 entries, so it splits words into more pieces than
# PubMedBERT's 30,000: a sentence within its limit is within BiomedCLIP's too.
BERT_TOKENIZER = BertTokenizer(os.path.join(PROJECT_DIR, "configs", "backbones", "tiny-bert", "vocab.txt"))


def read(name):
    path = os.path.join(PROJECT_DIR, "llm_descriptions", f"{name}.json")
    if not os.path.isfile(path):
        pytest.fail(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def normalized(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.mark.parametrize("name", list(SUITE))
def test_every_class_has_fifty_distinct_descriptions(name):
    data = read(name)
    assert list(data) == SUITE[name], f"{name}: keys must be the split's class names in label order"
    seen = {}
    for classname, items in data.items():
        assert isinstance(items, list) and len(items) == PER_CLASS, f"{name}/{classname}: {len(items)} descriptions"
        for text in items:
            assert isinstance(text, str) and text == text.strip() and "\n" not in text, f"{name}/{classname}: {text!r}"
            assert not re.search(r"[*#`_]|^\d+[.)]|^- ", text), f"{name}/{classname}: markdown in {text!r}"
            assert text.endswith(".") and text[0].isupper(), f"{name}/{classname}: not one sentence: {text!r}"
            key = normalized(text)
            assert key not in seen, f"{name}: '{text}' repeats a description of '{seen.get(key)}'"
            seen[key] = classname


@pytest.mark.parametrize("name", list(SUITE))
def test_descriptions_fit_both_text_towers(name):
    for classname, items in read(name).items():
        for text in items:
            assert 3 <= len(text.split()) <= MAX_WORDS, f"{name}/{classname}: {len(text.split())} words: {text}"
            assert len(CLIP_TOKENIZER.encode(text)) <= CLIP_TOKENS, f"{name}/{classname}: too long for CLIP: {text}"
            assert len(BERT_TOKENIZER.tokenize(text)) <= BERT_TOKENS, f"{name}/{classname}: too long for BERT: {text}"


@pytest.mark.parametrize("name", list(SUITE))
def test_registered_suite_datasets_read_their_file(name):
    """Where the dataset is registered, its class names are this file's keys (the loader matches them)."""
    entry = CATALOG.get(name) or DECLARED.get(name)
    if entry is None:
        pytest.skip(f"{name} is not registered in this checkout")
    assert [normalize_classname(c) for c in entry.classnames] == [normalize_classname(c) for c in SUITE[name]]
    from clipkit.descriptions import load_descriptions

    loaded = load_descriptions(name, list(entry.classnames))
    assert [len(items) for items in loaded] == [PER_CLASS] * len(SUITE[name])
