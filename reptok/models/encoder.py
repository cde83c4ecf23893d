"""SSLEncoder: a pre-trained self-supervised ViT (timm) whose final-norm ``[cls]`` output is the
latent token, with every weight frozen except the ``cls_token`` embedding.

Official behaviour reproduced here (official-checkpoint-spec.md sections 1.2-1.6):

- ``preprocess`` is the official ``better_resize``: centre crop to the short side, integer
  average-pool down when the image is at least twice the encoder size, one bilinear resize
  (no antialias), [-1, 1] -> [0, 1], channel normalisation.
- The latent is ``norm(x)[:, 0]`` (DINOv2's ``x_norm_clstoken``), i.e. timm's
  ``forward_features(x)[:, 0]``. For DINOv2 timm folds ``pos_embed[:, 0]`` into ``cls_token``
  (``no_embed_class=True``), so the trainable ``cls_token`` here is the *folded* one.
- The cosine anchor compares z with the output of the same network run with the *original*
  cls token. Only that token differs between the two runs, so the original is kept as a buffer
  (``cls_token_frozen``) instead of a second copy of the backbone.

Weights (``EncoderConfig.weights``): ``"hub"`` (timm pretrained), ``"random"`` (seeded random
init, for tests), ``"builtin:shapes-ssl"`` (SSL-pretrained offline on builtin:shapes, cached;
built by ``reptok.shapes.ssl``, which hands the file in as ``weights_file``) or a local file / directory in timm, original DINOv2 or
OpenAI/open_clip naming; timm's own ``checkpoint_filter_fn`` does the renaming.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, EncoderConfig
from ..errors import InputError

# Files looked for (in this order) when ``weights`` is a directory: a timm / HF hub snapshot,
# then an open_clip snapshot.
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


# ----------------------------------------------------------------------------- loss
def cos_anchor_loss(z: torch.Tensor, z_frozen: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine anchor ``1 - cos(z, z_frozen)``, shape (B,), computed in float32.

    z, z_frozen: (B, D). Multiply by lambda (``TrainConfig.cos_weight``) in the training loop.
    """
    return 1.0 - F.cosine_similarity(z.float(), z_frozen.float(), dim=-1)


