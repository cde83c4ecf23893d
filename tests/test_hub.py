"""Sharing runs: provenance + licence (reptok info), ``reptok export hub`` (model card, Hub folder),
``hf://OWNER/NAME`` runs loaded offline from a Hugging Face cache built here, eval results kept in
the run. Network is never used: the cache has the layout huggingface_hub writes
(models--OWNER--NAME/{blobs,snapshots/<commit>,refs/main}) and HF_HUB_OFFLINE is on."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clihelp import cli, last_json

FIX = Path(__file__).resolve().parent / "fixtures" / "official-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LICENCE_LINK = "https://github.com/CompVis/RepTok/blob/main/LICENSE"


def hub_cache(hf_home: Path, repo: str, folder: Path, commit: str = COMMIT) -> None:
    """Put ``folder`` into ``hf_home``'s Hub cache as ``repo`` at ``commit`` (= refs/main), the way
    huggingface_hub stores a download: content-addressed blobs, snapshot symlinks to them."""
    owner, name = repo.split("/")
    root = hf_home / "hub" / f"models--{owner}--{name}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty offline Hub cache for this process (huggingface_hub reads HF_HOME at import, so
    its constants are pointed at the temp cache too)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


# ----------------------------------------------------------------------------- the official chain
@pytest.fixture(scope="module")
def official_chain(tmp_path_factory):
    """converted tiny official run ``off`` -> ``ft`` (train recon --init off, 1 step) -> ``st``
    (a 1-step student of ft, 1 distillation step)."""
    from reptok.data.prep import prepare

    root = tmp_path_factory.mktemp("official_chain")
    cli("convert", "official", FIX / "official_tiny.ckpt", "--out", root / "off", "--encoder-heads", 2,
        "--vae-config", FIX / "tiny_vae", "--json")
    prepare("builtin:shapes", root / "data", limit=2, resolution=256)
    cli("train", "recon", "--data", root / "data", "--out", root / "ft", "--init", root / "off", "--preset", "tiny",
        "--steps", 1, "--batch-size", 2, "--sample-every", 0, "--json")
    cli("train", "distill", "--ckpt", root / "ft", "--out", root / "st", "--student-steps", 1, "--teacher-steps", 2,
        "--steps", 1, "--batch-size", 2, "--json")
    return root


def _origins(prov):
    """(how, parent link) down the origin chain: an independent walk of the stored record."""
    out = []
    while prov is not None:
        o = prov["origin"]
        out.append(o["how"])
        prov = o["parent"]["provenance"] if "parent" in o else None
    return out


def test_official_derived_runs_print_licence_and_chain(official_chain):
    """Catches: a licence that is not inherited through --init or distillation, a chain level
    dropped, the source hash or converter version not recorded."""
    root = official_chain
    sha = hashlib.sha256((FIX / "official_tiny.ckpt").read_bytes()).hexdigest()
    levels = {"st": f"distilled from the teacher {root / 'ft'}", "ft": f"fine-tuned (--init) from {root / 'off'}",
              "off": f"converted from official_tiny.ckpt (sha256 {sha[:16]}"}
    for run, chain in (("off", ["converted"]), ("ft", ["init", "converted"]), ("st", ["distilled", "init", "converted"])):
        assert _origins(json.loads((root / run / "config.json").read_text())["provenance"]) == chain
        text = cli("info", "--ckpt", root / run).stdout
        assert LICENCE_LINK in text and "non-commercial" in text and "attribution:" in text
        for level in {"off": ["off"], "ft": ["ft", "off"], "st": ["st", "ft", "off"]}[run]:
            assert levels[level] in text, (run, level)
    conv = json.loads((root / "off" / "config.json").read_text())["provenance"]["origin"]
    assert conv["sha256"] == sha and conv["source"] == "official_tiny.ckpt"
    assert conv["converter"].startswith("reptok ") and "convert official" in conv["converter"]


def test_runs_without_provenance_still_load_and_derive_it(official_chain, tmp_path):
    """Runs written before the record: config.json without ``provenance`` (catches: ``of`` not
    falling back to the links, or the loader requiring the key)."""
    from reptok.pipeline import Pipeline

    for run in ("off", "ft", "st"):
        shutil.copytree(official_chain / run, tmp_path / run)
        doc = json.loads((tmp_path / run / "config.json").read_text())
        del doc["provenance"]
        doc.get("converted_from", {}).pop("converter", None)
        for key in ("init",):  # links re-pointed at the copies
            if key in doc:
                doc[key] = str(tmp_path / "off")
        if "distilled" in doc:
            doc["distilled"]["teacher"] = str(tmp_path / "ft")
        (tmp_path / run / "config.json").write_text(json.dumps(doc))
    info = last_json(cli("info", "--ckpt", tmp_path / "st", "--json"))["run"]
    assert _origins(info["provenance"]) == ["distilled", "init", "converted"]
    assert info["licence"]["link"] == LICENCE_LINK
    assert Pipeline.from_run(tmp_path / "st", components=("encoder",)).encoder is not None


def test_export_of_a_derived_run_carries_the_licence(official_chain, tmp_path):
    from huggingface_hub import ModelCard

    out = last_json(cli("export", "hub", official_chain / "st", "--out", tmp_path / "h", "--json"))
    assert "vae/config.json" in out["files"] and "model.safetensors" not in out["files"]
    card = ModelCard.load(tmp_path / "h" / "README.md")
    assert (card.data.license, card.data.license_link) == ("other", LICENCE_LINK)
    assert card.data.license_name and "distilled" in card.data.tags
    assert "distilled from the teacher" in card.text and "official_tiny.ckpt" in card.text
    # the exported folder is a run of its own: VAE found inside, same provenance
    assert json.loads((tmp_path / "h" / "config.json").read_text())["pipeline"]["vae"]["source"] == "vae"
    assert last_json(cli("info", "--ckpt", tmp_path / "h", "--json"))["run"]["licence"]["link"] == LICENCE_LINK
    res = cli("export", "hub", official_chain / "st", "--out", tmp_path / "x", "--license", "mit", code=2)
    assert "licence" in res.output and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- a generator run
@pytest.fixture
def shared_gen(class_runs, tmp_path, monkeypatch):
    """A copy of the shared tiny generator run (its tokenizer_run stays the shared tokenizer), a
    2-image PNG sample folder of it and their ``reptok eval gen`` (judge features, a random judge
    in a private cache), recorded in the copy's eval/."""
    from reptok.io import save_tensors
    from reptok.shapes.judge import JudgeNet, judge_cache_path

    gen = tmp_path / "gen"
    shutil.copytree(class_runs / "gen", gen, ignore=shutil.ignore_patterns("train_state.pt", "samples"))
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    save_tensors(judge_cache_path(cache), JudgeNet().state_dict(), metadata={"heldout_accuracy": 0.0})
    monkeypatch.setenv("REPTOK_CACHE", str(cache))
    cli("sample", "--ckpt", gen, "--class", "0,1", "-n", 2, "--steps", 2, "--decoder-steps", 2, "--out",
        tmp_path / "samples", "--no-fast")
    res = last_json(cli("eval", "gen", "--samples", tmp_path / "samples", "--ref", class_runs / "data",
                        "--features", "judge", "--limit", 8, "--json"))
    return gen, res


