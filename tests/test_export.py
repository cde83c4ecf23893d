"""ONNX export, the ONNX Runtime / TensorRT backends and ``reptok bench`` (CPU; TRT skips).

Runs are the tiny preset with random weights (zero-init output layers randomized, so parity is
not vacuous), saved with the real run-directory format; a second run adds a tiny diffusers
AutoencoderKL (downsample 2) as ``vae/`` so ``vae_decoder.onnx`` is covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reptok import run as rundir
from reptok.bench import randomize_weights
from reptok.config import VAEConfig
from reptok.pipeline import Pipeline
from reptok.presets import get_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[8, 16], act_fn="silu", sample_size=32,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
)
HAS_TRT = torch.cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None


def _write_run(run: Path, cfg, seed: int = 0) -> Path:
    """A "pipeline" run: random encoder / decoder / generator (+ token statistics)."""
    pipe = Pipeline.build(cfg, components=("encoder", "decoder", "generator"))
    randomize_weights(pipe.decoder, seed)
    randomize_weights(pipe.generator, seed + 1)
    g = torch.Generator().manual_seed(seed)
    d = cfg.generator.token_dim
    pipe.generator.set_token_stats(0.5 * torch.randn(d, generator=g), 0.5 + torch.rand(d, generator=g))
    rundir.write_run_config(run, cfg, "pipeline")
    rundir.save_weights(run, {"encoder": pipe.encoder, "decoder": pipe.decoder, "generator": pipe.generator})
    return run


def _vae_cfg():
    cfg = get_preset("tiny")
    cfg.vae = VAEConfig(source="vae", latent_channels=4, downsample=2)
    cfg.decoder.in_channels, cfg.decoder.input_size = 4, cfg.image_size // 2
    return cfg.validate()


def _sample(p, labels, indices, seed):
    """Both stages on the (seed, index) noise, raw (unclamped) images, the run's sampler settings."""
    args = p.sampler_args()
    z = p.generate(labels, p.generator_noise(indices, seed), args)
    return p.decode(z, p.decoder_noise(indices, seed), args)


def _cli(*args):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("run") / "tiny", get_preset("tiny"))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from diffusers import AutoencoderKL

    run = tmp_path_factory.mktemp("run") / "tiny_vae"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(run / "vae")
    return _write_run(run, _vae_cfg(), seed=3)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_run, tmp_path_factory):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_run, out, components="generator,decoder,vae,encoder")
    return out


@pytest.fixture(scope="module")
def vae_onnx(vae_run, tmp_path_factory):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "vae"
    export_onnx(vae_run, out)
    return out


# ----------------------------------------------------------------------------- graphs + manifest
def test_graphs_pass_checker_and_manifest(tiny_run, tiny_onnx):
    import onnx

    m = json.loads((tiny_onnx / "manifest.json").read_text())
    assert set(m["graphs"]) == {"generator", "decoder", "encoder"}
    assert "pixel space" in m["skipped"]["vae"]
    for g in m["graphs"].values():
        onnx.checker.check_model(str(tiny_onnx / g["file"]))
        for io in g["inputs"] + g["outputs"]:
            assert io["shape"][0] == "batch"
        assert [v["batch"] for v in g["verify"]] == [1, 3]
        assert all(v["max_abs_err"] <= v["limit"] for v in g["verify"])
    assert m["source_run"] == str(tiny_run.absolute())
    assert m["config_sha256"] == hashlib.sha256((tiny_run / "config.json").read_bytes()).hexdigest()
    assert m["opset"] == 17 and m["dtype"] == "fp32" and m["cfg_in_graph"] is False
    gen = m["graphs"]["generator"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in gen["inputs"]] == [
        ("x", ["batch", 1, 32], "float32"), ("t", ["batch"], "float32"), ("y", ["batch"], "int64")]
    assert gen["outputs"] == [{"name": "v", "shape": ["batch", 1, 32], "dtype": "float32"}]
    dec = m["graphs"]["decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["x", "t", "token"]
    assert dec["outputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert m["graphs"]["encoder"]["outputs"][0]["shape"] == ["batch", 32]
    # generator statistics: what the runtime denormalises with
    ref = Pipeline.from_run(tiny_run, components=("generator",)).generator
    assert m["generator"]["null_class"] == ref.null_class == 10
    assert (m["generator"]["n_tokens"], m["generator"]["token_dim"]) == (1, 32)
    assert torch.equal(torch.tensor(m["generator"]["token_std"]), ref.token_std)
    assert torch.equal(torch.tensor(m["generator"]["token_mean"]), ref.token_mean)
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])


