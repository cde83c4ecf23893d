"""Every preset builds: each component on the meta device (shapes only, no memory, no
downloads) with the parameter counts ``reptok info`` reports, and each architecture family runs
forward + backward at tiny widths (same layout: image / latent sizes, patching, token widths,
class counts; only widths and depths shrunk) with finite gradients."""

import copy
import dataclasses

import pytest
import torch

from reptok.info import build_meta, model_report
from reptok.models import build_generator
from reptok.models.decoder import FlowDecoder
from reptok.models.encoder import SSLEncoder
from reptok.presets import get_preset, list_presets

PRESETS = list_presets()
# Official sizes (official-checkpoint-spec.md section 9; tests/test_generator.py, test_decoder.py).
KNOWN = {("xl", "generator"): 532_793_400}


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_the_presets_are_the_documented_ones():
    assert {"tiny", "small", "base", "large", "xl"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_builds_on_meta_with_the_reported_counts(name):
    cfg = get_preset(name)
    ecfg = copy.deepcopy(cfg.encoder)
    ecfg.weights = "random"
    with torch.device("meta"):
        mods = {"encoder": SSLEncoder(ecfg), "decoder": FlowDecoder(cfg.decoder),
                "generator": build_generator(cfg.generator)}
    assert all(p.is_meta for m in mods.values() for p in m.parameters())
    rows = {r["component"]: r for r in model_report(cfg)}
    for comp, m in mods.items():
        n = _count(m)
        assert n > 0, comp
        assert rows[comp]["params"] == n, comp
        assert rows[comp]["gflops"] > 0, comp
        if (name, comp) in KNOWN:
            assert n == KNOWN[(name, comp)]
    # Only the encoder's cls token trains by default (the backbone is frozen).
    assert rows["encoder"]["trainable"] == cfg.encoder.dim
    assert ("vae" in rows) == (not cfg.vae.is_pixel)
    if not cfg.vae.is_pixel:
        assert rows["vae"]["params"] == _count(build_meta(cfg)["vae"]) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_text_generator_of_each_preset_builds_on_meta(name):
    g = get_preset(name).generator
    text = dataclasses.replace(g, num_classes=0, text_encoder="tiny", text_dim=64, text_len=32)
    with torch.device("meta"):
        plain, t2i = build_generator(dataclasses.replace(g, num_classes=0)), build_generator(text)
    assert t2i.seq_len == plain.seq_len + text.text_tokens
    assert _count(t2i) > _count(plain) > 0


def _shrunk(name):
    """The preset with tiny widths / depths and its layout kept (sizes, patches, token widths)."""
    cfg = get_preset(name)
    enc = cfg.encoder
    enc.weights = "random"  # never download / pre-train in a unit test
    enc.overrides = {**enc.overrides, "depth": 1}  # keep the ViT's width: it is the token width
    cfg.decoder = dataclasses.replace(cfg.decoder, width=32, depth=1, head_dim=16, mapping_width=32, mapping_depth=1)
    cfg.generator = dataclasses.replace(cfg.generator, dim=32, depth=1)
    return cfg


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("condition", ["class", "text"])
def test_forward_backward_at_tiny_widths(name, condition):
    cfg = _shrunk(name)
    if condition == "text":
        cfg.generator = dataclasses.replace(cfg.generator, num_classes=0, text_encoder="tiny", text_dim=48,
                                            text_len=8)
    torch.manual_seed(0)
    enc, dec, gen = SSLEncoder(cfg.encoder), FlowDecoder(cfg.decoder), build_generator(cfg.generator)
    for m in (dec, gen):  # undo the zero-init outputs, so every parameter gets a gradient
        for p in m.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.02)
    b, d = 2, cfg.decoder
    images = torch.rand(b, 3, cfg.image_size, cfg.image_size) * 2 - 1
    z = enc(images)
    assert z.shape == (b, cfg.encoder.dim) == (b, d.token_dim)
    x1 = torch.randn(b, d.in_channels, d.input_size, d.input_size)
    x0, t = torch.randn_like(x1), torch.rand(b)
    v = dec(t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0, t, z)
    assert v.shape == x1.shape
    g = cfg.generator
    zn = gen.normalize(z.detach())
    assert zn.shape == (b, g.n_tokens, g.token_dim)
    if condition == "text":
        cond = (torch.randn(b, g.text_len, g.text_dim), torch.ones(b, g.text_len, dtype=torch.bool))
    else:
        cond = (torch.randint(0, g.num_classes, (b,)),)
    vg = gen(zn, t, *cond)
    assert vg.shape == zn.shape
    loss = (v - (x1 - x0)).square().mean() + (vg - (zn - torch.randn_like(zn))).square().mean()
    loss.backward()
    for module in (enc, dec, gen):
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        assert trainable
        for n, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # The token is what stage (a) trains: its gradient reaches the encoder's cls token.
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["vit.cls_token"]
    assert enc.vit.cls_token.grad.abs().sum() > 0
