import math

import pytest
import torch

from reptok import flow


def test_interpolate_and_target():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    t = torch.tensor([0.0, 0.25])
    xt = flow.interpolate(x0, x1, t)
    assert torch.allclose(xt[0], torch.zeros(3)) and torch.allclose(xt[1], torch.full((3,), 0.25))
    assert torch.equal(flow.velocity_target(x0, x1), x1 - x0)


@pytest.mark.parametrize("kind", flow.TIME_SAMPLERS)
def test_time_samplers_in_unit_interval(kind):
    t = flow.sample_time(4096, kind, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.02


def test_unknown_sampler_and_solver():
    with pytest.raises(ValueError):
        flow.sample_time(3, "cosine")
    with pytest.raises(ValueError):
        flow.solve(lambda x, t: x, torch.zeros(1), 2, "rk4")


def test_exact_for_straight_paths():
    # Constant velocity: Euler is exact in one step.
    v = torch.tensor([[1.0, -2.0]])
    out = flow.solve(lambda x, t: v.expand_as(x), torch.zeros(1, 2), 1)
    assert torch.allclose(out, v)


def test_solvers_converge_on_analytic_field():
    # dx/dt = x  ->  x(1) = x(0) * e. Heun is second order: much closer at equal steps.
    f = lambda x, t: x  # noqa: E731
    x0 = torch.ones(1, 1)
    exact = math.e
    err = {s: abs(flow.solve(f, x0, 10, s).item() - exact) for s in flow.SOLVERS}
    assert err["euler"] < 0.15
    assert err["heun"] < err["euler"] / 10
    # and a time-dependent field: dx/dt = 2t  ->  x(1) = x(0) + 1
    g = lambda x, t: (2 * t).view(-1, 1).expand_as(x)  # noqa: E731
    assert abs(flow.solve(g, torch.zeros(1, 1), 8, "heun").item() - 1.0) < 1e-6
    assert abs(flow.solve(g, torch.zeros(1, 1), 8, "euler").item() - 1.0) > 1e-3


def test_time_grid_matches_official_float32():
    ts = flow.time_grid(50)
    assert ts.dtype == torch.float32 and len(ts) == 51
    assert ts[15].item() < 0.3  # float32 rounding: 0.29999998, so unguided officially
    guided = [i for i in range(50) if flow.in_interval(ts[i:i + 1], (0.3, 0.9))]
    assert guided == list(range(16, 46))  # 30 guided steps, 80 NFE with CFG


def test_cfg_applied_only_inside_interval():
    calls = []

    def model(x, t, c):
        calls.append((float(t[0]), x.shape[0]))
        # conditional velocity 1, unconditional 0 -> guided = scale
        return c.float().view(-1, 1).expand_as(x)

    cond, null = torch.ones(2), torch.zeros(2)
    fn = flow.guided_velocity(model, cond, null, scale=3.0, interval=(0.3, 0.9))
    out = flow.solve(fn, torch.zeros(2, 1), 10)
    ts = flow.time_grid(10)
    inside = sum(1 for t in ts[:-1] if 0.3 <= t.item() <= 0.9)
    # Each step adds 0.1 * velocity: 3 inside the interval, 1 outside.
    expected = 0.1 * (3 * inside + (10 - inside))
    assert torch.allclose(out, torch.full((2, 1), expected), atol=1e-5)
    assert [b for _, b in calls] == [4 if 0.3 <= t <= 0.9 else 2 for t, _ in calls]


def test_flow_matching_loss_zero_for_perfect_model():
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    loss = flow.flow_matching_loss(lambda xt, t: x1 - x0, x1, x0, torch.rand(3))
    assert loss.shape == (3,) and torch.allclose(loss, torch.zeros(3))


def _reference_solve(velocity_fn, x, steps, solver):
    """The loop as it was (t built on the CPU each step, the CFG branch read from t): the new
    solve must give the same bits."""
    ts = flow.time_grid(steps)
    x = x.float()
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v = velocity_fn(x, ts[i] * torch.ones(x.shape[0])).float()
        if solver == "euler":
            x = x + dt * v
        else:
            x = x + dt * 0.5 * (v + velocity_fn(x + dt * v, ts[i + 1] * torch.ones(x.shape[0])).float())
    return x


@pytest.mark.parametrize("solver", flow.SOLVERS)
def test_solve_bit_identical_to_the_per_step_loop(solver):
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def model(x, t, c):
        return torch.tanh(x @ w) * (1 + t.view(-1, 1)) + c.view(-1, 1)

    cond, null = torch.ones(4), torch.zeros(4)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for interval in [(0.3, 0.9), (0.2, 0.8), None]:
        new = flow.solve(flow.guided_velocity(model, cond, null, 2.5, interval), x0, 10, solver)
        old = _reference_solve(lambda x, t: _old_guided(model, cond, null, 2.5, interval, x, t), x0, 10, solver)
        assert torch.equal(new, old)


def _old_guided(model, cond, null, scale, interval, x, t):
    if not flow.in_interval(t, interval):  # reads t (a device read on CUDA)
        return model(x, t, cond)
    v_u, v_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond])).chunk(2)
    return v_u + scale * (v_c - v_u)


