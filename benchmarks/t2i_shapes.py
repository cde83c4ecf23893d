"""Text-to-image on builtin:shapes, on the CPU: do samples match the prompt, with and without CFG?

Trains a caption-conditioned generator (``--text-encoder tiny`` by default: a random, offline
text tower) on the captions of builtin:shapes ("a large red bar in the top left on a grey
background"), then samples ``--per-prompt`` images for each of the 12 prompts "a red circle",
"a green circle", ..., "a blue cross" and judges them with the builtin shapes classifier: how
often the sample has the prompt's shape, its colour, and both (exact class), for each CFG scale
(the null condition is the empty prompt). A second table uses caption-style prompts
("a medium red circle in the centre on a grey background"), the training distribution.

The tokenizer comes from a quickstart folder (``--quickstart DIR``: DIR/tokenizer and, if it has
captions, DIR/tokens.npy) or is trained here quickly (preset small). Intermediate results live in
``--work`` and are reused by a second run (``--fresh`` retrains everything).

    python benchmarks/t2i_shapes.py [--quickstart quickstart_out] [--gen-steps 1500] [--cfg 1.0,1.5,3.0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from reptok.pipeline import Pipeline
from reptok.shapes.render import COLOURS, SHAPES, class_of
from reptok.shapes.judge import colour_accuracy, load_judge, shape_accuracy
from reptok.pipeline import STREAM_DECODER, STREAM_GENERATOR, index_noise


def log(msg: str) -> None:
    print(msg, flush=True)


def build_tokens(args, work: Path) -> Path:
    """tokens.npy with captions: from --quickstart, else data prep + a quick tokenizer + extract."""
    from reptok.extract import extract_tokens, load_tokens

    if args.quickstart:
        qs = Path(args.quickstart)
        tokens = qs / "tokens.npy"
        if tokens.exists() and load_tokens(tokens)["captions"] is not None:
            log(f"[tokens] reusing {tokens}")
            return tokens
        tok_run, data = qs / "tokenizer", qs / "data"
    else:
        tok_run, data = work / "tokenizer", work / "data"
        if not data.exists():
            from reptok.data.prep import prepare

            t = time.perf_counter()
            prepare(f"builtin:shapes:{args.images}", data)
            log(f"[data] {args.images} captioned shapes in {time.perf_counter() - t:.0f} s")
        if not (tok_run / "ema.safetensors").exists():
            from reptok.presets import get_preset
            from reptok.train.recon import train_recon

            cfg = get_preset("small")
            cfg.train.steps, cfg.train.batch_size = args.recon_steps, args.recon_batch
            cfg.train.ckpt_every, cfg.train.sample_every = args.recon_steps, 0
            shutil.rmtree(tok_run, ignore_errors=True)
            t = time.perf_counter()
            s = train_recon(data, tok_run, cfg, progress=False)
            log(f"[tokenizer] {args.recon_steps} steps in {time.perf_counter() - t:.0f} s, loss {s['last_loss']:.4f}")
    tokens = work / "tokens.npy"
    if not tokens.exists():
        t = time.perf_counter()
        extract_tokens(Pipeline.from_run(tok_run, components=("encoder",)), data, tokens, batch_size=256)
        log(f"[extract] {time.perf_counter() - t:.0f} s")
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", default=None, help="A 'reptok quickstart' output folder (its tokenizer).")
    ap.add_argument("--work", default="t2i_shapes_out")
    ap.add_argument("--fresh", action="store_true", help="Delete --work first.")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--recon-steps", type=int, default=600)
    ap.add_argument("--recon-batch", type=int, default=64)
    ap.add_argument("--text-encoder", default="tiny")
    ap.add_argument("--gen-steps", type=int, default=1500)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--gen-lr", type=float, default=1e-3)
    ap.add_argument("--gen-dim", type=int, default=None, help="generator.dim (default: the small preset's 256).")
    ap.add_argument("--gen-depth", type=int, default=None, help="generator.depth (default 4).")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--per-prompt", type=int, default=16)
    ap.add_argument("--cfg", default="1.0,1.5,3.0")
    ap.add_argument("--steps", type=int, default=None, help="Generator / decoder steps (default: the run's).")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    tokens = build_tokens(args, work)

    gen_run = work / "t2i"
    if not (gen_run / "ema.safetensors").exists():
        from reptok.presets import get_preset
        from reptok.train.gen import gen_config, train_gen

        shutil.rmtree(gen_run, ignore_errors=True)
        cfg = gen_config(tokens, get_preset("small"), {
            "generator.text_encoder": args.text_encoder, "generator.caption_dropout": args.caption_dropout,
            "train.steps": args.gen_steps, "train.batch_size": args.gen_batch, "train.lr": args.gen_lr,
            "train.ckpt_every": args.gen_steps, "generator.dim": args.gen_dim, "generator.depth": args.gen_depth})
        t = time.perf_counter()
        s = train_gen(tokens, gen_run, cfg, progress=False)
        log(f"[train gen] {args.gen_steps} steps x {args.gen_batch} in {time.perf_counter() - t:.0f} s, "
            f"loss {s['last_loss']:.4f}, {s['unique_captions']} unique captions, text encoder {s['text_encoder']}")

    t = time.perf_counter()
    judge = load_judge()
    log(f"[judge] {'cached' if judge.from_cache else 'trained'} in {time.perf_counter() - t:.0f} s")
    pipe = Pipeline.from_run(gen_run)
    g = pipe.cfg.generator
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    styles = {
        "short": [f"a {c} {s}" for s, c in combos],
        "caption": [f"a medium {c} {s} in the centre on a grey background" for s, c in combos],
    }
    k = args.per_prompt
    classes = np.repeat([class_of(s, c) for s, c in combos], k)
    idx = list(range(len(classes)))
    noise_g = index_noise(args.seed, idx, (g.n_tokens, g.token_dim), STREAM_GENERATOR)
    noise_d = index_noise(args.seed, idx, pipe.latent_shape, STREAM_DECODER)
    kw = {} if args.steps is None else {"steps": args.steps}
    dec_args = pipe.sampler_args(**({} if args.steps is None else {"decoder_steps": args.steps}))
    # Two judges: the pixel judge on decoded samples (needs a decent tokenizer), and a token-space
    # one (class of the nearest real token, normalised space) that sees the generator alone.
    from reptok.extract import load_tokens

    real = load_tokens(tokens)
    real_z = pipe.generator.normalize(torch.from_numpy(np.array(real["tokens"]))).squeeze(1)
    real_y = real["labels"]

    def nn_class(z):
        zn = pipe.generator.normalize(z).squeeze(1)
        return real_y[torch.cdist(zn, real_z).argmin(1).numpy()]

    d = torch.cdist(real_z, real_z)
    d.fill_diagonal_(float("inf"))
    loo = real_y[d.argmin(1).numpy()]
    log(f"[ceiling] token NN judge, leave-one-out on the {len(real_y)} real tokens: shape "
        f"{shape_accuracy(loo, real_y):.3f}, colour {colour_accuracy(loo, real_y):.3f}, exact {float((loo == real_y).mean()):.3f}")
    from reptok.shapes.render import make_shapes

    held = make_shapes(96, pipe.cfg.image_size, seed=10_000)
    images = torch.from_numpy(held["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    if pipe.encoder is not None:  # the tokenizer's ceiling: how well the judge recognises its reconstructions
        rec = pipe.decode(pipe.encode(images), index_noise(0, range(96), pipe.latent_shape, STREAM_DECODER), dec_args)
        log(f"[ceiling] judge on 96 reconstructions: exact {judge.accuracy(rec, held['labels']):.3f} "
            f"(on the real images {judge.accuracy(held['images'], held['labels']):.3f})")
    log(f"{len(idx)} samples per row ({k} per prompt, 12 prompts), generator {args.steps or pipe.cfg.sampling.steps} "
        f"steps, CFG interval {tuple(pipe.cfg.sampling.cfg_interval)}, {torch.get_num_threads()} threads")
    results = []
    for style, prompts in styles.items():
        per_image = [p for p in prompts for _ in range(k)]
        log(f"\nprompts: {style} (e.g. {prompts[0]!r})")
        log(f"{'cfg':>5} {'shape acc':>10} {'colour acc':>11} {'exact':>7} | {'NN shape':>9} {'NN colour':>10} "
            f"{'NN exact':>9} {'seconds':>8}")
        for scale in (float(x) for x in args.cfg.split(",")):
            t = time.perf_counter()
            z = pipe.generate(per_image, noise_g, pipe.sampler_args(guidance_scale=scale, **kw))
            imgs = pipe.decode(z, noise_d, dec_args)
            pred = judge.predict(imgs).cpu().numpy()
            nn_pred = nn_class(z)
            row = {"style": style, "cfg": scale, "shape_acc": shape_accuracy(pred, classes),
                   "colour_acc": colour_accuracy(pred, classes), "exact_acc": float((pred == classes).mean()),
                   "nn_shape_acc": shape_accuracy(nn_pred, classes), "nn_colour_acc": colour_accuracy(nn_pred, classes),
                   "nn_exact_acc": float((nn_pred == classes).mean()), "seconds": round(time.perf_counter() - t, 1)}
            results.append(row)
            log(f"{scale:>5g} {row['shape_acc']:>10.3f} {row['colour_acc']:>11.3f} {row['exact_acc']:>7.3f} | "
                f"{row['nn_shape_acc']:>9.3f} {row['nn_colour_acc']:>10.3f} {row['nn_exact_acc']:>9.3f} "
                f"{row['seconds']:>8.1f}")
    log("\nchance: shape 0.25, colour 0.333, exact 0.083. Pixel columns: the judge on decoded samples; "
        "NN columns: the class of the nearest real token (the generator alone, no decoder)")
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"total {time.perf_counter() - t_all:.0f} s; results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
