"""Safe loading of PyTorch Lightning checkpoints (METER releases) without running code from the file.

``load_lightning_checkpoint(path)`` returns ``{"state_dict", "config", "hyper_parameters", "meta", "path"}``.

How it stays safe
-----------------
1. ``torch.load(path, map_location="cpu", weights_only=True)``: torch's own restricted unpickler
   (``torch/_weights_only_unpickler.py``). It never imports anything: a GLOBAL is looked up in a fixed
   table (tensor/storage types, dtypes, the ``torch._utils._rebuild_*`` functions, OrderedDict, ...)
   plus the user allow-list (``torch.serialization.safe_globals``), and modules ``os/sys/posix/nt`` are
   blocked outright.
2. If that fails because the pickle names other globals (a sacred ``ReadOnlyDict``, Lightning's
   ``AttributeDict``, ``argparse.Namespace``, ``pathlib`` paths, numpy scalars inside
   ``hyper_parameters``), the pickle opcodes of ``data.pkl`` are scanned statically
   (``pickletools.genops``; nothing is executed) to list every global it names. Each one is classified
   by :func:`classify_global`:

   * torch's weights-only table: used as torch would;
   * ``builtins`` plain value types (dict, list, tuple, set, frozenset, int, float, complex, str, bytes,
     bytearray, bool): the real type (calling them runs no code from the file);
   * a *class* (every dotted component CamelCase, no dunders) from an allow-listed module family, or
     one of a few exact lower-case data types (``numpy.dtype``, numpy's scalar/array reconstructors,
     ``collections.defaultdict``, ``datetime.timedelta``, ...): an inert :class:`PickledObject`
     placeholder that only records module/name, constructor args and state;
   * anything else (``os.system``, ``posix.system``, ``subprocess.*``, ``builtins.exec/eval/getattr/
     __import__``, ``functools.partial``, ``operator.attrgetter``, lower-case functions even from an
     allowed family, ...): refused with a :class:`SmartTrimError` naming the file and the globals,
     before anything is loaded.

   Then the file is loaded by torch's weights-only ``Unpickler`` again (a subclass that only also lets
   SETITEM(S) fill a dict-like placeholder), with the placeholders registered through
   ``torch.serialization.safe_globals``. That unpickler is handed to ``torch.load`` as
   ``pickle_module`` -- which torch only accepts together with ``weights_only=False`` -- but it is still
   torch's weights-only opcode interpreter: it never calls ``find_class``/imports, resolves GLOBALs
   only through the two tables above, and only calls (REDUCE/NEWOBJ) callables from them. TorchScript
   and legacy ``.tar`` archives (for which ``torch.load`` would take other code paths) are refused
   before that.
3. Placeholders are finally converted to plain values for ``config``/``hyper_parameters``: dict-like
   ones to ``dict``, ``ReadOnlyList``-like ones to ``list``, ``Namespace``-like objects to the dict of
   their state, paths to ``str``, numpy scalars/arrays decoded with ``struct`` (numpy is never called).

Every failure is a one-line :class:`SmartTrimError` that names the file.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pathlib
import pickle
import pickletools
import re
import struct
import tarfile
import threading
import types
import warnings
import zipfile
from typing import Any

import torch
import torch._weights_only_unpickler as _wou
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from .errors import SmartTrimError

__all__ = [
    "load_lightning_checkpoint",
    "classify_global",
    "PickledObject",
    "PLACEHOLDER_MODULE_FAMILIES",
    "PLACEHOLDER_EXACT_NAMES",
    "SAFE_BUILTIN_TYPES",
]

# --------------------------------------------------------------------------------------------------
# Allow-list
# --------------------------------------------------------------------------------------------------

#: Module families whose *classes* may be replaced by inert placeholders (``m == fam`` or
#: ``m.startswith(fam + ".")``). Only names whose every dotted component is CamelCase qualify, so
#: functions and methods (``sacred.foo.run``, ``Klass.method``) are refused even from these modules.
PLACEHOLDER_MODULE_FAMILIES: tuple[str, ...] = (
    "sacred",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "pytorch_lightning",
    "argparse",
    "pathlib",
    "collections",
    "omegaconf",
    "munch",
    "torch.optim",
    "numpy",
)

#: Lower-case data types / reconstructors seen in real checkpoints that also get placeholders.
PLACEHOLDER_EXACT_NAMES: frozenset[str] = frozenset(
    {
        "collections.defaultdict",
        "collections.deque",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "typing.Any",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
    }
    | {
        f"numpy.{t}"
        for t in (
            "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_", "bytes_",
        )
    }
)

#: ``builtins`` globals that are mapped to the real (harmless) type.
SAFE_BUILTIN_TYPES: dict[str, type] = {
    f"builtins.{t.__name__}": t
    for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool)
}

# Never allowed, whatever the lists above say (defence in depth; documents the intent).
_DENY_MODULE_ROOTS = frozenset(
    {
        "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "pickle", "_pickle", "copyreg",
        "marshal", "runpy", "code", "codeop", "types", "functools", "operator", "ctypes", "socket",
        "io", "_io", "tempfile", "pty", "signal", "multiprocessing", "threading", "_thread", "asyncio",
        "inspect", "webbrowser", "pdb", "bdb", "gc", "weakref", "site", "sysconfig", "platform", "glob",
        "posixpath", "ntpath", "zipimport", "pkgutil", "urllib", "http", "ftplib",
        "smtplib", "telnetlib", "requests", "dill", "cloudpickle", "joblib", "yaml",
    }
)
_CLASS_COMPONENT = re.compile(r"^_?[A-Z][A-Za-z0-9_]*$")


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Apply the same Python-2 name fix-ups as torch's ``_read_global_instruction``."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return module, name


def _py2_alias(module: str, name: str) -> tuple[str, str]:
    """What the stdlib unpickler (``fix_imports``) would make of a Python-2 style name torch keeps,
    e.g. ``commands.call`` -> ``subprocess.call`` (pickle protocol 2 writes the former)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _in_family(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in PLACEHOLDER_MODULE_FAMILIES)


