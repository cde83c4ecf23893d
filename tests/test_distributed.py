"""torchrun on CPU (gloo, 2 ranks) against single-process runs: training equality, resume across
world sizes, sampling and extraction split by index writing one result identical to 1 process.

Each multi-rank case is one ``python -m torch.distributed.run --nproc-per-node 2 -m reptok_cli``
subprocess; the single-process references run in-process (CliRunner) to save start-up time.
"""

import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file

from clihelp import cli, tiny_chain  # noqa: E402

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is required")


# Weights after a few AdamW steps agree to ~1e-6: 2 ranks average two half-batch gradients where
# 1 process takes one full-batch mean (float re-association only). The exception is the bias of
# each token-mixing block's output conv: it shifts all features of a token by a constant that the
# next LayerNorm removes, so its true gradient is 0 and its float gradient is rounding noise, which
# AdamW (g / sqrt(v)) turns into steps of ~lr. Those tensors get a bound of a few lr instead.
ATOL, RTOL = 1e-5, 1e-5
GRADIENT_FREE = re.compile(r"^generator\.mixer\.\d+\.0\.fn\.3\.bias$")
GRADIENT_FREE_ATOL = 5e-3

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, timeout: int = 180, script=None, env=None, code=0) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m reptok_cli ARGS`` (or ``SCRIPT ARGS``) as a subprocess;
    asserts its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    target = [str(script)] if script else ["-m", "reptok_cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target,
           *[str(a) for a in args]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (res.returncode == 0) == (code == 0), f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    return res


def json_lines(text: str):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@contextmanager
def one_thread():
    """References run with 1 thread like each torchrun rank (OMP_NUM_THREADS=1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def assert_same_weights(a: Path, b: Path, name="model.safetensors"):
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        atol = GRADIENT_FREE_ATOL if GRADIENT_FREE.match(k) else ATOL
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=RTOL, msg=lambda m: f"{name} {k}: {m}")

def metrics(run: Path, split: str = "train"):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == split]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """builtin:shapes (32 images) -> tiny tokenizer (2 steps) -> tokens -> tiny generator (4 steps)."""
    with one_thread():
        return tiny_chain(tmp_path_factory.mktemp("dist"), 32, 2, 4,
                          recon_args=("--batch-size", 8, "--sample-every", 0, "--json"),
                          extract_args=("--batch-size", 8), gen_args=("--batch-size", 8, "--json"))


# ----------------------------------------------------------------------------- training
def test_gen_two_ranks_equal_one_process_then_resume_on_one_rank(work, tmp_path):
    """2 ranks x grad-accum 2 (DDP no_sync) == 1 process; the 2-rank run resumed on 1 rank ==
    an uninterrupted 1-process run. Validation (sharded over the ranks) gives the same rows."""
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 3,
              "--set", "train.log_every=1", "--val-tokens", work / "tokens.npy", "--val-every", 3,
              "--set", "train.val_fid_n=20", "--json"]
    res = torchrun("train", "gen", "--out", tmp_path / "two", "--steps", 3, "--grad-accum", 2, *common)
    out = json_lines(res.stdout)
    assert len(out) == 1 and out[0]["steps"] == 3  # only rank 0 prints the summary
    assert [r["step"] for r in metrics(tmp_path / "two")] == [1, 2, 3]  # only rank 0 logs
    with one_thread():
        cli("train", "gen", "--out", tmp_path / "one3", "--steps", 3, *common)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(tmp_path / "two", tmp_path / "one3", name)
    # EMA weights agree to ~1e-9 here, far below the rows' rounding (6 decimals): a missing or doubled
    # all-reduce, or chunks that change with the world size, would move them by far more.
    (va,), (vb,) = metrics(tmp_path / "two", "val"), metrics(tmp_path / "one3", "val")
    assert va["step"] == 3 and va["rf"] == pytest.approx(vb["rf"], abs=1.5e-6)
    assert va["token_fd"] == pytest.approx(vb["token_fd"], rel=1e-6) and va["fd_n"] == 20

    with one_thread():
        cli("train", "gen", "--out", tmp_path / "one6", "--steps", 6, *common)
        cli("train", "gen", "--out", tmp_path / "two", "--steps", 6, "--resume", *common)
    la, lb = metrics(tmp_path / "one6"), metrics(tmp_path / "two")
    assert [r["step"] for r in lb] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in lb], [r["loss"] for r in la], rtol=1e-4, atol=1e-5)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(tmp_path / "two", tmp_path / "one6", name)


def test_grad_accum_single_process_equals_plain(work, tmp_path):
    common = ["--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--steps", 3, "--json"]
    with one_thread():
        cli("train", "gen", "--out", tmp_path / "plain", *common)
        cli("train", "gen", "--out", tmp_path / "accum", "--grad-accum", 2, *common)
    assert_same_weights(tmp_path / "plain", tmp_path / "accum")


@pytest.mark.parametrize("workers", [0, 2])
def test_recon_resume_one_rank_run_on_two_ranks(work, tmp_path, workers):
    """A 1-process tokenizer run continued by 2 ranks == 4 uninterrupted 1-process steps
    (trainable cls token + decoder under DDP, frozen ViT backbone), with the batches read in the
    training process or by DataLoader workers."""
    common = ["--data", work / "data", "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 2,
              "--sample-every", 0, "--set", "train.log_every=1", "--workers", workers, "--json"]
    with one_thread():
        cli("train", "recon", "--out", tmp_path / "ref", "--steps", 4, *common)
        cli("train", "recon", "--out", tmp_path / "run", "--steps", 2, *common)
    res = torchrun("train", "recon", "--out", tmp_path / "run", "--steps", 4, "--resume", *common)
    out = json_lines(res.stdout)
    assert len(out) == 1 and out[0]["start_step"] == 2
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(tmp_path / "run", tmp_path / "ref", name)
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert not torch.equal(w["encoder.vit.cls_token"], w["encoder.cls_token_frozen"])


GUARD = Path(__file__).parent / "collective_guard.py"


def test_collectives_get_tensors_on_the_training_device(work, tmp_path):
    """2-rank recon and gen with every torch.distributed collective checking its tensor's device
    (NCCL has no CPU backend: a CPU tensor stops a multi-GPU run at step 1). The control run,
    told the training device is another one, fails: the check really sees the loop's collectives."""
    recon = ["train", "recon", "--data", work / "data", "--preset", "tiny", "--batch-size", 8, "--steps", 2,
             "--sample-every", 0, "--set", "train.log_every=1", "--json"]
    log = tmp_path / "calls"
    torchrun(*recon, "--out", tmp_path / "r", script=GUARD,
             env={"REPTOK_COLLECTIVE_DEVICE": "cpu", "REPTOK_COLLECTIVE_LOG": str(log)})
    gen = ["train", "gen", "--tokens", work / "tokens.npy", "--preset", "tiny", "--batch-size", 8, "--steps", 2,
           "--set", "train.log_every=1", "--json"]
    torchrun(*gen, "--out", tmp_path / "g", script=GUARD,
             env={"REPTOK_COLLECTIVE_DEVICE": "cpu", "REPTOK_COLLECTIVE_LOG": str(log)})
    calls = (tmp_path / "calls.0").read_text().splitlines()
    assert calls.count("all_reduce cpu") >= 4, calls  # stats (+ the stop flag) of 2 steps x 2 runs
    res = torchrun(*gen, "--out", tmp_path / "x", script=GUARD, env={"REPTOK_COLLECTIVE_DEVICE": "meta"}, code=1)
    assert "collective all_reduce got a tensor on cpu; the training device is meta" in res.stderr


def test_cache_latents_two_ranks_write_the_one_process_cache(work, tmp_path):
    import shutil

    sys.path.insert(0, str(Path(__file__).parent))
    from test_vae import tiny_autoencoder

    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    for name in ("one", "two"):
        shutil.copytree(work / "data", tmp_path / name, ignore=shutil.ignore_patterns("latents*"))
    args = ["--vae", tmp_path / "vae", "--batch-size", 4, "--chunk-size", 8, "--json"]
    with one_thread():
        cli("data", "cache-latents", tmp_path / "one", *args)
    res = torchrun("data", "cache-latents", tmp_path / "two", *args)
    out = json_lines(res.stdout)
    assert len(out) == 1 and out[0]["count"] == 32 and out[0]["encoded"] == 16  # rank 0's half
    a, b = (np.load(tmp_path / n / "latents" / "moments.npy") for n in ("one", "two"))
    assert a.shape == (32, 2, 8, 4, 4)
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "two" / "latents.partial").exists()


