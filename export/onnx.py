"""ONNX export of a reptok pipeline: one graph per network call, verified with ONNX Runtime.

Graphs written to OUT (every input and output has the dynamic batch axis ``batch``)::

    generator.onnx    x (B, n, D) f32, t (B,) f32, y (B,) i64  -> v (B, n, D)       token space
      text runs:      x (B, n, D) f32, t (B,) f32, text (B, L, text_dim) f32,
                      text_mask (B, L) f32 (1 = valid token, 0 = padding) -> v (B, n, D)
    decoder.onnx      x (B, C, S, S) f32, t (B,) f32, token (B, Dt) f32 -> v (B, C, S, S)
    vae_decoder.onnx  latents (B, C, h, w) f32 -> images (B, 3, H, W)   (scale/shift inside)
    encoder.onnx      images (B, 3, H, W) f32 in [-1, 1] -> token (B, Dt)  (only on request)
    manifest.json     what the runtime needs besides the graphs (see ``export_onnx``)

Conventions are the torch modules' (``reptok/pipeline.py``): the decoder uses reptok's time
(t = 0 noise, t = 1 data, velocity data - noise); the generator works on normalised tokens, so
``denormalize`` (token_mean / token_std, stored in the manifest) runs outside the graph.

**Text-conditioned generators** export the bare network too: L is fixed at
``generator.text_len`` (the text encoder's max tokens), the mask is float 0/1 (simplest for
TensorRT; valid = mask > 0.5 inside the graph). The frozen text encoder is *not* exported:
prompts (and the empty prompt, CFG's null condition) are encoded in torch at sampling time
(``reptok.run.load_text_encoder``), once per call, and their hidden states are fed to the
graph. The manifest's ``generator`` entry records ``text_conditioned``, ``text_encoder`` (the
spec), ``text_dim`` and ``text_len``; ``null_class`` is None.

**CFG is outside the generator graph.** The shared sampler loop (``reptok.flow.guided_velocity``)
calls the generator once per step with the batch doubled to [null rows, class rows] inside the
CFG interval, and once with the plain batch outside it. So the graph is the bare network and any
engine built from it must accept 2x the sampling batch (``export/trt.py`` sizes the generator's
profile that way). This keeps one sampling loop for every backend and lets the CFG scale and
interval change at sampling time without re-exporting.

Graph I/O stays float32 (and int64 labels) whatever ``dtype``: with ``dtype="fp16"`` the wrapper
casts inputs to half inside the graph and the output back to float32, so the runtime and the
sampler never see half tensors (the flow state stays float32, as with torch autocast).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from reptok.choices import DTYPES as ALL_DTYPES
from reptok.errors import InputError
from reptok.io import atomic_dir, read_json
from reptok.outputs import check_new_output

MANIFEST = "manifest.json"
FORMAT = "reptok-onnx/1"
GRAPHS = ("generator", "decoder", "vae", "encoder")  # component names accepted by --components
GRAPH_FILE = {"generator": "generator", "decoder": "decoder", "vae": "vae_decoder", "encoder": "encoder"}
DEFAULT_COMPONENTS = ("generator", "decoder", "vae")
DTYPES = {k: ALL_DTYPES[k] for k in ("fp32", "fp16")}  # weights stored in the graph; no bf16 ONNX here
# Default verification tolerance: max |ort - torch_fp32| <= atol * max(1, max |torch_fp32|).
# fp32: only kernel reordering differs; fp16: the half-precision rounding of a whole network.
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 3e-2}
# protobuf cannot serialise a message over 2 GiB; larger graphs keep their weights beside them.
_PROTO_LIMIT = 1_900_000_000
VERIFY_BATCHES = (1, 3)


class ExportVerificationError(RuntimeError):
    """ONNX Runtime disagrees with torch beyond the tolerance (a failure: exit code 1)."""


# ----------------------------------------------------------------------------- small helpers
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pipeline_config_sha256(cfg) -> str:
    """Hash of a PipelineConfig's canonical JSON (used when a pipeline has no run directory)."""
    return sha256_bytes(json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode())


def run_config_sha256(run: Path) -> str:
    """sha256 of a run directory's config.json bytes: what an export is tied to."""
    from reptok.run import CONFIG

    path = Path(run) / CONFIG if Path(run).is_dir() else Path(run)
    return sha256_bytes(path.read_bytes())


