"""``-q`` on every command that has it: a successful run writes nothing on stderr.

The commands are found in the CLI itself, so a new command with ``-q`` and no case here fails
``test_every_quiet_command_has_a_case``. Each case is the smallest successful run on the shared
tiny runs (``class_runs``); a random judge in a private cache keeps the judge untrained.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reptok_cli.app import app
from test_convert import FIX as OFFICIAL  # the official-format fixture (None when absent)

# Commands that cannot succeed on a CPU-only machine: run only where they can.
NEEDS_GPU = {"export trt": "TensorRT needs CUDA"}


def _quiet_commands():
    import typer

    def walk(cmd, path):
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(None):
                yield from walk(cmd.get_command(None, name), path + [name])
        elif any("--quiet" in getattr(p, "opts", ()) for p in cmd.params):
            yield " ".join(path)

    return set(walk(typer.main.get_command(app), []))


def _cases(r: Path, t: Path):
    """command -> its argument list (r: the shared runs, read-only; t: this test's folder)."""
    return {
        "extract": ["--ckpt", r / "tok", "--data", r / "data", "--out", t / "tok.npy", "--limit", 4],
        "sample": ["--ckpt", r / "gen", "--class", 0, "-n", 2, "--out", t / "s.npz", "--steps", 1,
                   "--decoder-steps", 1],
        "quickstart": ["--out", t / "qs", "--preset", "tiny", "--images", 24, "--recon-steps", 1, "--gen-steps", 1,
                       "--eval-per-class", 1],
        "bench": ["--preset", "tiny", "--backend", "torch", "--batch-sizes", 1, "--iters", 1, "--warmup", 0,
                  "--device", "cpu"],
        "data prep": ["builtin:shapes", "--out", t / "prep", "--limit", 4],
        "data cache-latents": [t / "data", "--vae", t / "vae", "--batch-size", 4],
        "train recon": ["--data", r / "data", "--out", t / "tok", "--preset", "tiny", "--steps", 1, "--batch-size", 4,
                        "--sample-every", 0],
        "train gen": ["--tokens", r / "tokens.npy", "--out", t / "gen", "--preset", "tiny", "--steps", 1],
        "train distill": ["--ckpt", r / "tok", "--out", t / "st", "--steps", 1, "--student-steps", 1,
                          "--teacher-steps", 2, "--batch-size", 2],
        "export onnx": ["--ckpt", r / "tok", "--out", t / "onnx", "--components", "decoder"],
        "eval recon": ["--ckpt", r / "tok", "--data", r / "data", "--limit", 4, "--decoder-steps", 1,
                       "--features", "judge", "--out", t / "recon.json"],
        "eval gen": ["--samples", r / "data", "--ref", r / "data", "--limit", 8, "--features", "judge",
                     "--out", t / "gen.json"],
        "eval probe": ["--ckpt", r / "tok", "--data", r / "data"],
        "reconstruct": [t / "img.png", "--ckpt", r / "tok", "--out", t / "rec", "--decoder-steps", 1],
        "interpolate": [t / "img.png", t / "img.png", "--ckpt", r / "tok", "--frames", 2, "--out", t / "ab.png",
                        "--decoder-steps", 1],
        "convert official": [(OFFICIAL or t) / "official_tiny.ckpt", "--out", t / "conv", "--encoder-heads", 2,
                             "--vae-config", (OFFICIAL or t) / "tiny_vae"],
    }


def test_every_quiet_command_has_a_case(tmp_path):
    assert _quiet_commands() == set(_cases(tmp_path, tmp_path)) | set(NEEDS_GPU)


@pytest.fixture(scope="module")
def quiet_env(class_runs, tmp_path_factory):
    """A random judge in a private cache (nothing trains) and a tiny diffusers VAE."""
    from reptok.io import save_tensors
    from reptok.shapes.judge import JudgeNet, judge_cache_path

    root = tmp_path_factory.mktemp("quiet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_tensors(judge_cache_path(root / "cache"), JudgeNet().state_dict(), metadata={"heldout_accuracy": 0.0})
    sys.path.insert(0, str(Path(__file__).parent))
    from test_vae import tiny_autoencoder

    tiny_autoencoder().save_pretrained(root / "vae")
    return class_runs, root


@pytest.mark.parametrize("command", sorted(set(_cases(Path("r"), Path("t")))))
def test_quiet_run_writes_nothing_on_stderr(command, quiet_env, tmp_path, monkeypatch):
    runs, root = quiet_env
    if command == "convert official" and OFFICIAL is None:
        pytest.skip("shared/fixtures/official-tiny not found")
    monkeypatch.setenv("REPTOK_CACHE", str(root / "cache"))
    shutil.copytree(root / "vae", tmp_path / "vae")
    shutil.copytree(runs / "data", tmp_path / "data")  # cache-latents writes into its dataset
    from reptok.images import save_png

    save_png(tmp_path / "img.png", np.full((32, 32, 3), 128, np.uint8))  # reconstruct's input
    args = [*command.split(), *_cases(runs, tmp_path)[command], "-q"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert res.stderr == "", res.stderr
