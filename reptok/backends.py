"""Pick the backend and the fast path that run the networks of a sampling Pipeline.

Every backend returns the same ``Pipeline`` object; ONNX Runtime / TensorRT sessions replace the
torch modules with callables of the same signature (``export/runtime.py`` builds those pipelines,
and its ``load_sampling_pipeline`` picks torch or a runtime; this package never imports ``export``).

The fast path (``apply_fast_path``), the default of ``reptok sample`` / ``reconstruct`` /
``eval recon`` / ``quickstart``; ``--no-fast`` gives torch eager float32:

- CUDA, torch backend: bf16 autocast and CUDA graphs for the decoder, the generator and the VAE
  decode (one captured graph per batch shape; the sampler pads a last partial batch to the full
  batch, so no second graph is captured); ``--compile`` adds regional ``torch.compile`` (opt-in:
  minutes of compile time at XL pay off only for long jobs).
- CPU, torch backend: eager float32 (bf16 autocast is slower on most CPUs; see README "Fast
  inference" for the measured ORT vs torch figures that keep torch the CPU default).
- ``--backend onnx|trt`` (or ``--engine DIR`` alone, which implies onnx unless the folder holds
  TensorRT engines): the exported graphs, as they are.

``pipe.fast_path`` records what was chosen (``describe_fast_path`` makes the one-line summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .choices import BACKENDS, PRECISIONS
from .errors import InputError
from .fast import fast_variant

SIDECAR = "engines.json"  # the TensorRT sidecar written by export/trt.py (resolve_backend looks for it)


def resolve_backend(backend: Optional[str], engine: Optional[Path]) -> str:
    """``auto`` (or None): onnx / trt when ``--engine DIR`` is given (trt if DIR holds TensorRT
    engines), torch otherwise."""
    if backend not in (None, "auto"):
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}")
        return backend
    if engine is None:
        return "torch"
    return "trt" if (Path(engine) / SIDECAR).is_file() else "onnx"


def set_tf32(device, on: bool) -> None:
    """TF32 for float32 matmuls and convolutions on a CUDA ``device`` (elsewhere nothing).

    On: the fast paths (the float32 ops a bf16 run keeps, ``extract``, fp32 training). Off: the
    ``--no-fast`` eager fp32 reference (cuDNN allows TF32 convolutions by default, which would
    put TF32 rounding into the reference the fast paths are measured against)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def apply_fast_path(pipe, fast: bool = True, precision: Optional[str] = None, compile: bool = False,
                    cuda_graphs: Optional[bool] = None):
    """The fastest correct way to run ``pipe`` (a torch-backend Pipeline) on its device.

    ``precision``: None = auto (bf16 on CUDA when ``fast``, else fp32) or fp32 | bf16 | fp16
    autocast. ``cuda_graphs``: None = on with ``fast`` on CUDA. ``compile``: regional
    torch.compile (opt-in). Returns the pipeline to sample with (a wrapped copy when graphs or
    compile are on) with ``fast_path`` filled in."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    cuda = pipe.device.type == "cuda"
    if precision is None:
        precision = "bf16" if (fast and cuda) else "fp32"
    if cuda_graphs is None:
        cuda_graphs = fast and cuda
    if cuda_graphs and not cuda:
        raise InputError("--cuda-graphs needs a CUDA device (--device cuda)")
    if not fast:
        compile = cuda_graphs = False
    set_tf32(pipe.device, fast)
    if cuda_graphs or compile:
        pipe = fast_variant(pipe, cuda_graphs=cuda_graphs, compile=compile)
    return pipe.with_fast_path({"backend": "torch", "device": str(pipe.device), "precision": precision,
                                "cuda_graphs": bool(cuda_graphs), "compile": bool(compile)}, PRECISIONS[precision])


def describe_fast_path(fp: Optional[dict]) -> str:
    """'torch bf16 + CUDA graphs on cuda:0', 'onnx (CPUExecutionProvider) on cpu', ..."""
    if not fp:
        return "torch fp32 eager"
    if fp["backend"] != "torch":
        return f"{fp['backend']} ({fp.get('provider', '?')}) on {fp['device']}"
    parts = [f"torch {fp['precision']}"]
    parts += ["CUDA graphs"] if fp["cuda_graphs"] else []
    parts += ["regional compile"] if fp["compile"] else []
    return " + ".join(parts) + ("" if fp["cuda_graphs"] or fp["compile"] else " eager") + f" on {fp['device']}"