def classify_global(module: str, name: str) -> str:
    """``"torch"`` (torch's weights-only table), ``"builtin"``, ``"placeholder"`` or ``"forbidden"``.

    A name is also judged under its Python-2 alias (``commands`` is ``subprocess``): forbidden if
    either spelling is."""
    module, name = _canonical(module, name)
    alias = _py2_alias(module, name)
    if alias != (module, name) and _classify(*alias) == "forbidden":
        return "forbidden"
    return _classify(module, name)


def _classify(module: str, name: str) -> str:
    full = f"{module}.{name}"
    if full in _wou._get_allowed_globals():
        return "torch"
    root = module.split(".")[0]
    if full in SAFE_BUILTIN_TYPES:
        return "builtin"
    if root in _DENY_MODULE_ROOTS or module in _DENY_MODULE_ROOTS or root in ("builtins", "__builtin__"):
        return "forbidden"
    parts = name.split(".")
    if any(p.startswith("__") or not p for p in parts):
        return "forbidden"
    if full in PLACEHOLDER_EXACT_NAMES:
        return "placeholder"
    if _in_family(module) and all(_CLASS_COMPONENT.match(p) for p in parts):
        return "placeholder"
    return "forbidden"


# --------------------------------------------------------------------------------------------------
# Inert placeholders
# --------------------------------------------------------------------------------------------------


class PickledObject(dict):
    """Inert stand-in for a class named in a checkpoint that is not imported.

    Records ``pickled_module``/``pickled_name`` (class attributes of the per-global subclass), the
    constructor ``args`` (REDUCE/NEWOBJ), the pickled ``state`` (BUILD) and behaves as a ``dict`` of
    the items it was given (SETITEMS, or a single dict constructor argument as sacred's
    ``ReadOnlyDict.__reduce__`` produces). It has no ``__call__`` and never runs anything.
    """

    pickled_module: str = "?"
    pickled_name: str = "?"
    __hash__ = object.__hash__  # usable as a key/set member like the original objects

    def __new__(cls, *args, **kwargs):
        self = dict.__new__(cls)
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.state = None
        if len(args) == 1 and not kwargs and isinstance(args[0], dict):
            dict.update(self, args[0])
        return self

    def __init__(self, *args, **kwargs):  # contents were taken in __new__; nothing to run
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def qualified_name(self) -> str:
        return f"{self.pickled_module}.{self.pickled_name}"

    def __repr__(self) -> str:
        return (f"<unloaded {self.qualified_name} args={self.args!r} state={self.state!r} "
                f"items={dict(self)!r}>")

    def __reduce__(self):  # make copies/pickles of the loaded result not refer to dynamic classes
        return (dict, (dict(self),))


