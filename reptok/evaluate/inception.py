"""The standard FID Inception-v3 network and the feature-extractor interface.

The network is the TensorFlow FID Inception graph (``inception-2015-12-05``) ported to PyTorch:
the same architecture and weights file (``pt_inception-2015-12-05-6726825d.pth``) that
pytorch-fid uses and torch-fidelity re-hosts, and the same graph the ADM evaluator
(guided-diffusion/evaluations) runs in TensorFlow. It differs from torchvision's Inception-v3:

* 1008 output classes, no auxiliary classifier;
* the average-pool branches of the A, C and E blocks exclude padding
  (``count_include_pad=False``, TensorFlow's behaviour);
* the last E block (``Mixed_7c``) uses a *max* pool in its pool branch.

Outputs: the 2048-d ``pool3`` features (FID, precision/recall) and the 1008-way **unbiased**
logits ``pool3 @ W.T`` (no bias) for the Inception Score -- the ADM evaluator builds its
softmax from the graph's ``softmax/logits/MatMul`` weight alone and torch-fidelity's default IS
feature is ``logits_unbiased``, so both omit the bias.

State-dict keys equal torchvision's ``Inception3`` names (``Conv2d_1a_3x3.conv.weight``, ...,
``fc.weight``), so the pytorch-fid file and torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` load strictly.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .metrics import strict_fp32
from torchvision.models.inception import (
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDInceptionExtractor",
    "FIDInceptionV3",
    "FeatureExtractor",
    "InceptionWeightsMissing",
    "RESIZE_MODES",
    "find_fid_inception_weights",
    "load_fid_inception",
    "preprocess_for_inception",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
# torch-fidelity caches the same weights under this name in the same hub directory.
_ALT_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)

MISSING_MESSAGE = (
    f"FID Inception weights not found: download {FID_WEIGHTS_URL} and pass --inception-weights PATH"
)

INPUT_SIZE = 299
RESIZE_MODES = ("tf", "pytorch-fid")


class InceptionWeightsMissing(InputError):
    """The FID Inception weights file is neither given, cached, nor downloadable."""


# ----------------------------------------------------------------------------- the network
class FIDInceptionA(InceptionA):
    """InceptionA with TensorFlow's average pool (padding excluded from the mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """InceptionC with TensorFlow's average pool (padding excluded from the mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """InceptionE with the FID graph's pool branch.

    ``pool="avg"`` (Mixed_7b): TensorFlow's average pool without padding in the mean.
    ``pool="max"`` (Mixed_7c): the FID graph uses a max pool here (a quirk of that graph; the
    paper's architecture has an average pool) -- required to reproduce its features.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        if self.pool == "avg":
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 graph. Constructed with random weights; load the real ones with
    :func:`load_fid_inception` (or ``load_state_dict`` of the .pth file).

    forward(x): x float (B, 3, 299, 299), already scaled to [-1, 1].
    Returns ``(pool, logits)``: pool3 features (B, 2048) and unbiased logits (B, 1008).
    """

    NUM_CLASSES = 1008
    FEATURE_DIM = 2048

    def __init__(self) -> None:
        super().__init__()
        # Attribute names mirror torchvision's Inception3 so the .pth state dict loads strictly.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(self.FEATURE_DIM, self.NUM_CLASSES)
        # He init keeps random-weight activations O(1) through the 20 blocks (PyTorch's default
        # init shrinks them to ~1e-8, torchvision's std-0.1 init blows them up to ~1e10 since
        # eval-mode BN does not renormalise), so weight-free tests see non-degenerate features.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor):
        x = self.Conv2d_1a_3x3(x)  # B x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # B x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # B x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # B x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # B x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # B x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # B x 192 x 35 x 35
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)  # B x 288 x 35 x 35
        x = self.Mixed_6a(x)  # B x 768 x 17 x 17
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # B x 768 x 17 x 17
        x = self.Mixed_7a(x)  # B x 1280 x 8 x 8
        x = self.Mixed_7b(x)  # B x 2048 x 8 x 8
        x = self.Mixed_7c(x)  # B x 2048 x 8 x 8
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # B x 2048
        logits = pool @ self.fc.weight.T  # unbiased logits, B x 1008 (see module docstring)
        return pool, logits