# ----------------------------------------------------------------------------- component parity
def _inputs(cfg, comp, batch, seed):
    g = torch.Generator().manual_seed(seed)
    d = cfg.decoder
    if comp == "generator":
        return (torch.randn(batch, 1, cfg.generator.token_dim, generator=g), torch.rand(batch, generator=g),
                torch.randint(0, cfg.generator.num_classes + 1, (batch,), generator=g))
    if comp == "decoder":
        return (torch.randn(batch, d.in_channels, d.input_size, d.input_size, generator=g),
                torch.rand(batch, generator=g), torch.randn(batch, d.token_dim, generator=g))
    if comp == "vae":
        return (torch.randn(batch, d.in_channels, d.input_size, d.input_size, generator=g),)
    return (torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("which,comp", [("tiny", "generator"), ("tiny", "decoder"), ("tiny", "encoder"),
                                        ("vae", "vae"), ("vae", "decoder")])
def test_ort_parity_per_component(which, comp, batch, request):
    from export.runtime import load_runtime_pipeline

    run = request.getfixturevalue(f"{which}_run")
    folder = request.getfixturevalue(f"{which}_onnx")
    ref = Pipeline.from_run(run)
    rt = load_runtime_pipeline(run, folder, backend="onnx", device="cpu")
    args = _inputs(ref.cfg, comp, batch, seed=10 + batch)
    with torch.no_grad():
        if comp == "vae":
            want, got = ref.latent.decode(*args), rt.latent.decode(*args)
        else:
            want, got = getattr(ref, comp)(*args), getattr(rt, comp)(*args)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert want.abs().max() > 1e-2  # not a vacuous (all-zero) comparison
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_runtime_generator_shim(tiny_run, tiny_onnx):
    from export.runtime import load_runtime_pipeline

    ref = Pipeline.from_run(tiny_run, components=("generator",)).generator
    rt = load_runtime_pipeline(tiny_run, tiny_onnx).generator
    x = torch.randn(4, 1, 32)
    assert rt.null_class == ref.null_class
    assert torch.allclose(rt.denormalize(x), ref.denormalize(x))
    assert rt.denormalize(x).shape == (4, 32)


# ----------------------------------------------------------------------------- whole samples
def test_sampled_images_onnx_vs_torch_cli(tiny_run, tiny_onnx, tmp_path):
    common = ["sample", "--ckpt", tiny_run, "--class", "0-2", "-n", "2", "--seed", "7", "--device", "cpu", "--json"]
    r1 = _cli(*common, "--out", tmp_path / "torch.npz")
    r2 = _cli(*common, "--out", tmp_path / "onnx.npz", "--backend", "onnx", "--engine", tiny_onnx)
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["backend"] == "onnx"
    a = np.load(tmp_path / "torch.npz")["arr_0"].astype(int)
    b = np.load(tmp_path / "onnx.npz")["arr_0"].astype(int)
    assert a.shape == b.shape == (6, 32, 32, 3)
    assert a.std() > 10  # real images, not a constant
    assert np.abs(a - b).max() <= 1  # uint8 rounding at most


@pytest.mark.parametrize("which", ["tiny", "vae"])
def test_sampled_images_float_parity(which, request):
    from export.runtime import load_runtime_pipeline

    run = request.getfixturevalue(f"{which}_run")
    ref = Pipeline.from_run(run, components=("decoder", "generator", "vae"))
    rt = load_runtime_pipeline(run, request.getfixturevalue(f"{which}_onnx"))
    labels = torch.tensor([0, 3, 9])
    want = _sample(ref, labels, [0, 1, 2], seed=5)
    got = _sample(rt, labels, [0, 1, 2], seed=5)
    assert got.shape == want.shape == (3, 3, 32, 32)
    assert (got - want).abs().max() <= 1e-3


def test_vae_manifest(vae_onnx):
    m = json.loads((vae_onnx / "manifest.json").read_text())
    assert set(m["graphs"]) == {"generator", "decoder", "vae"} and not m["skipped"]
    g = m["graphs"]["vae"]
    assert g["file"] == "vae_decoder.onnx"
    assert g["inputs"] == [{"name": "latents", "shape": ["batch", 4, 16, 16], "dtype": "float32"}]
    assert g["outputs"][0]["shape"] == ["batch", 3, 32, 32]


# ----------------------------------------------------------------------------- CLI + errors
def test_cli_export_json_and_refuses_nonempty(tiny_run, tmp_path):
    out = tmp_path / "x"
    r = _cli("export", "onnx", "--ckpt", tiny_run, "--out", out, "--components", "decoder", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc["graphs"]) == ["decoder"] and (out / "decoder.onnx").is_file()
    r = _cli("export", "onnx", "--ckpt", tiny_run, "--out", out, "--components", "decoder")
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = _cli("export", "onnx", "--ckpt", tiny_run, "--out", out, "--components", "generator", "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["generator.onnx", "manifest.json"]
    assert not list(tmp_path.glob(".x.*"))  # no temp folders left behind


def test_verification_failure_exits_1_and_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "bad"
    r = _cli("export", "onnx", "--ckpt", tiny_run, "--out", out, "--components", "decoder", "--atol", "0")
    assert r.exit_code == 1
    assert "decoder.onnx" in r.output and "max abs error" in r.output
    assert not out.exists() and not list(tmp_path.glob(".bad.*"))


def test_fp16_export_verifies(tiny_run, tmp_path):
    from export.onnx import export_onnx
    from export.runtime import OrtModule

    m = export_onnx(tiny_run, tmp_path / "h", components="decoder", dtype="fp16")
    g = m["graphs"]["decoder"]
    assert m["dtype"] == "fp16" and g["inputs"][0]["dtype"] == "float32"  # I/O stays fp32
    ref = Pipeline.from_run(tiny_run, components=("decoder",)).decoder
    x, t, tok = _inputs(get_preset("tiny"), "decoder", 2, 0)
    with torch.no_grad():
        want = ref(x, t, tok)
    got = OrtModule(tmp_path / "h" / "decoder.onnx", input_names=["x", "t", "token"])(x, t, tok)
    assert (got - want).abs().max() <= 3e-2 * max(1.0, float(want.abs().max()))


def test_large_graph_external_data_path(tiny_run, tmp_path, monkeypatch):
    """Graphs past protobuf's 2 GiB (xl decoder / generator) keep weights in one .data file."""
    import onnx

    import export.onnx as ex
    from export.runtime import OrtModule

    monkeypatch.setattr(ex, "_PROTO_LIMIT", 0)  # treat the tiny graph as "large"
    m = ex.export_onnx(tiny_run, tmp_path / "big", components="decoder")
    g = m["graphs"]["decoder"]
    assert g["external_data"] == "decoder.onnx.data"
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["decoder.onnx", "decoder.onnx.data", "manifest.json"]
    onnx.checker.check_model(str(tmp_path / "big" / "decoder.onnx"))
    x, t, tok = _inputs(get_preset("tiny"), "decoder", 2, 0)
    ref = Pipeline.from_run(tiny_run, components=("decoder",)).decoder
    with torch.no_grad():
        assert torch.allclose(OrtModule(tmp_path / "big" / "decoder.onnx", input_names=["x", "t", "token"])(x, t, tok),
                              ref(x, t, tok), atol=1e-4)


def test_mismatched_run_exits_2(tiny_run, tiny_onnx, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("model.safetensors",):
        (other / f).write_bytes((tiny_run / f).read_bytes())
    doc = json.loads((tiny_run / "config.json").read_text())
    doc["pipeline"]["sampling"]["steps"] = 3
    (other / "config.json").write_text(json.dumps(doc))
    r = _cli("sample", "--ckpt", other, "--out", tmp_path / "s.npz", "--backend", "onnx", "--engine", tiny_onnx,
             "--device", "cpu")
    assert r.exit_code == 2
    assert "exported from another run" in r.output
    r = _cli("sample", "--ckpt", tiny_run, "--out", tmp_path / "s.npz", "--backend", "onnx", "--engine", tmp_path)
    assert r.exit_code == 2 and "manifest.json" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_trt_without_cuda_exits_2(tiny_run, tiny_onnx, tmp_path):
    r = _cli("export", "trt", "--onnx", tiny_onnx, "--out", tmp_path / "trt")
    assert r.exit_code == 2 and "CUDA" in r.output
    assert not (tmp_path / "trt").exists()
    r = _cli("sample", "--ckpt", tiny_run, "--out", tmp_path / "s.npz", "--backend", "trt", "--engine", tiny_onnx)
    assert r.exit_code == 2 and "CUDA" in r.output
    r = _cli("bench", "--preset", "tiny", "--backend", "trt")
    assert r.exit_code == 2


# ----------------------------------------------------------------------------- TensorRT (GPU)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRT, reason="needs CUDA and tensorrt")
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_trt_engines_parity(tiny_run, vae_run, vae_onnx, tmp_path, precision, tol):
    from export.runtime import load_runtime_pipeline
    from export.trt import build_engines

    side = build_engines(vae_onnx, tmp_path / "trt", precision=precision, min_batch=1, opt_batch=2, max_batch=4)
    assert side["engines"]["generator"]["batch"]["max"] == 8  # CFG doubling
    assert json.loads((tmp_path / "trt" / "engines.json").read_text())["precision"] == precision
    ref = Pipeline.from_run(vae_run, "cuda", components=("decoder", "generator", "vae"))
    rt = load_runtime_pipeline(vae_run, tmp_path / "trt", backend="trt", device="cuda")
    for comp in ("generator", "decoder", "vae"):
        for batch in (1, 3, 6):  # 6 > max_batch 4 for decoder / vae: chunked
            args = [a.cuda() for a in _inputs(ref.cfg, comp, batch, batch)]
            with torch.no_grad():
                want = ref.latent.decode(*args) if comp == "vae" else getattr(ref, comp)(*args)
                got = rt.latent.decode(*args) if comp == "vae" else getattr(rt, comp)(*args)
            assert got.device.type == "cuda"
            assert (got - want).abs().max() <= tol * max(1.0, float(want.abs().max())), (comp, batch)
    labels = torch.tensor([1, 2])
    assert (_sample(rt, labels, [0, 1], seed=1) - _sample(ref, labels, [0, 1], seed=1)).abs().max() < 10 * tol


def test_cuda_graph_capture_is_thread_local(monkeypatch):
    """Catches: capture in the default "global" mode, which the sampler's noise-prefetch thread
    (pinning memory, querying events during the capture) can abort. CUDA is faked: no GPU here."""
    from reptok import fast as runtime

    modes = []

    class Fake:
        def wait_stream(self, other):
            pass

        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, **kw):
        modes.append(kw.get("capture_error_mode", "global"))
        yield

    for name, value in {"Stream": Fake, "CUDAGraph": Fake, "current_stream": Fake, "graph": graph,
                        "stream": lambda s: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    fast = runtime.CudaGraphed(lambda x: x * 2)
    assert torch.equal(fast(torch.ones(2)), torch.full((2,), 2.0))
    assert modes == ["thread_local"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graphed_decoder_matches_eager(tiny_run, amp):
    """Also under bf16 autocast, entered and left around every call as the pipeline does: a
    graph captured with autocast's weight cache replays freed memory (it did, on an H200)."""
    from reptok.fast import CudaGraphed

    dec = Pipeline.from_run(tiny_run, "cuda", components=("decoder",)).decoder
    fast = CudaGraphed(dec)

    def ctx():
        return torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext()

    for batch in (2, 2, 5, 2):  # the second call replays, the third captures a new shape
        x, t, tok = (a.cuda() for a in _inputs(get_preset("tiny"), "decoder", batch, batch))
        with torch.no_grad():
            with ctx():
                got = fast(x, t, tok)
            torch.cuda.empty_cache()
            junk = torch.full((1 << 20,), float("nan"), device="cuda")  # reuse any freed block
            with ctx():
                got2 = fast(x, t, tok)
                want = dec(x, t, tok)
            del junk
        tol = 1e-5 if amp is None else 3e-2 * max(1.0, float(want.abs().max()))
        assert torch.isfinite(got).all() and torch.allclose(got.float(), want.float(), atol=tol)
        assert torch.equal(got, got2)
    assert len(fast.graphs) == 2


# ----------------------------------------------------------------------------- bench
def test_bench_json_tiny():
    r = _cli("bench", "--preset", "tiny", "--backend", "torch,onnx", "--batch-sizes", "1,2", "--iters", "2",
             "--warmup", "1", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = doc["rows"]
    assert {r["backend"] for r in rows} == {"torch", "onnx"}
    assert {r["stage"] for r in rows} == {"generator", "decoder", "end_to_end"}  # pixel space: no vae
    assert {r["batch"] for r in rows} == {1, 2}
    for row in rows:
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0
        if row["stage"] != "end_to_end":
            assert row["max_abs_err"] < 1e-3
    assert all(r["vs_torch"] == 1.0 for r in rows if r["backend"] == "torch")


def test_bench_bad_input_exits_2():
    assert _cli("bench", "--preset", "tiny", "--backend", "tensorflow").exit_code == 2
    assert _cli("bench", "--preset", "tiny", "--batch-sizes", "0").exit_code == 2
    assert _cli("bench", "--backend", "torch").exit_code == 2  # neither --ckpt nor --preset
