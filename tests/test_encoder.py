"""SSLEncoder: trainable cls token only, cosine anchor, official preprocessing, weight loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reptok.config import EncoderConfig
from reptok.errors import InputError
from reptok.models.encoder import SSLEncoder, better_resize, cos_anchor_loss
from reptok.presets import get_preset

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, init_values=1.0)

# The three encoder families of the paper's ablation, at tiny sizes: DINOv2 (registers,
# no_embed_class=True), MAE (plain ViT, pos embed with a cls slot), CLIP (norm_pre, no patch bias).
FAMILIES = {
    "dinov2": "vit_base_patch14_reg4_dinov2",
    "mae": "vit_base_patch16_224.mae",
    "clip": "vit_base_patch16_clip_224.openai",
}


def tiny_cfg(family: str = "dinov2", **kw) -> EncoderConfig:
    if family == "dinov2":
        cfg = get_preset("tiny").encoder
    else:
        cfg = EncoderConfig(model=FAMILIES[family], weights="random", img_size=32, dim=32, overrides=dict(TINY))
    return dataclasses.replace(cfg, **kw)


def images(b=2, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def randomize(enc: SSLEncoder, seed=1):
    """Give every tensor of the backbone non-trivial values (LayerScale, norms, biases too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
        enc.cls_token_frozen.copy_(enc.vit.cls_token)
    return enc


# ----------------------------------------------------------------------------- forward / grads
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_timm_and_only_cls_trains(family):
    enc = SSLEncoder(tiny_cfg(family))
    x = images()
    z = enc(x)
    assert z.shape == (2, 32) and z.dtype == torch.float32
    # The latent is timm's final-norm cls output.
    ref = enc.vit.forward_features(enc.preprocess(x))[:, 0]
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-6)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["vit.cls_token"]

    z.pow(2).sum().backward()
    assert enc.vit.cls_token.grad is not None and enc.vit.cls_token.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        if name != "vit.cls_token":
            assert p.grad is None, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_pair_and_cos_anchor(family):
    enc = SSLEncoder(tiny_cfg(family))
    x = images()
    z, z_frozen = enc.forward_pair(x)
    assert z.shape == z_frozen.shape == (2, 32)
    assert z.requires_grad and not z_frozen.requires_grad
    torch.testing.assert_close(z, enc(x), rtol=0, atol=1e-6)
    # Before training: same network, same token.
    loss = cos_anchor_loss(z, z_frozen)
    assert loss.shape == (2,) and loss.abs().max() < 1e-6

    # Move the cls token (cos loss has zero gradient at its minimum, so use another objective).
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=10.0)
    target = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    F.mse_loss(enc(x), target).backward()
    opt.step()
    z2, z2_frozen = enc.forward_pair(x)
    torch.testing.assert_close(z2_frozen, z_frozen, rtol=0, atol=1e-6)  # the anchor did not move
    assert cos_anchor_loss(z2, z2_frozen).min() > 1e-4
    # The anchor's gradient reaches the cls token only.
    enc.zero_grad(set_to_none=True)
    cos_anchor_loss(z2, z2_frozen).mean().backward()
    assert enc.vit.cls_token.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in enc.named_parameters() if n != "vit.cls_token")

    # No-grad path (one doubled batch) agrees with the two-pass path.
    with torch.no_grad():
        z3, z3_frozen = enc.forward_pair(x)
    torch.testing.assert_close(z3, z2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z3_frozen, z2_frozen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.forward_frozen(x), z2_frozen, rtol=1e-5, atol=1e-5)


