"""End-to-end stage (a) and (b) on the tiny preset through the CLI: train, resume, extract,
reconstruct, interpolate, train gen, sample to every output kind, sharding, bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from reptok_cli.app import app

from clihelp import cli, last_json  # noqa: E402

runner = CliRunner()




@pytest.fixture(scope="session")
def work(class_runs):
    """The shared tiny chain (tests/conftest.py): data, tok, tokens.npy, gen."""
    return class_runs


# ----------------------------------------------------------------------------- stage (a)
def test_recon_run_layout(work):
    tok = work / "tok"
    for name in ("config.json", "model.safetensors", "ema.safetensors", "train_state.pt", "metrics.jsonl"):
        assert (tok / name).exists(), name
    assert sorted(p.name for p in (tok / "samples").iterdir()) == ["recon_0000003.png", "recon_0000006.png"]
    rows = [json.loads(line) for line in (tok / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all(np.isfinite(r["loss"]) for r in rows)
    # Only the cls token moved in the encoder: the frozen backbone is bit-identical to init.
    w = load_file(str(tok / "model.safetensors"))
    assert not torch.equal(w["encoder.vit.cls_token"], w["encoder.cls_token_frozen"])
    from reptok.models.encoder import SSLEncoder
    from reptok.presets import get_preset

    fresh = SSLEncoder(get_preset("tiny").encoder).state_dict()
    assert torch.equal(w["encoder.vit.blocks.0.attn.qkv.weight"], fresh["vit.blocks.0.attn.qkv.weight"])


def test_resume_equals_uninterrupted(work, tmp_path):
    common = ["--data", work / "data", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 3,
              "--sample-every", 0, "--json"]
    cli("train", "recon", "--out", tmp_path / "a", "--steps", 6, *common)
    cli("train", "recon", "--out", tmp_path / "b", "--steps", 3, *common)
    cli("train", "recon", "--out", tmp_path / "b", "--steps", 6, "--resume", *common)
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    key = lambda rows: {r["step"]: (r["loss"], r["rf"], r["cos"]) for r in rows}  # noqa: E731
    ka, kb = key(la), key(lb)
    assert set(ka) <= set(kb) and 6 in ka
    assert all(ka[s] == kb[s] for s in ka)
    wa, wb = load_file(str(tmp_path / "a" / "ema.safetensors")), load_file(str(tmp_path / "b" / "ema.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_needs_resume(work):
    res = cli("train", "recon", "--data", work / "data", "--out", work / "tok", "--preset", "tiny", code=2)
    assert "--resume" in res.output


def test_nan_loss_stops_and_keeps_checkpoint(work, tmp_path, monkeypatch):
    from reptok.train import recon

    real = recon.ReconTask.forward
    calls = {"n": 0}

    def poisoned(self, batch, noise):
        calls["n"] += 1
        loss, m = real(self, batch, noise)
        return (loss * float("nan"), m) if calls["n"] > 4 else (loss, m)

    monkeypatch.setattr(recon.ReconTask, "forward", poisoned)
    res = cli("train", "recon", "--data", work / "data", "--out", tmp_path / "r", "--preset", "tiny", "--steps", 8,
              "--ckpt-every", 2, "--sample-every", 0, code=1)
    assert "nan" in res.output.lower() and "step 4" in res.output
    state = torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)
    assert state["step"] == 4


def test_freeze_token_keeps_ssl_token(work, tmp_path):
    cli("train", "recon", "--data", work / "data", "--out", tmp_path / "f", "--preset", "tiny", "--steps", 2,
        "--freeze-token", "--sample-every", 0)
    w = load_file(str(tmp_path / "f" / "model.safetensors"))
    assert torch.equal(w["encoder.vit.cls_token"], w["encoder.cls_token_frozen"])


def test_extract_shapes_order_sidecar(work):
    from reptok.pipeline import Pipeline
    from reptok.data.dataset import PreparedDataset
    from reptok.extract import load_tokens

    t = load_tokens(work / "tokens.npy")
    assert t["tokens"].shape == (48, 32) and t["tokens"].dtype == np.float32
    ds = PreparedDataset(work / "data")
    assert np.array_equal(t["labels"], ds.labels)
    meta = t["meta"]
    assert meta["checkpoint"] == str((work / "tok").resolve()) and len(meta["mean"]) == 32
    pipe = Pipeline.from_run(work / "tok", components=("encoder",))
    direct = pipe.encode(torch.as_tensor(ds.get_batch([5, 17])["image"])).numpy()
    np.testing.assert_allclose(t["tokens"][[5, 17]], direct, atol=1e-5)
    np.testing.assert_allclose(meta["std"], t["tokens"].std(0), rtol=1e-4)


def test_reconstruct_and_interpolate_write_images(work, tmp_path):
    from PIL import Image

    from reptok.data.dataset import PreparedDataset

    ds = PreparedDataset(work / "data")
    for i in range(2):
        Image.fromarray(ds.get_uint8([i])[0]).save(tmp_path / f"img{i}.png")
    res = cli("reconstruct", tmp_path / "img0.png", tmp_path / "img1.png", "--ckpt", work / "tok", "--out",
              tmp_path / "rec", "--decoder-steps", 3, "--json")
    out = last_json(res)
    assert len(out["images"]) == 2 and all(Path(r["out"]).exists() for r in out["images"])
    assert np.isfinite(out["mean_psnr"])
    res = cli("interpolate", tmp_path / "img0.png", tmp_path / "img1.png", "--ckpt", work / "tok", "--frames", 4,
              "--out", tmp_path / "ab.png", "--decoder-steps", 2)
    assert Image.open(tmp_path / "ab.png").size[0] > 4 * 32
    assert res.stderr.startswith("interpolating with torch fp32 eager on cpu"), res.stderr  # the fast path, as reconstruct


def test_slerp_endpoints():
    from reptok.pipeline import slerp

    a, b = torch.randn(16), torch.randn(16)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)


# ----------------------------------------------------------------------------- stage (b)
def test_gen_run_records_tokenizer(work):
    doc = json.loads((work / "gen" / "config.json").read_text())
    assert doc["kind"] == "generator" and doc["tokenizer_run"] == str((work / "tok").resolve())
    w = load_file(str(work / "gen" / "ema.safetensors"))
    assert set(k.split(".")[0] for k in w) == {"generator"}
    assert doc["pipeline"]["generator"]["num_classes"] == 12  # from the dataset, not the preset


def test_gen_loss_falls(tmp_path, work):
    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "g", "--preset", "tiny", "--steps", 60,
        "--set", "train.log_every=5", "--json")
    rows = [json.loads(x)["loss"] for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(rows[-3:]) < np.mean(rows[:2])


@pytest.mark.parametrize("out", ["s.npz", "grid.png", "pngs"])
def test_sample_each_output_kind(work, tmp_path, out):
    res = cli("sample", "--ckpt", work / "gen", "--class", "0,3", "-n", 2, "--out", tmp_path / out, "--json")
    summary = last_json(res)
    assert summary["images"] == 4
    target = tmp_path / out
    if out.endswith(".npz"):
        z = np.load(target)
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 0, 3, 3]
    elif out.endswith(".png"):
        assert target.exists()
    else:
        assert sorted(p.name for p in target.iterdir()) == [".reptok-sample.json",  # the folder's manifest
            "000000_class0000.png", "000001_class0000.png", "000002_class0003.png", "000003_class0003.png"]


def test_shards_equal_one_run(work, tmp_path):
    base = ["sample", "--ckpt", work / "gen", "--class", "0-2", "-n", 2, "--seed", 7, "--batch-size", 4]
    cli(*base, "--out", tmp_path / "all.npz")
    cli(*base, "--start", 0, "--count", 4, "--out", tmp_path / "a.npz")
    cli(*base, "--start", 4, "--count", 2, "--out", tmp_path / "b.npz", "--batch-size", 1)
    full = np.load(tmp_path / "all.npz")
    parts = [np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")]
    assert np.array_equal(full["arr_0"], np.concatenate([p["arr_0"] for p in parts]))
    assert np.array_equal(full["arr_1"], np.concatenate([p["arr_1"] for p in parts]))


def test_folder_output_resumes(work, tmp_path):
    args = ["sample", "--ckpt", work / "gen", "--class", "1", "-n", 3, "--out", tmp_path / "p", "--json"]
    first = last_json(cli(*args))
    (tmp_path / "p" / "000001_class0001.png").unlink()
    again = last_json(cli(*args))
    assert first["generated"] == 3 and again["generated"] == 1 and again["skipped_existing"] == 2


def test_cfg_changes_samples_and_interval_respected(work, tmp_path):
    base = ["sample", "--ckpt", work / "gen", "--class", "2", "-n", 2, "--steps", 10, "--decoder-steps", 2]
    cli(*base, "--cfg", 1.0, "--out", tmp_path / "c1.npz")
    cli(*base, "--cfg", 20.0, "--out", tmp_path / "c4.npz")  # tiny, barely trained: a strong scale
    cli(*base, "--cfg", 20.0, "--cfg-interval", "1,1", "--out", tmp_path / "c4_outside.npz")  # never reached by Euler
    c1, c4, c4o = (np.load(tmp_path / f)["arr_0"] for f in ("c1.npz", "c4.npz", "c4_outside.npz"))
    # CFG changes the sampled tokens. (Compared as tokens: the 6-step tiny decoder barely reads the
    # token, so the uint8 images of the two scales may round to the same pixels; they differed by
    # chance with the per-dim token normalisation, and by < 1/255 with the scalar default.)
    from reptok.pipeline import Pipeline
    from reptok.pipeline import STREAM_GENERATOR, index_noise

    pipe = Pipeline.from_run(work / "gen", components=("generator",))
    g = pipe.cfg.generator
    noise = index_noise(0, [0, 1], (g.n_tokens, g.token_dim), STREAM_GENERATOR)
    z1, z4 = (pipe.generate(torch.tensor([2, 2]), noise, pipe.sampler_args(steps=10, guidance_scale=c)) for c in (1.0, 20.0))
    assert (z1 - z4).abs().max() > 1e-2
    assert np.array_equal(c1, c4o)  # an interval that contains no step means no guidance


@pytest.mark.parametrize("args,needle", [
    (["--class", "99"], "outside the model's classes"),
    (["--class", "a-b"], "expected an id"),
    (["--ckpt-missing"], "not a reptok run"),
])
def test_bad_sample_inputs_exit_2_and_write_nothing(work, tmp_path, args, needle):
    ckpt = work / "gen"
    if args == ["--ckpt-missing"]:
        ckpt, args = tmp_path / "nope", []
    res = cli("sample", "--ckpt", ckpt, "--out", tmp_path / "o", *args, code=2)
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_unwritable_out_exit_2(work, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("sample", "--ckpt", work / "gen", "--out", blocker / "sub" / "s.npz", code=2)
    assert "not a writable folder" in res.output


def test_token_lr_scale_moves_the_cls_token_further(work, tmp_path):
    """One AdamW step moves each parameter by about lr: the cls token by lr * token_lr_scale."""
    moved = {}
    for scale in (1, 10):
        run = tmp_path / f"s{scale}"
        cli("train", "recon", "--data", work / "data", "--out", run, "--preset", "tiny", "--steps", 1,
            "--batch-size", 8, "--sample-every", 0, "--lr", 1e-3, "--token-lr-scale", scale, "--json")
        w = load_file(str(run / "model.safetensors"))
        moved[scale] = (w["encoder.vit.cls_token"] - w["encoder.cls_token_frozen"]).abs().max().item()
        assert json.loads((run / "config.json").read_text())["pipeline"]["train"]["token_lr_scale"] == scale
    assert 0.5e-3 < moved[1] <= 1.01e-3 and moved[10] == pytest.approx(10 * moved[1], rel=0.05)
    res = cli("train", "recon", "--data", work / "data", "--out", tmp_path / "bad", "--preset", "tiny",
              "--token-lr-scale", 0, code=2)
    assert "--token-lr-scale" in res.output and not (tmp_path / "bad").exists()  # the option, by its name


def test_resume_may_change_token_lr_scale(work, tmp_path):
    common = ["--data", work / "data", "--preset", "tiny", "--batch-size", 8, "--sample-every", 0, "--json"]
    cli("train", "recon", "--out", tmp_path / "r", "--steps", 2, "--ckpt-every", 2, *common)
    cli("train", "recon", "--out", tmp_path / "r", "--steps", 4, "--resume", "--token-lr-scale", 10, *common)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["pipeline"]["train"]["token_lr_scale"] == 10
    state = torch.load(tmp_path / "r" / "train_state.pt", weights_only=False)
    assert sorted(g["lr_scale"] for g in state["optimizer"]["param_groups"]) == [1.0, 10.0]
