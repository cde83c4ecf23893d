"""The CUDA training paths of issue 24, checked on the CPU: fused AdamW on CUDA, the multi-tensor
EMA, the DDP options, the meta-device build of a run."""

from __future__ import annotations

import torch
from torch import nn

from reptok.config import TrainConfig
from reptok.dist import DistInfo
from reptok.train import loop


class _Task(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def saved_modules(self):
        return {"a": self.a, "frozen": self.frozen}


def test_adamw_fused_on_cuda_only():
    """Catches: AdamW left unfused on CUDA (a foreach chain per group), or fused forced on CPU runs."""
    task = _Task()
    params = [p for p in task.parameters() if p.requires_grad]
    assert loop.make_optimizer(task, params, TrainConfig(), "cuda").defaults["fused"] is True
    assert not loop.make_optimizer(task, params, TrainConfig(), "cpu").defaults["fused"]


def test_ema_is_one_multi_tensor_lerp(monkeypatch):
    """Catches: the EMA moving toward the wrong side (weight decay instead of 1 - decay), touching
    frozen tensors, or going back to one lerp_ launch per parameter."""
    task = _Task()
    ema = loop.EMA(task.saved_modules(), decay=0.75)
    e0 = {n: p.detach().clone() for n, p in ema.modules["a"].named_parameters()}
    frozen0 = ema.modules["frozen"].weight.detach().clone()
    with torch.no_grad():
        for p in task.parameters():
            p.add_(1.0)
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(len(a[0])), real(*a))[1])
    ema.update()
    assert calls == [2]  # weight + bias of the trainable layer, in one call
    for n, p in ema.modules["a"].named_parameters():  # e + 0.25 (p - e), p = e + 1 -> e + 0.25
        assert torch.allclose(p, e0[n] + 0.25, atol=1e-6)
    assert torch.equal(ema.modules["frozen"].weight, frozen0)


def test_ddp_options():
    """Catches: DDP broadcasting the (constant) buffers every step, or copying gradients out of
    the buckets; and the CUDA device id dropped."""
    info = DistInfo(rank=1, local_rank=1, world_size=2)
    assert loop.ddp_options(info, "cuda") == {"device_ids": [1], "broadcast_buffers": False,
                                              "gradient_as_bucket_view": True}
    assert loop.ddp_options(info, "cpu")["device_ids"] is None
