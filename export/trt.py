"""TensorRT engines from an ONNX export folder (``reptok export trt``), TensorRT Python API only.

For each graph of the ONNX folder: an explicit-batch network parsed by ``trt.OnnxParser``, one
optimisation profile over the batch axis of every input, precision flags, and a serialized
engine ``<graph>.plan``. The folder also gets a copy of ``manifest.json`` (so ``--engine DIR``
works exactly like an ONNX folder) and the sidecar ``engines.json``: TensorRT version, GPU name,
compute capability, precision and the per-engine profile.

Batch profile: ``min / opt / max`` apply to the sampling batch. The generator's profile is
doubled because CFG runs its conditional and unconditional rows in one call (see
``export/onnx.py``). ``TrtModule`` splits larger batches into chunks.

Mixed precision: with fp16 / bf16 every reduction and power layer (the mean of squares in the
RMS norms and the cosine-similarity q/k norms) is pinned to float32: a 28-layer residual stream
squared easily exceeds fp16's 65504, which would turn a norm into inf / 0.

``tensorrt`` is imported lazily: importing this module needs neither CUDA nor TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from reptok.choices import DTYPES
from reptok.errors import InputError
from reptok.io import atomic_dir, atomic_write_bytes

from .onnx import MANIFEST, read_manifest
from .runtime import SIDECAR, require_trt

PRECISIONS = tuple(DTYPES)  # builder flags, by the numeric format's name
FORMAT = "reptok-trt/1"
# Graphs whose batch is twice the sampling batch (CFG's [null, cond] rows in one call).
BATCH_MULTIPLIER = {"generator": 2}


def _pin_norms_fp32(trt, network) -> int:
    """Force normalisation statistics to float32 (see the module docstring). Returns the count.

    Pinned: reductions, powers and normalisation layers, then every layer fed by a pinned
    tensor whose outputs are per-row statistics (last dim 1: ``+ eps``, ``sqrt``, ``1/x``). The
    final ``x * factor`` is full width and stays in the fast precision. Layers are visited in
    the network's (topological) order, so one pass propagates.
    """
    norm_type = getattr(trt.LayerType, "NORMALIZATION", None)
    pinned_tensors = set()
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in (trt.LayerType.REDUCE, norm_type)
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # the Python API's down-cast to read .op
            pin = pin or layer.op == trt.ElementWiseOperation.POW
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not pin and layer.type in (trt.LayerType.ELEMENTWISE, trt.LayerType.UNARY):
            fed = any(layer.get_input(j) is not None and layer.get_input(j).name in pinned_tensors
                      for j in range(layer.num_inputs))
            pin = fed and all(_is_row_statistic(o) for o in outputs)
        if pin and all(o.dtype in (trt.float32, trt.float16) for o in outputs):
            layer.precision = trt.float32
            for j, o in enumerate(outputs):
                layer.set_output_type(j, trt.float32)
                pinned_tensors.add(o.name)
            n += 1
    return n


def _is_row_statistic(tensor) -> bool:
    """A tensor whose last dimension is 1 (e.g. the (B, L, 1) mean of squares of a norm)."""
    try:
        shape = list(tensor.shape)
    except (TypeError, ValueError):  # unknown rank
        return False
    return len(shape) > 0 and shape[-1] == 1


def _parse(trt, builder, logger, path: Path):
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated there).
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):  # from a file: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{path.name}: TensorRT's ONNX parser failed: {errors}")
    return network, parser


def _sidecar(trt, precision: str, min_batch: int, opt_batch: int, max_batch: int, onnx_dir: Path,
             manifest: dict) -> dict:
    """The engine folder's record of what was built, where and from which graphs (engines to come)."""
    device = torch.cuda.current_device()
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability(device),
        "cuda": torch.version.cuda,
        "precision": precision,
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "onnx_dir": str(onnx_dir.absolute()),
        "config_sha256": manifest.get("config_sha256"),
        "engines": {},
    }


