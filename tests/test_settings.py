"""The one settings module: every knob typed, validated and documented in the README."""
from pathlib import Path

import pytest

from attnc.runtime.settings import KNOBS, settings


def test_every_knob_is_documented():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in KNOBS:
        assert f"`{name}`" in readme, name


def test_values_are_typed_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNC_INTERPRET", "yes")
    monkeypatch.setenv("ATTNC_LOG_LEVEL", "info")
    config = settings()
    assert config.cache_dir == tmp_path and config.interpret and config.log_level == "INFO"
    monkeypatch.setenv("ATTNC_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="ATTNC_LOG_LEVEL"):
        settings().log_level
    monkeypatch.setenv("ATTNC_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="ATTNC_AUTOTUNE='sometimes': expected one of off, fast, full"):
        settings().autotune


def test_no_other_module_reads_attnc_variables():
    root = Path(__file__).parent.parent
    for folder in ("attnc", "dsl", "codegen", "runtime"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "settings.py":
                continue
            text = path.read_text()
            assert "os.environ.get(\"ATTNC" not in text and "getenv(\"ATTNC" not in text, path


def test_a_changed_variable_is_seen_on_the_next_call(monkeypatch, tmp_path):
    """Settings are read when asked, never a stale copy."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.delenv("ATTNC_POISON", raising=False)
    config = settings()
    assert not config.poison
    monkeypatch.setenv("ATTNC_POISON", "1")
    assert config.poison
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "b"))
    assert settings().poison and settings().cache_dir == tmp_path / "b"
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings().cache_dir == tmp_path / "xdg" / "attnc"
