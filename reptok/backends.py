"""Pick the backend that runs the networks of a sampling Pipeline: torch, onnx or trt.

Every backend returns the same ``Pipeline`` object; ONNX Runtime / TensorRT sessions replace the
torch modules with callables of the same signature (see ``export/runtime.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .errors import InputError

BACKENDS = ("torch", "onnx", "trt")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_sampling_pipeline(ckpt: Path, device: str = "cpu", backend: str = "torch", engine: Optional[Path] = None,
                           precision: str = "fp32"):
    from .checkpoint import load_pipeline

    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend == "torch":
        pipe = load_pipeline(ckpt, device, components=("decoder", "generator", "vae"))
        pipe.autocast_dtype = PRECISIONS[precision]
        return pipe
    if engine is None:
        raise InputError(f"--backend {backend} needs --engine DIR (written by 'reptok export {backend}')")
    from export.runtime import load_runtime_pipeline

    return load_runtime_pipeline(ckpt, engine, backend=backend, device=device)
