"""Mutation check: does the test suite catch one-line bugs in the core?

Each mutation replaces one line fragment of the package in a temporary copy of the repository
(``reptok/``, ``reptok_cli/``, ``export/``, ``tests/``, ``pyproject.toml``), then runs the fast
test files that guard that code against the copy. A mutation is *caught* when pytest reports a
failing test (exit 1); an import / collection error (exit 2..4) counts as caught too but is
marked, since it says nothing about the tests' assertions.

    python benchmarks/mutations.py            # all mutations, a caught / total table
    python benchmarks/mutations.py --quick    # the first two (the suite runs this mode)
    python benchmarks/mutations.py --only cfg-interval-strict,ema-decay
    python benchmarks/mutations.py --list
    python benchmarks/mutations.py --check    # every target still in the code (run by the suite)

Exit status 0 iff every selected mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("reptok", "reptok_cli", "export", "tests", "pyproject.toml")
LOOP = "tests/test_train_loop.py"

# (name, file, original fragment, mutated fragment, pytest arguments: the guarding fast tests)
MUTATIONS = [
    ("flow-time-flipped", "reptok/flow.py", "velocity_fn(xt, t.to(x1.dtype))", "velocity_fn(xt, (1 - t).to(x1.dtype))",
     ["tests/test_flow.py"]),
    ("cos-weight-dropped", "reptok/train/recon.py", "rf.mean() + self.cos_weight * cos.mean()", "rf.mean() + cos.mean()",
     [LOOP, "-k", "cosine_anchor"]),
    ("flow-path-swapped", "reptok/flow.py", "return t * x1 + (1 - t) * x0", "return (1 - t) * x1 + t * x0",
     ["tests/test_flow.py"]),
    ("cfg-interval-strict", "reptok/flow.py", "(t0 < lo) | (t0 > hi)", "(t0 <= lo) | (t0 > hi)",
     ["tests/test_flow.py"]),
    ("cfg-interval-float64", "reptok/flow.py", "t0 = torch.tensor([float(t)], dtype=torch.float32)",
     "t0 = torch.tensor([float(t)], dtype=torch.float64)", ["tests/test_flow.py"]),
    ("cfg-combination", "reptok/flow.py", "return v_u + scale * (v_c - v_u)", "return v_c + scale * (v_c - v_u)",
     ["tests/test_flow.py"]),
    ("cos-anchor-sign", "reptok/models/encoder.py", "return 1.0 - F.cosine_similarity(", "return 1.0 + F.cosine_similarity(",
     [LOOP, "-k", "cosine_anchor"]),
    ("token-norm-std", "reptok/models/generator.py", "return (z - mean) / std", "return (z - mean) * std",
     ["tests/test_generator.py", "-k", "normalize"]),
    ("ema-decay", "reptok/train/loop.py", "torch._foreach_lerp_(self._ema, self._raw, 1 - self.decay)",
     "torch._foreach_lerp_(self._ema, self._raw, self.decay)", [LOOP, "-k", "ema_follows"]),
    ("resume-no-truncate", "reptok/train/loop.py", "_truncate_metrics(run / METRICS, start)", "pass",
     [LOOP, "-k", "one_metrics_row"]),
    ("grad-clip-ignored", "reptok/train/loop.py", "clip_grad_norm_(params, cfg.grad_clip)",
     "clip_grad_norm_(params, float('inf'))", [LOOP, "-k", "clipping"]),
    ("shard-noise-key", "reptok/pipeline.py", "generator=index_generator(seed, i, stream)) for i in indices])",
     "generator=index_generator(seed, k, stream)) for k, i in enumerate(indices)])", ["tests/test_sample.py", "-k", "index_noise"]),
    ("adm-resize-filter", "reptok/images.py", "round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)",
     "round(x * scale) for x in pil_image.size), resample=Image.BILINEAR)", ["tests/test_data.py", "-k", "adm_center_crop"]),
    ("ckpt-every-unchecked", "reptok/config.py", "ckpt_every: int = ruled(500, ge(1))", "ckpt_every: int = ruled(500, ge(0))",
     ["tests/test_config.py"]),
]


def copy_repo(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def apply(dst: Path, path: str, old: str, new: str) -> None:
    f = dst / path
    text = f.read_text()
    if text.count(old) != 1:  # the code moved: the mutation must be updated, never silently skipped
        raise SystemExit(f"mutation target not found exactly once in {path}: {old!r}")
    f.write_text(text.replace(old, new))


def run_one(mutation, timeout: float) -> tuple:
    name, path, old, new, args = mutation
    with tempfile.TemporaryDirectory(prefix=f"mut-{name}-") as tmp:
        dst = Path(tmp)
        copy_repo(dst)
        apply(dst, path, old, new)
        env = dict(os.environ, PYTHONPATH=str(dst), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONDONTWRITEBYTECODE="1")
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                                cwd=dst, env=env, capture_output=True, text=True, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = time.perf_counter() - t0
    verdict = {1: "caught", 0: "MISSED"}.get(rc, f"caught (error rc={rc})")
    return name, verdict, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the first two mutations")
    ap.add_argument("--only", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that every target is in the code once")
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args(argv)
    chosen = MUTATIONS[:2] if a.quick else MUTATIONS
    if a.only:
        names = set(a.only.split(","))
        unknown = names - {m[0] for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m[0] in names]
    if a.check:  # the suite runs this: a refactor that moves a target must update the table
        for name, path, old, _, args in chosen:
            if (ROOT / path).read_text().count(old) != 1:
                print(f"{name}: {old!r} is not in {path} exactly once")
                return 1
            missing = [x for x in args if x.startswith("tests/") and not (ROOT / x).exists()]
            if missing:
                print(f"{name}: {missing[0]} does not exist")
                return 1
        return 0
    if a.list:
        for m in chosen:
            print(f"{m[0]:24s} {m[1]}: {m[2]!r} -> {m[3]!r}")
        return 0
    rows = [run_one(m, a.timeout) for m in chosen]
    print(f"{'mutation':24s} {'verdict':28s} seconds")
    for name, verdict, seconds in rows:
        print(f"{name:24s} {verdict:28s} {seconds:7.1f}")
    caught = sum(v.startswith("caught") for _, v, _ in rows)
    print(f"caught {caught}/{len(rows)}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
