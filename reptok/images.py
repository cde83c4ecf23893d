"""Image I/O shared by data prep, reconstruction, sampling and evaluation."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from .io import atomic_write_bytes
from .errors import InputError

# The image files a folder is read for, by `data prep` and by `eval` alike (lower-case suffixes;
# a tuple, so both ``suffix in`` and ``name.endswith`` work).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / DiT centre crop: halve with BOX while >= 2x the target, BICUBIC resize so the short
    side equals ``image_size``, then centre crop. Returns uint8 (H, W, 3)."""
    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def load_image(path: Union[str, Path], image_size: int) -> np.ndarray:
    """Read, fully decode and centre-crop one image file; InputError if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return center_crop_arr(im, image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image ({e})") from None


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H,W,3) or (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """float (B,3,H,W) in [-1,1] -> uint8 (B,H,W,3) tensor on the same device (the rule of
    :func:`tensor_to_uint8`; elementwise float32 ops, so every device gives the same bytes)."""
    x = ((images.detach().float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B,3,H,W) in [-1,1] -> uint8 (B,H,W,3), rounded to the nearest level
    (``(x + 1) * 127.5 + 0.5``, clamped: torchvision's ``save_image`` convention)."""
    return uint8_hwc(images.detach().cpu()).numpy()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Union[str, Path], arr: np.ndarray) -> None:
    """Write one uint8 (H,W,3) image atomically."""
    atomic_write_bytes(Path(path), png_bytes(arr))


def make_grid(images: Sequence[np.ndarray], ncol: int = 0, pad: int = 2) -> np.ndarray:
    """uint8 images (H,W,3) -> one uint8 grid with ``ncol`` columns (default ~square)."""
    n = len(images)
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    h, w = images[0].shape[:2]
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid

