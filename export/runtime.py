"""Runtime modules with the torch call signature, and the Pipeline built from them (the torch
fast paths, CUDA graphs and regional ``torch.compile``, are ``reptok/fast.py``).

``OrtModule`` (ONNX Runtime) and ``TrtModule`` (TensorRT) take and return torch tensors, so the
one sampling loop in ``reptok.pipeline.Pipeline`` drives them exactly as it drives the torch
networks::

    decoder(x (B,C,S,S), t (B,), token (B,Dt)) -> v (B,C,S,S)
    generator(x (B,n,D), t (B,), y (B,)) -> v (B,n,D)     + .null_class, .denormalize(x)
    generator(x, t, text (B,L,E), text_mask (B,L)) -> v    text runs (bool mask cast to 0/1 float)
    latent.decode(latents (B,C,h,w)) -> images (B,3,H,W)

``load_runtime_pipeline(ckpt, engine_dir, backend, device)`` is what ``reptok sample --backend
onnx|trt --engine DIR`` calls (through ``load_sampling_pipeline``, which picks torch or a runtime). TensorRT is imported lazily; on a
machine without CUDA or the ``tensorrt`` package, ``--backend trt`` fails at once with an
InputError (exit code 2).

Text-to-image runs: the graph / engine replaces only the generator network; prompts are still
encoded by the run's frozen **torch** text encoder (``reptok.run.load_text_encoder``),
once per sampling call, and ``Pipeline._condition`` feeds their hidden states to the runtime
generator through the same call as the torch module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from reptok.backends import PRECISIONS, SIDECAR, resolve_backend
from reptok.choices import RUNTIME_BACKENDS as BACKENDS
from reptok.errors import InputError
from reptok.models.generator import denormalize_tokens, normalize_tokens
from reptok.models.text_generator import TextCondition
from reptok.models.vae import PixelSpace
from reptok.pipeline import Pipeline, load_text_encoder
from reptok.run import read_run_config

from .onnx import import_ort, ort_session_options, pipeline_config_sha256, read_manifest, run_config_sha256



# ----------------------------------------------------------------------------- availability
def require_trt(device: Optional[str] = None):
    """Import tensorrt, or raise InputError at once when CUDA or TensorRT is missing."""
    if not torch.cuda.is_available():
        raise InputError("TensorRT needs a CUDA GPU and none is available on this machine; "
                         "use --backend onnx (or torch) here")
    if device is not None and not str(device).startswith("cuda"):
        raise InputError(f"--backend trt runs on CUDA tensors; got --device {device} (use --device cuda)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise InputError("the 'tensorrt' Python package is not installed; pip install 'reptok[gpu]' "
                         "(tensorrt>=10) or use --backend onnx") from None
    return tensorrt


def ort_providers(device: str) -> List[str]:
    """CUDA provider when the device is CUDA and ORT has it (onnxruntime-gpu), else CPU."""
    ort = import_ort()

    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _concrete(shape: Sequence, batch: int) -> List[int]:
    return [batch if isinstance(d, str) else int(d) for d in shape]


# ----------------------------------------------------------------------------- ONNX Runtime
_ORT_TYPE = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
             "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


class OrtModule:
    """An ONNX Runtime session called like the torch module it was exported from.

    ``module(*tensors)`` maps positional arguments to ``input_names`` (the manifest's order),
    feeds the ones the graph declares (the exporter drops unused inputs), and returns the first
    output as a torch tensor on ``device``. On CUDA with the CUDA provider it binds torch's
    device memory directly (I/O binding: no host round trip); otherwise it goes through numpy
    (zero-copy for contiguous CPU tensors).
    """

    def __init__(self, path, device: str = "cpu", input_names: Optional[Sequence[str]] = None,
                 output_shapes: Optional[Dict[str, Sequence]] = None, providers: Optional[List[str]] = None,
                 threads: Optional[int] = None):
        ort = import_ort()

        self.path = Path(path)
        self.device = torch.device(device)
        self.providers = providers or ort_providers(str(device))
        self.session = ort.InferenceSession(str(self.path), ort_session_options(threads), providers=self.providers)
        self.graph_inputs = {i.name: _ORT_TYPE.get(i.type, torch.float32) for i in self.session.get_inputs()}
        self.input_names = list(input_names) if input_names else list(self.graph_inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = dict(output_shapes or {})
        self.on_cuda = self.device.type == "cuda" and self.session.get_providers()[0] == "CUDAExecutionProvider"

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(self.input_names):
            raise TypeError(f"{self.path.name}: expected {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(args)}")
        named = {n: a for n, a in zip(self.input_names, args) if n in self.graph_inputs}
        if self.on_cuda and self.output_names[0] in self.output_shapes:
            return self._run_cuda(named)
        feed = {n: a.detach().to("cpu", self.graph_inputs[n]).contiguous().numpy() for n, a in named.items()}
        out = self.session.run(self.output_names[:1], feed)[0]
        return torch.from_numpy(out).to(self.device)

    def _run_cuda(self, named: Dict[str, torch.Tensor]) -> torch.Tensor:
        import numpy as np

        binding = self.session.io_binding()
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        keep = []
        batch = next(iter(named.values())).shape[0]
        for n, a in named.items():
            a = a.detach().to(self.device, self.graph_inputs[n]).contiguous()
            keep.append(a)  # alive until the run returns
            binding.bind_input(n, "cuda", idx, _np_dtype(a.dtype, np), list(a.shape), a.data_ptr())
        name = self.output_names[0]
        out = torch.empty(_concrete(self.output_shapes[name], batch), dtype=torch.float32, device=self.device)
        binding.bind_output(name, "cuda", idx, np.float32, list(out.shape), out.data_ptr())
        # ORT runs on its own CUDA stream: torch's pending writes to the inputs must land first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out


def _np_dtype(dtype: torch.dtype, np):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_}[dtype]


# ----------------------------------------------------------------------------- TensorRT
def _trt_to_torch(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    return table[dt]


class TrtModule:
    """A TensorRT engine called like the torch module, on CUDA tensors owned by torch (no pycuda).

    Inputs are cast to the engine's dtypes and made contiguous on ``device``; outputs are
    allocated with ``torch.empty`` and the engine is enqueued on torch's current stream
    (``execute_async_v3``), so it orders with the surrounding torch work without a sync. A batch
    above the engine's profile maximum is split into chunks (CFG doubles the generator batch).
    """

    def __init__(self, plan_path, device: str = "cuda", input_names: Optional[Sequence[str]] = None):
        trt = require_trt(device)
        self.trt = trt
        self.path = Path(plan_path)
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise InputError(f"{self.path}: TensorRT could not load this engine (built with another TensorRT "
                                 "version or GPU?); rebuild it with 'reptok export trt'")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.engine_inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _trt_to_torch(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.input_names = list(input_names) if input_names else list(self.engine_inputs)
        lo, _, hi = self.engine.get_tensor_profile_shape(self.engine_inputs[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(self.input_names):
            raise TypeError(f"{self.path.name}: expected {len(self.input_names)} inputs, got {len(args)}")
        batch = args[0].shape[0]
        if batch < self.min_batch:
            raise InputError(f"{self.path.name}: batch {batch} is below the engine's minimum {self.min_batch}; "
                             "rebuild with a smaller --min-batch")
        if batch <= self.max_batch:
            return self._run(args)
        step = self.max_batch
        return torch.cat([self._run([a[i:i + step] for a in args]) for i in range(0, batch, step)])

    def _run(self, args: Sequence[torch.Tensor]) -> torch.Tensor:
        ctx = self.context
        keep = []
        for name, a in zip(self.input_names, args):
            if name not in self.dtypes:
                continue  # dropped by the exporter (unused input)
            a = a.detach().to(self.device, self.dtypes[name]).contiguous()
            keep.append(a)  # must outlive the enqueue (the caching allocator is stream-ordered)
            ctx.set_input_shape(name, tuple(a.shape))
            ctx.set_tensor_address(name, a.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed (see the log above)")
        return outs[0].float()


# ----------------------------------------------------------------------------- pipeline shims
class RuntimeGenerator:
    """The generator as the pipeline sees it: ``__call__(x, t, y)`` (or ``(x, t, text, text_mask)``
    for a text-conditioned graph), ``null_class``, ``denormalize`` / ``normalize`` with the token
    statistics from the manifest."""

    def __init__(self, net, info: dict, device):
        self.net = net
        self.null_class = info["null_class"]
        self.text_conditioned = bool(info.get("text_conditioned", False))
        self.n_tokens = int(info["n_tokens"])
        self.token_mean = torch.tensor(info["token_mean"], dtype=torch.float32, device=device)
        self.token_std = torch.tensor(info["token_std"], dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """cond: ``y`` (class graphs) or ``text, text_mask`` (text graphs; mask None = all valid)."""
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.text_conditioned:
            text, mask = cond[0], (cond[1] if len(cond) > 1 else None)
            if mask is None:
                mask = torch.ones(text.shape[:2], device=text.device)
            return self.net(x, t, text, mask.float())
        return self.net(x, t, *cond)

    def null(self, batch: int, device=None):
        """The CFG null condition, as ``TokenGenerator.null``: null-class labels (B,) or [""] * B."""
        if self.text_conditioned:
            return [TextCondition.NULL_PROMPT] * batch
        if self.null_class is None:
            raise InputError("this generator has no null class (class_dropout was 0): CFG is unavailable")
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return normalize_tokens(z, self.token_mean, self.token_std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize_tokens(x, self.token_mean, self.token_std, self.n_tokens)


class RuntimeLatent:
    """``decode(latents) -> images`` over the exported VAE decoder."""

    is_pixel = False

    def __init__(self, net):
        self.net = net

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


def build_runtime_pipeline(cfg, engine_dir, backend: str = "onnx", device: str = "cpu", manifest: Optional[dict] = None,
                           text_encoder=None, run_dir=None, run_doc: Optional[dict] = None):
    """A Pipeline over the graphs (onnx) or engines (trt) in ``engine_dir``, for config ``cfg``.

    No run-matching check here (``load_runtime_pipeline`` does it); components not exported
    are None, the pixel-space latent is ``PixelSpace``. ``text_encoder``: the torch text
    encoder of a text-to-image run (prompts are encoded in torch, outside the graphs).
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: runtime backends are {', '.join(BACKENDS)}")
    engine_dir = Path(engine_dir)
    if backend == "trt":
        require_trt(device)
    manifest = manifest or read_manifest(engine_dir)
    graphs = manifest["graphs"]
    files = {c: g["file"] for c, g in graphs.items()}
    if backend == "trt":
        sidecar = read_sidecar(engine_dir)
        check_engines_match_gpu(sidecar, engine_dir, device)
        files = {c: e["file"] for c, e in sidecar["engines"].items()}

    def make(comp):
        if comp not in files:
            return None
        names = [i["name"] for i in graphs[comp]["inputs"]] if comp in graphs else None
        if comp == "generator" and names is not None and len(names) < 3:
            names = names + ["y"]  # unconditional: y was dropped from the graph; accept and ignore it
        path = engine_dir / files[comp]
        if backend == "onnx":
            shapes = {o["name"]: o["shape"] for o in graphs[comp]["outputs"]}
            return OrtModule(path, device, input_names=names, output_shapes=shapes)
        return TrtModule(path, device, input_names=names)

    gen = make("generator")
    vae = make("vae")
    pipe = Pipeline(
        cfg,
        encoder=make("encoder"),
        decoder=make("decoder"),
        latent=PixelSpace(cfg.vae) if cfg.vae.is_pixel else (RuntimeLatent(vae) if vae is not None else None),
        generator=RuntimeGenerator(gen, manifest["generator"], device) if gen is not None else None,
        text_encoder=text_encoder,
        device=device,  # runtime modules have no torch parameters to infer it from
        backend=backend, engine_dir=engine_dir, manifest=manifest, run_dir=run_dir, run_doc=run_doc,
    )
    return pipe.eval()


def load_runtime_pipeline(ckpt, engine_dir, backend: str = "onnx", device: str = "cpu"):
    """``reptok sample --backend onnx|trt``: the run's config + the exported graphs / engines.

    The export must come from this run: the sha256 of the run's config.json must equal the
    manifest's (InputError otherwise, with the fix in the message).
    """
    if backend == "trt":
        require_trt(device)  # fail at once, before reading anything
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    doc = read_run_config(ckpt)
    cfg = doc["config"]
    if manifest.get("config_sha256"):
        ok = manifest["config_sha256"] == run_config_sha256(ckpt)
    else:  # exported from an in-memory pipeline: compare the canonical config
        ok = manifest.get("pipeline_sha256") == pipeline_config_sha256(cfg)
    if not ok:
        src = manifest.get("source_run") or f"an in-memory {manifest.get('preset') or 'pipeline'}"
        raise InputError(f"{engine_dir} was exported from another run or config ({src}), not {ckpt}; "
                         f"re-export with 'reptok export onnx --ckpt {ckpt} --out DIR'")
    text_encoder = None
    if cfg.generator is not None and cfg.generator.text_encoder is not None and "generator" in manifest["graphs"]:
        text_encoder = load_text_encoder(ckpt, device)  # torch: prompts are encoded outside the graphs
    return build_runtime_pipeline(cfg, engine_dir, backend, device, manifest, text_encoder=text_encoder,
                                  run_dir=Path(ckpt), run_doc=doc)


def load_sampling_pipeline(ckpt: Path, device: str = "cpu", backend: Optional[str] = "torch",
                           engine: Optional[Path] = None, precision: Optional[str] = None, fast: bool = False,
                           compile: bool = False, cuda_graphs: Optional[bool] = None,
                           components=("decoder", "generator", "vae")):
    """The sampling pipeline of a run on ``device`` with the chosen backend and fast path: torch
    (``Pipeline.from_run(..., fast=)``) or the exported graphs / engines in ``engine``.

    ``fast=False`` (library default: the exact torch modules) keeps eager torch at ``precision``
    (default fp32); the CLI passes ``fast=True`` unless ``--no-fast``."""
    backend = resolve_backend(backend, engine)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend == "torch":
        return Pipeline.from_run(ckpt, device, components=components, fast=fast, precision=precision,
                                 compile=compile, cuda_graphs=cuda_graphs)
    if engine is None:
        raise InputError(f"--backend {backend} needs --engine DIR (written by 'reptok export {backend}')")
    if compile or cuda_graphs:
        raise InputError(f"--compile / --cuda-graphs apply to the torch backend, not --backend {backend}")
    pipe = load_runtime_pipeline(ckpt, engine, backend=backend, device=device)
    provider = getattr(pipe.decoder, "provider", None) or ("TensorRT" if backend == "trt" else "?")
    return pipe.with_fast_path({"backend": backend, "device": str(pipe.device), "provider": provider,
                                "precision": pipe.manifest.get("dtype", "fp32"), "cuda_graphs": False,
                                "compile": False})


# ----------------------------------------------------------------------------- TRT sidecar
def read_sidecar(engine_dir: Path) -> dict:
    path = Path(engine_dir) / SIDECAR
    if not path.is_file():
        raise InputError(f"{engine_dir}: no {SIDECAR}; build TensorRT engines with 'reptok export trt --onnx DIR --out DIR'")
    return json.loads(path.read_text())


def check_engines_match_gpu(sidecar: dict, engine_dir, device: str) -> None:
    """TensorRT engines are specific to the GPU architecture and TensorRT version."""
    import tensorrt as trt

    dev = torch.device(device)
    cc = "%d.%d" % torch.cuda.get_device_capability(dev)
    if sidecar.get("compute_capability") and sidecar["compute_capability"] != cc:
        raise InputError(f"{engine_dir}: engines were built for compute capability {sidecar['compute_capability']} "
                         f"({sidecar.get('gpu')}), this GPU is {cc}; rebuild with 'reptok export trt'")
    if sidecar.get("tensorrt") and sidecar["tensorrt"] != trt.__version__:
        raise InputError(f"{engine_dir}: engines were built with TensorRT {sidecar['tensorrt']}, "
                         f"this is {trt.__version__}; rebuild with 'reptok export trt'")


__all__ = ["OrtModule", "TrtModule", "RuntimeGenerator", "RuntimeLatent", "build_runtime_pipeline",
           "load_runtime_pipeline", "load_sampling_pipeline", "require_trt", "ort_providers", "SIDECAR"]