def _placeholder_class(module: str, name: str) -> type:
    return type(
        name.rsplit(".", 1)[-1],
        (PickledObject,),
        {"pickled_module": module, "pickled_name": name, "__module__": __name__,
         "__qualname__": f"PickledObject[{module}.{name}]"},
    )


class _PlaceholderUnpickler(_wou.Unpickler):
    """torch's weights-only opcode interpreter, unchanged except that SETITEM(S) may also target a
    dict-like :class:`PickledObject` (Lightning's ``AttributeDict`` pickles its items that way)."""

    def _check_set_item_target(self, opcode: str):
        if isinstance(self.stack[-1], PickledObject):
            return
        super()._check_set_item_target(opcode)


def _shim_load(file, *, encoding: str = "ASCII", **_ignored):
    return _PlaceholderUnpickler(file, encoding=encoding).load()


# ``torch.load(pickle_module=...)`` wants a module-like object with ``Unpickler`` and ``load``.
_RESTRICTED_PICKLE = types.ModuleType("smarttrim_cli._restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _PlaceholderUnpickler
_RESTRICTED_PICKLE.load = _shim_load
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError
# torch's weights-only Unpickler resolves GLOBALs from tables, never via find_class/import; keep it so.
assert not hasattr(_wou.Unpickler, "find_class")

_FALLBACK_LOCK = threading.Lock()  # safe_globals is process-global in torch

# --------------------------------------------------------------------------------------------------
# Static pickle scan (nothing executed)
# --------------------------------------------------------------------------------------------------

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_SILENT_OPS = {"PROTO", "FRAME", "MARK", "STOP"}


def _scan_one_pickle(f, found: list[tuple[str, str]]) -> None:
    """Append the globals named by the pickle at ``f``'s position to ``found``: GLOBAL/INST
    arguments, and STACK_GLOBAL resolved from the strings pushed just before it (best effort, for
    the error message). Raises (after appending what it saw) if the data is not a valid pickle."""
    recent: list[Any] = []
    memo: dict[Any, Any] = {}
    for op, arg, _pos in pickletools.genops(f):
        n = op.name
        if n in ("GLOBAL", "INST"):
            mod, _, name = str(arg).partition(" ")
            found.append(_canonical(mod, name))
            recent.append(None)
        elif n == "STACK_GLOBAL":
            mod, name = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            if isinstance(mod, str) and isinstance(name, str):
                found.append(_canonical(mod, name))
            else:
                found.append(("<unknown>", "<STACK_GLOBAL>"))
            recent.append(None)
        elif n in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else (arg.decode("latin-1") if isinstance(arg, bytes) else None))
        elif n in _GET_OPS:
            recent.append(memo.get(arg))
        elif n in _PUT_OPS:
            memo[arg] = recent[-1] if recent else None
        elif n == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif n in ("EXT1", "EXT2", "EXT4"):
            found.append(("<copyreg extension>", str(arg)))
            recent.append(None)
        elif n not in _SILENT_OPS:
            recent.append(None)
        if len(recent) > 8:
            del recent[:-8]


def _scan_globals(src, max_pickles: int = 1) -> list[tuple[str, str]]:
    """Globals named by up to ``max_pickles`` consecutive pickles in ``src`` (bytes or a binary file;
    legacy torch files hold five pickles, then raw tensor bytes), including those seen before a
    corrupt spot. Raises ValueError if nothing could be read."""
    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    found: list[tuple[str, str]] = []
    for i in range(max_pickles):
        start = f.tell()
        try:
            _scan_one_pickle(f, found)
        except Exception:
            if i == 0 and not found and f.tell() - start <= 1:
                raise ValueError("not a pickle")
            break
        pos = f.tell()
        if not f.read(1):
            break
        f.seek(pos)
    return list(dict.fromkeys(found))  # de-duplicated, first-seen order


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fail(path: str, problem: str) -> SmartTrimError:
    return SmartTrimError(_one_line(f"{path}: {problem}", 1000))


def _first_line(exc: BaseException) -> str:
    """The gist of an exception, one line. torch wraps weights-only failures in advice to retry with
    ``weights_only=False``; that advice is dropped (it must not be followed for untrusted files)."""
    msg = str(exc)
    if "WeightsUnpickler error:" in msg:
        msg = msg.rsplit("WeightsUnpickler error:", 1)[1]
    elif msg.startswith("Weights only load failed.") and "\n\n" in msg:
        msg = msg.split("\n\n")[1]
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return _one_line(f"{type(exc).__name__}: {line}", 240)


