"""Training at scale, on the CPU: the DataLoader feed, the latent cache, hflip, fp16 loss scaling,
bf16 on CPU, preemption (SIGTERM -> checkpoint -> --resume), logs (TensorBoard, plain lines),
--grad-checkpoint and --compile. (Collectives on the training device: tests/test_distributed.py.)"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clihelp import cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_vae import tiny_autoencoder  # noqa: E402


def metrics(run: Path):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path, name="model.safetensors", atol=0.0):
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """builtin:shapes (40 images, 32 px), a tiny random SD-VAE-layout AutoencoderKL saved as a
    diffusers directory, its latent cache, and tiny tokens for stage b."""
    root = tmp_path_factory.mktemp("scale")
    from reptok.data.prep import prepare

    prepare("builtin:shapes", root / "data", limit=40)
    tiny_autoencoder().save_pretrained(root / "vae")
    shutil.copytree(root / "data", root / "data_nocache")
    cli("data", "cache-latents", root / "data", "--vae", root / "vae", "--batch-size", 16, "--json")
    cli("train", "recon", "--data", root / "data_nocache", "--out", root / "tok", "--preset", "tiny", "--steps", 1,
        "--batch-size", 8, "--sample-every", 0, "--json")
    cli("extract", "--ckpt", root / "tok", "--data", root / "data_nocache", "--out", root / "tokens.npy",
        "--batch-size", 20)
    return root


# ----------------------------------------------------------------------------- latent cache
def test_latent_cache_holds_the_posterior_of_each_image_and_its_mirror(work):
    from reptok.data.dataset import PreparedDataset
    from reptok.data.latents import LatentCache, load_vae

    cache = LatentCache(work / "data")
    assert cache.flips and cache.moments.shape == (40, 2, 8, 4, 4) and cache.moments.dtype == np.float16
    assert not (work / "data" / "latents.partial").exists()
    vae = load_vae(str(work / "vae"))
    img = torch.from_numpy(PreparedDataset(work / "data").get_uint8_chw([3, 17])).float() / 127.5 - 1
    with torch.no_grad():
        want = torch.stack([vae.encode_moments(img), vae.encode_moments(img.flip(-1))], 1)
    np.testing.assert_allclose(cache.get(np.array([3, 17])).astype(np.float32), want.numpy(), atol=2e-2, rtol=1e-2)


def test_latent_cache_resumes_after_an_interruption(work, tmp_path):
    from reptok.data import latents

    data = tmp_path / "data"
    shutil.copytree(work / "data_nocache", data)
    vae = latents.load_vae(str(work / "vae"))
    ident = latents.vae_identity(str(work / "vae"))

    def stop_in_the_second_chunk(done, total):
        if done >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        latents.cache_latents(data, vae, ident, batch_size=8, chunk=8, progress=stop_in_the_second_chunk)
    assert not (data / "latents").exists() and (data / "latents.partial" / "done" / "0").exists()
    out = latents.cache_latents(data, vae, ident, batch_size=8, chunk=8)
    assert out["encoded"] == 32 and out["skipped"] == 8
    full = np.load(work / "data" / "latents" / "moments.npy")
    # (the reference was encoded 16 images per pass: a float16 ulp apart at most)
    np.testing.assert_allclose(np.load(data / "latents" / "moments.npy"), full, atol=1e-3, rtol=2e-3)
    again = latents.cache_latents(data, vae, ident)  # complete: nothing to do
    assert again["encoded"] == 0


def test_train_recon_uses_the_cache_and_never_runs_the_vae_encoder(work, tmp_path, monkeypatch):
    from reptok.models import vae as vae_mod

    def no_encoder(self, images):
        raise AssertionError("the VAE encoder ran although the latents are cached")

    monkeypatch.setattr(vae_mod.LatentVAE, "encode_moments", no_encoder)
    res = cli("train", "recon", "--data", work / "data", "--out", tmp_path / "r", "--preset", "tiny",
              "--vae", work / "vae", "--steps", 3, "--batch-size", 8, "--sample-every", 0, "--workers", 0,
              "--hflip", "--json")
    assert "latent cache" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["latent_cache"] == str(work / "data" / "latents")
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "r"))


def test_cache_of_another_vae_is_refused(work, tmp_path):
    other = tmp_path / "other_vae"
    shutil.copytree(work / "vae", other)
    res = cli("train", "recon", "--data", work / "data", "--out", tmp_path / "r", "--preset", "tiny",
              "--vae", other, "--steps", 1, code=2)
    assert "latent cache made with VAE" in res.output and not (tmp_path / "r").exists()
    from reptok.data.latents import LatentCache
    from reptok.errors import InputError

    with pytest.raises(InputError, match="at 32 px"):
        LatentCache(work / "data").check(str(work / "vae"), None, 64, (8, 8, 8), False)
    res = cli("data", "cache-latents", work / "data", "--vae", other, code=2)
    assert "--overwrite" in res.output


def test_cache_latents_bad_inputs_exit_2(work, tmp_path):
    assert "not a prepared dataset" in cli("data", "cache-latents", tmp_path, "--vae", work / "vae", code=2).output
    assert "pixel space" in cli("data", "cache-latents", work / "data", "--vae", "none", code=2).output


# ----------------------------------------------------------------------------- feed, hflip
@pytest.mark.parametrize("workers", [0, 2])
def test_hflip_is_seeded_and_resumable(work, tmp_path, workers):
    common = ["--data", work / "data_nocache", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 100,
              "--sample-every", 0, "--hflip", "--workers", workers, "--json"]
    cli("train", "recon", "--out", tmp_path / "a", "--steps", 4, *common)
    cli("train", "recon", "--out", tmp_path / "b", "--steps", 2, *common)
    cli("train", "recon", "--out", tmp_path / "b", "--steps", 4, "--resume", *common)
    same_weights(tmp_path / "a", tmp_path / "b")
    same_weights(tmp_path / "a", tmp_path / "b", "ema.safetensors")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["pipeline"]["train"]["hflip"] is True
    cli("train", "recon", "--out", tmp_path / "c", "--steps", 4, *[x for x in common if x != "--hflip"], "--no-hflip")
    assert metrics(tmp_path / "c")[-1]["loss"] != metrics(tmp_path / "a")[-1]["loss"]


def test_hflip_draw_is_a_function_of_the_step():
    from reptok.presets import get_preset

    assert get_preset("xl").train.hflip and get_preset("base").train.hflip
    assert not get_preset("tiny").train.hflip and not get_preset("small").train.hflip
    from reptok.train.loop import step_generator
    from reptok.train.recon import ReconTask

    task = ReconTask.__new__(ReconTask)
    task.time_sampler, task.time_loc, task.time_scale = "uniform", 0.0, 1.0
    task.latent_shape, task.hflip = (3, 4, 4), True
    a, b = task.draw_noise(64, step_generator(0, 5)), task.draw_noise(64, step_generator(0, 5))
    assert torch.equal(a["flip"], b["flip"]) and 10 < int(a["flip"].sum()) < 54
    task.hflip = False
    c = task.draw_noise(64, step_generator(0, 5))
    assert "flip" not in c and all(torch.equal(a[k], c[k]) for k in c)  # flips drawn last


def test_loader_batches_are_the_batch_order_of_each_step():
    from reptok.config import TrainConfig
    from reptok.dist import DistInfo
    from reptok.train.feed import step_loader
    from reptok.train.loop import BatchOrder

    cfg = TrainConfig(steps=5, batch_size=8, grad_accum=2, seed=3)
    order = BatchOrder(20, 8, 3)
    for info in (DistInfo(), DistInfo(rank=1, world_size=2)):
        got = [b["i"] for b in step_loader(lambda idx: {"i": idx}, order, cfg, info, 2, workers=2, pin=False)]
        per = 8 // info.world_size // 2
        want = [order.indices(s)[info.rank * 2 * per + a * per:][:per] for s in range(2, 5) for a in range(2)]
        assert len(got) == 6 and all(torch.equal(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- precision
def test_fp16_uses_a_grad_scaler_and_resumes_exactly(work, tmp_path):
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--precision", "fp16",
              "--ckpt-every", 100, "--set", "train.log_every=1", "--json"]
    cli("train", "gen", "--out", tmp_path / "a", "--steps", 4, *common)
    cli("train", "gen", "--out", tmp_path / "b", "--steps", 2, *common)
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    cli("train", "gen", "--out", tmp_path / "b", "--steps", 4, "--resume", *common)
    rows = metrics(tmp_path / "a")
    assert all("loss_scale" in r for r in rows)
    same_weights(tmp_path / "a", tmp_path / "b")


def test_bf16_on_cpu_trains_and_unknown_precision_exits_2(work, tmp_path):
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--steps", 2, "--json"]
    cli("train", "gen", "--out", tmp_path / "bf", "--precision", "bf16", *common)
    cli("train", "gen", "--out", tmp_path / "fp", "--precision", "fp32", *common)
    # autocast really ran in bf16: the losses differ from fp32 in the low bits
    assert metrics(tmp_path / "bf")[-1]["loss"] != metrics(tmp_path / "fp")[-1]["loss"]
    res = cli("train", "gen", "--out", tmp_path / "x", "--precision", "fp8", *common, code=2)
    assert "--precision 'fp8'" in res.output and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- preemption + logs
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(work, tmp_path):
    """A run SIGTERM'd after some steps writes a checkpoint, exits 143 with a clear message and,
    resumed, ends at the uninterrupted run's weights. Both are subprocesses without a TTY, so the
    plain log lines are what they print."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "reptok_cli", "train", "gen", "--tokens", str(work / "tokens.npy"),
            "--preset", "tiny", "--batch-size", 8, "--steps", "300", "--ckpt-every", "1000",
            "--set", "train.log_every=1", "--no-tensorboard"]
    args = [str(a) for a in args]
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if len([x for x in lines if x.startswith("train step")]) == 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert lines[0].startswith("validation off: no held-out set"), lines[0]  # said once, before step 1
    assert re.match(r"train step 1/300 loss \d+\.\d+ lr \S+ \d+\.\d+ img/s, \S+ TFLOP/s, no MFU \(unknown device: CPU\) eta \d+:\d\d:\d\d",
                    lines[1]), lines[1]
    assert re.match(r"train step 2/300 loss \S+ lr \S+ \S+ img/s, \S+ TFLOP/s eta ", lines[2]), lines[2]  # reason once
    assert "SIGTERM: stopped after step" in rest and "--resume" in rest
    step = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"]
    assert 3 <= step < 300
    assert metrics(tmp_path / "cut")[-1]["step"] <= step
    subprocess.run(args + ["--out", str(tmp_path / "cut"), "--resume"], env=env, check=True, capture_output=True)
    subprocess.run(args + ["--out", str(tmp_path / "full")], env=env, check=True, capture_output=True)
    same_weights(tmp_path / "cut", tmp_path / "full")
    same_weights(tmp_path / "cut", tmp_path / "full", "ema.safetensors")


