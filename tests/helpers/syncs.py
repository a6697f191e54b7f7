"""Counting host syncs on a machine without a GPU.

A host sync is a read of a tensor's value by the host: on CUDA it waits for every queued kernel. On the CPU
nothing waits, so the reads are counted where they happen instead:

- at the dispatcher (a ``TorchDispatchMode``): ``aten._local_scalar_dense``, the op under ``.item()``,
  ``bool()``, ``float()``, ``int()`` and ``if tensor:``, whether Python or C++ asks (``F.one_hot``'s range
  check, ``torch.equal``); and the ops whose output shape depends on the data (``nonzero``, boolean-mask
  indexing, ``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats and no output size);
- in Python: ``.tolist()``, ``.numpy()``, ``.cpu()``, which copy a CPU tensor without any op.

Two kinds of read are host-side on every device and are not counted: the optimiser's step counters (Adam
keeps ``state["step"]`` on the CPU unless ``capturable``/``fused``, and reads it with ``.item()``), and data
loading (the DataLoader's batches are CPU tensors until the loop moves them).
"""
from __future__ import annotations

import os
import traceback
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data.dataloader import _BaseDataLoaderIter

_SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
             "aten.argwhere", "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
             "aten.bincount"}
_PY_READS = ("tolist", "numpy", "cpu", "__array__")


def _is_sync(func, args, kwargs) -> bool:
    name = str(func.overloadpacket)
    if name in _SYNC_OPS:
        return True
    if name == "aten.index":  # x[bool_mask]: nonzero inside
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
    if name == "aten.repeat_interleave":  # tensor repeats without output_size: the output size is read
        return isinstance(args[0] if str(func) == "aten.repeat_interleave.Tensor" else args[1], torch.Tensor) \
            and kwargs.get("output_size") is None
    return False


def _where() -> str:
    """The innermost frame outside torch and this file: who asked for the read."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in f.filename and not f.filename.endswith("syncs.py"):
            return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter(ignore) as c:`` counts the host reads made while ``c.counting`` is True, by
    (op, where), in ``c.counts``; ``ignore(tensor)`` names host tensors whose reads are expected."""

    def __init__(self, ignore: Callable[[torch.Tensor], bool] = lambda t: False):
        super().__init__()
        self.ignore, self.counting, self.counts = ignore, False, Counter()
        self._saved: dict[str, Callable] = {}

    def _record(self, what: str, tensor) -> None:
        if self.counting and not (isinstance(tensor, torch.Tensor) and self.ignore(tensor)):
            self.counts[(what, _where())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting and _is_sync(func, args, kwargs):
            self._record(str(func), args[0] if args else None)
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for name in _PY_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def read(t, *a, _original=original, _name=name, **k):
                counter._record(f"Tensor.{_name}", t)
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, read)
        original_next = self._saved["__next__"] = _BaseDataLoaderIter.__next__

        def next_batch(it):  # data loading is host-side by design
            counting, counter.counting = counter.counting, False
            try:
                return original_next(it)
            finally:
                counter.counting = counting

        _BaseDataLoaderIter.__next__ = next_batch
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _BaseDataLoaderIter.__next__ = self._saved.pop("__next__")
            for name in _PY_READS:
                setattr(torch.Tensor, name, self._saved.pop(name))
