"""Stage (b): train the MLP-Mixer generator on extracted tokens with flow matching.

Tokens are normalised per dimension with the extraction sidecar's mean/std; the statistics are
stored in the generator (buffers) so sampling undoes them. The run records the tokenizer run
that produced the tokens (``tokenizer_run`` in config.json), so sampling finds the decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import flow
from ..config import PipelineConfig
from ..errors import InputError
from ..extract import load_tokens
from ..models.generator import TokenGenerator
from .dist import DistInfo
from .loop import fit
from .run import prepare_run_dir


class GenTask(nn.Module):
    def __init__(self, generator: TokenGenerator, tokens: np.ndarray, labels: np.ndarray,
                 time_sampler: str, class_dropout: float):
        super().__init__()
        self.generator = generator
        self.tokens = torch.from_numpy(np.array(tokens, dtype=np.float32))  # a copy: tokens may be a read-only memmap
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.time_sampler = time_sampler
        self.class_dropout = class_dropout if generator.null_class is not None else 0.0

    def saved_modules(self):
        return {"generator": self.generator}

    def num_examples(self) -> int:
        return len(self.tokens)

    def load_examples(self, indices: torch.Tensor) -> dict:
        return {"z": self.tokens[indices], "y": self.labels[indices]}

    def draw_noise(self, batch_size: int, g: torch.Generator) -> dict:
        cfg = self.generator.cfg
        return {
            "t": flow.sample_time(batch_size, self.time_sampler, generator=g),
            "x0": torch.randn(batch_size, cfg.n_tokens, cfg.token_dim, generator=g),
            "drop": (torch.rand(batch_size, generator=g) < self.class_dropout).long(),
        }

    def forward(self, batch: dict, noise: dict):
        x1 = self.generator.normalize(batch["z"])
        y = batch["y"]
        loss = flow.flow_matching_loss(
            lambda xt, t: self.generator(xt, t, y, force_drop_ids=noise["drop"]), x1, noise["x0"], noise["t"])
        return loss.mean(), {}


def train_gen(tokens_path: Path, out: Path, cfg: PipelineConfig, *, resume: bool = False, device: str = "cpu",
              info: DistInfo = DistInfo(), progress: bool = True, precision: str = "auto") -> dict:
    data = load_tokens(tokens_path)
    meta = data["meta"]
    if cfg.generator is None:
        raise InputError("the config has no generator section")
    if meta["dim"] != cfg.generator.token_dim:
        raise InputError(f"{tokens_path}: tokens have {meta['dim']} dims but the generator expects "
                         f"{cfg.generator.token_dim}; use the preset of the tokenizer run")
    labels = data["labels"]
    if cfg.generator.num_classes > 0:
        if (labels < 0).any():
            raise InputError(f"{tokens_path}: some images have no label; train an unconditional generator "
                             f"(--num-classes 0) or prepare a labelled dataset")
        if labels.max(initial=-1) >= cfg.generator.num_classes:
            raise InputError(f"{tokens_path}: labels go up to {int(labels.max())} but the generator has "
                             f"{cfg.generator.num_classes} classes; pass --num-classes {int(labels.max()) + 1}")
    tokenizer_run = meta.get("checkpoint")
    cfg.class_names = meta.get("class_names")
    cfg = prepare_run_dir(out, cfg, "generator", resume, info,
                          extra={"tokenizer_run": tokenizer_run, "tokens": str(Path(tokens_path).resolve())})
    torch.manual_seed(cfg.train.seed)
    gen = TokenGenerator(cfg.generator)
    std = np.maximum(np.asarray(meta["std"], np.float64), 1e-6)
    gen.set_token_stats(torch.tensor(meta["mean"]), torch.tensor(std))
    task = GenTask(gen, data["tokens"], labels, cfg.train.time_sampler, cfg.generator.class_dropout)
    summary = fit(task, Path(out), cfg.train, device=device, info=info, resume=resume, progress=progress,
                  precision=precision)
    summary["run"] = str(out)
    return summary


def gen_config(tokens_path: Path, preset: PipelineConfig, overrides: dict) -> PipelineConfig:
    """The generator run's config: the tokenizer run's models + the preset's generator/training."""
    from .. import checkpoint as ckpt

    meta = load_tokens(tokens_path)["meta"]
    tok = meta.get("checkpoint")
    if tok and (Path(tok) / ckpt.CONFIG).exists():
        base = ckpt.read_run_config(Path(tok))["config"]
    else:
        base = preset
    cfg = PipelineConfig.from_dict(base.to_dict())
    gen = PipelineConfig.from_dict(preset.to_dict()).generator
    gen.token_dim = int(meta["dim"])
    gen.num_classes = int(meta.get("num_classes") or 0)
    cfg.generator = gen
    cfg.train = preset.train
    cfg.sampling.steps, cfg.sampling.cfg = preset.sampling.steps, preset.sampling.cfg
    cfg.sampling.cfg_interval = preset.sampling.cfg_interval
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()
