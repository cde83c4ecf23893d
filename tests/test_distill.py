"""``reptok train distill`` / ``reptok train attach`` on the tiny preset (CPU): the student run's
layout and record, exact resume, fidelity to the teacher's many-step output, the student in every
place a decoder goes (reconstruct, eval recon, sample through an attached generator, export onnx +
the onnx backend), and bad inputs (exit 2, nothing written)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clihelp import cli, last_json, tiny_chain  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

K, TEACHER_STEPS = 2, 8
DISTILL = ["--student-steps", K, "--teacher-steps", TEACHER_STEPS, "--batch-size", 8, "--lr", 1e-3, "--json"]


@pytest.fixture(scope="module")
def dwork(tmp_path_factory):
    """builtin:shapes (48) -> tiny tokenizer (30 steps) -> tokens -> tiny generator (10 steps);
    the tokenizer distilled into a 2-step student (20 steps)."""
    root = tiny_chain(tmp_path_factory.mktemp("distill"), 48, 30, 10, recon_args=("--sample-every", 0, "--batch-size", 8))
    summary = last_json(cli("train", "distill", "--ckpt", root / "tok", "--out", root / "st", "--steps", 20, *DISTILL))
    (root / "distill_summary.json").write_text(json.dumps(summary))
    return root


# ----------------------------------------------------------------------------- the run
def test_student_run_layout_and_record(dwork):
    doc = json.loads((dwork / "st" / "config.json").read_text())
    assert doc["kind"] == "tokenizer"
    d = doc["distilled"]
    assert d["teacher"] == str((dwork / "tok").resolve())
    assert (d["teacher_steps"], d["student_steps"], d["method"]) == (TEACHER_STEPS, K, "reflow")
    assert doc["pipeline"]["sampling"]["decoder_steps"] == K
    assert json.loads((dwork / "distill_summary.json").read_text())["distilled"]["student_steps"] == K
    teacher, student = load_file(str(dwork / "tok" / "ema.safetensors")), load_file(str(dwork / "st" / "ema.safetensors"))
    assert set(teacher) == set(student)  # the same weights layout: a normal tokenizer run
    enc = [k for k in teacher if k.startswith("encoder.")]
    assert enc and all(torch.equal(teacher[k], student[k]) for k in enc)  # frozen: the same tokens
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if k.startswith("decoder."))
    rows = [json.loads(x) for x in (dwork / "st" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and rows[-1]["loss"] < rows[0]["loss"]


def test_info_says_distilled(dwork):
    out = last_json(cli("info", "--ckpt", dwork / "st", "--json"))
    assert out["distilled"]["student_steps"] == K and out["distilled"]["teacher"] == str((dwork / "tok").resolve())
    text = cli("info", "--ckpt", dwork / "st").output
    assert f"distilled: a {K}-step decoder from the teacher" in text and f"({TEACHER_STEPS} steps" in text
    assert "distilled" not in last_json(cli("info", "--ckpt", dwork / "tok", "--json"))


def test_teacher_grid_keeps_the_teacher_steps_and_the_window_edges():
    from reptok import flow
    from reptok.train.distill import teacher_grid

    grid, edges = teacher_grid(8, 2)
    assert torch.equal(grid, flow.time_grid(8)) and edges == [0, 4, 8]
    grid, edges = teacher_grid(50, 4)  # 0.25 and 0.75 are not on the 50-step grid
    assert len(grid) == 53 and torch.equal(grid[edges], flow.time_grid(4))
    assert bool((grid[1:] > grid[:-1]).all())


def test_student_is_closer_to_the_teacher_than_the_teacher_at_k_steps(dwork):
    """On training images: the student's K-step output vs the teacher's TEACHER_STEPS-step output
    is closer than the teacher's own K-step output (the point of distilling)."""
    from reptok.pipeline import Pipeline
    from reptok.data.dataset import PreparedDataset
    from reptok.pipeline import STREAM_DECODER, index_noise

    x = torch.as_tensor(PreparedDataset(dwork / "data").get_batch(list(range(32)))["image"])
    teacher, student = Pipeline.from_run(dwork / "tok"), Pipeline.from_run(dwork / "st")
    z = teacher.encode(x)
    assert torch.equal(z, student.encode(x))
    noise = index_noise(5, range(32), teacher.latent_shape, STREAM_DECODER)
    ref = teacher.decode_latents(z, noise, teacher.sampler_args(decoder_steps=TEACHER_STEPS))
    err_teacher = float(((teacher.decode_latents(z, noise, teacher.sampler_args(decoder_steps=K)) - ref) ** 2).mean())
    err_student = float(((student.decode_latents(z, noise) - ref) ** 2).mean())  # default steps: K
    assert err_student < 0.7 * err_teacher, (err_student, err_teacher)


