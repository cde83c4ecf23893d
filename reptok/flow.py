"""Flow matching in one place: the linear path, time samplers, ODE solvers, CFG with an interval.

Convention (everywhere in reptok): **t = 0 is noise x0, t = 1 is data x1**,
``x_t = t * x1 + (1 - t) * x0``, velocity target ``x1 - x0``. Solvers integrate from t = 0 to 1
on the float32 grid ``torch.linspace(0, 1, steps + 1)`` (the official generator's grid, so the
CFG interval selects exactly the official steps: 30 guided steps of 50 for [0.3, 0.9]).
The official decoder runs the other way (t = 1 noise); ``FlowDecoder`` converts at its boundary.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .config import SOLVERS, TIME_SAMPLERS

# velocity_fn(x, t) -> v, with t a (B,) float tensor on x's device.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the path
def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * x0 with t (B,) broadcast over the remaining dims."""
    t = t.to(x1.dtype).view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def sample_time(
    n: int, kind: str = "logit_normal", *, device=None, generator: Optional[torch.Generator] = None,
    loc: float = 0.0, scale: float = 1.0,
) -> torch.Tensor:
    """Training times in (0, 1): ``sigmoid(loc + scale * N(0,1))`` or ``U(0, 1)`` (loc / scale
    unused). One draw of ``n`` normals / uniforms from ``generator``: seeded like the global RNG
    it reproduces the official ``LogitNormalSampler`` / ``torch.rand`` draw."""
    if kind == "logit_normal":
        n01 = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(loc + scale * n01)
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"unknown time sampler {kind!r}; choose one of {', '.join(TIME_SAMPLERS)}")


def flow_matching_loss(
    velocity_fn: VelocityFn, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Per-sample mean squared error between the predicted and target velocity, shape (B,)."""
    xt = interpolate(x0, x1, t)
    err = (velocity_fn(xt, t.to(x1.dtype)) - velocity_target(x0, x1)).float() ** 2
    return err.flatten(1).mean(1)


# ----------------------------------------------------------------------------- solvers
def host_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without a sync on CUDA: a plain ``.to(cuda)`` of pageable memory waits for
    the GPU to drain (it would stall the queue of work in flight), so the copy goes from pinned
    memory with ``non_blocking``. Other devices: a plain ``.to``."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def time_grid(steps: int, device=None) -> torch.Tensor:
    """The float32 grid 0 = t_0 < ... < t_steps = 1, computed like the official code (on CPU)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float32).to(device)


def solve(
    velocity_fn: VelocityFn, x: torch.Tensor, steps: int, solver: str = "euler",
    grid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (x given) to t = 1 on ``grid`` (default
    ``time_grid(steps)``; a CPU float32 tensor of ``steps + 1`` times, e.g. a slice of a finer grid).

    Euler: ``steps`` evaluations. Heun (explicit trapezoid): 2 evaluations per step, second order.
    The state is kept in float32 whatever the network's dtype.

    No host<->device sync per step on CUDA: the grid stays on the CPU (step sizes are 0-dim CPU
    tensors, which broadcast onto any device without a copy) and is copied to x's device once;
    each step's (B,) time is a device-side repeat of one grid entry. A velocity function that sets
    ``takes_host_time = True`` (``guided_velocity``) also gets ``t_host``, the step's time as a
    float32 CPU scalar tensor, so it can branch on t without reading the device.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    ts = time_grid(steps) if grid is None else grid.detach().to("cpu", torch.float32)
    ts_dev = host_to_device(ts, x.device)  # one asynchronous copy for the whole solve
    host = getattr(velocity_fn, "takes_host_time", False)

    def v_at(x_, i):
        tv = ts_dev[i].repeat(x_.shape[0])  # == t_i * ones(B), made on the device
        return (velocity_fn(x_, tv, t_host=ts[i]) if host else velocity_fn(x_, tv)).float()

    x = x.float()
    for i in range(len(ts) - 1):
        dt = ts[i + 1] - ts[i]
        v = v_at(x, i)
        if solver == "euler":
            x = x + dt * v
        else:
            v2 = v_at(x + dt * v, i + 1)
            x = x + dt * 0.5 * (v + v2)
    return x


# ----------------------------------------------------------------------------- guidance
def in_interval(t, interval: Optional[Sequence[float]]) -> bool:
    """Official rule: guided iff ``not (t_cur < t_begin or t_cur > t_end)``, i.e. t_begin <= t_cur
    <= t_end inclusive, compared in **float32** like the official tensor-vs-Python-float test
    (torch casts the Python bound to the tensor's float32). In float64 the bounds differ: for 10
    steps and [0.2, 0.8], t = float32(0.8) = 0.800000011920929 is guided officially (0.8f <= 0.8f)
    but would not be in float64 (0.800000011920929 > 0.8). ``t``: a tensor (its first entry; a
    CUDA tensor costs a device->host read) or a float (taken as float32)."""
    if interval is None:
        return True
    if isinstance(t, torch.Tensor):
        t0 = t.reshape(-1)[:1].detach().to("cpu", torch.float32)
    else:
        t0 = torch.tensor([float(t)], dtype=torch.float32)
    lo, hi = (torch.tensor(float(v), dtype=torch.float32) for v in interval[:2])
    return not bool((t0 < lo) | (t0 > hi))


def guided_velocity(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float,
    interval: Optional[Sequence[float]] = None,
) -> VelocityFn:
    """Classifier-free guidance: ``v_u + s * (v_c - v_u)`` inside ``interval``, plain ``v_c`` outside.

    ``model_fn(x, t, cond)`` is one network call. The unconditional half goes first in the
    doubled batch, as in the official ``forward_with_cfg``.
    """

    def fn(x: torch.Tensor, t: torch.Tensor, t_host: Optional[torch.Tensor] = None) -> torch.Tensor:
        # ``solve`` passes t_host (the step's time on the CPU): no device read to pick the branch.
        if scale == 1.0 or not in_interval(t if t_host is None else t_host, interval):
            return model_fn(x, t, cond)
        v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_cond, cond]))
        v_u, v_c = v.float().chunk(2)  # combined in fp32: bf16 would round s * (v_c - v_u)
        return v_u + scale * (v_c - v_u)

    fn.takes_host_time = True
    return fn
