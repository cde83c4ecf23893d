"""Validation during training (reptok/train/validate.py) and the TFLOP/s / MFU of the training
log (reptok/flops.py). 1 vs 2 ranks: tests/test_distributed.py (the gen two-rank case)."""

import json

import pytest
import torch

from clihelp import cli
from reptok import flops
from reptok.dist import DistInfo
from reptok.run import read_run_config
from reptok.train import validate as V


def rows(run, split="val"):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("split", "train") == split]


# ----------------------------------------------------------------------------- the fixed-t loss
def _oracle(x1_rows, offset):
    """The exact velocity x1 - x0 recovered from (x_t, t), plus ``offset(t)``."""
    return lambda xt, t: (x1_rows - xt) / (1 - t).view(-1, 1, 1) + offset(t).view(-1, 1, 1)


def test_fixed_t_loss_is_zero_for_the_exact_velocity_and_the_offset_squared_otherwise():
    x1 = torch.randn(3, 2, 4)
    rep = x1.repeat_interleave(V.K_TIMES, 0)
    exact = V.fixed_t_loss(_oracle(rep, lambda t: 0 * t), x1, [0, 1, 2], seed=0)
    assert exact.abs().max() < 1e-10
    # Off by t: each item's loss is the mean of t^2 over the midpoints (k + 0.5) / 8,
    # sum_k (k + 0.5)^2 / 8^3 = 170 / 512 (times k / 8 would give 140 / 512, random times anything).
    wrong = V.fixed_t_loss(_oracle(rep, lambda t: t), x1, [0, 1, 2], seed=0)
    torch.testing.assert_close(wrong, torch.full((3,), 170 / 512, dtype=torch.float64), atol=1e-6, rtol=0)


def test_fixed_t_noise_belongs_to_the_item_not_to_its_place_in_the_batch():
    x1 = torch.randn(2, 3, 4)
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731 - the loss is then |x1 - x0|^2: it sees the noise
    pair = V.fixed_t_loss(zero, x1, [7, 9], seed=3)
    alone = V.fixed_t_loss(zero, x1[1:], [9], seed=3)
    assert pair[1] == alone[0]
    assert V.fixed_t_loss(zero, x1[1:], [9], seed=4)[0] != alone[0]


