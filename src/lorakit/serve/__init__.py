"""`lorakit serve`: one base model, many LoRA adapters, an OpenAI-compatible HTTP endpoint.

Rooms (one concept each): ``kv_cache`` (per-sequence caches and the attention over them), ``sampling``
(per-request decoding and stop strings), ``registry`` (known/loaded adapters, LRU, path checks),
``engine`` (the continuous-batching scheduler; no HTTP), ``metrics`` (Prometheus), ``protocol`` (OpenAI
request/response shapes), ``app`` (the routes: parse, validate, hand over), ``options`` (the flags, and
building the app from them), ``server`` (uvicorn in a thread, for tests and benchmarks).
See docs/serving.md.
"""
