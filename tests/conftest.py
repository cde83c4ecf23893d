import os

# Two CPU cores on CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Judge weights and other caches go to a per-session temp dir, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "reptok-cache"
    monkeypatch.setenv("REPTOK_CACHE", str(cache))
    yield


# ----------------------------------------------------------------------------- shared tiny runs
# The data -> tokenizer -> tokens -> generator chain, built once per test session through the CLI
# (as a user would) and shared read-only by the test files that only need *a* trained tiny run.
# Files whose assertions depend on a particular recipe (distillation quality, eval sizes,
# one-thread references for torchrun parity) keep their own chain.
@pytest.fixture(scope="session")
def class_runs(tmp_path_factory):
    """builtin:shapes (48 captioned images, 32 px) -> tiny tokenizer ``tok`` (6 steps, checkpoints
    and reconstruction grids at 3 and 6) -> ``tokens.npy`` -> tiny class generator ``gen`` (20 steps)."""
    from clihelp import tiny_chain

    return tiny_chain(tmp_path_factory.mktemp("class_runs"), 48, 6, 20,
                      recon_args=("--ckpt-every", 3, "--sample-every", 3, "--batch-size", 8, "--json"),
                      extract_args=("--batch-size", 20), gen_args=("--json",))


@pytest.fixture(scope="session")
def text_runs(class_runs):
    """``class_runs`` plus a tiny text-to-image generator ``t2i`` (60 steps, the offline ``tiny``
    text tower) on the same tokens' captions; its --json summary in ``t2i_summary.json``."""
    import json

    from clihelp import cli, last_json

    root = class_runs
    if not (root / "t2i").exists():
        res = cli("train", "gen", "--tokens", root / "tokens.npy", "--out", root / "t2i", "--preset", "tiny",
                  "--steps", 60, "--text-encoder", "tiny", "--set", "train.log_every=5", "--json")
        (root / "t2i_summary.json").write_text(json.dumps(last_json(res)))
    return root
