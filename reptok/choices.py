"""Named choices that several modules and commands accept: one home for each, so a command's
check, its error message and the code that acts on the choice never disagree."""

from __future__ import annotations

import torch

# The numeric formats by name: weight storage (convert, export onnx) and TensorRT builder flags.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inference precision -> autocast dtype (None: plain fp32, no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Training also takes "auto": bf16 where the device supports it, else fp32 (train.loop.amp_dtype_for).
TRAIN_PRECISIONS = ("auto", *PRECISIONS)

# Where a pipeline's modules run: eager / compiled torch, or an exported ONNX Runtime / TensorRT engine.
BACKENDS = ("torch", "onnx", "trt")
RUNTIME_BACKENDS = tuple(b for b in BACKENDS if b != "torch")  # the exported ones (export/runtime.py)
