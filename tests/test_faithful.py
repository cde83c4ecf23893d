"""The official recipe by default: float32 CFG interval, per-stage time samplers, the scalar token
normalisation (and legacy runs keeping per_dim), weight-decay groups, and ``train recon|gen --init``
from a reptok run and from the converted official checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clihelp import cli  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "official-tiny"


def _run(*args):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def work(class_runs):
    """The shared tiny chain (tests/conftest.py): data, tok, tokens.npy, gen."""
    return class_runs


# ----------------------------------------------------------------------------- CFG interval
def _generate2(p, noise):
    """Tokens of classes 0 and 1 in 2 generator steps."""
    return p.generate(torch.tensor([0, 1]), noise, p.sampler_args(steps=2))


def test_cfg_interval_is_judged_in_float32_like_the_official_code():
    """10 steps, [0.2, 0.8]: t_8 = float32(0.8) = 0.800000011920929 is guided officially (0.8f <= 0.8f);
    a float64 comparison (0.800000011920929 > 0.8) would leave it out."""
    from reptok import flow

    ts = flow.time_grid(10)
    ours = [i for i in range(10) if flow.in_interval(ts[i:i + 1], (0.2, 0.8))]
    float64 = [i for i in range(10) if 0.2 <= float(ts[i]) <= 0.8]
    official = [i for i in range(10) if not bool((ts[i] < 0.2) | (ts[i] > 0.8))]  # tensor vs Python float
    assert ours == official == [2, 3, 4, 5, 6, 7, 8]
    assert float64 == [2, 3, 4, 5, 6, 7]  # the case where the two precisions disagree
    # ... and guided_velocity guides exactly those steps of a real solve
    guided = []

    def model(x, t, c):
        if x.shape[0] == 2:  # the doubled CFG batch
            guided.append(round(float(t[0]) * 10))
        return torch.zeros_like(x)

    v = flow.guided_velocity(model, torch.tensor([1]), torch.tensor([0]), 2.0, (0.2, 0.8))
    flow.solve(v, torch.zeros(1, 3), 10)
    assert guided == [2, 3, 4, 5, 6, 7, 8]


# ----------------------------------------------------------------------------- token norm
def test_token_stats_scalar_and_per_dim():
    from reptok.train.gen import token_stats

    rng = np.random.default_rng(0)
    z = (rng.standard_normal((500, 8)) * np.arange(1, 9) + np.arange(8)).astype(np.float32)
    meta = {"dim": 8, "mean": z.mean(0).tolist(), "std": z.std(0).tolist()}
    mean, std = token_stats(z, meta, "scalar")
    assert torch.equal(mean, torch.zeros(8))
    assert torch.allclose(std, torch.full((8,), float(np.std(z.astype(np.float64), ddof=1))).to(std.dtype))
    mean, std = token_stats(z, meta, "per_dim")
    assert np.allclose(mean.numpy(), z.mean(0), atol=1e-6) and np.allclose(std.numpy(), z.std(0), atol=1e-6)


@pytest.mark.parametrize("norm", [None, "scalar", "per_dim"])
def test_train_gen_token_norm(work, tmp_path, norm):
    args = ["--token-norm", norm] if norm else []
    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "g", "--preset", "tiny", "--steps", 2,
        "--json", *args)
    doc = json.loads((tmp_path / "g" / "config.json").read_text())
    assert doc["pipeline"]["generator"]["token_norm"] == (norm or "scalar")  # scalar by default
    w = load_file(str(tmp_path / "g" / "ema.safetensors"))
    tokens = np.load(work / "tokens.npy")
    side = json.loads((work / "tokens.json").read_text())
    if norm == "per_dim":
        assert np.allclose(w["generator.token_mean"].numpy(), side["mean"], atol=1e-6)
        assert np.allclose(w["generator.token_std"].numpy(), side["std"], atol=1e-6)
    else:
        assert torch.equal(w["generator.token_mean"], torch.zeros(tokens.shape[1]))
        s = float(np.std(tokens.astype(np.float64), ddof=1))
        assert torch.allclose(w["generator.token_std"], torch.full((tokens.shape[1],), s), rtol=1e-6)
    # the generator learns on z / s: sampled tokens come back in token space
    from reptok.pipeline import Pipeline

    p = Pipeline.from_run(tmp_path / "g", components=("generator",))
    z = p.generate(torch.tensor([0, 1]), torch.randn(2, 1, tokens.shape[1]), p.sampler_args(steps=2))
    assert z.shape == (2, tokens.shape[1]) and torch.isfinite(z).all()


def test_bad_token_norm_is_exit_2(work, tmp_path):
    r = _run("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "g", "--preset", "tiny",
             "--token-norm", "whiten")
    assert r.exit_code == 2 and "--token-norm whiten" in r.output and not (tmp_path / "g").exists()


def test_legacy_run_config_keeps_per_dim_and_its_sampler(work, tmp_path):
    """A run written before token_norm / per-stage samplers (its config has train.time_sampler and no
    generator.token_norm) reads back as per_dim with that sampler for both stages, samples as before
    and resumes with the same settings."""
    import shutil

    from reptok.pipeline import Pipeline
    from reptok.run import read_run_config

    old = tmp_path / "old"
    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", old, "--preset", "tiny", "--steps", 2,
        "--token-norm", "per_dim", "--json")
    doc = json.loads((old / "config.json").read_text())
    p = doc["pipeline"]
    for part in ("decoder", "generator"):
        for k in ("time_sampler", "time_loc", "time_scale"):
            p[part].pop(k)
    p["generator"].pop("token_norm")
    p["train"]["time_sampler"] = "logit_normal"
    (old / "config.json").write_text(json.dumps(doc))
    cfg = read_run_config(old)["config"]
    assert cfg.generator.token_norm == "per_dim"
    assert cfg.generator.time_sampler == cfg.decoder.time_sampler == "logit_normal"
    assert "time_sampler" not in cfg.to_dict()["train"]
    noise = torch.randn(2, 1, cfg.generator.token_dim)
    before = _generate2(Pipeline.from_run(old, components=("generator",)), noise)
    shutil.copytree(old, tmp_path / "copy")
    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", old, "--steps", 3, "--resume", "--json")
    new = json.loads((old / "config.json").read_text())["pipeline"]
    assert new["generator"]["token_norm"] == "per_dim" and new["generator"]["time_sampler"] == "logit_normal"
    again = _generate2(Pipeline.from_run(tmp_path / "copy", components=("generator",)), noise)
    assert torch.equal(before, again)


# ----------------------------------------------------------------------------- time samplers
def test_time_samplers_per_stage_defaults_and_options(work, tmp_path):
    from reptok.presets import get_preset
    from reptok.train.gen import GenTask
    from reptok.train.loop import step_generator

    for name in ("tiny", "small", "xl"):
        cfg = get_preset(name)
        assert (cfg.decoder.time_sampler, cfg.decoder.time_loc, cfg.decoder.time_scale) == ("logit_normal", 0.0, 1.0)
        assert cfg.generator.time_sampler == "uniform"
    # the generator task draws U(0, 1) by default ...
    from reptok.pipeline import Pipeline

    gen = Pipeline.from_run(work / "gen", components=("generator",)).generator
    task = GenTask(gen, np.zeros((4, gen.cfg.token_dim), np.float32), np.zeros(4, np.int64), 0.1)
    assert torch.equal(task.draw_noise(4, step_generator(0, 3))["t"], torch.rand(4, generator=step_generator(0, 3)))
    # ... and the decoder's loc / scale come from the CLI into the run (and into its draws)
    cli("train", "recon", "--data", work / "data", "--out", tmp_path / "tok", "--preset", "tiny", "--steps", 1,
        "--batch-size", 8, "--sample-every", 0, "--time-loc", "0.5", "--time-scale", "2", "--json")
    dc = json.loads((tmp_path / "tok" / "config.json").read_text())["pipeline"]["decoder"]
    assert (dc["time_sampler"], dc["time_loc"], dc["time_scale"]) == ("logit_normal", 0.5, 2.0)
    from reptok.config import PipelineConfig
    from reptok.pipeline import Pipeline
    from reptok.train.recon import ReconTask

    cfg = PipelineConfig.from_dict(json.loads((tmp_path / "tok" / "config.json").read_text())["pipeline"])
    rt = ReconTask(Pipeline.build(cfg, components=("encoder", "decoder", "vae")), None, 1.0, False)
    n = torch.randn(8, generator=step_generator(0, 0))
    assert torch.allclose(rt.draw_noise(8, step_generator(0, 0))["t"], torch.sigmoid(0.5 + 2 * n))
    r = _run("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "g", "--preset", "tiny",
             "--time-sampler", "cosine")
    assert r.exit_code == 2 and "--time-sampler cosine" in r.output and not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------- weight decay
def test_weight_decay_only_on_linear_and_conv_matrices(work):
    from torch import nn

    from reptok.pipeline import Pipeline
    from reptok.train.loop import _param_groups
    from reptok.train.recon import ReconTask

    pipe = Pipeline.from_run(work / "tok", components=("encoder", "decoder", "vae"))
    pipe.encoder.requires_grad_(True)  # the whole ViT trainable: norms, biases, pos / reg embeddings too
    task = ReconTask(pipe, None, 1.0, False, token_lr_scale=10.0)
    params = [p for p in task.parameters() if p.requires_grad]
    assert len(_param_groups(task, params, 0.0)) == 2  # as before the split: rest + the cls token
    groups = _param_groups(task, params, 0.05)
    decayed = {id(p) for g in groups if g.get("weight_decay", None) is None for p in g["params"]}
    names = {id(p): n for n, p in task.named_parameters()}
    matrices = {id(m.weight) for m in task.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    assert decayed == {id(p) for p in params if id(p) in matrices} and decayed
    undecayed = [names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]]
    for needle in ("cls_token", "pos_embed", "reg_token", ".bias", "norm", "attn.scale"):
        assert any(needle in n for n in undecayed), needle
    import re

    # (an AdaRMSNorm's conditioning Linear is a weight matrix and decays, as in k-diffusion)
    assert not [names[i] for i in decayed if re.search(r"cls_token|pos_embed|\.bias$|norm\d*\.(weight|scale)$", names[i])]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    cls_group = [g for g in opt.param_groups if any(p is pipe.encoder.vit.cls_token for p in g["params"])][0]
    assert cls_group["weight_decay"] == 0.0 and cls_group["lr_scale"] == 10.0


# ----------------------------------------------------------------------------- --init
def test_init_from_reptok_runs(work, tmp_path):
    """train recon / gen --init RUN start from RUN's raw weights (lr ~0: the new run's weights are
    the init run's), record it, and keep the init generator's normalisation."""
    cli("train", "recon", "--data", work / "data", "--out", tmp_path / "tok", "--init", work / "tok",
        "--preset", "tiny", "--steps", 1, "--batch-size", 8, "--lr", 1e-12, "--sample-every", 0, "--json")
    a, b = load_file(str(work / "tok" / "model.safetensors")), load_file(str(tmp_path / "tok" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-9) for k in a)
    doc = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert doc["init"] == str((work / "tok").resolve()) and doc["pipeline"]["train"]["steps"] == 1

    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "gen", "--init", work / "gen",
        "--preset", "tiny", "--steps", 1, "--lr", 1e-12, "--json")
    a, b = load_file(str(work / "gen" / "model.safetensors")), load_file(str(tmp_path / "gen" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-9) for k in a)
    assert torch.equal(a["generator.token_std"], b["generator.token_std"])


@pytest.mark.parametrize("stage,init,extra,needle", [
    ("recon", "gen", [], "a generator run"),
    ("recon", "tok", ["--set", "decoder.width=64"], "shape"),
    ("recon", "tok", ["--encoder-weights", "random"], "--encoder-weights"),
    ("recon", "missing", [], "no config.json"),
    ("gen", "tok", [], "a tokenizer run"),
    ("gen", "gen", ["--token-norm", "per_dim"], "--token-norm"),
    ("gen", "gen", ["--set", "generator.dim=32"], "shape"),
])
def test_init_mismatch_is_exit_2_before_any_work(work, tmp_path, stage, init, extra, needle):
    src = ["--data", work / "data"] if stage == "recon" else ["--tokens", work / "tokens.npy"]
    r = _run("train", stage, *src, "--out", tmp_path / "new", "--init", work / init, "--preset", "tiny",
             "--steps", 1, *extra)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    r = _run("convert", "official", FIX / "official_tiny.ckpt", "--out", root / "run", "--encoder-heads", 2,
             "--vae-config", FIX / "tiny_vae", "--json")
    assert r.exit_code == 0, r.output
    from reptok.data.prep import prepare

    prepare("builtin:shapes", root / "data", limit=4, resolution=256)
    return root


def test_init_from_the_converted_official_run(official, tmp_path):
    """Stage (a) continues on the fp32 fine-tuned DINO + original cls token (not the bf16 encode()
    copy), stage (b) on the raw generator in the official space (cls / 1.25) with the checkpoint's
    logit-normal sampler; extract keeps using the encode() copy."""
    run = official / "run"
    cli("train", "recon", "--data", official / "data", "--out", tmp_path / "tok", "--init", run, "--preset", "tiny",
        "--steps", 1, "--batch-size", 2, "--sample-every", 0, "--json")
    raw, new = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "tok" / "model.safetensors"))
    frozen = [k for k in raw if k.startswith("encoder.") and k != "encoder.vit.cls_token"]
    assert frozen and all(torch.equal(raw[k], new[k]) for k in frozen)  # fp32 backbone + target token
    ema = load_file(str(run / "ema.safetensors"))
    assert not torch.equal(new["encoder.vit.blocks.0.mlp.fc1.weight"], ema["encoder.vit.blocks.0.mlp.fc1.weight"])
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())["pipeline"]
    assert Path(cfg["vae"]["source"]).is_absolute() and cfg["image_size"] == 256

    cli("extract", "--ckpt", run, "--data", official / "data", "--out", tmp_path / "tokens.npy")
    from reptok.pipeline import Pipeline

    enc = Pipeline.from_run(run, components=("encoder",))  # the inference (encode()) copy
    from reptok.data.dataset import PreparedDataset

    imgs = torch.as_tensor(PreparedDataset(official / "data").get_batch([0, 1])["image"])
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "tokens.npy")[:2]), enc.encode(imgs), atol=1e-5)
    cli("train", "gen", "--tokens", tmp_path / "tokens.npy", "--out", tmp_path / "gen", "--init", run,
        "--preset", "tiny", "--steps", 1, "--batch-size", 2, "--lr", 1e-12, "--json")
    g = load_file(str(tmp_path / "gen" / "model.safetensors"))
    assert torch.equal(g["generator.token_std"], torch.full((64,), 1.25))
    assert torch.allclose(g["generator.mixer.1.1.fn.0.weight"], raw["generator.mixer.1.1.fn.0.weight"], atol=1e-9)
    gcfg = json.loads((tmp_path / "gen" / "config.json").read_text())["pipeline"]
    assert (gcfg["generator"]["token_norm"], gcfg["generator"]["time_sampler"]) == ("scalar", "logit_normal")
    assert (gcfg["sampling"]["cfg"], gcfg["sampling"]["cfg_interval"]) == (1.5, [0.3, 0.9])  # the run's, not tiny's