def read_manifest(folder: Path) -> dict:
    """The manifest.json of an export folder (ONNX or TensorRT), or a one-line InputError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder}: not a reptok export folder (no {MANIFEST}); write one with 'reptok export onnx'")

    doc = read_json(path, "manifest")
    if doc.get("format") != FORMAT:
        raise InputError(f"{path}: unknown export format {doc.get('format')!r} (expected {FORMAT})")
    return doc


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only cast when needed: a traced no-op Cast is useless in the graph (see layers._cast).
    return x if x.dtype == dtype else x.to(dtype)


def versions() -> dict:
    import onnx

    import reptok

    v = {"torch": torch.__version__, "onnx": onnx.__version__, "reptok": reptok.__version__}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # export works without ORT only with verify=False
        v["onnxruntime"] = None
    return v


# ----------------------------------------------------------------------------- graph wrappers
class GraphModule(nn.Module):
    """The exact network call of one graph, with float I/O kept in float32.

    ``call(*inputs)`` is the torch call the pipeline makes (e.g. ``decoder(x, t, token)``).
    Floating inputs other than ``t`` are cast to the compute dtype inside the graph; the
    networks cast ``t`` themselves (they compute time embeddings in float32).
    """

    def __init__(self, net: nn.Module, call: Callable, keep_fp32: Tuple[int, ...] = (),
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = net
        self._call = call
        self.keep_fp32 = keep_fp32  # positions of inputs never cast (the time t)
        self.compute_dtype = compute_dtype
        # Eval mode on the wrapper itself: torch.onnx.export restores the wrapper's mode after
        # tracing, recursively, so a train-mode wrapper would leave the pipeline's networks in
        # train mode (random label dropout in the generator).
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [_as(a, self.compute_dtype) if a.is_floating_point() and i not in self.keep_fp32 else a
                for i, a in enumerate(inputs)]
        return _as(self._call(self.net, *cast), torch.float32)


@dataclass
class GraphSpec:
    """One graph to export: its wrapper, input names, and a random-input maker for verification."""

    component: str  # generator | decoder | vae | encoder
    module: GraphModule
    input_names: List[str]
    output_name: str
    make_inputs: Callable[[int, torch.Generator], Tuple[torch.Tensor, ...]]

    @property
    def file(self) -> str:
        return GRAPH_FILE[self.component] + ".onnx"


def _graph_specs(pipe, components: Sequence[str]) -> Tuple[List[GraphSpec], Dict[str, str]]:
    """GraphSpecs for the requested components of ``pipe``, and {component: why skipped}."""
    cfg = pipe.cfg
    specs: List[GraphSpec] = []
    skipped: Dict[str, str] = {}
    for comp in components:
        if comp == "generator":
            gen = pipe.generator
            if gen is None:
                skipped[comp] = "the run has no generator (a tokenizer run)"
                continue
            g = cfg.generator
            if g.text_encoder is not None:
                # generator(x, t, text, text_mask): the prompts' hidden states come from the torch
                # text encoder at sampling time (outside the graph); L is fixed at text_len.
                text_len = _text_len(pipe)

                def text_inputs(b, rng, g=g, L=text_len):
                    # Prefix masks of random lengths 1..L as float 0/1 (what encoders produce).
                    lengths = torch.randint(1, L + 1, (b,), generator=rng)
                    mask = (torch.arange(L)[None] < lengths[:, None]).float()
                    return (torch.randn(b, g.n_tokens, g.token_dim, generator=rng), torch.rand(b, generator=rng),
                            torch.randn(b, L, g.text_dim, generator=rng), mask)

                m = GraphModule(gen, _text_generator_call, keep_fp32=(1, 3))
                specs.append(GraphSpec(comp, m, ["x", "t", "text", "text_mask"], "v", text_inputs))
                continue
            n_labels = g.num_classes + (1 if gen.null_class is not None else 0)

            def gen_inputs(b, rng, g=g, n_labels=n_labels):
                y = torch.randint(0, max(n_labels, 1), (b,), generator=rng, dtype=torch.long)
                return torch.randn(b, g.n_tokens, g.token_dim, generator=rng), torch.rand(b, generator=rng), y

            m = GraphModule(gen, lambda net, x, t, y: net(x, t, y), keep_fp32=(1,))
            specs.append(GraphSpec(comp, m, ["x", "t", "y"], "v", gen_inputs))
        elif comp == "decoder":
            d = cfg.decoder

            def dec_inputs(b, rng, d=d):
                return (torch.randn(b, d.in_channels, d.input_size, d.input_size, generator=rng),
                        torch.rand(b, generator=rng), torch.randn(b, d.token_dim, generator=rng))

            m = GraphModule(pipe.decoder, lambda net, x, t, token: net(x, t, token), keep_fp32=(1,))
            specs.append(GraphSpec(comp, m, ["x", "t", "token"], "v", dec_inputs))
        elif comp == "vae":
            if cfg.vae.is_pixel:
                skipped[comp] = "pixel space (vae.source = none): the decoder's output is the image"
                continue
            d = cfg.decoder

            def vae_inputs(b, rng, d=d):
                return (torch.randn(b, d.in_channels, d.input_size, d.input_size, generator=rng),)

            specs.append(GraphSpec(comp, GraphModule(pipe.latent, lambda net, z: net.decode(z)),
                                   ["latents"], "images", vae_inputs))
        elif comp == "encoder":
            if pipe.encoder is None:
                skipped[comp] = "the run has no encoder weights"
                continue
            s = cfg.image_size

            def enc_inputs(b, rng, s=s):
                return (torch.rand(b, 3, s, s, generator=rng) * 2 - 1,)

            specs.append(GraphSpec(comp, GraphModule(pipe.encoder, _encoder_call),
                                   ["images"], "token", enc_inputs))
    return specs, skipped


def _text_generator_call(gen, x, t, text, text_mask):
    """The text-conditioned generator's ``forward`` with the mask as float 0/1 (valid = mask > 0.5 in the graph):
    a float input is the simplest for TensorRT, and the runtime casts bool masks to it."""
    return gen(x, t, text, text_mask)


def _text_len(pipe) -> int:
    """L of the text graph input: generator.text_len (filled in at training), else the encoder's."""
    g = pipe.cfg.generator
    if g.text_len:
        return int(g.text_len)
    te = getattr(pipe, "text_encoder", None)
    if te is None or not te.max_len:
        raise InputError("text-conditioned generator: generator.text_len is not set and no text encoder is loaded")
    return int(te.max_len)


