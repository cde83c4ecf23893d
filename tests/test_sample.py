"""The fast sampling path (issue 15): decoder / generator batches, the writer threads and their
behaviour on interrupt, shards vs one run on torch and ONNX Runtime, NFE / fast-path reporting,
regional compile, bench spread and --threads. CUDA paths skip without a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reptok.bench import make_random_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _cli(*args):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_random_run("tiny", tmp_path_factory.mktemp("fast") / "run")


@pytest.fixture(scope="module")
def onnx_dir(run, tmp_path_factory):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("fast") / "onnx"
    export_onnx(run, out)
    return out


SAMPLE = ["sample", "--class", "0-4", "-n", 2, "--seed", 3, "--steps", 3, "--decoder-steps", 3, "--device", "cpu"]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_shards_and_batch_sizes_equal_one_run(run, onnx_dir, tmp_path, backend):
    """Byte for byte: one run vs shards at the same batch sizes (partial batches are padded);
    other decoder / generator batch sizes agree within one uint8 level (float rounding)."""
    extra = ["--backend", "onnx", "--engine", onnx_dir] if backend == "onnx" else ["--backend", "torch"]
    base = [*SAMPLE[:1], "--ckpt", run, *SAMPLE[1:], *extra]
    r = _cli(*base, "--out", tmp_path / "all.npz", "--batch-size", 4, "--gen-batch-size", 3, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["backend"] == backend and summary["images_per_s"] > 0
    assert summary["nfe"] == {"generator": 3, "generator_guided": summary["nfe"]["generator_guided"], "decoder": 3}
    assert summary["fast_path"].startswith("onnx" if backend == "onnx" else "torch fp32 eager")
    for name, start, count in (("a", 0, 7), ("b", 7, 3)):
        assert _cli(*base, "--start", start, "--count", count, "--batch-size", 4, "--gen-batch-size", 3,
                    "--out", tmp_path / f"{name}.npz").exit_code == 0
    assert _cli(*base, "--batch-size", 3, "--gen-batch-size", 5, "--out", tmp_path / "other.npz").exit_code == 0
    full = np.load(tmp_path / "all.npz")
    parts = [np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")]
    assert full["arr_0"].shape == (10, 32, 32, 3) and full["arr_0"].std() > 10
    assert np.array_equal(full["arr_0"], np.concatenate([p["arr_0"] for p in parts]))
    assert np.array_equal(full["arr_1"], np.concatenate([p["arr_1"] for p in parts]))
    other = np.load(tmp_path / "other.npz")["arr_0"].astype(int)
    assert np.abs(other - full["arr_0"].astype(int)).max() <= 1


def test_onnx_default_with_engine_and_tolerance(run, onnx_dir, tmp_path):
    """--engine alone selects ONNX Runtime; its images are within 1 uint8 level of torch's."""
    base = [*SAMPLE[:1], "--ckpt", run, *SAMPLE[1:], "--json"]
    r = _cli(*base, "--engine", onnx_dir, "--out", tmp_path / "o.npz")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["backend"] == "onnx"
    assert _cli(*base, "--no-fast", "--out", tmp_path / "t.npz").exit_code == 0
    a = np.load(tmp_path / "o.npz")["arr_0"].astype(int)
    b = np.load(tmp_path / "t.npz")["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1


def test_writer_loses_no_image_when_interrupted(run, tmp_path):
    """KeyboardInterrupt in the third decoder batch: every file present is complete and equal to
    the uninterrupted run's, none is half-written, and a rerun generates only the rest."""
    from export.runtime import load_sampling_pipeline
    from reptok.sample import sample_to

    kw = dict(seed=3, batch_size=2, steps=3, decoder_steps=3)
    pipe = load_sampling_pipeline(run, "cpu")
    sample_to(pipe, [0, 1, 2], 3, tmp_path / "ref", **kw)
    ref = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "ref").iterdir()}
    assert len(ref) == 9

    calls = {"n": 0}
    real = pipe.decode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    pipe.decode = flaky
    with pytest.raises(KeyboardInterrupt):
        sample_to(pipe, [0, 1, 2], 3, tmp_path / "out", **kw)
    files = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in files] == sorted(ref)[:4]  # the two finished batches, nothing else
    for p in files:
        with Image.open(p) as im:
            im.load()  # a truncated PNG raises here
            assert np.array_equal(np.asarray(im), ref[p.name])
    pipe.decode = real
    again = sample_to(pipe, [0, 1, 2], 3, tmp_path / "out", **kw)
    assert again["generated"] == 5 and again["skipped_existing"] == 4
    for name, want in ref.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), want)


