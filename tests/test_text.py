"""Text-to-image on the tiny preset, offline: captions through extract, the tiny text encoder,
the text-conditioned generator (training, resume, CFG with the empty prompt, ONNX tracing),
``reptok sample --prompt/--prompts`` and swapping the text encoder without touching the tokenizer."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from reptok_cli.app import app

from clihelp import cli, last_json  # noqa: E402

runner = CliRunner()




def digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def work(text_runs):
    """The shared tiny chain with its text-to-image generator t2i (tests/conftest.py)."""
    return text_runs


def tiny_text_cfg(**kw):
    from reptok.presets import get_preset

    base = dict(num_classes=0, text_encoder="tiny", text_dim=64, text_len=32)
    return dataclasses.replace(get_preset("tiny").generator, **{**base, **kw})


# ----------------------------------------------------------------------------- captions, encoder
def test_captions_flow_through_extract(work):
    from reptok.data.dataset import PreparedDataset
    from reptok.shapes.render import caption_class
    from reptok.extract import load_tokens

    t = load_tokens(work / "tokens.npy")
    ds = PreparedDataset(work / "data")
    assert t["meta"]["captions_file"] == "tokens.captions.json"
    assert t["captions"] == ds.captions(list(range(48)))
    assert [caption_class(c) for c in t["captions"]] == t["labels"].tolist()
    summary = json.loads((work / "t2i_summary.json").read_text())
    assert summary["unique_captions"] == len(set(t["captions"])) + 1  # + the empty prompt


def test_tiny_text_encoder_offline():
    from reptok.models.text import build_text_encoder, canonical_spec

    enc = build_text_encoder("tiny")
    assert (enc.dim, enc.max_len, enc.spec, enc.stores_weights) == (64, 32, "tiny", True)
    assert not any(p.requires_grad for p in enc.parameters())
    hidden, mask = enc.encode(["a red circle", "", "a large red bar in the top left on a grey background"])
    assert hidden.shape == (3, 32, 64) and hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 2, 14]  # [sot] words [eot]; "" is [sot, eot]
    assert mask[:, 0].all() and not mask[0, 5:].any()
    again = build_text_encoder("tiny:seed=0")
    assert again.spec == "tiny" and torch.allclose(again.encode(["a red circle"])[0], hidden[:1], atol=1e-5)
    other = build_text_encoder("tiny:seed=1,width=48")
    assert other.spec == "tiny:width=48,seed=1" and other.encode([""])[0].shape == (1, 32, 48)
    # Causal tower: a prompt's states do not depend on what follows it.
    h2, _ = enc.encode(["a red circle on a white background"])
    assert torch.allclose(h2[0, :3], hidden[0, :3], atol=1e-5)
    assert canonical_spec("clip:ViT-B-32") == "open_clip:ViT-B-32:openai"
    assert canonical_spec("ViT-B-32") == "open_clip:ViT-B-32:openai"
    assert canonical_spec("some-org/some-lm") == "hf:some-org/some-lm"


def test_bad_text_encoder_specs():
    from reptok.errors import InputError
    from reptok.models.text import build_text_encoder

    with pytest.raises(InputError, match="KEY=INT"):
        build_text_encoder("tiny:depth=3")
    with pytest.raises(InputError, match="not divisible"):
        build_text_encoder("tiny:width=30,heads=4")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="transformers"):
            build_text_encoder("hf:bert-base-uncased")


# ----------------------------------------------------------------------------- the generator
def test_text_generator_forward_and_layout():
    from reptok.errors import InputError
    from reptok.models import build_generator
    from reptok.models.generator import TokenGenerator
    from reptok.models.text_generator import TextCondition

    torch.manual_seed(0)
    g = build_generator(tiny_text_cfg()).eval()
    assert isinstance(g.condition, TextCondition) and g.seq_len == 1 + 4 + 1
    torch.nn.init.normal_(g.mixer[-1].weight, std=0.1)
    keys = {k.split(".")[0] for k in g.state_dict()}
    assert keys == {"pos_embed", "t_embedder", "mixer", "token_mean", "token_std", "text_queries", "text_norm",
                    "text_proj", "cross"}
    x, t, text = torch.randn(3, 1, 32), torch.rand(3), torch.randn(3, 32, 64)
    mask = torch.zeros(3, 32, dtype=torch.bool)
    mask[:, :6] = True
    v = g(x, t, text, mask)
    assert v.shape == (3, 1, 32)
    junk = text.clone()
    junk[:, 6:] = 1e3
    assert torch.equal(g(x, t, junk, mask), v)  # padding is invisible
    assert torch.equal(g(x, t, text, mask.float()), v)  # float masks work (ONNX inputs)
    other = text.clone()
    other[:, 2] += 1
    assert not torch.allclose(g(x, t, other, mask), v)  # the text matters
    empty = torch.zeros_like(mask)
    assert torch.isfinite(g(x, t, text, empty)).all()
    # One generator class: the config picks the condition module (was: a separate subclass).
    assert isinstance(TokenGenerator(tiny_text_cfg()).condition, TextCondition)
    assert g.null(2) == ["", ""] and g.null_class is None
    with pytest.raises(InputError, match="text of shape"):
        g(x, t, torch.randn(3, 32, 48), mask)


def test_text_generator_traces_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from reptok.models import build_generator

    torch.manual_seed(0)
    g = build_generator(tiny_text_cfg()).eval()
    torch.nn.init.normal_(g.mixer[-1].weight, std=0.1)
    names = ["x", "t", "text", "text_mask"]
    args = (torch.randn(2, 1, 32), torch.rand(2), torch.randn(2, 32, 64), torch.rand(2, 32) > 0.5)
    torch.onnx.export(g, args, str(tmp_path / "g.onnx"), dynamo=False, opset_version=17, input_names=names,
                      output_names=["v"], dynamic_axes={n: {0: "batch"} for n in names + ["v"]})
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    feed = (torch.randn(5, 1, 32), torch.rand(5), torch.randn(5, 32, 64), torch.rand(5, 32) > 0.5)
    out = sess.run(None, {n: a.numpy() for n, a in zip(names, feed)})[0]
    np.testing.assert_allclose(out, g(*feed).detach().numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- training
def test_text_run_layout_and_loss_falls(work):
    doc = json.loads((work / "t2i" / "config.json").read_text())
    g = doc["pipeline"]["generator"]
    assert doc["tokenizer_run"] == str((work / "tok").resolve())
    assert (g["text_encoder"], g["text_dim"], g["text_len"], g["num_classes"]) == ("tiny", 64, 32, 0)
    w = load_file(str(work / "t2i" / "ema.safetensors"))
    assert {k.split(".")[0] for k in w} == {"generator", "text_encoder"}
    from reptok.models.text import build_text_encoder

    fresh = build_text_encoder("tiny").state_dict()
    assert all(torch.equal(w[f"text_encoder.{k}"], v) for k, v in fresh.items())  # frozen
    rows = [json.loads(x)["loss"] for x in (work / "t2i" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(rows[-3:]) < np.mean(rows[:2])


def test_text_resume_equals_uninterrupted(work, tmp_path):
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--text-encoder", "tiny:seed=3",
              "--ckpt-every", 3, "--set", "train.log_every=1"]
    cli("train", "gen", "--out", tmp_path / "a", "--steps", 6, *common)
    cli("train", "gen", "--out", tmp_path / "b", "--steps", 3, *common)
    cli("train", "gen", "--out", tmp_path / "b", "--steps", 6, "--resume", *common)
    wa, wb = load_file(str(tmp_path / "a" / "ema.safetensors")), load_file(str(tmp_path / "b" / "ema.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- sampling
def test_sample_prompts_npz_folder_and_file(work, tmp_path):
    prompts = ["a red circle", "a blue ring"]
    res = cli("sample", "--ckpt", work / "t2i", "--prompt", prompts[0], "--prompt", prompts[1], "-n", 2,
              "--out", tmp_path / "s.npz", "--json")
    assert last_json(res)["images"] == 4
    z = np.load(tmp_path / "s.npz")
    assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [0, 0, 1, 1] and z["prompts"].tolist() == prompts
    (tmp_path / "p.txt").write_text("a red circle\n\na blue ring\n")
    cli("sample", "--ckpt", work / "t2i", "--prompts", tmp_path / "p.txt", "-n", 2, "--out", tmp_path / "pngs")
    files = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert files == [".reptok-sample.json", "000000_prompt0000.png", "000001_prompt0000.png", "000002_prompt0001.png",
                     "000003_prompt0001.png", "prompts.txt"]
    assert (tmp_path / "pngs" / "prompts.txt").read_text().splitlines() == prompts
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000002_prompt0001.png")), z["arr_0"][2])
    cli("sample", "--ckpt", work / "t2i", "--prompt", "a green cross", "-n", 3, "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").exists()


def test_cfg_with_the_empty_prompt(work):
    from reptok import flow
    from reptok.pipeline import Pipeline
    from reptok.pipeline import index_noise

    pipe = Pipeline.from_run(work / "t2i", components=("generator",))
    assert pipe.is_text and pipe.text_encoder.spec == "tiny"
    prompts = ["a red circle", "a blue cross", "a red circle"]
    noise = index_noise(0, range(3), (1, 32), 0)
    kw = dict(steps=6, cfg_interval=None)
    plain = pipe.generate(prompts, noise, pipe.sampler_args(guidance_scale=1.0, **kw))
    hidden, mask = pipe.text_encoder.encode(prompts)
    x = flow.solve(lambda x, t: pipe.generator(x, t, hidden, mask), noise, 6)
    assert torch.allclose(plain, pipe.generator.denormalize(x), atol=1e-5)  # cfg 1 = plain conditional
    guided = pipe.generate(prompts, noise, pipe.sampler_args(guidance_scale=3.0, **kw))
    assert not torch.allclose(guided, plain, atol=1e-4)
    null_h, null_m = pipe.text_encoder.encode([""] * 3)

    def manual(x, t):
        v_c, v_u = pipe.generator(x, t, hidden, mask), pipe.generator(x, t, null_h, null_m)
        return v_u + 3.0 * (v_c - v_u)

    assert torch.allclose(guided, pipe.generator.denormalize(flow.solve(manual, noise, 6)), atol=1e-4)
    # Duplicate prompts share a table row; each image still gets its own prompt's states.
    alone = pipe.generate(["a blue cross"], noise[1:2], pipe.sampler_args(guidance_scale=3.0, **kw))
    assert torch.allclose(alone, guided[1:2], atol=1e-5)


def test_swapping_text_encoder_changes_only_the_generator(work, tmp_path):
    before = digest(work / "tok")
    cli("train", "gen", "--tokens", work / "tokens.npy", "--out", tmp_path / "g48", "--preset", "tiny", "--steps", 4,
        "--text-encoder", "tiny:seed=1,width=48")
    assert digest(work / "tok") == before
    a = json.loads((work / "t2i" / "config.json").read_text())
    b = json.loads((tmp_path / "g48" / "config.json").read_text())
    assert a["tokenizer_run"] == b["tokenizer_run"] == str((work / "tok").resolve())
    strip = lambda d: {k: v for k, v in d["pipeline"].items() if k not in ("generator", "train")}  # noqa: E731
    assert strip(a) == strip(b)  # encoder, decoder, VAE, sampling: the same tokenizer
    assert b["pipeline"]["generator"]["text_encoder"] == "tiny:width=48,seed=1"
    assert b["pipeline"]["generator"]["text_dim"] == 48
    wb = load_file(str(tmp_path / "g48" / "ema.safetensors"))
    assert wb["generator.text_proj.weight"].shape == (64, 48) and wb["text_encoder.tower.ln_final.weight"].shape == (48,)
    from reptok.pipeline import Pipeline

    pa, pb = Pipeline.from_run(work / "t2i"), Pipeline.from_run(tmp_path / "g48")
    from reptok.pipeline import load_text_encoder

    te = load_text_encoder(tmp_path / "g48")  # what a runtime (ONNX / TRT) pipeline would use
    assert te.spec == "tiny:width=48,seed=1"
    assert all(torch.equal(v, pb.text_encoder.state_dict()[k]) for k, v in te.state_dict().items())
    da, db = pa.decoder.state_dict(), pb.decoder.state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)
    cli("sample", "--ckpt", tmp_path / "g48", "--prompt", "a red circle", "--out", tmp_path / "s.npz")


# ----------------------------------------------------------------------------- bad combinations
@pytest.fixture(scope="module")
def class_run(work):
    """The session's class generator on the same tokens, read only (never written into)."""
    return work / "gen"


