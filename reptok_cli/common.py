"""Shared CLI plumbing: the Typer app, error handling (exit codes), JSON output, consoles.

Exit codes: 0 ok, 1 failure, 2 bad usage or input (``reptok.errors.InputError``).
Progress and messages go to stderr; ``--json`` summaries are one line on stdout.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import typer
from rich.console import Console

from reptok.errors import InputError

app = typer.Typer(
    name="reptok",
    help="Single-token latent image generation (RepTok): data, training, sampling, evaluation, export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)


def _one_line_usage_error(e) -> None:
    """Click's usage errors (a missing option, a bad type, an out-of-range value) as one line on
    stderr, like every other input error: ``error: Invalid value for '-n': 0 is not in the range
    x>=1. (reptok sample -h for help)`` instead of a usage block and a panel."""
    import click

    hint = ""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        hint = f" ({ctx.command_path} -h for help)"
    click.echo(f"error: {e.format_message()}{hint}", err=True)


def _install_error_format() -> None:
    import click
    from typer import rich_utils

    rich_utils.rich_format_error = _one_line_usage_error
    click.ClickException.show = lambda self, file=None: _one_line_usage_error(self)


_install_error_format()


def version_line() -> str:
    """``reptok --version``: package, torch, CUDA and the device, one line."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        pkg = version("reptok")
    except PackageNotFoundError:
        pkg = "unknown"
    cuda = torch.version.cuda or "none"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"reptok {pkg}, torch {torch.__version__}, CUDA {cuda}, device {dev}"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the reptok, torch and CUDA versions and the device, then exit.")):
    """Single-token latent image generation (RepTok): data, training, sampling, evaluation, export."""


def fail(message: str, code: int = 2) -> "typer.Exit":
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Map exceptions to exit codes with a one-line message (REPTOK_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from reptok.dist import shutdown

        planned = False  # every rank reaches a command's own end (or its own exit, e.g. 143)
        try:
            result = fn(*args, **kwargs)
            planned = True
            return result
        except (typer.Exit, typer.Abort, SystemExit):
            planned = True
            raise
        except InputError as e:
            if os.environ.get("REPTOK_DEBUG"):
                raise
            raise fail(str(e), 2) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("REPTOK_DEBUG"):
                raise
            raise fail(f"{type(e).__name__}: {e} (set REPTOK_DEBUG=1 for the traceback)", 1) from None
        finally:  # after an error a peer may never arrive: leave without waiting for it
            shutdown(sync=planned)

    return wrapper


def result_console(json_out: bool = False) -> Console:
    """Where a command's human-readable result goes: stdout, or stderr with ``--json`` (stdout
    is then the one JSON line)."""
    return err if json_out else Console(soft_wrap=True)


def emit_json(obj) -> None:
    """One JSON object on one stdout line (what scripts parse)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def parse_device(device: str | None) -> str:
    import torch

    import re

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise InputError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def init_ranks(dev: str):
    """Join the torchrun process group (no-op for one process); each rank gets its own GPU.
    Returns (device, DistInfo)."""
    from reptok.dist import init_distributed

    info = init_distributed(dev)
    if info.enabled and dev.startswith("cuda"):
        dev = f"cuda:{info.local_rank}"
    return dev, info


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True):
    """A transient progress bar on stderr; yields ``advance(k)`` (None when disabled, so the
    library skips the callback)."""
    if not enabled:
        yield None
        return
    from rich.progress import Progress

    bar = Progress(console=err, transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    try:
        yield lambda k: bar.advance(task, k)
    finally:
        bar.stop()
