"""Launching already-compiled Triton kernels without Triton's per-call dispatch.

`kernel[grid](*args)` runs `JITFunction.run` on every call: it binds the arguments,
specialises them, hashes a cache key, looks up hooks and the current device and stream,
and only then calls the compiled kernel's C launcher. For the small, many launches of an
eager ConvNeXt step that Python work is a large part of the host time (the step is bound
by the host issuing kernels, not by the GPU). `direct_launch` wraps a `@triton.jit`
kernel with the same call syntax: the first call for a given *specialisation* goes
through Triton (compiling and launching as usual) and keeps the compiled kernel; later
calls with the same specialisation call its launcher directly.

The specialisation key follows Triton's rules (`triton.runtime.jit`'s
`native_specialize_impl`): tensors by dtype and 16-byte alignment; integers by whether
they equal 1, are divisible by 16 and fit 32 or 64 bits; floats and bools by type;
everything else (None, constexprs) by value. It is used only when the installed Triton
launches compiled kernels the way this module calls them (checked once, from
`JITFunction.run`'s source), with no launch hooks set (profilers such as proton set
them), and not under Triton's interpreter; otherwise, and with
``CONVNEXT_TRITON_DIRECT_LAUNCH=0``, every call goes through Triton.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["direct_launch", "direct_launch_supported", "CompiledLaunch", "launch_hooks_set"]

# The launch statement of `JITFunction.run` that `_DirectLaunch` reproduces (as in Triton
# 3.6 and 3.8, the versions it was run with); whitespace is ignored when matching.
_EXPECTED_LAUNCH = ("kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,"
                    "kernel.packed_metadata,launch_metadata,knobs.runtime.launch_enter_hook,"
                    "knobs.runtime.launch_exit_hook,*bound_args.values())")
_SUPPORTED: Optional[bool] = None


def direct_launch_supported() -> bool:
    """Whether the installed Triton can be launched directly (see the module docstring)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        ok = (os.environ.get("CONVNEXT_TRITON_DIRECT_LAUNCH", "1").strip().lower()
              not in ("0", "false", "off", "no")
              and os.environ.get("TRITON_INTERPRET", "0") != "1")
        if ok:
            try:
                from triton import knobs  # noqa: F401  (Triton >= 3.4)
                from triton.runtime.jit import JITFunction

                src = "".join(inspect.getsource(JITFunction.run).split())
                ok = _EXPECTED_LAUNCH in src
            except Exception:  # noqa: BLE001 - any surprise means "use Triton's own path"
                ok = False
        _SUPPORTED = ok
    return _SUPPORTED


def _hook_active(hook: Any) -> bool:
    # Triton >= 3.5 keeps the hooks as a `HookChain` (a list of callables, empty by
    # default); older ones as None or a callable.
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


_RUNTIME_KNOBS: Any = None  # triton.knobs.runtime, looked up once (checked on every launch)


def _hooks_set() -> bool:
    """Whether a Triton launch hook is set (profilers such as proton set them)."""
    global _RUNTIME_KNOBS
    if _RUNTIME_KNOBS is None:
        from triton import knobs

        _RUNTIME_KNOBS = knobs.runtime
    return (_hook_active(_RUNTIME_KNOBS.launch_enter_hook)
            or _hook_active(_RUNTIME_KNOBS.launch_exit_hook))


def launch_hooks_set() -> bool:
    """Whether a Triton launch hook is set: callers of `CompiledLaunch` then go through
    Triton's own launches, which call the hooks."""
    return _hooks_set()


_I32 = (-2**31, 2**31)


def _spec(arg: Any) -> Any:
    """The part of Triton's specialisation of one runtime argument that picks the kernel."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, torch.dtype):  # an aligned tensor of it, as Triton's warmup takes it
        return (arg, True)
    if isinstance(arg, bool):
        return bool
    if isinstance(arg, int):
        return (int, arg == 1, arg % 16 == 0, _I32[0] <= arg < _I32[1], arg < 2**63)
    if isinstance(arg, float):
        return float
    return (type(arg), arg)


class CompiledLaunch:
    """One compiled kernel with its grid and constexprs fixed, called as
    ``launch(stream, *runtime_args)``: pointers may be passed as ints (device addresses),
    which Triton's launcher takes as they are. For callers that have worked out a whole
    launch once (`ops.forward_plan`); they check `launch_hooks_set` themselves."""

    __slots__ = ("_run", "_grid", "_function", "_metadata", "_trailing")

    def __init__(self, kernel: Any, grid: Tuple[int, ...], trailing: Tuple) -> None:
        self._run = kernel.run  # first: reading `run` loads the kernel (sets `function`)
        self._grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self._function, self._metadata = kernel.function, kernel.packed_metadata
        self._trailing = trailing

    def __call__(self, stream: int, *args: Any) -> None:
        g0, g1, g2 = self._grid
        self._run(g0, g1, g2, stream, self._function, self._metadata, None, None, None, *args,
                  *self._trailing)


class _DirectLaunch:
    """`kernel[grid](*args, **constexprs_and_options)`, the Triton dispatch skipped once the
    kernel for this specialisation is compiled. Runtime arguments are passed positionally,
    constexprs and launch options (num_warps, num_stages) by keyword."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._cache: Dict[Tuple, Tuple[Any, Tuple]] = {}

    def __getitem__(self, grid: Tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self.launch, grid)

    def _key(self, args: Tuple, kwargs: Dict[str, Any]) -> Tuple:
        # `map(_spec, args)` with the common cases inline (a Python call per argument is
        # a measurable part of a launch's host time).
        spec = tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                      else (int, a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63)
                      if type(a) is int else _spec(a) for a in args])
        return (torch._C._cuda_getDevice(), spec, tuple(kwargs.items()))

    def _check_keywords(self, args: Tuple, kwargs: Dict[str, Any]) -> Optional[Tuple]:
        """The constexprs' values in signature order (None if some are missing, e.g. left at
        their defaults); refuses constexprs passed positionally."""
        # The key holds runtime arguments by specialisation, not value: a constexpr among
        # them would reuse a kernel compiled for another value.
        positional = [name for k, name in enumerate(self.fn.arg_names[:len(args)])
                      if k in getattr(self.fn, "constexprs", ())]
        if positional:
            raise TypeError(f"{getattr(self.fn, '__name__', self.fn)}: pass the "
                            f"constexprs {positional} by keyword")
        # The compiled kernel's launcher takes every parameter in signature order,
        # constexprs included; ours come positionally, then by keyword.
        names = self.fn.arg_names[len(args):]
        return tuple(kwargs[name] for name in names) if all(n in kwargs for n in names) else None

    def launch(self, grid: Tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if not (_SUPPORTED or direct_launch_supported()) or _hooks_set():
            self.fn[grid](*args, **kwargs)
            return
        key = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None:
            trailing = self._check_keywords(args, kwargs)
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is not None and trailing is not None:
                self._cache[key] = (kernel, trailing)
            return
        kernel, trailing = entry
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(key[0]), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *trailing)

    def compiled(self, grid: Tuple[int, ...], args: Tuple, kwargs: Dict[str, Any]
                 ) -> Optional[CompiledLaunch]:
        """The launch `self[grid](*args, **kwargs)` as a `CompiledLaunch` (compiling the
        kernel for these arguments' specialisation, without running it, if needed), for
        later calls with arguments of the same specialisation; None where direct launches
        are off (see the module docstring). A tensor argument may be given as its dtype,
        standing for an aligned tensor of it (one allocated per call, say)."""
        if not direct_launch_supported():
            return None
        key = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None:
            trailing = self._check_keywords(args, kwargs)
            if trailing is None:
                return None
            kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            if kernel is None:
                return None
            entry = self._cache[key] = (kernel, trailing)
        return CompiledLaunch(entry[0], grid, entry[1])


def direct_launch(fn: Any) -> _DirectLaunch:
    """Decorator (under `@triton.jit`) giving the kernel `_DirectLaunch`'s fast launches."""
    return _DirectLaunch(fn)
