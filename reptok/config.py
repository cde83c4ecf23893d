"""Configuration dataclasses: everything needed to rebuild the models of a run.

A run directory's ``config.json`` is ``PipelineConfig.to_dict()``; ``PipelineConfig.from_dict``
reads it back. Unknown keys are an error (a typo in a ``--config`` file must not pass silently).

Time convention (the one used everywhere inside reptok): **t = 0 is noise, t = 1 is data**,
x_t = t * x1 + (1 - t) * x0 and the velocity target is x1 - x0. The official decoder uses the
opposite convention; ``FlowDecoder`` converts at its boundary (see models/decoder.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from .errors import InputError


class ConfigError(InputError):
    """A configuration that cannot be built (unknown key, bad value). ``key`` is the dotted
    config key at fault and ``value`` its value (when known), so that the CLI can name its
    own option (``--steps 0``) instead of the key (``train.steps=0``)."""

    def __init__(self, message: str, key: Optional[str] = None, value: Any = None, allowed: str = ""):
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed


# ----------------------------------------------------------------------------- rules beside the fields
Rule = Tuple[Callable[[Any], bool], str]  # (predicate, what is allowed)
VAL_FEATURES = ("auto", "judge", "inception", "none")  # reptok.train.validate
TIME_SAMPLERS = ("logit_normal", "uniform")  # reptok.flow.sample_time
TOKEN_NORMS = ("scalar", "per_dim")
SOLVERS = ("euler", "heun")  # reptok.flow.SOLVERS


def ge(lo) -> Rule:
    return (lambda v: v >= lo), f"must be >= {lo}"


GT0: Rule = ((lambda v: v > 0), "must be > 0")
UNIT: Rule = ((lambda v: 0.0 <= v < 1.0), "must be in [0, 1)")


def one_of(options) -> Rule:
    return (lambda v: v in options), "choose one of " + " | ".join(options)


def _pair(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (tuple, list)) and len(v) == 2
                      and all(isinstance(x, (int, float)) for x in v) and ok(v))


def ruled(default: Any = dataclasses.MISSING, rule: Optional[Rule] = None, **kw: Any) -> Any:
    """A dataclass field whose rule (checked by :func:`check_rules`) sits beside it."""
    return field(default=default, metadata={"rule": rule} if rule else {}, **kw)


INTERVAL: Rule = (_pair(lambda v: 0.0 <= v[0] <= v[1] <= 1.0), "two numbers 0 <= lo <= hi <= 1, like 0.3,0.9")
BETAS: Rule = (_pair(lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1), like 0.9,0.999")
COOLDOWN: Rule = ((lambda v: 0.0 <= v <= 1.0), "must be a fraction of the steps in [0, 1]")


@dataclass
class EncoderConfig:
    """The self-supervised ViT whose final-norm ``[cls]`` output is the latent token."""

    model: str = "vit_base_patch14_reg4_dinov2"  # timm architecture name
    # "hub": timm pretrained weights (downloaded or from the HF cache); "random": random init
    # (tests); "builtin:shapes-ssl": SimCLR-pretrained offline on builtin:shapes (CPU presets);
    # otherwise a path to a local weights file (timm or original DINOv2 naming) or to a
    # timm/HF model directory.
    weights: str = "hub"
    img_size: int = ruled(224, ge(1))  # the encoder's input resolution (images are resized to it)
    dim: int = ruled(768, ge(1))  # width of the token (= the ViT embed dim)
    # Extra keyword arguments for ``timm.create_model`` (embed_dim, depth, num_heads, patch_size,
    # init_values, ...). Lets tiny presets reuse the same architecture class.
    overrides: dict = field(default_factory=dict)
    # Normalisation; None means the timm pretrained config's mean/std (ImageNet for DINOv2).
    mean: Optional[list] = None
    std: Optional[list] = None
    seed: int = 0  # random-init seed (weights == "random")
    # The method trains only the cls token of a *pre-trained* SSL ViT (False). True trains the
    # whole encoder: the paper's "no SSL prior" ablation, for random-init encoders whose frozen
    # cls output carries little information (offline there is no SSL checkpoint).
    train_backbone: bool = False


@dataclass
class VAEConfig:
    """Latent space for the decoder: a diffusers AutoencoderKL, or ``none`` for pixel space."""

    source: str = "stabilityai/sd-vae-ft-mse"  # hub id, local directory (relative to the run dir allowed) or "none"
    subfolder: Optional[str] = None
    scale: float = ruled(0.18215, GT0)
    shift: float = 0.0
    latent_channels: int = ruled(4, ge(1))
    downsample: int = ruled(8, ge(1))  # image size / latent size

    @property
    def is_pixel(self) -> bool:
        return self.source in ("none", "", None)


@dataclass
class DecoderConfig:
    """FlowDecoder sizes. Defaults are the released XL decoder (official spec section 3)."""

    in_channels: int = ruled(4, ge(1))  # VAE latent channels, or 3 in pixel space
    input_size: int = ruled(32, ge(1))  # spatial size of the decoder's input (latent or pixels)
    patch_size: int = ruled(2, ge(1))
    width: int = ruled(1152, ge(1))
    depth: int = ruled(28, ge(1))
    head_dim: int = ruled(72, ge(1))
    ff_expand: int = ruled(3, ge(1))
    mapping_width: int = ruled(1024, ge(1))
    mapping_depth: int = ruled(2, ge(0))
    mapping_ff_expand: int = ruled(3, ge(1))
    token_dim: int = ruled(768, ge(1))  # the encoder's token width
    # Training times of stage (a), reptok convention (t = 0 noise): sigmoid(loc + scale N(0, 1))
    # ("logit_normal") or U(0, 1) ("uniform"). Official decoder: logit-normal(0, 1), which is
    # symmetric, so it is the same distribution in the official t = 1-noise convention.
    time_sampler: str = ruled("logit_normal", one_of(TIME_SAMPLERS))
    time_loc: float = 0.0
    time_scale: float = ruled(1.0, GT0)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass
class GeneratorConfig:
    """TokenGenerator (MLP-Mixer) sizes. Defaults are the best-guess XL generator (spec 6.2)."""

    token_dim: int = ruled(768, ge(1))
    n_tokens: int = ruled(1, ge(1))
    dim: int = ruled(1536, ge(1))
    depth: int = ruled(28, ge(1))
    token_expand: float = ruled(3.0, GT0)  # token-mixing expansion (official expansion_factor)
    channel_expand: float = ruled(4.0, GT0)  # channel-mixing expansion (official expansion_factor_token)
    dropout: float = ruled(0.0, UNIT)
    num_classes: int = ruled(1000, ge(0))  # 0 means unconditional
    class_dropout: float = ruled(0.1, UNIT)
    # Generator space (stage b): "scalar" = z / s with one s, the std of all training token
    # elements (the official cls / scale_factor, no mean); "per_dim" = (z - mean_d) / std_d.
    # Stored as the generator's token_mean / token_std buffers, which sampling uses. Run configs
    # written before this key existed read back as "per_dim" (what they were trained with).
    token_norm: str = ruled("scalar", one_of(TOKEN_NORMS))
    # Training times of stage (b): the official FlowModel draws U(0, 1) without a
    # timestep_sampler; "logit_normal" is sigmoid(loc + scale N(0, 1)).
    time_sampler: str = ruled("uniform", one_of(TIME_SAMPLERS))
    time_loc: float = 0.0
    time_scale: float = ruled(1.0, GT0)
    # Text conditioning (text-to-image variant); None for class-conditional generators.
    # A spec of reptok.models.text.build_text_encoder: tiny[:...], open_clip:NAME:PRETRAINED, hf:NAME.
    text_encoder: Optional[str] = None
    text_tokens: int = ruled(4, ge(1))  # learnable tokens concatenated to the noisy token (paper: 4)
    text_dim: int = ruled(0, ge(0))  # hidden size of the text encoder (filled in when built)
    text_len: int = ruled(0, ge(0))  # the text encoder's max tokens L (filled in when built)
    cross_heads: int = ruled(4, ge(1))  # heads of the cross-attention to the text states
    caption_dropout: float = ruled(0.1, UNIT)  # captions replaced by "" (the CFG null prompt) in training


@dataclass
class SamplingConfig:
    """Default sampler settings (official: 50 Euler steps, CFG 1.5 in [0.3, 0.9], decoder 50)."""

    steps: int = ruled(50, ge(1))
    solver: str = ruled("euler", one_of(SOLVERS))
    cfg: float = ruled(1.5, ge(0))
    cfg_interval: tuple = ruled((0.3, 0.9), INTERVAL)
    decoder_steps: int = ruled(50, ge(1))
    decoder_solver: str = ruled("euler", one_of(SOLVERS))


@dataclass
class TrainConfig:
    """Optimisation settings shared by both training stages."""

    steps: int = ruled(1000, ge(1))
    batch_size: int = ruled(32, ge(1))
    lr: float = ruled(1e-4, GT0)
    weight_decay: float = ruled(0.0, ge(0))
    betas: tuple = ruled((0.9, 0.999), BETAS)
    warmup: int = ruled(0, ge(0))
    # Fraction of the steps at the end over which the lr falls linearly to 0 (a warmup-stable-
    # decay schedule); 0 keeps it constant, as the paper's long runs do. Short runs gain a lot.
    cooldown: float = ruled(0.0, COOLDOWN)
    grad_clip: float = ruled(1.0, ge(0))
    ema: float = ruled(0.999, UNIT)
    cos_weight: float = ruled(1.0, ge(0))  # lambda of the cosine anchor (stage a)
    # Multiplies the lr of the encoder's cls token (stage a). 1 is the paper's one lr for all;
    # the token is a single vector read through a frozen network, and on small, short runs its
    # gradient is too weak for it to move at the decoder's lr.
    token_lr_scale: float = ruled(1.0, GT0)
    log_every: int = ruled(10, ge(1))
    ckpt_every: int = ruled(500, ge(1))
    sample_every: int = ruled(500, ge(0))
    seed: int = 0
    grad_accum: int = ruled(1, ge(1))
    # Random horizontal flips (seeded with the rest of step s). On for the ImageNet presets.
    hflip: bool = False
    # Validation on a held-out set (train recon --val-data / train gen --val-tokens), see
    # reptok/train/validate.py: every val_every steps (0: off), on val_examples held-out items
    # (fixed-t flow loss), val_fid_n of them reconstructed / generated for the Fréchet proxies.
    val_every: int = ruled(500, ge(0))
    val_examples: int = ruled(1000, ge(1))
    val_fid_n: int = ruled(256, ge(0))
    # Features of stage a's FID proxy: auto (the builtin judge up to 32 px, Inception above) | judge | inception | none
    val_features: str = ruled("auto", one_of(VAL_FEATURES))


@dataclass
class PipelineConfig:
    """Everything a run directory needs to rebuild its models."""

    image_size: int = ruled(256, ge(1))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    generator: Optional[GeneratorConfig] = field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_names: Optional[list] = None
    preset: Optional[str] = None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as in config.json

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        return _from_dict(cls, _upgrade_legacy(d), "config", "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> "PipelineConfig":
        """Deep override with dotted keys: ``cfg.replace(**{"decoder.depth": 4})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            apply_override(d, key, coerce(key, value))
        return PipelineConfig.from_dict(d)

    def validate(self) -> "PipelineConfig":
        """Every field's rule, then what ties fields together."""
        check_rules(self)
        v, dc, g = self.vae, self.decoder, self.generator
        expect = self.image_size if v.is_pixel else self.image_size // v.downsample
        if dc.input_size != expect:
            raise ConfigError(f"decoder.input_size={dc.input_size} but the {'image' if v.is_pixel else 'latent'} size is {expect}")
        chans = 3 if v.is_pixel else v.latent_channels
        if dc.in_channels != chans:
            raise ConfigError(f"decoder.in_channels={dc.in_channels} but the decoder input has {chans} channels")
        if dc.input_size % dc.patch_size:
            raise ConfigError(f"decoder.input_size={dc.input_size} is not divisible by patch_size={dc.patch_size}")
        if dc.width % dc.head_dim:
            raise ConfigError(f"decoder.width={dc.width} is not divisible by head_dim={dc.head_dim}")
        if dc.token_dim != self.encoder.dim:
            raise ConfigError(f"decoder.token_dim={dc.token_dim} != encoder.dim={self.encoder.dim}")
        if g is not None and g.token_dim != self.encoder.dim:
            raise ConfigError(f"generator.token_dim={g.token_dim} != encoder.dim={self.encoder.dim}")
        if g is not None and g.text_encoder is not None:
            if g.num_classes:
                raise ConfigError(f"generator.num_classes={g.num_classes}: a text-conditioned generator has no classes (use 0)")
            if g.dim % g.cross_heads:
                raise ConfigError(f"generator.dim={g.dim} is not divisible by generator.cross_heads={g.cross_heads}")
        if self.train.batch_size % self.train.grad_accum:  # else fit() refuses it after loading everything
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by train.grad_accum="
                              f"{self.train.grad_accum}: pick a multiple", key="train.grad_accum",
                              value=self.train.grad_accum,
                              allowed=f"must divide the batch size ({self.train.batch_size})")
        return self


