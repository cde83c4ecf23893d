"""Achieved TFLOP/s and MFU (model FLOPs utilisation) for training logs and ``reptok bench``.

FLOPs are the ones ``reptok info`` counts (``info.model_report``: torch's FlopCounterMode on the
meta device, one multiply-add = 2 FLOPs). A training step costs 3x the forward FLOPs of each
network whose weights train (forward, activation gradients, weight gradients), 2x for a network
that only passes gradients through (the encoder, whose only trainable tensor is the cls token),
1x for a pass without gradients (the frozen-token pass of the cosine anchor). The VAE encoder
(or the latent cache read) is not counted.

MFU = achieved / peak, the peak being the vendor's *dense* (no 2:4 sparsity) tensor-core rate of
one device at the training precision. Devices not in the table, and CPUs, get no MFU: a guessed
peak gives numbers like "563 % MFU".
"""

from __future__ import annotations

from typing import Optional, Tuple

# Dense peak TFLOP/s per device (vendor datasheets, boost clock). Matched on the CUDA device name
# (torch.cuda.get_device_name) in this order: the first key that is a substring wins, so the
# specific variants come before the family name.
PEAK_TFLOPS = {
    "GH200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM ("H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str) -> Optional[Tuple[str, float]]:
    """(table key, dense peak TFLOP/s) of ``device_name`` at ``precision`` (bf16 | fp16 | tf32 |
    fp32), or None for an unknown device or a precision it has no tensor-core rate for."""
    for key, rates in PEAK_TFLOPS.items():
        if key.lower() in str(device_name).lower():
            return (key, rates[precision]) if precision in rates else None
    return None


def device_peak(device, amp_dtype=None) -> Tuple[str, Optional[Tuple[str, float]]]:
    """(device name, peak or None) for a torch device at the autocast dtype ``amp_dtype`` (None:
    fp32, counted at the TF32 rate when torch lets matmuls use TF32)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type.upper(), None
    name = torch.cuda.get_device_name(dev)
    if amp_dtype is None:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    else:
        prec = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    return name, peak_tflops(name, prec)


def utilisation(examples_per_s: float, gflops_per_example: float, peak: Optional[Tuple[str, float]]) -> dict:
    """``{"tflops": achieved, "mfu": fraction or None}``."""
    achieved = examples_per_s * gflops_per_example / 1e3
    return {"tflops": _sig(achieved), "mfu": _sig(achieved / peak[1]) if peak else None}


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")  # tiny CPU models run at 1e-5 TFLOP/s: keep significant digits


def describe(util: dict, device_name: str, peak: Optional[Tuple[str, float]]) -> str:
    """'12.3 TFLOP/s, MFU 4.5 % (H100 bf16 peak 989)' or '... TFLOP/s, no MFU (unknown device: CPU)'."""
    head = f"{util['tflops']:.3g} TFLOP/s"
    if util.get("mfu") is None:
        return f"{head}, no MFU (unknown device: {device_name})"
    return f"{head}, MFU {100 * util['mfu']:.1f} % ({peak[0]} peak {peak[1]:g})"


def train_gflops(cfg, stage: str, freeze_token: bool = False) -> float:
    """Training GFLOPs per example of ``stage`` ("recon" or "gen"), by the rule above."""
    from .info import model_report

    rows = {r["component"]: r["gflops"] for r in model_report(cfg, components=_COMPONENTS[stage])}
    if stage == "gen":
        return 3 * rows["generator"]
    encoder = rows["encoder"] * (1 if freeze_token else 3)  # 2x (gradient to the cls token) + 1x frozen pass
    return 3 * rows["decoder"] + encoder


_COMPONENTS = {"recon": ("encoder", "decoder"), "gen": ("generator",)}
