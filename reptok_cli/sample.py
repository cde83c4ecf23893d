"""``reptok sample``: class- or text-conditional generation to PNGs, a grid or an ADM .npz."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device
from .options import check_choice, check_sampling, device_option, engine_option, json_option, overwrite_option, quiet_option

S = "Sampler"
J = "Job"


@app.command("sample", epilog=(
    "Examples:\n\n  reptok sample --ckpt runs/gen --class 88 -n 64 --out samples/\n\n"
    "  reptok sample --ckpt runs/gen --class all -n 50 --out samples.npz     # 50K ImageNet protocol\n\n"
    "  for s in 0 1000 2000; do reptok sample --ckpt runs/gen --class all -n 3 --start $s --count 1000 --out shard_$s.npz; done\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli sample --ckpt runs/gen --class all -n 50 --out samples.npz\n\n"
    "  reptok sample --ckpt runs/t2i --prompt \"a red circle\" --prompt \"a blue ring\" -n 4 --out t2i.npz\n\n"
    "  reptok sample --ckpt runs/t2i --prompts prompts.txt -n 8 --cfg 3 --out t2i/"))
@handle_errors
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="A generator run (or a converted official model).", rich_help_panel=J),
    out: Path = typer.Option(..., "--out", help="Folder of PNGs, a grid .png, or an ADM .npz.", rich_help_panel=J),
    classes: Optional[str] = typer.Option(None, "--class", "-c", help="An id, a list 1,5,9, a range 0-9, or all (default 0). Class runs only.", rich_help_panel=J),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="A text prompt (repeatable). Text-to-image runs only.", rich_help_panel=J),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A text file, one prompt a line. Text-to-image runs only.", rich_help_panel=J),
    n: int = typer.Option(1, "-n", "--per-class", "--per-prompt", min=1, help="Images per class (or per prompt).", rich_help_panel=J),
    start: int = typer.Option(0, "--start", help="First global image index of this shard.", rich_help_panel=J),
    count: Optional[int] = typer.Option(None, "--count", help="Images in this shard (default: to the end).", rich_help_panel=J),
    seed: int = typer.Option(0, "--seed", rich_help_panel=J),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Decoder (and VAE) batch.", rich_help_panel=J),
    gen_batch_size: Optional[int] = typer.Option(None, "--gen-batch-size", min=1, help="Generator batch (default: --batch-size).", rich_help_panel=J),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="CFG scale (default from the run, official 1.5).", rich_help_panel=S),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="t_begin,t_end (official 0.3,0.9); 'none' = always.", rich_help_panel=S),
    steps: Optional[int] = typer.Option(None, "--steps", help="Generator steps (official 50).", rich_help_panel=S),
    decoder_steps: Optional[int] = typer.Option(None, "--decoder-steps", help="Decoder steps (official 50).", rich_help_panel=S),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler | heun (both stages).", rich_help_panel=S),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnx | trt (auto: onnx/trt with --engine, else torch).", rich_help_panel=S),
    engine: Optional[Path] = engine_option(S, "Exported engine folder for --backend onnx|trt."),
    device: str = device_option(S),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 autocast (torch; default bf16 on CUDA, fp32 on CPU).", rich_help_panel=S),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (no bf16, no CUDA graphs).", rich_help_panel=S),
    compile_: bool = typer.Option(False, "--compile", help="Regional torch.compile (torch backend; opt-in).", rich_help_panel=S),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="CUDA graphs (default: on with CUDA).", rich_help_panel=S),
    overwrite: bool = overwrite_option(J),
    json_out: bool = json_option(J),
    quiet: bool = quiet_option(J),
):
    """Generate images: generator (a class or a prompt) -> token -> decoder -> (VAE) -> pixels."""
    from reptok.run import read_run_config
    from reptok.errors import InputError
    from reptok.sample import check_output, output_kind, parse_classes, read_prompts, sample_to

    check_output(out)
    run_doc = read_run_config(ckpt)
    if run_doc["kind"] == "tokenizer" or run_doc["config"].generator is None:
        raise InputError(f"{ckpt}: a {run_doc['kind']} run has no generator; pass a generator run (reptok train gen)")
    gen_cfg = run_doc["config"].generator
    is_text = gen_cfg is not None and gen_cfg.text_encoder is not None
    prompts = None
    if is_text:
        if classes is not None:
            raise InputError(f"{ckpt}: a text-to-image run takes --prompt/--prompts, not --class")
        prompts = read_prompts(prompt, prompts_file)
        if not prompts:
            raise InputError(f"{ckpt}: a text-to-image run needs --prompt TEXT or --prompts FILE")
    elif prompt or prompts_file is not None:
        raise InputError(f"{ckpt}: not a text-to-image run (it takes --class); drop --prompt/--prompts")
    interval = "default"
    if cfg_interval is not None:
        if cfg_interval.lower() in ("none", "all"):
            interval = None
        else:
            try:
                lo, hi = (float(v) for v in cfg_interval.split(","))
            except ValueError:
                raise InputError(f"--cfg-interval {cfg_interval!r}: expected two numbers like 0.3,0.9") from None
            interval = (lo, hi)
    check_sampling(steps=steps, cfg=cfg, cfg_interval=interval if isinstance(interval, tuple) else None,
                   decoder_steps=decoder_steps, solver=solver)
    from reptok.backends import PRECISIONS, resolve_backend

    check_choice("--precision", precision, tuple(PRECISIONS))
    backend_used = resolve_backend(backend, engine)
    dev = parse_device(device)
    class_ids = None if is_text else parse_classes(
        classes if classes is not None else ("0" if gen_cfg.num_classes > 0 else ""), gen_cfg.num_classes)
    kind = output_kind(out)
    from reptok import outputs

    manifest = None
    if kind == "folder":
        sc = run_doc["config"].sampling
        manifest = outputs.sample_manifest(
            ckpt, seed=seed, cfg=sc.cfg if cfg is None else cfg,
            cfg_interval=(list(sc.cfg_interval) if interval == "default" else interval),
            steps=steps or sc.steps, solver=solver or sc.solver, decoder_steps=decoder_steps or sc.decoder_steps,
            decoder_solver=solver or sc.decoder_solver, backend=backend_used,
            engine=str(Path(engine).resolve()) if engine else None,
            precision="fp32" if no_fast else (precision or ("bf16" if dev.startswith("cuda") else "fp32")),
            classes=class_ids, prompts=prompts, n=n)
        outputs.prepare_png_folder(out, manifest, overwrite=overwrite, write=False)  # check only: no work yet
    else:
        outputs.check_new_output(out, overwrite)
    dev, info = init_ranks(dev)
    if manifest is not None:
        from reptok.dist import barrier

        if info.is_main:
            outputs.prepare_png_folder(out, manifest, overwrite=overwrite)
        barrier()  # no rank lists the folder's PNGs before rank 0 has emptied it (--overwrite)
    from reptok.backends import load_sampling_pipeline

    pipe = load_sampling_pipeline(ckpt, dev, backend=backend, engine=engine, precision=precision, fast=not no_fast,
                                  compile=compile_, cuda_graphs=cuda_graphs)
    if info.is_main and not quiet:  # stderr: stdout stays one JSON line with --json
        from reptok.backends import describe_fast_path

        err.print(f"sampling with {describe_fast_path(pipe.fast_path)}", highlight=False)
    if pipe.generator is None:
        raise InputError(f"{ckpt}: this run has no generator; pass a generator run (reptok train gen)")
    bar = None
    total = count if count is not None else len(prompts if is_text else class_ids) * n - start
    if not quiet and info.is_main:
        from rich.progress import Progress

        bar = Progress(console=err, transient=True)
        task = bar.add_task("sampling", total=total)
        bar.start()
    try:
        summary = sample_to(
            pipe, class_ids, n, out, seed=seed, start=start, count=count, batch_size=batch_size,
            gen_batch_size=gen_batch_size, info=info,
            progress=(lambda k: bar.advance(task, k)) if bar else None,
            prompts=prompts, steps=steps, cfg=cfg, cfg_interval=interval, solver=solver,
            decoder_steps=decoder_steps, decoder_solver=solver)
    finally:
        if bar:
            bar.stop()
    if info.is_main:
        summary["backend"] = pipe.fast_path["backend"]
        if json_out:
            emit_json(summary)
        else:
            typer.echo(f"wrote {summary['out']}: {summary['images']} images "
                       f"({summary['images_per_s']} img/s, {summary['fast_path']}, NFE per image: generator "
                       f"{summary['nfe']['generator']}, decoder {summary['nfe']['decoder']})")
