"""Frozen text encoders for the text-to-image generator, behind one small interface.

``TextEncoder.encode(texts) -> (hidden (B, L, dim) float32, mask (B, L) bool)`` with
``L = max_len``: the final-layer hidden state of every token position (before any pooling) and
which positions hold real tokens (every row has at least one). The generator's cross-attention
reads them; swapping the encoder changes only the generator (the tokenizer run is untouched).

Specs (``build_text_encoder``; the canonical spec is what a generator run's config records):

    tiny[:width=64,layers=2,heads=2,ctx=32,seed=0]
        open_clip's bundled BPE tokenizer + a small *randomly initialised* open_clip
        TextTransformer (offline; tests and CPU demos). Its weights are stored in the generator
        run (``text_encoder.*`` tensors), since nothing else can reproduce them exactly.
    clip:NAME[/PRETRAINED]            e.g. clip:ViT-B-32/openai (open_clip; text tower only)
    open_clip:NAME:PRETRAINED         PRETRAINED: a hub tag or a local checkpoint file
    hf:NAME_OR_PATH                   any Hugging Face encoder, encoder-decoder (its encoder),
                                      dual encoder (its text model) or causal LM (last hidden
                                      states) through transformers (optional dependency)
    NAME | PATH                       an open_clip model name -> clip:, a local dir or any other
                                      name -> hf:

Hub encoders are identified by their spec only (their weights are never copied into a run).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InputError

TINY_DEFAULTS = {"width": 64, "layers": 2, "heads": 2, "ctx": 32, "seed": 0}


class TextEncoder(nn.Module):
    """A frozen text encoder: ``dim``, ``max_len``, ``spec`` and ``encode(list[str])``.

    Subclasses implement ``tokenize(texts) -> (ids, mask)`` and ``hidden_states(ids, mask)``.
    ``stores_weights``: True when the weights must travel inside the generator run (random towers).
    """

    spec: str = ""
    dim: int = 0
    max_len: int = 0
    stores_weights: bool = False

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":  # always in eval mode (frozen)
        return super().train(False)

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """list of B strings -> hidden (B, max_len, dim) float32, mask (B, max_len) bool (on the
        encoder's device). A row with no valid position (an empty text for tokenizers that add no
        special tokens) gets position 0 marked valid, so attention never sees an empty row."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings")
        hs, ms = [], []
        for s in range(0, len(texts), batch_size):
            ids, mask = self.tokenize([str(t) for t in texts[s: s + batch_size]])
            ids, mask = ids.to(self.device), mask.to(self.device).bool()
            mask[:, 0] |= ~mask.any(1)
            hs.append(self.hidden_states(ids, mask).float())
            ms.append(mask)
        if not hs:
            return torch.zeros(0, self.max_len, self.dim, device=self.device), torch.zeros(
                0, self.max_len, dtype=torch.bool, device=self.device)
        return torch.cat(hs), torch.cat(ms)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, dim={self.dim}, max_len={self.max_len}"