def _pixels(run):
    from reptok.pipeline import Pipeline

    return Pipeline.from_run(run)(classes=[0, 1], seed=3, output="np", steps=2, decoder_steps=2)


def test_eval_results_kept_in_the_run_with_their_protocol(shared_gen, class_runs, tmp_path):
    """Catches: the PNG folder's run not found, the sampler of its manifest not recorded, eval
    recon not recording into its --ckpt (or recording the run's default decoder steps)."""
    gen, res = shared_gen
    rec = json.loads((gen / "eval" / "gen-samples.json").read_text())
    assert res["run_record"] == str(gen / "eval" / "gen-samples.json")
    assert rec["metrics"]["fid"] == res["fid"] and rec["protocol"]["n"] == 4
    assert rec["protocol"]["sampler"]["steps"] == 2 and rec["protocol"]["sampler"]["decoder_steps"] == 2
    assert rec["protocol"]["tool"]["features"] == "judge" and rec["protocol"]["reference"]["n"] == 8
    evaluator = rec["protocol"]["tool"]["evaluator"]  # the evaluator's own rules travel with the record
    assert (evaluator["is_rule"], evaluator["pr_distances"]) == ("adm", "adm")
    tok = tmp_path / "tok"
    shutil.copytree(class_runs / "tok", tok, ignore=shutil.ignore_patterns("train_state.pt", "samples"))
    out = last_json(cli("eval", "recon", "--ckpt", tok, "--data", class_runs / "data", "--limit", 4,
                        "--decoder-steps", 3, "--features", "judge", "--no-fast", "--json"))
    rec = json.loads((tok / "eval" / "recon-data.json").read_text())
    assert rec["metrics"]["psnr"] == out["psnr"] and rec["protocol"]["n"] == 4
    assert rec["protocol"]["sampler"]["decoder_steps"] == 3 and rec["kind"] == "recon"


