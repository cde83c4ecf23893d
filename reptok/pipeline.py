"""Pipeline: the Python API and the one sampling loop, written once for every backend.

User API (diffusers style; README "Python API")::

    pipe = Pipeline.from_run("runs/gen", device="cuda")
    pipe(classes=[88, 88, 207], seed=0, output="pil" | "np" | "pt")   # prompts=[...] for text runs
    pipe.encode(images) -> tokens (B, D);  pipe.decode(tokens, seed);  pipe.reconstruct(images, seed)

Image outputs: "pt" float (B,3,H,W) clamped to [-1,1], "np" uint8 (B,H,W,3), "pil" a list. The
CLI's ``reptok sample`` runs the same calls (``generate_from`` / ``decode_from`` /
``tensor_to_uint8``), so both give the same pixels for the same (seed, index).

The three networks are called through their torch signatures only::

    decoder(x (B,C,S,S), t (B,), token (B,D)) -> velocity (B,C,S,S)     reptok time convention
    generator(x (B,n,D), t (B,), y (B,)) -> velocity (B,n,D)
    generator(x (B,n,D), t (B,), text (B,L,E), text_mask (B,L)) -> velocity   text-conditioned
    latent.decode(latents) -> images in [-1, 1]

so ONNX Runtime / TensorRT sessions with the same call signature (``export/runtime.py``) can
replace the torch modules and the sampling loop below stays the only one. A text-conditioned
generator also has a (torch) ``text_encoder``; its condition is an index into a table of encoded
prompts, with the empty prompt "" as the CFG null condition (``Pipeline._condition``).

Noise is a function of (seed, global image index) only: ``index_noise``. Sharded jobs
(``--start/--count``, torchrun ranks) therefore reproduce exactly the images of one big run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import flow
from . import run as rundir
from .config import PipelineConfig
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


# ----------------------------------------------------------------------------- the pipeline
class Pipeline(nn.Module):
    """The models of a run plus the one sampling loop. Components may be None when unused."""

    def __init__(self, cfg: PipelineConfig, encoder=None, decoder=None, latent=None, generator=None,
                 text_encoder=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder
        self.latent = latent
        self.generator = generator
        self.text_encoder = text_encoder
        self.run_dir = None
        self.run_doc = None
        self.autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16 on CUDA
        self._pinned_device: Optional[torch.device] = None
        self.fast_path: Optional[dict] = None  # set by reptok.backends.apply_fast_path

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
    def from_run(cls, path, device="cpu", use_ema: bool = True,
                 components: Optional[Iterable[str]] = None) -> "Pipeline":
        """Rebuild the pipeline of a run directory (``reptok/run.py``'s format) on ``device``.

        ``path``: a run folder or ``"hf://OWNER/NAME[@REVISION]"`` (``reptok/hub.py``). A
        generator run brings its tokenizer run's encoder, decoder and VAE. ``components`` limits
        what is built (e.g. ``("generator",)`` for token-only work). ``use_ema``: the EMA weights
        (inference) where the run has them."""
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
        return pipe.to(device).eval()

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
    def decode_latents(self, tokens: torch.Tensor, noise: torch.Tensor, steps: Optional[int] = None,
                       solver: Optional[str] = None) -> torch.Tensor:
        """tokens (B,D), noise (B,C,S,S) -> decoder-space sample (latents or pixels)."""
        s = self.cfg.sampling
        tokens = tokens.to(self.device)

        def velocity(x, t):
            with self._autocast():
                return self.decoder(x, t, tokens)

        return flow.solve(velocity, noise.to(self.device), steps or s.decoder_steps, solver or s.decoder_solver)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, noise: torch.Tensor, steps: Optional[int] = None,
                      solver: Optional[str] = None) -> torch.Tensor:
        """Low level: tokens (B,D) + decoder noise (B,C,S,S) -> images (B,3,H,W) float32, roughly
        in [-1,1] (NOT clamped: parity checks compare the raw decoder output)."""
        lat = self.decode_latents(tokens, noise, steps, solver)
        with self._autocast():
            return self.latent.decode(lat).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, seed: int = 0, *, start: int = 0, steps: Optional[int] = None,
               solver: Optional[str] = None, output: str = "pil"):
        """tokens (B,D) -> images; image i gets decoder noise (seed, start + i). ``output``: "pil"
        (list of PIL images), "np" (uint8 (B,H,W,3)) or "pt" (float (B,3,H,W) clamped to [-1,1])."""
        check_output_kind(output)
        self._need("decoder", "latent")
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2:
            raise InputError(f"tokens must be (B, D), got shape {tuple(tokens.shape)}")
        idx = _indices(seed, start, len(tokens))
        return to_output(self.decode_tokens(tokens, self.decoder_noise(idx, seed), steps, solver), output)

    @torch.no_grad()
    def reconstruct(self, images, seed: int = 0, *, start: int = 0, steps: Optional[int] = None,
                    solver: Optional[str] = None, output: str = "pil"):
        """Images (any :meth:`encode` input) -> encode -> decode; image i gets decoder noise
        (seed, start + i). ``output`` as :meth:`decode`."""
        check_output_kind(output)
        tokens = self.encode(images)
        return self.decode(tokens, seed, start=start, steps=steps, solver=solver, output=output)

    # ------------------------------------------------------------------ stage (b)
    def _condition(self, labels: Optional[torch.Tensor], prompts: Optional[Sequence[str]], scale: float):
        """-> (cond (B,), null_cond (B,), model_fn(x, t, cond)) for ``flow.guided_velocity``.

        The null condition is the generator's ``null(B)``. Class generators: cond = labels, null =
        the null class. Text generators: the prompts and the null prompts ("") are encoded once into
        a table; cond / null are row indices into it."""
        if self.is_text:
            if prompts is None:
                raise InputError("this generator is text-conditioned: pass prompts, not class labels")
            prompts = [str(p) for p in prompts]
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
        if prompts is not None:
            raise InputError("this generator is class-conditional: pass class labels, not prompts")
        y = labels.to(self.device).long()
        if self.num_classes == 0 or scale == 1.0:
            # Unconditional generators ignore y and scale 1 never calls the null half: any null
            # condition gives v_u == v_c (CFG is a no-op).
            null = y
        elif self.generator.null_class is None:
            raise InputError("this generator has no null class (class_dropout was 0): CFG is unavailable, use cfg 1.0")
        else:
            null = self.generator.null(len(y), self.device)

        def model_fn(x, t, c):
            with self._autocast():
                return self.generator(x, t, c)

        return y, null, model_fn

    @torch.no_grad()
    def generate(self, labels: Optional[torch.Tensor], noise: torch.Tensor, steps: Optional[int] = None,
                 cfg: Optional[float] = None, cfg_interval: Optional[Sequence[float]] = "default",
                 solver: Optional[str] = None, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """labels (B,) or prompts (B strings, text generators), noise (B,n,D) in normalised token
        space -> tokens (B,D) (denormalised). CFG's null condition: the null class / the prompt ""."""
        s = self.cfg.sampling
        scale = s.cfg if cfg is None else cfg
        interval = tuple(s.cfg_interval) if cfg_interval == "default" else cfg_interval
        cond, null, model_fn = self._condition(labels, prompts, scale)
        v = flow.guided_velocity(model_fn, cond, null, scale, interval)
        x = flow.solve(v, noise.to(self.device), steps or s.steps, solver or s.solver)
        return self.generator.denormalize(x)

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[str], noise: torch.Tensor, **kw) -> torch.Tensor:
        """Prompts (B strings) -> tokens (B,D); kw as :meth:`generate`."""
        return self.generate(None, noise, prompts=prompts, **kw)

    # ------------------------------------------------------------------ both stages
    def generator_noise(self, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        """(B, n, D) generator-space noise of images ``indices`` (CPU, float32)."""
        return index_noise(seed, indices, (self.cfg.generator.n_tokens, self.cfg.generator.token_dim),
                           STREAM_GENERATOR)

    def decoder_noise(self, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        """(B, C, S, S) decoder noise of images ``indices`` (CPU, float32)."""
        return index_noise(seed, indices, self.latent_shape, STREAM_DECODER)

    def generate_from(self, labels: Optional[torch.Tensor], noise: torch.Tensor,
                      prompts: Optional[Sequence[str]] = None, **kw) -> torch.Tensor:
        """Stage (b) of :meth:`sample` on given generator noise: -> tokens (B, D)."""
        return self.generate(labels, noise, kw.get("steps"), kw.get("cfg"), kw.get("cfg_interval", "default"),
                             kw.get("solver"), prompts=prompts)

    def decode_from(self, tokens: torch.Tensor, noise: torch.Tensor, **kw) -> torch.Tensor:
        """The decoder + VAE half of :meth:`sample` on given decoder noise: -> images."""
        return self.decode_tokens(tokens, noise, kw.get("decoder_steps"), kw.get("decoder_solver"))

    def nfe(self, **kw) -> dict:
        """Network evaluations per image of :meth:`sample` with sampler kw: ``generator`` /
        ``decoder`` calls (Heun: 2 a step) and ``generator_guided`` (calls inside the CFG interval,
        which run the batch twice: null and class rows)."""
        s = self.cfg.sampling
        steps, solver = kw.get("steps") or s.steps, kw.get("solver") or s.solver
        dsteps, dsolver = kw.get("decoder_steps") or s.decoder_steps, kw.get("decoder_solver") or s.decoder_solver
        scale = s.cfg if kw.get("cfg") is None else kw["cfg"]
        interval = kw.get("cfg_interval", "default")
        interval = tuple(s.cfg_interval) if interval == "default" else interval
        grid = flow.time_grid(steps)
        times = [grid[i] for i in range(steps)] + ([grid[i + 1] for i in range(steps)] if solver == "heun" else [])
        guided = 0 if scale == 1.0 else sum(flow.in_interval(t, interval) for t in times)
        per = {"euler": 1, "heun": 2}
        return {"generator": steps * per[solver], "generator_guided": int(guided), "decoder": dsteps * per[dsolver]}

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], indices: Sequence[int], seed: int = 0,
               prompts: Optional[Sequence[str]] = None, **kw) -> torch.Tensor:
        """Class labels (or, for a text generator, ``prompts``: one string per image) -> images,
        noise from (seed, index). kw: steps, cfg, cfg_interval, solver, decoder_steps, decoder_solver."""
        z = self.generate_from(labels, self.generator_noise(indices, seed), prompts=prompts, **kw)
        return self.decode_from(z, self.decoder_noise(indices, seed), **kw)


    # ------------------------------------------------------------------ the user's API
    SAMPLER_KEYS = ("steps", "cfg", "cfg_interval", "solver", "decoder_steps", "decoder_solver")

    @torch.no_grad()
    def forward(self, classes: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None, *,
                n: int = 1, seed: int = 0, start: int = 0, output: str = "pil",
                batch_size: Optional[int] = None, **sampler_kw):
        """``pipe(classes=[88, 88, 207], seed=0, output="pil")``: labels (or ``prompts=[...]`` for
        a text run; nothing for an unconditional one) -> images.

        Each class / prompt gives ``n`` images in a row (``classes=[c], n=4`` = ``[c] * 4``), and
        image i of the job gets the noise of index ``start + i`` under ``seed``, so
        ``pipe(classes=[c] * n, seed=s, output="np")`` is pixel for pixel
        ``reptok sample --class c -n n --seed s --no-fast --out x.npz`` (same batch size: it runs
        the CLI's calls, ``generate_from`` / ``decode_from`` / ``tensor_to_uint8``).
        ``sampler_kw``: steps, cfg, cfg_interval, solver, decoder_steps, decoder_solver.
        ``batch_size``: rows per network call (default: the whole job in one batch; a last
        partial batch is padded with its last row, as the CLI does). ``output`` as :meth:`decode`."""
        check_output_kind(output)
        unknown = sorted(set(sampler_kw) - set(self.SAMPLER_KEYS))
        if unknown:
            raise InputError(f"unknown sampler option {unknown[0]!r}: choose from {', '.join(self.SAMPLER_KEYS)}")
        if self.generator is None:
            raise InputError("this pipeline has no generator (a tokenizer run): use encode / decode / reconstruct")
        self._need("decoder", "latent")
        if not isinstance(n, int) or n < 1:
            raise InputError(f"n={n!r}: the number of images per class or prompt must be an int >= 1")
        conds = self._job_conditions(classes, prompts)
        conds = [c for c in conds for _ in range(n)]
        idx = _indices(seed, start, len(conds))
        b = len(conds) if batch_size is None else int(batch_size)
        if b < 1:
            raise InputError(f"batch_size={batch_size!r}: must be >= 1")
        out = []
        for i in range(0, len(conds), b):
            part, k = idx[i: i + b], len(idx[i: i + b])
            rows = pad_rows(conds[i: i + b], b)
            g_noise = pad_rows(self.generator_noise(part, seed), b)
            if self.is_text:
                z = self.generate_from(None, g_noise, prompts=rows, **sampler_kw)
            else:
                z = self.generate_from(torch.tensor(rows, dtype=torch.long), g_noise, **sampler_kw)
            images = self.decode_from(z, pad_rows(self.decoder_noise(part, seed), b), **sampler_kw)[:k]
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