def test_solve_never_reads_the_device():
    # On the meta device any device->host read raises: the guided solve must decide the CFG
    # branch from the CPU grid (no per-step sync on CUDA) and still guide exactly the official steps.
    rows = []

    def model(x, t, c):
        assert t.device.type == "meta" and t.shape == (x.shape[0],)
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    meta = torch.device("meta")
    with pytest.raises(NotImplementedError):  # the old branch test would have failed here
        flow.in_interval(torch.zeros(2, device=meta), (0.3, 0.9))
    fn = flow.guided_velocity(model, torch.ones(2, device=meta), torch.zeros(2, device=meta), 3.0, (0.3, 0.9))
    out = flow.solve(fn, torch.zeros(2, 5, device=meta), 50)
    assert out.device == meta and out.shape == (2, 5)
    assert [i for i, b in enumerate(rows) if b == 4] == list(range(16, 46))


def test_in_interval_takes_a_float():
    ts = flow.time_grid(10)
    assert [flow.in_interval(float(t), (0.2, 0.8)) for t in ts] == [flow.in_interval(ts[i:i + 1], (0.2, 0.8)) for i in range(11)]


def test_cfg_combined_in_fp32():
    """Catches: v_u + s (v_c - v_u) evaluated in the network's bf16 (1.01171875 rounds to 1.015625)."""
    def model(x, t, c):  # null rows 1.0, class rows the next bf16 number, 1.0078125
        return (1.0 + 0.0078125 * c.view(-1, 1)).to(torch.bfloat16).expand(-1, x.shape[1])

    fn = flow.guided_velocity(model, torch.ones(2), torch.zeros(2), scale=1.5, interval=None)
    v = fn(torch.zeros(2, 3), torch.full((2,), 0.5))
    assert v.dtype == torch.float32
    assert torch.equal(v, torch.full((2, 3), 1.01171875))  # 1 + 1.5 * 2^-7, exact in fp32


class _FakeHost:
    """Records how a tensor is moved (no CUDA here): pinned first, then a non-blocking copy."""

    def __init__(self):
        self.calls = []

    def is_pinned(self):
        return False

    def pin_memory(self):
        self.calls.append("pin")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_grid_goes_to_cuda_pinned_and_non_blocking(monkeypatch):
    """Catches: the solver's grid copied from pageable memory (a host sync per solve on CUDA)."""
    fake = _FakeHost()
    assert flow.host_to_device(fake, "cuda:0") is fake
    assert fake.calls == ["pin", ("to", "cuda:0", True)]
    seen = []
    real = flow.host_to_device
    monkeypatch.setattr(flow, "host_to_device", lambda x, d: seen.append((x.clone(), d)) or real(x, d))
    flow.solve(lambda x, t: torch.zeros_like(x), torch.zeros(2, 3), 4)
    assert len(seen) == 1 and torch.equal(seen[0][0], flow.time_grid(4))


def test_loss_of_a_time_dependent_model_is_hand_computed():
    """A model that reads both x_t and t: v = x_t + t. Its loss per sample is the mean over the
    entries of (t x1 + (1 - t) x0 + t - (x1 - x0))^2, written out here by hand (catches t and
    1 - t swapped, x0 and x1 swapped, or the target's sign)."""
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    x1 = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    t = torch.tensor([0.25, 0.75])
    # sample 0, t = 0.25: x_t = (1.5, -1.25); v = (1.75, -1.0); target (2, 3); err (-0.25, -4)
    # sample 1, t = 0.75: x_t = (-0.625, 1.5); v = (0.125, 2.25); target (-1.5, 2); err (1.625, 0.25)
    want = torch.tensor([(0.0625 + 16.0) / 2, (2.640625 + 0.0625) / 2])
    loss = flow.flow_matching_loss(lambda xt, tt: xt + tt.view(-1, 1), x1, x0, t)
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("steps, interval, guided", [
    (10, (0.2, 0.8), [2, 3, 4, 5, 6, 7, 8]),   # t = 0.8f is guided (float32 bounds, inclusive)
    (10, (0.3, 0.9), [3, 4, 5, 6, 7, 8, 9]),   # 10-step grid: t_3 = 0.3f exactly, t_9 = 0.9f
    (4, (0.0, 0.5), [0, 1, 2]),
    (4, (0.6, 1.0), [3]),                      # steps start at 0, 0.25, 0.5, 0.75: only the last
    (50, (0.3, 0.9), list(range(16, 46))),     # the official 30 guided steps of 50
    (5, (0.0, 1.0), [0, 1, 2, 3, 4]),
])
def test_cfg_interval_guides_exactly_these_steps(steps, interval, guided):
    """Which solver steps run the doubled (guided) batch, against fixed index lists (never against
    in_interval itself): catches < for <=, float64 bounds, or the interval's ends swapped."""
    rows = []

    def model(x, t, c):
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    fn = flow.guided_velocity(model, torch.ones(2), torch.zeros(2), 2.0, interval)
    flow.solve(fn, torch.zeros(2, 1), steps)
    assert [i for i, b in enumerate(rows) if b == 4] == guided


def test_in_interval_compares_a_python_float_in_float32():
    """0.2 as float32 is 0.2000000030: the bound 0.2 and the time 0.2 round alike (guided), which a
    float64 time (0.2 < 0.2000000030) would miss; 0.2000001 is past 0.2 in either precision."""
    assert flow.in_interval(0.2, (0.2, 0.8)) and flow.in_interval(0.8, (0.2, 0.8))
    assert not flow.in_interval(0.19999, (0.2, 0.8)) and not flow.in_interval(0.8000001, (0.2, 0.8))
