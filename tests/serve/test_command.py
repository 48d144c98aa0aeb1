"""`lorakit serve` as a user runs it: bad flags are one line and exit 2; the real command serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lorakit.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-size", "0"], "--max-batch-size=0 must be at least 1"),
    (["--max-loaded-adapters", "0"], "--max-loaded-adapters=0 must be at least 1"),
    (["--adapter", "no-equals-sign"], "--adapter 'no-equals-sign': write NAME=DIR"),
    (["--adapter-dir", "/no/such/dir"], "--adapter-dir /no/such/dir: no such directory"),
    (["--api-key", ""], "--api-key is empty"),
    (["--port", "70000"], "--port=70000 must be in [0, 65535]"),
])
def test_bad_flags_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit serve: error: ") and message in err and "\n" not in err


def test_bad_adapter_at_start_is_one_line(serve_dirs: tuple[Path, Path], http_root: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, _ = serve_dirs
    assert main(["serve", "--model", str(model_dir), "--adapter", f"x={http_root / 'spare' / 'fingerprint'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit serve: error: ") and "base" in err and "\n" not in err


@pytest.mark.slow
def test_the_command_serves_on_loopback(serve_dirs: tuple[Path, Path], http_root: Path, tmp_path: Path) -> None:
    model_dir, _ = serve_dirs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--adapter-dir",
                             str(http_root), "--port", str(port), "--api-key-file", str(key_file),
                             "--max-loaded-adapters", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "lorakit serve did not answer /health in 120 s"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer file-key"}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["tiny-llama", "a0", "a1", "a2"]  # a2 known, loaded on demand
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                       json={"model": "a2", "prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "lorakit serve: http://127.0.0.1:" in out



def test_gpt2_passes_the_start_check_and_serves_its_own_greedy_tokens(tmp_path: Path) -> None:
    import torch
    from conftest import save_tiny_model_dir

    from lorakit.serve.engine import Request
    from lorakit.serve.options import ServeOptions, build
    from lorakit.serve.sampling import SamplingParams

    from .test_engine import Collector

    model_dir = Path(str(save_tiny_model_dir(tmp_path / "gpt2", arch="gpt2")))
    _, engine = build(ServeOptions(model=model_dir))  # runs Engine.check_model
    engine.eos_ids.clear()
    engine.start()
    try:
        for prompt in ([5, 6, 7], [9] * 12):
            sink = Collector()
            engine.submit(Request(prompt, None, SamplingParams(max_tokens=8, temperature=0)), sink)
            sink.result()
            with torch.no_grad():
                expected = engine.registry.base.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                                         min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()
            assert sink.tokens == expected
    finally:
        engine.stop()


def test_a_model_the_row_layout_breaks_is_refused_at_start(serve_dirs: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.serve.engine import Engine
    from lorakit.serve.options import ServeOptions, build

    real = Engine._forward
    monkeypatch.setattr(Engine, "_forward", lambda self, *a: real(self, *a) + 1.0)  # as if attention were wrong
    with pytest.raises(ValueError, match="does not support model_type='llama'.*differ from its own forward"):
        build(ServeOptions(model=serve_dirs[0]))