def test_chunks_are_the_same_for_any_world_size():
    one = V.my_chunks(70, DistInfo())
    two = [V.my_chunks(70, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(two[0] + two[1]) == one and not set(two[0]) & set(two[1])
    assert one == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]


# ----------------------------------------------------------------------------- stage b
def test_gen_validation_of_a_resumed_run_equals_an_uninterrupted_one(class_runs, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toks = class_runs / "tokens.npy"
    common = ["--tokens", toks, "--val-every", 2, "--preset", "tiny", "--batch-size", 8, "--ckpt-every", 2,
              "--set", "train.log_every=2", "--set", "train.val_fid_n=24"]
    full = cli("train", "gen", "--out", tmp_path / "full", "--steps", 4, "--val-tokens", toks, *common)
    cli("train", "gen", "--out", tmp_path / "cut", "--steps", 2, "--val-tokens", toks, *common, "--json")
    cli("train", "gen", "--out", tmp_path / "cut", "--steps", 4, "--resume", *common, "--json")  # finds its val set
    a, b = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in a] == [2, 4] and a == b
    classes = read_run_config(tmp_path / "full")["config"].generator.num_classes
    assert a[-1]["fd_n"] == 24 and a[-1]["fd_per_class"] == 24 // classes and a[-1]["token_fd"] > 0
    assert "val step 4/4 loss" in full.stderr and "no MFU (unknown device: CPU)" in full.stderr
    assert "mfu" not in rows(tmp_path / "full", "train")[-1]
    acc = EventAccumulator(str(tmp_path / "full" / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("val/rf")] == [2, 4]
    assert acc.Scalars("val/token_fd")[-1].value == pytest.approx(a[-1]["token_fd"], rel=1e-5)


def test_validation_is_off_without_a_held_out_set_and_a_bad_one_exits_2(class_runs, tmp_path):
    res = cli("train", "gen", "--tokens", class_runs / "tokens.npy", "--out", tmp_path / "g", "--preset", "tiny",
              "--steps", 1, "--batch-size", 8)
    assert "validation off: no held-out set" in res.stderr and rows(tmp_path / "g") == []
    res = cli("train", "gen", "--tokens", class_runs / "tokens.npy", "--val-tokens", tmp_path / "none.npy",
              "--out", tmp_path / "h", "--preset", "tiny", "--steps", 1, code=2)
    assert "none.npy" in res.output and not (tmp_path / "h" / "config.json").exists()


def test_text_to_image_validation_conditions_on_the_held_out_captions(class_runs, tmp_path):
    toks = class_runs / "tokens.npy"
    cli("train", "gen", "--tokens", toks, "--val-tokens", toks, "--text-encoder", "tiny", "--out", tmp_path / "t",
        "--preset", "tiny", "--steps", 2, "--batch-size", 8, "--val-every", 2, "--set", "train.val_fid_n=16",
        "--set", "train.val_examples=16", "--json")
    (rec,) = rows(tmp_path / "t")
    assert rec["rf"] > 0 and rec["token_fd"] > 0 and rec["fd_n"] == 16 and "fd_per_class" not in rec


# ----------------------------------------------------------------------------- stage a
def test_recon_validation_rows_scalars_and_grid(class_runs, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reptok.io import save_tensors
    from reptok.shapes.judge import JudgeNet, judge_cache_path

    monkeypatch.setenv("REPTOK_CACHE", str(tmp_path / "cache"))  # a random judge: nothing trains
    save_tensors(judge_cache_path(tmp_path / "cache"), JudgeNet().state_dict(), metadata={"heldout_accuracy": "0.0"})
    cli("train", "recon", "--data", class_runs / "data", "--val-data", class_runs / "data", "--out", tmp_path / "r",
        "--preset", "tiny", "--steps", 2, "--batch-size", 8, "--val-every", 2, "--sample-every", 0, "--set",
        "train.val_examples=20", "--set", "train.val_fid_n=10", "--set", "train.cos_weight=2", "--json")
    (rec,) = rows(tmp_path / "r")
    assert rec["step"] == 2 and rec["features"] == "judge" and rec["fid_n"] == 10
    assert rec["loss"] == pytest.approx(rec["rf"] + 2 * rec["cos"], abs=2e-6)
    assert 0 < rec["psnr"] < 100 and -1 <= rec["ssim"] <= 1 and rec["fid_proxy"] >= 0
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload()
    assert {"val/rf", "val/cos", "val/psnr", "val/ssim", "val/fid_proxy"} <= set(acc.Tags()["scalars"])
    (img,) = acc.Images("val/recon")
    assert img.step == 2 and img.height == 2 * 32 + 3 * 2  # originals over reconstructions


# ----------------------------------------------------------------------------- MFU
def test_peak_table_picks_the_variant_before_the_family():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989.0)
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == ("H100 PCIe", 756.0)
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == ("A100", 156.0)
    assert flops.peak_tflops("NVIDIA A10G", "bf16") == ("A10G", 70.0)
    assert flops.peak_tflops("Some Future GPU", "bf16") is None
    assert flops.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores: no guess


def test_mfu_from_a_known_peak_and_none_on_cpu():
    util = flops.utilisation(250.0, 4.0, ("H100", 989.0))  # 250 img/s x 4 GFLOP = 1 TFLOP/s
    assert util == {"tflops": 1.0, "mfu": 0.001011}  # 1 / 989 to 4 significant digits
    assert flops.describe(util, "NVIDIA H100 80GB HBM3", ("H100", 989.0)) == "1 TFLOP/s, MFU 0.1 % (H100 peak 989)"
    name, peak = flops.device_peak("cpu")
    assert (name, peak) == ("CPU", None)
    cpu = flops.utilisation(250.0, 4.0, peak)
    assert cpu["mfu"] is None and flops.describe(cpu, name, peak) == "1 TFLOP/s, no MFU (unknown device: CPU)"


def test_bench_train_rows_model_alone_and_loader_fed():
    from reptok.info import model_report
    from reptok.presets import get_preset

    res = cli("bench", "--preset", "tiny", "--train", "gen", "--batch-sizes", 8, "--iters", 2, "--device", "cpu", "--json")
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(r["stage"], r["mode"]) for r in doc["rows"]] == [("gen", "model"), ("gen", "loader")]
    (gen,) = model_report(get_preset("tiny"), components=("generator",))
    for r in doc["rows"]:  # a training step: 3 x the generator's forward FLOPs (forward + 2 backward)
        assert r["batch"] == 8 and r["mfu"] is None
        assert r["tflops"] == pytest.approx(r["images_per_s"] * 3 * gen["gflops"] / 1e3, rel=2e-3)
    assert doc["peak"] == {"device": "CPU", "peak_tflops": None}
    assert "choose from recon, gen" in cli("bench", "--preset", "tiny", "--train", "decoder", code=2).output
    assert "--preset" in cli("bench", "--ckpt", "x", "--train", "gen", code=2).output
