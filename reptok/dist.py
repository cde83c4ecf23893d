"""torch.distributed plumbing for torchrun: init from the environment, rank helpers.

``torchrun --nproc-per-node N -m reptok_cli train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them everything runs as a single process (world size 1) and nothing is initialised.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Launched by torchrun: a process group exists even for one process (``--nproc-per-node 1``
    # runs the real DDP / collective path, e.g. NCCL on one GPU).
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched


def env_info() -> DistInfo:
    """Rank / world size from torchrun's environment, without initialising anything (so inputs
    can be validated before the process group exists)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # torchrun sets both
    if world <= 1 and not launched:
        return DistInfo()
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), launched=launched)


def _destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def group_timeout() -> timedelta:
    """How long a collective waits for the slowest rank: REPTOK_DIST_TIMEOUT seconds, default 2 h.

    torch's 10-minute NCCL default is shorter than legitimate rank-0-only work that the other
    ranks wait for at a barrier: the builtin SSL pre-training of the small preset, the latent
    cache's final rename on a network filesystem, a slow rank's last chunk of ``cache-latents``.
    A real hang is still reported, two hours later instead of ten minutes."""
    return timedelta(seconds=float(os.environ.get("REPTOK_DIST_TIMEOUT", 7200)))


def shutdown(sync: bool = True) -> None:
    """Leave the process group while the interpreter is fully alive: with ``sync`` every rank first
    waits for the others (no rank tears its connections down while a peer still talks to it), then
    the group is destroyed so gloo / NCCL join their threads and release the work they hold. A group
    left to the interpreter's teardown can abort a finished run ("terminate called without an
    active exception", SIGABRT: exit 1 under torchrun). A no-op without a group."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    if sync:
        tdist.barrier()
    _destroy()


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (NCCL on GPUs, gloo on CPU).

    The group is destroyed at interpreter exit (also after an error), so NCCL does not warn about
    a leaked group and no rank waits on a half-torn-down one.
    """
    info = env_info()
    if not info.enabled:
        return info
    if not tdist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=group_timeout())
        atexit.register(_destroy)
    return info


def current() -> DistInfo:
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), launched=True)
    return DistInfo()


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def shard_range(n: int, info: DistInfo) -> range:
    """Contiguous slice of [0, n) for this rank (sampling / extraction split by index)."""
    per = (n + info.world_size - 1) // info.world_size
    return range(min(n, info.rank * per), min(n, (info.rank + 1) * per))


def gather_objects(obj, info: DistInfo):
    """All ranks' objects, in rank order, on every rank (a list of one item without torchrun)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out
