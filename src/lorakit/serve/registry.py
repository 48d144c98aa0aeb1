"""The adapter registry: which adapters the server knows, which are loaded into the model, which are in use.

Two layers of state:

* **known** adapters: name → directory. ``/v1/models`` lists these; a request naming another → 404.
  Registering checks the path (inside an allowed root, a directory holding ``adapter_config.json``).
* **loaded** adapters: the ones whose factors sit in the ``PeftModel`` now, in least-recently-used order.
  With ``max_loaded`` set, loading one more evicts the least recently used adapter that no running
  sequence uses; an evicted adapter stays known and is loaded again, from its directory, on demand.

Loading goes through lorakit's own loader (``PeftModel.from_pretrained`` / ``load_adapter``), which checks
everything — config, every key and shape, the base-model fingerprint — before touching the model, so a bad
adapter is refused with a ``ValueError``/``FileNotFoundError`` and the model keeps serving the others.

Threading: the methods that change the model (``load``, ``ensure_loaded``, ``collect``) run only on the
engine's worker thread, between steps. ``lookup``/``names``/``acquire``/``release``/``unregister`` may be
called from any thread; a lock guards the dictionaries (held for microseconds, never across a forward).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..io import CONFIG_NAME
from ..model import PeftModel, validate_adapter_name


class UnknownAdapterError(LookupError):
    """A request or unload named an adapter the server does not know (HTTP 404)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"the model {name!r} does not exist; available: {known}")
        self.name = name
        self.known = known


