"""``reptok quickstart``: the whole method on builtin:shapes, offline, on a CPU.

data prep -> train recon (stage a) -> extract -> train gen (stage b) -> a class-by-class sample
grid and reconstructions -> a report (reconstruction PSNR, class accuracy of the samples judged
by the builtin classifier, time per stage, the validation curves of both stages on a held-out
builtin:shapes set), printed and saved as report.json / report.md.
Every stage calls the same package functions as the individual commands.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import io
from ..outputs import check_new_output
from ..evaluate.metrics import psnr as psnr_db
from ..images import make_grid, save_png


@dataclass
class QuickstartPlan:
    preset: str = "small"
    images: int = 6000
    recon_steps: int = 3400
    recon_batch: int = 128
    gen_steps: int = 800
    gen_batch: int = 128
    grid_per_class: int = 8
    eval_per_class: int = 40
    eval_recon: int = 96
    val_images: int = 256  # held-out set for validation during training (at most images / 4)
    val_fid_n: int = 128
    val_points: int = 4  # validations per stage (and one at the last step)
    seed: int = 0


@contextlib.contextmanager
def _stage(name: str, times: dict, log: Callable[[str], None]):
    """Log a stage's start and (on success) its time; ``times[name]``: its seconds either way."""
    log(f"[{name}] ...")
    t = time.perf_counter()
    try:
        yield
    finally:
        times[name] = round(time.perf_counter() - t, 1)
    log(f"[{name}] done in {times[name]} s")


