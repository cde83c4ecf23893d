"""``reptok convert official``: the authors' Lightning checkpoint -> a reptok run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import app, emit_json, err, handle_errors
from .options import json_option, quiet_option

convert_app = typer.Typer(help="Convert foreign checkpoints into reptok run directories.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

ARCH = "What the tensors cannot tell"


@convert_app.command("official", epilog=(
    "Examples:\n\n  reptok convert official reptok-xl-600k-ImageNet.ckpt --out runs/official-xl\n\n"
    "  reptok sample --ckpt runs/official-xl --class 207 -n 4 --out corgis/\n\n"
    "  reptok convert official tiny.ckpt --out runs/tiny --encoder-heads 2 --vae-config tiny_vae --weights-dtype bf16"))
@handle_errors
def official(
    ckpt: Path = typer.Argument(..., help="The official Lightning .ckpt (read without executing pickled code)."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (kind 'pipeline')."),
    encoder_heads: Optional[int] = typer.Option(None, "--encoder-heads", help="DINO attention heads (default width // 64).", rich_help_panel=ARCH),
    encoder_model: str = typer.Option("vit_base_patch14_reg4_dinov2", "--encoder-model", help="timm architecture of the DINO encoder.", rich_help_panel=ARCH),
    encoder_img_size: int = typer.Option(224, "--encoder-img-size", help="Encoder input resolution (official 224).", rich_help_panel=ARCH),
    vae_config: Optional[Path] = typer.Option(None, "--vae-config", help="diffusers AutoencoderKL config.json or its directory (default: inferred from the VAE tensors).", rich_help_panel=ARCH),
    vae_norm_groups: Optional[int] = typer.Option(None, "--vae-norm-groups", help="GroupNorm groups of an inferred VAE config (default 32).", rich_help_panel=ARCH),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image size (default: the checkpoint's, else 256).", rich_help_panel=ARCH),
    dtype: str = typer.Option("fp32", "--weights-dtype", help="fp32 | bf16 | fp16: how the written weights are stored."),
    raw: bool = typer.Option(False, "--raw", help="Sample with the raw generator (model.net) instead of its EMA (training always starts from the raw one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
):
    """Convert reptok-xl-600k-ImageNet.ckpt (or any checkpoint in its layout) for sample / reconstruct / export."""
    from reptok.convert import convert_official

    say = (lambda *a, **k: None) if quiet else err.print
    if not json_out:
        say(f"converting {ckpt} ...", soft_wrap=True, highlight=False)
    summary = convert_official(
        ckpt, out, encoder_heads=encoder_heads, encoder_model=encoder_model, encoder_img_size=encoder_img_size,
        vae_config=vae_config, vae_norm_groups=vae_norm_groups, image_size=image_size, use_ema=not raw,
        dtype=dtype, overwrite=overwrite,
    )
    if json_out:
        emit_json(summary)
        return
    inf, t = summary["inferred"], summary["tensors"]
    d, g = inf["decoder"], inf["generator"]
    say(f"decoder width {d['width']} depth {d['depth']} | generator dim {g['dim']} depth {g['depth']} "
              f"({g['num_classes']} classes, {summary['generator_weights']}) | token {g['token_dim']} "
              f"| scale_factor {summary['scale_factor']}")
    say(f"tensors: {t['consumed']} converted, {t['ignored']} ignored "
              f"({', '.join(f'{k} {v}' for k, v in summary['ignored'].items())})")
    dc = summary["dino_copies"]
    if dc.get("present"):
        say(f"DINO fp32 copy vs encode() copy: max |diff| {dc['max_abs_diff']:.3g}"
                  f"{' (rounding only)' if dc['equal_up_to_rounding'] else ''}")
    say("ema.safetensors: the encode() DINO copy + the EMA generator (sample, extract, reconstruct); "
              "model.safetensors: the fp32 DINO + original cls token, decoder, raw generator (train --init)")
    for note in summary["notes"]:
        say(f"[yellow]note:[/] {note}")
    say(f"wrote {out} ({summary['dtype']}); try: reptok sample --ckpt {out} --class 0 -n 4 --out samples/",
              soft_wrap=True, highlight=False)
