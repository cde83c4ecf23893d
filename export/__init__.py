"""Export and fast runtimes for reptok pipelines.

- ``export.onnx.export_onnx(run_or_pipeline, out_dir, ...)``: one ONNX graph per network call
  (generator, decoder, VAE decoder, encoder), a manifest, ONNX Runtime self-verification.
- ``export.trt.build_engines(onnx_dir, out_dir, ...)``: TensorRT engines with a batch profile
  (TensorRT imported lazily; needs CUDA).
- ``export.runtime``: ``OrtModule`` / ``TrtModule`` (the torch call signature) and
  ``load_runtime_pipeline(ckpt, engine_dir, backend, device)``, a ``reptok.pipeline.Pipeline``
  whose networks are those runtimes, so sampling code exists once for every backend;
  ``load_sampling_pipeline``: torch (``Pipeline.from_run(..., fast=)``) or a runtime.
- ``export.bench.run_bench``: ``reptok.bench.run_bench`` with the onnx / trt rows.

Packages depend one way: ``reptok_cli -> export -> reptok`` (``reptok`` never imports this one).

Submodules are imported on use (``import export`` stays cheap and never needs TensorRT).
"""

from __future__ import annotations

__all__ = ["export_onnx", "build_engines", "load_runtime_pipeline", "OrtModule", "TrtModule"]


def __getattr__(name):
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    if name == "build_engines":
        from .trt import build_engines

        return build_engines
    if name in ("load_runtime_pipeline", "OrtModule", "TrtModule"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
