"""The fused LSTM's time loops as a native CPU kernel (``lstm_cpu.cc``, an XLA FFI custom call).

XLA:CPU runs a while loop's body on one thread, so at thin shapes each step's product ran on one core while
PyTorch's LSTM used all of them (benchmarks/RESULTS.md). The kernel runs the forward and the BPTT loops with a
team of threads that split the hidden units, step by step (a late thread costs only the blocks it has not started).

It is built on first use (or ahead of time by ``jaxseq native build``) with the system C++ compiler (``$CXX``,
else ``c++``) against the FFI headers that ship with jaxlib, ``-march=native``, and cached under
``$JAXSEQ_CACHE_DIR`` (default ``~/.cache/jaxseq``): ``jaxseq.native.build`` has the key, the lock that makes
concurrent processes build once, the checksum checked before loading, and ``JAXSEQ_NATIVE_ISA`` (narrower
vectors). Off x86-64 Linux, without a compiler, with an unusable cache, or with ``JAXSEQ_NATIVE=0``,
``available()`` is False (with one logged line saying why) and ``jaxseq.layers`` keeps its XLA loops; the results
are the same to float32 rounding (tests/test_native.py). Nothing here raises for want of the kernel.

``JAXSEQ_NATIVE_THREADS=n`` caps the team (default: the CPUs this process may run on).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.native import build
from jaxseq.sequences import vary_like

log = logging.getLogger(__name__)

SOURCE = build.SOURCE
# The hidden size is padded to a multiple of this: of the kernel's vector width in floats, which is 16 with
# AVX-512, 8 with AVX2 and 4 with SSE (vector_lanes()).
LANES = 16
_TARGETS = {"jaxseq_lstm_forward": "JaxseqLstmForward", "jaxseq_lstm_backward": "JaxseqLstmBackward"}
_failure: str | None = None  # why the last _library() returned None
_registered: tuple[Path, ctypes.CDLL] | None = None  # the library whose handlers XLA calls in this process


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Build (once per source, settings and CPU) and load the kernel; None, with one logged line, if that fails."""
    global _failure, _registered
    _failure = None
    try:
        path = build.ensure_built()
        if _registered is not None:
            # XLA refuses a second handler under the same target name, so the first library loaded stays
            # the one called in this process, whatever the settings now are.
            if _registered[0] != path:
                log.warning("jaxseq: this process already runs the native LSTM kernel from %s; %s takes effect "
                            "in a new process", _registered[0], path)
            return _registered[1]
        library = ctypes.CDLL(str(path))
        library.JaxseqLstmVectorLanes.restype = ctypes.c_int
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _registered = (path, library)
        return library
    except build.BuildError as error:
        _failure = str(error)
    except Exception as error:  # noqa: BLE001 -- an optional speed-up must never be the reason a model fails
        _failure = f"the native LSTM kernel could not be loaded ({type(error).__name__}: {error})"
    log.warning("jaxseq: %s; the LSTM layer uses XLA's loops on the CPU (slower at thin shapes)", _failure)
    return None


def reset() -> None:
    """Forget this process's build-and-load result, so the next ``available()`` reads the settings and the cache
    again (a library already loaded stays the one XLA calls: see ``_library``)."""
    _library.cache_clear()


@contextlib.contextmanager
def as_in_a_fresh_process():
    """For tests: inside the block nothing is built or loaded yet, as in a new process; after it, the library this
    process had loaded is the one again."""
    global _registered
    loaded = _registered
    _library.cache_clear()
    _registered = None
    try:
        yield
    finally:
        _library.cache_clear()
        _registered = loaded


def load_failure() -> str | None:
    """Why building or loading the library failed, in one line (building it first if needed); None if it loaded.

    Unlike ``unavailable_reason`` this ignores the switches that keep a loaded kernel unused (JAXSEQ_NATIVE=0, a
    GPU backend, several devices)."""
    return _failure if _library() is None else None


def unavailable_reason(*, build_if_needed: bool = True) -> str | None:
    """Why ``available()`` is False, in one line; None if it is True.

    ``build_if_needed=False`` builds nothing: a library not built yet is the reason then (``jaxseq native info``).
    """
    if os.environ.get("JAXSEQ_NATIVE", "1") == "0":
        return "turned off by JAXSEQ_NATIVE=0"
    try:
        backend, devices = jax.default_backend(), jax.device_count()
    except Exception as error:  # noqa: BLE001 -- see _library
        return f"no JAX backend ({type(error).__name__}: {error})"
    if backend != "cpu":
        return f"the default backend is {backend}, not the CPU"
    # Several devices: the batch may be sharded, and XLA cannot partition a custom call (it would gather the
    # whole batch onto every device), so multi-device programs keep the XLA loops.
    if devices != 1:
        return f"{devices} devices (XLA cannot partition the kernel's custom call over a sharded batch)"
    if not build_if_needed:
        try:
            built = build.verified(build.library_path())
        except build.BuildError as error:
            return str(error)
        if not built:
            if shutil.which(build.compiler()[0]) is None:
                return f"no C++ compiler ({build.compiler()[0]}) found; set CXX to a compiler"
            return "not built yet: `jaxseq native build` builds it (else the first LSTM layer on the CPU does)"
    return _failure if _library() is None else None


