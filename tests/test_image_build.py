"""The image build's rules, checked without building (scripts/build_image.sh builds and runs the image for
real; it takes tens of minutes and GBs of downloads, so it is not part of this suite).

* deploy/Dockerfile: the dependency layer depends on the base image and the lock alone, in the build stage and
  in the final image; OCI labels come from build args declared after the last layer; a python3 base works.
* .dockerignore: what enters the build context, with Docker's matching rules (last match wins, a pattern
  also matches everything under a matching folder, ``**`` any number of folders), including the training
  runs' checkpoint files that ``--build-arg WEIGHTS_DIR=runs/NAME`` needs.
* deploy/docker-entrypoint.sh: a weights folder that is itself a checkpoint (a training run) is used as one.
* scripts/build_image.sh: syntax, and the apt-sources parser that finds the Debian mirror for debootstrap.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
BUILD_SCRIPT = ROOT / "scripts" / "build_image.sh"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split()[-1]
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages


# --- Dockerfile ---------------------------------------------------------------------------------------------
def test_base_image_is_a_build_arg_defaulting_to_the_official_python_image():
    instructions = _instructions()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instructions
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms and all(rest.startswith("${PYTHON_IMAGE} AS ") for rest in froms)
    # python3, not python: a plain Debian base (scripts/build_image.sh's debootstrap) has no `python` before
    # the venv exists; in the venv and in the official image both names work
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "python3 -m venv /opt/venv" in runs and not re.search(r"(^|[\s;&])python -m venv", runs)


def test_dependency_layer_depends_on_the_lock_alone():
    build = _stages()["build"]
    lock_step = next(i for i, (word, rest) in enumerate(build) if word == "RUN" and "--require-hashes" in rest)
    assert "pip install --require-hashes -r" in build[lock_step][1]
    copies_before = [rest for word, rest in build[:lock_step] if word in ("COPY", "ADD")]
    assert copies_before == ["requirements/requirements-runtime-py*.txt requirements/"]
    assert not any(word == "ARG" for word, _ in build[:lock_step])  # no build arg can change it either
    # nothing after it touches the venv (the project goes to /staging, pip writes no .pyc of its own): the
    # final image's copy of /opt/venv is the dependency layer too
    later = [rest for word, rest in build[lock_step + 1:] if word == "RUN"]
    assert len(later) == 1 and later[0].startswith("PYTHONDONTWRITEBYTECODE=1 pip install --no-deps ")
    assert later[0].endswith(" --root /staging .")


def test_final_image_copies_the_dependency_venv_before_the_project():
    runtime = _stages()["runtime"]
    steps = [(word, rest) for word, rest in runtime if word in ("COPY", "RUN", "ADD")]
    venv = steps.index(("COPY", "--from=build /opt/venv /opt/venv"))
    # the project's files in a layer of their own, right after the dependencies (no RUN --mount: buildah
    # 1.28 takes such a step from its cache even when the mounted stage changed)
    assert steps[venv + 1] == ("COPY", "--from=build /staging/ /")
    # only the base and the system packages come before the dependency layer
    assert all(word == "RUN" and "apt-get" in rest for word, rest in steps[:venv])


def test_oci_labels_from_build_args_declared_after_the_last_layer():
    runtime = _stages()["runtime"]
    label = " ".join(rest for word, rest in runtime if word == "LABEL")
    expected = {"title": None, "version": "VERSION", "revision": "REVISION", "created": "CREATED", "source": "SOURCE"}
    for key, arg in expected.items():
        match = re.search(rf'org\.opencontainers\.image\.{key}="([^"]*)"', label)
        assert match, key
        if arg:
            assert match.group(1) == "${" + arg + "}"
    last_layer = max(i for i, (word, _) in enumerate(runtime) if word in ("COPY", "RUN", "ADD"))
    for arg in ("VERSION", "REVISION", "CREATED", "SOURCE"):
        where = [i for i, (word, rest) in enumerate(runtime) if word == "ARG" and rest.split("=")[0] == arg]
        assert where and where[0] > last_layer, f"ARG {arg} before a layer: a new revision would rebuild it"


def test_driver_requirement_is_stated_in_the_dockerfile_and_the_docs():
    for path in (DOCKERFILE, ROOT / "docs" / "production.md"):
        text = " ".join(path.read_text().split())
        assert "R580" in text and "CUDA 13" in text and "Volta" in text, path


# --- .dockerignore ------------------------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax (moby/patternmatcher): ``*`` and ``?`` within a path component, ``**`` any
    number of components, ``[...]`` classes."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def _in_context(path: str) -> bool:
    """Whether ``path`` (relative to the repository root) is sent to the builder: the last pattern that
    matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore_rules():
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return not excluded


