"""Shared CLI test helpers: run ``reptok`` in-process and read its ``--json`` line."""

import json

from typer.testing import CliRunner

from reptok_cli.app import app

runner = CliRunner()


def cli(*args, code=0):
    """Invoke ``reptok ARGS`` and assert its exit code (paths may be Path objects)."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def last_json(res):
    """The JSON object on the last stdout line."""
    return json.loads(res.stdout.strip().splitlines()[-1])


def tiny_chain(root, images: int, recon_steps: int, gen_steps: int, recon_args=(), extract_args=(), gen_args=()):
    """builtin:shapes (``images``) -> tiny tokenizer ``root/tok`` -> ``root/tokens.npy`` -> tiny
    class generator ``root/gen``, through the CLI as a user runs it; the ``*_args`` are extra
    options of each command. Returns ``root``."""
    from reptok.data.prep import prepare

    prepare("builtin:shapes", root / "data", limit=images)
    cli("train", "recon", "--data", root / "data", "--out", root / "tok", "--preset", "tiny", "--steps", recon_steps,
        *recon_args)
    cli("extract", "--ckpt", root / "tok", "--data", root / "data", "--out", root / "tokens.npy", *extract_args)
    cli("train", "gen", "--tokens", root / "tokens.npy", "--out", root / "gen", "--preset", "tiny", "--steps", gen_steps,
        *gen_args)
    return root
