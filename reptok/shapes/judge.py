"""The judge: a small CNN that classifies ``builtin:shapes`` images into their 12 classes.

Class accuracy of generated samples (quickstart, ``reptok eval``, the text-to-image benchmark)
needs a classifier we can trust offline. It is trained on demand on freshly generated shapes
(a seed the default ``data prep`` never uses, so it never saw the images it judges) with blur,
noise and colour jitter so that it still recognises slightly soft decoder outputs, then cached as
safetensors under ``$REPTOK_CACHE`` (default ``~/.cache/reptok``) and reused.

Inputs of any square size are resized to 32 px (antialiased), the judge's native resolution.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import cache_dir as default_cache_dir
from ..io import save_tensors
from . import render as _shapes

JUDGE_VERSION = 1
RESOLUTION = 32
TRAIN_SEED = 1_000_003  # never the default prep seed (0): the judge must not have seen the data
EVAL_SEED = 1_000_033
DEFAULT_N_TRAIN = 10_000
DEFAULT_EPOCHS = 3
DEFAULT_N_EVAL = 2_000

ArrayLike = Union[np.ndarray, torch.Tensor]


class JudgeNet(nn.Module):
    """conv(3->w) x2, pool, conv(w->2w) x2, pool, conv(2w->4w), pool, global max, fc(4w->F),
    fc(F->12). Input (B, 3, 32, 32) in [-1, 1]; ``features`` (B, F) is the penultimate layer."""

    def __init__(self, width: int = 16, feat_dim: int = 128, num_classes: int = _shapes.NUM_CLASSES):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
            # Global *max* pooling: a small shape anywhere on a large background is a local
            # detection; averaging dilutes it with background (avg pooling: ~70-90% held-out
            # accuracy at this training budget, max pooling: ~100%).
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(4 * w, feat_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- helpers
def _to_float_images(images: ArrayLike) -> torch.Tensor:
    """float (B,3,H,W) in [-1,1] as is; uint8 (B,H,W,3) (numpy or tensor) converted."""
    if isinstance(images, np.ndarray):
        # a copy when read-only (npz / memmap batches): torch refuses to wrap those
        images = torch.from_numpy(np.array(images) if not images.flags.writeable else np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.dim() == 3:
            images = images[None]
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if images.dim() == 3:
        images = images[None]
    return images.float()


def _resize(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
    return x


def _as_numpy_labels(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.int64).reshape(-1)


def shape_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of predictions with the right shape (class // 3), whatever the colour."""
    p, t = _as_numpy_labels(pred), _as_numpy_labels(target)
    return float(np.mean(p // len(_shapes.COLOURS) == t // len(_shapes.COLOURS))) if len(t) else float("nan")


def colour_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of predictions with the right colour (class % 3), whatever the shape."""
    p, t = _as_numpy_labels(pred), _as_numpy_labels(target)
    return float(np.mean(p % len(_shapes.COLOURS) == t % len(_shapes.COLOURS))) if len(t) else float("nan")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter on a batch in [-1, 1]: generated samples are softer and
    noisier than the crisp training renders, and the judge must not be fooled by that."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where((u[:, 0] < 0.3).view(b, 1, 1, 1), blurred, x)
    noise_std = 0.08 * u[:, 1].view(b, 1, 1, 1) * (u[:, 2] < 0.5).view(b, 1, 1, 1)
    x = x + noise_std * torch.randn(x.shape, generator=gen)
    gain = 1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    bias = 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    x = torch.where((u[:, 3] < 0.5).view(b, 1, 1, 1), x * gain + bias, x)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- the judge
class Judge:
    """A trained judge. ``predict``/``accuracy`` take float (B,3,H,W) in [-1,1] (or uint8
    (B,H,W,3)); calling it on uint8 (B,H,W,3) (numpy or torch) returns ``dict(features=(B,F)
    float32, logits=(B,12) float32)`` numpy: a ``reptok.evaluate.FeatureExtractor``."""

    name = "judge"
    resolution = RESOLUTION
    num_classes = _shapes.NUM_CLASSES
    class_names = list(_shapes.CLASS_NAMES)

    def __init__(self, net: JudgeNet, device="cpu", meta: Optional[dict] = None,
                 from_cache: bool = False, path: Optional[Path] = None, batch_size: int = 512):
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.meta = dict(meta or {})
        self.from_cache = from_cache
        self.path = path
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, images: ArrayLike, want_features: bool = False):
        x = _to_float_images(images)
        logits, feats = [], []
        for i in range(0, x.shape[0], self.batch_size):
            xb = _resize(x[i: i + self.batch_size].to(self.device))
            f = self.net.features(xb)
            logits.append(self.net.head(f).float().cpu())
            if want_features:
                feats.append(f.float().cpu())
        if not logits:
            empty = torch.zeros(0, self.num_classes)
            return empty, torch.zeros(0, self.net.head.in_features)
        return torch.cat(logits), (torch.cat(feats) if want_features else None)

    def logits(self, images: ArrayLike) -> torch.Tensor:
        """(B, 12) float32 logits on the CPU."""
        return self._run(images)[0]

    def predict(self, images: ArrayLike) -> torch.Tensor:
        """(B,) int64 predicted class ids (CPU tensor)."""
        return self.logits(images).argmax(1)

    def accuracy(self, images: ArrayLike, labels: ArrayLike) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        pred = self.predict(images).numpy()
        lab = _as_numpy_labels(labels)
        return float(np.mean(pred == lab)) if len(lab) else float("nan")

    def describe(self) -> str:
        acc = self.meta.get("heldout_accuracy")
        where = f"cached at {self.path}" if self.from_cache else f"trained now, saved to {self.path}"
        return (f"builtin:shapes judge v{JUDGE_VERSION} (12-way CNN at {RESOLUTION}px, inputs resized antialiased; "
                f"features: {self.net.head.in_features}-d penultimate layer; held-out accuracy "
                f"{acc if acc is not None else '?'}; {where})")

    def __call__(self, images_uint8: np.ndarray) -> Dict[str, np.ndarray]:
        logits, feats = self._run(images_uint8, want_features=True)
        return {"features": feats.numpy().astype(np.float32), "logits": logits.numpy().astype(np.float32)}


def _evaluate(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(images[i: i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return float((pred == labels).float().mean())


def train_judge(
    n_train: int = DEFAULT_N_TRAIN,
    epochs: int = DEFAULT_EPOCHS,
    steps: Optional[int] = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = TRAIN_SEED,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple:
    """Train a judge on ``n_train`` fresh shapes for ``epochs`` (or exactly ``steps`` steps).

    Returns ``(net, meta)``; ``meta`` has the held-out accuracy on ``n_eval`` images from another
    seed and the training time. Deterministic for a given seed and thread count.
    """
    t0 = time.perf_counter()
    data = _shapes.make_shapes(n_train, RESOLUTION, seed)
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    y = torch.from_numpy(data["labels"])
    per_epoch = max(1, n_train // batch_size)
    total = int(steps) if steps is not None else epochs * per_epoch
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    net.train()
    step = 0
    while step < total:
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train - batch_size + 1 if n_train >= batch_size else 1, batch_size):
            if step >= total:
                break
            idx = perm[i: i + batch_size]
            loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step, total)
    train_seconds = time.perf_counter() - t0
    ev = _shapes.make_shapes(n_eval, RESOLUTION, EVAL_SEED)
    xe = torch.from_numpy(ev["images"]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    acc = _evaluate(net, xe, torch.from_numpy(ev["labels"]))
    net.eval()
    meta = {
        "judge_version": JUDGE_VERSION, "shapes_version": _shapes.SHAPES_VERSION, "n_train": n_train,
        "steps": total, "batch_size": batch_size, "seed": seed, "heldout_accuracy": round(acc, 4),
        "n_eval": n_eval, "train_seconds": round(train_seconds, 2),
    }
    return net, meta


def judge_cache_path(cache_dir=None, n_train: int = DEFAULT_N_TRAIN, epochs: int = DEFAULT_EPOCHS,
                     steps: Optional[int] = None) -> Path:
    """``<cache>/judge-v<judge>s<shapes>.safetensors``; non-default training settings get their
    own suffix so a quick test judge never shadows the real one."""
    d = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"judge-v{JUDGE_VERSION}s{_shapes.SHAPES_VERSION}"
    if (n_train, epochs, steps) != (DEFAULT_N_TRAIN, DEFAULT_EPOCHS, None):
        name += f"-n{n_train}-e{epochs}" + (f"-st{steps}" if steps is not None else "")
    return d / f"{name}.safetensors"


def load_judge(
    device="cpu",
    cache_dir=None,
    n_train: int = DEFAULT_N_TRAIN,
    epochs: int = DEFAULT_EPOCHS,
    steps: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    retrain: bool = False,
) -> Judge:
    """The judge from the cache, or trained now (about half a minute on one CPU core with the
    defaults) and cached atomically. ``judge.from_cache`` says which; ``judge.meta`` has the
    held-out accuracy measured at training time."""
    from safetensors import safe_open

    path = judge_cache_path(cache_dir, n_train, epochs, steps)
    if path.exists() and not retrain:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
            net = JudgeNet()
            net.load_state_dict(state, strict=True)
            return Judge(net, device, _parse_meta(meta), from_cache=True, path=path)
        except Exception:  # noqa: BLE001 - a corrupt or stale cache file is simply retrained
            pass
    net, meta = train_judge(n_train=n_train, epochs=epochs, steps=steps, progress=progress)
    save_tensors(path, net.state_dict(), metadata=meta)
    return Judge(net, device, meta, from_cache=False, path=path)


def _parse_meta(meta: Dict[str, str]) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out