def _sniff(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 10**9:
        return "a safetensors file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unrecognised binary file"


def _forbidden_error(path: str, names: list[str]) -> SmartTrimError:
    fams = ", ".join(PLACEHOLDER_MODULE_FAMILIES)
    return _fail(
        path,
        f"refusing to load: the checkpoint references forbidden global(s) {', '.join(names)} "
        f"(only tensors, plain containers/values and inert data classes from {fams} are accepted; "
        f"nothing from the file was executed)",
    )


def _check_globals(path: str, found: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Classify every global; raise on forbidden ones; return (module, name, kind) for the rest."""
    bad, ok = [], []
    for mod, name in found:
        kind = classify_global(mod, name) if not mod.startswith("<") else "forbidden"
        (bad if kind == "forbidden" else ok).append((mod, name, kind))
    if bad:
        shown = []
        for m, n, _ in bad:
            alias = _py2_alias(m, n)
            shown.append(f"{m}.{n}" + (f" (= {alias[0]}.{alias[1]})" if alias != (m, n) else ""))
        if len(shown) > 8:
            shown = shown[:8] + [f"and {len(shown) - 8} more"]
        raise _forbidden_error(path, shown)
    return ok


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _zip_layout(path: str) -> bytes:
    """Validate a torch zip archive; return its ``data.pkl`` bytes."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not names:
                raise _fail(path, "empty zip archive, not a PyTorch checkpoint")
            prefix = names[0].split("/", 1)[0]
            if f"{prefix}/constants.pkl" in names or any(n.endswith("/constants.pkl") for n in names):
                raise _fail(path, "is a TorchScript archive (torch.jit.save), not a training checkpoint; "
                                  "refusing to load it")
            pkl = f"{prefix}/data.pkl"
            if pkl not in names:
                raise _fail(path, "is a zip archive but not a torch.save checkpoint (no data.pkl)")
            return zf.read(pkl)
    except SmartTrimError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
            NotImplementedError, RuntimeError, struct.error) as e:
        raise _fail(path, f"truncated or corrupt checkpoint (zip archive unreadable: {_first_line(e)})")


def _is_tar(path: str) -> bool:
    try:
        with tarfile.open(path, "r:"):
            return True
    except Exception:
        return False


def _restricted_load(path: str, ok: list[tuple[str, str, str]], is_zip: bool, mmap: bool):
    entries: list[Any] = []
    placeholders: list[str] = []
    for mod, name, kind in ok:
        full = f"{mod}.{name}"
        if kind == "builtin":
            entries.append((SAFE_BUILTIN_TYPES[full], full))
        elif kind == "placeholder":
            entries.append((_placeholder_class(mod, name), full))
            placeholders.append(full)
    if not is_zip and _is_tar(path):  # torch.load would take its legacy tar path: refuse
        raise _fail(path, "legacy .tar torch.save format is not supported; re-save it with torch>=1.6")
    with _FALLBACK_LOCK, torch.serialization.safe_globals(entries), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE,
                         mmap=bool(mmap and is_zip))
    return obj, sorted(placeholders)