def test_export_hub_card_and_same_pixels_by_path_and_offline_hf(shared_gen, tmp_path, offline_hub):
    """The exported generator folder (tokenizer/ inside) loads standalone and, put into an
    offline Hub cache, as hf://me/tiny: the same pixels as the original run. Catches: a tokenizer
    link left absolute, non-EMA weights exported, a card without the eval or the metadata."""
    from huggingface_hub import ModelCard

    gen, res = shared_gen
    out = tmp_path / "hub"
    summary = last_json(cli("export", "hub", gen, "--out", out, "--repo-id", "me/tiny", "--license", "mit",
                            "--include-training-state", "--json"))
    assert {"tokenizer/config.json", "tokenizer/ema.safetensors", "eval/gen-samples.json",
            "model.safetensors", "tokenizer/model.safetensors"} <= set(summary["files"])
    assert json.loads((out / "config.json").read_text())["tokenizer_run"] == "tokenizer"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "reptok" and card.data.license == "mit"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"reptok", "class-conditional"} <= set(card.data.tags)
    assert "eval/gen-samples.json" in card.text and f"{res['fid']:.4g}" in card.text
    assert "is_rule adm, pr_distances adm" in card.text  # the card cites the evaluator's rules
    assert "hf://me/tiny" in card.text and "trained from scratch" in card.text

    ref = _pixels(gen)
    shutil.rmtree(gen)  # the export must not need the original run
    assert np.array_equal(_pixels(out), ref)
    hub_cache(offline_hub, "me/tiny", out)
    assert np.array_equal(_pixels("hf://me/tiny"), ref)
    assert np.array_equal(_pixels(f"hf://me/tiny@{COMMIT}"), ref)

    # the real environment path in a fresh process: HF_HOME + HF_HUB_OFFLINE=1, the CLI, a .npz
    env = {**os.environ, "HF_HOME": str(offline_hub), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "reptok_cli", "sample", "--ckpt", "hf://me/tiny", "--class", "0,1",
                        "-n", "1", "--steps", "2", "--decoder-steps", "2", "--seed", "3", "--no-fast", "--out",
                        str(tmp_path / "s.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], ref)


def test_hub_specs(offline_hub, tmp_path):
    """Catches: a revision not passed on, a malformed spec reaching the library, an offline miss
    that is a traceback instead of exit 2."""
    from reptok.hub import hub_origin, parse_spec

    assert parse_spec("hf://me/tiny") == ("me/tiny", None)
    assert parse_spec("hf://me/tiny@v1.0") == ("me/tiny", "v1.0")
    for bad in ("hf://tiny", "hf://me/tiny@", "hf://me/ti/ny"):
        res = cli("info", "--ckpt", bad, code=2)
        assert "hf://OWNER/NAME" in res.output and len(res.output.strip().splitlines()) == 1
    res = cli("info", "--ckpt", "hf://me/absent", code=2)
    assert "cannot fetch" in res.output and len(res.output.strip().splitlines()) == 1
    path = tmp_path / "hub" / "models--me--tiny" / "snapshots" / COMMIT / "tokenizer"
    assert hub_origin(path) == f"me/tiny@{COMMIT}:tokenizer" and hub_origin(tmp_path) is None


def test_init_from_a_hub_snapshot_is_the_base_model(official_chain, offline_hub):
    """A run started from a Hub snapshot names it (provenance ``hub``, card ``base_model``)."""
    from export.hub import card_metadata
    from reptok import provenance
    from reptok.run import read_run_config

    hub_cache(offline_hub, "me/off", official_chain / "off")
    snap = offline_hub / "hub" / "models--me--off" / "snapshots" / COMMIT
    doc = {**read_run_config(official_chain / "ft"), "init": str(snap)}
    rec = provenance.derive(None, doc)
    assert rec["origin"]["parent"]["hub"] == f"me/off@{COMMIT}"
    meta = card_metadata(doc, rec)
    assert meta["base_model"] == "me/off" and meta["license"] == "other"