# ----------------------------------------------------------------------------- sampling / extraction
@pytest.mark.parametrize("out", ["s.npz", "pngs"])
def test_sample_two_ranks_write_the_one_process_images(work, tmp_path, out):
    args = ["sample", "--ckpt", work / "gen", "--class", "0-2", "-n", 3, "--seed", 5, "--batch-size", 2,
            "--steps", 4, "--decoder-steps", 3, "--json"]
    with one_thread():
        cli(*args, "--out", tmp_path / "one" / out)
    res = torchrun(*args, "--out", tmp_path / "two" / out)
    summary = json_lines(res.stdout)
    assert len(summary) == 1 and summary[0]["images"] == 9 and summary[0]["generated"] == 9
    a, b = tmp_path / "one" / out, tmp_path / "two" / out
    if out.endswith(".npz"):
        za, zb = np.load(a), np.load(b)
        assert za["arr_0"].tobytes() == zb["arr_0"].tobytes() and za["arr_0"].shape == (9, 32, 32, 3)
        assert za["arr_1"].tolist() == zb["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert sorted(p.name for p in b.parent.iterdir()) == ["s.npz"]  # no per-rank leftovers
    else:
        from PIL import Image

        names = sorted(p.name for p in a.glob("*.png"))
        assert len(names) == 9 and names == sorted(p.name for p in b.glob("*.png"))
        # one manifest per folder (rank 0 writes it), the same for both jobs
        assert (a / ".reptok-sample.json").read_text() == (b / ".reptok-sample.json").read_text()
        for n in names:
            assert np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))), n