def test_class_run_has_no_text_encoder(class_run):
    from reptok.pipeline import Pipeline, load_text_encoder

    assert load_text_encoder(class_run) is None
    pipe = Pipeline.from_run(class_run, components=("generator",))
    assert not pipe.is_text and pipe.text_encoder is None


@pytest.mark.parametrize("case,needle", [
    ("class_on_text", "not --class"),
    ("no_prompt", "needs --prompt"),
    ("prompt_on_class", "not a text-to-image run"),
    ("prompts_missing", "no such file"),
    ("prompts_empty", "has no prompts"),
])
def test_bad_sample_combinations_exit_2(work, class_run, tmp_path, case, needle):
    (tmp_path / "empty.txt").write_text("\n\n")
    t2i = work / "t2i"
    args = {
        "class_on_text": [t2i, "--class", "1"],
        "no_prompt": [t2i],
        "prompt_on_class": [class_run, "--prompt", "a red circle"],
        "prompts_missing": [t2i, "--prompts", tmp_path / "nope.txt"],
        "prompts_empty": [t2i, "--prompts", tmp_path / "empty.txt"],
    }[case]
    res = cli("sample", "--ckpt", args[0], *args[1:], "--out", tmp_path / "o.npz", code=2)
    assert needle in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("case,needle", [
    ("no_captions", "no captions"),
    ("num_classes", "no classes"),
    ("dropout_without_text", "--text-encoder"),
    ("bad_spec", "KEY=INT"),
])
def test_bad_train_combinations_exit_2(work, tmp_path, case, needle):
    tokens = work / "tokens.npy"
    extra = ["--text-encoder", "tiny"]
    if case == "no_captions":
        for f in ("tokens.npy", "tokens.json", "tokens.labels.npy"):
            shutil.copy(work / f, tmp_path / f)
        tokens = tmp_path / "tokens.npy"
    elif case == "num_classes":
        extra += ["--num-classes", "12"]
    elif case == "dropout_without_text":
        extra = ["--caption-dropout", "0.2"]
    else:
        extra = ["--text-encoder", "tiny:depth=9"]
    res = cli("train", "gen", "--tokens", tokens, "--out", tmp_path / "g", "--preset", "tiny", "--steps", 2,
              *extra, code=2)
    assert needle in res.output
    assert not (tmp_path / "g").exists()
