"""The prompt layer shared by every trainer.

- :class:`PromptTokenizer` turns prompt pieces (text and context slots) into token
  ids plus a mask of the context positions, for both tokenizer kinds.
- :class:`TextEncoder` runs a backbone's text tower from token *embeddings*,
  replacing the context positions with per-layer deep prompts when given, and
  pools like the backbone does. With no prompts it equals ``encode_text``.
- :class:`ImageEncoder` runs the image tower with optional (deep) visual
  prompts appended to the patch tokens. With no prompts it equals ``encode_image``.
- :class:`PromptLearner` holds learnable context vectors (shared or
  class-specific, initialized from words or randomly) and deep text prompts.

None of these copy backbone weights: they hold references to the frozen modules.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.errors import UserError
from core.utils import logger


def place(x, mask, values):
    """Return ``x`` with the positions in ``mask`` replaced by ``values``.

    x: (n, L, d); mask: (n, L) bool with k True per row;
    values: (k, d) shared by all rows or (n, k, d).
    """
    n, _, d = x.shape
    if values.dim() == 2:
        values = values.unsqueeze(0).expand(n, -1, -1)
    rows, cols = mask.nonzero(as_tuple=True)
    return x.index_put((rows, cols), values.reshape(-1, d).to(x.dtype))


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenRun:
    """Token ids placed as they are; ``context`` marks them as context slots.

    A context run shows the ids of the words its vectors were initialized from,
    so the token ids equal the tokenized prompt text, as in CoOp and MaPLe.
    """

    ids: tuple
    context: bool = False


@dataclass
class PromptTokens:
    """Token ids (n, L), context mask (n, L) and the text each row stands for."""

    ids: torch.Tensor
    ctx_mask: torch.Tensor
    texts: list

    def to(self, device):
        return PromptTokens(self.ids.to(device), self.ctx_mask.to(device), self.texts)

    def __len__(self):
        return self.ids.shape[0]

    @staticmethod
    def cat(parts):
        return PromptTokens(
            torch.cat([p.ids for p in parts]), torch.cat([p.ctx_mask for p in parts]), [t for p in parts for t in p.texts]
        )

    def select(self, index):
        index = torch.as_tensor(index, device=self.ids.device)
        return PromptTokens(self.ids[index], self.ctx_mask[index], [self.texts[i] for i in index.tolist()])


class PromptTokenizer:
    """One interface over open_clip's BPE tokenizer and Hugging Face tokenizers."""

    def __init__(self, tokenizer, context_length):
        self.tokenizer = tokenizer
        self.context_length = context_length
        hf = getattr(tokenizer, "tokenizer", None)
        if hf is not None and hasattr(hf, "cls_token_id"):
            self.kind = "hf"
            self._hf = hf
            self.start_id = hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id
            self.end_id = hf.sep_token_id if hf.sep_token_id is not None else hf.eos_token_id
            self.pad_id = hf.pad_token_id or 0
            self._clean = getattr(tokenizer, "clean_fn", lambda s: s)
        else:
            self.kind = "native"
            self.start_id = tokenizer.sot_token_id
            self.end_id = tokenizer.eot_token_id
            self.pad_id = 0

    @cached_property
    def placeholder_id(self):
        """Id written at context slots (their embeddings are replaced): the token of 'x'."""
        return self.encode("x")[0]

    def encode(self, text):
        """Token ids of ``text`` without start/end tokens."""
        if self.kind == "hf":
            return list(self._hf.encode(self._clean(text), add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def __call__(self, texts):
        """Token ids (n, context_length) exactly as the backbone's own tokenizer makes them."""
        return self.tokenizer(list(texts))

    def num_tokens(self, text):
        return len(self.encode(text))

    def assemble(self, pieces, text=None):
        """Ids and context mask for pieces: strings are tokenized, ints are that many context slots,
        TokenRuns are placed as they are."""
        ids, mask = [self.start_id], [False]
        for piece in pieces:
            if isinstance(piece, TokenRun):
                ids += list(piece.ids)
                mask += [piece.context] * len(piece.ids)
            elif isinstance(piece, int):
                ids += [self.placeholder_id] * piece  # replaced by context vectors
                mask += [True] * piece
            elif piece:
                tok = self.encode(piece)
                ids += tok
                mask += [False] * len(tok)
        ids.append(self.end_id)
        mask.append(False)
        if len(ids) > self.context_length:
            raise UserError(
                f"prompt '{text or pieces}' needs {len(ids)} tokens but the text encoder takes {self.context_length}; "
                f"shorten it or use fewer context tokens"
            )
        pad = self.context_length - len(ids)
        return ids + [self.pad_id] * pad, mask + [False] * pad

    def build(self, rows):
        """PromptTokens for rows of (pieces, text)."""
        built = [self.assemble(pieces, text) for pieces, text in rows]
        ids = torch.tensor([b[0] for b in built], dtype=torch.long)
        mask = torch.tensor([b[1] for b in built], dtype=torch.bool)
        return PromptTokens(ids, mask, [text for _, text in rows])


# --------------------------------------------------------------------------- text


class TextEncoder(nn.Module):
    """A backbone's text tower run from token embeddings, with optional deep prompts."""

    def __init__(self, clip_model):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder

        text = getattr(clip_model, "text", None)
        self.kind = "hf" if isinstance(text, HFTextEncoder) else "native"
        if self.kind == "hf":
            self.hf = text
            self.word_embeddings = text.transformer.embeddings.word_embeddings
            self.layers = text.transformer.encoder.layer
            self.width = text.transformer.config.hidden_size
            self.pad_id = text.config.pad_token_id if text.config.pad_token_id is not None else 0
        else:
            tower = text if text is not None else clip_model
            if getattr(tower, "cls_emb", None) is not None:
                raise UserError("text towers with an appended class token (CoCa) are not supported by the prompt layer")
            self.tower = tower
            self.pad_id = 0
            self.token_embedding_module = tower.token_embedding
            self.transformer = tower.transformer
            self.layers = tower.transformer.resblocks
            self.width = tower.transformer.width
            self.pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
            self.eos_id = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
            if getattr(tower, "use_pad_mask", False):
                raise UserError("text towers with padding masks are not supported by the prompt layer")
        self.num_layers = len(self.layers)

    @property
    def dtype(self):
        if self.kind == "hf":
            return self.word_embeddings.weight.dtype
        return self.transformer.get_cast_dtype()

    def embed(self, ids):
        """Token embeddings (n, L, width) of ids (n, L)."""
        if self.kind == "hf":
            return self.word_embeddings(ids)
        return self.token_embedding_module(ids).to(self.dtype)

    def used_length(self, ids):
        """Positions (a prefix of L) that can change the pooled feature of any row of ``ids`` (n, L).

        A causal tower pooling at the end token never looks past the batch's last end token; a
        BERT tower masks padding out of attention, so nothing past the longest real sequence
        counts. Towers pooling elsewhere (last position, no pooling) or without a causal mask
        need the full context.
        """
        full = ids.shape[1]
        if ids.shape[0] == 0:
            return full
        if self.kind == "hf":
            real = ids != self.pad_id
        elif self.tower.attn_mask is None:
            return full
        elif self.pool_type == "argmax":
            return int(ids.argmax(dim=-1).max()) + 1
        elif self.pool_type == "eos" and self.eos_id is not None:
            return int((ids == self.eos_id).int().argmax(dim=-1).max()) + 1
        elif self.pool_type == "first":
            real = ids != 0
        else:
            return full
        positions = torch.arange(1, full + 1, device=ids.device)
        return max(int((real * positions).max()), 1)

    def forward(self, embeddings, ids, ctx_mask=None, deep_prompts=None, truncate=True):
        """Features (n, embed_dim).

        embeddings: (n, L, width) token embeddings (context slots already filled);
        ids: (n, L) the token ids they came from (for pooling and padding);
        deep_prompts: prompts for layers 2.. (list of (k, width) or (n, k, width)),
        placed at ``ctx_mask`` before those layers;
        truncate: run only the positions that can change the result (:meth:`used_length`);
        the features are the same as at full length up to float rounding.
        """
        deep_prompts = list(deep_prompts or [])
        if len(deep_prompts) >= self.num_layers:
            raise UserError(f"{len(deep_prompts) + 1} prompt layers requested but the text encoder has {self.num_layers}")
        if truncate:
            length = self.used_length(ids)
            embeddings, ids = embeddings[:, :length], ids[:, :length]
            ctx_mask = ctx_mask[:, :length] if ctx_mask is not None else None
        if self.kind == "hf":
            return self._forward_hf(embeddings, ids, ctx_mask, deep_prompts)
        return self._forward_native(embeddings, ids, ctx_mask, deep_prompts)

    def _forward_native(self, x, ids, ctx_mask, deep_prompts):
        tower = self.tower
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(x.dtype)
        attn_mask = tower.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:length, :length]
        batch_first = getattr(self.transformer, "batch_first", True)
        for i, block in enumerate(self.layers):
            if 1 <= i <= len(deep_prompts):
                x = place(x, ctx_mask, deep_prompts[i - 1])
            x = block(x if batch_first else x.transpose(0, 1), attn_mask=attn_mask)
            x = x if batch_first else x.transpose(0, 1)
        x = tower.ln_final(x)
        if self.pool_type == "argmax":
            pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        elif self.pool_type == "eos":
            pooled = x[torch.arange(x.shape[0], device=x.device), (ids == self.eos_id).int().argmax(dim=-1)]
        elif self.pool_type == "first":
            pooled = x[:, 0]
        elif self.pool_type == "last":
            pooled = x[:, -1]
        else:
            pooled = x
        proj = tower.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    @contextmanager
    def _layer_prompts(self, ctx_mask, deep_prompts):
        """Hooks that place deep prompts before Hugging Face layers 2..J."""
        handles = []

        def make_hook(prompt):
            def hook(module, args, kwargs):
                if args:
                    return (place(args[0], ctx_mask, prompt),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = place(kwargs["hidden_states"], ctx_mask, prompt)
                return args, kwargs

            return hook

        try:
            for i, prompt in enumerate(deep_prompts, start=1):
                handles.append(self.layers[i].register_forward_pre_hook(make_hook(prompt), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward_hf(self, x, ids, ctx_mask, deep_prompts):
        hf = self.hf
        attn_mask = (ids != self.pad_id).long()
        with self._layer_prompts(ctx_mask, deep_prompts):
            out = hf.transformer(inputs_embeds=x, attention_mask=attn_mask)
        return hf.proj(hf.pooler(out, attn_mask))


# --------------------------------------------------------------------------- image


class ImageEncoder(nn.Module):
    """A backbone's image tower with optional visual prompts.

    ``deep_prompts[0]`` (k, width) is appended after the patch tokens; each later
    entry replaces those k tokens before the next layer. Works on open_clip's own
    ViT and on timm ViT towers (BiomedCLIP).
    """

    def __init__(self, clip_model):
        super().__init__()
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.clip_model = [clip_model]  # a reference, not a registered submodule
        self.visual = clip_model.visual
        v = self.visual
        self.kind = None
        if isinstance(v, VisionTransformer) and v.attn_pool is None:
            self.kind = "native"
            self.blocks = v.transformer.resblocks
            self.width = v.transformer.width
        elif isinstance(v, TimmModel) and hasattr(v.trunk, "blocks") and hasattr(v.trunk, "_pos_embed"):
            self.kind = "timm"
            self.blocks = v.trunk.blocks
            self.width = v.trunk.embed_dim
        else:
            self.width = None
        self.supports_prompts = self.kind is not None
        self.num_layers = len(self.blocks) if self.supports_prompts else 0

    def _tokens(self, images):
        """Patch and class tokens with positions, before the pre-norm: (n, 1 + patches, width)."""
        v = self.visual
        if self.kind == "timm":
            t = v.trunk
            return t.patch_drop(t._pos_embed(t.patch_embed(images)))
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        return v.patch_dropout(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))

    def _pre_norm(self, x):
        return self.visual.trunk.norm_pre(x) if self.kind == "timm" else self.visual.ln_pre(x)

    def _block(self, block, x):
        if self.kind == "native" and not getattr(self.visual.transformer, "batch_first", True):
            return block(x.transpose(0, 1)).transpose(0, 1)
        return block(x)

    def _finish(self, x):
        """Pooled, projected features from the final tokens (prompt tokens removed)."""
        v = self.visual
        if self.kind == "timm":
            return v.head(v.trunk.forward_head(v.trunk.norm(x)))
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled

    def forward(self, images, deep_prompts=None):
        """Features (n, embed_dim) of images (n, 3, H, W)."""
        # Images arrive as float32; a half-precision tower (PREC fp16) needs them in its own dtype.
        images = images.to(next(self.visual.parameters()).dtype)
        if deep_prompts is None or len(deep_prompts) == 0:
            return self.clip_model[0].encode_image(images)
        if not self.supports_prompts:
            raise UserError(
                f"visual prompts need a ViT image tower (open_clip or timm); this backbone's image tower is "
                f"{type(self.visual).__name__}"
            )
        if len(deep_prompts) > self.num_layers:
            raise UserError(f"{len(deep_prompts)} visual prompt layers requested but the image encoder has {self.num_layers}")
        x = self._tokens(images)
        n, n_prompt = x.shape[0], deep_prompts[0].shape[-2]
        expand = lambda p: (p.unsqueeze(0).expand(n, -1, -1) if p.dim() == 2 else p).to(x.dtype)
        x = self._pre_norm(torch.cat([x, expand(deep_prompts[0])], dim=1))
        n_tokens = x.shape[1] - n_prompt
        for i, block in enumerate(self.blocks):
            if 1 <= i < len(deep_prompts):
                x = torch.cat([x[:, :n_tokens], expand(deep_prompts[i])], dim=1)
            x = self._block(block, x)
        return self._finish(x[:, :n_tokens])


# --------------------------------------------------------------------------- learner


def template_prefix(template):
    """The words before the class name in a template: 'a fundus image of {}.' -> 'a fundus image of'."""
    return template.split("{}", 1)[0].strip()


def template_suffix(template):
    """The template with its leading words removed: 'a fundus image of {}.' -> '{}.'"""
    return "{}" + template.split("{}", 1)[1] if "{}" in template else "{}"


class PromptLearner(nn.Module):
    """Learnable context vectors and deep text prompts.

    ctx: (n_ctx, width), or (n_cls, n_ctx, width) when class-specific.
    deep_ctx: depth-1 tensors (n_ctx, width) for text layers 2..depth.

    With ``ctx_init`` words the context is the first ``n_ctx`` tokens of those
    words, initialized from their embeddings; if ``n_ctx`` exceeds the words'
    token count the context is random instead (logged). ``keep_init_words``
    chooses what follows the context: the rest of the init words as fixed text
    ("a photo of a glaucoma." with "a photo" learnable: CoOp, CoCoOp, IVLP,
    MaPLe), or nothing ("[ctx] glaucoma.": MedPromptCLIP).
    """

    def __init__(self, text_encoder, tokenizer, n_ctx=4, ctx_init="", depth=1, class_specific=False,
                 n_cls=0, position="end", init_std=0.02, keep_init_words=False):
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise UserError(f"class token position must be end, middle or front, not '{position}'")
        if depth < 1:
            raise UserError(f"text prompt depth must be >= 1, not {depth}")
        if depth > text_encoder.num_layers:
            raise UserError(
                f"text prompt depth {depth} exceeds the {text_encoder.num_layers} layers of the text encoder; "
                f"lower PROMPT_DEPTH_TEXT"
            )
        if n_ctx < 1:
            raise UserError(f"the number of context tokens must be >= 1, not {n_ctx}")
        self.tokenizer = tokenizer
        self.position = position
        width = text_encoder.width
        ctx_init = " ".join(ctx_init.replace("_", " ").split())
        init_ids = tokenizer.encode(ctx_init) if ctx_init else []
        if ctx_init and n_ctx > len(init_ids):
            logger.info(
                f"{n_ctx} context tokens but '{ctx_init}' has {len(init_ids)}: the context is initialized randomly"
            )
            ctx_init, init_ids = "", []
        if ctx_init:
            device = next(text_encoder.parameters()).device
            with torch.no_grad():
                emb = text_encoder.embed(torch.tensor([init_ids[:n_ctx]], device=device))[0]
            ctx = emb.detach().float().cpu().clone()
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(n_cls, 1, 1)
            self.ctx_ids = tuple(init_ids[:n_ctx])
            self.fixed_ids = tuple(init_ids[n_ctx:]) if keep_init_words else ()
        else:
            shape = (n_cls, n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape)
            nn.init.normal_(ctx, std=init_std)
            self.ctx_ids = (tokenizer.placeholder_id,) * n_ctx
            self.fixed_ids = ()
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific
        self.ctx = nn.Parameter(ctx)
        deep = []
        for _ in range(depth - 1):
            p = torch.empty(n_ctx, width)
            nn.init.normal_(p, std=init_std)
            deep.append(nn.Parameter(p))
        self.deep_ctx = nn.ParameterList(deep)
        logger.info(
            f"text context: {n_ctx} tokens ({'from ' + repr(ctx_init) if ctx_init else 'random'})"
            + (f", followed by {len(self.fixed_ids)} fixed token(s) of the init words" if self.fixed_ids else "")
        )

    @property
    def depth(self):
        return len(self.deep_ctx) + 1

    def pieces(self, name_text, suffix_text=""):
        """Prompt pieces around the class name for this learner's class-token position.

        Fixed init words follow the context block, as in CoOp's prompt "{init words} {class}.".
        """
        fixed = TokenRun(self.fixed_ids)
        if self.position == "end":
            return [TokenRun(self.ctx_ids, True), fixed, name_text + suffix_text]
        if self.position == "front":
            return [name_text, TokenRun(self.ctx_ids, True), fixed, suffix_text]
        half = self.n_ctx // 2
        return [TokenRun(self.ctx_ids[:half], True), name_text, TokenRun(self.ctx_ids[half:], True), fixed, suffix_text]

    def tokens_for(self, classnames, template="{}."):
        """PromptTokens for each class: the template's leading words are replaced by the context.

        With template 'a fundus image of {}.' and position end the prompt is
        '[ctx] glaucoma.' (plus any fixed init words before the class name); with
        the context initialized from 'a fundus image of' it is exactly the
        template's own token sequence.
        """
        from datasets.catalog import readable_classname

        suffix = template_suffix(template)
        before, after = suffix.split("{}", 1)
        rows = []
        for name in classnames:
            readable = readable_classname(name)
            pieces = self.pieces(before + readable if before else readable, after)
            rows.append((pieces, template.format(readable)))
        return self.tokenizer.build(rows)

    def forward(self, text_encoder, tokens, class_index=None, ctx_bias=None):
        """Text features (n, embed_dim) of prompts ``tokens`` with the learned context.

        class_index: (n,) class of each row, used with class-specific context;
        ctx_bias: optional (n, width) added to every context vector of its row (CoCoOp).
        """
        emb = text_encoder.embed(tokens.ids)
        ctx = self.ctx
        if self.class_specific:
            if class_index is None:
                class_index = torch.arange(len(tokens), device=ctx.device)
            ctx = ctx[class_index]
        if ctx_bias is not None:
            ctx = (ctx if ctx.dim() == 3 else ctx.unsqueeze(0)) + ctx_bias.unsqueeze(1)
        emb = place(emb, tokens.ctx_mask, ctx)
        return text_encoder(emb, tokens.ids, tokens.ctx_mask, list(self.deep_ctx))