# ----------------------------------------------------------------------------- preprocessing
def _resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``tf.image.resize_bilinear(align_corners=False)`` (legacy, no half-pixel
    centres): source coordinate ``dst * (in / out)`` computed in float32, neighbours clamped at
    the last row/column. This is the resize inside the ADM evaluator's Inception graph and what
    torch-fidelity reimplements. x: float (B, C, H, W) -> (B, C, size, size)."""

    def axis(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        pos = torch.arange(size, dtype=torch.float32) * scale
        lo = pos.long()  # floor: pos >= 0
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = (pos - lo.float()).to(device=x.device, dtype=x.dtype)
        return lo.to(x.device), hi.to(x.device), frac

    ylo, yhi, fy = axis(x.shape[2])
    xlo, xhi, fx = axis(x.shape[3])
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    t = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * fx
    b = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * fx
    return t + (b - t) * fy.view(1, 1, -1, 1)


def _to_nchw_255(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W), or float (B, 3, H, W) in [0, 1] -> float32
    (B, 3, H, W) in [0, 255]."""
    t = images
    if isinstance(images, np.ndarray):
        # Streamed npz batches are read-only views; torch wants a writable buffer.
        a = np.ascontiguousarray(images)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"expected a 4-D image batch, got {getattr(t, 'shape', type(t))}")
    if t.dtype == torch.uint8:
        if t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
        elif t.shape[1] != 3:
            raise ValueError(f"uint8 images must be (B,H,W,3) or (B,3,H,W), got {tuple(t.shape)}")
        return t.float()
    if t.is_floating_point():
        if t.shape[1] != 3:
            raise ValueError(f"float images must be (B,3,H,W) in [0, 1], got {tuple(t.shape)}")
        return t.float() * 255.0
    raise ValueError(f"images must be uint8 or float, got {t.dtype}")


def preprocess_for_inception(images, resize: str = "tf", device=None) -> torch.Tensor:
    """Images -> the network's input, float32 (B, 3, 299, 299) in [-1, 1].

    images: uint8 (B, H, W, 3) / (B, 3, H, W), or float (B, 3, H, W) in [0, 1].

    * ``resize="tf"`` (default): TF1 legacy bilinear resize of the 0..255 values to 299 x 299,
      then ``(x - 128) / 128`` -- the operations inside the ADM evaluator's TensorFlow graph, as
      reproduced by torch-fidelity. This is the closest PyTorch match to ADM numbers.
    * ``resize="pytorch-fid"``: ``x / 255``, ``F.interpolate(bilinear, align_corners=False)``
      to 299, then ``2x - 1`` -- exactly pytorch-fid's ``InceptionV3`` preprocessing.

    Inputs already 299 x 299 are not changed by either resize.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    x = _to_nchw_255(images)
    if device is not None:
        x = x.to(device)
    if resize == "tf":
        x = _resize_bilinear_tf1(x, INPUT_SIZE)
        return (x - 128.0) / 128.0
    x = x / 255.0
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------- extractor interface
@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluation needs from a feature network (FID Inception, the builtin judge, ...).

    ``name``: short id recorded in results (e.g. ``"inception"``, ``"judge"``).
    ``describe()``: one line saying exactly what the features are (printed by the CLI).
    ``__call__(images)``: images uint8 (B, H, W, 3), numpy or torch ->
    ``{"features": (B, F) float, "logits": (B, K) float or None}`` (numpy or torch; CPU).
    """

    name: str

    def describe(self) -> str: ...

    def __call__(self, images) -> Dict[str, Optional[Union[np.ndarray, torch.Tensor]]]: ...


