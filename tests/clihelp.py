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
