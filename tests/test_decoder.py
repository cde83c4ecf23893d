"""FlowDecoder: shapes, official conventions (patch order, RoPE, time), XL sizes, key map, ONNX."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reptok.config import DecoderConfig
from reptok.convert.keymaps import decoder_key_map
from reptok.models.decoder import FlowDecoder
from reptok.models.layers import AxialRoPE2D, FourierFeatures, apply_rotary, make_axial_pos_2d

torch.set_num_threads(1)

# the tiny preset's decoder (pixel space) and the official-tiny fixture's geometry
TINY = DecoderConfig(in_channels=3, input_size=32, patch_size=4, width=32, depth=2, head_dim=16, mapping_width=32, token_dim=32)
OFFICIAL_TINY = DecoderConfig(in_channels=4, input_size=32, patch_size=2, width=96, depth=2, head_dim=24, mapping_width=48, token_dim=64)
GEOMETRIES = [pytest.param(TINY, id="tiny"), pytest.param(OFFICIAL_TINY, id="official-tiny")]
FIXTURE = Path(__file__).parent / "fixtures/official-tiny/official_tiny.ckpt"


def _randomize(model: FlowDecoder, seed: int = 0) -> FlowDecoder:
    """Replace every weight (zero-inits included) by a random one of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("attn.scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 10 + 2)  # must stay positive
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(p.shape[-1]))
            elif name.endswith(".scale") or name.endswith("ln.weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model


def _inputs(cfg: DecoderConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    token = torch.randn(batch, cfg.token_dim, generator=g)
    return x, t, token


# ----------------------------------------------------------------------------- shapes and init
@pytest.mark.parametrize("cfg", GEOMETRIES)
def test_forward_backward_shapes(cfg):
    torch.manual_seed(0)
    model = _randomize(FlowDecoder(cfg))
    x, t, token = _inputs(cfg, 2)
    assert model.condition(token).shape == (2, 1, cfg.width)
    v = model(x, t, token)
    assert v.shape == x.shape
    v.square().mean().backward()
    # every parameter, the dead new_reg included, is in the graph (DDP needs this)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.token_proj.new_reg.grad.abs().max() == 0  # ... but new_reg cannot matter


@pytest.mark.parametrize("cfg", GEOMETRIES)
def test_zero_init_gives_zero_velocity(cfg):
    torch.manual_seed(0)
    model = FlowDecoder(cfg)
    x, t, token = _inputs(cfg, 2)
    assert torch.equal(model(x, t, token), torch.zeros_like(x))
    # init_weights reproduces the same init structure after the weights were overwritten
    _randomize(model).init_weights()
    assert torch.equal(model(x, t, token), torch.zeros_like(x))
    for blk in model.blocks:
        assert torch.equal(blk.attn.scale, torch.full_like(blk.attn.scale, 10.0))
        for w in (blk.attn.norm.linear.weight, blk.attn.out_proj.weight, blk.ff.norm.linear.weight, blk.ff.down_proj.weight):
            assert not w.any()
    assert not model.token_proj.fc.weight.any() and not model.token_proj.fc.bias.any()
    assert not model.token_proj.temp_pos_embed.any()


def test_conditioning_path_at_init_is_padded_token():
    # fc = 0: y = LN(bias=0) + pad(token) = [token, 0]
    torch.manual_seed(0)
    model = FlowDecoder(OFFICIAL_TINY)
    token = torch.randn(3, OFFICIAL_TINY.token_dim)
    c = model.condition(token)
    assert torch.equal(c[:, 0, : OFFICIAL_TINY.token_dim], token)
    assert not c[:, 0, OFFICIAL_TINY.token_dim :].any()


def test_token_wider_than_width_is_cropped_in_the_residual():
    cfg = DecoderConfig(in_channels=3, input_size=16, patch_size=4, width=32, depth=1, head_dim=16, mapping_width=16, token_dim=48)
    model = FlowDecoder(cfg)
    token = torch.randn(2, 48)
    assert torch.equal(model.condition(token)[:, 0], token[:, :32])
    x, t, _ = _inputs(cfg, 2)
    assert _randomize(model)(x, t, token).shape == x.shape


# ----------------------------------------------------------------------------- conventions
def test_forward_is_negated_official_velocity_at_one_minus_t():
    model = _randomize(FlowDecoder(OFFICIAL_TINY))
    x, t, token = _inputs(OFFICIAL_TINY, 3)
    with torch.no_grad():
        v = model(x, t, token)
        ref = -model.official_velocity(x, 1 - t, token)
    assert v.abs().max() > 0.01
    assert torch.equal(v, ref)


def test_patchify_ordering_and_round_trip():
    cfg = DecoderConfig(in_channels=3, input_size=8, patch_size=2, width=16, depth=1, head_dim=8, mapping_width=8, token_dim=8)
    model = FlowDecoder(cfg)
    C, S, p = 3, 8, 2
    # value encodes (row, col, ch): x[0, ch, y, x] = 1000 y + 10 x + ch
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    x = torch.stack([1000 * yy + 10 * xx + ch for ch in range(C)])[None].float()
    tokens = model.patchify(x)
    assert tokens.shape == (1, (S // p) ** 2, p * p * C)
    for r in range(S // p):
        for c in range(S // p):
            for dy in range(p):
                for dx in range(p):
                    for ch in range(C):
                        want = 1000 * (p * r + dy) + 10 * (p * c + dx) + ch
                        assert tokens[0, r * (S // p) + c, dy * p * C + dx * C + ch] == want
    assert torch.equal(model.unpatchify(tokens), x)


def test_fourier_time_features_cos_first():
    ff = FourierFeatures(1, 8)
    t = torch.tensor([0.0, 0.3, 1.0])
    out = ff(t[:, None])
    f = 2 * math.pi * t[:, None] * ff.weight[:, 0]
    assert torch.allclose(out, torch.cat([f.cos(), f.sin()], dim=-1), atol=1e-6)
    assert torch.equal(out[0], torch.cat([torch.ones(4), torch.zeros(4)]))


# ----------------------------------------------------------------------------- RoPE
def test_rope_freqs_xl_layout():
    rope = AxialRoPE2D(72, 16)  # XL: width 1152, head 72 -> 16 heads
    f = rope.freqs
    assert f.shape == (2, 16, 9)
    assert torch.equal(f[0], f[1])
    # spec 3.4: f_n = pi * 10^(n / 144), freqs[a, h, i] = f_{16 i + h}
    n = 16 * torch.arange(9)[None, :] + torch.arange(16)[:, None]
    assert torch.allclose(f[0], (math.pi * 10 ** (n.double() / 144)).float(), rtol=1e-5)
    assert f[0, 0, 0].item() == pytest.approx(math.pi, rel=1e-6)
    assert f[0, 0, 1].item() == pytest.approx(4.0575, abs=1e-4)
    assert f[0, 0, -1].item() == pytest.approx(24.32, abs=5e-3)
    assert f[0, 15, 0].item() == pytest.approx(3.993, abs=1e-3)
    assert f[0, 15, -1].item() == pytest.approx(30.92, abs=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_angles_stay_fp32_under_autocast(dtype):
    """Catches: angles computed in the qkv (autocast) dtype, bf16 being off by up to 0.11 rad at XL."""
    model = FlowDecoder(OFFICIAL_TINY).eval()
    attn = model.blocks[0].attn
    seen = []
    orig = attn.rope.angles
    attn.rope.angles = lambda pos: seen.append(orig(pos)) or seen[-1]
    x = torch.randn(2, model.pos.shape[0], OFFICIAL_TINY.width)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        attn(x, torch.randn(2, OFFICIAL_TINY.mapping_width), model.pos)
    theta = seen[0]
    assert theta.dtype == torch.float32
    f = attn.rope.freqs.double()  # hand-computed in float64: row angles then column angles
    pos = model.pos.double()
    want = torch.cat([pos[:, None, 0:1] * f[0], pos[:, None, 1:2] * f[1]], -1).transpose(0, 1)
    assert (theta.double() - want).abs().max() < 1e-5


def test_positions_and_latent_token_rope_is_identity():
    model = FlowDecoder(OFFICIAL_TINY)
    pos = model.pos
    g = OFFICIAL_TINY.input_size // OFFICIAL_TINY.patch_size
    assert pos.shape == (1 + g * g, 2)
    assert torch.equal(pos[0], torch.zeros(2))
    centres = -1 + (2 * torch.arange(g) + 1) / g
    want = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    assert torch.allclose(pos[1:], want, atol=1e-6)
    assert torch.allclose(make_axial_pos_2d(4, 4)[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))

    rope = model.blocks[0].attn.rope
    theta = rope.angles(pos)  # (H, L, head_dim // 4)
    assert theta.shape == (4, 1 + g * g, 24 // 4)
    q = torch.randn(2, 4, 1 + g * g, 24)
    y = apply_rotary(q, theta)
    assert torch.equal(y[:, :, 0], q[:, :, 0])  # the latent token: zero angles
    assert torch.equal(y[..., 12:], q[..., 12:])  # only head_dim / 2 dims rotate
    assert not torch.allclose(y[:, :, 1:, :12], q[:, :, 1:, :12])
    assert torch.allclose(y.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation


# ----------------------------------------------------------------------------- XL sizes + names
def _xl_on_meta() -> FlowDecoder:
    with torch.device("meta"):
        return FlowDecoder(DecoderConfig())


def test_xl_parameter_count_matches_spec():
    model = _xl_on_meta()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model.blocks) == 28 * 19_611_664
    assert count(model.patch_in) + count(model.in_proj) == 1_345_536
    assert count(model.out_norm) + count(model.patch_out) == 19_584
    assert count(model.mapping) == 18_878_464
    assert count(model.time_in_proj) == 1_048_576
    assert count(model.token_proj) == 890_496
    # spec 9 quotes 571,310,016 trainable for the whole decoder, which includes the DINO
    # cls_token (768) that lives in the encoder, not here
    assert count(model) == 571_310_016 - 768
    assert all(p.requires_grad for p in model.parameters())
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("freqs")) == 8_064


XL_OFFICIAL_SHAPES = {
    "self_attn.scale": (16,),
    "self_attn.norm.linear.weight": (1152, 1024),
    "self_attn.qkv_proj.weight": (3456, 1152),
    "self_attn.pos_emb.freqs": (2, 16, 9),
    "self_attn.out_proj.weight": (1152, 1152),
    "ff.norm.linear.weight": (1152, 1024),
    "ff.up_proj.weight": (6912, 1152),
    "ff.down_proj.weight": (1152, 3456),
    "backbone.mid_merge.proj.weight": (1152, 1152),
    "backbone.mid_merge.pre_proj.proj.weight": (1152, 16),
    "backbone.mid_split.post_proj.norm.scale": (1152,),
    "backbone.mid_split.post_proj.proj.weight": (16, 1152),
    "time_emb.weight": (512, 1),
    "time_in_proj.weight": (1024, 1024),
    "mapping.in_norm.scale": (1024,),
    "mapping.out_norm.scale": (1024,),
    "norm.scale": (1024,),
    "up_proj.weight": (6144, 1024),
    "down_proj.weight": (1024, 3072),
    "encoder.dino.temp_pos_embed": (1, 1, 1, 768),
    "encoder.dino.new_reg": (1, 2, 768),
    "encoder.dino.backbone.fc.weight": (1152, 768),
    "encoder.dino.backbone.fc.bias": (1152,),
    "encoder.dino.backbone.ln.weight": (1152,),
    "encoder.dino.backbone.ln.bias": (1152,),
}


def _spec_shape(official_key: str) -> tuple:
    if official_key.startswith("backbone.mid_level."):
        rest = official_key.split(".", 3)[3]
        return XL_OFFICIAL_SHAPES[rest]
    if official_key.startswith("mapping.blocks."):
        return XL_OFFICIAL_SHAPES[official_key.split(".", 3)[3]]
    return XL_OFFICIAL_SHAPES[official_key]


def test_xl_state_dict_keys_map_one_to_one_onto_spec_table():
    model = _xl_on_meta()
    sd = model.state_dict()
    km = decoder_key_map(28)
    assert set(sd) == set(km)
    assert len(set(km.values())) == len(km)  # one-to-one
    assert sum(k.startswith("backbone.mid_level.") for k in km.values()) == 28 * 8
    for ours, official in km.items():
        assert tuple(sd[ours].shape) == _spec_shape(official), (ours, official)


@pytest.mark.skipif(not FIXTURE.exists(), reason="official-tiny fixture not available")
def test_official_tiny_checkpoint_loads_strictly():
    ckpt = torch.load(FIXTURE, map_location="cpu", weights_only=False)
    prefix = "first_stage.decoder.decoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model = FlowDecoder(OFFICIAL_TINY)
    km = decoder_key_map(OFFICIAL_TINY.depth, OFFICIAL_TINY.mapping_depth)
    model.load_state_dict({ours: state[off] for ours, off in km.items()}, strict=True)
    x, t, token = _inputs(OFFICIAL_TINY, 2)
    with torch.no_grad():
        v = model.official_velocity(x, t, token)
    assert torch.isfinite(v).all() and v.abs().max() > 0.01
    # the fixture's freqs are the deterministic ones we compute
    assert torch.allclose(state["backbone.mid_level.0.self_attn.pos_emb.freqs"], AxialRoPE2D(24, 4).freqs)


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter (no onnxscript here)
def test_onnx_export_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _randomize(FlowDecoder(TINY)).eval()
    path = tmp_path / "decoder.onnx"
    x, t, token = _inputs(TINY, 2)
    torch.onnx.export(
        model, (x, t, token), str(path), dynamo=False, opset_version=17,
        input_names=["x", "t", "token"], output_names=["v"],
        dynamic_axes={name: {0: "batch"} for name in ("x", "t", "token", "v")},
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x, t, token = _inputs(TINY, batch, seed=batch)
        with torch.no_grad():
            ref = model(x, t, token).numpy()
        (out,) = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "token": token.numpy()})
        assert out.shape == ref.shape
        assert abs(out - ref).max() <= 1e-4, abs(out - ref).max()