def _train_both(out: Path, plan: "QuickstartPlan", base, device: str, progress: bool, stage, log) -> None:
    """The builtin encoder, the tokenizer, its tokens and the generator, each a timed stage."""
    from ..config import PipelineConfig
    from ..extract import extract_tokens
    from ..pipeline import Pipeline
    from ..train.gen import gen_config, train_gen
    from ..train.recon import train_recon
    from .ssl import builtin_weights

    if base.encoder.weights.startswith("builtin:"):
        with stage("ssl encoder"):  # trained once per machine, then cached like the judge
            builtin_weights(base.encoder, log=log)
    with stage("train recon"):
        cfg = PipelineConfig.from_dict(base.to_dict())
        cfg.train.steps, cfg.train.batch_size = plan.recon_steps, plan.recon_batch
        cfg.train.ckpt_every = cfg.train.sample_every = max(plan.recon_steps // 2, 1)
        _validation_plan(cfg, plan, plan.recon_steps)
        train_recon(out / "data", out / "tokenizer", cfg, device=device, progress=progress, val_data=out / "val")
    with stage("extract"):
        tok = Pipeline.from_run(out / "tokenizer", device, components=("encoder",))
        extract_tokens(tok, out / "data", out / "tokens.npy", batch_size=256)
        extract_tokens(tok, out / "val", out / "val_tokens.npy", batch_size=256)
    with stage("train gen"):
        gcfg = gen_config(out / "tokens.npy", base, {"train.steps": plan.gen_steps, "train.batch_size": plan.gen_batch,
                                                     "train.ckpt_every": plan.gen_steps})
        _validation_plan(gcfg, plan, plan.gen_steps)
        train_gen(out / "tokens.npy", out / "generator", gcfg, device=device, progress=progress,
                  val_tokens=out / "val_tokens.npy")


def _reconstruct_held_out(out: Path, plan: "QuickstartPlan", image_size: int, judge, device: str):
    """Held-out shapes through the tokenizer (fast path): the images, mean PSNR, the judge's
    accuracy on the reconstructions; a grid of originals beside reconstructions is saved."""
    from ..backends import apply_fast_path
    from ..pipeline import Pipeline
    from .render import make_shapes

    held = make_shapes(plan.eval_recon, image_size, seed=plan.seed + 10_000)
    images = torch.from_numpy(held["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokpipe = apply_fast_path(Pipeline.from_run(out / "tokenizer", device, components=("encoder", "decoder", "vae")))
    rec = tokpipe.reconstruct(images, plan.seed, output="np")
    psnr = float(psnr_db(held["images"], rec).mean())
    recon_acc = float((judge.predict(rec).cpu().numpy() == held["labels"]).mean())
    pairs = [im for k in range(min(16, len(rec))) for im in (held["images"][k], rec[k])]
    save_png(out / "reconstructions.png", make_grid(pairs, ncol=8))
    return held, psnr, recon_acc


def run_quickstart(out: Path, plan: QuickstartPlan = QuickstartPlan(), device: str = "cpu",
                   progress: bool = True, log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    from ..pipeline import Pipeline
    from .judge import load_judge
    from ..data.prep import prepare
    from ..presets import get_preset
    from ..sample import sample_to

    out = Path(out)
    check_new_output(out, overwrite, folder=True)
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict = {}
    stage = lambda name: _stage(name, times, log)  # noqa: E731
    base = get_preset(plan.preset)
    with stage("data"):
        prepare(f"builtin:shapes:{plan.images}", out / "data", resolution=base.image_size, seed=plan.seed)
        n_val = min(plan.val_images, max(plan.images // 4, 16))
        prepare(f"builtin:shapes:{n_val}", out / "val", resolution=base.image_size, seed=plan.seed + 20_000)
    with stage("judge"):
        judge = load_judge(device)
    _train_both(out, plan, base, device, progress, stage, log)
    from ..backends import apply_fast_path

    # The fast path of `reptok sample` (bf16 + CUDA graphs on CUDA; torch eager fp32 on a CPU).
    pipe = apply_fast_path(Pipeline.from_run(out / "generator", device))
    classes = list(range(pipe.num_classes))
    with stage("sample"):
        sample_to(pipe, classes, plan.grid_per_class, out / "samples_grid.png", seed=plan.seed, batch_size=96)
        eval_npz = out / "samples_eval.npz"
        sample_to(pipe, classes, plan.eval_per_class, eval_npz, seed=plan.seed + 1, batch_size=120)
        z = np.load(eval_npz)
        pred = judge.predict(z["arr_0"]).cpu().numpy()
        accuracy = float((pred == z["arr_1"]).mean())
    with stage("reconstruct"):
        held, psnr, recon_acc = _reconstruct_held_out(out, plan, pipe.cfg.image_size, judge, device)
    real_acc = judge.accuracy(held["images"], held["labels"])
    report = {
        "out": str(out),
        "plan": asdict(plan),
        "recon_psnr_db": round(psnr, 2),
        "class_accuracy": round(accuracy, 4),
        "recon_class_accuracy": round(recon_acc, 4),
        "judge_accuracy_on_real": round(real_acc, 4),
        "samples_judged": int(len(pred)),
        "validation": {"tokenizer": val_rows(out / "tokenizer"), "generator": val_rows(out / "generator")},
        "seconds": times,
        "total_seconds": round(sum(times.values()), 1),
        "files": {"samples_grid": str(out / "samples_grid.png"), "reconstructions": str(out / "reconstructions.png"),
                  "tokenizer": str(out / "tokenizer"), "generator": str(out / "generator")},
    }
    io.atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    io.atomic_write_text(out / "report.md", _markdown(report, pipe.cfg.class_names))
    return report


def _validation_plan(cfg, plan: QuickstartPlan, steps: int) -> None:
    cfg.train.val_every = max(steps // plan.val_points, 1)
    cfg.train.val_examples, cfg.train.val_fid_n = plan.val_images, plan.val_fid_n


def val_rows(run: Path) -> list:
    """The validation rows (``"split": "val"``) of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("split") == "val"]


VAL_COLUMNS = {"tokenizer": ("rf", "cos", "psnr", "ssim", "fid_proxy"), "generator": ("rf", "token_fd")}


def _val_table(stage: str, rows: list) -> list:
    cols = VAL_COLUMNS[stage]
    lines = [f"| {stage} step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['step']} | " + " | ".join(f"{r[c]:.4g}" if c in r else "-" for c in cols) + " |" for r in rows]
    return lines + [""]


def _markdown(r: dict, class_names) -> str:
    lines = ["# reptok quickstart report", "",
             f"- reconstruction PSNR: **{r['recon_psnr_db']} dB** (held-out shapes, one token per image)",
             f"- class accuracy of generated samples: **{r['class_accuracy']:.1%}** "
             f"({r['samples_judged']} samples, judged by the builtin classifier; "
             f"the judge scores {r['judge_accuracy_on_real']:.1%} on real images)",
             f"- class accuracy of reconstructions: {r['recon_class_accuracy']:.1%}",
             "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["seconds"].items()]
    lines += [f"| **total** | **{r['total_seconds']}** |", "", "Validation on a held-out builtin:shapes set "
              "(README: Validation during training):", ""]
    for stage, rows in r["validation"].items():
        lines += _val_table(stage, rows)
    lines += ["",
              "`samples_grid.png`: one row per class" + (f" ({', '.join(class_names)})" if class_names else "") + ".",
              "`reconstructions.png`: original / reconstruction pairs.", ""]
    return "\n".join(lines)
