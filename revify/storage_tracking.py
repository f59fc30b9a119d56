"""Which tensor storages a step saves for backward, and which are alive at its peak.

Two observers, both keyed by storage identity so that views of one buffer count once and
parameters and buffers (alive regardless of the plan) are left out: ``SavedBytes``, the pack
function of ``saved_tensors_hooks`` (what autograd keeps, attributed to the innermost block that
saved it), and ``LiveStorageTracker``, a ``TorchDispatchMode`` that sees every new storage of
forward and backward and when it dies. ``measure`` runs them around a step; the planner's
profiles and capture's call recorder use them directly.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("activations", "temporaries", "gradients")
"""Categories of the bytes created during a step (parameters are counted apart)."""


def storage_key(t: torch.Tensor) -> int | None:
    """Identity of a tensor's storage: the same for all its views, for real, meta and fake tensors.

    Not ``data_ptr()``: fake and meta storages have none.
    """
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensor subclasses / sparse tensors without storage
        return None


def persistent_storage_keys(model: Any) -> set[int]:
    """Storage keys of the model's parameters and buffers."""
    keys: set[int] = set()
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            k = storage_key(t)
            if k is not None:
                keys.add(k)
    return keys


def parameter_bytes(model: Any) -> int:
    """Bytes of the distinct storages of ``model``'s parameters and buffers (tied weights once)."""
    sizes: dict[int, int] = {}
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            k = storage_key(t)
            if k is not None:
                sizes[k] = t.untyped_storage().nbytes()
    return sum(sizes.values())


class SavedBytes:
    """``saved_tensors_hooks`` pack function: distinct non-parameter storages, by block."""

    def __init__(self, model: Any, block_paths: Sequence[str] = ()) -> None:
        self.persistent = persistent_storage_keys(model)
        self.seen: dict[int, tuple[int, str]] = {}
        self.stack: list[str] = []
        self.handles: list[Any] = []
        if block_paths and isinstance(model, torch.nn.Module):
            for path in dict.fromkeys(block_paths):
                module = model.get_submodule(path)
                self.handles.append(module.register_forward_pre_hook(self._enter(path)))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, path: str) -> Callable:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(path)
        return hook

    def _leave(self, module: Any, args: Any, output: Any) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is None or key in self.persistent or key in self.seen:
            return t
        self.seen[key] = (t.untyped_storage().nbytes(), self.stack[-1] if self.stack else "")
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.seen.values())

    def by_block(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, path in self.seen.values():
            out[path] = out.get(path, 0) + n
        return out


class AllocatorPeaks:
    """The CUDA caching allocator's count (what ``max_memory_allocated`` reports), phase by phase.

    ``start`` takes what is allocated now as the base; each ``read`` returns the bytes allocated and the
    peak since the previous read (or ``start``), both above the base, and starts the next phase's peak.
    Kernel scratch that is no op's output shows here and not in ``LiveStorageTracker``; the planner's
    profiles and ``bench/peak_timeline.py`` read both.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        live = torch.cuda.memory_allocated(self.device) - self.base
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        torch.cuda.reset_peak_memory_stats(self.device)
        return live, peak


class LiveStorageTracker(TorchDispatchMode):
    """Track live bytes of tensor storages created while the mode is active.

    Every output of every aten op is inspected; a storage that is not one of
    the op's input storages is new, and its bytes are added to ``live_bytes``
    until the storage is freed (a weak reference on the ``UntypedStorage``
    Python object, which PyTorch keeps alive exactly as long as the C++
    storage, fires on free).  ``peak_bytes`` is the maximum of ``live_bytes``.
    Storages alive before the tracker started are the baseline and are not
    counted.  Backward ops run by the autograd engine are seen too.

    Each storage gets a category when it is created: ``"activations"`` while
    ``phase == "forward"`` or while grad mode is on in backward (checkpoint
    and reversible recomputation), ``"temporaries"`` otherwise;
    :meth:`mark_gradient` moves a parameter's ``.grad`` to ``"gradients"``.
    ``peak_by_category`` is the split at the moment of the peak. With
    ``record_series`` the live bytes per category are appended to ``series``
    after every new storage (zero-byte ones included, so runs of one model at
    different sizes produce series of the same length).
    """

    def __init__(self, record_series: bool = False) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_allocated_bytes = 0
        self.phase = "forward"
        self.live_by_category = dict.fromkeys(CATEGORIES, 0)
        self.peak_by_category = dict.fromkeys(CATEGORIES, 0)
        self.series: list[tuple[int, int, int]] | None = [] if record_series else None
        self._refs: dict[int, tuple[weakref.ref, int, str]] = {}
        self._lock = threading.RLock()

    def _on_free(self, key: int) -> None:
        with self._lock:
            entry = self._refs.pop(key, None)
            if entry is not None:
                self.live_bytes -= entry[1]
                self.live_by_category[entry[2]] -= entry[1]

    def _category(self) -> str:
        return "activations" if self.phase == "forward" or torch.is_grad_enabled() else "temporaries"

    def _record(self) -> None:
        if self.series is not None:
            c = self.live_by_category
            self.series.append((c["activations"], c["temporaries"], c["gradients"]))

    def _track(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        nbytes = st.nbytes()
        if nbytes == 0:
            self._record()
            return
        with self._lock:
            if key in self._refs:
                return
            category = self._category()
            ref = weakref.ref(st, lambda _r, k=key: self._on_free(k))
            self._refs[key] = (ref, nbytes, category)
            self.live_bytes += nbytes
            self.live_by_category[category] += nbytes
            self.total_allocated_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self.peak_by_category = dict(self.live_by_category)
            self._record()

    def mark_gradient(self, t: torch.Tensor) -> None:
        """Count the storage of ``t`` (a parameter's new ``.grad``) as gradients from now on."""
        try:
            key = id(t.untyped_storage())
        except Exception:
            return
        with self._lock:
            entry = self._refs.get(key)
            if entry is not None and entry[2] != "gradients":
                self._refs[key] = (entry[0], entry[1], "gradients")
                self.live_by_category[entry[2]] -= entry[1]
                self.live_by_category["gradients"] += entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_flat, _ = tree_flatten((args, kwargs))
        in_keys = set()
        for a in in_flat:
            if isinstance(a, torch.Tensor):
                k = storage_key(a)
                if k is not None:
                    in_keys.add(k)
        out_flat, _ = tree_flatten(out)
        for o in out_flat:
            if not isinstance(o, torch.Tensor):
                continue
            try:
                st = o.untyped_storage()
            except Exception:
                continue
            if st._cdata in in_keys:
                continue  # view / in-place / out= result: not a new storage
            try:
                self._track(st)
            except TypeError:  # storage not weak-referenceable: cannot track
                continue
        return out
