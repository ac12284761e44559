"""Random-weight backbones of real size for the benchmarks, registered as backbone aliases.

``bench-vit-b-16``: open_clip's ViT-B/16 (native text tower, context 77).
``bench-bert-b-16``: BiomedCLIP's shape, ViT-B/16 image tower and a BERT-base text tower
(12 layers, width 768, context 256), with the tokenizer of the test-sized BERT (its ids
fit BERT-base's vocabulary). Weights are random (seeded), so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BACKBONES = ("bench-vit-b-16", "bench-bert-b-16")


def register(folder=None):
    """Write the configs into ``folder`` (a new temporary one by default) and add the aliases."""
    import open_clip

    from clipkit.backbones import ALIASES

    folder = folder or tempfile.mkdtemp(prefix="bench-backbones-")
    configs = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    with open(os.path.join(configs, "ViT-B-16.json"), encoding="utf-8") as f:
        vit = json.load(f)
    native = os.path.join(folder, "bench-vit-b-16.json")
    with open(native, "w", encoding="utf-8") as f:
        json.dump(vit, f)
    bert_dir = os.path.join(folder, "bert-base")
    os.makedirs(bert_dir, exist_ok=True)
    tiny_bert = os.path.join(PROJECT_DIR, "configs", "backbones", "tiny-bert")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_bert, name), bert_dir)
    with open(os.path.join(bert_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                   "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
                   "layer_norm_eps": 1e-12, "pad_token_id": 0}, f)
    bert = os.path.join(folder, "bench-bert-b-16.json")
    with open(bert, "w", encoding="utf-8") as f:
        json.dump({"embed_dim": 512, "vision_cfg": vit["vision_cfg"],
                   "text_cfg": {"hf_model_name": "bert-base", "hf_tokenizer_name": "bert-base",
                                "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                "context_length": 256}}, f)
    apply_threads()
    ALIASES["bench-vit-b-16"] = {"config": native}
    ALIASES["bench-bert-b-16"] = {"config": bert}
    return folder


def apply_threads():
    """Torch threads for code that builds no trainer: MEDPROMPTCLIP_THREADS when set (trainers read it themselves)."""
    import torch

    if os.environ.get("MEDPROMPTCLIP_THREADS", "").strip():
        torch.set_num_threads(int(os.environ["MEDPROMPTCLIP_THREADS"]))


def device_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
