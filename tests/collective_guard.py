"""``python tests/collective_guard.py ARGS`` = ``python -m reptok_cli ARGS`` with every tensor
collective of ``torch.distributed`` checking that its tensors live on the training device
(``REPTOK_COLLECTIVE_DEVICE``): NCCL serves CUDA tensors only, so a CPU tensor in a collective
stops every multi-GPU run at its first step. Launched by torchrun in tests/test_distributed.py."""

import os
import runpy
import sys

import torch
import torch.distributed as tdist

WANT = torch.device(os.environ["REPTOK_COLLECTIVE_DEVICE"])
CALLS = os.environ.get("REPTOK_COLLECTIVE_LOG")


def _guard(name):
    real = getattr(tdist, name)

    def checked(tensor, *args, **kwargs):
        for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
            if t.device.type != WANT.type:
                raise RuntimeError(f"collective {name} got a tensor on {t.device}; the training device is {WANT}")
        if CALLS:
            with open(f"{CALLS}.{os.environ.get('RANK', '0')}", "a") as f:
                f.write(f"{name} {tensor.device if torch.is_tensor(tensor) else 'list'}\n")
        return real(tensor, *args, **kwargs)

    setattr(tdist, name, checked)


for _name in ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter",
              "reduce_scatter_tensor", "all_to_all_single"):
    if hasattr(tdist, _name):
        _guard(_name)

sys.argv = ["reptok", *sys.argv[1:]]
runpy.run_module("reptok_cli", run_name="__main__")
