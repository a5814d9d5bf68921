"""The models an inference worker holds: one vLLM server each, within a memory budget.

A model costs its weights' bytes, its KV cache and a fixed overhead for the server's processes.
Loading one that does not fit unloads the least recently used models that are not loading
themselves; one that could never fit is refused. A model held at an older version (a run's
earlier weights) has the newer weights swapped in place; one whose server died is started again.
Loads of different models go on side by side; one model loads once, however many ask.
"""

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.contract import storage
from workers.serving.vllm_server import ServerFailed, ServerOptions, VLLMServer

GIB = 2**30
SERVER_OVERHEAD_BYTES = GIB  # vLLM's API and engine processes, before weights and KV cache
WEIGHT_FILES = ("*.safetensors", "*.bin")


class DoesNotFit(RuntimeError):
    """The model cannot be loaded within the budget (now, or ever); the message says which."""


class ModelFilesMissing(RuntimeError):
    """The model's folder is not there (or holds no weights)."""


@dataclass
class Held:
    name: str
    version: int
    server: VLLMServer
    bytes: int
    last_used: float = field(default_factory=time.monotonic)
    loading: bool = True

    def describe(self) -> dict:
        return {
            "model": self.name,
            "version": self.version,
            "url": self.server.url,
            "bytes": self.bytes,
            "loading": self.loading,
        }


class ModelPool:
    def __init__(
        self,
        budget_bytes: int,
        options: ServerOptions,
        cache: Path,
        load_timeout: float,
        server_class: type[VLLMServer] = VLLMServer,
    ) -> None:
        self.budget, self.options, self.cache = budget_bytes, options, cache
        self.load_timeout, self.server_class = load_timeout, server_class
        self.held: dict[str, Held] = {}
        self.lock = threading.Lock()  # guards `held` and the per-model locks
        self.loads: dict[str, threading.Lock] = {}

    def models(self) -> list[dict]:
        with self.lock:
            return [h.describe() for h in self.held.values()]

    def used(self) -> int:
        with self.lock:
            return sum(h.bytes for h in self.held.values())

    def ensure(self, name: str, path: str, version: int) -> dict:
        """The model `name` served at `version` (or newer) from the folder `path`; loads,
        reloads or restarts it as needed. DoesNotFit, ModelFilesMissing or ServerFailed."""
        with self.lock:
            load_lock = self.loads.setdefault(name, threading.Lock())
        with load_lock:
            with self.lock:
                held = self.held.get(name)
            if held is not None and not held.server.alive():
                self.unload(name)
                held = None
            if held is not None:
                if version > held.version:
                    self._reload(held, path, version)
                held.last_used = time.monotonic()
                return held.describe()
            return self._load(name, path, version)

    def _load(self, name: str, path: str, version: int) -> dict:
        local = self._local(name, path, version)
        need = weights_bytes(local) + self.options.kv_cache_bytes + SERVER_OVERHEAD_BYTES
        server = self.server_class(name, local, self.options, need)
        held = Held(name, version, server, need)
        self._make_room(held)
        try:
            server.start(self.load_timeout)
        except BaseException:
            with self.lock:
                self.held.pop(name, None)
            server.stop()
            raise
        held.loading = False
        held.last_used = time.monotonic()
        return held.describe()

    def _reload(self, held: Held, path: str, version: int) -> None:
        local = self._local(held.name, path, version)
        old = held.server.path
        try:
            held.server.reload(local)
        except ServerFailed:
            self.unload(held.name)  # half-swapped weights: never serve them
            raise
        held.version = version
        if old != local and old.is_relative_to(self.cache):
            shutil.rmtree(old, ignore_errors=True)

    def _make_room(self, held: Held) -> None:
        """Reserve `held`'s bytes, unloading least recently used idle models to make room."""
        evict = []
        with self.lock:
            if held.bytes > self.budget:
                raise DoesNotFit(
                    f"{held.name} needs {held.bytes / GIB:.1f} GiB (weights, KV cache and "
                    f"server) and this inference worker's budget is {self.budget / GIB:.1f} GiB "
                    "(GVPO_SERVE_MEMORY_GIB)"
                )
            used = sum(h.bytes for h in self.held.values())
            for other in sorted(self.held.values(), key=lambda h: h.last_used):
                if used + held.bytes <= self.budget:
                    break
                if not other.loading:
                    evict.append(other)
                    used -= other.bytes
            if used + held.bytes > self.budget:
                raise DoesNotFit(
                    f"{held.name} does not fit beside the models loading now on this "
                    "inference worker; try again when they are loaded"
                )
            for other in evict:
                del self.held[other.name]
            self.held[held.name] = held
        for other in evict:
            other.server.stop()
            self._forget(other)

    def _local(self, name: str, path: str, version: int) -> Path:
        """The model's folder on this machine: a store's is downloaded into the cache."""
        if storage.is_remote(path):
            target = self.cache / f"{name}-{version}"
            if not target.exists():
                storage.download(path, target)
            return target
        local = Path(path)
        if not local.is_dir() or not weights_bytes(local):
            raise ModelFilesMissing(f"the weights of {name} are no longer there")
        return local

    def unload(self, name: str) -> bool:
        with self.lock:
            held = self.held.pop(name, None)
        if held is None:
            return False
        held.server.stop()
        self._forget(held)
        return True

    def _forget(self, held: Held) -> None:
        if held.server.path.is_relative_to(self.cache):
            shutil.rmtree(held.server.path, ignore_errors=True)

    def close(self) -> None:
        """Stop every server, side by side."""
        with self.lock:
            held, self.held = list(self.held.values()), {}
        stopping = [threading.Thread(target=h.server.stop) for h in held]
        for thread in stopping:
            thread.start()
        for thread, h in zip(stopping, held, strict=True):
            thread.join()
            self._forget(h)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in folder.glob(pattern))
