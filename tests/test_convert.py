"""``reptok convert official`` on the shared tiny checkpoint in the official Lightning layout.

The fixture (``shared/fixtures/official-tiny``) was written by Lightning from the official
training module at tiny sizes; these tests skip when it is absent. Corrupted variants are built
from it here: only the tests use ``torch.load(weights_only=False)``, on files they wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _fixture_dir() -> Path | None:
    env = os.environ.get("REPTOK_OFFICIAL_TINY")
    root = Path(__file__).resolve().parents[1]
    for cand in ([Path(env)] if env else []) + [root / "tests/fixtures/official-tiny",
                                                 root.parent / "shared/fixtures/official-tiny"]:
        if (cand / "official_tiny.ckpt").is_file():
            return cand
    return None


FIX = _fixture_dir()
needs_fix = pytest.mark.skipif(FIX is None, reason="shared/fixtures/official-tiny not found")

P_DEC = "first_stage.decoder.decoder."
P_DINO = "first_stage.encoder.encoder."
HEADS = 2  # the fixture's DINO: width 64, 2 heads (not DINOv2's head size 64)


def _opts():
    return dict(encoder_heads=HEADS, vae_config=FIX / "tiny_vae")


def _cli(*args):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _convert_cli(ckpt, out, *extra):
    return _cli("convert", "official", ckpt, "--out", out, "--encoder-heads", HEADS,
                "--vae-config", FIX / "tiny_vae", *extra)


@pytest.fixture(scope="module")
def source():
    from reptok.convert.safe_load import safe_torch_load

    return safe_torch_load(FIX / "official_tiny.ckpt")["state_dict"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from reptok.convert import convert_official

    out = tmp_path_factory.mktemp("conv") / "plain"
    summary = convert_official(FIX / "official_tiny.ckpt", out, **_opts())
    return out, summary


@pytest.fixture(scope="module")
def pipe(converted):
    from reptok.pipeline import Pipeline

    return Pipeline.from_run(converted[0])


# ----------------------------------------------------------------------------- safe reading
@needs_fix
def test_hparams_from_plain_and_omegaconf_fixtures(monkeypatch):
    from reptok.convert.safe_load import safe_torch_load, to_plain

    # OmegaConf must never be imported (its classes are replaced by inert stand-ins).
    for mod in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes", "omegaconf.base", "omegaconf.listconfig"):
        monkeypatch.setitem(sys.modules, mod, None)
    hp = [to_plain(safe_torch_load(FIX / f)["hyper_parameters"])
          for f in ("official_tiny.ckpt", "official_tiny_omegaconf.ckpt")]
    assert hp[0] == hp[1]
    assert hp[0]["first_stage_cfg"]["params"]["scale_factor"] == 1.25
    net = hp[0]["flow_cfg"]["params"]["net_cfg"]["params"]
    assert (net["dim"], net["depth"], net["num_classes"]) == (64, 2, 10)
    assert type(hp[1]["flow_cfg"]) is dict and type(hp[1]["sample_kwargs"]) is dict


@needs_fix
def test_omegaconf_fixture_converts_identically(converted, tmp_path):
    from reptok.convert import convert_official

    out = tmp_path / "omega"
    summary = convert_official(FIX / "official_tiny_omegaconf.ckpt", out, **_opts())
    a, b = load_file(str(converted[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["inferred"] == converted[1]["inferred"]


# ----------------------------------------------------------------------------- mapping
@needs_fix
def test_every_tensor_lands(converted, source):
    out, summary = converted
    from reptok.run import read_weights

    # What inference loads (ema.safetensors, the decoder from model.safetensors): the encode() DINO
    # copy and the EMA generator. The training state (fp32 DINO, raw generator) is checked below.
    w = read_weights(out)
    # decoder (decoder_key_map), generator (EMA, minus _orig_mod.)
    assert torch.equal(w["decoder.blocks.1.attn.qkv_proj.weight"], source[P_DEC + "backbone.mid_level.1.self_attn.qkv_proj.weight"])
    assert torch.equal(w["decoder.token_proj.fc.weight"], source[P_DEC + "encoder.dino.backbone.fc.weight"])
    assert torch.equal(w["generator.mixer.1.1.fn.0.weight"], source["ema_model.net.mixer._orig_mod.1.1.fn.0.weight"])
    assert not torch.equal(w["generator.mixer.1.1.fn.0.weight"], source["model.net.mixer._orig_mod.1.1.fn.0.weight"])
    assert torch.equal(w["generator.token_std"], torch.full((64,), 1.25))
    assert torch.equal(w["generator.token_mean"], torch.zeros(64))
    # encoder: DINOv2 -> timm (spec 1.6), values of the bf16 encode() copy, in fp32
    cls, pos = source[P_DINO + "cls_token"].float(), source[P_DINO + "pos_embed"].float()
    assert torch.equal(w["encoder.vit.cls_token"], cls + pos[:, :1])
    assert torch.equal(w["encoder.vit.reg_token"], source[P_DINO + "register_tokens"].float())
    assert torch.equal(w["encoder.vit.blocks.1.attn.qkv.weight"], source[P_DINO + "blocks.1.attn.qkv.weight"].float())
    tgt = P_DEC + "encoder.dino.target_model."
    assert torch.equal(w["encoder.cls_token_frozen"], source[tgt + "cls_token"] + source[tgt + "pos_embed"][:, :1])
    assert w["encoder.vit.pos_embed"].shape == (1, 256, 64)
    assert all(v.dtype == torch.float32 for v in w.values())
    # VAE
    vae = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(vae["decoder.conv_in.weight"], source[P_DEC + "ae.ae.decoder.conv_in.weight"])
    assert len(vae) == sum(k.startswith(P_DEC + "ae.ae.") for k in source)
    # bookkeeping: every source tensor converted or deliberately ignored
    t = summary["tensors"]
    assert t["consumed"] + t["ignored"] == t["source"] == len(source)
    # (the fp32 DINO copy and the raw generator are now kept as the training state; only the two
    # mask tokens and the target's duplicate of the fp32 backbone are left)
    assert summary["ignored"] == {"dino_mask_token": 2, "dino_target_model": 34}
    raw = load_file(str(out / "model.safetensors"))
    dup = P_DEC + "encoder.dino.model."
    assert torch.equal(raw["encoder.vit.cls_token"], source[dup + "cls_token"] + source[dup + "pos_embed"][:, :1])
    assert torch.equal(raw["encoder.vit.blocks.1.attn.qkv.weight"], source[dup + "blocks.1.attn.qkv.weight"])
    assert torch.equal(raw["encoder.cls_token_frozen"], w["encoder.cls_token_frozen"])
    assert torch.equal(raw["generator.mixer.1.1.fn.0.weight"], source["model.net.mixer._orig_mod.1.1.fn.0.weight"])
    assert summary["dino_target"]["differs_only_in_cls_token"]
    assert summary["dino_copies"]["equal_up_to_rounding"] and 0 < summary["dino_copies"]["max_abs_diff"] < 0.01
    doc = json.loads((out / "conversion.json").read_text())
    assert doc["hyper_parameters"]["first_stage_cfg"]["params"]["scale_factor"] == 1.25
    assert len(doc["sha256"]) == 64
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "pipeline" and cfg["pipeline"]["vae"]["source"] == "vae"
    s = cfg["pipeline"]["sampling"]
    assert (s["steps"], s["cfg"], s["cfg_interval"], s["decoder_steps"]) == (50, 1.5, [0.3, 0.9], 50)


@needs_fix
def test_raw_generator(tmp_path, source):
    from reptok.convert import convert_official

    s = convert_official(FIX / "official_tiny.ckpt", tmp_path / "raw", use_ema=False, **_opts())
    w = load_file(str(tmp_path / "raw" / "model.safetensors"))
    assert s["generator_weights"] == "raw" and s["ignored"]["generator_ema"] == 36
    assert torch.equal(w["generator.mixer.1.1.fn.0.weight"], source["model.net.mixer._orig_mod.1.1.fn.0.weight"])


@needs_fix
def test_bf16_and_inferred_vae_config(tmp_path):
    r = _cli("convert", "official", FIX / "official_tiny.ckpt", "--out", tmp_path / "a", "--encoder-heads", HEADS)
    assert r.exit_code == 2 and "norm groups" in r.output and not (tmp_path / "a").exists()
    r = _cli("convert", "official", FIX / "official_tiny.ckpt", "--out", tmp_path / "b", "--encoder-heads", HEADS,
             "--vae-norm-groups", 8, "--weights-dtype", "bf16", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bf16"
    w = load_file(str(tmp_path / "b" / "model.safetensors"))
    vae = load_file(str(tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in w.values()} == {v.dtype for v in vae.values()} == {torch.bfloat16}
    ref = json.loads((FIX / "tiny_vae" / "config.json").read_text())
    got = json.loads((tmp_path / "b" / "vae" / "config.json").read_text())
    for k in ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels", "down_block_types"):
        assert got[k] == ref[k], k
    from reptok.pipeline import Pipeline

    p = Pipeline.from_run(tmp_path / "b", components=("generator",))
    assert p.generator.token_std[0].item() == 1.25


# ----------------------------------------------------------------------------- running the result
@needs_fix
def test_converted_pipeline_runs(pipe):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    z = pipe.encode(img)
    assert z.shape == (2, 64) and torch.isfinite(z).all()
    tok = pipe.generate(torch.tensor([3, 4]), torch.randn(2, 1, 64, generator=g), pipe.sampler_args(steps=2))
    assert tok.shape == (2, 64)
    x = pipe.decode(tok, torch.randn(2, 4, 32, 32, generator=g), pipe.sampler_args(decoder_steps=2))
    assert x.shape == (2, 3, 256, 256) and torch.isfinite(x).all()


@needs_fix
def test_cli_sample_and_reconstruct(converted, tmp_path):
    out = converted[0]
    r = _cli("sample", "--ckpt", out, "--class", 3, "-n", 2, "--steps", 2, "--decoder-steps", 2,
             "--out", tmp_path / "x.npz", "--device", "cpu")
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "x.npz")["arr_0"]
    assert arr.shape == (2, 256, 256, 3)
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    r = _cli("reconstruct", tmp_path / "a.png", "--ckpt", out, "--out", tmp_path / "rec", "--decoder-steps", 2,
             "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rec" / "a_recon.png").is_file()


def _dinov2_reference(sd: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """x_norm_clstoken of the official DINOv2 forward (spec 1.2-1.3), written from the spec."""
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    x = (x + 1) / 2
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)  # (B, D, 16, 16)
    B, D = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    pos = sd["pos_embed"]
    m = int(round((pos.shape[1] - 1) ** 0.5))
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2).float(), size=(16, 16),
                              mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, D)
    x = x + torch.cat([pos[:, :1], patch_pos], dim=1)
    x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, -1, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=(D // heads) ** -0.5).transpose(1, 2).reshape(B, -1, D)
        x = x + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + p("ls2.gamma") * h
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


@needs_fix
def test_encoder_parity_with_dinov2_forward(pipe, source):
    """Our timm-based encoder on the converted weights == a from-scratch DINOv2 forward."""
    sd = {k[len(P_DINO):]: v.float() for k, v in source.items() if k.startswith(P_DINO)}
    img = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert (pipe.encoder(img) - _dinov2_reference(sd, img, HEADS)).abs().max().item() <= 1e-5
        # the original cls token (the cosine anchor's target) through the same backbone
        tgt = P_DEC + "encoder.dino.target_model."
        frozen = dict(sd, cls_token=source[tgt + "cls_token"],
                      pos_embed=torch.cat([source[tgt + "pos_embed"][:, :1], sd["pos_embed"][:, 1:]], dim=1))
        assert (pipe.encoder.forward_frozen(img) - _dinov2_reference(frozen, img, HEADS)).abs().max().item() <= 1e-5


@needs_fix
def test_encoder_parity_fp32_dino_weights(plain_ckpt, tmp_path):
    """Same, on full-precision values: the fixture's fp32 DINO copy put in the encode() slot."""
    from reptok.pipeline import Pipeline
    from reptok.convert import convert_official

    dup = P_DEC + "encoder.dino.model."
    sd32 = {k[len(dup):]: v for k, v in plain_ckpt["state_dict"].items() if k.startswith(dup)}
    ckpt = _write_variant(plain_ckpt, tmp_path / "fp32.ckpt", lambda sd: sd.update({P_DINO + k: v for k, v in sd32.items()}))
    convert_official(ckpt, tmp_path / "run", **_opts())
    enc = Pipeline.from_run(tmp_path / "run", components=("encoder",)).encoder
    img = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert (enc(img) - _dinov2_reference(sd32, img, HEADS)).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def plain_ckpt():
    return torch.load(FIX / "official_tiny.ckpt", map_location="cpu", weights_only=False)


