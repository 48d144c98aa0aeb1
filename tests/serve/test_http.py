"""The HTTP server with real clients: the official ``openai`` package and httpx, on loopback."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import API_KEY, PeftReference

BASE = "tiny-llama"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _client(server: Any) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=60)


def _complete(server: Any, model: str = "a0", prompt: str = "hello world", **extra: Any) -> dict[str, Any]:
    with _client(server) as client:
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0} | extra)
    assert r.status_code == 200, r.text
    return r.json()


def _still_serves(server: Any) -> None:
    """After an error: a normal request on an adapter and on the base is answered correctly."""
    first, second = _complete(server, "a1"), _complete(server, "a1")
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] >= 1
    assert _complete(server, BASE)["choices"][0]["finish_reason"] in ("stop", "length")


def _wait_idle(server: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def _error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    for word in words:
        assert word in body["message"], body
    assert body["code"] == status
    return body


# ---------------------------------------------------------------------------------------------- openai client
def test_openai_client_completions_chat_streaming_and_models(server: Any, serve_dirs: tuple[Path, Path],
                                                             peft_reference: PeftReference) -> None:
    import openai
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [BASE, "a0", "a1", "a2"]

    completion = client.completions.create(model="a1", prompt="The answer is", max_tokens=10, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(serve_dirs[0])
    prompt_ids = tokenizer("The answer is")["input_ids"]
    expected = tokenizer.decode(peft_reference.generate(prompt_ids, "a1", 10), skip_special_tokens=True)
    assert completion.choices[0].text == expected
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    streamed = client.completions.create(model="a1", prompt="The answer is", max_tokens=10, temperature=0,
                                         stream=True)
    chunks = [c.choices[0].text for c in streamed if c.choices]
    assert len(chunks) > 1 and "".join(chunks) == expected

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model="a2", messages=messages, max_tokens=12, temperature=0)
    chat_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    chat_expected = tokenizer.decode(peft_reference.generate(chat_ids, "a2", 12), skip_special_tokens=True)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_expected
    assert chat.usage.prompt_tokens == len(chat_ids)

    stream = client.chat.completions.create(model="a2", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        if event.choices and event.choices[0].delta.content:
            parts.append(event.choices[0].delta.content)
    assert "".join(parts) == chat_expected
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    base = client.completions.create(model=BASE, prompt="The answer is", max_tokens=10, temperature=0)
    assert base.choices[0].text == tokenizer.decode(peft_reference.generate(prompt_ids, None, 10),
                                                    skip_special_tokens=True)


def test_raw_stream_is_server_sent_events_ending_with_done(server: Any) -> None:
    with _client(server) as client, client.stream("POST", "/v1/completions", json={
            "model": "a0", "prompt": "abc", "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(e["choices"][0]["text"] for e in events) == _complete(server, "a0", "abc", max_tokens=6)[
        "choices"][0]["text"]


def test_sampling_parameters_and_seed(server: Any) -> None:
    one = _complete(server, "a0", temperature=0.8, top_p=0.9, seed=5, max_tokens=12)
    two = _complete(server, "a0", temperature=0.8, top_p=0.9, seed=5, max_tokens=12)
    assert one["choices"][0]["text"] == two["choices"][0]["text"]
    stopped = _complete(server, "a0", max_tokens=12)
    text = stopped["choices"][0]["text"]
    cut = _complete(server, "a0", max_tokens=12, stop=[text[4:6]])
    assert cut["choices"][0]["text"] == text[:text.find(text[4:6])]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_metrics_and_health(server: Any) -> None:
    _complete(server, "a0")
    health = httpx.get(f"{server.url}/health", timeout=10)  # open: no API key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("lorakit_serve_requests_total{adapter=\"a0\",status=\"200\"}", "lorakit_serve_prompt_tokens_total",
                 "lorakit_serve_generation_tokens_total", "lorakit_serve_queue_depth",
                 "lorakit_serve_running_batch_size", "lorakit_serve_time_to_first_token_seconds_bucket",
                 "lorakit_serve_inter_token_latency_seconds_bucket", "lorakit_serve_step_batch_size_bucket"):
        assert name in text, name


# ---------------------------------------------------------------------------------------------- failures
def test_unknown_adapter_is_404_listing_the_names(server: Any) -> None:
    with _client(server) as client:
        r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    body = _error(r, 404, "'nope' does not exist", BASE, "a0", "a1", "a2")
    assert body["param"] == "model"
    _still_serves(server)


@pytest.mark.parametrize("payload, field", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"prompt": "x"}, "model"),
    ({"model": "a0"}, "prompt"),
    ({"model": "a0", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "a0", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "a0", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "a0", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "a0", "prompt": "x", "n": 2}, "n"),
    ({"model": "a0", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "a0", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "a0", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "a0", "prompt": [999999]}, "prompt"),
])
def test_malformed_body_or_bad_parameter_is_400_naming_it(server: Any, payload: Any, field: str | None) -> None:
    with _client(server) as client:
        if isinstance(payload, bytes):
            r = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/completions", json=payload)
    body = _error(r, 400, *([f"'{field}'"] if field else ["JSON"]))
    assert body["param"] == field
    _still_serves(server)


def test_chat_bad_messages_is_400(server: Any) -> None:
    with _client(server) as client:
        r = client.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "robot", "content": "x"}]})
    _error(r, 400, "'messages[0]'")
    _still_serves(server)


def test_prompt_plus_max_tokens_over_max_model_len_is_400(server: Any) -> None:
    with _client(server) as client:
        r = client.post("/v1/completions", json={"model": "a0", "prompt": "x" * 100, "max_tokens": 50})
    _error(r, 400, "maximum context length is 128", "max_tokens=50")
    _still_serves(server)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_api_key_is_401_and_health_stays_open(server: Any, headers: dict[str, str]) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "a0", "prompt": "x"}, headers=headers, timeout=30)
    _error(r, 401, "API key")
    assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    _still_serves(server)


def test_client_disconnecting_mid_stream_frees_its_slot(server: Any) -> None:
    with _client(server) as client, client.stream("POST", "/v1/completions", json={
            "model": "a0", "prompt": "long one", "max_tokens": 120, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert httpx.get(f"{server.url}/health", timeout=10).json()["running"] == 1
    # the connection is closed with ~117 tokens to go: the server cancels the request
    health = _wait_idle(server)
    assert health["running"] == 0 and health["free_slots"] == 32 and health["cache_bytes"] == 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'lorakit_serve_finished_total{adapter="a0",reason="cancelled"}' in text
    _still_serves(server)


@pytest.mark.parametrize("path, words", [
    ("{root}/spare/missing", ["no such directory"]),
    ("{root}/spare/notadapter", ["not an adapter directory"]),
    ("{root}/../outside", ["outside the allowed adapter roots"]),
    ("/etc", ["outside the allowed adapter roots"]),
    ("{root}/spare/fingerprint", ["base"]),
    ("{root}/spare/corrupt", ["adapter_model.safetensors"]),
])
def test_bad_adapter_load_is_400_and_the_others_keep_serving(server: Any, http_root: Path, path: str,
                                                             words: list[str]) -> None:
    before = _complete(server, "a2")["choices"][0]["text"]
    with _client(server) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path.format(root=http_root)})
        _error(r, 400, "cannot load adapter 'bad'", *words)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "a0", "a1", "a2"]
    assert _complete(server, "a2")["choices"][0]["text"] == before
    _still_serves(server)


def test_load_and_unload_during_traffic(server: Any, http_root: Path) -> None:
    """Streams on a0–a2 keep running while a3 is loaded, used, and unloaded with a request still on it:
    that request finishes (unload waits for in-flight requests), new ones get 404."""
    results: dict[str, str] = {}
    expected = {name: _complete(server, name, "traffic", max_tokens=40)["choices"][0]["text"]
                for name in ("a0", "a1", "a2")}

    def stream(name: str, key: str, max_tokens: int = 40) -> None:
        with _client(server) as client, client.stream("POST", "/v1/completions", json={
                "model": name, "prompt": "traffic", "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
            results[key] = text

    threads = [threading.Thread(target=stream, args=(n, n)) for n in ("a0", "a1", "a2")]
    for t in threads:
        t.start()
    with _client(server) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(http_root / "spare/a3")})
        assert r.status_code == 200, r.text
        solo = _complete(server, "a3", "traffic", max_tokens=60)["choices"][0]["text"]
        late = threading.Thread(target=stream, args=("a3", "a3", 60))
        late.start()
        deadline = time.monotonic() + 30
        while server.engine.registry.in_flight("a3") == 0 and "a3" not in results and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "a3"})
        assert r.status_code == 200 and r.json()["status"] == "unloaded"
        _error(client.post("/v1/completions", json={"model": "a3", "prompt": "x"}), 404, "'a3' does not exist")
        _error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}), 404, "'a3' does not exist")
    for t in [*threads, late]:
        t.join(timeout=120)
    assert results["a3"] == solo
    assert {n: results[n] for n in expected} == expected
    _wait_idle(server)
    server.engine.call(lambda: None).result(timeout=30)
    assert "a3" not in server.engine.registry.loaded_names()
    _still_serves(server)


def test_queue_full_is_429(serve_dirs: tuple[Path, Path]) -> None:
    from lorakit.serve.options import ServeOptions, build
    from lorakit.serve.server import ServerThread

    app, engine = build(ServeOptions(model=serve_dirs[0], max_queue=1, port=0))
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=60) as client:
        gate = threading.Event()
        engine.call(gate.wait)  # hold the worker between two steps: nothing leaves the queue meanwhile
        waiting = threading.Thread(target=client.post, args=("/v1/completions",),
                                   kwargs={"json": {"model": BASE, "prompt": "wait", "max_tokens": 2}})
        waiting.start()
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["waiting"] == 1
        r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        _error(r, 429, "--max-queue=1")
        gate.set()
        waiting.join(timeout=60)
        r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
