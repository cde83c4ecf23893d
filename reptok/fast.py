"""The torch fast paths: the same torch modules, called faster.

CUDA graphs (``CudaGraphed``: one captured graph per input signature) and regional
``torch.compile`` (``regional_compile``: each repeated block compiled once, the compiled code
reused by the identical blocks). ``fast_variant`` hands a Pipeline whose networks are wrapped this
way back to the one sampling loop; ``reptok.backends.apply_fast_path`` decides which path a
command gets. ``reptok sample`` and ``reptok bench`` share this one implementation.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


class CudaGraphed:
    """Calls ``fn`` through a CUDA graph captured once per input signature (shapes, dtypes).

    Inputs are copied into static buffers, the graph is replayed, the static output cloned.
    Removes per-kernel launch overhead (large for small batches); needs fixed shapes, which the
    sampling loop has (one graph per batch size, plus the CFG-doubled generator batch; the
    sampler pads a last partial batch to the full size, see ``reptok.sample``).
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: Dict[tuple, tuple] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        amp = _autocast_state()
        key = tuple((tuple(a.shape), a.dtype) for a in args) + (amp,)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with _uncached_autocast(amp):
                with torch.cuda.stream(side):  # warm-up on a side stream (cuBLAS handles, workspaces)
                    for _ in range(2):
                        self.fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the sampler's noise-prefetch thread pins memory and queries events
                # meanwhile; under the default "global" mode those calls would abort the capture.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = self.fn(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out.clone()


def _autocast_state() -> Optional[torch.dtype]:
    """The CUDA autocast dtype in force, or None."""
    try:
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):  # torch < 2.4
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else None


def _uncached_autocast(dtype: Optional[torch.dtype]):
    """Autocast without its weight-cast cache, for graph capture: the cache's bf16 copies of the
    weights would be captured by address and freed when the caller's autocast block exits, and
    every later replay would read freed memory (an illegal memory access; PyTorch's CUDA graphs
    notes say to capture with ``cache_enabled=False``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def _block_signature(m: nn.Module) -> tuple:
    return (type(m),) + tuple((n, tuple(p.shape)) for n, p in m.named_parameters())


def _compile_container(child: nn.Module, compile_kw: dict) -> Tuple[Optional[nn.Module], int]:
    """A copy of a ModuleList / Sequential with each repeated block compiled, or (None, 0)."""
    if not isinstance(child, (nn.ModuleList, nn.Sequential)):
        return None, 0
    counts: Dict[tuple, int] = {}
    for m in child:
        counts[_block_signature(m)] = counts.get(_block_signature(m), 0) + 1
    repeated = [counts[_block_signature(m)] > 1 for m in child]
    if not any(repeated):
        return None, 0
    items = [torch.compile(m, **compile_kw) if rep else m for m, rep in zip(child, repeated)]
    return (type(child)(*items) if isinstance(child, nn.Sequential) else nn.ModuleList(items)), sum(repeated)


def _shallow(module: nn.Module) -> nn.Module:
    copy_ = copy.copy(module)
    copy_._modules = dict(module._modules)  # the copy's own child registry
    return copy_


def regional_compile(module: nn.Module, **compile_kw) -> Tuple[nn.Module, int]:
    """A shallow copy of ``module`` whose repeated blocks are ``torch.compile``d one by one.

    The containers scanned are the module's ``block_lists`` (dotted paths, e.g. the text
    generator's ``condition.cross``) or else its direct ``nn.ModuleList`` / ``nn.Sequential``
    children (the decoder's 28 transformer blocks, the generator's mixer blocks). Blocks of the
    same type and parameter shapes each get their own compiled wrapper, and dynamo compiles the
    block's code once and reuses it for the identical blocks (parameters are graph inputs), so
    compile time is one block's instead of the whole network's. The wrappers share the original
    parameters; the original module is left untouched (every module on the way to a compiled
    container is shallow-copied). Returns (copy, number of compiled blocks)."""
    regions = getattr(module, "block_lists", None) or tuple(name for name, _ in module.named_children())
    root, compiled = _shallow(module), 0
    for path in regions:
        names = path.split(".")
        chain = [module]
        for n in names:
            nxt = chain[-1]._modules.get(n) if isinstance(chain[-1], nn.Module) else None
            if nxt is None:
                break
            chain.append(nxt)
        if len(chain) != len(names) + 1:  # a region this instance does not have (a class generator's cross)
            continue
        new, k = _compile_container(chain[-1], compile_kw)
        if new is None:
            continue
        parent = root
        for depth, n in enumerate(names[:-1]):  # copy the modules on the way, so the original stays intact
            child = parent._modules[n]
            if child is chain[depth + 1]:
                child = parent._modules[n] = _shallow(child)
            parent = child
        parent._modules[names[-1]] = new
        compiled += k
    return root, compiled


class _Proxy:
    """Delegates attributes to ``base`` except the overridden ones (keeps .null_class etc.)."""

    def __init__(self, base, **overrides):
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._base, name)


class _CallProxy(_Proxy):
    def __call__(self, *args):
        return self._call(*args)


def fast_variant(pipe, cuda_graphs: bool = False, compile: bool = False, compile_kw: Optional[dict] = None,
                 latent: bool = True):
    """A shallow copy of ``pipe`` (same weights, same sampling loop) whose decoder, generator and
    (``latent``) VAE decode run regionally compiled (``compile``) and / or through CUDA graphs.
    The copy's device is pinned (its networks become proxies without parameters). The
    original pipeline is left as it was. ``variant.fast_blocks`` counts the compiled blocks."""
    nets, blocks = {}, 0

    def wrap(net):
        nonlocal blocks
        call = net
        if compile:
            call, n = regional_compile(net, **(compile_kw or {}))
            blocks += n
            if n == 0:  # no repeated blocks (e.g. a VAE): compile the whole call
                call = torch.compile(net, **(compile_kw or {}))
        return CudaGraphed(call) if cuda_graphs else call

    for name in ("decoder", "generator"):
        net = getattr(pipe, name, None)
        if isinstance(net, nn.Module):
            nets[name] = _CallProxy(net, _call=wrap(net))
    lat = pipe.latent
    if latent and cuda_graphs and isinstance(lat, nn.Module) and not getattr(lat, "is_pixel", False):
        nets["latent"] = _Proxy(lat, decode=CudaGraphed(lat.decode))
    return pipe.with_networks(fast_blocks=blocks, **nets)
