"""The environment is the locked one: every locked distribution at its locked version, `pip check` clean,
and the parts that broke a fresh install once (torchaudio's native library against torch, the text encoder
that transformers builds) import and run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.lockfile import installed_lock_mismatches, read_lock

ROOT = Path(__file__).resolve().parents[1]
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.mark.parametrize("kind", ["dev", "runtime"])
def test_lock_files_exist_for_this_python(kind):
    lock = read_lock(ROOT / "requirements" / f"requirements-{kind}-py{PY}.txt")
    assert {"torch", "torchaudio", "torchvision", "av", "rq", "redis", "transformers"} <= set(lock)
    assert lock["torchaudio"] == lock["torch"], "torchaudio must be torch's own release"


def test_runtime_lock_is_the_dev_lock_s_subset():
    """The image (runtime lock) runs the versions the test suite ran (dev lock)."""
    runtime = read_lock(ROOT / "requirements" / f"requirements-runtime-py{PY}.txt")
    dev = read_lock(ROOT / "requirements" / f"requirements-dev-py{PY}.txt")
    assert {name: dev.get(name) for name in runtime} == runtime


def test_venv_matches_the_lock():
    """scripts/setup_env.sh installed exactly the dev lock; a version changed by hand in the venv fails here."""
    assert installed_lock_mismatches(read_lock(ROOT / "requirements" / f"requirements-dev-py{PY}.txt")) == []


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_torchaudio_and_text_encoder_run():
    """torchaudio's native library loads against this torch (an ABI mismatch raises OSError 'undefined
    symbol' here), and the text encoder, whose loading imports torchaudio through transformers, runs."""
    import torch
    import torchaudio

    assert torchaudio.__version__.split("+")[0] == torch.__version__.split("+")[0]

    from model.text import build_text_encoder

    states, mask = build_text_encoder()(["a cat in the snow"])
    assert states.shape[0] == 1 and mask.any() and torch.isfinite(states).all()
