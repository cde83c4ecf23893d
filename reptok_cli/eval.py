"""``reptok eval recon`` and ``reptok eval gen``: PSNR / SSIM / rFID, FID / IS / precision / recall."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from .common import app, emit_json, err, handle_errors, parse_device, result_console
from .options import device_option, json_option, quiet_option, run_path

eval_app = typer.Typer(
    name="eval",
    help="Evaluate reconstructions (PSNR, SSIM, rFID) or samples (FID, IS, precision/recall).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(eval_app, name="eval")

F = "Features"
J = "Job"

_FEATURES_HELP = "inception (standard FID Inception; needs its weights) | judge (builtin-shapes classifier, offline)."
_WEIGHTS_HELP = "pt_inception-2015-12-05-6726825d.pth (default: torch.hub cache, else download)."
_IS_RULE_HELP = "adm (chunks of 5,000, as the ADM evaluator at any N) | splits10 (10 in-order splits)."
_PR_HELP = "adm (float16 distance blocks with float32 fallback, as the ADM evaluator) | float64 (exact)."


def _rules(is_rule: str, pr_distances: str):
    from reptok.evaluate.commands import Rules

    return Rules(is_rule, pr_distances).check()


def _rule_options():
    return (typer.Option("adm", "--is-rule", help=_IS_RULE_HELP, rich_help_panel=F),
            typer.Option("adm", "--pr-distances", help=_PR_HELP, rich_help_panel=F))


@contextlib.contextmanager
def _progress(quiet: bool = False):
    """A ``progress(description, total) -> advance(k)`` factory drawing rich bars on stderr
    (``quiet``: a context yielding None, no bars)."""
    if quiet:  # a generator context must yield even when there is nothing to draw
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)

    def factory(description: str, total: Optional[int]):
        task = bars.add_task(description, total=total)
        return lambda k: bars.advance(task, k)

    with bars:
        yield factory


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _report(title: str, rows, results: dict, written: Optional[Path], json_out: bool = False,
            quiet: bool = False) -> None:
    """The results table (stdout; stderr with --json, whose line is the result then, and
    nothing with --json -q)."""
    from rich.table import Table


    if json_out and quiet:
        return
    out = result_console(json_out)

    t = Table(title=title, title_justify="left", min_width=60, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for label, key, digits in rows:
        t.add_row(label, _fmt(results.get(key), digits))
    out.print(t)
    feats = results["features"]
    out.print(f"[bold]features:[/] {feats['name']}: {feats['description']}", highlight=False, soft_wrap=True)
    proto = results.get("protocol")
    if proto:
        out.print(f"[bold]rules:[/] IS {proto['is_rule']}, precision/recall distances {proto['pr_distances']}; "
                  f"{proto['numerics']}; feature batch {proto['feature_batch']}", highlight=False, soft_wrap=True)
    for note in results.get("notes", []):
        out.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if written is not None:
        out.print(f"[green]wrote[/] {written}", highlight=False)


def _record(run: Optional[Path], results: dict, kind: str, samples: Optional[Path] = None) -> None:
    """Keep the result in RUN/eval/ with its protocol (the model card cites it); a failure to
    write there is a warning, the numbers are still printed."""
    from reptok.evaluate.record import record_in_run

    if run is None:
        return
    try:
        path = record_in_run(run, results, kind, samples=samples)
    except OSError as e:
        err.print(f"[yellow]warning:[/] could not record the result in {run} ({e})", highlight=False)
        return
    if path is not None:
        results["run_record"] = str(path)


def _save(path: Path, results: dict) -> Optional[Path]:
    from reptok.evaluate.commands import write_results

    try:
        return write_results(path, results)
    except OSError as e:  # the numbers are still printed; a read-only sample folder is no failure
        err.print(f"[yellow]warning:[/] could not write {path} ({e})", highlight=False)
        return None


@eval_app.command("recon", epilog=(
    "Examples:\n\n  reptok data prep imagenet/val --out data/in1k-val --resolution 256\n\n"
    "  reptok eval recon --ckpt runs/tok --data data/in1k-val --decoder-steps 50\n\n"
    "  reptok eval recon --ckpt qs/tokenizer --data shapes-val --limit 500 --features judge --json"))
@handle_errors
def recon(
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path, help="A tokenizer run (or a pipeline/generator run with one).", rich_help_panel=J),
    data: Path = typer.Option(..., "--data", help="A prepared dataset (reptok data prep) of HELD-OUT images, e.g. ImageNet val.", rich_help_panel=J),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (dataset order).", rich_help_panel=J),
    decoder_steps: Optional[int] = typer.Option(None, "--decoder-steps", help="Decoder steps (default from the run, official 50).", rich_help_panel=J),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler | heun (default from the run).", rich_help_panel=J),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Reconstruction batch (features do not depend on it).", rich_help_panel=J),
    seed: int = typer.Option(0, "--seed", help="Decoder noise seed (noise depends on seed and image index).", rich_help_panel=J),
    features: str = typer.Option("inception", "--features", help=_FEATURES_HELP, rich_help_panel=F),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP, rich_help_panel=F),
    is_rule: str = _rule_options()[0],
    pr_distances: str = _rule_options()[1],
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSON (default: RUN/eval_recon.json).", rich_help_panel=J),
    device: str = device_option(J),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (default on CUDA: bf16 + CUDA graphs).", rich_help_panel=J),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file.", rich_help_panel=J),
    quiet: bool = quiet_option(J),
    json_out: bool = json_option(J),
):
    """Reconstruct held-out images and report PSNR, SSIM and rFID (written to RUN/eval_recon.json)."""
    from reptok.evaluate.commands import eval_recon, recon_results_path
    from reptok.outputs import check_new_output

    rules = _rules(is_rule, pr_distances)
    if out is not None:  # an explicit results file is never replaced silently (the default one is)
        check_new_output(out, overwrite)
    dev = parse_device(device)
    with _progress(quiet) as bar:
        results = eval_recon(ckpt, data, limit=limit, decoder_steps=decoder_steps, solver=solver,
                             batch_size=batch_size, seed=seed, features=features,
                             inception_weights=inception_weights, device=dev, progress=bar, fast=not no_fast,
                             rules=rules)
    if not quiet:
        err.print(f"decoded with {results['fast_path']}", highlight=False)
    written = _save(out or recon_results_path(ckpt), results)
    results["results_file"] = str(written) if written else None
    _record(ckpt, results, "recon")
    _report(f"reconstruction: {results['n']} images, {results['decoder_steps']} decoder steps ({results['solver']})",
            [("PSNR (dB)", "psnr", 3), ("SSIM", "ssim", 4), ("rFID", "rfid", 3),
             ("IS (reconstructions)", "inception_score", 3), ("precision", "precision", 4),
             ("recall", "recall", 4), ("images", "n", 0)], results, written, json_out, quiet)
    if json_out:
        emit_json(results)


@eval_app.command("gen", epilog=(
    "Examples:\n\n  reptok sample --ckpt runs/gen --class all -n 50 --out samples.npz\n\n"
    "  reptok eval gen --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz "
    "--inception-weights pt_inception-2015-12-05-6726825d.pth\n\n"
    "  reptok eval gen --samples qs/samples_eval.npz --ref qs/data --features judge --json"))
@handle_errors
def gen(
    samples: Path = typer.Option(..., "--samples", help="PNG folder, ADM .npz (arr_0) or prepared dataset.", rich_help_panel=J),
    ref: Path = typer.Option(..., "--ref", help="Same kinds, or an ADM reference batch .npz with mu/sigma.", rich_help_panel=J),
    features: str = typer.Option("inception", "--features", help=_FEATURES_HELP, rich_help_panel=F),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP, rich_help_panel=F),
    batch_size: int = typer.Option(100, "--batch-size", "-b", help="Loading batch (features do not depend on it).", rich_help_panel=J),
    k: int = typer.Option(3, "--k", help="Nearest neighbour for precision/recall (Kynkaanniemi et al.: 3).", rich_help_panel=F),
    is_rule: str = _rule_options()[0],
    pr_distances: str = _rule_options()[1],
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of each set.", rich_help_panel=J),
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSON (default: <samples>.eval.json / <folder>/eval.json).", rich_help_panel=J),
    run: Optional[Path] = typer.Option(None, "--run", parser=run_path, rich_help_panel=J,
                                       help="The run the samples came from: the result is kept in RUN/eval/ for its model "
                                            "card (default: the run a PNG folder's manifest names)."),
    device: str = device_option(J),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file.", rich_help_panel=J),
    quiet: bool = quiet_option(J),
    json_out: bool = json_option(J),
):
    """FID, Inception Score and precision/recall of samples against a reference set."""
    from reptok.evaluate.record import run_of_samples
    from reptok.evaluate.commands import eval_gen, results_path_for_samples
    from reptok.outputs import check_new_output

    rules = _rules(is_rule, pr_distances)
    if out is not None:  # an explicit results file is never replaced silently (the default one is)
        check_new_output(out, overwrite)
    dev = parse_device(device)
    with _progress(quiet) as bar:
        results = eval_gen(samples, ref, features=features, inception_weights=inception_weights,
                           batch_size=batch_size, k=k, limit=limit, device=dev, progress=bar, rules=rules)
    written = _save(out or results_path_for_samples(samples), results)
    results["results_file"] = str(written) if written else None
    _record(run or run_of_samples(samples), results, "gen", samples)
    n_ref = results["n_ref"] if results["n_ref"] is not None else "precomputed mu/sigma"
    _report(f"{results['n_samples']} samples vs reference: {n_ref}",
            [("FID", "fid", 3), ("Inception Score", "inception_score", 3), ("IS std", "inception_score_std", 3),
             (f"precision (k={k})", "precision", 4), (f"recall (k={k})", "recall", 4),
             ("samples", "n_samples", 0), ("reference images", "n_ref", 0)], results, written, json_out, quiet)
    if json_out:
        emit_json(results)


@eval_app.command("probe", epilog=(
    "Examples:\n\n  reptok eval probe --ckpt runs/tok --data data/in1k-val\n\n"
    "  reptok eval probe --ckpt qs/tokenizer --data qs/data --json"))
@handle_errors
def probe(
    ckpt: Path = typer.Option(..., "--ckpt", help="A tokenizer run (or a generator run with one).", rich_help_panel=J),
    data: Path = typer.Option(..., "--data", help="A prepared dataset with class labels.", rich_help_panel=J),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images (dataset order).", rich_help_panel=J),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Held-out share of each class.", rich_help_panel=J),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split.", rich_help_panel=J),
    batch_size: int = typer.Option(64, "--batch-size", "-b", rich_help_panel=J),
    device: str = device_option(J),
    quiet: bool = quiet_option(J),
    json_out: bool = json_option(J),
):
    """Linear probe (logistic regression) of the fine-tuned token and of the frozen SSL token."""
    from rich.table import Table

    from reptok.evaluate.probe import probe_run


    dev = parse_device(device)
    with _progress(quiet) as bar:
        res = probe_run(ckpt, data, limit=limit, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                        device=dev, progress=bar)
    t = Table(title=f"linear probe: {res['n_train']} train / {res['n_test']} test images, {res['classes']} classes "
                    f"(chance {res['chance']:.3f})", title_justify="left", header_style="bold")
    for col in ("token", "test accuracy", "train accuracy"):
        t.add_column(col, justify="left" if col == "token" else "right")
    for r in res["rows"]:
        t.add_row(r["token"], f"{r['accuracy']:.4f}", f"{r['train_accuracy']:.4f}")
    if not (json_out and quiet):
        out = result_console(json_out)
        out.print(t)
        out.print(f"mean cosine(fine-tuned, frozen SSL token): {res['mean_cosine']:.4f}", highlight=False)
    if json_out:
        emit_json(res)
