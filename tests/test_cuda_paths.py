"""The CUDA training paths of issue 24, checked on the CPU: fused AdamW on CUDA, the multi-tensor
EMA, the DDP options, the meta-device build of a run."""

from __future__ import annotations

import pytest
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_steps_like_the_default_on_cuda():
    """On the GPU: the fused AdamW the loop builds moves the weights like torch's default AdamW."""
    torch.manual_seed(0)
    a, b = _Task().cuda(), _Task().cuda()
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig()
    opts = [loop.make_optimizer(t, [p for p in t.parameters() if p.requires_grad], cfg, dev)
            for t, dev in ((a, "cuda"), (b, "cpu"))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    x = torch.randn(4, 3, device="cuda")
    for _ in range(3):
        for t, opt in zip((a, b), opts):
            opt.zero_grad()
            t.a(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(a.a.weight, b.a.weight, atol=1e-6, rtol=1e-5)


def _state_and_buffers(module: nn.Module) -> dict:
    return {**dict(module.named_buffers()), **module.state_dict()}


def test_meta_device_build_loads_the_same_weights(class_runs):
    """Catches: ``from_run`` on the meta device leaving a computed buffer (RoPE positions, the
    encoder's pixel mean / std) unmaterialised or different, or loading other values than the
    build-then-copy path."""
    from reptok import run as rundir
    from reptok.pipeline import Pipeline

    run = class_runs / "gen"
    fast = Pipeline.from_run(run)
    ref = Pipeline.build(rundir.read_run_config(run)["config"], components=("encoder", "decoder", "generator"),
                         load_weights=False)
    tok = rundir.read_weights(class_runs / "tok", True)
    gen = rundir.read_weights(run, True)
    for c, state in (("encoder", tok), ("decoder", tok), ("generator", gen)):
        rundir.load_into(getattr(ref, c), rundir.split_prefix(state, c), c)  # the copy path
        want, got = _state_and_buffers(getattr(ref, c)), _state_and_buffers(getattr(fast, c))
        assert want.keys() == got.keys()
        for k in want:
            assert not got[k].is_meta and got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (c, k)


def test_assign_load_keeps_the_modules_dtype(tmp_path):
    """Catches: ``load_state_dict(assign=True)`` taking the file's dtype (a bf16-stored run would
    then compute in bf16): the tensors are cast to the module's dtypes, as a copy would."""
    from reptok import run as rundir

    src = nn.Linear(3, 2)
    state = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    dst = nn.Linear(3, 2, device="meta")
    rundir.load_into(dst, state, "test", assign=True)
    assert dst.weight.dtype == torch.float32 and dst.weight.requires_grad
    assert torch.equal(dst.weight, state["weight"].float())


# ----------------------------------------------------------------------------- latent cache under torchrun
def test_remaining_chunks_are_split_evenly():
    """Catches: a resumed cache-latents keeping the static share of all chunks (rank 0's share
    done, rank 1 encodes four chunks while rank 0 waits at the barrier past the NCCL timeout)."""
    from reptok.data.latents import share_of_remaining

    chunks, done = list(range(0, 8 * 256, 256)), {0, 256, 512, 768}
    shares = [share_of_remaining(chunks, done, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    assert shares == [[1024, 1280], [1536, 1792]]
    assert share_of_remaining(chunks, set(), DistInfo()) == chunks


def test_chunks_of_ranks_never_share_a_page(tmp_path):
    """Catches: chunk boundaries off page boundaries (the .npy header's 128 bytes, or a chunk of
    a fractional number of pages): two ranks then write one page of the shared memory map."""
    import numpy as np

    from reptok.data.latents import create_aligned_npy, page_chunk

    page, shape = 4096, (10, 2, 8, 4, 4)  # 512-byte rows
    assert page_chunk(3, 512, page) == 8 and page_chunk(8, 512, page) == 8 and page_chunk(1, 24576, page) == 1
    assert page_chunk(1, 1000, page) == 512  # 1000 * 512 = 125 pages
    create_aligned_npy(tmp_path / "m.npy", shape, page=page)
    mm = np.load(tmp_path / "m.npy", mmap_mode="r+")
    assert mm.shape == shape and mm.dtype == np.float16 and mm.offset == page and not mm.any()
    mm[3] = 1.0
    mm.flush()
    raw = np.fromfile(tmp_path / "m.npy", dtype=np.float16, offset=page).reshape(shape)
    assert raw[3].all() and not raw[2].any()


def test_process_group_timeout(monkeypatch):
    """Catches: the group created with torch's 10-minute default, shorter than the rank-0-only
    work (SSL pre-training, the cache's last chunks) the other ranks wait for."""
    from datetime import timedelta

    from reptok import dist

    seen = {}
    monkeypatch.delenv("REPTOK_DIST_TIMEOUT", raising=False)
    monkeypatch.setattr(dist, "env_info", lambda: DistInfo(world_size=2, launched=True))
    monkeypatch.setattr(dist.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist.atexit, "register", lambda fn: None)
    dist.init_distributed("cpu")
    assert seen == {"backend": "gloo", "timeout": timedelta(hours=2)}
    monkeypatch.setenv("REPTOK_DIST_TIMEOUT", "90")
    assert dist.group_timeout() == timedelta(seconds=90)


def test_tf32_on_fast_paths_off_for_the_fp32_reference():
    """Catches: the --no-fast fp32 reference left with cuDNN's default TF32 convolutions (its
    max pixel difference to bf16 would be measured against a TF32 result), or TF32 never enabled
    on the fast / training paths; a CPU device touches nothing."""
    from reptok.backends import set_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32("cuda:0", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32("cpu", False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32("cuda", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_latents_on_cuda_matches_the_cpu(tmp_path):
    """On the GPU: bf16 autocast, loader workers, both views in one pass and the asynchronous
    copy-back give the CPU fp32 cache up to bf16 rounding; the solver grid arrives intact."""
    import shutil

    import numpy as np
    from test_vae import tiny_autoencoder

    from reptok import flow
    from reptok.data import latents
    from reptok.data.prep import prepare

    prepare("builtin:shapes", tmp_path / "a", limit=24)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    ident = latents.vae_identity(str(tmp_path / "vae"))
    for d, dev in (("a", "cpu"), ("b", "cuda")):
        latents.cache_latents(tmp_path / d, latents.load_vae(str(tmp_path / "vae")), ident, device=dev,
                              batch_size=8, chunk=8, workers=2 if dev == "cuda" else 0)
    a, b = (np.load(tmp_path / d / "latents" / "moments.npy").astype(np.float32) for d in "ab")
    np.testing.assert_allclose(b, a, atol=5e-2, rtol=5e-2)
    assert torch.equal(flow.host_to_device(flow.time_grid(7), "cuda").cpu(), flow.time_grid(7))
