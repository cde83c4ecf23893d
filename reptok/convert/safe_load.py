"""Read a PyTorch / Lightning checkpoint without executing pickled code.

``torch.load(weights_only=False)`` runs whatever callable a pickle names; a downloaded
checkpoint must not be trusted that far. ``safe_torch_load`` runs ``torch.load`` with a
restricted unpickler (``pickle_module=``): every global the pickle refers to goes through
``RestrictedUnpickler.find_class``, which returns

- the few harmless builtins / containers / tensor-rebuild functions a Lightning checkpoint
  needs (``ALLOWED``);
- **inert stand-ins** for OmegaConf (``DictConfig``, ``ListConfig``, value nodes, metadata),
  argparse ``Namespace`` and Lightning's ``AttributeDict``: plain classes that only record the
  state the pickle hands them, so no OmegaConf (or Lightning) code runs; ``to_plain`` turns
  them into dicts / lists afterwards;

and raises ``InputError("refusing to unpickle module.name from CKPT")`` for anything else, before
the global is imported. Tensors are rebuilt by torch's own persistent-load machinery (storages
are data, not code); ``mmap=True`` keeps multi-GB checkpoints out of RAM until a tensor is read.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import os
import pickle
import typing
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Tuple

import torch

from ..errors import InputError


# ----------------------------------------------------------------------------- stand-ins
class _StandIn:
    """Base of the inert stand-ins: accepts any constructor call and records pickled state."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args)
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # BUILD
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            d = {}
            for part in state:
                if isinstance(part, dict):
                    d.update(part)
            state = d
        self.__dict__["_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_state")

    def __repr__(self) -> str:
        return f"<stand-in {self._qualname}>"


class OmegaContainer(_StandIn):
    """``omegaconf.DictConfig`` / ``ListConfig``: the content is ``state['_content']``."""


class OmegaNode(_StandIn):
    """``omegaconf`` value nodes (AnyNode, StringNode, ...): the value is ``state['_val']``."""


class OmegaMetadata(_StandIn):
    """``omegaconf.base.Metadata`` / ``ContainerMetadata``: type information only, dropped."""


class NamespaceStandIn(_StandIn):
    """``argparse.Namespace``: attributes in the pickled ``__dict__``."""


class AttributeDictStandIn(dict):
    """Lightning's ``AttributeDict`` (a dict subclass): items arrive through SETITEMS."""

    def __setstate__(self, state):
        pass


def _path_to_str(*parts) -> str:
    return str(PurePosixPath(*parts))


def _stand_in(cls: type, qualname: str) -> type:
    return type(cls.__name__, (cls,), {"_qualname": qualname})


_OMEGA_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")
_OMEGA_NODES = tuple(
    f"omegaconf.nodes.{n}"
    for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode", "ValueNode")
) + ("omegaconf.base.UnionNode",)
_OMEGA_META = ("omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata")
_ATTRIBUTE_DICTS = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)


