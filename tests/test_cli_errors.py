"""Every realistic CLI mistake is exit 2, one line on stderr, no traceback, and nothing written.

Each case of :data:`CASES` builds its arguments (and, where the mistake needs one, an existing
file or folder) from the session's tiny runs, snapshots the files (paths, sizes, mtimes) of the
case's temp dir and of the shared runs, runs ``reptok`` in-process and checks the result.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reptok_cli.app import app

from clihelp import cli, last_json  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """builtin:shapes (16 images) -> tiny tokenizer (2 steps) -> tokens -> tiny generator (2
    steps) -> a 2-image PNG sample folder (steps 2) and an npz; built once per session."""
    root = tmp_path_factory.mktemp("cli-errors")
    cli("data", "prep", "builtin:shapes", "--out", root / "data", "--limit", 16)
    cli("train", "recon", "--data", root / "data", "--out", root / "tok", "--preset", "tiny", "--steps", 2,
        "--sample-every", 0, "--batch-size", 8, "-q")
    cli("extract", "--ckpt", root / "tok", "--data", root / "data", "--out", root / "tokens.npy", "-q")
    cli("train", "gen", "--tokens", root / "tokens.npy", "--out", root / "gen", "--preset", "tiny", "--steps", 2, "-q")
    cli("sample", "--ckpt", root / "gen", "--class", "0,1", "--out", root / "pngs", "--steps", 2,
        "--decoder-steps", 2, "-q")
    cli("sample", "--ckpt", root / "gen", "--class", "0", "--out", root / "s.npz", "--steps", 2,
        "--decoder-steps", 2, "-q")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "img.png")
    return root


def _unwritable(t: Path) -> Path:
    """A folder this user cannot write into (as root, whom permissions do not stop: a path
    whose parent is a file)."""
    if os.geteuid() == 0:
        (t / "afile").write_text("x")
        return t / "afile" / "out"
    d = t / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d / "out"


def _stale_folder(t: Path) -> Path:
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("my files")
    return t / "mine"


def _existing(t: Path, name: str) -> Path:
    (t / name).write_bytes(b"precious")
    return t / name


def _copy_pngs(r: Path, t: Path) -> Path:
    import shutil

    shutil.copytree(r / "pngs", t / "pngs")
    return t / "pngs"


def _truncated_tokens(r: Path, t: Path) -> Path:
    """A copy of the session's tokens.npy (sidecars present) cut in half, as a killed copy leaves it."""
    import shutil

    from reptok.extract import sidecar_paths

    for p in sidecar_paths(r / "tokens.npy").values():
        if p.exists():
            shutil.copy(p, t / p.name)
    data = (t / "tokens.npy").read_bytes()
    (t / "tokens.npy").write_bytes(data[: len(data) // 2])
    return t / "tokens.npy"


RECON = lambda r, t, *a: ["train", "recon", "--data", r / "data", "--out", t / "new", "--preset", "tiny", *a]  # noqa: E731
GEN = lambda r, t, *a: ["train", "gen", "--tokens", r / "tokens.npy", "--out", t / "new", "--preset", "tiny", *a]  # noqa: E731
SAMPLE = lambda r, t, *a: ["sample", "--ckpt", r / "gen", "--out", t / "x.npz", "--steps", 2, "--decoder-steps", 2, *a]  # noqa: E731

# (id, args(r = session runs, t = this case's temp dir), a substring the message must hold)
CASES = [
    ("train-steps-0", lambda r, t: RECON(r, t, "--steps", 0), "--steps 0"),
    ("train-batch-0", lambda r, t: RECON(r, t, "--batch-size", 0), "--batch-size 0"),
    ("train-lr-negative", lambda r, t: RECON(r, t, "--lr", -1), "--lr"),
    ("train-ema-1.5", lambda r, t: RECON(r, t, "--ema", 1.5), "[0, 1)"),
    ("train-device-bogus", lambda r, t: RECON(r, t, "--device", "bogus"), "--device"),
    ("train-precision-typo", lambda r, t: RECON(r, t, "--precision", "fp33"), "did you mean 'fp32'"),
    ("train-time-sampler", lambda r, t: RECON(r, t, "--time-sampler", "gaussian"), "--time-sampler"),
    ("set-typo", lambda r, t: RECON(r, t, "--set", "train.stpes=3"), "did you mean 'train.steps'"),
    ("set-wrong-type", lambda r, t: RECON(r, t, "--set", "train.steps=abc"), "integer"),
    ("set-bool", lambda r, t: RECON(r, t, "--set", "train.hflip=maybe"), "true or false"),
    ("set-no-equals", lambda r, t: RECON(r, t, "--set", "train.steps"), "KEY=VALUE"),
    ("set-interval", lambda r, t: RECON(r, t, "--set", "sampling.cfg_interval=0.9,0.3"), "lo <= hi"),
    ("set-solver", lambda r, t: RECON(r, t, "--set", "sampling.solver=rk4"), "euler"),
    ("train-data-missing", lambda r, t: ["train", "recon", "--data", t / "nodata", "--out", t / "new", "--preset", "tiny"], ""),
    ("train-config-missing", lambda r, t: RECON(r, t, "--config", t / "nope.json"), ""),
    ("train-preset-bogus", lambda r, t: RECON(r, t)[:-1] + ["huge"], "preset"),
    ("train-existing-run", lambda r, t: ["train", "recon", "--data", r / "data", "--out", r / "tok", "--preset", "tiny"], "--resume"),
    ("train-resume-nothing", lambda r, t: RECON(r, t, "--resume"), "nothing to resume"),
    ("train-out-is-file", lambda r, t: ["train", "recon", "--data", r / "data", "--out", _existing(t, "f"), "--preset", "tiny"], "not a folder"),
    ("train-out-unwritable", lambda r, t: ["train", "recon", "--data", r / "data", "--out", _unwritable(t), "--preset", "tiny"], "writable"),
    ("train-ckpt-every-0", lambda r, t: RECON(r, t, "--ckpt-every", 0), "--ckpt-every 0"),
    ("train-grad-accum-not-divisor", lambda r, t: GEN(r, t, "--batch-size", 8, "--grad-accum", 3), "must divide the batch size (8)"),
    ("gen-tokens-truncated", lambda r, t: ["train", "gen", "--tokens", _truncated_tokens(r, t), "--out", t / "new",
                                           "--preset", "tiny"], "tokens.npy"),
    ("gen-tokens-missing", lambda r, t: ["train", "gen", "--tokens", t / "none.npy", "--out", t / "new", "--preset", "tiny"], ""),
    ("gen-class-dropout", lambda r, t: GEN(r, t, "--class-dropout", 1.5), "--class-dropout"),
    ("gen-token-norm", lambda r, t: GEN(r, t, "--token-norm", "l2"), "--token-norm"),
    ("gen-resume-tokenizer-run", lambda r, t: ["train", "gen", "--tokens", r / "tokens.npy", "--out", r / "tok", "--resume", "--preset", "tiny"], "tokenizer run"),
    ("sample-steps-0", lambda r, t: SAMPLE(r, t, "--steps", 0), "--steps 0"),
    ("sample-cfg-negative", lambda r, t: SAMPLE(r, t, "--cfg", -1), "--cfg"),
    ("sample-cfg-interval", lambda r, t: SAMPLE(r, t, "--cfg-interval", "0.9,0.3"), "--cfg-interval"),
    ("sample-cfg-interval-text", lambda r, t: SAMPLE(r, t, "--cfg-interval", "early"), "--cfg-interval"),
    ("sample-solver", lambda r, t: SAMPLE(r, t, "--solver", "rk9"), "euler | heun"),
    ("sample-precision", lambda r, t: SAMPLE(r, t, "--precision", "fp33"), "--precision"),
    ("sample-n-0", lambda r, t: SAMPLE(r, t, "-n", 0), "-n"),
    ("sample-class-range", lambda r, t: SAMPLE(r, t, "--class", 99), "--class 99"),
    ("sample-backend", lambda r, t: SAMPLE(r, t, "--backend", "tpu"), "--backend"),
    ("sample-tokenizer-run", lambda r, t: ["sample", "--ckpt", r / "tok", "--out", t / "x.npz"], "generator"),
    ("sample-ckpt-missing", lambda r, t: ["sample", "--ckpt", t / "norun", "--out", t / "x.npz"], ""),
    ("sample-npz-exists", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", _existing(t, "a.npz")], "--overwrite"),
    ("sample-grid-exists", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", _existing(t, "g.png")], "--overwrite"),
    ("sample-folder-mismatch", lambda r, t: ["sample", "--ckpt", r / "gen", "--class", "0,1", "--out", _copy_pngs(r, t),
                                             "--steps", 3, "--decoder-steps", 2], "steps=2, not 3"),
    ("sample-folder-other-classes", lambda r, t: ["sample", "--ckpt", r / "gen", "--class", "0,2", "--out", _copy_pngs(r, t),
                                                  "--steps", 2, "--decoder-steps", 2], "classes"),
    ("sample-folder-no-manifest", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", _stale_folder(t)], "--overwrite"),
    ("sample-out-unwritable", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", _unwritable(t).with_suffix(".npz")], "writable"),
    ("sample-out-proc", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", "/proc/x"], "/proc"),
    ("sample-npz-proc", lambda r, t: ["sample", "--ckpt", r / "gen", "--out", "/proc/x.npz"], "/proc"),
    ("extract-out-proc", lambda r, t: ["extract", "--ckpt", r / "tok", "--data", r / "data", "--out", "/proc/x.npy"], "/proc"),
    ("extract-exists", lambda r, t: ["extract", "--ckpt", r / "tok", "--data", r / "data", "--out", r / "tokens.npy"], "--overwrite"),
    ("extract-generator-run", lambda r, t: ["extract", "--ckpt", r / "gen", "--data", r / "data", "--out", t / "t.npy"], "tokenizer"),
    ("extract-suffix", lambda r, t: ["extract", "--ckpt", r / "tok", "--data", r / "data", "--out", t / "t.txt"], ".npy"),
    ("extract-batch-0", lambda r, t: ["extract", "--ckpt", r / "tok", "--data", r / "data", "--out", t / "t.npy", "-b", 0], "--batch-size"),
    ("reconstruct-generator-run", lambda r, t: ["reconstruct", r / "img.png", "--ckpt", r / "gen", "--out", t / "rec"], "tokenizer run"),
    ("reconstruct-missing-image", lambda r, t: ["reconstruct", t / "nope.png", "--ckpt", r / "tok", "--out", t / "rec"], "no such image"),
    ("reconstruct-exists", lambda r, t: ["reconstruct", r / "img.png", "--ckpt", r / "tok", "--out",
                                         _existing(t, "img_recon.png").parent], "--overwrite"),
    ("interpolate-exists", lambda r, t: ["interpolate", r / "img.png", r / "img.png", "--ckpt", r / "tok", "--out",
                                         _existing(t, "ab.png")], "--overwrite"),
    ("eval-out-exists", lambda r, t: ["eval", "gen", "--samples", r / "s.npz", "--ref", r / "data", "--features", "judge",
                                      "--out", _existing(t, "res.json")], "--overwrite"),
    ("info-preset-bogus", lambda r, t: ["info", "--preset", "gigantic"], "preset"),
    ("attach-out-not-empty", lambda r, t: ["train", "attach", "--generator", r / "gen", "--tokenizer", r / "tok",
                                           "--out", _existing(t, "f").parent], "not empty"),
    ("attach-tokenizer-is-generator", lambda r, t: ["train", "attach", "--generator", r / "gen", "--tokenizer", r / "gen",
                                                    "--out", t / "new"], "tokenizer run"),
    ("bench-engine-missing", lambda r, t: ["bench", "--ckpt", r / "gen", "--engine", t / "noengine"], "--engine"),
]


def _snapshot(*roots: Path) -> dict:
    snap = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                snap[str(p)] = (st.st_size, st.st_mtime_ns, p.is_dir())
    return snap


def _check_mistake(runs, tmp_path, args, expect):
    t = tmp_path / "case"
    t.mkdir()
    argv = [str(a) for a in args(runs, t)]
    before = _snapshot(t, runs)
    try:
        res = runner.invoke(app, argv)
    finally:
        for d in t.rglob("*"):  # let pytest clean up the read-only folder
            if d.is_dir():
                d.chmod(0o700)
    after = _snapshot(t, runs)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    where = f"reptok {' '.join(argv)}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert res.exit_code == 2, f"exit {res.exit_code} ({res.exception!r})\n{where}"
    assert len(lines) == 1, f"expected one stderr line\n{where}"
    assert "Traceback" not in res.output and lines[0].startswith("error:"), where
    assert expect in lines[0], f"{expect!r} not in the message\n{where}"
    assert res.stdout.strip() == "", where
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files changed: {changed[:5]}\n{where}"


@pytest.mark.parametrize("name,args,expect", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_exit_2_nothing_written(runs, tmp_path, name, args, expect):
    _check_mistake(runs, tmp_path, args, expect)


def test_every_command_has_its_mistakes():
    """The table is keyed by unique ids and reaches every command that takes user input (a case
    dropped or a command left out shows here: 60 today, update the count with the table); only cases about a missing path may leave the
    message unchecked (the path is in it either way)."""
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) == 60
    groups = {name.split("-")[0] for name in ids}  # ids start with the command they exercise
    assert groups == {"train", "set", "gen", "sample", "extract", "reconstruct", "interpolate", "eval", "info",
                      "attach", "bench"}
    assert all(expect or name.endswith("-missing") for name, _, expect in CASES)


def test_unwritable_output_is_refused_before_any_model_is_loaded(runs, tmp_path, monkeypatch):
    """``sample --out /proc/x`` and ``extract --out /proc/x.npy`` are exit 2 before the run is read
    (catches the output check moved after loading, where it used to be a raw FileNotFoundError)."""
    from reptok import pipeline

    def boom(*a, **k):
        raise AssertionError("the models were loaded before the output was checked")

    monkeypatch.setattr(pipeline.Pipeline, "from_run", classmethod(boom))
    for argv in (["sample", "--ckpt", runs / "gen", "--out", "/proc/x"],
                 ["extract", "--ckpt", runs / "tok", "--data", runs / "data", "--out", "/proc/x.npy"]):
        res = runner.invoke(app, [str(a) for a in argv])
        assert res.exit_code == 2 and "cannot create files in /proc" in res.stderr, res.output


def test_finished_resume_exits_0_and_says_so(runs):
    before = _snapshot(runs / "tok")
    res = runner.invoke(app, [str(a) for a in ("train", "recon", "--data", runs / "data", "--out", runs / "tok",
                                               "--resume", "--steps", 2, "--json")])
    assert res.exit_code == 0, res.output
    done = last_json(res)
    assert done["finished"] is True and done["step"] == 2 and done["trained_steps"] == 0
    assert isinstance(done["last_loss"], float)
    res = runner.invoke(app, [str(a) for a in ("train", "recon", "--data", runs / "data", "--out", runs / "tok",
                                               "--resume", "--steps", 2)])
    assert res.exit_code == 0 and "finished" in res.stderr
    assert _snapshot(runs / "tok") == before


def test_stale_run_dir_is_a_fresh_start(runs, tmp_path):
    """A folder with a config.json but no checkpoint (a failed start) does not block a new run."""
    out = tmp_path / "stale"
    out.mkdir()
    (out / "config.json").write_text('{"format": "reptok-run/1", "kind": "tokenizer"}')
    cli("train", "recon", "--data", runs / "data", "--out", out, "--preset", "tiny", "--steps", 1,
        "--sample-every", 0, "--batch-size", 8, "-q", "--no-tensorboard")
    assert (out / "train_state.pt").exists()
    assert json.loads((out / "config.json").read_text())["pipeline"]["train"]["steps"] == 1


def test_failed_start_leaves_no_run_dir(runs, tmp_path, monkeypatch):
    import reptok.train.recon as recon

    def boom(*a, **k):
        raise RuntimeError("simulated failure before the first checkpoint")

    monkeypatch.setattr(recon, "fit", boom)
    res = runner.invoke(app, [str(a) for a in ("train", "recon", "--data", runs / "data", "--out", tmp_path / "r",
                                               "--preset", "tiny", "--steps", 1, "--batch-size", 8)])
    assert res.exit_code == 1 and "simulated failure" in res.stderr
    assert not (tmp_path / "r").exists()


def test_matching_png_folder_resumes_and_overwrite_replaces(runs, tmp_path):
    out = _copy_pngs(runs, tmp_path)
    manifest = json.loads((out / ".reptok-sample.json").read_text())
    assert {"checkpoint", "weights_sha256", "seed", "cfg", "cfg_interval", "steps", "solver", "decoder_steps",
            "backend", "precision", "classes", "n"} <= set(manifest)
    assert "start" not in manifest and "count" not in manifest  # shards share one manifest
    (out / "000001_class0001.png").unlink()
    res = cli("sample", "--ckpt", runs / "gen", "--class", "0,1", "--out", out, "--steps", 2,
              "--decoder-steps", 2, "--start", 1, "--count", 1, "--json")
    s = last_json(res)
    assert s["generated"] == 1 and (out / "000001_class0001.png").exists()
    res = cli("sample", "--ckpt", runs / "gen", "--class", "0", "--out", out, "--steps", 3,
              "--decoder-steps", 2, "--overwrite", "--json")
    assert sorted(p.name for p in out.iterdir()) == [".reptok-sample.json", "000000_class0000.png"]
    assert json.loads((out / ".reptok-sample.json").read_text())["steps"] == 3


def test_overwrite_replaces_an_npz(runs, tmp_path):
    out = _existing(tmp_path, "a.npz")
    cli("sample", "--ckpt", runs / "gen", "--out", out, "--steps", 2, "--decoder-steps", 2, "--overwrite", "-q")
    assert np.load(out)["arr_0"].shape[0] == 1


def test_config_accepts_a_run_config_json(runs, tmp_path):
    res = cli("train", "recon", "--data", runs / "data", "--out", tmp_path / "c", "--config", runs / "tok" / "config.json",
              "--steps", 1, "--sample-every", 0, "--batch-size", 8, "-q", "--no-tensorboard", "--json")
    assert last_json(res)["steps"] == 1


def test_info_ckpt_describes_the_run(runs):
    info = last_json(cli("info", "--ckpt", runs / "gen", "--json"))["run"]
    assert info["kind"] == "generator" and info["step"] == 2
    assert info["parent"] and Path(info["parent"]).name == "tok"
    assert isinstance(info["last_loss"], float) and len(info["weights_sha256"]) == 64


def test_version_and_results_on_stdout(runs):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("reptok ") and "torch" in res.stdout
    res = runner.invoke(app, ["data", "info", str(runs / "data")])
    assert res.exit_code == 0 and "images" in res.stdout


def test_config_layer_coerces_set_values():
    from reptok.config import ConfigError
    from reptok.presets import get_preset

    cfg = get_preset("tiny").replace(**{"train.steps": "5", "sampling.cfg_interval": "0.2,0.8", "train.hflip": "true",
                                        "train.lr": "3e-4", "generator.text_encoder": "none"}).validate()
    assert cfg.train.steps == 5 and cfg.sampling.cfg_interval == (0.2, 0.8) and cfg.train.hflip is True
    assert cfg.train.lr == 3e-4 and cfg.generator.text_encoder is None
    with pytest.raises(ConfigError, match="did you mean 'decoder.depth'"):
        get_preset("tiny").replace(**{"decoder.dpeth": 2})
    with pytest.raises(ConfigError, match=r"train.batch_size=0: must be >= 1"):
        get_preset("tiny").replace(**{"train.batch_size": 0}).validate()
