"""Validation during training: numbers on a held-out set, comparable across runs, resumes and
world sizes.

``train recon --val-data DIR`` (a prepared dataset) / ``train gen --val-tokens FILE`` (extracted
tokens) turn it on; every ``train.val_every`` steps (and at the last step) the EMA weights are
scored and one row with ``"split": "val"`` goes to metrics.jsonl, TensorBoard / W&B (``val/*``)
and the plain log:

- ``rf``: the flow-matching loss at 8 fixed times, the midpoints t = (k + 0.5) / 8 of 8 equal
  segments of [0, 1] (Esser et al.'s validation recipe), averaged over the times and over the
  first ``train.val_examples`` held-out items (evenly spaced through the set). The noise of
  (item i, time k) is drawn from (train.seed, 8 i + k), so the number does not depend on the
  batch, the world size or a resume: two runs on the same held-out set are directly comparable;
- stage a: ``cos`` (the cosine-anchor term 1 - cos(z, z_ssl)), ``loss`` = rf + cos_weight * cos,
  and on ``train.val_fid_n`` held-out images reconstructed at the run's decoder steps and
  solver: ``psnr`` (dB, capped at 100) and ``ssim`` against the originals and ``fid_proxy``, the
  Fréchet distance between the features of the reconstructions and of the originals
  (``features``: the builtin judge for images up to 32 px, the FID Inception network above; a
  proxy: few images, so it is biased upwards and only comparable at the same N). A grid of the
  first 8 (originals over reconstructions) goes to TensorBoard as ``val/recon``;
- stage b: ``token_fd``, the Fréchet distance in token space between ``train.val_fid_n``
  generated tokens (class-balanced: class i mod C, the run's sampler steps and CFG; text-to-image:
  on the captions of the held-out tokens it is compared with) and as many held-out tokens;
  ``fd_per_class`` is the number of generated tokens per class.

Work is split in fixed chunks of ``CHUNK`` items dealt round-robin to the ranks; each rank writes
its items' values into zero-filled buffers that are summed across ranks (adding zeros is exact),
so every rank ends with the same per-item values as one process.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Sequence

import numpy as np
import torch
import torch.distributed as tdist

from .. import flow
from ..dist import DistInfo
from ..errors import InputError
from ..pipeline import index_noise, Pipeline

K_TIMES = 8
CHUNK = 16  # held-out items per forward (x K_TIMES rows): fixed, so batch composition never changes
STREAM_VAL_X0, STREAM_VAL_EPS = 2, 3  # noise streams after the sampler's (generator 0, decoder 1)
GRID = 8
PSNR_CAP = 100.0


def fixed_times(k: int = K_TIMES) -> torch.Tensor:
    """The k stratified midpoints (j + 0.5) / k, float32."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) / k).float()