def available() -> bool:
    """Whether the native kernel is on: CPU backend, one device, not turned off by JAXSEQ_NATIVE=0, and it built.

    Never raises."""
    return unavailable_reason() is None


def vector_lanes() -> int | None:
    """Floats per vector in the built kernel (16 with AVX-512, 8 with AVX/AVX2, 4 otherwise); None if not built."""
    library = _library()
    return None if library is None else int(library.JaxseqLstmVectorLanes())


def usable_cpus() -> int:
    """The CPUs this process may run on: the kernel's team size, at most (``os.sched_getaffinity`` is Linux's
    only; elsewhere, every CPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def padded_hidden(hidden: int) -> int:
    return -(-hidden // LANES) * LANES


def pad_gate_columns(a, hidden: int):
    """``[..., 4H]`` -> ``[..., 4Hp]`` with zeros after each gate's H columns (Hp = ``padded_hidden(H)``)."""
    extra = padded_hidden(hidden) - hidden
    if extra == 0:
        return a
    a = a.reshape(*a.shape[:-1], 4, hidden)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])
    return a.reshape(*a.shape[:-2], -1)


def _pad_last(a, hidden: int):
    extra = padded_hidden(hidden) - hidden
    return a if extra == 0 else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def _lengths_arg(lengths):
    return jnp.zeros((0,), jnp.int32) if lengths is None else lengths.astype(jnp.int32)


class Tape(NamedTuple):
    """What the kernel's forward saves for its backward, in the kernel's layout: by blocks of ``LANES`` hidden
    units (hidden padded to ``Hp``), so that a block's rows of one step are contiguous (lstm_cpu.cc, TapeRow)."""

    gates: jax.Array  # [T, Hp/LANES, B, 4, LANES]: the activated gates i, f, g, o
    cs: jax.Array     # [T, Hp/LANES, B, LANES]: the carried cell states

    def unblocked(self) -> tuple[jax.Array, jax.Array]:
        """``(gates [4, T, B, Hp], cs [T, B, Hp])``, the layout of the fused LSTM layer's saved values (``jaxseq.layers``)."""
        steps, blocks, batch = self.cs.shape[:3]
        gates = jnp.transpose(self.gates, (3, 0, 2, 1, 4)).reshape(4, steps, batch, blocks * LANES)
        cs = jnp.transpose(self.cs, (0, 2, 1, 3)).reshape(steps, batch, blocks * LANES)
        return gates, cs


def _swap_time(a):
    """``[T, B, F]`` <-> ``[B, T, F]`` (empty placeholders pass): the kernel takes and returns the sequences
    batch-major. The layer's own arrays are ``[B, T, F]``, so its time-major view and this swap cancel in XLA;
    time-major operands and results of the custom call made XLA copy xs, ys, their cotangents and dxs into the
    other order around every call."""
    return jnp.swapaxes(a, 0, 1) if a.ndim == 3 else a


def lstm_forward(xs_t, U, W, b, h0, c0, lengths, *, hoisted: bool, save: bool):
    """The fused LSTM layer's forward loop (``jaxseq.layers``, ``impl="native"``) in the kernel.

    Args:
      xs_t: ``[T, B, I]``.
      U, W, b: ``[I, 4H]``, ``[H, 4H]``, ``[4H]``.
      h0, c0: ``[B, H]``; lengths: ``int[B]`` valid steps per row, or None.
      hoisted: form ``x_t U + b`` for all steps first (inside the kernel, one product over all ``T·B`` rows),
        then only ``h W`` in the loop; else ``[x_t, h] [U; W]`` in the loop.

    Returns:
      ``(h, c, ys [T, B, H], tape)``: the ``Tape`` for ``lstm_backward`` when ``save``, else None.
    """
    steps, batch = xs_t.shape[:2]
    hidden = W.shape[0]
    hp = padded_hidden(hidden)
    W = pad_gate_columns(jnp.pad(W, ((0, hp - hidden), (0, 0))), hidden)
    U, b = pad_gate_columns(U, hidden), pad_gate_columns(b, hidden)
    f32 = jnp.float32
    blocks = hp // LANES
    shapes = [(batch, hp), (batch, hp), (batch, steps, hp),
              (steps, blocks, batch, 4, LANES) if save else (0,),
              (steps, blocks, batch, LANES) if save else (0,), (2, batch, hp)]
    call = jax.ffi.ffi_call("jaxseq_lstm_forward", [jax.ShapeDtypeStruct(s, f32) for s in shapes],
                            vmap_method="sequential")
    args = (_swap_time(xs_t), U, W, b, _pad_last(h0, hidden), _pad_last(c0, hidden),
            _lengths_arg(lengths))
    # Inside shard_map a custom call's results are per-shard values: they vary like its inputs.
    h, c, ys, gates, cs, _ = vary_like(call(*args, hoisted=np.int64(hoisted), has_lengths=np.int64(lengths is not None)),
                                       *args)
    ys = _swap_time(ys)
    if hp != hidden:
        h, c, ys = h[:, :hidden], c[:, :hidden], ys[..., :hidden]
    return h, c, ys, Tape(gates, cs) if save else None