def _write_variant(ckpt: dict, path: Path, edit) -> Path:
    ck = dict(ckpt)
    ck["state_dict"] = dict(ckpt["state_dict"])
    edit(ck["state_dict"])
    torch.save(ck, path)
    return path


QKV1 = P_DEC + "backbone.mid_level.1.self_attn.qkv_proj.weight"


@needs_fix
@pytest.mark.parametrize("name,edit,expect", [
    ("missing", lambda sd: sd.pop(QKV1), f"missing key '{QKV1}'"),
    ("shape", lambda sd: sd.__setitem__(QKV1, torch.zeros(287, 96)), f"'{QKV1}' has shape (287, 96), expected (288, 96)"),
    ("unknown", lambda sd: sd.__setitem__(P_DEC + "extra.weight", torch.zeros(3)), f"unknown key '{P_DEC}extra.weight'"),
    ("gen_missing", lambda sd: sd.pop("ema_model.net.mixer._orig_mod.2.1.fn.3.bias"), "ema_model.net.mixer._orig_mod.2.1.fn.3.bias"),
    ("vae_shape", lambda sd: sd.__setitem__(P_DEC + "ae.ae.decoder.conv_in.weight", torch.zeros(16, 4, 3, 1)),
     P_DEC + "ae.ae.decoder.conv_in.weight"),
])
@needs_fix
def test_corrupt_checkpoints_fail_cleanly(plain_ckpt, tmp_path, name, edit, expect):
    ckpt = _write_variant(plain_ckpt, tmp_path / f"{name}.ckpt", edit)
    out = tmp_path / "out"
    r = _convert_cli(ckpt, out)
    assert r.exit_code == 2, r.output
    assert expect in r.output
    assert len(r.output.strip().splitlines()) == 1 or "error:" in r.output.strip().splitlines()[-1]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@needs_fix