def test_extract_two_ranks_equals_one_process(work, tmp_path):
    from reptok.extract import load_tokens

    res = torchrun("extract", "--ckpt", work / "tok", "--data", work / "data", "--out", tmp_path / "t.npy",
                   "--batch-size", 5, "--json")
    assert len(json_lines(res.stdout)) == 1
    one, two = load_tokens(work / "tokens.npy"), load_tokens(tmp_path / "t.npy")
    np.testing.assert_allclose(two["tokens"], one["tokens"], atol=1e-6, rtol=0)
    assert np.array_equal(two["labels"], one["labels"])
    assert two["meta"]["count"] == 32
    np.testing.assert_allclose(two["meta"]["mean"], one["meta"]["mean"], atol=1e-6)
    assert not list(tmp_path.glob("*.rank*"))


@pytest.mark.parametrize("fails", [False, True])
def test_every_command_leaves_the_process_group(fails):
    """A CLI command destroys its process group on the way out, after an error too (a group left
    to the interpreter's teardown can abort a finished rank with SIGABRT: "terminate called
    without an active exception"). One gloo rank in-process; the error path does not wait for peers."""
    import typer

    from reptok.errors import InputError
    from reptok_cli.common import handle_errors

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    seen = []

    @handle_errors
    def command():
        seen.append(tdist.is_initialized())
        if fails:
            raise InputError("bad input")

    try:
        if fails:
            with pytest.raises(typer.Exit):
                command()
        else:
            command()
        assert seen == [True] and not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
