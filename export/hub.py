"""``reptok export hub``: a run as a folder ready for ``hf upload`` (Hugging Face Hub layout).

The folder is itself a run (the same ``config.json`` format), so ``Pipeline.from_run(DIR)``,
``--ckpt DIR`` and, once uploaded, ``--ckpt hf://OWNER/NAME`` load it unchanged::

    README.md          the model card: YAML metadata (license, tags, library_name, pipeline_tag,
                       base_model) + what the model is, how to sample, training settings,
                       provenance chain and licence notice, every eval result with its protocol
    config.json        the run's config (with its provenance record)
    ema.safetensors    the inference weights, every component in one file
    model.safetensors  the training state (only with --include-training-state: train --init)
    vae/               a local VAE (converted runs and runs made from them)
    conversion.json    a converted run's record of the conversion
    eval/*.json        the run's evaluation results (cited by the card)
    tokenizer/         a generator run's tokenizer run, exported the same way; config.json's
                       ``tokenizer_run`` is "tokenizer" (relative), so the folder loads standalone
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

from reptok import provenance
from reptok import run as rundir
from reptok.errors import InputError
from reptok.evaluate.record import EVAL_DIR, read_run_evals

TOKENIZER_DIR = "tokenizer"
CARD = "README.md"


def export_hub(run, out, *, include_training_state: bool = False, repo_id: Optional[str] = None,
               license: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write the Hub folder of ``run`` to ``out`` (atomically). ``repo_id``: OWNER/NAME used in the
    card's sampling snippets; ``license``: the licence id of a run NOT derived from the authors'
    release (derived runs always carry theirs)."""
    from reptok.io import atomic_dir, atomic_write_text
    from reptok.outputs import check_new_output

    run = Path(run)
    doc = rundir.read_run_config(run)
    prov = provenance.of(run, doc)
    lic = provenance.licence_of(prov)
    if lic and license:
        raise InputError(f"--license {license}: {run} derives from the authors' release and keeps its licence "
                         f"({lic['name']}); drop --license")
    tok = rundir.resolve_tokenizer_run(run, doc)
    for r in [run] + ([tok] if tok is not None else []):
        if include_training_state and not (r / rundir.MODEL).exists():
            raise InputError(f"--include-training-state: {r} has no {rundir.MODEL}")
    check_new_output(out, overwrite, folder=True)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        files = _export_run(run, doc, tmp, include_training_state, tokenizer=tok)
        if tok is not None:
            tdoc = rundir.read_run_config(tok)
            files += [f"{TOKENIZER_DIR}/{f}" for f in
                      _export_run(tok, tdoc, tmp / TOKENIZER_DIR, include_training_state, tokenizer=None)]
        evals = read_run_evals(run) + ([{**e, "file": f"{TOKENIZER_DIR}/{e['file']}"} for e in read_run_evals(tok)]
                                       if tok is not None else [])
        card = model_card(doc, prov, evals, repo_id=repo_id, license=license,
                          name=run.resolve().name, files=files)
        atomic_write_text(tmp / CARD, card)
    return {"out": str(out), "files": sorted([CARD] + files), "kind": doc["kind"],
            "license": (lic or {}).get("id") or license, "tokenizer": TOKENIZER_DIR if tok else None}


def _export_run(run: Path, doc: dict, dest: Path, training: bool, tokenizer: Optional[Path]) -> List[str]:
    """One run's files into ``dest``: inference weights (EMA where there is one, every component),
    optionally the training state, a local VAE, eval results, and its config with the links
    rewritten relative to ``dest``. ``tokenizer``: a generator's tokenizer run, exported into
    ``dest/tokenizer`` by the caller (its VAE is the one the generator decodes with). Returns
    the file names written."""
    from reptok.io import save_tensors
    from reptok.models.vae import resolve_vae_source

    dest.mkdir(parents=True, exist_ok=True)
    files = []
    save_tensors(dest / rundir.EMA, rundir.read_weights(run, use_ema=True))
    files.append(rundir.EMA)
    if training:  # checked to exist before any work
        shutil.copyfile(run / rundir.MODEL, dest / rundir.MODEL)
        files.append(rundir.MODEL)
    cfg = doc["config"]
    if not cfg.vae.is_pixel:
        location, local = resolve_vae_source(cfg.vae.source, tokenizer or run)
        if local:  # a VAE folder (converted runs): it travels inside, found relative to the run
            cfg.vae.source = "vae"
            if tokenizer is None:  # a generator loads its tokenizer's VAE (Pipeline.from_run)
                shutil.copytree(location, dest / "vae")
                files += [f"vae/{p.name}" for p in sorted((dest / "vae").iterdir())]
    from reptok.convert.official import CONVERSION

    if (run / CONVERSION).is_file():  # a converted run's tensor-by-tensor record (provenance names it)
        shutil.copyfile(run / CONVERSION, dest / CONVERSION)
        files.append(CONVERSION)
    if (run / EVAL_DIR).is_dir():
        shutil.copytree(run / EVAL_DIR, dest / EVAL_DIR)
        files += [f"{EVAL_DIR}/{p.name}" for p in sorted((dest / EVAL_DIR).iterdir())]
    extra = {k: v for k, v in doc.items() if k not in ("format", "kind", "pipeline", "config")}
    extra["provenance"] = provenance.of(run, doc)  # kept as made (older runs: derived now)
    if tokenizer is not None:
        extra["tokenizer_run"] = TOKENIZER_DIR
    rundir.write_run_config(dest, cfg, doc["kind"], **extra)
    files.append(rundir.CONFIG)
    return files


