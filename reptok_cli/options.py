"""Shared by commands: config resolution (preset / run config / --config file / --set overrides),
option declarations used by several commands (one declaration each), and the translation of a
config-layer error into the CLI option that set the value (``--steps 0: must be >= 1``).

Validation itself lives once, in :mod:`reptok.config` (types, ranges, choices); this module
only says which option set which key."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import typer

from reptok.config import ConfigError, PipelineConfig
from reptok.errors import InputError

# ----------------------------------------------------------------------------- shared options
# One declaration per shared option; commands call these (help texts may add specifics).


def device_option(panel: Optional[str] = None):
    return typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N", rich_help_panel=panel)


def json_option(panel: Optional[str] = None):
    return typer.Option(False, "--json", help="Machine output: one JSON line on stdout (progress still on stderr unless -q).",
                        rich_help_panel=panel)


def quiet_option(panel: Optional[str] = None):
    return typer.Option(False, "--quiet", "-q", help="No progress bar or log lines on stderr (errors still are).",
                        rich_help_panel=panel)


def overwrite_option(panel: Optional[str] = None):
    return typer.Option(False, "--overwrite", help="Replace an existing output (otherwise it is refused).",
                        rich_help_panel=panel)


def engine_option(panel: Optional[str] = None, help: str = "A folder of exported graphs (reptok export onnx|trt)."):
    return typer.Option(None, "--engine", help=help, rich_help_panel=panel)


def run_path(value: str) -> Path:
    """The parser of every option that names a run (``--ckpt``, ``--init``, ...): a folder, or
    ``hf://OWNER/NAME[@REVISION]``, fetched through the Hugging Face cache (``reptok/hub.py``)
    so the command reads a local folder from here on; a bad repo id is exit 2."""
    from reptok.hub import resolve_run

    return resolve_run(value)


def check_choice(option: str, value: Optional[str], choices, allow_none: bool = True) -> Optional[str]:
    """``--precision fp33`` -> InputError "--precision 'fp33': choose one of ...; did you mean 'fp32'?"."""
    import difflib

    if value is None and allow_none:
        return None
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"{option} {value!r}: choose one of {' | '.join(choices)}{hint}")
    return value


# Which CLI option sets which config key (for error messages naming the option).
FLAGS: Dict[str, str] = {
    "train.steps": "--steps", "train.batch_size": "--batch-size", "train.lr": "--lr", "train.seed": "--seed",
    "train.grad_accum": "--grad-accum", "train.ckpt_every": "--ckpt-every", "train.sample_every": "--sample-every",
    "train.ema": "--ema", "train.cos_weight": "--cos-weight", "train.token_lr_scale": "--token-lr-scale",
    "train.hflip": "--hflip", "decoder.time_sampler": "--time-sampler", "decoder.time_loc": "--time-loc",
    "decoder.time_scale": "--time-scale", "generator.time_sampler": "--time-sampler",
    "generator.time_loc": "--time-loc", "generator.time_scale": "--time-scale",
    "generator.class_dropout": "--class-dropout", "generator.num_classes": "--num-classes",
    "generator.caption_dropout": "--caption-dropout", "generator.token_norm": "--token-norm",
    "generator.text_encoder": "--text-encoder",
    "sampling.steps": "--steps", "sampling.cfg": "--cfg", "sampling.cfg_interval": "--cfg-interval",
    "sampling.decoder_steps": "--decoder-steps", "sampling.solver": "--solver", "sampling.decoder_solver": "--solver",
}


@contextlib.contextmanager
def option_names(given: Dict[str, str]):
    """Re-raise a ConfigError about a key set by a CLI option as an error about that option."""
    try:
        yield
    except ConfigError as e:
        flag = given.get(e.key or "")
        if flag is None:
            raise
        value = e.value
        shown = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else value
        raise InputError(f"{flag} {shown}: {e.allowed or str(e)}") from None


def given_flags(over: dict, set_keys=()) -> Dict[str, str]:
    """The keys of ``over`` set by a CLI option (not None, not overridden by --set) -> option."""
    return {k: FLAGS[k] for k, v in over.items() if v is not None and k in FLAGS and k not in set_keys}


def check_sampling(**values) -> None:
    """Sampler options (steps, cfg, cfg_interval, decoder_steps, solver) checked by the config
    layer's rules before any work: ``check_sampling(steps=0)`` -> InputError "--steps 0: ..."."""
    from reptok.config import PipelineConfig, SamplingConfig, check_rules

    over = {f"sampling.{k}": v for k, v in values.items() if v is not None}
    if not over:
        return
    base = PipelineConfig(generator=None)
    base.sampling = SamplingConfig()
    with option_names({k: FLAGS.get(k, "--" + k.split(".")[1].replace("_", "-")) for k in over}):
        cfg = base.replace(**over)
        check_rules(cfg, keys=set(over))


def parse_set(items: Optional[List[str]]) -> dict:
    """``--set decoder.depth=4`` -> {"decoder.depth": 4} (values parsed as JSON when possible)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set decoder.depth=4")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
