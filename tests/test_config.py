import argparse

from worker.config import Settings, add_settings_arguments, settings_from_args
from worker.keys import job_id_for


def test_env_and_flags(monkeypatch):
    monkeypatch.setenv("TAGSTREAM_ALLOWED_ROOTS", "/a, /b")
    monkeypatch.setenv("TAGSTREAM_CONCURRENCY", "3")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--fps", "2", "--burst", "--allowed-hosts", "x.org,y.org"])
    settings = settings_from_args(args)
    assert settings.allowed_roots == ["/a", "/b"]
    assert settings.concurrency == 3
    assert settings.fps == 2.0 and settings.burst is True
    assert settings.allowed_hosts == ["x.org", "y.org"]
    assert Settings().queue == "tagging"


def test_job_ids_are_safe_and_distinct():
    assert job_id_for("abc_1-2") == "tag-abc_1-2"
    a, b = job_id_for("a/b"), job_id_for("a:b")
    assert a != b
    assert all(c.isalnum() or c in "_-" for c in a + b)


def _settings_table_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parents[1] / "README.md"


def test_readme_settings_table_matches_settings():
    """The README's configuration table is exactly what scripts/settings_table.py generates from
    Settings (regenerate with `python scripts/settings_table.py --write README.md`)."""
    script, readme = _settings_table_script()
    generated = script.table()
    assert script.embedded_table(readme.read_text(encoding="utf-8")) == generated
    for name, info in Settings.model_fields.items():
        assert f"`TAGSTREAM_{name.upper()}`" in generated
        assert info.description, f"setting {name} has no description for the README and --help"