# ----------------------------------------------------------------------------- the model card
def card_metadata(doc: dict, prov: dict, license: Optional[str] = None) -> dict:
    """The card's YAML metadata (the Hub's model-card fields)."""
    cfg = doc["config"]
    gen = cfg.generator if doc["kind"] != "tokenizer" else None
    if gen is not None and gen.text_encoder is not None:
        task, tags = "text-to-image", ["text-to-image"]
    elif gen is not None:
        task = "unconditional-image-generation"
        tags = ["class-conditional"] if gen.num_classes > 0 else ["unconditional"]
    else:
        task, tags = "image-to-image", ["image-tokenizer"]
    tags = ["reptok", "image-generation", "flow-matching", "single-token-latent"] + tags
    if (doc.get("distilled") or {}).get("student_steps"):
        tags.append("distilled")
    meta = {"library_name": "reptok", "pipeline_tag": task, "tags": tags}
    lic = provenance.licence_of(prov)
    if lic:
        meta.update(license="other", license_name=lic["id"], license_link=lic["link"])
    elif license:
        meta["license"] = license
    bases = provenance.hub_bases(prov)
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    return meta


def model_card(doc: dict, prov: dict, evals: List[dict], *, repo_id: Optional[str] = None,
               license: Optional[str] = None, name: str = "run", files: List[str] = ()) -> str:
    """README.md: YAML metadata parsed by ``huggingface_hub.ModelCard``, then the body."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(**card_metadata(doc, prov, license))
    body = "\n\n".join([
        _what(doc, name), _licence_section(prov), _usage(doc, repo_id or "OWNER/NAME"), _settings(doc),
        _provenance_section(prov), _evals_section(evals), _files_section(files)])
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def _what(doc: dict, name: str) -> str:
    cfg = doc["config"]
    kind = doc["kind"]
    e, d = cfg.encoder, cfg.decoder
    what = {"tokenizer": "a RepTok tokenizer: an image becomes one continuous token (the fine-tuned [cls] "
                         "token of a self-supervised ViT) and a flow-matching decoder turns the token back into an image",
            "generator": "a RepTok generator: an MLP-Mixer that generates single image tokens by flow matching, "
                         "decoded to images by its tokenizer (in `tokenizer/`)",
            "pipeline": "a complete RepTok model: tokenizer (encoder + flow decoder) and token generator"}[kind]
    lines = [f"# {name}", "", f"This is {what}, made with reptok "
             f"(the RepTok method, ICLR 2026: \"Adapting Self-Supervised Representations as a Latent Space "
             f"for Efficient Generation\").", "",
             f"- images: {cfg.image_size} px; encoder `{e.model}` (token dim {e.dim}); decoder width {d.width}, "
             f"depth {d.depth}; VAE `{cfg.vae.source}`"]
    if cfg.generator is not None and kind != "tokenizer":
        g = cfg.generator
        cond = (f"text (`{g.text_encoder}`)" if g.text_encoder else
                f"{g.num_classes} classes" if g.num_classes else "unconditional")
        lines.append(f"- generator: dim {g.dim}, depth {g.depth}, conditioned on {cond}")
    if cfg.class_names:
        lines.append(f"- classes: {', '.join(cfg.class_names[:20])}{' ...' if len(cfg.class_names) > 20 else ''}")
    dist = doc.get("distilled")
    if dist:
        lines.append(f"- distilled decoder: {dist['student_steps']} steps (teacher: {dist['teacher_steps']} steps, "
                     f"method {dist['method']})")
    return "\n".join(lines)


def _licence_section(prov: dict) -> str:
    lic = provenance.licence_of(prov)
    if not lic:
        return ""
    return (f"## Licence\n\n**{lic['name']}** — read it at <{lic['link']}>; it binds every copy of "
            f"these weights.\n\n{lic['attribution']}")


def _usage(doc: dict, repo: str) -> str:
    cfg = doc["config"]
    if doc["kind"] == "tokenizer":
        cli = (f"reptok reconstruct image.png --ckpt hf://{repo} --out recon/\n"
               f"reptok extract --ckpt hf://{repo} --data data/prepared --out tokens.npy")
        py = (f"pipe = Pipeline.from_run(\"hf://{repo}\", device=\"cuda\")\n"
              "tokens = pipe.encode(images)          # PIL images -> (B, D)\n"
              "recon = pipe(tokens=tokens, seed=0)   # tokens -> PIL images")
    elif cfg.generator is not None and cfg.generator.text_encoder is not None:
        cli = f"reptok sample --ckpt hf://{repo} --prompt \"a red circle\" -n 4 --out samples/"
        py = (f"pipe = Pipeline.from_run(\"hf://{repo}\", device=\"cuda\")\n"
              "images = pipe(prompts=[\"a red circle\"], n=4, seed=0)")
    else:
        cli = f"reptok sample --ckpt hf://{repo} --class 0 -n 4 --out samples/"
        py = (f"pipe = Pipeline.from_run(\"hf://{repo}\", device=\"cuda\")\n"
              "images = pipe(classes=[0, 1], seed=0)   # a list of PIL images")
    s = cfg.sampling
    gen = "" if doc["kind"] == "tokenizer" else (
        f"generator {s.steps} {s.solver} steps, CFG {s.cfg} in "
        f"{list(s.cfg_interval) if s.cfg_interval else 'every step'}, ")
    return (f"## How to use\n\n```bash\npip install reptok\n{cli}\n```\n\n```python\nfrom reptok import Pipeline\n\n"
            f"{py}\n```\n\nDefaults: {gen}decoder {s.decoder_steps} {s.decoder_solver} steps. `reptok` fetches the repo through the "
            f"Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE=1` for cache-only use); a local clone works "
            f"as `--ckpt PATH` too.")


def _settings(doc: dict) -> str:
    t = doc["config"].train
    rows = [("steps", t.steps), ("batch size (global)", t.batch_size), ("learning rate", t.lr),
            ("warmup / cool-down", f"{t.warmup} / {t.cooldown}"), ("EMA", t.ema), ("weight decay", t.weight_decay),
            ("grad clip", t.grad_clip), ("seed", t.seed)]
    if doc["kind"] != "generator":
        rows += [("cosine weight (lambda)", t.cos_weight), ("token lr scale", t.token_lr_scale), ("hflip", t.hflip)]
    for key in ("data", "tokens"):
        if doc.get(key):
            rows.append((f"training {key}", f"`{Path(doc[key]).name}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Training settings\n\n| setting | value |\n|---|---|\n{table}\n\nThe full config is `config.json`."


def _provenance_section(prov: dict) -> str:
    chain = "\n".join(provenance.chain_lines(prov, "this model"))
    return f"## Provenance\n\nWhere the weights came from (`provenance` in `config.json`):\n\n```\n{chain}\n```"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_EVALUATOR_KEYS = ("is_rule", "pr_distances", "features_weights_sha256", "batch_size", "feature_batch", "numerics", "torch")


def _evals_section(evals: List[dict]) -> str:
    if not evals:
        return "## Evaluation\n\nNo `reptok eval` result was recorded in this run."
    parts = ["## Evaluation\n\nEvery `reptok eval` result recorded in the run, with the protocol it used "
             "(numbers are comparable only under the same protocol):"]
    for ev in evals:
        p = ev.get("protocol", {})
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in ev.get("metrics", {}).items()) or "none"
        tool = p.get("tool") or {}
        ref = p.get("reference") or {}
        sampler = p.get("sampler")
        lines = [f"### `{ev['file']}` ({'reconstruction' if ev.get('kind') == 'recon' else 'generation'})", "",
                 f"- metrics: {metrics}",
                 f"- N: {p.get('n')}; reference: {', '.join(f'{k} {v}' for k, v in ref.items() if v is not None)}",
                 f"- sampler: {', '.join(f'{k} {v}' for k, v in sampler.items() if v is not None) if sampler else 'not recorded'}",
                 f"- tool: {tool.get('features')} features ({tool.get('description')}), reptok {tool.get('reptok_version')}"
                 + (f", k = {p['k']}" if p.get("k") else "")]
        evaluator = tool.get("evaluator") or {}
        if evaluator:
            lines.append("- evaluator: " + ", ".join(f"{k} {evaluator[k]}" for k in _EVALUATOR_KEYS if evaluator.get(k) is not None))
        lines += [f"- rule: {r}" for r in p.get("rules") or []]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _files_section(files: List[str]) -> str:
    shown = "\n".join(f"- `{f}`" for f in sorted(files))
    return (f"## Files\n\n{shown}\n\n`ema.safetensors` holds the inference weights; `model.safetensors`, when "
            "present, the training state for `reptok train ... --init`.")