def _allowed() -> Dict[str, Any]:
    """Fully qualified name -> the object ``find_class`` returns. Nothing here runs code that a
    pickle could steer: containers, scalars, tensor rebuilders (whose arguments are data) and
    the stand-ins above."""
    import torch._utils as tu

    allow: Dict[str, Any] = {}
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str", "bytes",
                 "bytearray", "complex", "slice", "range"):
        allow[f"builtins.{name}"] = getattr(__import__("builtins"), name)
    allow["collections.OrderedDict"] = collections.OrderedDict
    allow["collections.defaultdict"] = collections.defaultdict  # factory arguments pass through here too
    allow["collections.deque"] = collections.deque
    allow["collections.Counter"] = collections.Counter
    import _codecs

    allow["_codecs.encode"] = _codecs.encode  # protocol-2 pickles store bytes this way
    allow["typing.Any"] = typing.Any
    for name in ("timedelta", "datetime", "date", "time", "timezone"):
        allow[f"datetime.{name}"] = getattr(datetime, name)
    for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allow[f"pathlib.{cls}"] = _path_to_str
        allow[f"pathlib._local.{cls}"] = _path_to_str
    # tensors
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage",
                 "_rebuild_wrapper_subclass", "_rebuild_sparse_tensor", "_rebuild_nested_tensor"):
        if hasattr(tu, name):
            allow[f"torch._utils.{name}"] = getattr(tu, name)
    allow["torch._tensor._rebuild_from_type_v2"] = torch._tensor._rebuild_from_type_v2
    allow["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    allow["torch.Tensor"] = torch.Tensor
    allow["torch._tensor.Tensor"] = torch.Tensor
    allow["torch.Size"] = torch.Size
    allow["torch.device"] = torch.device
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allow[f"torch.{name}"] = obj
    # numpy scalars / arrays (Lightning callback and loop states may hold them)
    try:
        import numpy as np

        try:
            from numpy._core import multiarray as ma
        except ImportError:  # numpy < 2
            from numpy.core import multiarray as ma
        allow["numpy.dtype"] = np.dtype
        allow["numpy.ndarray"] = np.ndarray
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allow[f"{mod}.scalar"] = ma.scalar
            allow[f"{mod}._reconstruct"] = ma._reconstruct
        for name in dir(getattr(np, "dtypes", None) or object()):
            obj = getattr(np.dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                allow[f"numpy.dtypes.{name}"] = obj
    except Exception:  # numpy missing or reorganised: its types are then simply refused
        pass
    # inert stand-ins
    for q in _OMEGA_CONTAINERS:
        allow[q] = _stand_in(OmegaContainer, q)
    for q in _OMEGA_NODES:
        allow[q] = _stand_in(OmegaNode, q)
    for q in _OMEGA_META:
        allow[q] = _stand_in(OmegaMetadata, q)
    allow["argparse.Namespace"] = _stand_in(NamespaceStandIn, "argparse.Namespace")
    for q in _ATTRIBUTE_DICTS:
        allow[q] = AttributeDictStandIn
    return allow


_ALLOWED: Dict[str, Any] = {}


def allowed_globals() -> Dict[str, Any]:
    if not _ALLOWED:
        _ALLOWED.update(_allowed())
    return _ALLOWED


class UnsafeGlobal(InputError):
    """A pickle names a global outside the allow-list."""


def make_pickle_module(source: str):
    """A stand-in ``pickle`` module for ``torch.load(pickle_module=...)`` whose Unpickler only
    resolves allow-listed globals (error messages name ``source``)."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # protocol-2 pickles (torch.save's default) use Python 2 names (__builtin__,
            # copy_reg); the default find_class maps them, an override must too. Python 2
            # names never denote anything else in Python 3, so map unconditionally.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            qual = f"{module}.{name}"
            table = allowed_globals()
            if qual in table:
                return table[qual]
            raise UnsafeGlobal(f"refusing to unpickle {qual} from {source} (not an allow-listed type; "
                               "reptok never executes code stored in a checkpoint)")

    class _Module:
        Unpickler = RestrictedUnpickler
        UnpicklingError = pickle.UnpicklingError
        __name__ = "reptok_restricted_pickle"

        @staticmethod
        def load(f, **kw):
            return RestrictedUnpickler(f, **kw).load()

        @staticmethod
        def loads(data, **kw):
            import io

            return RestrictedUnpickler(io.BytesIO(data), **kw).load()

    return _Module


def safe_torch_load(path, mmap: bool = True) -> Any:
    """``torch.load`` of ``path`` onto the CPU through the restricted unpickler.

    Raises InputError (one line) for a missing file, a file that is not a torch checkpoint, or a
    pickle naming a global outside the allow-list.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass the Lightning .ckpt file")
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise InputError("TORCH_FORCE_WEIGHTS_ONLY_LOAD is set: torch then refuses reptok's restricted unpickler "
                         "(which is at least as strict); unset it for this command")
    module = make_pickle_module(str(path))
    use_mmap = mmap and zipfile.is_zipfile(path)  # mmap needs the zip (torch >= 1.6) format
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=module, mmap=use_mmap)
    except UnsafeGlobal:
        raise
    except InputError:
        raise
    except Exception as e:  # torch / pickle raise many types for garbage input
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg[:200]})") from None


# ----------------------------------------------------------------------------- to plain data
def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Stand-ins -> plain Python: OmegaConf containers -> dict / list (values unwrapped; string
    interpolations like ``${.width}`` stay strings), Namespace / AttributeDict -> dict, tuples ->
    lists. Tensors and other values are returned unchanged."""
    if _depth > 200:
        raise InputError("hyper-parameters nested too deeply (cyclic?)")
    nxt = _depth + 1
    if isinstance(obj, OmegaContainer):
        st = obj.state if isinstance(obj.state, dict) else {}
        return to_plain(st.get("_content"), nxt)
    if isinstance(obj, OmegaNode):
        st = obj.state if isinstance(obj.state, dict) else {}
        return to_plain(st.get("_val"), nxt)
    if isinstance(obj, OmegaMetadata):
        return None
    if isinstance(obj, NamespaceStandIn):
        st = obj.state if isinstance(obj.state, dict) else {}
        return {k: to_plain(v, nxt) for k, v in st.items()}
    if isinstance(obj, dict):  # dict, OrderedDict, defaultdict, AttributeDictStandIn
        return {(to_plain(k, nxt) if not isinstance(k, str) else k): to_plain(v, nxt) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, nxt) for v in obj]
    if obj is typing.Any:
        return "Any"
    return obj


def jsonable(obj: Any) -> Any:
    """``to_plain`` output -> JSON-safe values (tensors summarised, unknown objects as repr)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        return f"<tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    return repr(obj)


__all__: Tuple[str, ...] = ("safe_torch_load", "to_plain", "jsonable", "allowed_globals", "make_pickle_module", "UnsafeGlobal")