def _upgrade_legacy(d: Any) -> Any:
    """A config written before the per-stage time samplers (it has ``train.time_sampler``, which
    every earlier ``to_dict`` wrote): both stages keep that sampler, and its generator keeps the
    per-dimension token normalisation it was trained with (the new default is "scalar")."""
    if not isinstance(d, dict) or not isinstance(d.get("train"), dict) or "time_sampler" not in d["train"]:
        return d
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    kind = d["train"].pop("time_sampler")
    for part in ("decoder", "generator"):
        if isinstance(d.get(part), dict):
            d[part].setdefault("time_sampler", kind)
    if isinstance(d.get("generator"), dict):
        d["generator"].setdefault("token_norm", "per_dim")
    return d


# ----------------------------------------------------------------------------- walking the fields
@functools.lru_cache(maxsize=None)
def _fields(cls) -> "tuple[tuple[dataclasses.Field, Any, bool], ...]":
    """(field, base type, optional) of a config dataclass; types from ``typing.get_type_hints``
    (this module's annotations are postponed strings), ``Optional[X]`` unwrapped to X."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t, args = hints[f.name], typing.get_args(hints[f.name])
        optional = typing.get_origin(t) is typing.Union and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else t
        out.append((f, base, optional))
    return tuple(out)  # cached: shared by every caller


def _lookup(dotted: str) -> Optional[tuple]:
    """(field, base type, optional) of a dotted key; None for a key the dataclasses do not
    declare (unknown, or inside a free-form dict such as encoder.overrides)."""
    cls, found = PipelineConfig, None
    for p in dotted.split("."):
        if cls is None:
            return None
        found = next((x for x in _fields(cls) if x[0].name == p), None)
        if found is None:
            return None
        cls = found[1] if dataclasses.is_dataclass(found[1]) else None
    return found


def _dotted_keys(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict) and k != "overrides":
            out.extend(_dotted_keys(v, prefix + k + "."))
    return out


def unknown_key(dotted: str, d: dict) -> ConfigError:
    """'unknown config key' with the closest known key (difflib) as a suggestion."""
    close = difflib.get_close_matches(dotted, _dotted_keys(d), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {dotted!r}{hint}", key=dotted)


def apply_override(d: dict, dotted: str, value: Any) -> None:
    """Set ``d['a']['b'] = value`` for ``dotted == 'a.b'``; unknown keys raise ConfigError."""
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            if p == "generator" and cur.get(p) is None and cur is d:
                raise ConfigError(f"{dotted!r}: this config has no generator", key=dotted)
            raise unknown_key(dotted, d)
        cur = cur[p]
    if parts[-1] not in cur:
        raise unknown_key(dotted, d)
    cur[parts[-1]] = value


# ----------------------------------------------------------------------------- types
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
         tuple: "a list like 0.3,0.9", list: "a list like 0.3,0.9", dict: 'a JSON object like {"depth": 2}'}


def _from_text(base: type, text: str) -> Any:
    """An option / ``--set`` string as a value of ``base`` (left as is when it does not parse:
    the type check then names what was expected)."""
    text = text.strip()
    try:
        if base is bool and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if base in (int, float):
            return base(text)
        if base in (tuple, list) and not text.startswith("["):
            return [_number(v.strip()) for v in text.split(",") if v.strip()]
        if base in (tuple, list, dict):
            return json.loads(text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        pass
    return text


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _typed(base: type, value: Any, key: str) -> Any:
    """``value`` as a ``base`` (an int is a float, an integral float an int, a list a tuple);
    ConfigError naming the key, the value and the expected type otherwise."""
    if base is bool and isinstance(value, int) and value in (0, 1):
        return bool(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is float and number:
        return float(value)
    if base is int and number and float(value).is_integer():
        return int(value)
    if base in (tuple, list) and isinstance(value, (tuple, list)):
        return base(value)
    if base in (str, dict) and isinstance(value, base):
        return value
    if base not in _WHAT:  # a nested config (generator=None): from_dict checks it
        return value
    raise ConfigError(f"{key}={value!r}: expected {_WHAT[base]}", key=key, value=value,
                      allowed=f"expected {_WHAT[base]}")


def coerce(dotted: str, value: Any) -> Any:
    """A ``--set`` / option value converted to the field's type (``"4"`` -> 4 for an int field,
    ``"0.3,0.9"`` -> (0.3, 0.9) for a tuple, ``"none"`` -> None for an Optional one); ConfigError
    naming the key, the value and the expected type otherwise. Unknown keys pass through (the
    caller reports them with a suggestion)."""
    found = _lookup(dotted)
    if found is None:
        return value
    _, base, optional = found
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    if isinstance(value, str) and base is not str:
        value = _from_text(base, value)
    if isinstance(value, (int, float)) and base is str and not isinstance(value, bool):
        value = str(value)  # --set generator.text_encoder=5 parses as JSON 5
    return None if value is None and optional else _typed(base, value, dotted)


# ----------------------------------------------------------------------------- rules
def _get(cfg: "PipelineConfig", dotted: str) -> Any:
    return functools.reduce(lambda part, name: None if part is None else getattr(part, name), dotted.split("."), cfg)


def rules(cls=None, prefix: str = "") -> "list[tuple[str, Rule]]":
    """(dotted key, rule) of every field that has one, nested configs included."""
    out = []
    for f, base, _ in _fields(cls or PipelineConfig):
        if dataclasses.is_dataclass(base):
            out.extend(rules(base, f"{prefix}{f.name}."))
        elif f.metadata.get("rule"):
            out.append((prefix + f.name, f.metadata["rule"]))
    return out


def check_rules(cfg: "PipelineConfig", keys: Optional[set] = None) -> None:
    """Every field's rule (or those of ``keys``); ConfigError with key, value, allowed."""
    for key, (ok, allowed) in rules():
        value = _get(cfg, key) if keys is None or key in keys else None
        if value is None:
            continue
        try:
            good = bool(ok(value)) and not (isinstance(value, float) and math.isnan(value))
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={_show(value)}: {allowed}", key=key, value=value, allowed=allowed)


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return repr(v) if isinstance(v, str) else str(v)


