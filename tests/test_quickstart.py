"""`reptok quickstart` wiring at the tiny preset (the real small-preset run is a benchmark)."""

import json

from typer.testing import CliRunner

from reptok_cli.app import app


def test_quickstart_tiny_writes_report(tmp_path):
    out = tmp_path / "qs"
    res = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--preset", "tiny", "--images", "96",
                                   "--recon-steps", "3", "--gen-steps", "3", "--eval-per-class", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stdout is the one JSON line; stage lines go to stderr
    assert "[train recon] done" in res.stderr
    for key in ("recon_psnr_db", "class_accuracy", "judge_accuracy_on_real", "seconds", "total_seconds"):
        assert key in report
    assert 0.0 <= report["class_accuracy"] <= 1.0 and report["samples_judged"] == 12
    assert report["judge_accuracy_on_real"] > 0.9
    val = report["validation"]  # held-out set, val_every = steps // 4 -> 1: every step
    assert [r["step"] for r in val["tokenizer"]] == [1, 2, 3] and [r["step"] for r in val["generator"]] == [1, 2, 3]
    assert {"rf", "psnr", "fid_proxy"} <= set(val["tokenizer"][-1]) and "token_fd" in val["generator"][-1]
    assert "| tokenizer step | rf |" in (out / "report.md").read_text()
    for name in ("samples_grid.png", "reconstructions.png", "report.json", "report.md", "tokens.npy"):
        assert (out / name).exists(), name
    assert set(report["seconds"]) == {"data", "judge", "train recon", "extract", "train gen", "sample", "reconstruct"}
    # A second run into the same folder refuses to clobber it.
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--preset", "tiny"])
    assert again.exit_code == 2 and "--overwrite" in again.output
