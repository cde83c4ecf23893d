"""The Python API (issue 17): ``from reptok import Pipeline``; ``pipe(classes=..., output=...)``,
``encode`` / ``pipe(tokens=...)`` / ``reconstruct`` / ``interpolate`` on every input and output
kind, clamping, one-line errors, checked sampler settings (``SamplerArgs``), and the same pixels
as ``reptok sample``."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from clihelp import cli
from reptok import run as rundir
from reptok.bench import randomize_weights
from reptok.errors import InputError
from reptok.presets import get_preset

FAST = dict(steps=3, decoder_steps=3)


def _write_run(out, cfg, seed=0):
    """A pipeline run of ``cfg`` with random, non-trivial weights (no downloads)."""
    from reptok import Pipeline

    cfg.encoder.weights = "random"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = Pipeline.build(cfg)
    randomize_weights(pipe.decoder, seed)
    randomize_weights(pipe.generator, seed + 1)
    # A decoder with large outputs: the raw images leave [-1, 1], so clamping is visible.
    with torch.no_grad():
        for p in pipe.decoder.parameters():
            p.mul_(1.5)
    mods = {"encoder": pipe.encoder, "decoder": pipe.decoder, "generator": pipe.generator}
    if pipe.text_encoder is not None:
        mods["text_encoder"] = pipe.text_encoder
    rundir.write_run_config(out, cfg, "pipeline")
    rundir.save_weights(out, mods, ema=mods)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("api") / "run", get_preset("tiny"))


@pytest.fixture(scope="module")
def pipe(run):
    from reptok import Pipeline

    return Pipeline.from_run(run, device="cpu")


def test_pipeline_is_exported_lazily():
    import subprocess
    import sys

    code = "import sys, reptok; assert 'torch' not in sys.modules; from reptok import Pipeline; print(Pipeline.__module__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reptok.pipeline"


def test_call_output_kinds(pipe):
    pt = pipe(classes=[1, 1, 7], seed=0, output="pt", **FAST)
    assert pt.shape == (3, 3, 32, 32) and pt.dtype == torch.float32
    assert pt.min() >= -1 and pt.max() <= 1
    args = pipe.sampler_args(**FAST)
    raw = pipe.decode(pipe.generate(torch.tensor([1, 1, 7]), pipe.generator_noise([0, 1, 2], 0), args),
                      pipe.decoder_noise([0, 1, 2], 0), args)
    assert raw.abs().max() > 1  # the clamp did something
    torch.testing.assert_close(pt, raw.clamp(-1, 1), rtol=0, atol=0)
    arr = pipe(classes=[1, 1, 7], seed=0, output="np", **FAST)
    assert arr.dtype == np.uint8 and arr.shape == (3, 32, 32, 3)
    pil = pipe(classes=[1, 1, 7], seed=0, **FAST)  # "pil" is the default
    assert len(pil) == 3 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in pil)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), arr)
    # Same seed and index: the same image, whatever the class next to it.
    assert not np.array_equal(arr[0], arr[1])  # different noise index
    alone = pipe(classes=[7], seed=0, start=2, output="np", **FAST)
    assert np.abs(alone[0].astype(int) - arr[2].astype(int)).max() <= 1  # other batch size: rounding


def test_call_matches_reptok_sample_pixel_for_pixel(pipe, run, tmp_path):
    out = tmp_path / "x.npz"
    cli("sample", "--ckpt", run, "--class", 3, "-n", 4, "--seed", 5, "--no-fast", "--out", out,
        "--batch-size", 4, "--steps", 3, "--decoder-steps", 3, "--cfg", 2.0, "--device", "cpu")
    want = np.load(out)["arr_0"]
    got = pipe(classes=[3] * 4, seed=5, output="np", steps=3, decoder_steps=3, guidance_scale=2.0)
    assert got.shape == want.shape == (4, 32, 32, 3)
    assert np.array_equal(got, want)
    assert np.array_equal(pipe(classes=[3], n=4, seed=5, output="np", steps=3, decoder_steps=3, guidance_scale=2.0),
                          want)
    # batch_size pads the last batch like the CLI does: equal to the CLI at that batch size.
    out2 = tmp_path / "y.npz"
    cli("sample", "--ckpt", run, "--class", "3,4", "-n", 3, "--seed", 5, "--no-fast", "--out", out2,
        "--batch-size", 4, "--steps", 3, "--decoder-steps", 3, "--device", "cpu")
    got2 = pipe(classes=[3, 4], n=3, seed=5, output="np", batch_size=4, steps=3, decoder_steps=3)
    assert np.array_equal(got2, np.load(out2)["arr_0"])


def test_overrides_change_the_result(pipe):
    base = pipe(classes=[2, 5], seed=1, output="pt", **FAST)
    assert torch.equal(base, pipe(classes=[2, 5], seed=1, output="pt", **FAST))
    for kw in (dict(guidance_scale=3.0), dict(steps=2), dict(solver="heun"), dict(decoder_steps=2),
               dict(decoder_solver="heun"), dict(guidance_scale=3.0, cfg_interval=None)):
        assert not torch.equal(base, pipe(classes=[2, 5], seed=1, output="pt", **{**FAST, **kw})), kw
    assert not torch.equal(base, pipe(classes=[2, 5], seed=2, output="pt", **FAST))


def test_encode_accepts_pil_numpy_and_tensors(pipe):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    from reptok.images import uint8_to_tensor

    z_t = pipe.encode(uint8_to_tensor(arr))
    assert z_t.shape == (2, 32) and z_t.dtype == torch.float32
    assert torch.equal(pipe.encode(arr), z_t)
    assert torch.equal(pipe.encode(list(arr)), z_t)
    assert torch.equal(pipe.encode(arr[0])[0], z_t[0])
    assert torch.equal(pipe.encode([Image.fromarray(a) for a in arr]), z_t)
    big = Image.fromarray(arr[0]).resize((64, 64), Image.NEAREST)  # centre-cropped / resized to 32
    assert pipe.encode(big).shape == (1, 32)
    assert torch.equal(pipe.encode(x[0]), pipe.encode(x)[:1])


def test_decode_and_reconstruct(pipe):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = pipe.encode(x)
    raw = pipe.decode(z, pipe.decoder_noise([0, 1, 2], 4), pipe.sampler_args(decoder_steps=3))
    pt = pipe(tokens=z, seed=4, decoder_steps=3, output="pt")
    assert torch.equal(pt, raw.clamp(-1, 1)) and pt.min() >= -1 and pt.max() <= 1
    from reptok.images import tensor_to_uint8

    assert np.array_equal(pipe(tokens=z, seed=4, decoder_steps=3, output="np"), tensor_to_uint8(raw))
    assert len(pipe(tokens=z, seed=4, decoder_steps=3)) == 3
    shifted = pipe(tokens=z[1:], seed=4, start=1, decoder_steps=3, output="pt")
    assert (shifted - pt[1:]).abs().max() < 1e-4  # image i has noise index start + i
    rec = pipe.reconstruct(x, 4, decoder_steps=3, output="pt")
    assert torch.equal(rec, pt)
    rec_np = pipe.reconstruct(tensor_to_uint8(x), 4, decoder_steps=3, output="np")
    assert rec_np.shape == (3, 32, 32, 3) and rec_np.dtype == np.uint8


@pytest.mark.parametrize("call, match", [
    (lambda p: p(classes=[1], output="jpg"), "output='jpg'"),
    (lambda p: p(classes=[10]), "class 10 is outside the model's classes 0-9"),
    (lambda p: p(classes=[-1]), "class -1 is outside"),
    (lambda p: p(prompts=["a red circle"]), "class-conditional: pass classes"),
    (lambda p: p(), "pass classes"),
    (lambda p: p(classes=["x"]), "list of class ids"),
    (lambda p: p(classes=[1], n=0), "n=0"),
    (lambda p: p(classes=[1], seed=1.5), "seed=1.5"),
    (lambda p: p(classes=[1], start=-1), "start=-1"),
    (lambda p: p(classes=[1], steps=0), r"sampling.steps=0: must be >= 1"),
    (lambda p: p(tokens=torch.zeros(2, 32), output="PIL"), "output='PIL'"),
    (lambda p: p(tokens=torch.zeros(32)), r"tokens must be \(B, D\)"),
    (lambda p: p.encode(np.zeros((2, 32, 32, 3), np.float32)), "must be uint8"),
    (lambda p: p.encode(torch.zeros(2, 4, 32, 32)), r"must be \(B,3,H,W\)"),
    (lambda p: p.encode("image.png"), "expected PIL images"),
    (lambda p: p.reconstruct(torch.zeros(1, 3, 32, 32), [0]), "seed=\\[0\\]"),
])
def test_bad_input_is_one_line(pipe, call, match):
    with pytest.raises(InputError, match=match) as e:
        call(pipe)
    assert "\n" not in str(e.value)


def test_missing_components_are_one_line(run):
    from reptok import Pipeline

    gen_only = Pipeline.from_run(run, components=("generator",))
    with pytest.raises(InputError, match="without its decoder"):
        gen_only(classes=[1])
    with pytest.raises(InputError, match="without its encoder"):
        gen_only.encode(torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- text runs
@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory):
    from reptok import Pipeline

    cfg = get_preset("tiny")
    cfg.generator = dataclasses.replace(cfg.generator, num_classes=0, text_encoder="tiny", text_dim=64, text_len=32)
    run = _write_run(tmp_path_factory.mktemp("api-text") / "run", cfg)
    return run, Pipeline.from_run(run)


def test_text_run_takes_prompts(text_pipe, tmp_path):
    run, pipe = text_pipe
    prompts = ["a red circle", "a blue cross"]
    got = pipe(prompts=prompts, n=2, seed=3, output="np", **FAST)
    assert got.shape == (4, 32, 32, 3)
    assert np.array_equal(pipe(prompts=[p for p in prompts for _ in range(2)], seed=3, output="np", **FAST), got)
    cli("sample", "--ckpt", run, "--prompt", prompts[0], "--prompt", prompts[1], "-n", 2, "--seed", 3, "--no-fast",
        "--out", tmp_path / "t.npz", "--batch-size", 4, "--steps", 3, "--decoder-steps", 3, "--device", "cpu")
    assert np.array_equal(np.load(tmp_path / "t.npz")["arr_0"], got)
    with pytest.raises(InputError, match="text-conditioned: pass prompts"):
        pipe(classes=[1])


# ----------------------------------------------------------------------------- sampler settings
def test_unknown_sampler_keyword_is_a_type_error(pipe):
    """Catches: settings read with kw.get, so a misspelt keyword silently gives the default."""
    with pytest.raises(TypeError, match="'decoder_step'"):
        pipe(classes=[1], decoder_step=1)
    with pytest.raises(TypeError, match="'stepz'"):
        pipe.sampler_args(stepz=3)
    with pytest.raises(TypeError, match="SamplerArgs"):
        pipe.generate(torch.tensor([1]), pipe.generator_noise([0]), {"steps": 2})


@pytest.mark.parametrize("kw", [dict(steps=0), dict(decoder_steps=0), dict(guidance_scale=-1.0),
                                dict(solver="rk4"), dict(decoder_solver="rk4"), dict(cfg_interval=(0.9, 0.3)),
                                dict(steps=True)])
def test_invalid_sampler_values_are_input_errors(pipe, kw):
    """Catches: ``steps or default`` (steps=0 ran the run's 50 steps where the CLI refuses
    --steps 0), and a rule of the config table not applied to the Python API."""
    with pytest.raises(InputError):
        pipe(classes=[1], **kw)


def test_sampler_args_are_the_runs_defaults_and_frozen(pipe):
    from reptok.pipeline import SamplerArgs

    s = pipe.cfg.sampling
    args = pipe.sampler_args(steps=7, cfg_interval=None)
    assert (args.steps, args.guidance_scale, args.cfg_interval, args.decoder_steps) == (7, s.cfg, None, s.decoder_steps)
    assert pipe.sampler_args().cfg_interval == tuple(s.cfg_interval)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.steps = 3
    assert SamplerArgs(steps=3) == SamplerArgs(steps=3)  # hashable settings compare by value


def test_cfg_is_a_deprecated_alias_of_guidance_scale(pipe):
    with pytest.warns(DeprecationWarning, match="guidance_scale"):
        old = pipe(classes=[2], seed=1, output="pt", cfg=3.0, **FAST)
    assert torch.equal(old, pipe(classes=[2], seed=1, output="pt", guidance_scale=3.0, **FAST))
    with pytest.raises(TypeError, match="not both"):
        pipe(classes=[2], cfg=3.0, guidance_scale=2.0)


def test_from_run_fast_gives_the_cli_default_pixels(run, tmp_path):
    """``Pipeline.from_run(..., fast=True)``: the CLI's default path (no --no-fast) from Python,
    recorded in ``fast_path``. Catches: from_run ignoring ``fast`` or a Python-only path."""
    from reptok import Pipeline

    out = tmp_path / "f.npz"
    cli("sample", "--ckpt", run, "--class", 4, "-n", 2, "--seed", 2, "--out", out, "--batch-size", 2,
        "--steps", 3, "--decoder-steps", 3, "--device", "cpu")
    fast = Pipeline.from_run(run, "cpu", fast=True)
    assert fast.fast_path == {"backend": "torch", "device": "cpu", "precision": "fp32", "cuda_graphs": False,
                              "compile": False}
    got = fast(classes=[4], n=2, seed=2, output="np", steps=3, decoder_steps=3)
    assert np.array_equal(got, np.load(out)["arr_0"])


def test_interpolate_ends_at_the_two_images_with_shared_noise(pipe):
    """Frame 0 / the last frame decode image a's / b's own token, every frame with the decoder
    noise of index 0. Catches: per-frame noise, or t running 0..1 exclusive of 1."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    frames = pipe.interpolate(x[0], x[1], 3, seed=4, output="pt", decoder_steps=3)
    assert frames.shape == (3, 3, 32, 32)
    z = pipe.encode(x)
    noise = pipe.decoder_noise([0], 4)
    args = pipe.sampler_args(decoder_steps=3)
    for i, k in ((0, 0), (2, 1)):
        want = pipe.decode(z[k: k + 1], noise, args).clamp(-1, 1)
        assert (frames[i: i + 1] - want).abs().max() < 1e-3  # other batch size: rounding
    with pytest.raises(InputError, match="frames=1"):
        pipe.interpolate(x[0], x[1], 1)