def _from_dict(cls, d: Any, where: str, prefix: str):
    """A config dataclass from a JSON object; a file's values must already have their field's
    type (strings are not parsed here: "4" in a JSON file for an int field is an error)."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: (base, optional) for f, base, optional in _fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{hint}")
    kwargs = {}
    for name, value in d.items():
        base, optional = fields[name]
        if dataclasses.is_dataclass(base):
            kwargs[name] = _from_dict(base, value, f"{where}.{name}", f"{prefix}{name}.")
        elif value is None:
            kwargs[name] = value
        elif isinstance(value, str) and base is not str:
            raise ConfigError(f"{prefix}{name}={value!r}: expected {base.__name__}", key=prefix + name,
                              value=value, allowed=f"expected {base.__name__}")
        else:
            kwargs[name] = _typed(base, value, prefix + name)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- swaps
def with_encoder(cfg: PipelineConfig, model: Optional[str] = None, weights: Optional[str] = None,
                 dim: Optional[int] = None) -> PipelineConfig:
    """Swap the SSL encoder (a timm ViT name of width ``dim``: the models layer measures it, see
    ``reptok.models.encoder.vit_width``) and/or its weights; token widths follow."""
    cfg = PipelineConfig.from_dict(cfg.to_dict())
    if weights is not None:
        cfg.encoder.weights = str(Path(weights).resolve()) if Path(weights).exists() else weights
    if model is not None and model != cfg.encoder.model:
        if dim is None:
            raise ValueError(f"with_encoder({model!r}): pass its width (reptok.models.encoder.vit_width)")
        cfg.encoder.model, cfg.encoder.overrides, cfg.encoder.img_size = model, {}, 224
        cfg.encoder.dim = int(dim)
        if weights is None and cfg.encoder.weights == "random":
            cfg.encoder.weights = "hub"
    cfg.decoder.token_dim = cfg.encoder.dim
    if cfg.generator is not None:
        cfg.generator.token_dim = cfg.encoder.dim
    return cfg


def with_vae(cfg: PipelineConfig, source: Optional[str]) -> PipelineConfig:
    """Swap the latent space: a diffusers VAE (hub id / dir) or "none" (pixel space)."""
    if source is None:
        return cfg
    cfg = PipelineConfig.from_dict(cfg.to_dict())
    # A local VAE directory is recorded absolute so the run loads from any working directory.
    cfg.vae.source = str(Path(source).resolve()) if Path(source).exists() else source
    if cfg.vae.is_pixel:
        cfg.decoder.in_channels, cfg.decoder.input_size = 3, cfg.image_size
    else:
        cfg.decoder.in_channels = cfg.vae.latent_channels
        cfg.decoder.input_size = cfg.image_size // cfg.vae.downsample
    return cfg