def test_perflow_points_inside_windows(dwork, tmp_path):
    from reptok.train.distill import DistillTask

    res = last_json(cli("train", "distill", "--ckpt", dwork / "tok", "--out", tmp_path / "p", "--steps", 2,
                        "--method", "perflow", *DISTILL))
    assert res["distilled"]["method"] == "perflow"
    task = DistillTask.__new__(DistillTask)
    task.student_steps, task.latent_shape, task.method = 3, (3, 4, 4), "perflow"
    u = task.draw_noise(5, torch.Generator().manual_seed(0))["u"]
    assert u.shape == (5, 3) and 0 <= float(u.min()) and float(u.max()) < 1 and float(u.std()) > 0


def test_resume_equals_uninterrupted(dwork, tmp_path):
    common = ["--ckpt", dwork / "tok", "--ckpt-every", 3, *DISTILL]
    cli("train", "distill", "--out", tmp_path / "a", "--steps", 6, *common)
    cli("train", "distill", "--out", tmp_path / "b", "--steps", 3, *common)
    cli("train", "distill", "--out", tmp_path / "b", "--steps", 6, "--resume", "--ckpt", dwork / "tok", "--json")
    key = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    ka, kb = key(tmp_path / "a"), key(tmp_path / "b")
    assert 6 in ka and all(ka[s] == kb[s] for s in ka)
    for name in ("ema.safetensors", "model.safetensors"):
        wa, wb = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- the student everywhere
def test_reconstruct_uses_the_student_steps(dwork, tmp_path):
    from PIL import Image

    from reptok.data.dataset import PreparedDataset

    Image.fromarray(PreparedDataset(dwork / "data").get_uint8([0])[0]).save(tmp_path / "img.png")
    a = last_json(cli("reconstruct", tmp_path / "img.png", "--ckpt", dwork / "st", "--out", tmp_path / "a", "--json"))
    b = last_json(cli("reconstruct", tmp_path / "img.png", "--ckpt", dwork / "st", "--out", tmp_path / "b",
                      "--decoder-steps", K, "--json"))
    c = last_json(cli("reconstruct", tmp_path / "img.png", "--ckpt", dwork / "st", "--out", tmp_path / "c",
                      "--decoder-steps", TEACHER_STEPS, "--json"))
    assert a["mean_psnr"] == b["mean_psnr"] != c["mean_psnr"]


def test_eval_recon_defaults_to_the_student_steps(dwork, monkeypatch, tmp_path):
    """(Writes only into tmp_path: the module's runs stay as built, so the test can run twice.)"""
    from reptok.io import save_tensors
    from reptok.shapes.judge import JudgeNet, judge_cache_path

    cache = tmp_path / "cache"
    torch.manual_seed(0)  # a random judge: nothing trains
    save_tensors(judge_cache_path(cache), JudgeNet().state_dict(), metadata={"heldout_accuracy": 0.0})
    monkeypatch.setenv("REPTOK_CACHE", str(cache))
    res = last_json(cli("eval", "recon", "--ckpt", dwork / "st", "--data", dwork / "data", "--limit", 8,
                        "--features", "judge", "--out", tmp_path / "eval.json", "--json"))
    assert res["decoder_steps"] == K and np.isfinite(res["psnr"])


