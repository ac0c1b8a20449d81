"""Loading files a user was given never runs code: the restricted unpickler for MultimodalVideoTag's
pickles (model/safe_pickle.py), and a source scan for unsafe loaders anywhere in model/, worker/, scripts/."""

from __future__ import annotations

import ast
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from model import safe_pickle
from model.safe_pickle import UnsafePickleError

ROOT = Path(__file__).resolve().parent.parent

# Written by Python 2.7.18 with NumPy 1.16.6: ``cPickle.dumps(record, protocol)`` of
#   {'video': 'http://example.com/\xe7\x8c\xab.mp4',   # a Python 2 str: the UTF-8 bytes of "猫"
#    'feature': {'image_pkl': np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
#                'audio_pkl': np.zeros((0, 128), np.float32)},
#    'label': ['0']}
# i.e. MVT's layout as its (Python 2) feature extraction wrote it; kept as bytes so no Python 2 is needed.
PY2_PROTOCOL2 = (
    b"\x80\x02}q\x01(U\x05videoq\x02U\x1ahttp://example.com/\xe7\x8c\xab.mp4q\x03U\x07featureq\x04}q\x05"
    b"(U\timage_pklq\x06cnumpy.core.multiarray\n_reconstruct\nq\x07cnumpy\nndarray\nq\x08K\x00\x85U\x01b"
    b"\x87Rq\t(K\x01K\x02K\x03\x86cnumpy\ndtype\nq\nU\x02f4K\x00K\x01\x87Rq\x0b(K\x03U\x01<NNNJ\xff\xff"
    b"\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x18\x00\x00\x00\x00\x00\x00\x80>\x00\x00\x00?\x00\x00@?\x00"
    b"\x00\x80?\x00\x00\xa0?tbU\taudio_pklq\x0ch\x07h\x08K\x00\x85U\x01b\x87Rq\r(K\x01K\x00K\x80\x86h"
    b"\x0b\x89U\x00tbuU\x05labelq\x0e]q\x0fU\x010au."
)
PY2_PROTOCOL0 = (
    b"(dp1\nS'video'\np2\nS'http://example.com/\\xe7\\x8c\\xab.mp4'\np3\nsS'feature'\np4\n(dp5\n"
    b"S'image_pkl'\np6\ncnumpy.core.multiarray\n_reconstruct\np7\n(cnumpy\nndarray\np8\n(I0\ntS'b'\ntRp9\n"
    b"(I1\n(I2\nI3\ntcnumpy\ndtype\np10\n(S'f4'\nI0\nI1\ntRp11\n(I3\nS'<'\nNNNI-1\nI-1\nI0\ntbI00\n"
    b"S'\\x00\\x00\\x00\\x00\\x00\\x00\\x80>\\x00\\x00\\x00?\\x00\\x00@?\\x00\\x00\\x80?\\x00\\x00\\xa0?'\n"
    b"tbsS'audio_pkl'\np12\ng7\n(g8\n(I0\ntS'b'\ntRp13\n(I1\n(I0\nI128\ntg11\nI00\nS''\ntbssS'label'\n"
    b"p14\n(lp15\nS'0'\nas."
)
IMAGE = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
PY2_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}


def globals_of(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every GLOBAL / INST / STACK_GLOBAL in a pickle, from ``pickletools.genops``.
    STACK_GLOBAL takes the two strings on top of the stack: pushed by a *UNICODE opcode or fetched
    from the memo (protocol 4 memoizes every string, so ``numpy`` comes back through BINGET)."""
    out: set[tuple[str, str]] = set()
    strings: list[str] = []  # strings pushed, in order
    memo: dict[int, str | None] = {}
    top: str | None = None  # the value the last push put on the stack, when it is a string
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
            out.add((module, name))
            top = None
        elif op.name == "STACK_GLOBAL":
            out.add((strings[-2], strings[-1]))
            top = None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = top
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(arg)
            if top is not None:
                strings.append(top)
        elif "UNICODE" in op.name:
            top = arg
            strings.append(arg)
        else:
            top = None
    return out


class Payload:
    """A pickle that runs ``touch MARKER`` when loaded by the standard unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_python2_fixture_is_what_python2_numpy_writes():
    # the globals a Python 2 NumPy 1.x pickle names (no numpy._core, no _codecs: array bytes are a str)
    assert globals_of(PY2_PROTOCOL2) == PY2_GLOBALS
    ops = {op.name for op, _, _ in pickletools.genops(PY2_PROTOCOL2)}
    assert "SHORT_BINSTRING" in ops and "BINBYTES" not in ops and "SHORT_BINBYTES" not in ops
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in PY2_PROTOCOL0 and b"_codecs" not in PY2_PROTOCOL0


@pytest.mark.parametrize("data", [PY2_PROTOCOL2, PY2_PROTOCOL0], ids=["protocol2", "protocol0"])
def test_python2_pickles_load(data):
    record = safe_pickle.loads(data, source="v.pkl")
    image = record["feature"]["image_pkl"]
    assert image.dtype == np.float32 and np.array_equal(image, IMAGE)
    assert record["feature"]["audio_pkl"].shape == (0, 128)
    # Python 2 str fields arrive as latin-1 str (MVT reads with encoding="iso-8859-1")
    assert record["video"] == "http://example.com/猫.mp4".encode().decode("latin-1")
    assert record["label"] == ["0"]
    # the same as the standard unpickler gives (on this trusted fixture)
    plain = pickle.loads(data, encoding="iso-8859-1")
    assert np.array_equal(plain["feature"]["image_pkl"], image) and plain["video"] == record["video"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickles_load(protocol):
    record = {"video": "http://example.com/猫.mp4", "label": ["0"],
              "feature": {"image_pkl": IMAGE.astype(np.float64), "audio_pkl": np.zeros((0, 128), np.float32)},
              "raw": b"\xff\x00", "empty": b"", "scalar": np.float32(1.5), "fortran": np.asfortranarray(IMAGE)}
    data = pickle.dumps(record, protocol=protocol)
    names = globals_of(data)
    assert names <= set(safe_pickle.ALLOWED), names - set(safe_pickle.ALLOWED)
    if protocol == 2:  # bytes at protocol 2 go through _codecs.encode and builtins.bytes()
        assert ("_codecs", "encode") in names and ("__builtin__", "bytes") in names
    got = safe_pickle.loads(data)
    assert np.array_equal(got["feature"]["image_pkl"], IMAGE) and got["feature"]["image_pkl"].dtype == np.float64
    assert got["raw"] == b"\xff\x00" and got["empty"] == b"" and got["scalar"] == np.float32(1.5)
    assert np.array_equal(got["fortran"], IMAGE) and got["video"] == record["video"]


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "v1.pkl"
    path.write_bytes(pickle.dumps({"feature": Payload(marker)}, protocol=protocol))
    with pytest.raises(UnsafePickleError) as info:
        safe_pickle.load_file(path)
    assert str(info.value) == (f"{path}: refused global '{os.system.__module__}.system' "
                               "(only plain data and numpy arrays are allowed)")
    assert info.value.path == str(path) and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data,refused",
    [
        # numpy.ndarray called directly (would allocate from a shape alone)
        (b"\x80\x02cnumpy\nndarray\nK\x05\x85\x85R.", "call numpy.ndarray"),
        # _reconstruct with a shape NumPy never writes
        (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85U\x01b\x87R.",
         "call _reconstruct"),
        # _codecs.encode with another codec, bytes() with a size
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R.", "call _codecs.encode"),
        (b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.", "call bytes"),
        # a dotted name through an allowed module, and builtins beyond bytes
        (b"\x80\x02cnumpy\ndtype.__init__\n.", "global 'numpy.dtype.__init__'"),
        (b"\x80\x02c__builtin__\neval\n.", "global '__builtin__.eval'"),
        (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04exec\x93.", "global 'builtins.exec'"),
    ],
    ids=["ndarray-call", "reconstruct-shape", "codecs-rot13", "bytes-size", "dotted-name", "eval", "exec"],
)
def test_allowed_globals_only_take_what_numpy_writes(data, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.").replace("(", r"\(")):
        safe_pickle.loads(data, source="x.pkl")


def test_a_pickle_cannot_change_the_allowed_callables():
    # BUILD on an allowed callable (dict state, then slot state): refused, nothing changes
    for data in (b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb.",
                 b"\x80\x02cnumpy\ndtype\nN}X\x05\x00\x00\x00_nameK\x01s\x86b."):
        with pytest.raises(AttributeError):
            safe_pickle.loads(data)
    assert repr(safe_pickle.ALLOWED[("numpy", "dtype")]) == "numpy.dtype"
    assert safe_pickle.loads(PY2_PROTOCOL2)["feature"]["image_pkl"].shape == (2, 3)


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # model.to(d).eval() is not eval()
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_loads(source: str, where: str) -> list[str]:
    """Calls in Python ``source`` that can run code from the data they read (``where:line name``)."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        at = f"{where}:{node.lineno} {name}"
        if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "joblib.load",
                    "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open",
                    "yaml.load", "yaml.unsafe_load", "eval", "exec", "torch.jit.load"):
            found.append(at)
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(at + " without weights_only=True")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is True:
            found.append(at + " with allow_pickle=True")
        elif name.endswith("from_pretrained") and _keyword(node, "trust_remote_code") is True:
            found.append(at + " with trust_remote_code=True")
    return found


def test_no_unsafe_loader_in_the_code():
    """Every loader of user-given files is a safe one: safe_pickle (MVT's pickles), safetensors, JSON,
    ``torch.load(weights_only=True)``, ``np.load`` without pickles (its default)."""
    files = [p for d in ("model", "worker", "scripts", "deploy") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for path in files for hit in unsafe_loads(path.read_text("utf-8"), str(path.relative_to(ROOT)))]
    assert found == []
    # the scan sees what it looks for
    snippet = ("import pickle, numpy as np, torch\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=True)\n"
               "np.load(p, allow_pickle=True)\nnp.load(p)\n")
    assert unsafe_loads(snippet, "x.py") == ["x.py:2 pickle.load", "x.py:3 torch.load without weights_only=True",
                                             "x.py:5 np.load with allow_pickle=True"]
