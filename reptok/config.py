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
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


from .errors import InputError


class ConfigError(InputError):
    """A configuration that cannot be built (unknown key, bad value). ``key`` is the dotted
    config key at fault and ``value`` its value (when known), so that the CLI can name its
    own option (``--steps 0``) instead of the key (``train.steps=0``)."""

    def __init__(self, message: str, key: Optional[str] = None, value: Any = None, allowed: str = ""):
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed


@dataclass
class EncoderConfig:
    """The self-supervised ViT whose final-norm ``[cls]`` output is the latent token."""

    model: str = "vit_base_patch14_reg4_dinov2"  # timm architecture name
    # "hub": timm pretrained weights (downloaded or from the HF cache); "random": random init
    # (tests); "builtin:shapes-ssl": SimCLR-pretrained offline on builtin:shapes (CPU presets);
    # otherwise a path to a local weights file (timm or original DINOv2 naming) or to a
    # timm/HF model directory.
    weights: str = "hub"
    img_size: int = 224  # the encoder's input resolution (images are resized to it)
    dim: int = 768  # width of the token (= the ViT embed dim)
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
    scale: float = 0.18215
    shift: float = 0.0
    latent_channels: int = 4
    downsample: int = 8  # image size / latent size

    @property
    def is_pixel(self) -> bool:
        return self.source in ("none", "", None)


@dataclass
class DecoderConfig:
    """FlowDecoder sizes. Defaults are the released XL decoder (official spec section 3)."""

    in_channels: int = 4  # VAE latent channels, or 3 in pixel space
    input_size: int = 32  # spatial size of the decoder's input (latent or pixels)
    patch_size: int = 2
    width: int = 1152
    depth: int = 28
    head_dim: int = 72
    ff_expand: int = 3
    mapping_width: int = 1024
    mapping_depth: int = 2
    mapping_ff_expand: int = 3
    token_dim: int = 768  # the encoder's token width
    # Training times of stage (a), reptok convention (t = 0 noise): sigmoid(loc + scale N(0, 1))
    # ("logit_normal") or U(0, 1) ("uniform"). Official decoder: logit-normal(0, 1), which is
    # symmetric, so it is the same distribution in the official t = 1-noise convention.
    time_sampler: str = "logit_normal"
    time_loc: float = 0.0
    time_scale: float = 1.0

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass
class GeneratorConfig:
    """TokenGenerator (MLP-Mixer) sizes. Defaults are the best-guess XL generator (spec 6.2)."""

    token_dim: int = 768
    n_tokens: int = 1
    dim: int = 1536
    depth: int = 28
    token_expand: float = 3.0  # token-mixing expansion (official expansion_factor)
    channel_expand: float = 4.0  # channel-mixing expansion (official expansion_factor_token)
    dropout: float = 0.0
    num_classes: int = 1000  # 0 means unconditional
    class_dropout: float = 0.1
    # Generator space (stage b): "scalar" = z / s with one s, the std of all training token
    # elements (the official cls / scale_factor, no mean); "per_dim" = (z - mean_d) / std_d.
    # Stored as the generator's token_mean / token_std buffers, which sampling uses. Run configs
    # written before this key existed read back as "per_dim" (what they were trained with).
    token_norm: str = "scalar"
    # Training times of stage (b): the official FlowModel draws U(0, 1) without a
    # timestep_sampler; "logit_normal" is sigmoid(loc + scale N(0, 1)).
    time_sampler: str = "uniform"
    time_loc: float = 0.0
    time_scale: float = 1.0
    # Text conditioning (text-to-image variant); None for class-conditional generators.
    # A spec of reptok.models.text.build_text_encoder: tiny[:...], open_clip:NAME:PRETRAINED, hf:NAME.
    text_encoder: Optional[str] = None
    text_tokens: int = 4  # learnable tokens concatenated to the noisy token (paper: 4)
    text_dim: int = 0  # hidden size of the text encoder (filled in when built)
    text_len: int = 0  # the text encoder's max tokens L (filled in when built)
    cross_heads: int = 4  # heads of the cross-attention to the text states
    caption_dropout: float = 0.1  # captions replaced by "" (the CFG null prompt) in training


@dataclass
class SamplingConfig:
    """Default sampler settings (official: 50 Euler steps, CFG 1.5 in [0.3, 0.9], decoder 50)."""

    steps: int = 50
    solver: str = "euler"
    cfg: float = 1.5
    cfg_interval: tuple = (0.3, 0.9)
    decoder_steps: int = 50
    decoder_solver: str = "euler"