def _builder_config(trt, builder, network, precision: str, workspace_gb: Optional[float]):
    """The builder config for ``precision``; returns it and how many norm layers were pinned to fp32."""
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32
    pinned = 0
    if precision != "fp32":
        pinned = _pin_norms_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return config, pinned


def _add_profile(builder, config, network, graph_file: str, bmin: int, bopt: int, bmax: int) -> Dict[str, dict]:
    """One optimization profile over the batch axis (every other axis is static); its shapes by input."""
    profile = builder.create_optimization_profile()
    shapes: Dict[str, dict] = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        if any(d < 0 for d in dims[1:]):
            raise RuntimeError(f"{graph_file}: input {inp.name} has a dynamic non-batch axis {dims}")
        mk = lambda b: tuple([b] + dims[1:])  # noqa: E731
        profile.set_shape(inp.name, mk(bmin), mk(bopt), mk(bmax))
        shapes[inp.name] = {"min": mk(bmin), "opt": mk(bopt), "max": mk(bmax)}
    config.add_optimization_profile(profile)
    return shapes


def build_engines(
    onnx_dir,
    out_dir,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    timing_cache: Optional[Path] = None,
    workspace_gb: Optional[float] = None,
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Build one TensorRT engine per graph of ``onnx_dir`` into ``out_dir``; returns the sidecar.

    precision: fp16 | bf16 (weights and activations, norms pinned to fp32) | fp32 (TF32 off).
    timing_cache: a file read if present and written back after the build (faster rebuilds).
    Raises InputError at once without CUDA or TensorRT, or for bad batch bounds.
    """
    trt = require_trt()
    log = log or (lambda msg: None)
    if precision not in PRECISIONS:
        raise InputError(f"--trt-precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(f"batch profile must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    if precision == "bf16" and not hasattr(trt.BuilderFlag, "BF16"):
        raise InputError(f"--trt-precision bf16 needs TensorRT >= 9 (this is {trt.__version__})")
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if manifest.get("dtype") != "fp32":
        log(f"note: {onnx_dir} holds {manifest.get('dtype')} graphs; TensorRT precision flags work best from fp32 ONNX")

    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    sidecar = _sidecar(trt, precision, min_batch, opt_batch, max_batch, onnx_dir, manifest)
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        for comp, graph in manifest["graphs"].items():
            t0 = time.perf_counter()
            builder = trt.Builder(logger)
            network, _parser = _parse(trt, builder, logger, onnx_dir / graph["file"])
            config, pinned = _builder_config(trt, builder, network, precision, workspace_gb)
            k = BATCH_MULTIPLIER.get(comp, 1)
            bmin, bopt, bmax = min_batch, opt_batch * k, max_batch * k
            shapes = _add_profile(builder, config, network, graph["file"], bmin, bopt, bmax)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, ignore_mismatch=False)
            log(f"building {comp} ({precision}, batch {bmin}/{bopt}/{bmax}) ...")
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError(f"TensorRT failed to build the {comp} engine (see the TensorRT log above)")
            cache_bytes = bytes(config.get_timing_cache().serialize())
            name = Path(graph["file"]).stem + ".plan"
            (tmp / name).write_bytes(bytes(plan))
            seconds = time.perf_counter() - t0
            sidecar["engines"][comp] = {
                "file": name, "onnx": graph["file"], "batch": {"min": bmin, "opt": bopt, "max": bmax},
                "shapes": shapes, "fp32_pinned_layers": pinned, "build_s": round(seconds, 1),
                "bytes": (tmp / name).stat().st_size,
            }
            log(f"{name}: built in {seconds:.1f} s")
        shutil.copy(onnx_dir / MANIFEST, tmp / MANIFEST)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    if timing_cache is not None and cache_bytes:
        atomic_write_bytes(Path(timing_cache), cache_bytes)
    sidecar["out"] = str(Path(out_dir).absolute())
    return sidecar
