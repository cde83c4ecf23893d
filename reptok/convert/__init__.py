"""Converters from foreign checkpoints to reptok run directories.

``convert_official`` turns the authors' Lightning checkpoint (``reptok-xl-600k-ImageNet.ckpt``)
into a normal run directory; ``safe_torch_load`` reads any torch checkpoint without executing
pickled code.
"""

from .official import convert_official, read_official_checkpoint
from .safe_load import safe_torch_load, to_plain

__all__ = ["convert_official", "read_official_checkpoint", "safe_torch_load", "to_plain"]