# ----------------------------------------------------------------------------- preprocessing
def better_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The official ``better_resize``: (B, 3, H, W) -> (B, 3, size, size), same value range.

    1. centre crop to side = min(H, W), with torchvision ``center_crop``'s rounding;
    2. factor = side // size; average-pool with kernel = stride = factor if factor > 1 (cheap
       anti-aliasing for large inputs);
    3. bilinear ``F.interpolate`` to size x size, align_corners False, no antialias.
    """
    h, w = (int(s) for s in images.shape[-2:])  # plain ints: ONNX tracing records fixed sizes
    side = min(h, w)
    # torchvision.transforms.functional.center_crop: int(round((H - side) / 2.0)) (banker's
    # rounding of Python's round(), kept for bit-parity).
    top = int(round((h - side) / 2.0))
    left = int(round((w - side) / 2.0))
    x = images[..., top:top + side, left:left + side]
    factor = side // size
    if factor > 1:
        x = F.avg_pool2d(x, kernel_size=factor, stride=factor)
    # Always interpolate, as the official code does (an exact identity when sizes match).
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


# ----------------------------------------------------------------------------- weights
def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a weights file (.safetensors or a torch pickle) onto the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise InputError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _resolve_weights_path(weights: str, root: Optional[Path]) -> Path:
    p = Path(weights).expanduser()
    if not p.is_absolute() and root is not None and (Path(root) / p).exists():
        p = Path(root) / p
    if not p.exists():
        raise InputError(
            f"encoder weights not found: {weights!r} (expected 'hub', 'random', or a weights file / directory)"
        )
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise InputError(f"no encoder weights in directory {p} (looked for {', '.join(WEIGHT_FILES)})")
    return p


def _filter_for_model(sd: Dict[str, torch.Tensor], vit: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a foreign state dict to ``vit``'s naming with the model family's timm filter.

    timm's ``checkpoint_filter_fn`` (vision_transformer) handles: original DINOv2 naming
    (``cls_token + pos_embed[:, 0]`` fold, ``register_tokens -> reg_token``, ``mask_token``
    drop), OpenAI / open_clip CLIP naming, ``model`` / ``state_dict`` wrappers, and resamples
    ``pos_embed`` to the model's grid (bicubic, antialias, in float32 — DINOv2's own call).
    """
    # An SSLEncoder state dict (our run format): strip the prefix, keep the frozen token aside.
    if any(k.startswith("vit.") for k in sd):
        sd = {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
    module = sys.modules.get(type(vit).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(dict(sd), vit)  # copy: the DINOv2 converter pops keys from its input
    # We build the model headless (num_classes=0); CLIP's projection head is not part of the
    # "final-norm cls output" we use, so drop classifier weights rather than fail on them.
    if not any(k.startswith("head.") for k in vit.state_dict()):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return sd


def _load_strict(vit: nn.Module, sd: Dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line InputError (a ValueError) naming the first offending key."""
    own = vit.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise InputError(
            f"{source}: missing encoder key {missing[0]!r} ({len(missing)} missing) for {type(vit).__name__}"
        )
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise InputError(f"{source}: unexpected encoder key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InputError(f"{source}: shape mismatch for {k!r}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}")
    vit.load_state_dict(sd, strict=True)


def build_vit(cfg: EncoderConfig, root: Optional[Union[str, Path]] = None, load_weights: bool = True,
              weights_file: Optional[Union[str, Path]] = None) -> nn.Module:
    """Create the timm ViT of ``cfg`` headless (num_classes=0) at ``cfg.img_size`` with its weights.

    ``load_weights=False``: architecture only (seeded random init), for callers that load a
    full state dict next (a run directory) and must not touch the hub or the original file.
    ``weights_file``: the file behind a ``builtin:*`` name, resolved by the layer that owns it
    (``build_encoder``'s ``resolve_builtin``; the models layer never trains or caches anything).
    """
    import timm

    kwargs = dict(num_classes=0, img_size=cfg.img_size, **cfg.overrides)
    if cfg.weights == "hub" and load_weights:
        # timm downloads (or reads the HF cache) and runs checkpoint_filter_fn itself, which
        # resamples pos_embed to img_size (e.g. DINOv2's 37x37 grid to 16x16 at 224).
        return timm.create_model(cfg.model, pretrained=True, **kwargs)
    # A forked RNG: seeded init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vit = timm.create_model(cfg.model, pretrained=False, **kwargs)
    if cfg.weights == "random" or not load_weights:
        return vit
    if cfg.weights.startswith("builtin:"):
        if weights_file is None:
            raise InputError(f"encoder weights {cfg.weights!r} are built by reptok.shapes.ssl: build the encoder "
                             "with reptok.shapes.ssl.build_encoder (or pass resolve_builtin=reptok.shapes.ssl.builtin_weights)")
        path = Path(weights_file)
    else:
        path = _resolve_weights_path(cfg.weights, Path(root) if root is not None else None)
    _load_strict(vit, _filter_for_model(_read_state_dict(path), vit), path)
    return vit


def vit_width(model: str) -> int:
    """The token width (embed dim) of the timm ViT ``model``, built on the meta device (no
    memory, no weights); ConfigError for a name timm does not know."""
    import timm

    try:
        with torch.device("meta"):
            vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=224)
    except Exception as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"--encoder {model!r}: not a timm model ({e})") from None
    return int(vit.embed_dim)


# ----------------------------------------------------------------------------- the encoder
class SSLEncoder(nn.Module):
    """Frozen SSL ViT with a trainable ``[cls]`` token; images (B, 3, H, W) in [-1, 1] -> (B, D).

    Trainable parameters: ``vit.cls_token`` only. Buffer ``cls_token_frozen`` (persistent) holds
    the original token, so a run's state dict carries both. ``load_weights=False`` builds the
    architecture only (no hub access, no file read) for loading a run's state dict afterwards;
    ``root`` resolves a relative weights path (the run directory). The backbone stays in eval mode
    (``train()`` does not switch it) because it is frozen: no dropout / drop-path may differ
    between the two runs of the cosine anchor.
    """

    def __init__(self, cfg: EncoderConfig, root: Optional[Union[str, Path]] = None, load_weights: bool = True,
                 weights_file: Optional[Union[str, Path]] = None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        vit = build_vit(cfg, root, load_weights, weights_file)
        if not isinstance(vit, VisionTransformer):
            raise InputError(f"encoder {cfg.model!r} is a {type(vit).__name__}; reptok needs a timm VisionTransformer")
        if getattr(vit, "cls_token", None) is None:
            raise InputError(f"encoder {cfg.model!r} has no [cls] token (class_token=False)")
        if vit.embed_dim != cfg.dim:
            raise InputError(f"encoder.dim={cfg.dim} but {cfg.model!r} has embed_dim {vit.embed_dim}")
        if getattr(vit, "attn_pool", None) is not None:
            raise InputError(f"encoder {cfg.model!r} pools with attention; reptok needs a cls-token ViT")
        self.vit = vit
        self.vit.requires_grad_(cfg.train_backbone)  # False: the method (only the cls token trains)
        self.vit.cls_token.requires_grad_(True)
        self.register_buffer("cls_token_frozen", vit.cls_token.detach().clone(), persistent=True)

        pc = getattr(vit, "pretrained_cfg", None) or {}
        mean = cfg.mean if cfg.mean is not None else pc.get("mean", (0.485, 0.456, 0.406))
        std = cfg.std if cfg.std is not None else pc.get("std", (0.229, 0.224, 0.225))
        # Non-persistent: derived from the config, not weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.vit.eval()

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def train(self, mode: bool = True) -> "SSLEncoder":
        super().train(mode)
        self.vit.eval()  # frozen backbone: always deterministic
        return self

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, img_size, img_size) normalised, float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"encoder expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = better_resize(images.float(), self.cfg.img_size)
        x = (x + 1.0) / 2.0
        return (x - self.mean) / self.std

    # ------------------------------------------------------------------ backbone
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            return checkpoint_seq(vit.blocks, x)
        return vit.blocks(x)

    def _cls_features(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """timm ``VisionTransformer.forward_features`` (1.0.x) after ``patch_embed``, with a given
        cls token, returning only the final-norm cls output.

        patches: ``patch_embed`` output, (B, N, D) or (B, h, w, D) with ``dynamic_img_size``;
        cls: (1, 1, D) or (B, 1, D). Returns (B, D).
        Mirrors ``_pos_embed``: with ``no_embed_class`` (DINOv2) pos is added to the patches
        and [cls, reg, patches] concatenated; otherwise (MAE, CLIP) concatenated then added.
        """
        from timm.layers import resample_abs_pos_embed

        vit = self.vit
        b = patches.shape[0]
        prefix = [cls.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        x = patches
        if vit.pos_embed is None:
            x = torch.cat(prefix + [x.reshape(b, -1, x.shape[-1])], dim=1)
        else:
            if vit.dynamic_img_size:
                _, h, w, c = x.shape
                pos = resample_abs_pos_embed(
                    vit.pos_embed, new_size=(h, w), old_size=vit.patch_embed.grid_size,
                    num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
                )
                x = x.reshape(b, -1, c)
            else:
                pos = vit.pos_embed
            if vit.no_embed_class:
                x = torch.cat(prefix + [x + pos], dim=1)
            else:
                x = torch.cat(prefix + [x], dim=1) + pos
        x = vit.pos_drop(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = self._blocks(x)
        # The *final norm*: timm moves it to fc_norm (and norm is Identity) for avg-pool models.
        norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
        return norm(x[:, 0])  # LayerNorm is per token: normalising only the cls row is exact

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        return self.vit.patch_embed(x.to(self.vit.cls_token.dtype))

    # ------------------------------------------------------------------ public
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> z (B, D) float32, the final-norm cls output."""
        return self._cls_features(self._patches(images), self.vit.cls_token).float()

    @torch.no_grad()
    def forward_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The original network's token (B, D) float32 (the cosine anchor's target)."""
        return self._cls_features(self._patches(images), self.cls_token_frozen).float()

    def forward_pair(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z, z_frozen), both (B, D) float32: z with the trainable cls token, z_frozen with the
        original one (no gradient). Preprocessing and the patch embedding run once.

        With autograd on, the frozen run is a second pass under ``no_grad`` (no activations kept
        for it: half the memory of a doubled batch, same compute). Without autograd both runs go
        through the backbone as one doubled batch.
        """
        patches = self._patches(images)
        b = patches.shape[0]
        if torch.is_grad_enabled() and self.vit.cls_token.requires_grad:
            z = self._cls_features(patches, self.vit.cls_token)
            with torch.no_grad():
                z_frozen = self._cls_features(patches, self.cls_token_frozen)
            return z.float(), z_frozen.float()
        cls = torch.cat([self.vit.cls_token.expand(b, -1, -1), self.cls_token_frozen.expand(b, -1, -1)])
        both = self._cls_features(torch.cat([patches, patches]), cls).float()
        return both[:b], both[b:].detach()

    def reset_cls_token(self) -> None:
        """Restore the trainable cls token to the original (frozen) one."""
        with torch.no_grad():
            self.vit.cls_token.copy_(self.cls_token_frozen)


def build_encoder(cfg: EncoderConfig, load_weights: bool = True, root: Optional[Union[str, Path]] = None,
                  resolve_builtin: Optional[Callable[[EncoderConfig], Path]] = None) -> SSLEncoder:
    """The :class:`SSLEncoder` of any ``cfg``. A ``builtin:*`` weights name is turned into its file
    by ``resolve_builtin`` (``reptok.shapes.ssl.builtin_weights``, which pre-trains once and
    caches): this layer never trains or caches, and without a resolver such a name is refused in
    one line instead of pre-training as a side effect. ``load_weights=False`` never needs one."""
    weights_file = None
    if load_weights and cfg.weights.startswith("builtin:") and resolve_builtin is not None:
        weights_file = resolve_builtin(cfg)
    return SSLEncoder(cfg, root=root, load_weights=load_weights, weights_file=weights_file)
