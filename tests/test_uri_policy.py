"""URI policy: schemes, hosts, roots, symlinks and `..` escaping a root, data:/concat: URIs."""

from __future__ import annotations

import os

import pytest

from worker.errors import ForbiddenUriError, NotFoundError
from worker.media.uri_policy import UriPolicy


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"s")
    os.symlink(secret, root / "link.mp4")
    os.symlink(root / "a.mp4", root / "inner_link.mp4")
    return tmp_path, root, UriPolicy(schemes=("file", "http", "https"), hosts=("cdn.example.com", ".media.example.org"),
                                     roots=(str(root),))


def test_local_paths(tree):
    base, root, policy = tree
    assert policy.check(str(root / "a.mp4")) == str((root / "a.mp4").resolve())
    assert policy.check(f"file://{root}/a.mp4") == str((root / "a.mp4").resolve())
    assert policy.check(str(root / "inner_link.mp4")) == str((root / "a.mp4").resolve())
    with pytest.raises(NotFoundError):
        policy.check(str(root / "missing.mp4"))
    for bad in (str(base / "secret.mp4"), str(root / "link.mp4"), f"{root}/../secret.mp4", "a.mp4",
                "media/a.mp4", f"file://otherhost{root}/a.mp4", str(root) + "_sibling/a.mp4", "/etc/passwd", ""):
        with pytest.raises(ForbiddenUriError):
            policy.check(bad)


def test_schemes_refused(tree):
    _, root, policy = tree
    for bad in ("data:video/mp4;base64,AAAA", f"concat:{root}/a.mp4|{root}/a.mp4", "ftp://cdn.example.com/a.mp4",
                f"subfile:,,start,0,end,1,,:{root}/a.mp4", "pipe:0", "gopher://x", f"file:{root}/a.mp4\x00.txt"):
        with pytest.raises(ForbiddenUriError):
            policy.check(bad)


def test_hosts(tree):
    _, _, policy = tree
    assert policy.check("HTTPS://CDN.example.com/v/a.mp4#frag") == "https://cdn.example.com/v/a.mp4"
    assert policy.check("http://x.media.example.org:8080/a.mp4") == "http://x.media.example.org:8080/a.mp4"
    for bad in ("http://evil.com/a.mp4", "http://cdn.example.com.evil.com/a.mp4", "http://user:pw@cdn.example.com/a",
                "http://127.0.0.1/a.mp4", "http:///a.mp4", "http://notmedia.example.org/a.mp4"):
        with pytest.raises(ForbiddenUriError):
            policy.check(bad)


def test_empty_lists_allow_nothing(tree):
    _, root, _ = tree
    policy = UriPolicy()
    with pytest.raises(ForbiddenUriError):
        policy.check(str(root / "a.mp4"))
    with pytest.raises(ForbiddenUriError):
        policy.check("https://cdn.example.com/a.mp4")
    only_http = UriPolicy(schemes=("https",), hosts=("cdn.example.com",), roots=(str(root),))
    with pytest.raises(ForbiddenUriError):
        only_http.check(str(root / "a.mp4"))
    with pytest.raises(ForbiddenUriError):
        only_http.check("http://cdn.example.com/a.mp4")


def test_from_settings(tmp_path):
    from worker.config import Settings

    s = Settings(allowed_hosts="cdn.example.com", allowed_roots=str(tmp_path), allowed_schemes="file,https")
    policy = UriPolicy.from_settings(s)
    assert policy.schemes == ("file", "https") and policy.hosts == ("cdn.example.com",)
    assert policy.roots == (str(tmp_path),)