@dataclass
class TrainConfig:
    """Optimisation settings shared by both training stages."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup: int = 0
    # Fraction of the steps at the end over which the lr falls linearly to 0 (a warmup-stable-
    # decay schedule); 0 keeps it constant, as the paper's long runs do. Short runs gain a lot.
    cooldown: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    cos_weight: float = 1.0  # lambda of the cosine anchor (stage a)
    # Multiplies the lr of the encoder's cls token (stage a). 1 is the paper's one lr for all;
    # the token is a single vector read through a frozen network, and on small, short runs its
    # gradient is too weak for it to move at the decoder's lr.
    token_lr_scale: float = 1.0
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500
    seed: int = 0
    grad_accum: int = 1
    # Random horizontal flips (seeded with the rest of step s). On for the ImageNet presets.
    hflip: bool = False
    # Validation on a held-out set (train recon --val-data / train gen --val-tokens), see
    # reptok/train/validate.py: every val_every steps (0: off), on val_examples held-out items
    # (fixed-t flow loss), val_fid_n of them reconstructed / generated for the Fréchet proxies.
    val_every: int = 500
    val_examples: int = 1000
    val_fid_n: int = 256
    # Features of stage a's FID proxy: auto (the builtin judge up to 32 px, Inception above) | judge | inception | none
    val_features: str = "auto"


@dataclass
class PipelineConfig:
    """Everything a run directory needs to rebuild its models."""

    image_size: int = 256
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
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        return _from_dict(cls, _upgrade_legacy(d), "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> "PipelineConfig":
        """Deep override with dotted keys: ``cfg.replace(**{"decoder.depth": 4})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            apply_override(d, key, coerce(key, value, self))
        return PipelineConfig.from_dict(d)

    def validate(self) -> "PipelineConfig":
        v, dc = self.vae, self.decoder
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
        if self.generator is not None and self.generator.token_dim != self.encoder.dim:
            raise ConfigError(f"generator.token_dim={self.generator.token_dim} != encoder.dim={self.encoder.dim}")
        g = self.generator
        if g is not None and g.text_encoder is not None:
            if g.num_classes:
                raise ConfigError(f"generator.num_classes={g.num_classes}: a text-conditioned generator has no classes (use 0)")
            if g.cross_heads < 1 or g.dim % g.cross_heads:
                raise ConfigError(f"generator.dim={g.dim} is not divisible by generator.cross_heads={g.cross_heads}")
            if not 0.0 <= g.caption_dropout < 1.0:
                raise ConfigError(f"generator.caption_dropout={g.caption_dropout}: must be in [0, 1)")
        for name, part in (("decoder", dc), ("generator", g)):
            if part is None:
                continue
            if part.time_sampler not in TIME_SAMPLERS:
                raise ConfigError(f"{name}.time_sampler={part.time_sampler!r}: choose one of {' | '.join(TIME_SAMPLERS)}",
                                  key=f"{name}.time_sampler", value=part.time_sampler,
                                  allowed="choose one of " + " | ".join(TIME_SAMPLERS))
            if not part.time_scale > 0:
                raise ConfigError(f"{name}.time_scale={part.time_scale}: must be > 0", key=f"{name}.time_scale",
                                  value=part.time_scale, allowed="must be > 0")
        if g is not None and g.token_norm not in TOKEN_NORMS:
            raise ConfigError(f"generator.token_norm={g.token_norm!r}: choose one of {' | '.join(TOKEN_NORMS)}",
                              key="generator.token_norm", value=g.token_norm, allowed="choose one of " + " | ".join(TOKEN_NORMS))
        if not self.train.token_lr_scale > 0:
            raise ConfigError(f"train.token_lr_scale={self.train.token_lr_scale}: must be > 0")
        if not 0.0 <= self.train.cooldown <= 1.0:
            raise ConfigError(f"train.cooldown={self.train.cooldown}: must be a fraction of the steps in [0, 1]")
        check_rules(self)
        if self.train.batch_size % self.train.grad_accum:  # else fit() refuses it after loading everything
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by train.grad_accum="
                              f"{self.train.grad_accum}: pick a multiple", key="train.grad_accum",
                              value=self.train.grad_accum,
                              allowed=f"must divide the batch size ({self.train.batch_size})")
        return self


VAL_FEATURES = ("auto", "judge", "inception", "none")  # reptok.train.validate
TIME_SAMPLERS = ("logit_normal", "uniform")  # reptok.flow.sample_time
TOKEN_NORMS = ("scalar", "per_dim")


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