def _load_object(path: str, mmap: bool):
    """Returns (object, loader name, placeholder names)."""
    if not os.path.lexists(path):
        raise _fail(path, "checkpoint not found")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, expected a checkpoint file (.ckpt/.pt/.pth)")
    if not os.path.isfile(path):
        raise _fail(path, "not a regular file (broken link or special file)")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or _first_line(e)}")
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not a PyTorch checkpoint")

    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip:
        data_pkl = _zip_layout(path)
    elif head.startswith(b"PK\x05\x06"):
        raise _fail(path, "empty zip archive, not a PyTorch checkpoint")
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        data_pkl = None  # legacy (pre-1.6) torch.save stream, or a bare pickle
    else:
        # Not a torch file. If it is nonetheless a pickle naming dangerous globals, say so.
        try:
            with open(path, "rb") as fh:
                found = _scan_globals(fh)
        except (ValueError, OSError):
            found = []
        _check_globals(path, found)
        raise _fail(path, f"not a PyTorch checkpoint (looks like {_sniff(head)})")

    # 1. torch's own weights-only loader.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=bool(mmap and is_zip))
        return obj, "weights_only", []
    except pickle.UnpicklingError as e:
        first_error = e
    except SmartTrimError:
        raise
    except Exception as e:  # zip reader errors, EOF, bad magic number, ...
        if data_pkl is not None:  # still name any dangerous global the pickle holds
            try:
                found = _scan_globals(data_pkl)
            except ValueError:
                found = []
            _check_globals(path, found)
        raise _fail(path, f"truncated, corrupt or not a PyTorch checkpoint ({_first_line(e)})")

    # 2. Which globals does it name? (static scan of the opcodes; nothing runs)
    try:
        if data_pkl is None:
            with open(path, "rb") as fh:
                found = _scan_globals(fh, max_pickles=5)
        else:
            found = _scan_globals(data_pkl)
    except (ValueError, OSError) as e:
        raise _fail(path, f"corrupt pickle data in checkpoint ({_first_line(e)})")
    ok = _check_globals(path, found)
    if not any(kind in ("placeholder", "builtin") for _, _, kind in ok):
        raise _fail(path, "has corrupt pickle data or pickle constructs the safe loader does not support "
                          f"({_first_line(first_error)})")

    # 3. Load again with inert placeholders for the allow-listed classes.
    try:
        obj, placeholders = _restricted_load(path, ok, is_zip, mmap)
    except SmartTrimError:
        raise
    except Exception as e:
        raise _fail(path, f"could not be loaded safely ({_first_line(e)})")
    return obj, "restricted", placeholders


# --------------------------------------------------------------------------------------------------
# Plain values for config / hyper_parameters
# --------------------------------------------------------------------------------------------------

_NP_STRUCT = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q",
              "u8": "Q", "f2": "e", "f4": "f", "f8": "d", "c8": "f", "c16": "d"}
_NP_SCALAR_NAMES = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_NP_RECONSTRUCT_NAMES = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}


def _np_format(dtype_obj) -> tuple[str, str, bool] | None:
    """(byte-order char, struct code, is_complex) for a placeholder ``numpy.dtype('f8', ...)``."""
    if not (isinstance(dtype_obj, PickledObject) and dtype_obj.qualified_name == "numpy.dtype"):
        return None
    if not dtype_obj.args or not isinstance(dtype_obj.args[0], str):
        return None
    code = dtype_obj.args[0]
    if code not in _NP_STRUCT:
        return None
    order = "<"
    st = dtype_obj.state
    if isinstance(st, tuple) and len(st) > 1 and st[1] in ("<", ">", "=", "|"):
        order = {"|": "<", "=": "="}.get(st[1], st[1])
    return order, _NP_STRUCT[code], code.startswith("c")


def _np_decode(fmt: tuple[str, str, bool], raw: bytes, count: int) -> list | None:
    order, code, cplx = fmt
    n = count * 2 if cplx else count
    try:
        vals = list(struct.unpack(f"{order}{n}{code}", raw))
    except struct.error:
        return None
    if cplx:
        vals = [complex(vals[i], vals[i + 1]) for i in range(0, n, 2)]
    return vals


def _reshape(flat: list, shape: tuple[int, ...], fortran: bool):
    if not shape:
        return flat[0]
    if fortran:
        return _transpose_all(_reshape(flat, tuple(reversed(shape)), False), len(shape))
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:], False) for i in range(shape[0])]


def _transpose_all(x, ndim: int):
    """Reverse all axes of a rectangular nested list of depth ``ndim``."""
    shape, probe = [], x
    for _ in range(ndim):
        shape.append(len(probe))
        probe = probe[0] if probe else []

    def get(idx):
        v = x
        for i in idx:
            v = v[i]
        return v

    out_shape = list(reversed(shape))

    def build(prefix):
        if len(prefix) == ndim:
            return get(tuple(reversed(prefix)))
        return [build(prefix + [i]) for i in range(out_shape[len(prefix)])]

    return build([])