def test_state_dict_carries_frozen_token_and_train_keeps_backbone_eval():
    enc = SSLEncoder(tiny_cfg())
    with torch.no_grad():
        enc.vit.cls_token.add_(1.0)
    sd = enc.state_dict()
    assert "cls_token_frozen" in sd and "vit.cls_token" in sd
    assert not any(k in sd for k in ("mean", "std"))
    fresh = SSLEncoder(tiny_cfg(seed=5))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.cls_token_frozen, enc.cls_token_frozen)
    torch.testing.assert_close(fresh(images()), enc(images()))
    enc.train()
    assert enc.training and not enc.vit.training
    enc.reset_cls_token()
    torch.testing.assert_close(enc.vit.cls_token, enc.cls_token_frozen)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = SSLEncoder(tiny_cfg(seed=7))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = SSLEncoder(tiny_cfg(seed=7))
    c = SSLEncoder(tiny_cfg(seed=8))
    assert torch.equal(a.vit.blocks[0].attn.qkv.weight, b.vit.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("hw", [(70, 100), (41, 32), (32, 32), (100, 33)])
def test_preprocess_matches_manual_reference(hw):
    import torchvision.transforms.functional as TF

    h, w = hw
    enc = SSLEncoder(tiny_cfg())
    x = images(2, h, w)
    side = min(h, w)
    ref = TF.center_crop(x, [side, side])
    f = side // 32
    if f > 1:  # average pooling written out: mean over f x f blocks (trailing remainder dropped)
        s = side // f
        ref = ref[..., : s * f, : s * f].reshape(2, 3, s, f, s, f).mean(dim=(3, 5))
    ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
    ref = ((ref + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    out = enc.preprocess(x)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_better_resize_identity_at_size_and_custom_norm():
    x = images(1, 32, 32)
    torch.testing.assert_close(better_resize(x, 32), x)
    enc = SSLEncoder(tiny_cfg(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    torch.testing.assert_close(enc.preprocess(x), x)  # ((x+1)/2 - .5)/.5 == x


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32)])
def test_preprocess_rejects_bad_shapes(shape):
    enc = SSLEncoder(tiny_cfg())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(shape))


# ----------------------------------------------------------------------------- weight files
def to_original_dinov2(sd: dict, seed: int = 0) -> dict:
    """timm DINOv2-reg naming -> the original (torch.hub) naming, inverting timm's converter:
    pos_embed gets a cls slot p0 and cls_token = cls_timm - p0; reg_token -> register_tokens;
    a mask_token is added (spec sections 1.5-1.6)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    p0 = torch.randn(1, 1, sd["pos_embed"].shape[-1], generator=g)
    out["pos_embed"] = torch.cat([p0, sd["pos_embed"]], dim=1)
    out["cls_token"] = sd["cls_token"] - p0
    out["register_tokens"] = sd["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, sd["pos_embed"].shape[-1])
    return out


@pytest.mark.parametrize("fmt", ["timm.safetensors", "timm.pth", "original.pth", "dir", "run-state.pth"])
def test_load_local_weights_gives_identical_outputs(tmp_path, fmt):
    from safetensors.torch import save_file

    src = randomize(SSLEncoder(tiny_cfg()))
    sd = {k: v.contiguous() for k, v in src.vit.state_dict().items()}
    if fmt == "timm.safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif fmt == "timm.pth":
        path = tmp_path / "w.pth"
        torch.save({"model": sd}, path)  # a wrapped checkpoint, as many releases are
    elif fmt == "original.pth":
        path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
        torch.save(to_original_dinov2(sd), path)
    elif fmt == "dir":
        path = tmp_path / "snapshot"
        path.mkdir()
        save_file(sd, str(path / "model.safetensors"))
    else:
        path = tmp_path / "encoder.pth"
        torch.save(src.state_dict(), path)
    loaded = SSLEncoder(tiny_cfg(weights=str(path), seed=99))
    x = images()
    torch.testing.assert_close(loaded(x), src(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.cls_token_frozen, src.vit.cls_token, rtol=1e-6, atol=1e-6)


def test_relative_weights_path_resolves_against_root(tmp_path):
    src = randomize(SSLEncoder(tiny_cfg()))
    torch.save(src.vit.state_dict(), tmp_path / "enc.pth")
    loaded = SSLEncoder(tiny_cfg(weights="enc.pth"), root=tmp_path)
    torch.testing.assert_close(loaded(images()), src(images()))
    # load_weights=False never reads the file (a run's state dict is loaded afterwards).
    SSLEncoder(tiny_cfg(weights=str(tmp_path / "absent.pth")), load_weights=False)


def test_bad_weight_files_raise_one_line_errors(tmp_path):
    sd = SSLEncoder(tiny_cfg()).vit.state_dict()
    bad = dict(sd)
    bad["blocks.0.norm1.weight"] = torch.ones(7)
    torch.save(bad, tmp_path / "shape.pth")
    missing = {k: v for k, v in sd.items() if k != "norm.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    extra = dict(sd, bogus=torch.zeros(1))
    torch.save(extra, tmp_path / "extra.pth")
    for name, key in [("shape", "blocks.0.norm1.weight"), ("missing", "norm.bias"), ("extra", "bogus")]:
        with pytest.raises(InputError, match=key.replace(".", r"\.")) as info:
            SSLEncoder(tiny_cfg(weights=str(tmp_path / f"{name}.pth")))
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="not found"):
        SSLEncoder(tiny_cfg(weights=str(tmp_path / "nope.pth")))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="model.safetensors"):
        SSLEncoder(tiny_cfg(weights=str(tmp_path / "emptydir")))


def test_dim_mismatch_is_a_config_error():
    with pytest.raises(InputError, match="embed_dim"):
        SSLEncoder(tiny_cfg(dim=48))


FIXTURE = Path(__file__).parent / "fixtures/official-tiny/official_tiny.ckpt"


@pytest.mark.skipif(not FIXTURE.exists(), reason="official tiny fixture not present")
def test_official_tiny_dino_loads_with_pos_embed_resample(tmp_path):
    """The released layout: 37x37 pos_embed + cls slot, register_tokens, mask_token, bf16."""
    ck = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    pre = "first_stage.encoder.encoder."
    sd = {k[len(pre):]: v for k, v in ck["state_dict"].items() if k.startswith(pre)}
    torch.save(sd, tmp_path / "dino.pth")
    cfg = EncoderConfig(weights=str(tmp_path / "dino.pth"), dim=64, overrides=dict(embed_dim=64, depth=2, num_heads=2))
    enc = SSLEncoder(cfg)
    assert enc.vit.pos_embed.shape == (1, 256, 64)  # 37x37 -> 16x16 at 224
    expect_cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).float()  # timm folds in the file dtype
    torch.testing.assert_close(enc.cls_token_frozen, expect_cls)
    assert enc(images(1, 256, 256)).shape == (1, 64)