class AdapterRegistry:
    """Known and loaded adapters of one base model (see the module docstring).

    Args:
        model: the base causal LM (no adapters yet); it becomes a ``PeftModel`` on the first load.
        roots: directories runtime loads may read from (resolved; symbolic links followed before the check).
        max_loaded: most adapters loaded at once (None: no limit).
    """

    def __init__(self, model: Any, roots: list[Path] | None = None, max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"--max-loaded-adapters={max_loaded} must be at least 1.")
        self.base = model
        self.peft: PeftModel | None = None
        self.roots = [Path(r).resolve() for r in roots or []]
        self.max_loaded = max_loaded
        self._known: dict[str, Path] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()  # LRU order: first = least recently used
        self._refs: dict[str, int] = {}  # requests accepted and not finished, per adapter
        self._running: dict[str, int] = {}  # sequences in the running batch, per adapter
        self._draining: dict[str, Path] = {}  # unregistered, still referenced: deleted when refs reach 0
        self._lock = threading.Lock()
        self.loads = 0  # loads done (a reload after eviction counts), for tests and metrics
        self.evictions = 0

    @property
    def model(self) -> Any:
        """What the engine runs: the PeftModel once an adapter is loaded, else the base model."""
        return self.peft if self.peft is not None else self.base

    # ------------------------------------------------------------------ names (any thread)
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._known)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def lookup(self, name: str) -> None:
        """Raise ``UnknownAdapterError`` unless ``name`` is a known adapter."""
        with self._lock:
            if name not in self._known:
                raise UnknownAdapterError(name, sorted(self._known))

    def acquire(self, name: str) -> None:
        """Count one more request on ``name`` (checked known), so an unload waits for it."""
        with self._lock:
            if name not in self._known:
                raise UnknownAdapterError(name, sorted(self._known))
            self._refs[name] = self._refs.get(name, 0) + 1

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1

    def in_flight(self, name: str) -> int:
        with self._lock:
            return self._refs.get(name, 0)

    # ------------------------------------------------------------------ paths
    def check_path(self, path: str | os.PathLike[str], restrict: bool = True) -> Path:
        """The resolved adapter directory, after checking it is one and (``restrict``) lies in a root.

        Raises:
            ValueError: outside every allowed root, or not an adapter directory.
            FileNotFoundError: no such directory.
        """
        resolved = Path(os.fspath(path)).expanduser().resolve()
        if restrict:
            if not self.roots:
                raise ValueError("loading adapters at run time needs an allowed root: start the server with "
                                 "--adapter-dir DIR and load adapters from inside DIR.")
            if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
                raise ValueError(f"lora_path {str(path)!r} resolves to {resolved}, outside the allowed adapter "
                                 f"roots {[str(r) for r in self.roots]}; put the adapter inside one of them.")
        if not resolved.exists():
            raise FileNotFoundError(f"lora_path {str(path)!r}: no such directory.")
        if not resolved.is_dir() or not (resolved / CONFIG_NAME).is_file():
            raise ValueError(f"lora_path {str(path)!r} is not an adapter directory (no {CONFIG_NAME} in it); "
                             "pass the directory save_pretrained wrote.")
        return resolved

    def register(self, name: str, path: Path) -> None:
        """Make ``name`` known (path already checked); not loaded yet."""
        validate_adapter_name(name)
        with self._lock:
            if name in self._known:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another "
                                 "lora_name.")
            if name in self._draining:
                raise ValueError(f"adapter {name!r} is being unloaded ({self._refs.get(name, 0)} requests still "
                                 "running); retry when they have finished.")
            self._known[name] = path
            self._refs.setdefault(name, 0)

    def unregister(self, name: str) -> int:
        """Forget ``name`` for new requests; its weights go once its in-flight requests finish (``collect``).

        Returns the number of requests still in flight on it.
        """
        with self._lock:
            if name not in self._known:
                raise UnknownAdapterError(name, sorted(self._known))
            self._draining[name] = self._known.pop(name)
            return self._refs.get(name, 0)

    # ------------------------------------------------------------------ the model (worker thread only)
    def load(self, name: str, path: Path) -> None:
        """Register ``name`` and load it now (evicting if needed). On any error nothing is changed."""
        self.register(name, path)
        try:
            self._load_into_model(name, path)
        except BaseException:
            with self._lock:
                del self._known[name]
            raise

    def ensure_loaded(self, name: str, keep: set[str]) -> bool:
        """Make ``name`` loaded (most recently used). False if the limit is reached and every loaded adapter
        is running or in ``keep`` (the caller retries after a sequence finishes)."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return True
            path = self._known.get(name) or self._draining.get(name)  # unloaded while queued: still served
            if path is None:
                raise UnknownAdapterError(name, sorted(self._known))
        if self.max_loaded is not None and len(self._loaded) >= self.max_loaded and not self._evict(keep | {name}):
            return False
        self._load_into_model(name, path)
        return True

    def start_running(self, name: str) -> None:
        with self._lock:
            self._running[name] = self._running.get(name, 0) + 1

    def stop_running(self, name: str) -> None:
        with self._lock:
            self._running[name] -= 1

    def collect(self) -> None:
        """Delete draining adapters that no request uses any more."""
        with self._lock:
            done = [n for n in self._draining if self._refs.get(n, 0) == 0]
        for name in done:
            if name in self._loaded:
                self._delete_from_model(name)
            with self._lock:
                self._draining.pop(name, None)
                self._refs.pop(name, None)

    def _evict(self, keep: set[str]) -> bool:
        with self._lock:
            victim = next((n for n in self._loaded if n not in keep and not self._running.get(n)), None)
        if victim is None:
            return False
        self._delete_from_model(victim)
        self.evictions += 1
        return True

    def _load_into_model(self, name: str, path: Path) -> None:
        if self.max_loaded is not None and len(self._loaded) >= self.max_loaded and not self._evict({name}):
            raise ValueError(f"cannot load adapter {name!r}: {len(self._loaded)} adapters are loaded "
                             f"(--max-loaded-adapters={self.max_loaded}) and all are serving requests; retry later.")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        else:
            self.peft.load_adapter(path, adapter_name=name)
        with self._lock:
            self._loaded[name] = None
        self.loads += 1

    def _delete_from_model(self, name: str) -> None:
        assert self.peft is not None  # invariant: an adapter is loaded only into a PeftModel
        if len(self.peft.peft_config) == 1:
            self.peft.unload()  # the last adapter: back to the plain base model (weights untouched)
            self.peft = None
        else:
            self.peft.delete_adapter(name)
        with self._lock:
            self._loaded.pop(name, None)