class FIDInceptionExtractor:
    """:class:`FeatureExtractor` over :class:`FIDInceptionV3`.

    Returns ``features`` float32 (B, 2048) pool3 and ``logits`` float32 (B, 1008) unbiased
    logits, as numpy arrays. Runs in IEEE float32 (TF32 off, cuDNN deterministic:
    :func:`~reptok.evaluate.metrics.strict_fp32`) under ``torch.no_grad`` on ``device``.
    ``chunk``: the batch the evaluation feeds it (a :class:`~reptok.evaluate.inputs.FeatureStream`
    pads the stream to multiples of it, so results do not depend on the loader's batch size);
    default 1 on a CPU (no padding, and per-image throughput there equals batched) and 100 on
    CUDA.
    """

    name = "inception"

    def __init__(
        self,
        model: FIDInceptionV3,
        *,
        device: Union[str, torch.device] = "cpu",
        resize: str = "tf",
        weights_path: Optional[str] = None,
        chunk: Optional[int] = None,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).float().eval().requires_grad_(False)
        self.resize = resize
        self.weights_path = weights_path
        self.chunk = int(chunk) if chunk else (1 if self.device.type == "cpu" else 100)

    def describe(self) -> str:
        weights = self.weights_path or "RANDOM WEIGHTS (testing only; numbers are meaningless)"
        if self.resize == "tf":
            prep = ("TF1 bilinear resize to 299x299 (align_corners=False, no half-pixel centres) "
                    "then (x-128)/128, as the ADM evaluator graph / torch-fidelity")
        else:
            prep = ("x/255, F.interpolate bilinear to 299x299 (align_corners=False), then 2x-1, "
                    "as pytorch-fid")
        return (
            f"FID Inception-v3 (TF inception-2015-12-05 port, weights {weights}); "
            f"FID/PR on 2048-d pool3 features; IS on 1008-way unbiased logits (no fc bias, as "
            f"ADM/torch-fidelity); preprocessing: {prep}. PyTorch port: agrees with the TF ADM "
            f"evaluator up to small numerical differences."
        )

    @torch.no_grad()
    def __call__(self, images) -> Dict[str, np.ndarray]:
        with strict_fp32():
            x = preprocess_for_inception(images, self.resize, device=self.device)
            pool, logits = self.model(x)
        return {
            "features": pool.float().cpu().numpy(),
            "logits": logits.float().cpu().numpy(),
        }


# ----------------------------------------------------------------------------- weights
def _cache_candidates() -> List[str]:
    """Where the weights usually are after a download (torch.hub's checkpoint directory)."""
    dirs = []
    if os.environ.get("TORCH_HOME"):
        dirs.append(os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints"))
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))  # honours torch.hub.set_dir
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(xdg, "torch", "hub", "checkpoints"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints"))
    out: List[str] = []
    for d in dirs:
        for name in (FID_WEIGHTS_FILENAME,) + _ALT_FILENAMES:
            p = os.path.join(d, name)
            if p not in out:
                out.append(p)
    return out


def _download_weights() -> str:
    """Download into torch.hub's checkpoint directory (the standard cache) and return the path.

    Kept as a separate function so tests can replace it (no network at test time).
    """
    torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location="cpu")
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILENAME)


def find_fid_inception_weights(path: Optional[str] = None, *, download: bool = True) -> str:
    """Locate the FID Inception weights; call this before any work so a missing file fails fast.

    Order: the explicit ``path`` (``--inception-weights``; an error if it does not exist),
    then the download caches (``$TORCH_HOME/hub/checkpoints``, ``torch.hub.get_dir()``,
    ``~/.cache/torch/hub/checkpoints``; pytorch-fid's and torch-fidelity's file names), then a
    download via ``torch.hub.load_state_dict_from_url`` when ``download`` is true.
    Returns the file path. Raises :class:`InceptionWeightsMissing` with :data:`MISSING_MESSAGE`.
    """
    if path is not None:
        path = os.path.expanduser(str(path))
        if os.path.isfile(path):
            return path
        raise InceptionWeightsMissing(f"{MISSING_MESSAGE} (no file at {path})")
    for candidate in _cache_candidates():
        if os.path.isfile(candidate):
            return candidate
    if download:
        try:
            got = _download_weights()
        except Exception as e:  # offline, proxy, HTTP error: all mean "get the file yourself"
            raise InceptionWeightsMissing(f"{MISSING_MESSAGE} (download failed: {e})") from e
        if os.path.isfile(got):
            return got
    raise InceptionWeightsMissing(MISSING_MESSAGE)


def load_fid_inception(
    weights: Optional[str] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    resize: str = "tf",
    download: bool = True,
) -> FIDInceptionExtractor:
    """The FID Inception feature extractor with the real weights.

    weights: explicit path (``--inception-weights``) or None to search the caches / download
    (see :func:`find_fid_inception_weights`). Raises :class:`InceptionWeightsMissing` when no
    file is available and ``ValueError`` when the file is not an FID Inception state dict.
    """
    path = find_fid_inception_weights(weights, download=download)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not the FID Inception state dict ({first})") from e
    return FIDInceptionExtractor(model, device=device, resize=resize, weights_path=path)
