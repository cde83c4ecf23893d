"""What clusters do to runs every day, end to end through the CLI: the scheduler's SIGTERM to the
whole process group (loader workers included), torchrun ranks waiting for rank 0's checkpoint,
sampling shards written in parallel into one folder, a full disk.

Subprocesses run with OMP_NUM_THREADS=1 in their own session, so a signal reaches the process
group as SLURM's preemption / ``scancel`` sends it; the references run in-process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clihelp import cli

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
HERE = Path(__file__).parent


def metrics(run: Path):
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for_rows(run: Path, proc, rows: int, timeout: float = 120) -> None:
    t0 = time.time()
    while len(metrics(run)) < rows:
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{proc.stderr.read()}"
        assert time.time() - t0 < timeout, "no progress"
        time.sleep(0.05)


def same_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{name} {k}"


def test_process_group_sigterm_with_loader_workers_checkpoints_and_resumes_exactly(class_runs, tmp_path):
    """SIGTERM to the process group of ``train recon --workers 2`` (the workers get it too): the
    run finishes its step, checkpoints, exits 143; --resume then ends at the uninterrupted run's
    weights (catches workers dying of the signal: 'DataLoader worker ... killed by signal')."""
    args = ["train", "recon", "--data", class_runs / "data", "--preset", "tiny", "--batch-size", 8,
            "--ckpt-every", 1000, "--sample-every", 0, "--set", "train.log_every=1", "--workers", 2,
            "--no-tensorboard", "-q"]
    argv = [sys.executable, "-m", "reptok_cli", *map(str, args)]
    proc = subprocess.Popen([*argv, "--steps", "400", "--out", str(tmp_path / "cut")], env=ENV,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_rows(tmp_path / "cut", proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err
    assert "killed by signal" not in err and "Traceback" not in err, err
    step = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"]
    assert 2 <= step < 400
    end = step + 2  # tiny has no lr cool-down: the step count does not change the schedule
    inline = [*args[:-4], "--workers", 0, "--no-tensorboard", "-q", "--steps", end]  # in-process: same batches
    cli(*inline, "--out", tmp_path / "cut", "--resume")
    cli(*inline, "--out", tmp_path / "full")
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(1, end + 1))
    for name in ("model.safetensors", "ema.safetensors"):
        same_weights(tmp_path / "cut", tmp_path / "full", name)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is required")
def test_torchrun_ranks_wait_for_rank_0_checkpoint_on_sigterm(class_runs, tmp_path):
    """2 gloo ranks, SIGTERM to the whole torchrun group while rank 0's checkpoint write takes 1 s more
    (tests/slow_save.py): no rank exits before the save is complete, and the checkpoint is whole
    (catches ranks leaving at once, which makes torchrun kill rank 0 mid-write)."""
    from test_distributed import free_port

    marks = tmp_path / "marks"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(HERE / "slow_save.py"), "train", "gen", "--tokens",
           str(class_runs / "tokens.npy"), "--out", str(run), "--preset", "tiny", "--batch-size", "8",
           "--steps", "5000", "--ckpt-every", "100000", "--set", "train.log_every=1", "--no-tensorboard", "-q"]
    proc = subprocess.Popen(cmd, env={**ENV, "REPTOK_TEST_MARKS": str(marks)}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_rows(run, proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    times = {line.split()[0]: float(line.split()[1]) for line in marks.read_text().splitlines()}
    assert {"saved", "exit0", "exit1"} <= set(times), (times, err[-3000:])
    assert times["exit1"] >= times["saved"] and times["exit0"] >= times["saved"], times
    step = torch.load(run / "train_state.pt", weights_only=True)["step"]
    from safetensors import safe_open

    for name in ("model.safetensors", "ema.safetensors"):
        with safe_open(str(run / name), "pt") as f:
            assert int(f.metadata()["step"]) == step
    assert "SIGTERM: stopped after step" in err or "by SIGTERM after step" in err, err[-3000:]


def test_parallel_shards_into_one_folder_give_one_runs_images(class_runs, tmp_path):
    """Two ``sample --start/--count`` shards started together into one PNG folder (one in a
    subprocess, one in-process) write, byte for byte, the 16 PNGs and the manifest of one run.
    (How much they overlap depends on the machine; the race itself is pinned down by
    test_a_shard_takes_another_shards_files_in_flight_for_its_own.)"""
    args = ["sample", "--ckpt", class_runs / "gen", "--class", "0-3", "-n", 4, "--seed", 3, "--steps", 2,
            "--decoder-steps", 2, "--batch-size", 4, "-q"]
    cli(*args, "--out", tmp_path / "one")
    argv = [sys.executable, "-m", "reptok_cli", *map(str, args), "--out", str(tmp_path / "par")]
    other = subprocess.Popen([*argv, "--start", "8", "--count", "8"], env=ENV, stderr=subprocess.PIPE, text=True)
    cli(*args, "--out", tmp_path / "par", "--start", 0, "--count", 8)  # meanwhile, the first shard here
    assert other.wait(timeout=180) == 0, other.stderr.read()
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([n for n in one if n.endswith(".png")]) == 16
    assert one == sorted(p.name for p in (tmp_path / "par").iterdir())
    for n in one:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "par" / n).read_bytes(), n


@pytest.fixture
def small_disk(tmp_path):
    """A 24 KiB tmpfs (root only: skipped where it cannot be mounted)."""
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_is_one_line_exit_1_and_no_partial_file(class_runs, small_disk):
    """An npz that does not fit (16 images of 32x32x3 = 48 KiB on 24 KiB): exit 1 with one
    line naming the lack of space, and the folder holds no partial or temporary file."""
    res = cli("sample", "--ckpt", class_runs / "gen", "--class", "0-3", "-n", 4, "--steps", 2, "--decoder-steps", 2,
              "--out", small_disk / "s.npz", "-q", code=1)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left" in lines[0], res.stderr
    assert list(small_disk.iterdir()) == []
    np.testing.assert_equal(len(res.stdout.strip()), 0)


def test_a_shard_takes_another_shards_files_in_flight_for_its_own(tmp_path):
    """A folder holding only another writer's in-flight files (the manifest's atomic temp file,
    the writability probe) is a fresh folder, not a foreign one (catches the exit 2 "holds files
    but no .reptok-sample.json" that two shards started at once gave)."""
    from reptok.outputs import MANIFEST, PROBE_PREFIX, prepare_png_folder

    out = tmp_path / "pngs"
    out.mkdir()
    (out / f".{MANIFEST}.k2j3.tmp").write_text("{")
    (out / f"{PROBE_PREFIX}x1y2").write_text("")
    assert prepare_png_folder(out, {"seed": 1}) is False
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="no .reptok-sample.json"):
        prepare_png_folder(tmp_path / "other", {"seed": 1})
