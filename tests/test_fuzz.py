"""Fuzzing (hypothesis) of the adapter loader and the config parser: only clean errors, no crash, no hang,
bounded memory.

Inputs: adapter weights files that are random bytes, truncated, bit-flipped, or carry a generated header
(unknown/wrong dtypes, huge or negative shapes and offsets, gaps, overlaps, metadata of the wrong type);
adapter_config.json files that are random bytes, random JSON, a valid config with a key set to random JSON,
or deeply nested; and ``LoraConfig.from_dict`` / ``LoraConfig(**kwargs)`` with random JSON-like values.
They go through ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` (into a model that already holds
an adapter) and ``load_adapter_weights``.

Contract for every input: success, or ``ValueError`` / ``TypeError`` / ``OSError`` (``FileNotFoundError``
…); any other exception is a crash and fails the test. On error the model is unchanged. Each input gets
``HANG_SECONDS`` (a hard SIGALRM timeout, not hypothesis's soft deadline), and the process's peak RSS may
not grow by more than ``MEMORY_BUDGET_MB`` over the whole run — a header declaring a 1 TB tensor must be
refused before anything is allocated.

Budget: ``LORAKIT_FUZZ_EXAMPLES`` inputs in total (default 400, split over the tests by weight). The full
run (see docs/hardening.md):

    LORAKIT_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/test_fuzz.py -q -s -p no:cacheprovider

prints inputs, outcomes, crashes, peak RSS and time; ``LORAKIT_FUZZ_REPORT=path.json`` also writes them.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lorakit import LoraConfig, LorakitWarning, PeftModel, get_peft_model, load_adapter_weights

TOTAL = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "400"))
HANG_SECONDS = 10
MEMORY_BUDGET_MB = 512
LOADER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)
"""What the loaders document: ValueError (bad file), FileNotFoundError and other OSError (I/O)."""

# Share of the budget per test (they sum to 1).
WEIGHTS = {"weights_file": 0.35, "config_file": 0.25, "raw_weights": 0.15, "config_parser": 0.25}


def budget(name: str) -> int:
    return max(10, round(TOTAL * WEIGHTS[name]))


def fuzz_settings(name: str) -> settings:
    return settings(max_examples=budget(name), deadline=None, database=None, derandomize=TOTAL <= 1000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------------ bookkeeping
STATS: dict[str, Any] = {"inputs": 0, "crashes": 0, "outcomes": Counter(), "slowest_s": 0.0}


class Hang(BaseException):
    """Raised by SIGALRM inside an input that ran longer than HANG_SECONDS (never caught as a clean error)."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"an input ran longer than {HANG_SECONDS} s")


def run_one(kind: str, call: Callable[[], object], allowed: tuple[type[Exception], ...] = LOADER_ERRORS,
            check: Callable[[Exception], bool] = lambda exc: True) -> str:
    """Run one fuzz input: returns "ok" or the clean exception's type name; any other exception (or one that
    fails ``check``) propagates and fails the test."""
    STATS["inputs"] += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LorakitWarning)  # "ignoring config entries …" is fine here
            call()
        outcome = "ok"
    except allowed as exc:
        if not check(exc):
            STATS["crashes"] += 1
            raise
        outcome = type(exc).__name__
    except BaseException:
        STATS["crashes"] += 1
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        STATS["slowest_s"] = max(STATS["slowest_s"], time.perf_counter() - start)
    STATS["outcomes"][f"{kind}: {outcome}"] += 1
    return outcome


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    start, rss_before = time.perf_counter(), peak_rss_mb()
    yield
    summary = {"inputs": STATS["inputs"], "crashes": STATS["crashes"], "outcomes": dict(STATS["outcomes"]),
               "peak_rss_mb": round(peak_rss_mb(), 1), "rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
               "slowest_input_s": round(STATS["slowest_s"], 3), "seconds": round(time.perf_counter() - start, 1)}
    print(f"\nfuzz summary: {json.dumps(summary)}")
    if os.environ.get("LORAKIT_FUZZ_REPORT"):
        Path(os.environ["LORAKIT_FUZZ_REPORT"]).write_text(json.dumps(summary, indent=2) + "\n")
    assert summary["rss_growth_mb"] < MEMORY_BUDGET_MB, summary