# ----------------------------------------------------------------------------- types and ranges
def field_type(dotted: str) -> Optional[str]:
    """The annotation (a string: this module uses postponed annotations) of a dotted key, e.g.
    "int", "Optional[str]", "tuple"; None for a key inside a free-form dict (encoder.overrides)."""
    cls = PipelineConfig
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields:
            return None
        if i == len(parts) - 1:
            return str(fields[p].type)
        sub = _NESTED.get((cls.__name__, p))
        if sub is None:
            return None
        cls = sub
    return None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce_scalar(base: str, value: Any, key: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{key}={value!r}: expected {what}", key=key, value=value, allowed=f"expected {what}")

    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("true or false")
    if base in ("int", "float"):
        what = "an integer" if base == "int" else "a number"
        if isinstance(value, str):
            try:
                value = int(value.strip()) if base == "int" else float(value.strip())
            except ValueError:
                raise bad(what) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(what)
        if base == "float":
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise bad(what)
        return int(value)
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if base in ("tuple", "list"):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise bad("a list like 0.3,0.9") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
                value = [_number(v) for v in value]
        if isinstance(value, (list, tuple)):
            return tuple(value) if base == "tuple" else list(value)
        raise bad("a list like 0.3,0.9")
    if base == "dict":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
        raise bad('a JSON object like {"depth": 2}')
    return value


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def coerce(dotted: str, value: Any, cfg: Optional["PipelineConfig"] = None) -> Any:
    """A ``--set`` / option value converted to the field's type (``"4"`` -> 4 for an int field,
    ``"0.3,0.9"`` -> (0.3, 0.9) for a tuple, ``"none"`` -> None for an Optional one); ConfigError
    naming the key, the value and the expected type otherwise. Unknown keys pass through (the
    caller reports them with a suggestion)."""
    t = field_type(dotted)
    if t is None:
        return value
    optional = t.startswith("Optional[")
    base = t[len("Optional["):-1] if optional else t
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    if base in ("GeneratorConfig",):
        return value
    return _coerce_scalar(base, value, dotted)


def _check_value_type(dotted: str, value: Any) -> None:
    """A config file's value must already have its field's type (ints are accepted as floats;
    strings are not parsed here: "4" in a JSON file for an int field is an error)."""
    t = field_type(dotted)
    if t is None or value is None:
        return
    base = t[len("Optional["):-1] if t.startswith("Optional[") else t
    if isinstance(value, str) and base not in ("str",):
        raise ConfigError(f"{dotted}={value!r}: expected {base}", key=dotted, value=value, allowed=f"expected {base}")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{dotted}={value!r}: expected a string", key=dotted, value=value, allowed="expected a string")
    _coerce_scalar(base, value, dotted)


SOLVERS = ("euler", "heun")  # the flow ODE solvers (reptok.flow runs them)


def _ge(lo):
    return (lambda v: v >= lo), f"must be >= {lo}"


def _gt0():
    return (lambda v: v > 0), "must be > 0"


def _unit(closed_hi: bool = False):
    if closed_hi:
        return (lambda v: 0.0 <= v <= 1.0), "must be in [0, 1]"
    return (lambda v: 0.0 <= v < 1.0), "must be in [0, 1)"


def _choice(options):
    return (lambda v: v in options), "choose one of " + " | ".join(options)


def _interval(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
            and 0.0 <= v[0] <= v[1] <= 1.0)


# Ranges and choices of every numeric / named field, checked by PipelineConfig.validate().
# (dotted key, predicate, what is allowed)
RULES: "list[tuple[str, Callable[[Any], bool], str]]" = [
    ("image_size", *_ge(1)),
    ("encoder.img_size", *_ge(1)), ("encoder.dim", *_ge(1)),
    ("vae.scale", *_gt0()), ("vae.latent_channels", *_ge(1)), ("vae.downsample", *_ge(1)),
    ("decoder.in_channels", *_ge(1)), ("decoder.input_size", *_ge(1)), ("decoder.patch_size", *_ge(1)),
    ("decoder.width", *_ge(1)), ("decoder.depth", *_ge(1)), ("decoder.head_dim", *_ge(1)),
    ("decoder.ff_expand", *_ge(1)), ("decoder.mapping_width", *_ge(1)), ("decoder.mapping_depth", *_ge(0)),
    ("decoder.mapping_ff_expand", *_ge(1)), ("decoder.token_dim", *_ge(1)),
    ("generator.token_dim", *_ge(1)), ("generator.n_tokens", *_ge(1)), ("generator.dim", *_ge(1)),
    ("generator.depth", *_ge(1)), ("generator.token_expand", *_gt0()), ("generator.channel_expand", *_gt0()),
    ("generator.dropout", *_unit()), ("generator.num_classes", *_ge(0)), ("generator.class_dropout", *_unit()),
    ("generator.text_tokens", *_ge(1)), ("generator.text_dim", *_ge(0)), ("generator.text_len", *_ge(0)),
    ("generator.cross_heads", *_ge(1)), ("generator.caption_dropout", *_unit()),
    ("sampling.steps", *_ge(1)), ("sampling.solver", *_choice(SOLVERS)), ("sampling.cfg", *_ge(0)),
    ("sampling.cfg_interval", _interval, "two numbers 0 <= lo <= hi <= 1, like 0.3,0.9"),
    ("sampling.decoder_steps", *_ge(1)), ("sampling.decoder_solver", *_choice(SOLVERS)),
    ("train.steps", *_ge(1)), ("train.batch_size", *_ge(1)), ("train.lr", *_gt0()),
    ("train.weight_decay", *_ge(0)),
    ("train.betas", lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(0 <= b < 1 for b in v),
     "two numbers in [0, 1), like 0.9,0.999"),
    ("train.warmup", *_ge(0)), ("train.cooldown", *_unit(True)), ("train.grad_clip", *_ge(0)),
    ("train.ema", *_unit()), ("train.cos_weight", *_ge(0)), ("train.token_lr_scale", *_gt0()),
    ("train.log_every", *_ge(1)), ("train.ckpt_every", *_ge(1)), ("train.sample_every", *_ge(0)),
    ("train.grad_accum", *_ge(1)), ("train.val_every", *_ge(0)), ("train.val_examples", *_ge(1)),
    ("train.val_fid_n", *_ge(0)), ("train.val_features", *_choice(VAL_FEATURES)),
]


def _get(cfg: "PipelineConfig", dotted: str) -> Any:
    cur: Any = cfg
    for p in dotted.split("."):
        if cur is None:
            return None
        cur = getattr(cur, p)
    return cur


def check_rules(cfg: "PipelineConfig", keys: Optional[set] = None) -> None:
    """Every rule of :data:`RULES` (or those of ``keys``); ConfigError with key, value, allowed."""
    for key, ok, allowed in RULES:
        if keys is not None and key not in keys:
            continue
        value = _get(cfg, key)
        if value is None:
            continue
        good = False
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


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _from_dict(cls, d: Any, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{hint}")
    prefix = "" if where == "config" else where.split(".", 1)[1] + "." if "." in where else ""
    kwargs = {}
    for name, value in d.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, f"{where}.{name}")
        elif isinstance(fields[name].default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
        if sub is None and where.startswith("config"):
            _check_value_type(prefix + name, kwargs[name])
    return cls(**kwargs)


_NESTED = {
    ("PipelineConfig", "encoder"): EncoderConfig,
    ("PipelineConfig", "vae"): VAEConfig,
    ("PipelineConfig", "decoder"): DecoderConfig,
    ("PipelineConfig", "generator"): GeneratorConfig,
    ("PipelineConfig", "sampling"): SamplingConfig,
    ("PipelineConfig", "train"): TrainConfig,
}


# ----------------------------------------------------------------------------- swaps
def with_encoder(cfg: PipelineConfig, model: Optional[str] = None, weights: Optional[str] = None) -> PipelineConfig:
    """Swap the SSL encoder (a timm ViT name) and/or its weights; token widths follow."""
    cfg = PipelineConfig.from_dict(cfg.to_dict())
    if weights is not None:
        from pathlib import Path

        cfg.encoder.weights = str(Path(weights).resolve()) if Path(weights).exists() else weights
    if model is not None and model != cfg.encoder.model:
        import timm
        import torch

        try:
            with torch.device("meta"):
                vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=224)
        except Exception as e:  # timm raises RuntimeError for unknown names
            raise ConfigError(f"--encoder {model!r}: not a timm model ({e})") from None
        cfg.encoder.model, cfg.encoder.overrides, cfg.encoder.img_size = model, {}, 224
        cfg.encoder.dim = int(vit.embed_dim)
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
    from pathlib import Path

    cfg = PipelineConfig.from_dict(cfg.to_dict())
    # A local VAE directory is recorded absolute so the run loads from any working directory.
    cfg.vae.source = str(Path(source).resolve()) if Path(source).exists() else source
    if cfg.vae.is_pixel:
        cfg.decoder.in_channels, cfg.decoder.input_size = 3, cfg.image_size
    else:
        cfg.decoder.in_channels = cfg.vae.latent_channels
        cfg.decoder.input_size = cfg.image_size // cfg.vae.downsample
    return cfg
