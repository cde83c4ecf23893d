"""``reptok train distill``: turn a tokenizer run's N-step flow decoder into a K-step one.

Method: **piecewise reflow on the student's own K-step grid** (PeRFlow, Yan et al. 2024, with the
window starts taken on the teacher's trajectory, as in reflow / progressive distillation):

    windows   [t_k, t_k+1] of the float32 grid linspace(0, 1, K + 1) the solver uses
    teacher   x_0 = seeded noise; the frozen teacher decoder (the run's EMA weights) is solved
              with Euler/Heun over its N-step grid (refined so every window edge is a grid point),
              conditioned on the frozen encoder's token of a training image: x_{t_0} .. x_{t_K}
    student   v_s(x, t, token) at x = x_{t_k} + u (x_{t_k+1} - x_{t_k}), t = t_k + u (t_k+1 - t_k),
              regressed (MSE) onto the window's chord (x_{t_k+1} - x_{t_k}) / (t_k+1 - t_k)
              ``reflow``: u = 0 (exactly the states K-step Euler visits);
              ``perflow``: u ~ U[0, 1) (PeRFlow: the flow is straight inside every window)

so K Euler steps of the student follow the teacher's N-step trajectory chord by chord. One teacher
solve gives all K windows of a sample, so every sample trains the student on all its windows.

Why this method (and not a flow map / MeanFlow or consistency distillation): the student is the
*same* ``FlowDecoder`` with the same inputs, initialised as the teacher. It is a drop-in decoder:
``sample``, ``reconstruct``, ``eval recon``, ``export onnx`` and every backend run it unchanged, only
with K steps (its config's ``sampling.decoder_steps``). A MeanFlow student needs a second time
input (the interval end) in the network, the ONNX graph and every runtime. Targets come from the
teacher's own ODE, so the student reproduces *the teacher's* images, not new ones.

The student run is a normal tokenizer run (same weights layout: the frozen encoder is copied, so
its tokens are the teacher's and a generator trained on the teacher's tokens can use it, see
``attach_generator``); its config.json records ``distilled: {teacher, teacher_steps,
student_steps, method}``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import io
from .. import run as rundir
from ..outputs import check_new_output
from .. import flow
from ..config import PipelineConfig
from ..errors import InputError
from ..pipeline import Pipeline
from ..dist import DistInfo
from .loop import _check_batch, fit
from .start import prepare_run_dir

METHODS = ("reflow", "perflow")


# ----------------------------------------------------------------------------- the teacher's grid
def teacher_grid(teacher_steps: int, student_steps: int) -> tuple:
    """(grid, edges): the teacher's float32 grid ``linspace(0, 1, N + 1)`` refined with the
    student's window edges ``linspace(0, 1, K + 1)``, and the K + 1 positions of those edges in it.
    When K divides N the grid is exactly the teacher's N-step grid."""
    big, small = flow.time_grid(teacher_steps), flow.time_grid(student_steps)
    # An edge within float32 rounding of a teacher point replaces it (no zero-length steps).
    keep = torch.ones(len(big), dtype=torch.bool)
    for e in small:
        keep &= (big - e).abs() > 1e-6
    grid = torch.sort(torch.cat([big[keep], small])).values
    edges = [int(torch.nonzero(grid == e)[0]) for e in small]
    return grid, edges


@torch.no_grad()
def teacher_window_edges(decoder: nn.Module, x0: torch.Tensor, token: torch.Tensor, grid: torch.Tensor,
                         edges: list, solver: str) -> torch.Tensor:
    """The teacher's trajectory at the K + 1 window edges: (K + 1, B, C, S, S), float32."""
    def velocity(x, t):
        return decoder(x, t, token)

    out, x = [x0.float()], x0.float()
    for a, b in zip(edges[:-1], edges[1:]):
        x = flow.solve(velocity, x, b - a, solver, grid=grid[a:b + 1])
        out.append(x)
    return torch.stack(out)