def _eot_mask(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """CLIP-style: every position up to and including the first end-of-text token is valid."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    has = (ids == eot_id).any(1)
    end = torch.where(has, (ids == eot_id).int().argmax(1), torch.full_like(has, ids.shape[1] - 1, dtype=torch.long))
    return pos[None] <= end[:, None]


# ----------------------------------------------------------------------------- tiny (offline)
class TinyTextEncoder(TextEncoder):
    """open_clip's bundled BPE + a random causal TextTransformer (final ln_final token states)."""

    stores_weights = True

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 2, ctx: int = 32, seed: int = 0,
                 spec: Optional[str] = None):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer

        if width % heads:
            raise InputError(f"--text-encoder tiny: width {width} is not divisible by heads {heads}")
        self.tokenizer = SimpleTokenizer(context_length=ctx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tower = TextTransformer(context_length=ctx, width=width, heads=heads, layers=layers,
                                         output_dim=None, output_tokens=True)
        self.dim, self.max_len = width, ctx
        self.spec = spec or tiny_spec(width=width, layers=layers, heads=heads, ctx=ctx, seed=seed)
        self._freeze()

    def tokenize(self, texts):
        ids = self.tokenizer(list(texts))
        return ids, _eot_mask(ids, self.tokenizer.eot_token_id)

    def hidden_states(self, ids, mask):
        return self.tower(ids)[1]


def tiny_spec(**kw) -> str:
    """Canonical ``tiny:...`` spec listing only the values that differ from the defaults."""
    diff = [f"{k}={int(kw[k])}" for k in TINY_DEFAULTS if k in kw and int(kw[k]) != TINY_DEFAULTS[k]]
    return "tiny" + (":" + ",".join(diff) if diff else "")


def _parse_tiny(rest: str) -> dict:
    kw = dict(TINY_DEFAULTS)
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, sep, v = part.partition("=")
        if not sep or k not in TINY_DEFAULTS:
            raise InputError(f"--text-encoder tiny:{rest}: expected KEY=INT with KEY in {', '.join(TINY_DEFAULTS)}")
        try:
            kw[k] = int(v)
        except ValueError:
            raise InputError(f"--text-encoder tiny:{rest}: {k} must be an integer, got {v!r}") from None
    return kw


# ----------------------------------------------------------------------------- open_clip CLIP towers
class _CLIPTextTower(nn.Module):
    """The text half of an ``open_clip.CLIP``: embeddings, causal transformer, ln_final."""

    def __init__(self, model):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


class OpenCLIPTextEncoder(TextEncoder):
    """An open_clip model's text tower (hub tag or local checkpoint), final-layer token states."""

    def __init__(self, name: str, pretrained: Optional[str], spec: str):
        super().__init__()
        import open_clip
        from open_clip.transformer import TextTransformer

        if name not in open_clip.list_models():
            raise InputError(f"--text-encoder {spec}: {name!r} is not an open_clip model "
                             f"(e.g. ViT-B-32, ViT-L-14; see open_clip.list_models())")
        try:
            model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
        except Exception as e:  # noqa: BLE001 - download / file errors of many kinds
            raise InputError(f"--text-encoder {spec}: cannot load {name} weights {pretrained!r} ({e})") from None
        self.tokenizer = open_clip.get_tokenizer(name)
        text = getattr(model, "text", None)
        if text is None:
            self.tower = _CLIPTextTower(model)
            width = model.ln_final.normalized_shape[0]
        elif isinstance(text, TextTransformer) and text.cls_emb is None:
            text.output_tokens = True
            self.tower = _TokensOf(text)
            width = text.width
        else:
            raise InputError(f"--text-encoder {spec}: the text tower of {name} ({type(text).__name__}) is not "
                             f"supported; use its Hugging Face version with hf:NAME")
        del model
        self.dim, self.max_len, self.spec = int(width), int(getattr(self.tokenizer, "context_length", 77)), spec
        self._freeze()

    def tokenize(self, texts):
        ids = self.tokenizer(list(texts))
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None:
            return ids, _eot_mask(ids, eot)
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", 0) or 0
        return ids, ids != pad

    def hidden_states(self, ids, mask):
        return self.tower(ids)


class _TokensOf(nn.Module):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def forward(self, ids):
        return self.text(ids)[1]


# ----------------------------------------------------------------------------- Hugging Face
class HFTextEncoder(TextEncoder):
    """transformers AutoTokenizer + AutoModel: last hidden states, padded to ``max_len``."""

    def __init__(self, name: str, spec: str, max_len: int = 77):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise InputError(f"--text-encoder {spec}: needs the 'transformers' package "
                             f"(pip install transformers), or use tiny / clip:NAME") from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name)
            model = transformers.AutoModel.from_pretrained(name, torch_dtype="auto")
        except Exception as e:  # noqa: BLE001 - hub / file errors of many kinds
            raise InputError(f"--text-encoder {spec}: cannot load {name!r} with transformers ({e})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "right"
        if hasattr(model, "text_model"):  # CLIP / SigLIP dual encoders
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):  # T5 & co.
            model = model.get_encoder()
        self.tokenizer, self.model, self.spec = tok, model, spec
        self.max_len = int(max_len)
        self._freeze()
        self.dim = int(self.encode([""])[0].shape[-1])

    def tokenize(self, texts):
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def hidden_states(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


# ----------------------------------------------------------------------------- factory
def canonical_spec(spec: str, root=None) -> str:
    """The spec a run records: ``tiny[:...]``, ``open_clip:NAME:PRETRAINED`` or ``hf:NAME_OR_PATH``
    (local paths made absolute). Does not load anything heavy."""
    spec = str(spec).strip()
    if not spec:
        raise InputError("--text-encoder: empty spec; use tiny, clip:NAME/PRETRAINED, hf:NAME or a path")
    if spec == "tiny" or spec.startswith("tiny:"):
        return tiny_spec(**_parse_tiny(spec[5:]))
    if spec.startswith("clip:"):
        name, _, pre = spec[5:].partition("/")
        return f"open_clip:{name}:{_abs(pre, root) if pre else _default_tag(name)}"
    if spec.startswith("open_clip:"):
        name, sep, pre = spec[len("open_clip:"):].partition(":")
        if not name:
            raise InputError(f"--text-encoder {spec}: expected open_clip:NAME:PRETRAINED")
        return f"open_clip:{name}:{_abs(pre, root) if pre else _default_tag(name)}"
    if spec.startswith("hf:"):
        return f"hf:{_abs(spec[3:], root)}"
    local = _local(spec, root)
    if local is not None:
        return f"hf:{local}"
    try:
        import open_clip

        if spec in open_clip.list_models():
            return f"open_clip:{spec}:{_default_tag(spec)}"
    except ImportError:  # pragma: no cover - open_clip is a dependency
        pass
    return f"hf:{spec}"


def _local(p: str, root) -> Optional[str]:
    for cand in ([Path(root) / p] if root is not None and not Path(p).is_absolute() else []) + [Path(p)]:
        if cand.exists():
            return str(cand.resolve())
    return None


def _abs(p: str, root) -> str:
    return _local(p, root) or p


def _default_tag(name: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise InputError(f"--text-encoder {name}: open_clip has no pretrained weights for it; "
                         f"pass open_clip:{name}:PATH_TO_WEIGHTS")
    return "openai" if "openai" in tags else tags[0]


def build_text_encoder(spec: str, root=None, max_len: Optional[int] = None) -> TextEncoder:
    """Build (and load) the frozen text encoder a spec names; see the module docstring."""
    spec = canonical_spec(spec, root)
    if spec.startswith("tiny"):
        return TinyTextEncoder(**_parse_tiny(spec[5:]), spec=spec)
    if spec.startswith("open_clip:"):
        name, _, pre = spec[len("open_clip:"):].partition(":")
        return OpenCLIPTextEncoder(name, pre, spec)
    if spec.startswith("hf:"):
        return HFTextEncoder(spec[3:], spec, max_len=max_len or 77)
    raise InputError(f"--text-encoder {spec}: unknown spec")  # pragma: no cover


__all__: List[str] = [
    "TextEncoder", "TinyTextEncoder", "OpenCLIPTextEncoder", "HFTextEncoder", "build_text_encoder",
    "canonical_spec", "tiny_spec",
]
