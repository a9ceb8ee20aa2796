"""Read other projects' checkpoints (Lightning ``.ckpt`` files of STEGO and PriMaPs) without
running any code from them and without their packages installed.

``torch.load(weights_only=True)`` refuses these files: besides tensors they hold the run's
settings as objects of other packages (OmegaConf's ``DictConfig``, ``argparse.Namespace``,
Lightning's ``AttributeDict``). :func:`read_foreign_checkpoint` unpickles them with an
allow-list: tensors and plain containers are rebuilt as ``weights_only`` rebuilds them (torch's
own list), objects of known data-only packages become inert :class:`Foreign` records of their
state (no constructor, no ``__setstate__`` of theirs runs), and any other global (``os.system``,
``builtins.eval``, a class of an unknown package) stops the load before it is called.
:func:`plain` turns the records into dicts and lists.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from stegoseg.errors import StegosegError

#: Packages whose objects are plain data in the checkpoints we read: they become records.
DATA_PACKAGES = ("omegaconf", "argparse", "pytorch_lightning", "lightning", "lightning_fabric", "typing", "pathlib",
                 "enum", "numpy", "collections", "copyreg", "datetime", "functools")
#: Builtins that only build values.
SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "bytearray",
                 "complex", "slice", "range", "object", "NoneType"}


class ForeignCodeError(Exception):
    """The pickle names a callable that is not data (nothing was called)."""


class Foreign:
    """An inert record of an object of another package: its qualified name, constructor
    arguments, state, items and list entries, as the pickle gave them."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, state=None, items={}, entries=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, value):
        self.__dict__["entries"].append(value)

    def extend(self, values):
        self.__dict__["entries"].extend(values)

    def __repr__(self) -> str:
        return f"Foreign({self._qualname})"


def _record_class(module: str, name: str) -> type:
    return type(name, (Foreign,), {"_qualname": f"{module}.{name}"})


def _allowed_torch_globals() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    return dict(_get_allowed_globals())


class _Unpickler(pickle.Unpickler):
    _allowed: dict = {}

    def find_class(self, module: str, name: str):
        # protocol-2 pickles (torch.save's) name Python 2 modules: map them as pickle itself does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in self._allowed:
            return self._allowed[qualified]
        if module == "builtins" and name in SAFE_BUILTINS:
            return type(None) if name == "NoneType" else getattr(builtins, name)
        if module.split(".")[0] in DATA_PACKAGES:
            return _record_class(module, name)
        raise ForeignCodeError(qualified)


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("stegoseg_restricted_pickle")
    _Unpickler._allowed = _allowed_torch_globals()
    module.Unpickler = _Unpickler
    module.load = lambda f, **kw: _Unpickler(f, **kw).load()
    module.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return module


def read_foreign_checkpoint(path: Path, what: str) -> dict:
    """The top-level dict of a torch-saved checkpoint, read as the module docstring says.

    Raises :class:`StegosegError` (one line) for a missing, truncated or non-PyTorch file and for
    a pickle that names code (the callable is named; it was not run). ``what``: how the error
    names the expected file (e.g. "STEGO's .ckpt")."""
    path = Path(path)
    if not path.is_file():
        raise StegosegError(f"{path} does not exist: pass {what}")
    from stegoseg.preflight import file_head, refuse_web_page

    refuse_web_page(path, file_head(path), "a checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module())
    except ForeignCodeError as exc:
        raise StegosegError(f"{path} refers to code ({exc}) that a checkpoint has no need of; stegoseg does not load "
                            "it and nothing in it was run: pass the released file itself") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to unpickle is a damaged or foreign file
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise StegosegError(f"cannot read {path} ({reason}): the file is truncated or not a PyTorch checkpoint "
                            f"(an interrupted download?); pass {what}") from None
    if not isinstance(obj, dict):
        raise StegosegError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict: pass {what}")
    return obj


def plain(value: Any) -> Any:
    """Records of OmegaConf containers and nodes, Namespaces and dict-like objects as plain
    dicts, lists and values (recursively)."""
    if isinstance(value, Foreign):
        state = value.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) state
        if isinstance(state, dict) and "_content" in state:  # OmegaConf DictConfig / ListConfig
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # OmegaConf value node
            return plain(state["_val"])
        if value.items:
            return {k: plain(v) for k, v in value.items.items()}
        if value.entries:
            return [plain(v) for v in value.entries]
        if isinstance(state, dict):
            return {k: plain(v) for k, v in state.items() if not str(k).startswith("_")}
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