def test_next_batch_is_queued_before_the_previous_one_is_waited_for(run, tmp_path, monkeypatch):
    """The overlap order (what lets CUDA run batch k+1 while the host finishes batch k): the
    generator and decoder of batch k+1 are called before batch k's images are waited for, and the
    bytes equal the plain per-batch conversion."""
    import reptok.sample as smp
    from export.runtime import load_sampling_pipeline
    from reptok.images import tensor_to_uint8

    pipe = load_sampling_pipeline(run, "cpu")
    events, real_fetch = [], smp._fetch_uint8
    gen, dec = pipe.generate, pipe.decode

    def fetch(images):
        k = sum(e[0] == "decode" for e in events) - 1
        wait = real_fetch(images)
        want = tensor_to_uint8(images)
        return lambda: (events.append(("wait", k)), wait())[1] if np.array_equal(wait(), want) else None

    monkeypatch.setattr(smp, "_fetch_uint8", fetch)
    pipe.generate = lambda *a, **k: (events.append(("generate",)), gen(*a, **k))[1]
    pipe.decode = lambda *a, **k: (events.append(("decode",)), dec(*a, **k))[1]
    res = smp.sample_to(pipe, [0, 1, 2], 2, tmp_path / "o.npz", seed=1, batch_size=2, steps=2, decoder_steps=2)
    assert res["generated"] == 6 and np.load(tmp_path / "o.npz")["arr_0"].shape[0] == 6
    names = [e[0] if e[0] != "wait" else f"wait{e[1]}" for e in events]
    assert names == ["generate", "decode", "generate", "decode", "wait0", "generate", "decode", "wait1", "wait2"]


def test_timer_starts_after_the_compile_warm_up(run, tmp_path, monkeypatch):
    """Catches: the images/s timer started before the first (compiling / capturing) calls, which
    understates --compile. A fake clock: the first network call costs 1000 s, later ones 1 s."""
    import reptok.sample as smp
    from export.runtime import load_sampling_pipeline

    pipe = load_sampling_pipeline(run, "cpu")
    pipe.fast_path = {**pipe.fast_path, "compile": True}  # as --compile would set it
    clock, gen = [0.0], pipe.generate

    def timed_gen(*a, **k):
        clock[0] += 1000.0 if clock[0] == 0 else 1.0
        return gen(*a, **k)

    pipe.generate = timed_gen
    monkeypatch.setattr(smp.time, "perf_counter", lambda: clock[0])
    res = smp.sample_to(pipe, [0, 1], 2, tmp_path / "o.npz", seed=1, batch_size=2, steps=2, decoder_steps=2)
    assert res["warmup_s"] == 1000.0
    assert res["seconds"] == 2.0 and res["images_per_s"] == 2.0  # 4 images, 2 generator batches


def test_nfe_counts():
    from reptok.bench import random_pipeline
    from reptok.presets import get_preset

    pipe = random_pipeline(get_preset("tiny"))
    n = pipe.sampler_args(steps=10, decoder_steps=5, solver="heun", decoder_solver="euler", guidance_scale=2.0,
                          cfg_interval=(0.3, 0.9)).nfe()
    # grid 0, .1, ..., 1: Heun evaluates t_0..t_9 and t_1..t_10; [0.3, 0.9] holds 7 of each
    assert n == {"generator": 20, "generator_guided": 14, "decoder": 5}
    assert pipe.sampler_args(steps=4, guidance_scale=1.0).nfe()["generator_guided"] == 0


def test_regional_compile_compiles_one_block_for_all():
    """Identical blocks share one compiled frame (dynamo's CompileCounter backend, no inductor)."""
    from torch._dynamo.testing import CompileCounter

    from reptok.fast import regional_compile
    from reptok.bench import random_pipeline
    from reptok.presets import get_preset

    cfg = get_preset("tiny")
    cfg.decoder.depth = 4
    dec = random_pipeline(cfg, components=("decoder",)).decoder
    torch._dynamo.reset()
    counter = CompileCounter()
    fast, n = regional_compile(dec, backend=counter)
    assert n == 4 and fast is not dec and dec.blocks is not fast.blocks
    d = cfg.decoder
    x, t, tok = torch.randn(2, d.in_channels, d.input_size, d.input_size), torch.rand(2), torch.randn(2, d.token_dim)
    with torch.no_grad():
        want, got = dec(x, t, tok), fast(x, t, tok)
    assert torch.allclose(want, got, atol=1e-5)
    assert counter.frame_count == 1  # compiled once, reused by the 3 other blocks
    assert not any(type(b).__name__ == "OptimizedModule" for b in dec.blocks)  # original untouched
    torch._dynamo.reset()


def test_fast_variant_is_a_copy_that_leaves_the_pipeline_as_it_was():
    """``fast_variant`` goes through ``Pipeline.with_networks``: the variant's decoder and
    generator are compiled proxies (same outputs), the original keeps its nn.Modules and its
    registry. Catches: with_networks editing the original's ``_modules`` (a shared dict)."""
    from torch._dynamo.testing import CompileCounter

    from reptok.bench import random_pipeline
    from reptok.fast import fast_variant
    from reptok.presets import get_preset

    pipe = random_pipeline(get_preset("tiny"), components=("decoder", "generator"))
    torch._dynamo.reset()
    v = fast_variant(pipe, compile=True, compile_kw={"backend": CompileCounter()})
    assert v.fast_blocks > 0 and not isinstance(v.decoder, torch.nn.Module)
    assert isinstance(pipe.decoder, torch.nn.Module) and set(pipe._modules) >= {"decoder", "generator"}
    assert "decoder" not in v._modules and v.device == pipe.device
    args, idx = pipe.sampler_args(steps=2, decoder_steps=2), [0, 1]
    labels = torch.tensor([1, 2])
    want = pipe.generate(labels, pipe.generator_noise(idx), args)
    assert torch.allclose(v.generate(labels, v.generator_noise(idx), args), want, atol=1e-5)
    torch._dynamo.reset()


def test_regional_compile_reaches_a_text_generators_cross_attention():
    """The generator's block_lists: the mixer blocks and, for text, the condition's
    cross-attention blocks; a class generator has no cross blocks (skipped, not an error)."""
    from torch._dynamo.testing import CompileCounter

    from reptok.fast import regional_compile
    from reptok.models import build_generator
    from reptok.presets import get_preset

    g_cfg = get_preset("tiny").generator
    g_cfg.depth = 3
    _, n_class = regional_compile(build_generator(g_cfg).eval(), backend=CompileCounter())
    assert n_class == 3
    g_cfg.text_encoder, g_cfg.text_dim, g_cfg.text_len, g_cfg.num_classes = "tiny", 16, 4, 0
    gen = build_generator(g_cfg).eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    fast, n = regional_compile(gen, backend=counter)
    assert n == 2 * g_cfg.depth  # the mixer blocks and the cross-attention blocks
    assert fast.condition is not gen.condition  # copied on the way; the original is untouched:
    assert not any(type(b).__name__ == "OptimizedModule" for b in gen.condition.cross)
    x, t = torch.randn(2, g_cfg.n_tokens, g_cfg.token_dim), torch.rand(2)
    text, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(gen(x, t, text, mask), fast(x, t, text, mask), atol=1e-5)
    assert counter.frame_count == 2  # one mixer block frame, one cross-attention frame
    torch._dynamo.reset()


