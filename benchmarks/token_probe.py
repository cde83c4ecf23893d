"""What does an encoder's token know? Linear probes on held-out builtin:shapes.

For each encoder (a preset's encoder with its weights, and the same architecture at random init),
encodes N held-out shapes and fits linear probes from the standardised token (80% / 20%
split) to: the class (accuracy of reptok's logistic probe, the one ``reptok eval probe`` runs),
the geometry (ridge R^2 of centre x, centre y, radius) and the pixels (ridge; mean squared error of a linear reconstruction, in [-1, 1] units; the pixel variance is printed
for scale). A token the decoder can turn into class-correct shapes needs class and geometry.

    python benchmarks/token_probe.py [--preset small] [--images 3000]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from reptok.evaluate.probe import logistic_probe, standardise
from reptok.shapes.render import NUM_CLASSES, render_shape
from reptok.shapes.ssl import build_encoder
from reptok.presets import get_preset


def probe(tokens: np.ndarray, labels: np.ndarray, geometry: np.ndarray, pixels: np.ndarray) -> dict:
    """Class accuracy: reptok's logistic probe (``reptok eval probe``); geometry and pixels: ridge
    regressions on the same standardised token (train statistics), 80% / 20% in order."""
    n = len(tokens)
    tr, te = np.arange(int(0.8 * n)), np.arange(int(0.8 * n), n)
    acc = logistic_probe(tokens, labels, tr, te)["accuracy"]
    ztr, zte = (np.c_[z.numpy(), np.ones(len(z))] for z in standardise(*(torch.from_numpy(tokens[i]).double()
                                                                        for i in (tr, te))))
    gram = ztr.T @ ztr + np.eye(ztr.shape[1])

    def ridge(y):
        return zte @ np.linalg.solve(gram, ztr.T @ y[tr])

    r2 = 1 - ((ridge(geometry) - geometry[te]) ** 2).mean(0) / geometry[te].var(0)
    mse = float(((ridge(pixels) - pixels[te]) ** 2).mean())
    return {"class_acc": acc, "r2_cx": r2[0], "r2_cy": r2[1], "r2_radius": r2[2], "pixel_mse": mse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    res = cfg.image_size
    imgs, geo = [], []
    for i in range(args.images):
        im, _, a = render_shape(np.random.default_rng([args.seed, i]), i % NUM_CLASSES, res)
        imgs.append(im)
        geo.append([a["cx"], a["cy"], a["radius"]])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels, geometry, pixels = np.arange(args.images) % NUM_CLASSES, np.array(geo), x.flatten(1).numpy()
    encoders = {"random init": dataclasses.replace(cfg.encoder, weights="random")}
    if cfg.encoder.weights != "random":
        encoders[cfg.encoder.weights] = cfg.encoder
    print(f"linear probes of the {args.preset} preset's token on {args.images} held-out {res}px shapes "
          f"(pixel variance {pixels[int(0.8 * args.images):].var(0).mean():.4f})")
    print(f"{'encoder':22} {'class acc':>9} {'R2 cx':>6} {'R2 cy':>6} {'R2 r':>6} {'pixel mse':>10}")
    for name, ecfg in encoders.items():
        enc = build_encoder(ecfg)
        with torch.no_grad():
            tokens = torch.cat([enc(x[i: i + 500]) for i in range(0, len(x), 500)]).numpy()
        r = probe(tokens, labels, geometry, pixels)
        print(f"{name:22} {r['class_acc']:>9.3f} {r['r2_cx']:>6.2f} {r['r2_cy']:>6.2f} {r['r2_radius']:>6.2f} "
              f"{r['pixel_mse']:>10.4f}")


if __name__ == "__main__":
    main()
