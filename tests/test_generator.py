"""TokenGenerator: the official MLPMixer1D layout, conditioning, normalisation, sampling fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import math

import pytest
import torch

from reptok.config import GeneratorConfig
from reptok.errors import InputError
from reptok.flow import guided_velocity, solve
from reptok.models.generator import TimestepEmbedder, TokenGenerator
from reptok.presets import get_preset


def tiny_cfg(**kw) -> GeneratorConfig:
    return dataclasses.replace(get_preset("tiny").generator, **kw)


def build(seed=0, live=True, **kw) -> TokenGenerator:
    """A tiny generator; ``live`` undoes the output zero-init so outputs depend on the inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = TokenGenerator(tiny_cfg(**kw))
        if live:
            torch.nn.init.normal_(g.mixer[-1].weight, std=0.1)
    return g.eval()


def inputs(g: TokenGenerator, b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, g.cfg.n_tokens, g.cfg.token_dim, generator=gen)
    t = torch.rand(b, generator=gen)
    y = torch.randint(0, max(g.cfg.num_classes, 1), (b,), generator=gen)
    return x, t, y


# ----------------------------------------------------------------------------- layout
def test_xl_parameter_count_matches_spec():
    with torch.device("meta"):
        g = TokenGenerator(GeneratorConfig())
    assert sum(p.numel() for p in g.parameters()) == 532_793_400  # spec section 9


def test_state_dict_keys_are_the_official_ones():
    g = build(num_classes=10, dim=64, depth=2, token_dim=32)
    sd = g.state_dict()
    T, dim = 3, 64  # [x, y, t]
    expect = {
        "pos_embed": (1, 1, 32),
        "t_embedder.mlp.0.weight": (32, 256),
        "t_embedder.mlp.2.weight": (32, 32),
        "label_embedder.embedding_table.weight": (11, 32),  # + null row
        "mixer.0.weight": (dim, 32),
        "mixer.1.0.norm.weight": (dim,),
        "mixer.1.0.fn.0.weight": (int(T * 3.0), T, 1),
        "mixer.1.0.fn.3.weight": (T, int(T * 3.0), 1),
        "mixer.2.1.fn.0.weight": (int(dim * 4.0), dim),
        "mixer.2.1.fn.3.weight": (dim, int(dim * 4.0)),
        "mixer.3.weight": (dim,),  # final LayerNorm
        "mixer.4.weight": (32, dim),
        "token_mean": (32,),
        "token_std": (32,),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert g.mixer[3].eps == 1e-5 and g.mixer[1][0].norm.eps == 1e-5
    fresh = TokenGenerator(tiny_cfg())
    assert fresh.mixer[-1].weight.abs().sum() == 0 and fresh.mixer[-1].bias.abs().sum() == 0


def test_timestep_embedding_is_dit_unscaled_cos_first():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * f))
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * f))
    assert emb.dtype == torch.float32


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("n_tokens", [1, 2])
@pytest.mark.parametrize("num_classes", [10, 0])
def test_forward_backward_shapes(n_tokens, num_classes):
    g = build(n_tokens=n_tokens, num_classes=num_classes)
    x, t, y = inputs(g)
    v = g(x, t, y if num_classes else None)
    assert v.shape == x.shape
    v.square().mean().backward()
    assert g.mixer[0].weight.grad is not None and g.pos_embed.grad is not None
    assert g.seq_len == n_tokens + (2 if num_classes else 1)
    assert TokenGenerator(tiny_cfg(n_tokens=n_tokens, num_classes=num_classes))(x, t, y).abs().max() == 0


def test_unconditional_variant():
    g = build(num_classes=0)
    assert g.condition.embedding_table is None and g.null_class is None
    assert not any(k.startswith("label_embedder") for k in g.state_dict())
    x, t, _ = inputs(g)
    torch.testing.assert_close(g(x, t), g(x, t, torch.zeros(4, dtype=torch.long)))  # y ignored
    with pytest.raises(InputError, match="null class"):
        g.null(4)


def test_label_dropout_only_in_train_mode():
    g = build(class_dropout=1.0)  # drop every label when dropping is on
    x, t, y = inputs(g)
    null = g.null(4)
    assert g.null_class == 10 and null.tolist() == [10] * 4
    with torch.no_grad():
        cond = g(x, t, y)
        uncond = g(x, t, null)
        assert not torch.allclose(cond, uncond)
        g.train()
        torch.testing.assert_close(g(x, t, y), uncond)  # train: all dropped
        g.eval()
        torch.testing.assert_close(g(x, t, y), cond)  # eval: never dropped
        # force_drop_ids: deterministic per-sample dropping, in any mode.
        mixed = g(x, t, y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
        torch.testing.assert_close(mixed[[0, 2]], uncond[[0, 2]])
        torch.testing.assert_close(mixed[[1, 3]], cond[[1, 3]])


def test_label_dropout_rate_in_train_mode():
    g = build(class_dropout=0.1).train()
    torch.manual_seed(0)
    dropped = g.condition.token_drop(torch.zeros(20000, dtype=torch.long))
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01


def test_no_null_row_without_class_dropout():
    g = build(class_dropout=0.0)
    assert g.condition.embedding_table.num_embeddings == 10 and g.null_class is None
    g.train()
    x, t, y = inputs(g)
    torch.testing.assert_close(g(x, t, y), g.eval()(x, t, y))


def test_bad_inputs():
    g = build()
    x, t, y = inputs(g)
    with pytest.raises(InputError, match="shape"):
        g(x[:, 0], t, y)
    with pytest.raises(InputError, match="without labels"):
        g(x, t)
    # scalar t broadcasts
    torch.testing.assert_close(g(x, torch.tensor(0.5), y), g(x, torch.full((4,), 0.5), y))


# ----------------------------------------------------------------------------- normalisation
def test_normalize_denormalize_round_trip():
    g = build()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 32, generator=gen) * 3 + 1
    g.set_token_stats(z.mean(0), z.std(0))
    zn = g.normalize(z)
    assert zn.shape == (8, 1, 32)
    torch.testing.assert_close(zn.mean(dim=(0, 1)), torch.zeros(32), rtol=0, atol=1e-5)
    torch.testing.assert_close(g.denormalize(zn), z, rtol=1e-5, atol=1e-5)
    assert "token_mean" in g.state_dict() and "token_std" in g.state_dict()
    g2 = build(n_tokens=2)
    z2 = torch.randn(8, 2, 32, generator=gen)
    torch.testing.assert_close(g2.denormalize(g2.normalize(z2)), z2)


# ----------------------------------------------------------------------------- sampling fit
def test_samples_through_flow_solve_with_guidance():
    g = build()
    b = 4
    y = torch.tensor([0, 3, 7, 9])
    noise = torch.randn(b, 1, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fn = guided_velocity(lambda x, t, c: g(x, t, c), y, g.null(b), scale=1.5, interval=(0.3, 0.9))
        x = solve(fn, noise, steps=8, solver="euler")
        plain = solve(guided_velocity(lambda x, t, c: g(x, t, c), y, g.null(b), scale=1.0), noise, 8)
        heun = solve(fn, noise, steps=4, solver="heun")
    assert heun.shape == x.shape and not torch.allclose(x, plain)  # guidance changed the guided steps
    # By hand: 8 Euler steps at t = i / 8, guided (v_u + 1.5 (v_c - v_u)) at i = 3..7 (t in [0.3, 0.9]).
    want = noise.clone()
    with torch.no_grad():
        for i in range(8):
            t = torch.full((b,), i / 8)
            v_c = g(want, t, y)
            v = g(want, t, g.null(b)) + 1.5 * (v_c - g(want, t, g.null(b))) if i in (3, 4, 5, 6, 7) else v_c
            want = want + v / 8
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    g.set_token_stats(torch.full((32,), 0.5), torch.full((32,), 2.0))
    torch.testing.assert_close(g.denormalize(x), x[:, 0] * 2.0 + 0.5)  # (b, 32): std * x + mean


FIXTURE = str(Path(__file__).parent / "fixtures/official-tiny/official_tiny.ckpt")


@pytest.mark.skipif(not __import__("os").path.exists(FIXTURE), reason="official tiny fixture not present")
def test_official_generator_keys_load_strictly():
    """The official MLPMixer1D state dict (minus ``_orig_mod.``) fits ours exactly."""
    ck = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    p = ck["hyper_parameters"]["flow_cfg"]["params"]["net_cfg"]["params"]
    cfg = GeneratorConfig(
        token_dim=p["channels"], n_tokens=p["n_channels"], dim=p["dim"], depth=p["depth"],
        token_expand=p["expansion_factor"], channel_expand=p["expansion_factor_token"],
        num_classes=p["num_classes"], class_dropout=p["class_dropout_prob"],
    )
    pre = "ema_model.net."
    sd = {k[len(pre):].replace("_orig_mod.", ""): v for k, v in ck["state_dict"].items() if k.startswith(pre)}
    g = TokenGenerator(cfg)
    res = g.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == ["token_mean", "token_std"]
    x = torch.randn(2, 1, cfg.token_dim)
    assert g.eval()(x, torch.rand(2), torch.tensor([1, 10])).shape == (2, 1, cfg.token_dim)
