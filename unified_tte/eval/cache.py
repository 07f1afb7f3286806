"""The embedding cache of `tte eval --cache-dir DIR`: embeddings (and the traces of thought-about
queries) per (model hash, task, item), so an interrupted evaluation resumes without recomputing.

    cache = EmbeddingCache(DIR, model_key(model), "MSR-VTT")
    hit = cache.get(keys)            # {key: (vector, trace)} for the keys already computed
    cache.put(keys, vectors, traces) # one global batch, written atomically

Layout: DIR/<model hash>/<task>/<batch hash>.npz, one file per computed global batch holding
its item keys, fp32 vectors and traces. A file is written to a temporary name, flushed to disk
and renamed, so a process killed mid-write (SIGKILL included) leaves either the whole batch or
no file (stray `*.tmp` files are ignored and cleaned): what is read back is always complete.
Batches are fixed by the task and the batch size, so a resumed run recomputes exactly the
batches that are missing, with the same composition, and gives bit-identical embeddings.
Several ranks write to one task folder at once without conflict (distinct batch files).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np


def model_key(model) -> str | None:
    """A hash of everything that decides a model's embeddings: base weights, adapter weights,
    config (mode, pooling, prompt format, image sizes). A duck-typed model may carry its own
    `cache_key`; None (no cache) when neither is known."""
    key = getattr(model, "cache_key", None)
    if key is not None:
        return str(key)
    peft_model = getattr(model, "peft_model", None)
    if peft_model is None:
        return None
    from ..model.backbones import weight_hash

    h = hashlib.sha256(weight_hash(peft_model).encode())
    for name, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    gate = getattr(model, "gate", None)   # a think gate decides which queries get a trace
    if gate is not None:
        for t in (gate.weight, gate.bias, gate.mean, gate.std):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(gate.info.get("operating_points"), sort_keys=True).encode())
    enc = model.encoder   # its image and video settings may be overridden after loading
    h.update(repr((enc.max_pixels, enc.min_pixels, enc.max_frames, enc.fps, enc.prompt_format)).encode())
    return h.hexdigest()[:24]


class MemoryCache:
    """EmbeddingCache's interface in memory, for candidate embeddings only: evaluating one model
    twice (say with its own traces, then with given ones) embeds each distinct candidate once.
    Keys are the items' content digests, so one memo serves one model."""

    def __init__(self):
        self.items: dict[str, tuple[np.ndarray, str]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, keys: list[str]) -> dict[str, tuple[np.ndarray, str]]:
        return {k: self.items[k] for k in keys if k in self.items}

    def put(self, keys: list[str], vectors: np.ndarray, traces: list[str]) -> None:
        for k, v, t in zip(keys, vectors, traces):
            self.items[k] = (np.asarray(v, dtype=np.float32), t)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


class EmbeddingCache:
    """One (model, task) folder of the cache (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, model_hash: str, task: str):
        self.folder = Path(root) / _safe(model_hash) / _safe(task)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._items: dict[str, tuple[np.ndarray, str]] | None = None

    def _load(self) -> dict[str, tuple[np.ndarray, str]]:
        if self._items is None:
            self._items = {}
            for f in sorted(self.folder.glob("*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    for k, v, t in zip(z["keys"].tolist(), z["vectors"], z["traces"].tolist()):
                        self._items[k] = (v, t)
        return self._items

    def __len__(self) -> int:
        return len(self._load())

    def get(self, keys: list[str]) -> dict[str, tuple[np.ndarray, str]]:
        items = self._load()
        return {k: items[k] for k in keys if k in items}

    def put(self, keys: list[str], vectors: np.ndarray, traces: list[str]) -> None:
        name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
        final = self.folder / f"{name}.npz"
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys), vectors=np.asarray(vectors, dtype=np.float32),
                     traces=np.array(list(traces), dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        items = self._load()
        for k, v, t in zip(keys, vectors, traces):
            items[k] = (np.asarray(v, dtype=np.float32), t)

    def clean(self) -> None:
        """Remove temporary files a killed writer left."""
        for f in self.folder.glob("*.tmp"):
            f.unlink(missing_ok=True)