# ----------------------------------------------------------------------------- the task
class DistillTask(nn.Module):
    """One step of piecewise reflow. Trainable: the student decoder only."""

    def __init__(self, encoder: nn.Module, teacher: nn.Module, student: nn.Module, dataset, latent_shape: tuple,
                 teacher_steps: int, student_steps: int, method: str, solver: str):
        super().__init__()
        self.encoder, self.teacher, self.decoder = encoder, teacher, student
        self.encoder.requires_grad_(False).eval()
        self.teacher.requires_grad_(False).eval()
        self.dataset, self.latent_shape = dataset, tuple(latent_shape)
        self.student_steps, self.method, self.solver = student_steps, method, solver
        # On the CPU, like every solver grid (flow.time_grid): its 0-dim entries broadcast anywhere.
        self.grid, self.edges = teacher_grid(teacher_steps, student_steps)

    def train(self, mode: bool = True):  # the frozen networks stay in eval mode
        super().train(mode)
        self.encoder.eval()
        self.teacher.eval()
        return self

    def saved_modules(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def num_examples(self) -> int:
        return len(self.dataset)

    def load_examples(self, indices: torch.Tensor) -> dict:
        return {"image": torch.as_tensor(self.dataset.get_batch(indices.tolist())["image"])}

    def draw_noise(self, batch_size: int, g: torch.Generator) -> dict:
        u = torch.rand(batch_size, self.student_steps, generator=g)
        return {"x0": torch.randn(batch_size, *self.latent_shape, generator=g),
                "u": u if self.method == "perflow" else torch.zeros_like(u)}

    def forward(self, batch: dict, noise: dict):
        """Images (B,3,H,W) -> loss over the B x K (window, sample) pairs."""
        k_steps = self.student_steps
        with torch.no_grad():
            token = self.encoder(batch["image"]).float()  # (B, D)
            xs = teacher_window_edges(self.teacher, noise["x0"], token, self.grid, self.edges, self.solver)
        b = token.shape[0]
        t_edge = self.grid[self.edges].to(token.device)  # (K + 1,)
        t0, dt = t_edge[:-1], t_edge[1:] - t_edge[:-1]  # (K,)
        start, end = xs[:-1], xs[1:]  # (K, B, C, S, S)
        chord = (end - start) / dt.view(-1, 1, 1, 1, 1)
        u = noise["u"].t().to(token.device)  # (K, B)
        x = start + u.view(k_steps, b, 1, 1, 1) * (end - start)
        t = (t0.view(-1, 1) + u * dt.view(-1, 1)).reshape(-1)
        v = self.decoder(x.flatten(0, 1), t, token.repeat(k_steps, 1))
        err = ((v.float() - chord.flatten(0, 1)) ** 2).flatten(1).mean(1).view(k_steps, b)
        loss = err.mean()
        return loss, {"window_first": err[0].mean().detach(), "window_last": err[-1].mean().detach()}


# ----------------------------------------------------------------------------- the run
def _teacher_doc(teacher: Path) -> dict:
    doc = rundir.read_run_config(teacher)
    if doc.get("kind") != "tokenizer":
        raise InputError(f"{teacher} is a {doc.get('kind')} run; --ckpt needs a tokenizer run (reptok train recon)")
    return doc


def distill_defaults(teacher: Path) -> dict:
    """Training defaults of a distillation (a fine-tune from the teacher): 400 steps at the
    teacher's lr, constant (no cool-down), the teacher's batch, EMA 0.99 (a short run: at the
    stage-a decay of 0.995 the EMA would still be a third teacher after 200 steps)."""
    t = _teacher_doc(teacher)["config"].train
    return {"train.steps": 400, "train.lr": t.lr, "train.cooldown": 0.0, "train.warmup": 0,
            "train.ema": min(t.ema, 0.99)}


def distill_config(teacher: Path, student_steps: int, overrides: dict) -> PipelineConfig:
    """The student run's config: the teacher's models, ``sampling.decoder_steps = K``, the
    teacher's training settings with ``overrides`` (dotted keys) applied."""
    if student_steps < 1:
        raise InputError(f"--student-steps {student_steps}: must be >= 1")
    cfg: PipelineConfig = _teacher_doc(teacher)["config"]
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    cfg.sampling.decoder_steps = student_steps
    cfg.sampling.decoder_solver = "euler"  # the student is trained for Euler on its grid
    return cfg.validate()


def train_distill(
    teacher: Path, out: Path, cfg: PipelineConfig, *, student_steps: int, teacher_steps: Optional[int] = None,
    method: Optional[str] = None, data: Optional[Path] = None, resume: bool = False, device: str = "cpu",
    info: DistInfo = DistInfo(), progress: bool = True, precision: str = "auto",
) -> dict:
    """Distil ``teacher`` (a tokenizer run) into a ``student_steps``-step decoder in ``out``."""
    from ..data.dataset import PreparedDataset

    out, teacher = Path(out), Path(teacher).resolve()
    if resume and (out / rundir.CONFIG).exists():  # a resumed run keeps its teacher and method
        saved = rundir.read_run_config(out).get("distilled")
        if not saved:
            raise InputError(f"{out} is not a distilled run; choose another --out")
        for name, given, kept in (("--student-steps", student_steps, saved["student_steps"]),
                                  ("--teacher-steps", teacher_steps, saved["teacher_steps"]),
                                  ("--method", method, saved["method"])):
            if given is not None and given != kept:
                raise InputError(f"{out}: the run was started with {name} {kept}; a resumed run keeps it (got {given})")
        teacher, teacher_steps, method = Path(saved["teacher"]), saved["teacher_steps"], saved["method"]
        student_steps = saved["student_steps"]
        data = Path(data or saved["data"])
    tdoc = _teacher_doc(teacher)
    method = method or "reflow"
    if method not in METHODS:
        raise InputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if student_steps is None or student_steps < 1:
        raise InputError(f"--student-steps {student_steps}: must be >= 1")
    teacher_steps = int(teacher_steps or tdoc["config"].sampling.decoder_steps)
    if teacher_steps < student_steps:
        raise InputError(f"--teacher-steps {teacher_steps} < --student-steps {student_steps}: the teacher must take more steps")
    if data is None:
        if not tdoc.get("data"):
            raise InputError(f"{teacher}: the run does not record its dataset; pass --data")
        data = Path(tdoc["data"])
    if not Path(data).exists():
        raise InputError(f"{data}: no such prepared dataset; pass --data (reptok data prep)")
    dataset = PreparedDataset(data)
    if dataset.resolution != cfg.image_size:
        raise InputError(f"{data}: images are {dataset.resolution}px but the teacher wants {cfg.image_size}px")
    _check_batch(cfg.train, info)  # before the run directory is created
    solver = tdoc["config"].sampling.decoder_solver
    record = {"teacher": str(teacher), "teacher_steps": teacher_steps, "student_steps": int(student_steps),
              "method": method, "teacher_solver": solver, "data": str(Path(data).resolve())}
    cfg = prepare_run_dir(out, cfg, "tokenizer", resume, info,
                          extra={"distilled": record, "data": record["data"],
                                 "freeze_token": bool(tdoc.get("freeze_token"))})
    if info.is_main and (teacher / "vae").is_dir() and not (out / "vae").exists():
        shutil.copytree(teacher / "vae", out / "vae")  # a converted run's local VAE travels along
    weights = rundir.read_weights(teacher, use_ema=True)  # inference weights = EMA
    pipe = Pipeline.build(cfg, components=("encoder", "decoder"), load_weights=False)
    teacher_dec = Pipeline.build(cfg, components=("decoder",), load_weights=False).decoder
    for name, mod in (("encoder", pipe.encoder), ("decoder", pipe.decoder), ("decoder", teacher_dec)):
        rundir.load_into(mod, rundir.split_prefix(weights, name), str(teacher))
    c = cfg.decoder
    task = DistillTask(pipe.encoder, teacher_dec, pipe.decoder, dataset, (c.in_channels, c.input_size, c.input_size),
                       teacher_steps, int(student_steps), method, solver)
    summary = fit(task, out, cfg.train, device=device, info=info, resume=resume, progress=progress,
                  precision=precision)
    summary.update(run=str(out), distilled=record)
    return summary


# ----------------------------------------------------------------------------- generator runs
def attach_generator(generator: Path, tokenizer: Path, out: Path) -> dict:
    """A copy of the generator run ``generator`` in ``out`` that decodes with ``tokenizer`` (e.g. a
    distilled student) and its sampling defaults (decoder steps / solver). Refused unless the new
    tokenizer's encoder is the generator's own (same weights, so the tokens are the same)."""
    generator, tokenizer, out = Path(generator), Path(tokenizer).resolve(), Path(out)
    gdoc = rundir.read_run_config(generator)
    if gdoc.get("kind") != "generator":
        raise InputError(f"{generator} is a {gdoc.get('kind')} run; --generator needs a generator run (reptok train gen)")
    tdoc = rundir.read_run_config(tokenizer)
    if tdoc.get("kind") != "tokenizer":
        raise InputError(f"{tokenizer} is a {tdoc.get('kind')} run; --tokenizer needs a tokenizer run")
    if (out / rundir.CONFIG).exists():
        raise InputError(f"{out} already holds a run; choose another --out")
    check_new_output(out, folder=True)  # any other non-empty folder, or an unwritable place, is refused too
    old_tok = rundir.resolve_tokenizer_run(generator, gdoc)
    if old_tok is None:
        raise InputError(f"{generator}: the run names no tokenizer run")
    old_enc = rundir.split_prefix(rundir.read_weights(old_tok), "encoder")
    new_enc = rundir.split_prefix(rundir.read_weights(tokenizer), "encoder")
    if old_enc.keys() != new_enc.keys() or any(not torch.equal(old_enc[k], new_enc[k]) for k in old_enc):
        raise InputError(f"{tokenizer}: its encoder differs from {old_tok}'s, so its tokens are not the ones the "
                         f"generator was trained on; distil the generator's own tokenizer run")
    cfg: PipelineConfig = gdoc["config"]
    tcfg: PipelineConfig = tdoc["config"]
    cfg.sampling.decoder_steps, cfg.sampling.decoder_solver = tcfg.sampling.decoder_steps, tcfg.sampling.decoder_solver
    extra = {k: v for k, v in gdoc.items() if k not in ("format", "kind", "pipeline", "config", "provenance")}
    extra["tokenizer_run"] = str(tokenizer)
    extra["attached_from"] = str(generator.resolve())  # the provenance: its weights are a copy
    if tdoc.get("distilled"):
        extra["distilled"] = tdoc["distilled"]
    for name in (rundir.MODEL, rundir.EMA):
        if (generator / name).exists():
            io.atomic_save(out / name, lambda tmp, src=generator / name: shutil.copyfile(src, tmp))
    rundir.write_run_config(out, cfg, "generator", **extra)  # last: the run exists once it is complete
    return {"run": str(out), "tokenizer_run": str(tokenizer), "decoder_steps": cfg.sampling.decoder_steps}