def _encoder_call(enc, images: torch.Tensor) -> torch.Tensor:
    """``SSLEncoder.forward``: (B, 3, S, S) in [-1, 1] -> (B, D) float32 (the graph's S is fixed)."""
    return enc(images)


def parse_components(components: Union[str, Iterable[str], None]) -> List[str]:
    """'generator,decoder,vae' (or a list; 'vae_decoder' is accepted for 'vae') -> checked names."""
    if components is None:
        return list(DEFAULT_COMPONENTS)
    items = components.split(",") if isinstance(components, str) else list(components)
    out = []
    for c in (i.strip() for i in items):
        c = "vae" if c == "vae_decoder" else c
        if c not in GRAPHS:
            raise InputError(f"--components {c!r}: choose from {', '.join(GRAPHS)}")
        if c not in out:
            out.append(c)
    if not out:
        raise InputError("--components: nothing to export")
    return out


# ----------------------------------------------------------------------------- ONNX I/O
def _value_info(vi) -> dict:
    from onnx import helper

    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]
    dtype = str(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return {"name": vi.name, "shape": shape, "dtype": dtype}


def _torch_export(spec: GraphSpec, path: Path, opset: int) -> Tuple[int, ...]:
    """TorchScript-based exporter (``dynamo=False``: no onnxscript dependency), traced at batch
    2 (batch 1 could let the tracer specialise a broadcast). Returns the output's non-batch shape."""
    example = spec.make_inputs(2, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        out_shape = tuple(spec.module(*example).shape[1:])
    names = spec.input_names + [spec.output_name]
    with warnings.catch_warnings():
        # TracerWarnings on shape checks (Python ints under tracing) and the exporter's
        # deprecation notice are expected and harmless here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, example, str(path), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=[spec.output_name],
            dynamic_axes={n: {0: "batch"} for n in names}, do_constant_folding=True,
        )
    return out_shape


def _inline_initializer_identities(model) -> List[str]:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer under the output name.

    The TorchScript exporter deduplicates equal-valued parameters (e.g. RMSNorm scales still all
    ones in a lightly trained run) into one initializer plus ``Identity`` nodes for the others;
    ONNX Runtime's graph optimiser (level >= basic) mishandles those and refuses the model
    ("... is not a graph input, initializer, or output of a previous node"). Returns the names."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    inlined = []
    for node in list(g.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy_ = g.initializer.add()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            g.node.remove(node)
            inlined.append(node.output[0])
    return inlined


def _save_graph(scratch: Path, dest: Path, props: Dict[str, str], out_shape: Sequence[int]) -> Optional[str]:
    """Re-save the exporter's output as ``dest`` (one file, or + one ``.data`` file when the
    weights exceed protobuf's 2 GiB limit), with ``props`` as model metadata and the output
    declared as (batch, *out_shape) (shape inference may leave symbolic names for static dims).
    Identity nodes over initializers are inlined (``_inline_initializer_identities``).
    Returns the external data file name or None."""
    import onnx

    model = onnx.load(str(scratch))  # also reads the exporter's per-tensor external files
    _inline_initializer_identities(model)
    onnx.helper.set_model_props(model, props)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for d, size in zip(list(dims)[1:], out_shape):
        d.Clear()
        d.dim_value = int(size)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < _PROTO_LIMIT:
        onnx.save_model(model, str(dest))
        return None
    data = dest.name + ".data"
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return data


def import_ort():
    """``onnxruntime``, or one line saying how to install it (CPU and GPU builds are extras)."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("ONNX Runtime is not installed: pip install 'reptok[onnx]' (CPU) or 'reptok[gpu]'") from None
    return onnxruntime


def ort_session_options(threads: Optional[int] = None):
    """ORT settings: full graph optimisation (ORT_ENABLE_ALL), intra-op threads = torch's
    (``torch.get_num_threads()``, i.e. OMP_NUM_THREADS: a fair comparison), no spinning."""
    ort = import_ort()

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    # No busy-waiting between ops: on shared or oversubscribed CPUs (CI, clusters) spinning
    # threads steal the cores the work needs (measured: 2x slower decoder calls on 2 busy cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
    return so


def _verify(spec: GraphSpec, path: Path, reference: nn.Module, atol: float) -> List[dict]:
    """Run ORT (CPU provider: the reference semantics) and torch (float32) on the same random
    inputs at batch 1 and 3; raise ExportVerificationError above ``atol * max(1, max|ref|)``."""
    import numpy as np
    ort = import_ort()

    sess = ort.InferenceSession(str(path), ort_session_options(), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in sess.get_inputs()}  # unused inputs (e.g. y of an
    results = []                                         # unconditional generator) are dropped
    for b in VERIFY_BATCHES:
        inputs = spec.make_inputs(b, torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = reference(*inputs).float().numpy()
        feed = {n: a.numpy() for n, a in zip(spec.input_names, inputs) if n in graph_inputs}
        (out,) = sess.run([spec.output_name], feed)
        if out.shape != ref.shape:
            raise ExportVerificationError(
                f"{spec.file}: ONNX Runtime output shape {out.shape} != torch {ref.shape} at batch {b}")
        err = float(np.abs(out.astype(np.float64) - ref).max()) if out.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        limit = atol * max(1.0, scale)
        results.append({"batch": b, "max_abs_err": err, "ref_max_abs": scale, "limit": limit})
        if not math.isfinite(err) or err > limit:
            raise ExportVerificationError(
                f"{spec.file}: ONNX Runtime vs torch max abs error {err:.3g} at batch {b} exceeds "
                f"{limit:.3g} (atol {atol:g} x max(1, |ref| {scale:.3g}))")
    return results


# ----------------------------------------------------------------------------- the export
def _load(run_dir_or_pipeline, components: Sequence[str]):
    """(pipeline on CPU in eval mode, run dir or None, config_sha256 or None)."""
    from reptok.pipeline import Pipeline

    if isinstance(run_dir_or_pipeline, (str, Path)):
        run = Path(run_dir_or_pipeline).absolute()
        wanted = {"decoder", "generator", "vae", "encoder"} & set(components)
        pipe = Pipeline.from_run(run, "cpu", components=wanted)
        return pipe, run, run_config_sha256(run)
    pipe = run_dir_or_pipeline
    run = getattr(pipe, "run_dir", None)
    if run is not None:
        run = Path(run).absolute()
    return pipe, run, run_config_sha256(run) if run is not None else None


def export_onnx(
    run_dir_or_pipeline,
    out_dir: Union[str, Path],
    components: Union[str, Iterable[str], None] = DEFAULT_COMPONENTS,
    opset: int = 17,
    dtype: str = "fp32",
    atol: Optional[float] = None,
    overwrite: bool = False,
    verify: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Export a run directory (or an in-memory ``Pipeline``) to ONNX graphs + ``manifest.json``.

    Each graph is checked with ``onnx.checker`` and (``verify``) run with ONNX Runtime against
    torch float32 at batch 1 and 3; an error above ``atol * max(1, max|ref|)`` (default atol
    1e-3 for fp32, 3e-2 for fp16) raises ``ExportVerificationError`` naming the graph, and
    nothing is written. OUT is written atomically; a non-empty OUT needs ``overwrite``.

    The manifest holds: the source run (absolute path) and the sha256 of its config.json, the
    canonical config hash, per graph the file, input / output names, shapes ('batch' for the
    dynamic axis) and dtypes plus the verification errors, the opset and dtype, the skipped
    components and why, the generator's n_tokens / token_dim / null_class / token_mean /
    token_std (so the runtime denormalises without torch weights) and text_conditioned (for
    text runs also text_encoder / text_dim / text_len), and library versions.
    """
    if dtype not in DTYPES:
        raise InputError(f"--weights-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not 13 <= opset <= 20:
        raise InputError(f"--opset {opset}: use 13-20 (17 recommended: LayerNormalization)")
    comps = parse_components(components)
    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    log = log or (lambda msg: None)
    out_dir = Path(out_dir)
    check_new_output(out_dir, overwrite, folder=True)  # fail before loading weights

    pipe, run, cfg_hash = _load(run_dir_or_pipeline, comps)
    # Export and verification run on the CPU in float32 (the reference semantics); an in-memory
    # pipeline goes back to its device afterwards.
    home = pipe.device
    try:
        pipe = pipe.to("cpu").eval()
        return _export(pipe, run, cfg_hash, comps, out_dir, opset, dtype, atol, overwrite, verify, log)
    finally:
        pipe.to(home)


def _export(pipe, run, cfg_hash, comps, out_dir, opset, dtype, atol, overwrite, verify, log) -> dict:
    import onnx

    cfg = pipe.cfg
    specs, skipped = _graph_specs(pipe, comps)
    if not specs:
        raise InputError("nothing to export: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run) if run is not None else None,
        "preset": cfg.preset,
        "config_sha256": cfg_hash,
        "pipeline_sha256": pipeline_config_sha256(cfg),
        "opset": opset,
        "dtype": dtype,
        "atol": atol,
        "cfg_in_graph": False,
        "image_size": cfg.image_size,
        "pixel_space": cfg.vae.is_pixel,
        "decoder": {"in_channels": cfg.decoder.in_channels, "input_size": cfg.decoder.input_size,
                    "token_dim": cfg.decoder.token_dim},
        "graphs": {},
        "skipped": skipped,
        "versions": versions(),
    }
    if "generator" in {sp.component for sp in specs}:
        g = pipe.generator
        manifest["generator"] = {
            "n_tokens": cfg.generator.n_tokens, "token_dim": cfg.generator.token_dim,
            "num_classes": cfg.generator.num_classes, "null_class": g.null_class,
            "token_mean": g.token_mean.detach().float().cpu().tolist(),
            "token_std": g.token_std.detach().float().cpu().tolist(),
            "text_conditioned": cfg.generator.text_encoder is not None,
        }
        if cfg.generator.text_encoder is not None:
            # The text encoder stays in torch (``reptok.run.load_text_encoder``): prompts are
            # encoded once per sampling call, outside the graphs; CFG's null is the prompt "".
            manifest["generator"].update({
                "text_encoder": cfg.generator.text_encoder, "text_dim": int(cfg.generator.text_dim),
                "text_len": _text_len(pipe), "text_mask_dtype": "float32 (1 = valid, 0 = padding)",
            })

    with atomic_dir(out_dir, overwrite) as tmp:
        for spec in specs:
            # Verification reference: the float32 torch network (for fp16, a copy is halved).
            reference = spec.module
            if dtype != "fp32":
                spec.module = copy.deepcopy(reference).to(DTYPES[dtype])
                spec.module.compute_dtype = DTYPES[dtype]
            scratch = tmp / f".scratch-{spec.component}"
            scratch.mkdir()
            out_shape = _torch_export(spec, scratch / spec.file, opset)
            ext = _save_graph(scratch / spec.file, tmp / spec.file, {
                "reptok.graph": spec.component, "reptok.config_sha256": cfg_hash or "",
                "reptok.pipeline_sha256": manifest["pipeline_sha256"], "reptok.dtype": dtype}, out_shape)
            shutil.rmtree(scratch)
            onnx.checker.check_model(str(tmp / spec.file))  # by path: works past 2 GiB
            model = onnx.load(str(tmp / spec.file), load_external_data=False)
            entry = {
                "file": spec.file, "external_data": ext,
                "inputs": [_value_info(v) for v in model.graph.input],
                "outputs": [_value_info(v) for v in model.graph.output],
            }
            del model
            if verify:
                entry["verify"] = _verify(spec, tmp / spec.file, reference, atol)
                worst = max(r["max_abs_err"] for r in entry["verify"])
                log(f"{spec.file}: max abs error vs torch {worst:.3g} (batch {', '.join(map(str, VERIFY_BATCHES))})")
            else:
                log(f"{spec.file}: written (not verified)")
            spec.module = reference
            manifest["graphs"][spec.component] = entry
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["out"] = str(Path(out_dir).absolute())
    return manifest
