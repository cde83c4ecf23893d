"""Every script under benchmarks/ in its smallest mode (tiny preset, CPU, a few steps), so none can
rot unnoticed (issue 24: train_throughput.py had drifted from the task API and would only have
crashed on the GPU machine, after building its data). Python scripts run in this process (no
second torch import); the shell checks run as a user runs them.

The GPU check's CPU dry run (``DEVICE=cpu PRESET=tiny bash benchmarks/gpu_check.sh``) runs every
step of the real check at tiny sizes: each must end with rc 0, and the results folder must hold at
most 8 files. It is the slow one (~20 processes, 2-3 minutes on 2 cores)."""

from __future__ import annotations

import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quickstart(class_runs, tmp_path_factory):
    """A quickstart-shaped folder (tokenizer / generator / tokens.npy) over the shared tiny runs."""
    qs = tmp_path_factory.mktemp("qs")
    (qs / "tokenizer").symlink_to(class_runs / "tok")
    (qs / "generator").symlink_to(class_runs / "gen")
    for p in [class_runs / "data", *class_runs.glob("tokens*")]:  # tokens.npy and its sidecars
        (qs / p.name).symlink_to(p)
    return qs


def _run_script(name: str, args: list, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), *map(str, args)])
    monkeypatch.chdir(ROOT)
    try:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    except SystemExit as e:  # scripts ending in sys.exit(main())
        assert e.code in (0, None), capsys.readouterr()
    return capsys.readouterr().out


def _shell(script: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    full = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(BENCH / script)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel (``reptokprobe``) for the WHEELS=DIR install path."""
    import zipfile

    folder.mkdir()
    info = "reptokprobe-0.1.dist-info"
    files = {"reptokprobe/__init__.py": "X = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: reptokprobe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / "reptokprobe-0.1-py3-none-any.whl", "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


def _steps(out: Path) -> dict:
    with open(out / "steps.tsv") as f:
        return {r["step"]: r["rc"] for r in csv.DictReader(f, delimiter="\t")}


# ----------------------------------------------------------------------------- python scripts
# (script, arguments, a string its output must contain). QS = the quickstart fixture's folder.
PY_SCRIPTS = [
    ("train_throughput.py", ["--preset", "tiny", "--device", "cpu", "--steps", 1, "--images", 16, "--batch-size", 8,
                             "--workers", 0, "--modes", "loader,model"], "| gen | model |"),
    ("bench_backends.py", ["--preset", "tiny", "--backend", "torch", "--batch-sizes", 1, "--iters", 1, "--warmup", 0,
                           "--steps", 2, "--device", "cpu"], "decoder"),
    ("models.py", ["--presets", "tiny", "--latency-presets", "tiny", "--iters", 1], "tiny"),
    ("token_probe.py", ["--preset", "tiny", "--images", 60], "class"),
    ("oracle_decoder.py", ["--preset", "tiny", "--steps", 2, "--batch-size", 4, "--images", 16,
                           "--samplers", "euler:2"], "judge accuracy"),
    ("recon_shapes.py", ["--steps", 2, "--batch-size", 4, "--images", 16, "--eval-images", 4, "--only", "trainable",
                         "--set", 'encoder.weights="random"'], "trainable"),
    ("gen_shapes.py", ["--quickstart", "QS", "--per-class", 1, "--cfg", "1.0"], "1.0"),
    ("decoder_steps.py", ["--quickstart", "QS", "--settings", "euler:2", "--recon", 4, "--per-class", 1,
                          "--batch-size", 4], "euler"),
    ("distill_shapes.py", ["--quickstart", "QS", "--ks", 1, "--steps", 2, "--teacher-steps", 2, "--teacher-rows", 2,
                           "--eval-images", 4, "--per-class", 1, "--batch-size", 4], "student"),
    ("t2i_shapes.py", ["--quickstart", "QS", "--work", "WORK", "--gen-steps", 2, "--gen-batch", 8, "--per-prompt", 1,
                       "--cfg", "1.0", "--steps", 2], "circle"),
]


@pytest.mark.parametrize("script,args,want", PY_SCRIPTS, ids=[s[0] for s in PY_SCRIPTS])
def test_python_benchmark_smallest_mode(script, args, want, request, tmp_path, monkeypatch, capsys):
    """Catches: a benchmark script calling an API that has moved on (wrong arguments, removed
    config fields), in its cheapest configuration."""
    if "QS" in args:
        qs = request.getfixturevalue("quickstart")
        args = [qs if a == "QS" else a for a in args]
    args = [tmp_path / "work" if a == "WORK" else a for a in args]
    out = _run_script(script, args, monkeypatch, capsys)
    assert want in out, out[-2000:]


def test_every_benchmark_script_is_covered():
    """Catches: a new script under benchmarks/ without a smallest mode in the suite."""
    covered = {s[0] for s in PY_SCRIPTS} | {"gpu_check.sh", "gpu_summary.py", "bench_ddp.py",
                                            "sample_backends.py",
                                            "mutations.py"}  # its --check mode: tests/test_mutations.py
    assert {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")} == covered


# ----------------------------------------------------------------------------- scripts that spawn processes
@pytest.mark.slow
def test_spawning_benchmarks_smallest_mode(class_runs, tmp_path):
    """bench_ddp.py (torchrun, 1 rank) and sample_backends.py (reptok processes + ONNX export) at
    tiny sizes. Catches: a changed CLI option or result field in either."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(BENCH / "bench_ddp.py"), "--preset", "tiny", "--nproc", "1", "--steps", "2",
                        "--batch-size", "8", "--stages", "recon", "--work", str(tmp_path / "ddp"),
                        "--data", str(class_runs / "data")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "| recon | 1 |" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(BENCH / "sample_backends.py"), "--preset", "tiny", "--classes", "0",
                        "-n", "1", "--steps", "2", "--work", str(tmp_path / "sb")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "onnx" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    """``DEVICE=cpu PRESET=tiny bash benchmarks/gpu_check.sh``: every step of the GPU check runs
    (torchrun + collective guard, cached latents, eager / compile / fp16 training, one random run
    sampled four ways, the throughput rows) and ends with rc 0; at most 8 files come back.
    Catches: a step whose command or arguments no longer exist (e.g. --engine without an
    export), a summary that is not written, result files spread over the folder."""
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    _probe_wheel(wheels)
    r = _shell("gpu_check.sh", {"DEVICE": "cpu", "PRESET": "tiny", "OUT": str(out), "WORK": str(tmp_path / "work"),
                                "CUDA_TESTS": "tests/test_cuda_paths.py", "PORT": "29533", "WHEELS": str(wheels)}, 900)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _steps(out)
    assert set(steps.values()) == {"0"}, steps
    assert list(steps)[:4] == ["wheels", "env", "cuda_tests", "train_data"] and list(steps)[-2:] == ["throughput", "train_distill"]
    assert (tmp_path / "work" / "site" / "reptokprobe" / "__init__.py").exists()  # WHEELS=DIR installed it
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    res = json.loads((out / "results.json").read_text())
    assert res["env"]["torch"] and any(k.startswith("sample_bf16_graphs") for k in res["figures"])
    assert any(k.startswith("train_throughput tiny recon model+compile") for k in res["figures"])
    assert "| throughput | 0 |" in (out / "summary.md").read_text()