def _plain_placeholder(p: PickledObject, depth: int):
    full = p.qualified_name
    if full.startswith("pathlib.") and p.args and all(isinstance(a, str) for a in p.args):
        cls = pathlib.PureWindowsPath if "Windows" in p.pickled_name else pathlib.PurePosixPath
        return str(cls(*p.args))
    if full == "numpy.dtype":
        fmt = p.args[0] if p.args else None
        return fmt if isinstance(fmt, str) else _describe(p, depth)
    if full in _NP_SCALAR_NAMES and len(p.args) == 2 and isinstance(p.args[1], (bytes, bytearray)):
        fmt = _np_format(p.args[0])
        if fmt:
            vals = _np_decode(fmt, bytes(p.args[1]), 1)
            if vals:
                return vals[0]
        return _describe(p, depth)
    if full in _NP_RECONSTRUCT_NAMES and isinstance(p.state, tuple) and len(p.state) == 5:
        _ver, shape, dtype_obj, fortran, raw = p.state
        fmt = _np_format(dtype_obj)
        if fmt and isinstance(shape, tuple) and isinstance(raw, (bytes, bytearray)):
            count = math.prod(shape)
            vals = _np_decode(fmt, bytes(raw), count)
            if vals is not None and len(vals) == count:
                return _reshape(vals, shape, bool(fortran))
        return _describe(p, depth)
    if full.startswith("omegaconf.") and isinstance(p.state, dict):
        if "_content" in p.state:  # DictConfig / ListConfig
            return _plain(p.state["_content"], depth + 1)
        if "_val" in p.state:  # AnyNode, StringNode, ...
            return _plain(p.state["_val"], depth + 1)
    if full in ("collections.defaultdict", "collections.OrderedDict", "collections.Counter"):
        return {_plain_key(k): _plain(v, depth + 1) for k, v in dict.items(p)}
    if len(p):  # dict-like (ReadOnlyDict, AttributeDict, Munch, ...)
        return {_plain_key(k): _plain(v, depth + 1) for k, v in dict.items(p)}
    if len(p.args) == 1 and isinstance(p.args[0], (list, tuple)) and p.state is None:
        return [_plain(v, depth + 1) for v in p.args[0]]  # ReadOnlyList, deque
    if len(p.args) == 2 and isinstance(p.args[0], (list, tuple)) and full == "collections.deque":
        return [_plain(v, depth + 1) for v in p.args[0]]
    if isinstance(p.state, dict) and not p.args:  # Namespace and plain objects
        return {_plain_key(k): _plain(v, depth + 1) for k, v in p.state.items()}
    if (isinstance(p.state, tuple) and len(p.state) == 2 and not p.args
            and all(isinstance(s, (dict, type(None))) for s in p.state)):
        merged = {**(p.state[0] or {}), **(p.state[1] or {})}
        return {_plain_key(k): _plain(v, depth + 1) for k, v in merged.items()}
    if not p.args and p.state is None:
        return {}  # empty dict-like container
    if (len(p.args) == 1 and p.state is None
            and isinstance(p.args[0], (str, int, float, bool, type(None)))):
        return p.args[0]  # enum member by value
    return _describe(p, depth)


def _describe(p: PickledObject, depth: int) -> dict:
    out: dict[str, Any] = {"__class__": p.qualified_name}
    if p.args:
        out["args"] = [_plain(a, depth + 1) for a in p.args]
    if p.state is not None:
        out["state"] = _plain(p.state, depth + 1)
    if len(p):
        out["items"] = {_plain_key(k): _plain(v, depth + 1) for k, v in dict.items(p)}
    return out


def _plain_key(k):
    if isinstance(k, (str, int, float, bool, type(None))):
        return k
    if isinstance(k, PickledObject):
        v = _plain_placeholder(k, 0)
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(k)
    return k if isinstance(k, tuple) else str(k)


def _plain(obj, depth: int = 0):
    if depth > 200:
        raise RecursionError("nested too deeply")
    if isinstance(obj, PickledObject):
        return _plain_placeholder(obj, depth)
    if isinstance(obj, dict):
        return {_plain_key(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, type):  # a class object (placeholder or builtin type): its name
        if issubclass(obj, PickledObject):
            return f"{obj.pickled_module}.{obj.pickled_name}"
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (set, frozenset)):
        vals = [_plain(v, depth + 1) for v in obj]
        try:
            return sorted(vals)
        except TypeError:
            return vals
    return obj


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

_STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _as_state_dict(obj) -> dict[str, torch.Tensor] | None:
    """``obj`` as str->Tensor if it is a non-empty mapping whose values are (mostly) tensors."""
    if not isinstance(obj, dict) or not obj:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        return None
    # Tolerate a few non-tensor entries (e.g. "_metadata"); reject a mapping that is mostly not weights.
    if len(tensors) < 0.5 * len(obj):
        return None
    return tensors