def evenly_spaced(total: int, n: int) -> list:
    """n indices spread evenly over range(total) (all of them when n >= total)."""
    n = min(n, total)
    return [i * total // n for i in range(n)]


def fixed_t_loss(velocity_fn: flow.VelocityFn, x1: torch.Tensor, items: Sequence[int], seed: int,
                 k: int = K_TIMES) -> torch.Tensor:
    """Per-item flow loss averaged over the k fixed times, float64 (B,). ``velocity_fn`` gets the
    batch repeated item-major (item 0 at its k times, then item 1, ...); the noise of (item i,
    time j) is drawn from (seed, k i + j)."""
    b = len(items)
    t = fixed_times(k).repeat(b).to(x1.device)
    x0 = index_noise(seed, [k * int(i) + j for i in items for j in range(k)], x1.shape[1:], STREAM_VAL_X0)
    per = flow.flow_matching_loss(velocity_fn, x1.repeat_interleave(k, 0), x0.to(x1.device, x1.dtype), t)
    return per.double().view(b, k).mean(1)


class Buffers:
    """Per-item float64 buffers on the training device; a rank fills its items, :meth:`reduce`
    sums them over the ranks (exact: every entry is non-zero on one rank at most)."""

    def __init__(self, device, info: DistInfo, **shapes):
        self.info = info
        self.t = {k: torch.zeros(s if isinstance(s, tuple) else (s,), dtype=torch.float64, device=device)
                  for k, s in shapes.items()}

    def put(self, key: str, start: int, values) -> None:
        v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        self.t[key][start:start + len(v)] = v.to(self.t[key].device, torch.float64)

    def reduce(self) -> Dict[str, np.ndarray]:
        if self.info.enabled:
            for v in self.t.values():
                tdist.all_reduce(v)
        return {k: v.cpu().numpy() for k, v in self.t.items()}


def my_chunks(n: int, info: DistInfo):
    """(start, stop) of this rank's chunks of range(n)."""
    starts = range(0, n, CHUNK)
    return [(s, min(s + CHUNK, n)) for c, s in enumerate(starts) if c % info.world_size == info.rank]


def fd_of(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets (evaluate.metrics; with fewer items than feature
    dimensions the covariances are singular: its eps retry handles that, the warning is noise)."""
    import warnings

    from ..evaluate.metrics import feature_stats, frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(frechet_distance(*feature_stats(a), *feature_stats(b)))


class Validation:
    """Common part: when it runs and how its row is logged. Subclasses implement :meth:`compute`."""

    def __init__(self, every: int, info: DistInfo, device, amp_dtype=None, seed: int = 0,
                 describe: str = ""):
        self.every, self.info, self.device, self.amp_dtype, self.seed = every, info, device, amp_dtype, seed
        self.describe = describe  # one line for the log at the start
        self.grid = None

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == total)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.amp_dtype)

    def run(self, modules: Dict[str, torch.nn.Module], step: int, log) -> dict:
        """Score ``modules`` (the EMA weights), log the row (and grid) and return it. Every rank calls it."""
        with torch.no_grad():
            rec = {"step": step, "split": "val", **self.compute(modules)}
        log.record(rec)
        if self.grid is not None:
            log.image("val/recon", self.grid, step)
        return rec

    def compute(self, modules) -> dict:
        raise NotImplementedError


def validation_off(reason: str) -> Validation:
    """A validation that never runs; its log line says why (once, at the start)."""
    return Validation(0, DistInfo(), "cpu", describe=f"validation off: {reason}")


# ----------------------------------------------------------------------------- stage a
def recon_extractor(choice: str, image_size: int, device):
    """(feature extractor or None, name or why not) for stage a's Fréchet proxy: "auto" takes the
    builtin judge up to 32 px (Inception upsamples tiny images to 299 px: features of blur) and
    the FID Inception network above (off, with the reason, when its weights are not found)."""
    if choice == "none":
        return None, "train.val_features=none"
    name = choice if choice != "auto" else ("judge" if image_size <= 32 else "inception")
    if name == "judge":
        from ..shapes.judge import load_judge

        return load_judge(device), "judge"
    from ..evaluate.commands import build_extractor, resolve_features

    try:
        feats = resolve_features("inception", download=False)
    except InputError as e:
        if choice == "inception":
            raise
        return None, f"no FID Inception weights ({str(e).splitlines()[0]})"
    return build_extractor(feats, device), "inception"


class ReconValidation(Validation):
    """Stage a on a held-out prepared dataset (see the module docstring)."""

    def __init__(self, dataset, latent, cfg, *, info: DistInfo, device, amp_dtype=None, freeze_token=False,
                 extractor=None, features: str = ""):
        t = cfg.train
        super().__init__(t.val_every, info, device, amp_dtype, t.seed)
        self.dataset, self.latent, self.cfg, self.freeze_token = dataset, latent, cfg, freeze_token
        self.extractor, self.features = extractor, features
        self.items = evenly_spaced(len(dataset), t.val_examples)
        self.recon_items = evenly_spaced(len(dataset), t.val_fid_n)
        self.latent_shape = (cfg.decoder.in_channels, cfg.decoder.input_size, cfg.decoder.input_size)
        self.ref = None  # features of the originals, computed once
        self.fdim = 0 if extractor is None else int(np.asarray(
            extractor(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8))["features"]).reshape(1, -1).shape[1])
        fid = (f"Fréchet proxy on {len(self.recon_items)} reconstructions in {features} features"
               if extractor is not None and len(self.recon_items) > 1 else f"no Fréchet proxy ({features or 'val_fid_n < 2'})")
        self.describe = (f"validation every {self.every} steps on {len(self.items)} held-out images "
                         f"(flow loss at {K_TIMES} fixed times, cosine anchor; PSNR / SSIM on "
                         f"{len(self.recon_items)} reconstructions; {fid})")

    def _images(self, idx) -> torch.Tensor:
        u8 = torch.from_numpy(self.dataset.get_uint8_chw(np.asarray(idx)))
        return u8.to(self.device).float().div_(127.5).sub_(1.0)

    def _losses(self, enc, dec, images, idx):
        from ..models.encoder import cos_anchor_loss

        eps = index_noise(self.seed, idx, self.latent_shape, STREAM_VAL_EPS).to(self.device)
        x1 = self.latent.latents_from_moments(self.latent.encode_moments(images).float(), noise=eps).float()
        if self.freeze_token:
            z, cos = enc.forward_frozen(images), torch.zeros(len(idx), device=images.device)
        else:
            z, z_frozen = enc.forward_pair(images)
            cos = cos_anchor_loss(z, z_frozen)
        zk = z.repeat_interleave(K_TIMES, 0)
        return fixed_t_loss(lambda xt, t: dec(xt, t, zk), x1, idx, self.seed), cos

    def compute(self, modules) -> dict:
        enc, dec = modules["encoder"], modules["decoder"]
        n = len(self.items)
        buf = Buffers(self.device, self.info, rf=n, cos=n)
        for a, b in my_chunks(n, self.info):
            with self.autocast():
                rf, cos = self._losses(enc, dec, self._images(self.items[a:b]), self.items[a:b])
            buf.put("rf", a, rf)
            buf.put("cos", a, cos)
        v = buf.reduce()
        rf, cos = float(v["rf"].mean()), float(v["cos"].mean())
        rec = {"loss": round(rf + self.cfg.train.cos_weight * cos, 6), "rf": round(rf, 6), "cos": round(cos, 6)}
        if self.recon_items:
            rec.update(self._recon(enc, dec))
        return rec

    def _recon(self, enc, dec) -> dict:
        """PSNR / SSIM / Fréchet proxy of the reconstructions, and the grid."""
        from ..evaluate.metrics import psnr, ssim
        from ..images import make_grid, tensor_to_uint8

        view = Pipeline(self.cfg, encoder=enc, decoder=dec, latent=self.latent, autocast_dtype=self.amp_dtype)
        m, r, g = len(self.recon_items), self.cfg.image_size, min(GRID, len(self.recon_items))
        shapes = {"psnr": m, "ssim": m, "grid": (g, r, r, 3), "feat": (m, self.fdim)}
        if self.ref is None:
            shapes["ref"] = (m, self.fdim)
        buf = Buffers(self.device, self.info, **shapes)
        for a, b in my_chunks(m, self.info):
            idx = self.recon_items[a:b]
            images = self._images(idx)
            orig = tensor_to_uint8(images)
            out = tensor_to_uint8(view.decode(view.encode(images), view.decoder_noise(idx, self.seed)))
            buf.put("psnr", a, np.minimum(psnr(orig, out), PSNR_CAP))
            buf.put("ssim", a, ssim(orig, out))
            buf.put("grid", a, out[: max(0, g - a)])
            if self.extractor is not None:
                buf.put("feat", a, np.asarray(self.extractor(out)["features"]).reshape(len(idx), -1))
                if self.ref is None:
                    buf.put("ref", a, np.asarray(self.extractor(orig)["features"]).reshape(len(idx), -1))
        v = buf.reduce()
        self.ref = v.get("ref", self.ref)
        originals = tensor_to_uint8(self._images(self.recon_items[:g]).cpu())
        self.grid = make_grid(list(originals) + list(v["grid"].astype(np.uint8)), ncol=g)
        rec = {"psnr": round(float(v["psnr"].mean()), 4), "ssim": round(float(v["ssim"].mean()), 5)}
        if self.extractor is not None and m > 1:
            rec.update(fid_proxy=round(fd_of(v["feat"], self.ref), 4), features=self.features, fid_n=m)
        return rec


# ----------------------------------------------------------------------------- stage b
class GenValidation(Validation):
    """Stage b on held-out tokens (see the module docstring)."""

    def __init__(self, tokens, labels, cfg, *, info: DistInfo, device, amp_dtype=None, text=None):
        t = cfg.train
        super().__init__(t.val_every, info, device, amp_dtype, t.seed)
        self.cfg = cfg
        self.tokens = torch.from_numpy(np.array(tokens, dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).clamp(min=0)  # unlabelled: ignored
        self.items = evenly_spaced(len(self.tokens), t.val_examples)
        self.ref_items = evenly_spaced(len(self.tokens), t.val_fid_n)
        self.classes = cfg.generator.num_classes
        # Text-to-image: (CaptionFeatures of the held-out captions, the text encoder, the captions);
        # the loss conditions on each item's caption, the generated tokens on the reference items' captions.
        self.text = text
        fd = (f"token Fréchet distance of {len(self.ref_items)} generated vs held-out tokens"
              if len(self.ref_items) > 1 else "no token Fréchet distance (val_fid_n < 2)")
        self.describe = (f"validation every {self.every} steps on {len(self.items)} held-out tokens "
                         f"(flow loss at {K_TIMES} fixed times; {fd})")

    def compute(self, modules) -> dict:
        gen = modules["generator"]
        n = len(self.items)
        buf = Buffers(self.device, self.info, rf=n)
        for a, b in my_chunks(n, self.info):
            idx = self.items[a:b]
            cond = self._condition(idx)
            with self.autocast():
                x1 = gen.normalize(self.tokens[idx].to(self.device))
                buf.put("rf", a, fixed_t_loss(lambda xt, t: gen(xt, t, *cond), x1, idx, self.seed))
        rf = float(buf.reduce()["rf"].mean())
        rec = {"loss": round(rf, 6), "rf": round(rf, 6)}
        if len(self.ref_items) > 1:
            rec.update(self._token_fd(gen))
        return rec

    def _condition(self, idx) -> tuple:
        """The generator's condition arguments for items ``idx``, repeated for the K times."""
        if self.text is None:
            return (self.labels[idx].to(self.device).repeat_interleave(K_TIMES),)
        hidden, mask = self.text[0].rows(torch.as_tensor(idx))
        return (hidden.to(self.device).repeat_interleave(K_TIMES, 0), mask.to(self.device).repeat_interleave(K_TIMES, 0))

    def _token_fd(self, gen) -> dict:
        view = Pipeline(self.cfg, generator=gen, text_encoder=None if self.text is None else self.text[1],
                        autocast_dtype=self.amp_dtype)
        m, dim = len(self.ref_items), self.tokens.shape[1]
        # The run's CFG; a class generator trained without a null class has none to apply.
        no_cfg = self.text is None and gen.null_class is None
        args = view.sampler_args(**({"guidance_scale": 1.0} if no_cfg else {}))
        buf = Buffers(self.device, self.info, tok=(m, dim))
        for a, b in my_chunks(m, self.info):
            noise = view.generator_noise(range(a, b), self.seed)
            if self.text is not None:
                prompts = [str(self.text[2][i]) for i in self.ref_items[a:b]]
                out = view.generate(prompts, noise, args)
            else:
                out = view.generate(torch.arange(a, b) % max(self.classes, 1), noise, args)
            buf.put("tok", a, out.float())
        fake = buf.reduce()["tok"]
        rec = {"token_fd": round(fd_of(fake, self.tokens[self.ref_items].double().numpy()), 5), "fd_n": m}
        if self.classes:
            rec["fd_per_class"] = m // self.classes
        return rec