def unpad_gate_columns(a, hidden: int):
    """``[..., 4Hp]`` -> ``[..., 4H]``: the inverse of ``pad_gate_columns``."""
    hp = padded_hidden(hidden)
    if hp == hidden:
        return a
    return a.reshape(*a.shape[:-1], 4, hp)[..., :hidden].reshape(*a.shape[:-1], 4 * hidden)


def lstm_backward(W, tape: Tape, c0, dys, lengths, dh, dc, *, weight_grads_of=None, keep_dz: bool = True,
                  input_kernel=None):
    """The fused LSTM layer's BPTT loop (``jaxseq.layers``) in the kernel: ``(dh, dc, dz [T, B, 4H])``.

    ``W`` is the recurrent kernel ``[H, 4H]``, ``tape`` what ``lstm_forward`` saved, ``dys`` ``[T, B, H]``.
    ``weight_grads_of=(xs_t [T, B, I], h0 [B, H], ys [T, B, H])``: the kernel also forms the weight gradients
    ``(dU [I, 4H], dW [H, 4H], db [4H])`` step by step and returns ``(dh, dc, dz, (dU, dW, db))``. With them,
    ``keep_dz=False`` returns ``dz=None``: the kernel keeps only the last three steps' δz, and nothing of
    ``[T, B, 4H]`` is allocated or written. ``input_kernel=U`` ``[I, 4H]``: the kernel also forms the input
    gradient ``dxs_t = δz_t Uᵀ`` step by step and appends ``dxs`` ``[T, B, I]`` to the result.
    The kernel takes ``dys``, ``xs_t`` and ``ys`` and returns ``dxs`` batch-major (see ``_swap_time``).
    """
    if not keep_dz and weight_grads_of is None:
        raise ValueError("lstm_backward: keep_dz=False needs weight_grads_of; without it dz is the only result "
                         "the weight gradients can come from")
    steps, batch, hidden = dys.shape
    hp = padded_hidden(hidden)
    pad = functools.partial(_pad_last, hidden=hidden)
    # The kernel packs Wᵀ and Uᵀ itself: a transpose here was a copy of each in XLA before every call.
    W_padded = pad_gate_columns(jnp.pad(W, ((0, hp - hidden), (0, 0))), hidden)  # [Hp, 4Hp]
    f32 = jnp.float32
    shapes = [(batch, hp), (batch, hp), (steps, batch, 4 * hp) if keep_dz else (0,)]
    if weight_grads_of is None:
        operands = (jnp.zeros((0,), f32),) * 3
        shapes += [(0,)] * 3
    else:
        xs_t, h0, ys = weight_grads_of
        operands = (xs_t, pad(h0), pad(ys))
        shapes += [(xs_t.shape[-1], 4 * hp), (hp, 4 * hp), (4 * hp,)]
    if input_kernel is None:
        U_padded = jnp.zeros((0,), f32)
        shapes.append((0,))
    else:
        in_size = input_kernel.shape[0]
        U_padded = pad_gate_columns(input_kernel, hidden)  # [I, 4Hp]
        shapes.append((batch, steps, in_size))
    xs_arg, h0_arg, ys_arg = operands
    args = (W_padded, tape.gates, tape.cs, pad(c0), _swap_time(pad(dys)), _lengths_arg(lengths), pad(dh), pad(dc),
            _swap_time(xs_arg), _swap_time(ys_arg), h0_arg, U_padded)
    call = jax.ffi.ffi_call("jaxseq_lstm_backward", [jax.ShapeDtypeStruct(s, f32) for s in shapes],
                            vmap_method="sequential")
    dh, dc, dz, dU, dW, db, dxs = vary_like(call(*args, has_lengths=np.int64(lengths is not None),
                                                weight_grads=np.int64(weight_grads_of is not None),
                                                keep_dz=np.int64(keep_dz),
                                                input_grads=np.int64(input_kernel is not None)), *args)
    if hp != hidden:
        dh, dc = dh[:, :hidden], dc[:, :hidden]
        dz = unpad_gate_columns(dz, hidden) if keep_dz else dz
    if not keep_dz:
        dz = None
    result = (dh, dc, dz)
    if weight_grads_of is not None:
        result += ((unpad_gate_columns(dU, hidden), unpad_gate_columns(dW[:hidden], hidden),
                    unpad_gate_columns(db, hidden)),)
    if input_kernel is not None:
        result += (_swap_time(dxs),)
    return result