def load_lightning_checkpoint(path, *, mmap: bool = True) -> dict:
    """Load a METER / PyTorch Lightning ``.ckpt`` (or a plain ``torch.save`` state_dict) safely.

    Returns ``{"state_dict": {str: Tensor}, "config": dict, "hyper_parameters": dict, "meta": dict,
    "path": str}``. ``config`` is the sacred config (``hyper_parameters["config"]`` or
    ``hyper_parameters`` itself) as plain Python values, ``{}`` if absent. ``meta`` holds
    ``lightning_version``, ``epoch``, ``global_step`` (``None`` when absent), ``loader``
    (``"weights_only"`` or ``"restricted"``), ``placeholders`` (allow-listed globals replaced by inert
    placeholders), ``state_dict_key`` (where the weights were found, ``None`` for a bare state_dict),
    ``top_level_keys`` and ``skipped_keys`` (non-tensor entries dropped from the state_dict).

    With ``mmap=True`` (default) zip checkpoints are memory-mapped (copy-on-write), so optimizer
    states and other unused entries are never read into memory.

    Raises :class:`SmartTrimError` (one line, naming the file) for a missing path, a directory, an
    empty/truncated/corrupt/non-torch file, a TorchScript or legacy tar archive, a file without a
    state_dict, or one naming a forbidden global. No code from the file is ever executed.
    """
    spath = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    try:
        obj, loader, placeholders = _load_object(spath, mmap)
    except SmartTrimError:
        raise
    except RecursionError:
        raise _fail(spath, "pickle data nested too deeply")
    except MemoryError:
        raise _fail(spath, "not enough memory to load the checkpoint")

    if not isinstance(obj, dict):
        raise _fail(spath, f"no state_dict found: the file holds a {type(obj).__name__}, not a dict")

    sd_key = None
    state_dict = None
    for key in _STATE_DICT_KEYS:
        if key in obj:
            cand = obj[key]
            if isinstance(cand, dict) and "state_dict" in cand and key != "state_dict":
                cand = cand["state_dict"]
            state_dict = _as_state_dict(cand)
            if state_dict is not None:
                sd_key = key
                break
    if state_dict is None:
        state_dict = _as_state_dict(obj)
    if state_dict is None:
        keys = ", ".join(sorted(str(k) for k in obj)[:8])
        raise _fail(spath, f"no state_dict found (top-level keys: {keys or 'none'})")
    container = obj if sd_key is None else obj[sd_key]
    if isinstance(container, dict) and "state_dict" in container and sd_key not in (None, "state_dict"):
        container = container["state_dict"]
    skipped = sorted(str(k) for k in container if k not in state_dict) if isinstance(container, dict) else []

    try:
        hp_raw = obj.get("hyper_parameters", obj.get("hparams")) if sd_key is not None else None
        hyper_parameters = _plain(hp_raw) if hp_raw is not None else {}
    except RecursionError:
        raise _fail(spath, "hyper_parameters nested too deeply")
    if not isinstance(hyper_parameters, dict):
        hyper_parameters = {"value": hyper_parameters}
    cfg = hyper_parameters.get("config")
    if isinstance(cfg, dict):
        config = cfg
    elif hp_raw is not None and "config" not in hyper_parameters:
        config = dict(hyper_parameters)
    else:
        config = {}

    def _meta_value(k):
        v = obj.get(k) if sd_key is not None else None
        return _plain(v) if v is not None else None

    meta = {
        "lightning_version": _meta_value("pytorch-lightning_version"),
        "epoch": _meta_value("epoch"),
        "global_step": _meta_value("global_step"),
        "loader": loader,
        "placeholders": placeholders,
        "state_dict_key": sd_key,
        "top_level_keys": sorted(str(k) for k in obj)[:64] if sd_key is not None else [],
        "skipped_keys": skipped,
    }
    return {"state_dict": dict(state_dict), "config": config, "hyper_parameters": hyper_parameters,
            "meta": meta, "path": spath}


def save_lightning_checkpoint(ckpt: dict, path) -> None:
    """Write a Lightning-style checkpoint dict (e.g. ``backbones.meter.lightning_checkpoint``) atomically
    with ``torch.save``, as Lightning does; what ``load_lightning_checkpoint`` reads back."""
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
