"""ONNX export of the text-conditioned generator (issue 9), offline on CPU.

A tiny text-to-image run (builtin:shapes captions, tiny tokenizer, ``train gen --text-encoder
tiny``) is exported with ``reptok export onnx``; the generator graph takes x, t, text (B, L, E)
and text_mask (B, L) float 0/1, matches torch under ONNX Runtime, and ``reptok sample --prompt``
with ``--backend onnx`` (prompts encoded by the torch text encoder) matches ``--backend torch``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reptok_cli.app import app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
runner = CliRunner()


def cli(*args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def t2i(text_runs, tmp_path_factory):
    """The shared tiny text-to-image chain (tests/conftest.py), linked into a private folder, plus
    ``reptok export onnx`` of its generator and decoder there (the shared runs stay untouched)."""
    root = tmp_path_factory.mktemp("t2i_export")
    for name in ("data", "tok", "tokens.npy", "t2i"):
        (root / name).symlink_to(text_runs / name)
    cli("export", "onnx", "--ckpt", root / "t2i", "--out", root / "onnx", "--components", "generator,decoder")
    return root


def test_manifest_records_text_generator(t2i):
    import onnx

    m = json.loads((t2i / "onnx" / "manifest.json").read_text())
    g = m["generator"]
    assert g["text_conditioned"] is True and g["null_class"] is None
    assert (g["text_encoder"], g["text_dim"], g["text_len"]) == ("tiny", 64, 32)
    assert "generator" not in m["skipped"]
    entry = m["graphs"]["generator"]
    ins = {i["name"]: i for i in entry["inputs"]}
    assert list(ins) == ["x", "t", "text", "text_mask"]
    assert ins["text"]["shape"] == ["batch", 32, 64] and ins["text"]["dtype"] == "float32"
    assert ins["text_mask"]["shape"] == ["batch", 32] and ins["text_mask"]["dtype"] == "float32"
    assert entry["outputs"][0]["shape"] == ["batch", g["n_tokens"], g["token_dim"]]
    assert all(r["max_abs_err"] <= r["limit"] for r in entry["verify"])
    onnx.checker.check_model(str(t2i / "onnx" / "generator.onnx"))


def test_generator_graph_ort_parity(t2i):
    """Real prompts' hidden states (bool mask from the encoder) through the runtime shim vs torch."""
    from export.runtime import load_runtime_pipeline
    from reptok.pipeline import Pipeline

    ref = Pipeline.from_run(t2i / "t2i", components=("generator",))
    rt = load_runtime_pipeline(t2i / "t2i", t2i / "onnx")
    assert rt.text_encoder is not None and rt.generator.null_class is None
    hidden, mask = ref.text_encoder.encode(["a red circle", "", "a large blue ring in the top left"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, ref.cfg.generator.n_tokens, ref.cfg.generator.token_dim, generator=g)
    t = torch.rand(3, generator=g)
    with torch.no_grad():
        want = ref.generator(x, t, hidden, mask)
    got = rt.generator(x, t, hidden, mask)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert want.abs().max() > 1e-3  # trained a little: not the zero-init output layer
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_sample_prompt_onnx_vs_torch_cli(t2i, tmp_path):
    common = ["sample", "--ckpt", t2i / "t2i", "--prompt", "a red circle", "-n", "2", "--seed", "3",
              "--device", "cpu", "--json"]
    cli(*common, "--out", tmp_path / "torch.npz")
    res = cli(*common, "--out", tmp_path / "onnx.npz", "--backend", "onnx", "--engine", t2i / "onnx")
    assert json.loads(res.stdout.strip().splitlines()[-1])["backend"] == "onnx"
    a = np.load(tmp_path / "torch.npz")["arr_0"].astype(int)
    b = np.load(tmp_path / "onnx.npz")["arr_0"].astype(int)
    assert a.shape == b.shape and a.shape[0] == 2
    assert np.abs(a - b).max() <= 1  # uint8 rounding at most
