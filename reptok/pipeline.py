"""Pipeline: the Python API and the one sampling loop, written once for every backend.

User API (diffusers' shape; README "Python API")::

    pipe = Pipeline.from_run("runs/gen", device="cuda", fast=True)   # fast: the CLI's fast path
    pipe(classes=[88, 88, 207], seed=0, output="pil" | "np" | "pt", steps=25, guidance_scale=2.0)
    pipe(prompts=[...]);  pipe(tokens=z, seed=0)                      # text runs; decoder only
    pipe.encode(images) -> tokens (B, D);  pipe.reconstruct(images, seed);  pipe.interpolate(a, b, 8)

For batching and runtimes, one call per stage with validated, frozen settings::

    args = pipe.sampler_args(steps=25)                 # SamplerArgs: TypeError / InputError here
    z = pipe.generate(labels_or_prompts, pipe.generator_noise(idx, seed), args)
    images = pipe.decode(z, pipe.decoder_noise(idx, seed), args)   # float, not clamped

Image outputs: "pt" float (B,3,H,W) clamped to [-1,1], "np" uint8 (B,H,W,3), "pil" a list. The
CLI's ``reptok sample`` runs the same calls (``generate`` / ``decode`` / ``tensor_to_uint8``),
so both give the same pixels for the same (seed, index).

The three networks are called through their torch signatures only::

    decoder(x (B,C,S,S), t (B,), token (B,D)) -> velocity (B,C,S,S)     reptok time convention
    generator(x (B,n,D), t (B,), y (B,)) -> velocity (B,n,D)
    generator(x (B,n,D), t (B,), text (B,L,E), text_mask (B,L)) -> velocity   text-conditioned
    latent.decode(latents) -> images in [-1, 1]

so ONNX Runtime / TensorRT sessions with the same call signature (``export/runtime.py`` hands
them to the constructor) or the torch fast paths (``reptok/fast.py``) can replace the torch modules and the sampling loop below stays the only one. A text-conditioned
generator also has a (torch) ``text_encoder``; its condition is an index into a table of encoded
prompts, with the empty prompt "" as the CFG null condition (``Pipeline._condition``).

Noise is a function of (seed, global image index) only: ``index_noise``. Sharded jobs
(``--start/--count``, torchrun ranks) therefore reproduce exactly the images of one big run.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import flow
from . import run as rundir
from .backends import apply_fast_path
from .config import ConfigError, PipelineConfig, SamplingConfig, check_rules
from .errors import InputError


# ----------------------------------------------------------------------------- noise
def index_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, index, stream) through numpy's SeedSequence."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), int(stream)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(s[0] >> np.uint64(1)))


STREAM_GENERATOR, STREAM_DECODER = 0, 1


def index_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int) -> torch.Tensor:
    """(len(indices), *shape) float32 noise; row i depends only on (seed, indices[i], stream)."""
    return torch.stack([torch.randn(*shape, generator=index_generator(seed, i, stream)) for i in indices])


# ----------------------------------------------------------------------------- sampler settings
@dataclass(frozen=True)
class SamplerArgs:
    """Sampler settings, validated once by the config layer's rules (``reptok.config.RULES``,
    the same that check ``reptok sample``'s options): an invalid value raises InputError.
    Build them from a run's defaults with ``pipe.sampler_args(steps=10, ...)``.

    ``guidance_scale``: the CFG scale (1.0 = no guidance); ``cfg_interval``: (lo, hi), the times
    at which guidance applies, or None for every step."""

    steps: int = 50
    guidance_scale: float = 1.5
    cfg_interval: Optional[Tuple[float, float]] = (0.3, 0.9)
    solver: str = "euler"
    decoder_steps: int = 50
    decoder_solver: str = "euler"

    def __post_init__(self):
        s = check_sampler_values(steps=self.steps, cfg=self.guidance_scale, cfg_interval=self.cfg_interval,
                                 solver=self.solver, decoder_steps=self.decoder_steps,
                                 decoder_solver=self.decoder_solver)
        # The checked values, as the config layer typed them (a JSON list -> a hashable tuple).
        for name, value in (("steps", s.steps), ("guidance_scale", s.cfg), ("solver", s.solver),
                            ("decoder_steps", s.decoder_steps), ("decoder_solver", s.decoder_solver)):
            object.__setattr__(self, name, value)
        if self.cfg_interval is not None:
            object.__setattr__(self, "cfg_interval", tuple(float(v) for v in s.cfg_interval))

    @classmethod
    def from_config(cls, sampling: SamplingConfig, **overrides) -> "SamplerArgs":
        """``sampling``'s values with ``overrides`` (TypeError for an unknown keyword; ``cfg=``
        is a deprecated alias of ``guidance_scale``)."""
        if "cfg" in overrides:
            if "guidance_scale" in overrides:
                raise TypeError("pass guidance_scale= or its deprecated alias cfg=, not both")
            warnings.warn("cfg= is deprecated: use guidance_scale=", DeprecationWarning, stacklevel=3)
            overrides["guidance_scale"] = overrides.pop("cfg")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unexpected sampler keyword {unknown[0]!r}: choose from {', '.join(names)}")
        base = dict(steps=sampling.steps, guidance_scale=sampling.cfg, cfg_interval=sampling.cfg_interval,
                    solver=sampling.solver, decoder_steps=sampling.decoder_steps,
                    decoder_solver=sampling.decoder_solver)
        return cls(**{**base, **overrides})

    def nfe(self) -> dict:
        """Network evaluations per image: ``generator`` / ``decoder`` calls (Heun: 2 a step) and
        ``generator_guided`` (calls inside the CFG interval, which run the batch twice)."""
        grid = flow.time_grid(self.steps)
        times = [grid[i] for i in range(self.steps)]
        times += [grid[i + 1] for i in range(self.steps)] if self.solver == "heun" else []
        guided = 0 if self.guidance_scale == 1.0 else sum(flow.in_interval(t, self.cfg_interval) for t in times)
        per = {"euler": 1, "heun": 2}
        return {"generator": self.steps * per[self.solver], "generator_guided": int(guided),
                "decoder": self.decoder_steps * per[self.decoder_solver]}


def check_sampler_values(**values) -> SamplingConfig:
    """Sampler values (``SamplingConfig`` field names; None = not given) checked by the config
    layer's rules: ``check_sampler_values(steps=0)`` -> ConfigError (an InputError) for
    ``sampling.steps``. ``reptok sample``'s options go through here too. Returns the defaults
    with the given values, typed by the config layer."""
    over = {f"sampling.{k}": v for k, v in values.items() if v is not None}
    for k, v in over.items():  # a bool is an int to Python, not a step count or a scale
        if isinstance(v, bool):
            raise ConfigError(f"{k}={v}: expected a number", key=k, value=v, allowed="a number")
    base = PipelineConfig(generator=None)
    base.sampling = SamplingConfig()
    if not over:
        return base.sampling
    cfg = base.replace(**over)
    check_rules(cfg, keys=set(over))
    return cfg.sampling


# ----------------------------------------------------------------------------- the pipeline
class Pipeline(nn.Module):
    """The models of a run plus the one sampling loop. Components may be None when unused."""

    def __init__(self, cfg: PipelineConfig, encoder=None, decoder=None, latent=None, generator=None,
                 text_encoder=None, *, device=None, backend: str = "torch", manifest: Optional[dict] = None,
                 engine_dir=None, run_dir=None, run_doc: Optional[dict] = None,
                 autocast_dtype: Optional[torch.dtype] = None):
        """``device``: pin the device (runtime sessions have no torch parameters to infer it
        from). ``backend`` / ``manifest`` / ``engine_dir``: what runs the networks (``export/``
        hands ONNX Runtime / TensorRT sessions in with their manifest). ``run_dir`` / ``run_doc``:
        the run the weights came from. ``autocast_dtype``: e.g. torch.bfloat16 on CUDA."""
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder
        self.latent = latent
        self.generator = generator
        self.text_encoder = text_encoder
        self.run_dir = run_dir
        self.run_doc = run_doc
        self.backend = backend
        self.manifest = manifest
        self.engine_dir = engine_dir
        self.autocast_dtype = autocast_dtype
        self._pinned_device: Optional[torch.device] = None if device is None else torch.device(device)
        self.fast_path: Optional[dict] = None  # what runs the networks; see with_fast_path
        self.fast_blocks = 0  # regionally compiled blocks (reptok.fast.fast_variant)

    def with_networks(self, fast_blocks: int = 0, **nets) -> "Pipeline":
        """A shallow copy (same weights, same sampling loop) whose named networks (decoder,
        generator, latent, ...) are replaced by ``nets``: callables with the torch signature that
        need not be nn.Modules (CUDA-graphed / compiled proxies). The copy's device is pinned,
        since proxies have no parameters to infer it from; this pipeline is left as it was."""
        v = copy.copy(self)
        object.__setattr__(v, "_modules", dict(self._modules))  # the copy's own child registry
        v._pinned_device = self.device
        for name, value in nets.items():
            if name not in v._modules:
                raise TypeError(f"with_networks: unknown network {name!r}")
            v._modules.pop(name)  # a proxy is not an nn.Module: unregister, then a plain attribute
            object.__setattr__(v, name, value)
        v.fast_blocks = fast_blocks
        return v

    def with_fast_path(self, fast_path: dict, autocast_dtype: Optional[torch.dtype] = None) -> "Pipeline":
        """Record what runs the networks (``reptok.backends.describe_fast_path`` reads it) and
        the autocast dtype it uses; returns this pipeline."""
        self.fast_path = dict(fast_path)
        self.autocast_dtype = autocast_dtype
        return self

    @classmethod
    def build(cls, cfg: PipelineConfig, components: Iterable[str] = ("encoder", "decoder", "generator", "vae"),
              vae_root=None, load_weights: bool = True, meta: bool = False,
              resolve_builtin=None) -> "Pipeline":
        """Build the components of ``cfg``. ``load_weights=False`` skips the encoder's hub/file
        weights (a run's own safetensors will overwrite every tensor anyway). A text-conditioned
        generator brings its frozen text encoder (hub / local weights loaded here; a random
        ``tiny`` tower is overwritten by the run's ``text_encoder.*`` tensors). ``meta``: the
        encoder, decoder and generator get their parameters on the meta device (no random init;
        load them with ``rundir.load_into(..., assign=True)``). ``resolve_builtin``: the file of a
        ``builtin:*`` encoder (``reptok.shapes.ssl.builtin_weights``); never pre-trained here."""
        from .models.decoder import FlowDecoder
        from .models import build_generator
        from .models.encoder import build_encoder
        from .models.vae import build_latent_space

        comps = set(components)
        with_gen = "generator" in comps and cfg.generator is not None
        text_encoder = None
        if with_gen and cfg.generator.text_encoder is not None:
            from .models.text import build_text_encoder

            text_encoder = build_text_encoder(cfg.generator.text_encoder, max_len=cfg.generator.text_len or None)
        with params_on_meta() if meta else contextlib.nullcontext():
            nets = dict(encoder=build_encoder(cfg.encoder, load_weights, resolve_builtin=resolve_builtin) if "encoder" in comps else None,
                        decoder=FlowDecoder(cfg.decoder) if "decoder" in comps else None,
                        generator=build_generator(cfg.generator) if with_gen else None)
        latent = build_latent_space(cfg.vae, vae_root) if "vae" in comps else None
        return cls(cfg, latent=latent, text_encoder=text_encoder, **nets)


    @classmethod
    def from_run(cls, path, device="cpu", use_ema: bool = True, components: Optional[Iterable[str]] = None,
                 *, fast: Optional[bool] = None, precision: Optional[str] = None, compile: bool = False,
                 cuda_graphs: Optional[bool] = None) -> "Pipeline":
        """Rebuild the pipeline of a run directory (``reptok/run.py``'s format) on ``device``.

        ``path``: a run folder or ``"hf://OWNER/NAME[@REVISION]"`` (``reptok/hub.py``). A
        generator run brings its tokenizer run's encoder, decoder and VAE. ``components`` limits
        what is built (e.g. ``("generator",)`` for token-only work). ``use_ema``: the EMA weights
        (inference) where the run has them. ``fast=True``: the CLI's default fast path
        (``reptok.backends.apply_fast_path``: bf16 + CUDA graphs on CUDA, eager fp32 on CPU;
        ``precision`` / ``compile`` / ``cuda_graphs`` as ``reptok sample``'s options);
        ``fast=False``: ``--no-fast`` (eager fp32, TF32 off); the default None: as built."""
        from .hub import resolve_run

        run = resolve_run(path)  # a folder, or hf://OWNER/NAME[@REVISION] fetched into the Hub cache
        doc = rundir.read_run_config(run)
        cfg: PipelineConfig = doc["config"]
        wanted = set(components) if components is not None else {"encoder", "decoder", "generator", "vae"}
        sources = {}
        tok_run = rundir.resolve_tokenizer_run(run, doc)
        if tok_run is not None:
            tok_state = rundir.read_weights(tok_run, use_ema)
            for c in ("encoder", "decoder"):
                sources[c] = (tok_run, rundir.split_prefix(tok_state, c))
            vae_root = tok_run
        else:
            vae_root = run
        state = rundir.read_weights(run, use_ema)
        for c in rundir.COMPONENTS:
            part = rundir.split_prefix(state, c)
            if part:
                sources[c] = (run, part)
        if cfg.generator is None or "generator" not in sources:
            wanted.discard("generator")
        # Built on the meta device and loaded by assignment: no random init to throw away (XL: ~26 s).
        pipe = cls.build(cfg, components=wanted, vae_root=vae_root, load_weights=False, meta=True)
        for c in rundir.COMPONENTS:
            if c in wanted and getattr(pipe, c, None) is not None:
                if c not in sources:
                    raise InputError(f"{run}: the run has no {c} weights")
                src, part = sources[c]
                rundir.load_into(getattr(pipe, c), part, f"{src}", assign=True)
        _check_materialized(pipe)
        te = getattr(pipe, "text_encoder", None)
        if te is not None and te.stores_weights:
            _load_text_weights(te, state, run)
        pipe.run_dir = run
        pipe.run_doc = doc
        pipe = pipe.to(device).eval()
        if fast is None and not (precision or compile or cuda_graphs):
            return pipe  # as built: eager fp32, global TF32 settings untouched
        return apply_fast_path(pipe, fast=bool(fast), precision=precision, compile=compile, cuda_graphs=cuda_graphs)

    # ------------------------------------------------------------------ helpers
    def _need(self, *components: str) -> None:
        """InputError (one line) when a component the call needs was not built / loaded."""
        missing = [c for c in components if getattr(self, c, None) is None]
        if missing:
            raise InputError(f"this pipeline was built without its {missing[0]} "
                             f"(Pipeline.from_run(..., components=...) leaves it out)")

    def pin_device(self, device) -> "Pipeline":
        """Fix ``device`` (for networks that are runtime sessions or proxies without torch
        parameters to infer it from)."""
        self._pinned_device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        if getattr(self, "_pinned_device", None) is not None:
            return self._pinned_device
        for m in (self.decoder, self.generator, self.encoder):
            if isinstance(m, nn.Module):
                for p in m.parameters():
                    return p.device
        return torch.device("cpu")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def latent_shape(self) -> tuple:
        d = self.cfg.decoder
        return (d.in_channels, d.input_size, d.input_size)

    @property
    def num_classes(self) -> int:
        return self.cfg.generator.num_classes if self.cfg.generator is not None else 0

    @property
    def is_text(self) -> bool:
        """True when the generator is caption-conditioned (sample with prompts, not labels)."""
        return self.cfg.generator is not None and self.cfg.generator.text_encoder is not None

    # ------------------------------------------------------------------ sampler settings
    def sampler_args(self, **overrides) -> "SamplerArgs":
        """The run's sampler settings (``cfg.sampling``) with ``overrides``, validated once:
        unknown keywords raise TypeError, invalid values InputError (:class:`SamplerArgs`)."""
        return SamplerArgs.from_config(self.cfg.sampling, **overrides)

    def _args(self, args: Optional["SamplerArgs"]) -> "SamplerArgs":
        if args is None:
            return self.sampler_args()
        if not isinstance(args, SamplerArgs):
            raise TypeError(f"args must be a SamplerArgs (pipe.sampler_args(...)), got {type(args).__name__}")
        return args

    # ------------------------------------------------------------------ stage (a)
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> tokens (B,D) float32. ``images``: float tensor (B,3,H,W) or (3,H,W) in
        [-1,1], uint8 numpy (H,W,3) / (B,H,W,3), or PIL image(s) (ADM centre-cropped to the
        run's image size). See :func:`as_image_tensor`."""
        self._need("encoder")
        x = as_image_tensor(images, self.cfg.image_size)
        with self._autocast():
            return self.encoder(x.to(self.device)).float()

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, noise: torch.Tensor,
                       args: Optional["SamplerArgs"] = None) -> torch.Tensor:
        """tokens (B,D), noise (B,C,S,S) -> decoder-space sample (latents or pixels)."""
        args = self._args(args)
        tokens = tokens.to(self.device)

        def velocity(x, t):
            with self._autocast():
                return self.decoder(x, t, tokens)

        return flow.solve(velocity, noise.to(self.device), args.decoder_steps, args.decoder_solver)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, noise: torch.Tensor, args: Optional["SamplerArgs"] = None) -> torch.Tensor:
        """For batching and runtimes: tokens (B,D) + decoder noise (B,C,S,S) -> images (B,3,H,W)
        float32, roughly in [-1,1] (NOT clamped: parity checks compare the raw decoder output).
        ``args``: :class:`SamplerArgs` (decoder_steps, decoder_solver; default: the run's)."""
        self._need("decoder", "latent")
        lat = self.decode_latents(tokens, noise, args)
        with self._autocast():
            return self.latent.decode(lat).float()

    @torch.no_grad()
    def reconstruct(self, images, seed: int = 0, *, start: int = 0, output: str = "pil", **sampler_kw):
        """Images (any :meth:`encode` input) -> encode -> decode; image i gets decoder noise
        (seed, start + i). ``output`` as :meth:`__call__`; ``sampler_kw``: decoder_steps, ..."""
        check_output_kind(output)
        args = self.sampler_args(**sampler_kw)
        tokens = self.encode(images)
        return self._decode_job(tokens, seed, start, args, output)

    @torch.no_grad()
    def interpolate(self, a, b, frames: int = 8, seed: int = 0, *, output: str = "pil", **sampler_kw):
        """Spherical interpolation between the tokens of images ``a`` and ``b`` (any
        :meth:`encode` input, one image each): ``frames`` images from a to b, all decoded with
        the same decoder noise (seed, index 0), so only the token changes along the strip."""
        check_output_kind(output)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise InputError(f"frames={frames!r}: must be an int >= 2")
        args = self.sampler_args(**sampler_kw)
        z = self.encode(torch.cat([as_image_tensor(x, self.cfg.image_size)[:1] for x in (a, b)]))
        tokens = torch.stack([slerp(z[0], z[1], i / (frames - 1)) for i in range(frames)])
        _indices(seed, 0, 1)  # checks the seed
        noise = self.decoder_noise([0], seed).expand(frames, *self.latent_shape)
        return to_output(self.decode(tokens, noise, args), output)

    def _decode_job(self, tokens, seed, start, args, output):
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2:
            raise InputError(f"tokens must be (B, D), got shape {tuple(tokens.shape)}")
        idx = _indices(seed, start, len(tokens))
        return to_output(self.decode(tokens, self.decoder_noise(idx, seed), args), output)

    # ------------------------------------------------------------------ stage (b)
    def _condition(self, cond, scale: float):
        """-> (cond (B,), null_cond (B,), model_fn(x, t, cond)) for ``flow.guided_velocity``.

        ``cond``: class labels (B,) or, for a text generator, B prompt strings. The null
        condition is the generator's ``null(B)``. Class generators: cond = labels, null = the
        null class. Text generators: the prompts and the null prompts ("") are encoded once into
        a table; cond / null are row indices into it."""
        if self.is_text:
            if cond is None or isinstance(cond, torch.Tensor):
                raise InputError("this generator is text-conditioned: pass prompts, not class labels")
            prompts = [str(p) for p in cond]
            null_prompts = self.generator.null(len(prompts))
            table = list(dict.fromkeys(list(null_prompts) + prompts))
            row = {p: i for i, p in enumerate(table)}
            hidden, mask = self.text_encoder.encode(table)
            hidden, mask = hidden.to(self.device), mask.to(self.device)
            cond = torch.tensor([row[p] for p in prompts], dtype=torch.long, device=self.device)
            null = torch.tensor([row[p] for p in null_prompts], dtype=torch.long, device=self.device)

            def model_fn(x, t, c):
                with self._autocast():
                    return self.generator(x, t, hidden[c], mask[c])

            return cond, null, model_fn
        if not isinstance(cond, torch.Tensor):
            raise InputError("this generator is class-conditional: pass class labels (a tensor), not prompts")
        y = cond.to(self.device).long()
        if self.num_classes == 0 or scale == 1.0:
            # Unconditional generators ignore y and scale 1 never calls the null half: any null
            # condition gives v_u == v_c (CFG is a no-op).
            null = y
        elif self.generator.null_class is None:
            raise InputError("this generator has no null class (class_dropout was 0): CFG is unavailable, "
                             "use guidance_scale 1.0")
        else:
            null = self.generator.null(len(y), self.device)

        def model_fn(x, t, c):
            with self._autocast():
                return self.generator(x, t, c)

        return y, null, model_fn

    @torch.no_grad()
    def generate(self, cond, noise: torch.Tensor, args: Optional["SamplerArgs"] = None) -> torch.Tensor:
        """For batching and runtimes: ``cond`` (class labels (B,), or B prompt strings for a text
        generator) + noise (B,n,D) in normalised token space -> tokens (B,D) (denormalised).
        CFG's null condition: the null class / the prompt "". ``args``: :class:`SamplerArgs`
        (steps, guidance_scale, cfg_interval, solver; default: the run's)."""
        args = self._args(args)
        cond, null, model_fn = self._condition(cond, args.guidance_scale)
        v = flow.guided_velocity(model_fn, cond, null, args.guidance_scale, args.cfg_interval)
        x = flow.solve(v, noise.to(self.device), args.steps, args.solver)
        return self.generator.denormalize(x)

    # ------------------------------------------------------------------ both stages
    def generator_noise(self, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        """(B, n, D) generator-space noise of images ``indices`` (CPU, float32)."""
        return index_noise(seed, indices, (self.cfg.generator.n_tokens, self.cfg.generator.token_dim),
                           STREAM_GENERATOR)

    def decoder_noise(self, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        """(B, C, S, S) decoder noise of images ``indices`` (CPU, float32)."""
        return index_noise(seed, indices, self.latent_shape, STREAM_DECODER)

    # ------------------------------------------------------------------ the user's API
    @torch.no_grad()
    def forward(self, classes: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None, *,
                tokens: Optional[torch.Tensor] = None, n: int = 1, seed: int = 0, start: int = 0,
                output: str = "pil", batch_size: Optional[int] = None, **sampler_kw):
        """``pipe(classes=[88, 88, 207], seed=0, output="pil")``: labels (or ``prompts=[...]`` for
        a text run; nothing for an unconditional one) -> images. ``pipe(tokens=z)``: tokens
        (B, D) -> images (the decoder half only; image i gets decoder noise (seed, start + i)).

        Each class / prompt gives ``n`` images in a row (``classes=[c], n=4`` = ``[c] * 4``), and
        image i of the job gets the noise of index ``start + i`` under ``seed``, so
        ``pipe(classes=[c] * n, seed=s, output="np")`` is pixel for pixel
        ``reptok sample --class c -n n --seed s --out x.npz`` on the same fast path (same batch
        size: it runs the CLI's calls, :meth:`generate` / :meth:`decode` / ``tensor_to_uint8``).
        ``sampler_kw``: the fields of :class:`SamplerArgs` (steps, guidance_scale, cfg_interval,
        solver, decoder_steps, decoder_solver); an unknown one raises TypeError.
        ``batch_size``: rows per network call (default: the whole job in one batch; a last
        partial batch is padded with its last row, as the CLI does). ``output``: "pil" (a list of
        PIL images), "np" (uint8 (B,H,W,3)) or "pt" (float (B,3,H,W) clamped to [-1,1])."""
        check_output_kind(output)
        args = self.sampler_args(**sampler_kw)
        if tokens is not None:
            if classes is not None or prompts is not None:
                raise InputError("pass tokens=... or classes / prompts, not both")
            self._need("decoder", "latent")
            return self._decode_job(tokens, seed, start, args, output)
        if self.generator is None:
            raise InputError("this pipeline has no generator (a tokenizer run): use tokens=, encode or reconstruct")
        self._need("decoder", "latent")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n={n!r}: the number of images per class or prompt must be an int >= 1")
        conds = [c for c in self._job_conditions(classes, prompts) for _ in range(n)]
        idx = _indices(seed, start, len(conds))
        b = len(conds) if batch_size is None else int(batch_size)
        if b < 1:
            raise InputError(f"batch_size={batch_size!r}: must be >= 1")
        out = []
        for i in range(0, len(conds), b):
            part, k = idx[i: i + b], len(idx[i: i + b])
            rows = pad_rows(conds[i: i + b], b)
            z = self.generate(rows if self.is_text else torch.tensor(rows, dtype=torch.long),
                              pad_rows(self.generator_noise(part, seed), b), args)
            images = self.decode(z, pad_rows(self.decoder_noise(part, seed), b), args)[:k]
            out.append(images.float().cpu())
        return to_output(torch.cat(out), output)

    def _job_conditions(self, classes, prompts) -> list:
        """The checked per-image condition of a call: class ids, prompt strings, or zeros
        (unconditional generators ignore the label)."""
        if self.is_text:
            if classes is not None or prompts is None:
                raise InputError("this generator is text-conditioned: pass prompts=[...], not classes")
            if isinstance(prompts, str):
                prompts = [prompts]
            if not prompts:
                raise InputError("prompts=[]: nothing to sample")
            return [str(p) for p in prompts]
        if prompts is not None:
            raise InputError("this generator is class-conditional: pass classes=[...], not prompts")
        if self.num_classes == 0:
            if classes not in (None, [], ()):
                raise InputError("this generator is unconditional: drop classes and pass n=<count>")
            return [0]
        if classes is None:
            raise InputError(f"pass classes=[...] (ids 0-{self.num_classes - 1})")
        if isinstance(classes, (int, np.integer)):
            classes = [classes]
        try:
            ids = [int(c) for c in classes]
        except (TypeError, ValueError):
            raise InputError(f"classes={classes!r}: expected a list of class ids") from None
        if not ids:
            raise InputError("classes=[]: nothing to sample")
        bad = [c for c in ids if not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"class {bad[0]} is outside the model's classes 0-{self.num_classes - 1}")
        return ids


@contextlib.contextmanager
def params_on_meta():
    """Parameters registered while active are moved to the meta device as they are registered,
    so the random init that follows costs nothing. Buffers stay real: some are computed, not
    stored (RoPE positions, normalisation constants), and the weights file does not bring them."""
    def to_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _check_materialized(pipe) -> None:
    """A tensor still on the meta device after loading is a bug (a buffer derived from a
    parameter at build time): fail here rather than at the first forward."""
    for c in rundir.COMPONENTS:
        mod = getattr(pipe, c, None)
        if isinstance(mod, nn.Module):
            for name, t in [*mod.named_parameters(), *mod.named_buffers()]:
                if t.is_meta:
                    raise RuntimeError(f"{c}.{name} is still on the meta device after loading the run")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tokens (D,), falling back to lerp when parallel."""
    a32, b32 = a.float(), b.float()
    cos = torch.dot(a32, b32) / (a32.norm() * b32.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if omega.abs() < 1e-4:
        return (1 - t) * a32 + t * b32
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * a32 + torch.sin(t * omega) / so * b32


# ----------------------------------------------------------------------------- inputs and outputs
OUTPUT_KINDS = ("pil", "np", "pt")


def check_output_kind(output: str) -> None:
    if output not in OUTPUT_KINDS:
        raise InputError(f"output={output!r}: choose one of {', '.join(OUTPUT_KINDS)}")


def to_output(images: torch.Tensor, output: str):
    """float (B,3,H,W) -> "pt": float32 clamped to [-1,1] (CPU); "np": uint8 (B,H,W,3)
    (``tensor_to_uint8``, the CLI's conversion); "pil": a list of RGB PIL images."""
    from .images import tensor_to_uint8

    check_output_kind(output)
    if output == "pt":
        return images.detach().float().cpu().clamp(-1, 1)
    arr = tensor_to_uint8(images)
    if output == "np":
        return arr
    from PIL import Image

    return [Image.fromarray(a) for a in arr]


def as_image_tensor(images, image_size: Optional[int] = None) -> torch.Tensor:
    """Images in any of the API's forms -> float (B,3,H,W) in [-1,1].

    float tensors (B,3,H,W) / (3,H,W) are taken as [-1,1]; uint8 numpy (or uint8 tensors)
    (H,W,3) / (B,H,W,3) are scaled; PIL images (one or a list) are ADM centre-cropped to
    ``image_size``. Arrays and tensors keep their size (the encoder's own preprocessing resizes)."""
    from .images import center_crop_arr, uint8_to_tensor

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        if Image is not None and all(isinstance(im, Image.Image) for im in images):
            if image_size is None:
                raise InputError("PIL images need the pipeline's image size")
            images = np.stack([center_crop_arr(im, image_size) for im in images])
        elif all(isinstance(im, np.ndarray) for im in images):
            images = np.stack(images)
        elif all(isinstance(im, torch.Tensor) for im in images):
            images = torch.stack(images)
        else:
            raise InputError("images: a list must hold only PIL images, numpy arrays or tensors")
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise InputError(f"numpy images must be uint8 (H,W,3) / (B,H,W,3), got {images.dtype}")
        if images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise InputError(f"numpy images must be uint8 (H,W,3) / (B,H,W,3), got shape {images.shape}")
        x = uint8_to_tensor(images)
    elif isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise InputError(f"image tensors must be float in [-1,1] (or uint8 HWC), got {images.dtype}")
        x = images[None] if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"image tensors must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
    else:
        raise InputError(f"images: expected PIL images, uint8 numpy or a float tensor, got {type(images).__name__}")
    return x


def _indices(seed, start: int, count: int) -> list:
    """Global image indices [start, start + count) (noise keys), with the arguments checked."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed={seed!r}: must be an int")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise InputError(f"start={start!r}: must be an int >= 0")
    return list(range(int(start), int(start) + count))


def pad_rows(x, n: int):
    """Repeat the last row of a tensor (or list) up to ``n`` rows: every network call of a job
    sees one batch shape (as ``reptok sample`` does), so results do not depend on the split."""
    k = len(x)
    if k >= n:
        return x
    if isinstance(x, list):
        return x + [x[-1]] * (n - k)
    return torch.cat([x, x[-1:].expand(n - k, *x.shape[1:])])


# ----------------------------------------------------------------------------- text encoders of runs
def _load_text_weights(te, state: Dict[str, torch.Tensor], run: Path) -> None:
    # A random text tower (``tiny``) travels in the generator run; hub encoders load by spec.
    part = rundir.split_prefix(state, "text_encoder")
    if not part:
        raise InputError(f"{run}: the run has no text_encoder weights (its text encoder {te.spec!r} is random)")
    rundir.load_into(te, part, f"{run}")


def load_text_encoder(path, device="cpu", use_ema: bool = True):
    """The frozen text encoder of a text-to-image generator run (None for class runs): built from
    its spec, with the run's ``text_encoder.*`` tensors when it stores them (``tiny``). For
    runtimes (ONNX / TensorRT) that replace the generator but still encode prompts in torch."""
    from .models.text import build_text_encoder

    run = Path(path)
    g = rundir.read_run_config(run)["config"].generator
    if g is None or g.text_encoder is None:
        return None
    te = build_text_encoder(g.text_encoder, max_len=g.text_len or None)
    if te.stores_weights:
        _load_text_weights(te, rundir.read_weights(run, use_ema), run)
    return te.to(device).eval()
