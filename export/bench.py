"""``reptok bench`` with the ONNX Runtime and TensorRT rows: ``reptok.bench`` measures, this
module builds the runtime pipelines it measures (``reptok`` never imports ``export``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

from reptok import bench

from .onnx import export_onnx, read_manifest
from .runtime import build_runtime_pipeline, load_runtime_pipeline, read_sidecar, require_trt
from .trt import build_engines


def run_bench(**kw) -> dict:
    """``reptok.bench.run_bench`` (same arguments) with the onnx / trt backends available."""
    return bench.run_bench(**kw, runtimes=RUNTIMES)


def runtime_pipelines(ref, ckpt, backends, precision, onnx_dir, trt_dir, batch_sizes, dev, tmp, notes, log):
    """The onnx / trt rows' pipelines: exports into ``tmp`` folders when no folder is given."""
    out = []
    onnx_dtype = "fp16" if precision == "fp16" else "fp32"
    if precision == "bf16" and "onnx" in backends:
        notes.append("onnx: ONNX Runtime has no bf16 path here; the onnx rows run fp32 graphs")

    def export(dtype):
        folder = Path(tmp.enter_context(tempfile.TemporaryDirectory(prefix="reptok-bench-"))) / f"onnx-{dtype}"
        log(f"exporting ONNX ({dtype}) to {folder} ...")
        # A preset's random pipeline is exported from memory (the same weights as the torch rows).
        export_onnx(ckpt if ckpt is not None else ref, folder, dtype=dtype, log=log)
        return folder

    if "onnx" in backends and onnx_dir is None:
        onnx_dir = export(onnx_dtype)
    trt_onnx = None
    if "trt" in backends and trt_dir is None:
        # TensorRT takes fp32 graphs and applies its own precision flags.
        if onnx_dir is not None and read_manifest(onnx_dir).get("dtype") == "fp32":
            trt_onnx = onnx_dir
        else:
            trt_onnx = export("fp32")

    def load(folder, backend):
        if ckpt is not None:
            return load_runtime_pipeline(ckpt, folder, backend, str(dev))
        return build_runtime_pipeline(ref.cfg, folder, backend, str(dev))

    if "onnx" in backends:
        pipe = load(onnx_dir, "onnx")
        provider = pipe.decoder.provider if pipe.decoder is not None else "?"
        if dev.type == "cuda" and provider != "CUDAExecutionProvider":
            notes.append("onnx: CUDAExecutionProvider unavailable (install onnxruntime-gpu); rows use the CPU provider")
        out.append(("onnx", pipe, pipe.manifest.get("dtype", onnx_dtype), provider))
    if "trt" in backends:
        trt_prec = precision
        if trt_dir is None:
            trt_dir = Path(tmp.enter_context(tempfile.TemporaryDirectory(prefix="reptok-trt-"))) / "engines"
            log(f"building TensorRT engines ({trt_prec}) ...")
            build_engines(trt_onnx, trt_dir, precision=trt_prec, min_batch=1, opt_batch=max(batch_sizes),
                          max_batch=max(batch_sizes), log=log)
        else:
            trt_prec = read_sidecar(trt_dir).get("precision", "?")
        out.append(("trt", load(trt_dir, "trt"), trt_prec, "TensorRT"))
    return out


RUNTIMES = SimpleNamespace(check=require_trt, pipelines=runtime_pipelines)