def test_not_a_checkpoint(tmp_path):
    cases = {
        "random.ckpt": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "config.json": lambda p: p.write_text(json.dumps({"state_dict": {}})),
        "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
        "nolightning.pt": lambda p: torch.save({"weights": {"a": torch.zeros(1)}}, p),
        "foreign.ckpt": lambda p: torch.save({"state_dict": {"a.weight": torch.zeros(1)}}, p),
    }
    for name, make in cases.items():
        make(tmp_path / name)
        r = _convert_cli(tmp_path / name, tmp_path / "out")
        assert r.exit_code == 2, (name, r.output)
        assert "error:" in r.output
    assert _convert_cli(tmp_path / "missing.ckpt", tmp_path / "out").exit_code == 2


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@needs_fix
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {P_DEC + "time_emb.weight": torch.zeros(3)}, "hyper_parameters": _Evil(marker)}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        # a plain pickle (torch.load's legacy path); no tensors: pickled storages would name
        # torch.storage._load_from_bytes, itself refused (it runs an unrestricted torch.load)
        payload["state_dict"] = {}
        path.write_bytes(pickle.dumps(payload, protocol=2))
    r = _convert_cli(path, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "refusing to unpickle" in r.output and "system" in r.output
    assert not marker.exists()


@needs_fix
def test_out_directory_rules(converted, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _convert_cli(FIX / "official_tiny.ckpt", out)
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "keep.txt").exists()
    r = _convert_cli(FIX / "official_tiny.ckpt", out, "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    r = _convert_cli(FIX / "official_tiny.ckpt", tmp_path / "p", "--weights-dtype", "fp8")
    assert r.exit_code == 2 and "--weights-dtype" in r.output


# ----------------------------------------------------------------------------- XL layout (meta tensors)
def test_xl_layout_infers_the_released_sizes():
    """The released layout at full size, as meta tensors (no memory): every size is inferred
    (encoder heads 768 // 64 = 12, SD-VAE config, decoder = the xl preset, generator = best guess)."""
    import timm
    from diffusers import AutoencoderKL

    from reptok.convert import layout as O
    from reptok.convert.decoder import convert_decoder
    from reptok.convert.encoder import convert_encoder
    from reptok.convert.generator import convert_generator
    from reptok.convert.official import _ignored_group
    from reptok.convert.vae import convert_vae
    from reptok.models.vae import SD_VAE_CONFIG
    from reptok.convert.keymaps import decoder_key_map
    from reptok.models.decoder import FlowDecoder
    from reptok.models.generator import TokenGenerator
    from reptok.presets import get_preset

    cfg = get_preset("xl")
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
        dec, gen, vae = FlowDecoder(cfg.decoder), TokenGenerator(cfg.generator), AutoencoderKL(**SD_VAE_CONFIG)
    vs = vit.state_dict()
    dino = {k: v for k, v in vs.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    dino.update(cls_token=torch.empty(1, 1, 768, device="meta"), register_tokens=vs["reg_token"],
                pos_embed=torch.empty(1, 1370, 768, device="meta"), mask_token=torch.empty(1, 768, device="meta"))
    sd = {p + k: v for p in (O.P_DINO, O.P_DINO_FP32, O.P_DINO_TARGET) for k, v in dino.items()}
    ds = dec.state_dict()
    sd.update({O.P_DEC + off: ds[ours] for ours, off in decoder_key_map(cfg.decoder.depth).items()})
    sd.update({O.P_VAE + k: v for k, v in vae.state_dict().items()})
    sd.update({p + k.replace("mixer.", "mixer._orig_mod."): v for p in (O.P_GEN_EMA, O.P_GEN_RAW)
               for k, v in gen.state_dict().items() if not k.startswith("token_")})
    sd["metric_tracker.fid.inception.fc.weight"] = torch.empty(3, device="meta")
    src = O.Keys(sd, "xl")
    ecfg, enc = convert_encoder(src, heads=None, patch=None, img_size=224, model=cfg.encoder.model, notes=[])
    assert ecfg.overrides == {} and ecfg.dim == 768 and enc["vit.pos_embed"].shape == (1, 256, 768)
    vm, _ = convert_vae(src, vae_config=None, norm_groups=None, image_size=256)
    assert {k: vm.config[k] for k in SD_VAE_CONFIG if k not in ("down_block_types", "up_block_types")} == \
        {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in SD_VAE_CONFIG.items()
         if k not in ("down_block_types", "up_block_types")}
    dcfg, _ = convert_decoder(src, latent_channels=4, input_size=32, token_dim=768)
    gcfg, _ = convert_generator(src, prefix=O.P_GEN_EMA, hp={}, token_dim=768, scale_factor=1.0)
    assert dcfg == cfg.decoder and gcfg == cfg.generator
    assert [k for k in sd if k not in src.used and _ignored_group(k, O.P_GEN_RAW) is None] == []