# ------------------------------------------------------------------------------------------------ the model
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.emb(ids))))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


BASE = _base()
CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "proj", "out"], bias="lora_only")


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(weights bytes, config bytes) of a valid lorakit adapter for ``Tiny``."""
    directory = tmp_path_factory.mktemp("valid")
    peft = get_peft_model(copy.deepcopy(BASE), CONFIG)
    with torch.no_grad():
        for param in peft.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    peft.save_pretrained(directory)
    return (directory / "adapter_model.safetensors").read_bytes(), (directory / "adapter_config.json").read_bytes()


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[type], list[bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[type], list[bool]]) -> bool:
    state, kinds, grads = _snapshot(model)
    return (state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
            and kinds == before[1] and grads == before[2])


def load_both_ways(directory: Path, into_host: bool) -> None:
    """from_pretrained into a fresh base, or load_adapter into a PeftModel that holds another adapter; on a
    clean error the model must be exactly as before."""
    model: nn.Module = (get_peft_model(copy.deepcopy(BASE), LoraConfig(r=1, target_modules=["proj"])) if into_host
                        else copy.deepcopy(BASE))
    before = _snapshot(model)

    def call() -> object:
        if into_host:
            return model.load_adapter(directory, "fuzzed")  # type: ignore[operator]
        return PeftModel.from_pretrained(model, directory)

    if run_one("into a PeftModel" if into_host else "from_pretrained", call) != "ok":
        assert _unchanged(model, before), "a failed load changed the model"
        if into_host:
            assert list(model.peft_config) == ["default"]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ strategies
json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
SAFETENSORS_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                      "F64", "I64", "U64", "C64", "F4", "F6_E2M3"]
sizes = st.integers(min_value=0, max_value=16) | st.sampled_from([-1, 2**31, 2**40, 2**62, 2**64 + 1])


@st.composite
def generated_header(draw: st.DrawFn, keys: list[str]) -> bytes:
    """A header built from scratch: real or junk keys, any dtype, shapes and offsets small, huge or negative,
    metadata of any type; the data section has a random length."""
    header: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(keys) | st.text(max_size=20), max_size=4)):
        entry: Any = {"dtype": draw(st.sampled_from(SAFETENSORS_DTYPES) | st.text(max_size=6)),
                      "shape": draw(st.lists(sizes, max_size=3)),
                      "data_offsets": draw(st.lists(sizes, min_size=0, max_size=3))}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_values)
        header[key] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=30), st.text(max_size=30), max_size=3)
                                      | json_values)
    raw = json.dumps(header).encode()
    declared = draw(st.just(len(raw)) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", declared) + raw + draw(st.binary(max_size=300))


@st.composite
def weights_files(draw: st.DrawFn, valid: bytes) -> bytes:
    header_size = struct.unpack("<Q", valid[:8])[0]
    keys = list(json.loads(valid[8:8 + header_size]))
    kind = draw(st.sampled_from(["random", "truncated", "bit flips", "header flips", "generated header",
                                 "header value"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "truncated":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind in ("bit flips", "header flips"):
        data = bytearray(valid)
        end = 8 + header_size if kind == "header flips" else len(data)
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, end - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "generated header":
        return draw(generated_header(keys))
    # one field of the real header replaced by a random JSON value (wrong types, huge numbers …)
    header = json.loads(valid[8:8 + header_size])
    key = draw(st.sampled_from(sorted(header)))
    if key == "__metadata__" or draw(st.booleans()):
        header[key] = draw(json_values)
    else:
        header[key][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values | st.lists(sizes))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + valid[8 + header_size:]


@st.composite
def config_files(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["random bytes", "random json", "field", "deep nesting", "extra keys"]))
    if kind == "random bytes":
        return draw(st.binary(max_size=512))
    if kind == "random json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep nesting":
        depth = draw(st.integers(1, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    config = json.loads(valid)
    if kind == "field":
        for _ in range(draw(st.integers(1, 3))):
            config[draw(st.sampled_from(sorted(config)))] = draw(json_values)
    else:
        config.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
    return json.dumps(config).encode()


# ------------------------------------------------------------------------------------------------ the tests
def _write_adapter(directory: Path, weights: bytes, config: bytes) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_bytes(config)
    return directory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz_settings("weights_file")
@given(data=st.data(), into_host=st.booleans())
def test_fuzz_weights_file(valid: tuple[bytes, bytes], workdir: Path, data: st.DataObject, into_host: bool) -> None:
    weights = data.draw(weights_files(valid[0]))
    load_both_ways(_write_adapter(workdir / "weights", weights, valid[1]), into_host)


@fuzz_settings("config_file")
@given(data=st.data(), into_host=st.booleans())
def test_fuzz_config_file(valid: tuple[bytes, bytes], workdir: Path, data: st.DataObject, into_host: bool) -> None:
    config = data.draw(config_files(valid[1]))
    load_both_ways(_write_adapter(workdir / "config", valid[0], config), into_host)


@fuzz_settings("raw_weights")
@given(data=st.data())
def test_fuzz_load_adapter_weights(valid: tuple[bytes, bytes], workdir: Path, data: st.DataObject) -> None:
    path = workdir / "raw.safetensors"
    path.write_bytes(data.draw(weights_files(valid[0])))
    run_one("load_adapter_weights", lambda: load_adapter_weights(path))


CONFIG_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
                 "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "use_rslora", "init_lora_weights",
                 "modules_to_save", "fan_in_fan_out", "task_type", "base_model_name_or_path", "inference_mode",
                 "peft_type", "use_dora", "loftq_config", "revision"]


config_values = json_values | st.sets(st.text(max_size=5), max_size=3) | st.sampled_from(
    ["(", "[a-", ".*", "none", "all", "lora_only", "gaussian", "pissa", "CAUSAL_LM", "LORA", "all-linear"])


@fuzz_settings("config_parser")
@given(fields=st.dictionaries(st.sampled_from(CONFIG_FIELDS), config_values, max_size=6),
       unknown=st.dictionaries(st.text(max_size=8), json_values, max_size=2), via_dict=st.booleans())
def test_fuzz_config_parser(fields: dict[str, Any], unknown: dict[str, Any], via_dict: bool) -> None:
    fields.setdefault("target_modules", ["proj"])
    if via_dict or len(unknown) == 1:  # unknown keywords in some calls only (each is a TypeError at once)
        fields = {**unknown, **fields}
    if via_dict:
        run_one("LoraConfig.from_dict", lambda: LoraConfig.from_dict(fields), (ValueError,))
    else:
        # TypeError only for what Python itself says about an unknown keyword; the rest must be ValueError.
        run_one("LoraConfig(**kwargs)", lambda: LoraConfig(**fields), (ValueError, TypeError),
                lambda exc: not isinstance(exc, TypeError) or "unexpected keyword argument" in str(exc))


def test_a_terabyte_header_is_refused_before_anything_is_mapped(valid: tuple[bytes, bytes], workdir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A header that declares a 1 TiB float32 tensor in a file of a few hundred bytes: lorakit compares the
    declared sizes with the file size before safetensors opens the file, so memory does not move."""
    import lorakit.io as lorakit_io

    def must_not_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors opened a file whose header lorakit should have refused")

    monkeypatch.setattr(lorakit_io, "safe_open", must_not_open)
    header = json.dumps({"base_model.model.proj.lora_A.weight": {"dtype": "F32", "shape": [2**18, 2**20],
                                                                 "data_offsets": [0, 2**40]}}).encode()
    directory = _write_adapter(workdir / "terabyte", struct.pack("<Q", len(header)) + header + bytes(256), valid[1])
    rss = peak_rss_mb()
    with pytest.raises(ValueError, match=r"claims bytes 0\.\.1099511627776 of the data, but the file holds only 256"):
        PeftModel.from_pretrained(copy.deepcopy(BASE), directory)
    with pytest.raises(ValueError, match=r"claims bytes 0\.\.1099511627776"):
        load_adapter_weights(directory)
    assert peak_rss_mb() - rss < 50