@pytest.mark.parametrize(
    "path, sent",
    [
        ("requirements/requirements-runtime-py3.11.txt", True),
        ("pyproject.toml", True),
        ("README.md", True),
        ("worker/cli.py", True),
        ("model/assets/tagstream-small/model.safetensors", True),
        ("deploy/docker-entrypoint.sh", True),
        ("deploy/weights/README.md", True),
        ("deploy/weights/checkpoint/model.safetensors", True),
        # a training run (README: tagstream train ... runs/iat): its checkpoint files only
        ("runs/iat/model.safetensors", True),
        ("runs/iat/config.json", True),
        ("runs/iat/labels.txt", True),
        ("runs/iat/chars.json", True),
        ("runs/exp/seed0/model.safetensors", False),  # runs/NAME only: runs/exp/seed0 is an excluded folder
        ("runs/iat/train_state.pt", False),
        ("runs/iat/history.json", False),
        ("runs/iat/learning_curves.png", False),
        (".venv/bin/python", False),
        (".git/HEAD", False),
        ("worker/__pycache__/cli.cpython-311.pyc", False),
        ("tests/test_deploy.py", False),
        ("data/synth/train.tsv", False),
        ("out/image-build/build.log", False),
        ("clip.mp4", False),
        ("deploy/k8s/base/deployment.yaml", False),
    ],
)
def test_dockerignore(path, sent):
    assert _in_context(path) is sent


def test_dockerignore_exceptions_are_not_inside_excluded_folders():
    """buildah (1.28) never looks inside an excluded folder, so a file let back in with ``!`` must not lie
    in one: ``runs/*/*`` and not ``runs``, or ``--build-arg WEIGHTS_DIR=runs/NAME`` finds nothing to copy."""
    exceptions = [line.strip()[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
                  if line.strip().startswith("!")]
    assert exceptions
    for pattern in exceptions:
        example = pattern.replace("**", "x").replace("*", "x")
        assert _in_context(example), pattern
        parts = example.split("/")
        for i in range(1, len(parts)):
            assert _in_context("/".join(parts[:i])), f"{pattern}: its folder {'/'.join(parts[:i])} is excluded"


def test_dockerignore_matcher_follows_docker_rules():
    """The matcher above on Docker's documented examples, so the parametrized cases mean what they say."""
    assert _pattern_regex("*/temp*").match("somedir/temporary.txt")
    assert not _pattern_regex("*/temp*").match("somedir/sub/temporary.txt")
    assert _pattern_regex("**/*.go").match("a/b/c.go") and _pattern_regex("**/*.go").match("c.go")
    assert _pattern_regex("temp?").match("tempa") and not _pattern_regex("temp?").match("temp/a")


# --- entrypoint ---------------------------------------------------------------------------------------------
def _entrypoint_env(tmp_path: Path, weights: Path, **env: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "tagstream"
    fake.write_text('#!/bin/sh\nenv | grep ^TAGSTREAM_ | sort\n')
    fake.chmod(0o755)
    proc = subprocess.run(["sh", str(ENTRYPOINT), "worker"], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "TAGSTREAM_WEIGHTS_DIR": str(weights), **env})
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_entrypoint_takes_a_training_run_as_the_checkpoint(tmp_path):
    run = tmp_path / "weights"  # what COPY runs/iat/ /opt/tagstream/weights/ leaves in the image
    run.mkdir()
    for name in ("model.safetensors", "config.json", "labels.txt"):
        (run / name).write_bytes(b"x")
    assert _entrypoint_env(tmp_path, run)["TAGSTREAM_CHECKPOINT"] == str(run)
    assert _entrypoint_env(tmp_path, run, TAGSTREAM_CHECKPOINT="/explicit")["TAGSTREAM_CHECKPOINT"] == "/explicit"
    (run / "checkpoint").mkdir()  # the documented layout wins over a checkpoint at the top
    (run / "checkpoint" / "model.safetensors").write_bytes(b"x")
    assert _entrypoint_env(tmp_path, run)["TAGSTREAM_CHECKPOINT"] == str(run / "checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "TAGSTREAM_CHECKPOINT" not in _entrypoint_env(tmp_path, empty)


# --- scripts/build_image.sh ---------------------------------------------------------------------------------
def test_build_script_syntax_and_not_in_the_suite():
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], capture_output=True).returncode == 0
    assert os.access(BUILD_SCRIPT, os.X_OK)
    header = BUILD_SCRIPT.read_text().split("\n\n")[0]
    assert "NOT part of CI" in header
    assert "build_image" not in (ROOT / "scripts" / "test.sh").read_text()
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(BUILD_SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def _debian_uri(apt_etc: Path, suite: str) -> str:
    text = BUILD_SCRIPT.read_text()
    function = re.search(r"^debian_uri\(\) \{\n.*?^\}\n", text, re.S | re.M).group(0)
    proc = subprocess.run(["bash", "-c", f'{function}\ndebian_uri "$1"', "x", suite], capture_output=True,
                          text=True, timeout=30, env={"APT_ETC": str(apt_etc), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_mirror_from_apt_sources(tmp_path):
    """The Debian mirror for debootstrap comes from the machine's apt sources, in either format."""
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    assert _debian_uri(etc, "bookworm") == ""  # no sources at all: nothing, and no error
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    (etc / "sources.list.d" / "other.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://vendor.example/apt stable main\n")
    assert _debian_uri(etc, "bookworm") == "http://mirror.example/debian"
    assert _debian_uri(etc, "bookworm-security") == "http://mirror.example/debian-security"
    assert _debian_uri(etc, "trixie") == ""
    (etc / "sources.list").write_text("# comment\ndeb [trusted=yes] http://one-line.example/debian bookworm main\n")
    assert _debian_uri(etc, "bookworm") == "http://one-line.example/debian"  # sources.list is read first