def test_attach_generator_samples_with_the_student(dwork, tmp_path):
    res = last_json(cli("train", "attach", "--generator", dwork / "gen", "--tokenizer", dwork / "st",
                        "--out", tmp_path / "g", "--json"))
    assert res["decoder_steps"] == K
    doc = json.loads((tmp_path / "g" / "config.json").read_text())
    assert doc["kind"] == "generator" and doc["tokenizer_run"] == str((dwork / "st").resolve())
    assert doc["distilled"]["student_steps"] == K
    assert last_json(cli("info", "--ckpt", tmp_path / "g", "--json"))["distilled"]["student_steps"] == K
    args = ["--class", "0,1", "-n", 2, "--steps", 3, "--json"]
    cli("sample", "--ckpt", tmp_path / "g", "--out", tmp_path / "a.npz", *args)
    cli("sample", "--ckpt", tmp_path / "g", "--out", tmp_path / "b.npz", "--decoder-steps", K, *args)
    cli("sample", "--ckpt", dwork / "gen", "--out", tmp_path / "t.npz", "--decoder-steps", K, *args)
    a, b, t = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in "abt")
    assert a.shape == (4, 32, 32, 3) and np.array_equal(a, b)  # K steps by default
    assert not np.array_equal(a, t)  # the student's decoder, not the teacher's
    # the onnx backend runs the same student graph
    cli("export", "onnx", "--ckpt", tmp_path / "g", "--out", tmp_path / "onnx", "--json")
    cli("sample", "--ckpt", tmp_path / "g", "--out", tmp_path / "o.npz", "--backend", "onnx", "--engine",
        tmp_path / "onnx", *args)
    o = np.load(tmp_path / "o.npz")["arr_0"]
    assert np.abs(o.astype(int) - a.astype(int)).max() <= 2


def test_export_onnx_of_the_student(dwork, tmp_path):
    out = last_json(cli("export", "onnx", "--ckpt", dwork / "st", "--out", tmp_path / "o", "--components", "decoder",
                        "--json"))
    verify = out["graphs"]["decoder"]["verify"]
    assert all(v["max_abs_err"] <= v["limit"] for v in verify)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("args, needle", [
    (["--student-steps", 0], "must be >= 1"),
    (["--student-steps", 9, "--teacher-steps", 8], "must take more steps"),
    (["--student-steps", 2, "--method", "magic"], "--method"),
    ([], "--student-steps K is required"),
])
def test_bad_distill_inputs_exit_2_and_write_nothing(dwork, tmp_path, args, needle):
    res = cli("train", "distill", "--ckpt", dwork / "tok", "--out", tmp_path / "x", "--steps", 2, *args, code=2)
    assert needle in res.output and not (tmp_path / "x").exists()


def test_distill_needs_a_tokenizer_run(dwork, tmp_path):
    res = cli("train", "distill", "--ckpt", dwork / "gen", "--out", tmp_path / "x", "--student-steps", 2, code=2)
    assert "needs a tokenizer run" in res.output and not (tmp_path / "x").exists()
    res = cli("train", "distill", "--ckpt", tmp_path / "nope", "--out", tmp_path / "x", "--student-steps", 2, code=2)
    assert "not a reptok run directory" in res.output


def test_existing_run_and_changed_k_on_resume(dwork):
    before = (dwork / "st" / "ema.safetensors").read_bytes()
    res = cli("train", "distill", "--ckpt", dwork / "tok", "--out", dwork / "st", "--steps", 2, *DISTILL, code=2)
    assert "already holds a run" in res.output
    res = cli("train", "distill", "--ckpt", dwork / "tok", "--out", dwork / "st", "--steps", 30, "--resume",
              "--student-steps", 4, code=2)
    assert "keeps it" in res.output
    assert (dwork / "st" / "ema.safetensors").read_bytes() == before


def test_attach_refuses_a_different_encoder(dwork, tmp_path):
    cli("train", "recon", "--data", dwork / "data", "--out", tmp_path / "other", "--preset", "tiny", "--steps", 2,
        "--sample-every", 0, "--batch-size", 8, "--seed", 3)
    res = cli("train", "attach", "--generator", dwork / "gen", "--tokenizer", tmp_path / "other", "--out",
              tmp_path / "g", code=2)
    assert "its encoder differs" in res.output and not (tmp_path / "g").exists()
    res = cli("train", "attach", "--generator", dwork / "st", "--tokenizer", dwork / "st", "--out", tmp_path / "g",
              code=2)
    assert "needs a generator run" in res.output


# ----------------------------------------------------------------------------- DDP
def test_two_ranks_equal_one_process(dwork, tmp_path):
    """torchrun (gloo, 2 ranks, half the batch each) trains the same student as one process."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is required")
    from test_distributed import assert_same_weights, one_thread, torchrun

    args = ["train", "distill", "--ckpt", dwork / "tok", "--steps", 3, "--device", "cpu", *DISTILL]
    torchrun(*args, "--out", tmp_path / "ddp")
    with one_thread():
        cli(*args, "--out", tmp_path / "one")
    assert_same_weights(tmp_path / "ddp", tmp_path / "one")
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", "ema.safetensors")
