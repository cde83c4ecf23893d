"""Run-directory format: save -> load is bit-identical; a mismatched config fails in one line."""

import json

import pytest
import torch

from reptok import run as rundir
from reptok.errors import InputError
from reptok.pipeline import Pipeline
from reptok.presets import get_preset


def _save_run(tmp_path, cfg=None):
    cfg = cfg or get_preset("tiny")
    torch.manual_seed(0)
    pipe = Pipeline.build(cfg)
    for p in pipe.parameters():  # non-zero everywhere, so every tensor matters
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    rundir.write_run_config(tmp_path, cfg, "pipeline")
    mods = {"encoder": pipe.encoder, "decoder": pipe.decoder, "generator": pipe.generator}
    rundir.save_weights(tmp_path, mods, ema=mods)
    return pipe


def test_save_load_bit_identical(tmp_path):
    pipe = _save_run(tmp_path).eval()
    again = Pipeline.from_run(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.tensor([1, 4])
    assert torch.equal(pipe.encode(x), again.encode(x))
    a, b = (p.decode(p.generate(labels, p.generator_noise([0, 1], 3), p.sampler_args(steps=3)),
                     p.decoder_noise([0, 1], 3), p.sampler_args(decoder_steps=3)) for p in (pipe, again))
    assert torch.equal(a, b)


def test_mismatched_config_names_first_bad_key(tmp_path):
    _save_run(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["pipeline"]["decoder"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"missing key 'blocks\.2\.") as e:
        Pipeline.from_run(tmp_path)
    assert "\n" not in str(e.value)
    doc["pipeline"]["decoder"]["depth"] = 2
    doc["pipeline"]["generator"]["dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="has shape"):
        Pipeline.from_run(tmp_path)


def test_cli_reports_mismatch_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from reptok_cli.app import app

    _save_run(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["pipeline"]["generator"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "s.npz")])
    assert res.exit_code == 2 and "does not match the config" in res.output


def test_not_a_run_directory(tmp_path):
    with pytest.raises(InputError, match="not a reptok run"):
        Pipeline.from_run(tmp_path)