def test_no_fast_and_bad_flags(run, tmp_path):
    r = _cli("sample", "--ckpt", run, "--out", tmp_path / "x.npz", "--device", "cpu", "--cuda-graphs")
    assert r.exit_code == 2 and "CUDA" in r.output and not (tmp_path / "x.npz").exists()
    r = _cli("sample", "--ckpt", run, "--out", tmp_path / "x.npz", "--backend", "onnx")
    assert r.exit_code == 2 and "--engine" in r.output


def test_bench_steps_are_split_by_stage_as_in_sample():
    r = _cli("bench", "--preset", "tiny", "--stages", "end_to_end", "--batch-sizes", "1", "--iters", "1",
             "--warmup", "0", "--steps", "2", "--decoder-steps", "1", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["end_to_end_steps"] == {"steps": 2, "decoder_steps": 1}  # not 2 for both stages


def test_bench_spread_and_threads():
    r = _cli("bench", "--preset", "tiny", "--stages", "decoder", "--batch-sizes", "1", "--iters", "3",
             "--warmup", "0", "--threads", "1", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["threads"] == 1
    row = doc["rows"][0]
    assert row["latency_min_ms"] <= row["latency_ms"] <= row["latency_max_ms"]
    # TFLOP/s from reptok info's decoder FLOPs; a CPU has no peak in the table: no MFU, said once.
    from reptok.info import model_report
    from reptok.presets import get_preset

    (dec,) = model_report(get_preset("tiny"), components=("decoder",))
    assert row["tflops"] == pytest.approx(row["images_per_s"] * dec["gflops"] / 1e3, rel=1e-3, abs=1e-4)
    assert row["mfu"] is None and any("no MFU" in n for n in doc["notes"])
    assert _cli("bench", "--preset", "tiny", "--threads", "0").exit_code == 2


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_eager(run, tmp_path):
    """bf16 + CUDA graphs (the default on CUDA), with a padded last batch, vs eager fp32."""
    base = ["sample", "--ckpt", run, "--class", "0-4", "-n", 1, "--seed", 2, "--batch-size", 4,
            "--device", "cuda", "--json"]
    r = _cli(*base, "--out", tmp_path / "fast.npz")
    assert r.exit_code == 0, r.output
    assert "CUDA graphs" in json.loads(r.stdout.strip().splitlines()[-1])["fast_path"]
    assert _cli(*base, "--no-fast", "--out", tmp_path / "eager.npz").exit_code == 0
    a, b = (np.load(tmp_path / f)["arr_0"].astype(int) for f in ("fast.npz", "eager.npz"))
    assert np.abs(a - b).mean() < 8  # bf16 over 2 x 8 ODE steps: a few uint8 levels on average


def test_default_batch_size_per_device():
    """Catches: the CUDA default left at the CPU's 16 (an H200 idles between XL kernels)."""
    from reptok.sample import default_batch_size

    assert default_batch_size("cuda:1") == 64 and default_batch_size("cuda") == 64
    assert default_batch_size("cpu") == 16


def test_index_noise_rows_depend_on_the_global_index():
    """Row i of a shard's noise is keyed by the image's global index (seed, i, stream), written out
    here with numpy's SeedSequence: shards and any batch size draw one job's noise (catches the
    key taken from the position inside the shard or batch)."""
    from reptok.pipeline import index_noise

    def by_hand(seed, i, stream):
        s = np.random.SeedSequence([seed, i, stream]).generate_state(2, np.uint64)[0]
        return torch.randn(3, 2, generator=torch.Generator().manual_seed(int(s >> np.uint64(1))))

    shard = index_noise(4, [5, 7], (3, 2), 1)
    for row, i in zip(shard, [5, 7]):
        assert torch.equal(row, by_hand(4, i, 1))
    assert torch.equal(index_noise(4, [7], (3, 2), 1)[0], shard[1])
    assert not torch.equal(index_noise(4, [5], (3, 2), 0)[0], shard[0])  # streams differ