def test_tensorboard_events_hold_every_metric_and_the_grids(work, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli("train", "recon", "--data", work / "data_nocache", "--out", tmp_path / "r", "--preset", "tiny", "--steps", 4,
        "--batch-size", 8, "--sample-every", 4, "--set", "train.log_every=2", "--workers", 0, "--json")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload()
    rec = metrics(tmp_path / "r")[-1]
    want = {f"train/{k}" for k in rec if k != "step"}
    assert want <= set(acc.Tags()["scalars"]), (want, acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(rec["loss"], rel=1e-5)
    assert "samples" in acc.Tags()["images"]
    cli("train", "recon", "--data", work / "data_nocache", "--out", tmp_path / "q", "--preset", "tiny", "--steps", 1,
        "--batch-size", 8, "--sample-every", 0, "--no-tensorboard", "--json")
    assert not (tmp_path / "q" / "tensorboard").exists()


def test_wandb_without_the_package_exits_2(work, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    res = cli("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "w", "--preset", "tiny",
              "--wandb", "proj", code=2)
    assert "pip install wandb" in res.output and not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- memory / compile
def test_grad_checkpoint_gives_the_same_gradients():
    from reptok.models.decoder import FlowDecoder
    from reptok.presets import get_preset

    torch.manual_seed(0)
    dec = FlowDecoder(get_preset("tiny").decoder).train()
    for p in dec.parameters():  # zero-initialised output layers would make most gradients 0
        p.data.normal_(0, 0.2)
    cfg = dec.cfg
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, tok = torch.rand(3), torch.randn(3, cfg.token_dim)

    def grads(flag):
        dec.grad_checkpoint = flag
        dec.zero_grad()
        dec(x, t, tok).square().mean().backward()
        return {n: p.grad.clone() for n, p in dec.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")) or os.environ.get("REPTOK_SKIP_COMPILE"),
                    reason="torch.compile (inductor) needs a C++ compiler on a CPU; the tiny model compiles in "
                           "~15 s (REPTOK_SKIP_COMPILE=1 skips it; benchmarks/gpu_check.sh runs --compile on a GPU)")
def test_compile_trains_and_resumes_like_eager(work, tmp_path):
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 100, "--json"]
    cli("train", "gen", "--out", tmp_path / "eager", "--steps", 3, *common)
    cli("train", "gen", "--out", tmp_path / "c", "--steps", 2, "--compile", *common)
    cli("train", "gen", "--out", tmp_path / "c", "--steps", 3, "--compile", "--resume", *common)
    # Fused kernels re-associate floats; the gradient-free mixer biases (see test_distributed)
    # then take AdamW steps of ~lr in either direction.
    from test_distributed import assert_same_weights

    assert_same_weights(tmp_path / "eager", tmp_path / "c")


# ----------------------------------------------------------------------------- the loop on a toy task
class ToyTask(torch.nn.Module):
    """loss = w . g_s for the step's fixed vector g_s (so the gradient of step s is g_s, norms
    known by hand); ``fail_at`` raises inside step ``fail_at`` (a crash between checkpoints)."""

    def __init__(self, grads, fail_at=None):
        super().__init__()
        self.net = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.net.weight.zero_()
        self.grads, self.fail_at, self.calls = torch.tensor(grads, dtype=torch.float32), fail_at, 0

    def saved_modules(self):
        return {"net": self.net}

    def num_examples(self):
        return 4

    def load_examples(self, indices):
        return {"i": indices.float()}

    def draw_noise(self, batch_size, g):
        return {"z": torch.zeros(batch_size)}

    def forward(self, batch, noise):
        step = self.calls
        self.calls += 1
        if step == self.fail_at:
            raise RuntimeError("crash")
        return (self.net.weight[0] * self.grads[step % len(self.grads)]).sum(), {}


def toy_fit(run, task, start=0, **cfg):
    from reptok.config import TrainConfig
    from reptok.train.loop import fit

    task.calls = start
    return fit(task, run, TrainConfig(**{"batch_size": 4, "lr": 0.1, "log_every": 1, "ema": 0.5, **cfg}),
               progress=False, tensorboard=False, resume=start > 0)


def adamw_by_hand(grads, lr, clip, betas=(0.9, 0.999), eps=1e-8):
    """Plain AdamW (weight decay 0) on the clipped gradients, written out: the reference."""
    w, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    for k, g in enumerate(np.asarray(grads, dtype=np.float64), 1):
        n = np.linalg.norm(g)
        g = g * min(1.0, clip / (n + 1e-6)) if clip > 0 else g
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * (m / (1 - betas[0] ** k)) / (np.sqrt(v / (1 - betas[1] ** k)) + eps)
    return w


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_gradient_clipping_clips_the_global_norm(tmp_path, clip):
    """Gradients of norm 10 then 0.5: clipped to norm 1 (or not, clip 0) they give hand-computed
    AdamW weights (catches clipping dropped, applied after the step, or a wrong max norm); the
    logged grad_norm is the norm before clipping."""
    grads = [[6.0, 8.0], [0.3, -0.4], [0.0, 0.5]]
    toy_fit(tmp_path, ToyTask(grads), steps=3, grad_clip=clip, ckpt_every=3)
    w = load_file(str(tmp_path / "model.safetensors"))["net.weight"][0].double().numpy()
    np.testing.assert_allclose(w, adamw_by_hand(grads, 0.1, clip), rtol=1e-5, atol=1e-7)
    want_norms = [10.0, 0.5, 0.5] if clip else [0.0, 0.0, 0.0]  # 0 = not computed without clipping
    assert [r["grad_norm"] for r in metrics(tmp_path)] == pytest.approx(want_norms, rel=1e-5)


def test_resume_after_a_crash_keeps_one_metrics_row_per_step(tmp_path):
    """Rows 1-3 logged, checkpoint at 2, crash in step 4; --resume from 2 to 5: exactly one row
    per step (catches the log not being cut back to the checkpoint on resume)."""
    grads = [[1.0, 0.0]]
    with pytest.raises(RuntimeError, match="crash"):
        toy_fit(tmp_path, ToyTask(grads, fail_at=3), steps=5, ckpt_every=2)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    toy_fit(tmp_path, ToyTask(grads), start=2, steps=5, ckpt_every=2)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_ema_follows_the_weights_by_hand(tmp_path):
    """EMA decay 0.75 over 2 steps from 0: e1 = 0.25 w1, e2 = 0.75 e1 + 0.25 w2 (catches the EMA
    updated before the step, decay and complement swapped, or the raw weights saved as EMA)."""
    grads = [[1.0, 0.0], [0.0, 1.0]]
    toy_fit(tmp_path, ToyTask(grads), steps=2, grad_clip=0.0, ckpt_every=2, ema=0.75)
    w1, w2 = adamw_by_hand(grads[:1], 0.1, 0.0), adamw_by_hand(grads, 0.1, 0.0)
    want = 0.75 * (0.25 * w1) + 0.25 * w2
    ema = load_file(str(tmp_path / "ema.safetensors"))["net.weight"][0].double().numpy()
    np.testing.assert_allclose(ema, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight, want", [(0.0, 4.0), (0.5, 4.25), (2.0, 5.0)])
def test_recon_loss_weighs_the_cosine_anchor(weight, want):
    """Stage a's loss = flow loss + cos_weight * mean(1 - cos(z, z_frozen)): a decoder that
    predicts 0 for x1 - x0 = 2 gives flow loss 4; z, z_frozen with cosines 0 and 1 give an anchor of
    0.5 (catches the weight dropped or applied to the flow term)."""
    from types import SimpleNamespace

    from reptok.train.recon import ReconTask

    x1 = torch.full((2, 1, 2, 2), 2.0)
    task = SimpleNamespace(
        cos_weight=weight, freeze_token=False,
        latent=SimpleNamespace(encode_moments=lambda im: torch.zeros(2, 2, 1, 2, 2),
                               latents_from_moments=lambda m, noise: x1),
        encoder=SimpleNamespace(forward_pair=lambda im: (torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                                                         torch.tensor([[0.0, 1.0], [2.0, 2.0]]))),
        decoder=lambda xt, t, z: torch.zeros_like(xt))
    noise = {"x0": torch.zeros(2, 1, 2, 2), "eps": torch.zeros(2, 1, 2, 2), "t": torch.tensor([0.3, 0.6])}
    loss, parts = ReconTask.forward(task, {"image": torch.zeros(2, 3, 4, 4)}, noise)
    assert float(parts["rf"]) == pytest.approx(4.0) and float(parts["cos"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(want)


def test_resume_with_other_steps_on_a_cooldown_says_what_changes(work, tmp_path):
    """A 4-step run with cool-down 0.5 resumed with --steps 8: one notice line (cool-down 4-8,
    was 2-4; the lr of step 5 goes from 0 to 1e-3, hand-computed), and the run goes on with it;
    the same --steps says nothing."""
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 100,
              "--set", "train.cooldown=0.5", "--set", "train.log_every=1", "--json"]
    cli("train", "gen", "--out", tmp_path, "--steps", 4, *common)
    res = cli("train", "gen", "--out", tmp_path, "--steps", 8, "--resume", *common)
    notes = [x for x in res.stderr.splitlines() if x.startswith("note:")]
    assert notes == ["note: --steps 8 changes the lr schedule of this 4-step run: cool-down steps 4-8 (was 2-4); "
                     "lr at step 5: 0.001 (was 0)"], res.stderr
    assert [r["lr"] for r in metrics(tmp_path)][3:5] == pytest.approx([0.0005, 0.001])
    res = cli("train", "gen", "--out", tmp_path, "--steps", 8, "--resume", *common)  # finished: nothing to say
    assert "note:" not in res.stderr
