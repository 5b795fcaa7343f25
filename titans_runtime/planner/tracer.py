"""Count the live bytes of every tensor an op creates, under fake tensors, and keep the peak.

`LiveBytesTracer` is a TorchDispatchMode stacked on a FakeTensorMode: each op's outputs are fake (no real
memory), their storages are counted (rounded up to the CUDA caching allocator's 512-byte blocks) until a
weakref finalizer sees them die. Small tensors also carry a real "shadow" value so that the model's few
data-dependent reads (`int(positions[0])`, `bool(gate == 1)`, `int(seen)`) work on fake tensors.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

ALLOCATION_BLOCK = 512      # the CUDA caching allocator rounds every block up to 512 bytes
SHADOW_LIMIT = 4096         # tensors up to this many elements keep a real value beside the fake one

_aten = torch.ops.aten


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION_BLOCK) * ALLOCATION_BLOCK


class LiveBytesTracer(TorchDispatchMode):
    """Live and peak bytes of tensor storages created while active (use inside a FakeTensorMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}
        self._shadows = WeakTensorKeyDictionary()
        # Debugging aid: with debug on, `at_peak` lists (creating op, shape, dtype; bytes) of the storages
        # live at the peak (since the last reset_peak), which is how the planner's formulas were read off.
        self.debug = False
        self._current = ""
        self._origin: dict[int, str] = {}
        self.at_peak: list[tuple[str, int]] = []

    # ------------------------------------------------------------------------------------- counting
    def reset_peak(self) -> None:
        self.peak = self.live
        self._origin.clear()

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)
        self._origin.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = _rounded(storage.nbytes())
        self._storages[key] = nbytes
        self.live += nbytes
        if self.debug:
            self._origin[key] = f"{self._current} {tuple(t.shape)} {t.dtype}"
        if self.live > self.peak:
            self.peak = self.live
            if self.debug:
                self.at_peak = [(self._origin.get(k, "?"), n) for k, n in self._storages.items()]
        weakref.finalize(storage, self._free, key)

    # -------------------------------------------------------------------------------------- shadows
    def _shadow_of(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._shadows.get(x, _MISSING)
        return x

    def _run_shadow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        flat_in, _ = tree_flatten((args, kwargs))
        tensors_in = [x for x in flat_in if isinstance(x, torch.Tensor)]
        flat_out = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        mutated = [x for x in tensors_in if any(x is o for o in flat_out)] if func._schema.is_mutable else []
        small = all(o.numel() <= SHADOW_LIMIT for o in flat_out)
        have = all(x in self._shadows for x in tensors_in)
        if not (small and have and flat_out):
            for x in mutated:  # a mutation we cannot mirror makes the shadow stale
                self._shadows.pop(x, None)
            for o in flat_out:
                if not func._schema.is_mutable:
                    self._shadows.pop(o, None)
            return
        real_args, real_kwargs = tree_map(self._shadow_of, (args, kwargs))
        with unset_fake_temporarily():
            real_out = func(*real_args, **real_kwargs)
        for fake, real in zip(flat_out, [x for x in tree_flatten(real_out)[0] if isinstance(x, torch.Tensor)]):
            self._shadows[fake] = real

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            shadow = self._shadows.get(args[0])
            if shadow is None and args[0].dtype == torch.bool:
                # A flag computed from real data (e.g. "is any chunk padded?"): fake tensors hold no data,
                # and the traced segment has no padding, so the flag is False.
                return False
            if shadow is None:
                raise RuntimeError("a data-dependent read of a tensor without a known value under fake tensors")
            with unset_fake_temporarily():
                return shadow.item()
        if self.debug:
            self._current = str(func)
        out = func(*args, **kwargs)
        try:
            self._run_shadow(func, args, kwargs, out)
        except Exception:  # a shadow we cannot compute is simply not kept
            pass
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


_MISSING = object()


class FakeTrace:
    """`with FakeTrace() as trace:` build modules and run a step on fake tensors; read trace.peak."""

    def __enter__(self) -> LiveBytesTracer:
        self._fake = FakeTensorMode()
        self._fake.__enter__()
        self._tracer = LiveBytesTracer()
        self._tracer.__enter__()
        return self._tracer

    def __exit__(self, *exc: Any) -> None:
        self._tracer.__exit__(*exc)
        self._fake.__exit__(*exc)
