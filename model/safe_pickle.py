"""Restricted unpickling for MultimodalVideoTag's feature pickles: data comes out, code never runs.

A pickle names the callables it wants called (its *globals*, e.g. ``posix.system``); the standard
unpickler imports and calls whatever a file names, so a ``.pkl`` whose ``__reduce__`` returns
``(os.system, ("...",))`` runs that command as soon as it is loaded. :class:`SafeUnpickler` resolves
only a fixed table of globals that plain data and NumPy arrays need and refuses every other global
with :class:`UnsafePickleError` *before* anything is imported or called.

What real files contain (checked by disassembling them with ``pickletools``):

* Python 2 ``cPickle`` (protocols 0-2) of a NumPy 1.x array: ``numpy.core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype``; NumPy scalars add ``numpy.core.multiarray.scalar``. The array
  bytes are a Python 2 ``str``; with ``encoding="iso-8859-1"`` (what MVT's reader passes) they arrive
  as a latin-1 ``str``, which NumPy's ``__setstate__`` turns back into the same bytes.
* Python 3: NumPy 1.x writes the same names, NumPy 2.x the same under ``numpy._core``; at protocol 2
  and lower ``bytes`` are written as ``_codecs.encode(text, "latin1")`` (and ``b""`` as
  ``builtins.bytes()``, spelled ``__builtin__.bytes``); at protocol 5 arrays are
  ``numpy._core.numeric._frombuffer(buffer, dtype, shape, order)``.

Dicts, lists, tuples, str, bytes, ints, floats, bools and None need no global at all.

The allowed callables are wrapped so that they only accept the arguments NumPy and Python write:
``_reconstruct`` only as ``_reconstruct(numpy.ndarray, (0,), dtype_code)`` (the empty array that the
following BUILD fills from bytes in the file), ``numpy.ndarray`` only as that first argument (it is
never handed out as a callable, so a pickle cannot allocate ``ndarray((10**12,))`` from a few bytes),
``_codecs.encode`` only for a ``str`` and a latin-1 codec, ``bytes`` only without arguments. Anything
else is refused the same way. This keeps code from running; it does not bound the memory a large
*genuine* array takes (its bytes are in the file, so the file's size bounds it).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.multiarray import scalar as _np_scalar  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]

MVT_ENCODING = "iso-8859-1"
_HINT = "only plain data and numpy arrays are allowed"
_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1"}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global (or called an allowed one with arguments) outside the allowed table.

    ``path`` is the file (or the name given for a stream), ``refused`` what was refused, e.g.
    ``"global 'posix.system'"``."""

    def __init__(self, path: str, refused: str) -> None:
        self.path = path
        self.refused = refused
        super().__init__(f"{path}: refused {refused} ({_HINT})")


class _Refused(Exception):
    """Raised inside an allowed callable; :func:`load` turns it into :class:`UnsafePickleError`."""


class _Allowed:
    """An allowed callable as the unpickler hands it out: callable, but without attributes a pickle's
    BUILD opcode could set (no ``__dict__``; ``__setattr__`` refuses), so one file cannot change what
    the next file gets."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Any) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{self._name} is read-only")

    def __call__(self, *args: object) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return self._name


def _refuse_ndarray(*args: object) -> None:
    raise _Refused(f"call numpy.ndarray(<{len(args)} arguments>)")


#: ``numpy.ndarray`` as a pickle sees it: only ``_reconstruct``'s first argument, never a constructor
_NDARRAY = _Allowed("numpy.ndarray", _refuse_ndarray)


def _reconstruct(subtype: object, shape: object, dtype_code: object) -> np.ndarray:
    """NumPy's ``_reconstruct`` as NumPy writes it: ``(ndarray, (0,), b'b')`` -> an empty array."""
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
        raise _Refused(f"call _reconstruct({subtype!r}, {shape!r}, ...)")
    return _np_reconstruct(np.ndarray, (0,), dtype_code)


def _codecs_encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 writes ``bytes`` at protocol <= 2: a str and a latin-1 codec."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise _Refused(f"call _codecs.encode(<{type(text).__name__}>, {encoding!r})")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as Python 3 writes ``b""`` at protocol <= 2 (no arguments)."""
    if args:
        raise _Refused(f"call bytes(<{len(args)} arguments>)")
    return b""


_RECONSTRUCT = _Allowed("_reconstruct", _reconstruct)
_SCALAR = _Allowed("scalar", _np_scalar)
_FROMBUFFER = _Allowed("_frombuffer", _np_frombuffer)
_BYTES = _Allowed("bytes", _empty_bytes)

#: (module, name) as written in the pickle -> the object the unpickler gets instead
ALLOWED: dict[tuple[str, str], _Allowed] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Allowed("numpy.dtype", np.dtype),
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _Allowed("_codecs.encode", _codecs_encode),
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED` globals (see the module docstring).

    ``source`` names the file in error messages. No persistent ids are accepted (the base class
    refuses them)."""

    def __init__(self, file: BinaryIO, *, source: str, encoding: str = MVT_ENCODING) -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(self.source, f"global '{module}.{name}'") from None


def load(file: BinaryIO, *, source: str, encoding: str = MVT_ENCODING) -> Any:
    """Unpickle ``file`` with :class:`SafeUnpickler`; :class:`UnsafePickleError` names ``source``."""
    try:
        return SafeUnpickler(file, source=source, encoding=encoding).load()
    except _Refused as exc:
        raise UnsafePickleError(source, str(exc)) from None


def load_file(path: str | Path, *, encoding: str = MVT_ENCODING) -> Any:
    """Unpickle the file at ``path`` safely (``encoding`` decodes Python 2 ``str``, as MVT's reader)."""
    with Path(path).open("rb") as f:
        return load(f, source=str(path), encoding=encoding)


def loads(data: bytes, *, source: str = "<bytes>", encoding: str = MVT_ENCODING) -> Any:
    """Unpickle ``data`` safely."""
    return load(io.BytesIO(data), source=source, encoding=encoding)
