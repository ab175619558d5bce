"""The one public way to run a recurrent layer: ``layer``, ``bidirectional`` and ``stacked``, any cell.

One entry for every cell (as Haiku's ``dynamic_unroll`` is for every core), fast by default::

    final, ys = layers.layer(cell, params, xs, carry=None, lengths=None, reverse=False, impl="auto")
    (fwd, bwd), ys = layers.bidirectional(cell, {"forward": p1, "backward": p2}, xs, lengths=..., merge="concat")
    finals, ys = layers.stacked(cell, [p1, p2, ...], xs, lengths=..., bidirectional=False, dropout_rate=0.0)

The three take the same arguments in the same order (``cell, params, xs``, then keywords) and return
``(final_carry, ys)``: the carry after each sequence's last valid step (a pair ``(forward, backward)`` for
``bidirectional``, a list with one entry per layer for ``stacked``) and the outputs ``[*batch, time, out]``.
Semantics are those of the reference loop ``jaxseq.unroll`` (lengths, padding-aware reverse), and every
implementation gives its results to float32 rounding (tests/test_layers.py).

Which implementation runs is a static choice, ``impl`` (visible to ``jit``; nothing read from globals):

* ``"auto"`` (default): the cell's fused layer when it declares one (``Cell.fused``, e.g. every
  ``cells.make_lstm`` cell), with its loops in the native CPU kernel where ``jaxseq.native.available()`` and
  the shape says it is faster (``_native_fits``), in XLA loops otherwise. Any other cell runs the reference
  loop: a cell you build is never silently replaced by a kernel.
* ``"scan"``: the reference loop ``jaxseq.unroll`` over ``cell.apply``; autodiff through ``lax.scan`` gives the
  backward pass, and forward-mode ``jvp`` works.
* ``"fused"``: the cell's fused layer with XLA loops, the same program on every backend. For the LSTM, a
  ``jax.custom_vjp`` whose backward pass is the hand-derived BPTT (the recursion of ``jaxseq.bptt``): the reverse
  loop carries only ``(δh, δc)`` and emits ``δz_t``; the weight gradients ``Σ_t [x_t, h_{t-1}]ᵀ δz_t`` and the
  input gradients ``δz_t Uᵀ`` are formed after the loop as single GEMMs over all timesteps instead of one thin
  product per step (which is what autodiff through a scan does).
* ``"native"``: ``"fused"`` with both loops in the native multi-threaded CPU kernel (``jaxseq.native``; XLA runs
  a loop body on one thread), at every shape. Where the kernel cannot run (not x86-64 Linux, no C++ compiler,
  a GPU, several devices, a dtype other than float32, ``JAXSEQ_NATIVE=0``) it falls back to ``"fused"`` with a
  one-time log warning, never an error. In the kernel at batch >= ``KERNEL_WEIGHT_GRADS_MIN_BATCH`` the weight
  and input gradients are formed inside its backward loop, each step's products while ``δz_t`` is in cache,
  and δz is kept for three steps, not all T.
* ``"cudnn"``: ``jax.experimental.rnn.lstm`` (cuDNN) on a CUDA GPU for float32; elsewhere, for other dtypes
  and with ``checkpoint``, it falls back to ``"auto"``. On an H200 the fused path took 0.30-0.95x the time
  of the cuDNN call at all four benchmark shapes in float32, training and forward (benchmarks/RESULTS.md), so
  cuDNN runs only when asked for.

``"fused"``, ``"native"`` and ``"cudnn"`` need a cell with a fused layer; a cell without one raises a
``ValueError`` for them. ``FUSED`` lists the fused layers a cell may declare.

Thin aliases, kept because models and scripts read well with them: ``lstm(params, xs, ...)``,
``gru(params, xs, ...)`` and ``rnn(params, xs, ...)`` are ``layer`` with ``cells.lstm``, ``cells.gru`` and
``cells.make_rnn(activation)`` (``lstm`` also takes ``form``); ``jaxseq.unroll`` is the reference loop itself.

Every path's float32 products follow ``jax_default_matmul_precision``: on a GPU the default lets XLA and cuDNN
use TF32 tensor cores; ``jax.default_matmul_precision("highest")`` gives strict float32.

Memory-bounded training: ``checkpoint="sqrt"`` (or an int segment length) keeps only the carries at segment
boundaries in the forward pass and recomputes each segment in the backward pass, so activation memory grows
like ``O(√T)`` segments plus one segment's worth instead of ``O(T)`` gate tensors. On the fused path the
weight gradients are accumulated per segment (one GEMM per segment); on the reference loop the segments are
``jax.checkpoint``-ed inner scans.

The fused and cuDNN paths are reverse-mode only (``jax.custom_vjp``): ``grad``, ``vjp``, ``jit`` and ``vmap``
work, forward-mode ``jvp``/``jacfwd`` does not; use ``impl="scan"`` for those.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxseq import bptt, cells, native
from jaxseq.cells import Cell, LSTMState
from jaxseq.scan import unroll
from jaxseq.sequences import (as_lengths, batch_shape, check_carry_pair, check_cell_params, check_directions,
                              check_merge, check_sequence_inputs, clip_lengths, dropout, mask_like,
                              merge_outputs, reverse_within_lengths, sum_like, vary_like)

log = logging.getLogger(__name__)

IMPLS = ("auto", "scan", "fused", "native", "cudnn")
# How the fused forward forms z_t = x_t U + h_{t-1} W + b (see `_choose_form`):
#   "hoist":  xs U + b for all steps as one GEMM before the loop; only h W inside it.
#   "step":   x_t U and h W as two products inside the loop.
#   "concat": one product [x_t, h_{t-1}] [U; W] inside the loop.
FORMS = ("hoist", "step", "concat")


# ----------------------------------------------------------------------------------------------------------
# Argument handling shared by the layers


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# Time steps per loop iteration when ``unroll=None``, by backend. Measured with benchmarks/bench_lstm_gpu.py on
# an H200 (fused LSTM training step, float32): unroll 16 took 0.48x (32, 500, 64, 128), 0.53x (1, 100, 128, 256)
# and 0.70x (64, 34, 200, 256) the time of unroll 1; each iteration costs a launch of the loop body there. On
# the 2-core CPU unroll 2 and 4 were no faster (benchmarks/RESULTS.md), so the CPU keeps one step per iteration.
DEFAULT_UNROLL = {"gpu": 16}


def _resolve_unroll(unroll) -> int:
    """``unroll`` checked, or the default for the default backend when None (``DEFAULT_UNROLL``)."""
    if unroll is None:
        return DEFAULT_UNROLL.get(jax.default_backend(), 1)
    if isinstance(unroll, bool) or not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ValueError(f"unroll must be a positive int (time steps per loop iteration) or None, got {unroll!r}")
    return int(unroll)


def _segment_length(checkpoint, num_steps: int) -> int | None:
    """Segment length for a checkpoint policy: None (store everything), "sqrt", or a positive int."""
    if checkpoint is None:
        return None
    if checkpoint == "sqrt":
        root = math.isqrt(num_steps)
        # Prefer a divisor of T near √T: no padded tail to mask and no padded copy of the inputs.
        divisors = [d for d in range(max(1, root // 2), 2 * root + 1) if num_steps % d == 0]
        return min(divisors, key=lambda d: abs(d - root)) if divisors else max(1, math.ceil(math.sqrt(num_steps)))
    if isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool) and checkpoint >= 1:
        return int(min(checkpoint, num_steps))
    raise ValueError(f"checkpoint must be None, 'sqrt' or a positive int segment length, got {checkpoint!r}")


def _prepare(cell: Cell, params, xs, carry, lengths):
    """``(xs, carry, lengths)`` checked against ``cell``'s params (and layout, if it declares one); a zero carry
    of the recurrent kernel's size when ``carry`` is None."""
    xs, lengths = jnp.asarray(xs), as_lengths(lengths)
    check_cell_params(cell, params, needs_hidden=carry is None)
    if carry is None:
        if np.ndim(xs) < 2:
            check_sequence_inputs(params, carry, xs, lengths)  # raises the rank error
        carry = cell.init_carry(batch_shape(xs), cells.hidden_size(params), params["W"].dtype)
    elif cell.layout is not None:
        carry = cells.check_carry(carry, cell.layout)
    check_sequence_inputs(params, carry, xs, lengths)
    return xs, carry, lengths


def _pad_time(x_t, total: int):
    """Zero-pad a time-major array to ``total`` steps."""
    extra = total - x_t.shape[0]
    return x_t if extra == 0 else jnp.concatenate([x_t, jnp.zeros((extra, *x_t.shape[1:]), x_t.dtype)])


# ----------------------------------------------------------------------------------------------------------
# Scan implementation (any cell), optionally checkpointed in segments


def _scan_layer(apply: Callable, params, carry, xs, lengths, reverse: bool, segment: int | None,
                steps_per_iteration: int = 1):
    """``jaxseq.unroll``; with ``segment``, a scan over ``jax.checkpoint``-ed segments of ``segment`` steps."""
    if segment is None:
        return unroll(apply, params, carry, xs, lengths=lengths, reverse=reverse, unroll=steps_per_iteration)
    num_steps = xs.shape[-2]
    lengths = (jnp.full(batch_shape(xs), num_steps, jnp.int32) if lengths is None
               else clip_lengths(lengths, num_steps))
    xs_t = jnp.moveaxis(xs, -2, 0)
    if reverse:
        xs_t = reverse_within_lengths(xs_t, lengths)
    n = -(-num_steps // segment)
    xs_seg = _pad_time(xs_t, n * segment).reshape(n, segment, *xs_t.shape[1:])

    @jax.checkpoint
    def run_segment(c, seg):
        x_seg, k = seg

        def step(c, inp):
            x, t = inp
            new_c, y = apply(params, c, x)
            valid = t < lengths
            new_c = jax.tree_util.tree_map(lambda a, b: jnp.where(mask_like(valid, a), a, b), new_c, c)
            return new_c, jnp.where(mask_like(valid, y), y, jnp.zeros((), y.dtype))

        return lax.scan(step, c, (x_seg, k * segment + jnp.arange(segment)), unroll=steps_per_iteration)

    carry, ys = lax.scan(run_segment, vary_like(carry, params, xs_seg, lengths), (xs_seg, jnp.arange(n)))
    ys = ys.reshape(n * segment, *ys.shape[2:])[:num_steps]
    if reverse:
        ys = reverse_within_lengths(ys, lengths)
    return carry, jnp.moveaxis(ys, 0, -2)


# ----------------------------------------------------------------------------------------------------------
# Fused LSTM: custom VJP whose backward pass is the hand BPTT


def _lstm_activations(i, f, g, o):
    """Gate activations ``(i, f, g, o)`` from their pre-activations, each ``[..., H]``."""
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _forward_loop(form: str, loops: str, U, W, b, h0, c0, xs_t, valid_t, save: bool, steps_per_iteration: int = 1):
    """Run the LSTM over time-major ``xs_t`` ``[T, B, I]``.

    ``valid_t`` is ``bool[T, B]`` or None (all steps valid). Returns ``(h, c, ys, saved)`` where ``ys`` is
    ``[T, B, H]`` (zeros at invalid steps) and, if ``save``, ``saved`` is what ``_backward_loop`` needs: the
    four activated gates ``(i, f, g, o)`` and the cell states, each ``[T, B, H]``, or the native kernel's
    ``native.Tape``. The gates stay four arrays rather than one ``[T, B, 4H]`` block, and so do the hoisted
    input products: on XLA:CPU a loop step that reads four arrays ran 0.64-0.74x the time of one that slices a
    block (benchmarks/RESULTS.md).

    ``loops`` is the layer's ``impl`` (``"auto"``, ``"fused"`` or ``"native"``): whether the loop runs in the
    native kernel (``jaxseq.native``) is ``_use_native``'s choice from it, the shape and ``save``. The kernel
    forms ``x_t U + h W + b`` itself (hoisted: ``x U + b`` for all steps first, in the kernel), so the "step"
    and "concat" forms are the same there.
    """
    if _use_native(loops, xs_t, W, training=save, hoisted=form == "hoist"):
        lengths = None if valid_t is None else valid_t.sum(axis=0, dtype=jnp.int32)  # validity is a prefix
        return native.lstm_forward(xs_t, U, W, b, h0, c0, lengths, hoisted=form == "hoist", save=save)
    if form == "hoist":
        projected = xs_t @ U + b  # [T, B, 4H]; no reshape that merges (and so would gather) a sharded batch
        inputs = tuple(jnp.split(projected, 4, axis=-1))
    else:
        inputs = xs_t
    UW = jnp.concatenate([U, W], axis=0) if form == "concat" else None

    def step(carry, inp):
        h, c = carry
        x, valid = inp if valid_t is not None else (inp, None)
        if form == "hoist":
            z = tuple(xk + zk for xk, zk in zip(x, jnp.split(h @ W, 4, axis=-1)))
        elif form == "step":
            z = jnp.split(x @ U + h @ W + b, 4, axis=-1)
        else:
            z = jnp.split(jnp.concatenate([x, h], axis=-1) @ UW + b, 4, axis=-1)
        gates = _lstm_activations(*z)
        i, f, g, o = gates
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        if valid is not None:
            keep = valid[:, None]
            c_new = jnp.where(keep, c_new, c)
            h_new = jnp.where(keep, h_new, h)
            y = jnp.where(keep, h_new, jnp.zeros((), h_new.dtype))
        else:
            y = h_new
        out = (y, gates, c_new) if save else y
        return (h_new, c_new), out

    scanned = inputs if valid_t is None else (inputs, valid_t)
    (h, c), out = lax.scan(step, vary_like((h0, c0), U, W, b, scanned), scanned, unroll=steps_per_iteration)
    if save:
        ys, gates, cs = out
        return h, c, ys, (gates, cs)
    return h, c, out, None


def _native_fits(batch: int, depth: int, hidden: int, training: bool) -> bool:
    """Whether the native kernel beats XLA's loops at this shape (measured on a 2-core x86 CPU).

    ``depth`` is the per-step contraction: ``I + H``, or ``H`` with the input product hoisted. Against XLA's loops
    in the same run (benchmarks/RESULTS.md), training: 0.70x at (32, 500, 64, 128), 0.80x at (64, 34, 200, 256),
    0.83x at (64, 50, 512, 512), 0.93x at (128, 100, 256, 512) (B, T, I, H), and 0.78-0.93x at batch 1, 4 and
    8. Forward only, where a thin matrix-vector product suits XLA's loop, it wins clearly only with two threads
    (``8·B·depth·H`` ≥ 400,000 FLOPs per step, the kernel's own rule): 0.50-0.72x at (1, 100, 128, 256), 0.80x
    at batch 4; on one thread it took 0.96-1.29x the time at (1 and 2, 100, 64, 128) and (1, 300, 64, 96).
    """
    if training or batch >= 16:
        return True
    return 8 * batch * depth * hidden >= 400_000 and native.usable_cpus() > 1


@functools.cache
def _warn_native_fallback(reason: str) -> None:
    """Log once per reason that ``impl="native"`` runs XLA's loops instead."""
    log.warning("jaxseq: impl='native' falls back to 'fused' (XLA's loops): %s", reason)


def _use_native(loops: str, xs_t, W, training: bool, hoisted: bool) -> bool:
    """Whether the fused LSTM's loops run in the native CPU kernel for ``impl=loops``.

    ``"fused"``: never. ``"native"``: whenever the kernel can run (float32, ``native.available()``: a
    one-device CPU backend, kernel built, not switched off), else XLA's loops with a one-time warning.
    ``"auto"``: where it can run and the shape makes it faster (``_native_fits``); ``training``: the forward
    saves for a backward pass. Availability is checked before the shape, so no platform-specific call is made
    where the kernel cannot run anyway.
    """
    if loops == "fused":
        return False
    float32 = xs_t.dtype == jnp.float32 and W.dtype == jnp.float32
    if loops == "native":
        if not float32:
            _warn_native_fallback(f"the kernel is float32 only, got {jnp.result_type(xs_t, W)}")
        elif not native.available():
            _warn_native_fallback(f"the kernel is not available here: {native.unavailable_reason()}")
        return float32 and native.available()
    steps, batch, input_size = xs_t.shape
    hidden = W.shape[0]
    depth = hidden if hoisted else input_size + hidden
    return float32 and native.available() and _native_fits(batch, depth, hidden, training)


def _backward_loop(W, saved, c0, dys, valid_t, dh, dc, steps_per_iteration: int = 1):
    """The LSTM BPTT recursion over one stretch of time, newest step first.

    Args:
      W: the recurrent kernel ``[H, 4H]``.
      saved: what ``_forward_loop`` saved: the gate activations ``(i, f, g, o)`` and cell states, each
        ``[T, B, H]``, or the native kernel's ``native.Tape`` (then the native kernel runs this loop too).
      c0: the cell state before the stretch ``[B, H]``.
      dys: output cotangents ``[T, B, H]``; valid_t: ``bool[T, B]`` or None.
      dh, dc: cotangents of the carry after the stretch.

    Returns:
      ``(dh, dc, dz)``: carry cotangents before the stretch and ``δz_t`` ``[T, B, 4H]`` (zero at invalid steps).
    """
    if isinstance(saved, native.Tape):
        return native.lstm_backward(W, saved, c0, dys, _lengths_of(valid_t), dh, dc)
    gates, cs = saved
    WT = W.T
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)

    def step(carry, inp):
        dh, dc = carry
        if valid_t is not None:
            *step_gates, c, cp, dy, valid = inp
        else:
            (*step_gates, c, cp, dy), valid = inp, None
        dz_parts, dc_new = bptt.lstm_step_backward_parts(step_gates, jnp.tanh(c), cp, dh + dy, dc)
        # One [B, 4H] block feeds the product and is the step's only output: on XLA:CPU emitting the four parts
        # as four outputs (four per-step writes, and a concatenate after the loop) took 1.3x the loop's time.
        dz = jnp.concatenate(dz_parts, axis=-1)
        if valid is None:
            return (dz @ WT, dc_new), dz
        keep = valid[:, None]
        dz = jnp.where(keep, dz, jnp.zeros((), dz.dtype))
        return (jnp.where(keep, dz @ WT, dh), jnp.where(keep, dc_new, dc)), dz

    inputs = (*gates, cs, c_prev, dys) + (() if valid_t is None else (valid_t,))
    (dh, dc), dz = lax.scan(step, vary_like((dh, dc), WT, inputs), inputs, reverse=True, unroll=steps_per_iteration)
    return dh, dc, dz


def _lengths_of(valid_t):
    return None if valid_t is None else valid_t.sum(axis=0, dtype=jnp.int32)


# Batch from which the native kernel forms the weight gradients inside its backward loop (a product of depth B per
# step) rather than leaving them to one GEMM after it, and with them the input gradient (δz_t Uᵀ per step).
# Training step, weight gradients in-loop over after-loop, 6-10 alternating rounds on a 2-core AMD EPYC (AVX2):
# 0.88-0.95x at (32, 500, 64, 128) and (64, 34, 200, 256), 0.97-1.05x at (128, 100, 256, 512), 1.05x at
# (16, 100, 128, 256) and 0.99x at batch 8, where the product is too thin.
KERNEL_WEIGHT_GRADS_MIN_BATCH = 32


def _backward_and_grads(U, W, saved, c0, dys, valid_t, dh, dc, steps_per_iteration, xs_t, h0, ys, want_dxs):
    """``_backward_loop``, the weight gradients and the input gradient of the stretch:
    ``(dh, dc, (dU, dW, db), dxs_t)``, ``dxs_t`` ``[T, B, I]`` time-major, or None without ``want_dxs``.

    ``xs_t`` ``[T, B, I]`` and ``ys`` ``[T, B, H]`` are the stretch's inputs and outputs, ``h0`` the hidden state
    before it. At batch ≥ ``KERNEL_WEIGHT_GRADS_MIN_BATCH`` the native kernel forms both gradients inside its loop
    and keeps only three steps of δz; otherwise they are GEMMs over all steps after it.
    """
    if isinstance(saved, native.Tape) and xs_t.shape[1] >= KERNEL_WEIGHT_GRADS_MIN_BATCH:
        dh, dc, _, grads, *dxs_t = native.lstm_backward(W, saved, c0, dys, _lengths_of(valid_t), dh, dc,
                                                        weight_grads_of=(xs_t, h0, ys), keep_dz=False,
                                                        input_kernel=U if want_dxs else None)
        return dh, dc, grads, dxs_t[0] if want_dxs else None
    dh, dc, dz = _backward_loop(W, saved, c0, dys, valid_t, dh, dc, steps_per_iteration)
    return dh, dc, _weight_grads(xs_t, _h_prev(h0, ys), dz), dz @ U.T if want_dxs else None


def _gemm_t(a, b):
    """``Σ_t a_tᵀ b_t`` for time-major ``[T, B, m]`` and ``[T, B, n]``: one GEMM over all ``T·B`` rows.

    On one device the operands are reshaped to ``[T·B, m]`` (free for time-major arrays). With several devices
    the batch may be sharded, and merging a sharded batch into the rows made GSPMD gather every activation onto
    every device and repeat the GEMM there; a contraction over (T, B) lets each device contract its own rows
    and adds the partial sums instead. On one device that form costs XLA:CPU a transposed copy of ``a``
    (1.0-1.2x the GEMM's time at the benchmark shapes), so it is kept for the multi-device case.
    """
    if jax.device_count() == 1:
        return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])
    return lax.dot_general(a, b, (((0, 1), (0, 1)), ((), ())))


def _weight_grads(xs_t, h_prev, dz):
    return _gemm_t(xs_t, dz), _gemm_t(h_prev, dz), dz.sum(axis=(0, 1))


def _valid(lengths, num_steps: int):
    if lengths is None:
        return None
    return jnp.arange(num_steps)[:, None] < lengths[None, :]


def _h_prev(h0, ys):
    # Outputs are zero at invalid steps, but every step whose δz is nonzero is valid and so is its
    # predecessor (validity is a prefix), so the outputs shifted by one are the previous hidden states there.
    return jnp.concatenate([h0[None], ys[:-1]], axis=0)


def _time_slice(a, k, segment: int):
    """Steps ``[k·segment, (k+1)·segment)`` of batch-major ``a`` ``[B, T, F]``, time-major ``[segment, B, F]``.

    The checkpointed path slices and transposes one segment at a time, so it never holds a time-major copy
    of the whole input or output-gradient sequence.
    """
    return jnp.moveaxis(lax.dynamic_slice_in_dim(a, k * segment, segment, axis=1), 1, 0)


def _pad_steps(a, total: int):
    """Zero-pad batch-major ``a`` ``[B, T, F]`` to ``total`` steps."""
    extra = total - a.shape[1]
    return a if extra == 0 else jnp.pad(a, ((0, 0), (0, extra), (0, 0)))


def _from_segments(a_seg, num_steps: int):
    """Stacked per-segment outputs ``[n, segment, B, F]`` -> batch-major ``[B, T, F]``."""
    n, segment, batch, features = a_seg.shape
    return jnp.transpose(a_seg, (2, 0, 1, 3)).reshape(batch, n * segment, features)[:, :num_steps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_lstm(form, loops, segment, per_iter, U, W, b, h0, c0, xs, lengths):
    """The fused LSTM on batch-major ``xs`` ``[B, T, I]`` -> ``(h, c, ys [B, T, H])``."""
    xs_t = jnp.moveaxis(xs, 1, 0)
    h, c, ys, _ = _forward_loop(form, loops, U, W, b, h0, c0, xs_t, _valid(lengths, xs_t.shape[0]), False, per_iter)
    return h, c, jnp.moveaxis(ys, 0, 1)


def _fused_lstm_fwd(form, loops, segment, per_iter, U, W, b, h0, c0, xs, lengths):
    # With symbolic zeros each primal arrives as (value, perturbed): the backward pass skips the input
    # gradient GEMM (a [T, B, I] buffer) when nobody differentiates with respect to xs.
    want_dxs = () if xs.perturbed else None
    U, W, b, h0, c0, xs = (a.value for a in (U, W, b, h0, c0, xs))
    # Kept for the backward pass; with the (time-major or padded) inputs saved below they also carry the
    # primals' shard_map types, which `sum_like` matches the cotangents to.
    params_and_carry = (U, W, b, h0, c0)
    lengths = None if lengths is None else lengths.value
    num_steps = xs.shape[1]
    if segment is None:
        xs_t = jnp.moveaxis(xs, 1, 0)
        valid_t = _valid(lengths, num_steps)
        h, c, ys, saved = _forward_loop(form, loops, U, W, b, h0, c0, xs_t, valid_t, True, per_iter)
        return (h, c, jnp.moveaxis(ys, 0, 1)), (params_and_carry, (xs_t, lengths, ys, saved, want_dxs))
    # Checkpointed: keep the carry at each segment start, nothing else per step.
    n = -(-num_steps // segment)
    if lengths is None and n * segment != num_steps:
        lengths = jnp.full(xs.shape[:1], num_steps, jnp.int32)  # the padded tail must not move the carry
    xs = _pad_steps(xs, n * segment)

    def run_segment(carry, k):
        valid = None if lengths is None else _valid(lengths - k * segment, segment)
        h, c, ys, _ = _forward_loop(form, loops, U, W, b, *carry, _time_slice(xs, k, segment), valid, False, per_iter)
        return (h, c), (carry, ys)

    (h, c), (starts, ys) = lax.scan(run_segment, vary_like((h0, c0), U, W, b, xs, lengths), jnp.arange(n))
    return (h, c, _from_segments(ys, num_steps)), (params_and_carry, (starts, xs, lengths, want_dxs))


def _instantiate(ct, shape, dtype):
    return jnp.zeros(shape, dtype) if isinstance(ct, SymbolicZero) else ct


def _fused_lstm_bwd(form, loops, segment, per_iter, res, cotangents):
    params_and_carry, res = res
    grads = _fused_lstm_grads(form, loops, segment, per_iter, params_and_carry, res, cotangents)
    inputs = res[0] if segment is None else res[1]  # xs_t or the padded xs: the same shard_map type as xs
    return sum_like(grads, (*params_and_carry, inputs, None))


def _fused_lstm_grads(form, loops, segment, per_iter, params_and_carry, res, cotangents):
    U, W, b, h0, c0 = params_and_carry
    if segment is None:
        xs_t, lengths, ys, saved, want_dxs = res
        num_steps, batch = xs_t.shape[:2]
    else:
        starts, xs, lengths, want_dxs = res
        batch = xs.shape[0]
    hidden, dtype = W.shape[0], W.dtype
    dh, dc = (_instantiate(ct, (batch, hidden), dtype) for ct in cotangents[:2])
    if segment is None:
        dys = jnp.moveaxis(_instantiate(cotangents[2], (batch, num_steps, hidden), dtype), 1, 0)
        valid_t = _valid(lengths, num_steps)
        dh0, dc0, (dU, dW, db), dxs_t = _backward_and_grads(U, W, saved, c0, dys, valid_t, dh, dc, per_iter,
                                                            xs_t, h0, ys, want_dxs is not None)
        dxs = None if want_dxs is None else jnp.moveaxis(dxs_t, 0, 1)
        return dU, dW, db, dh0, dc0, dxs, None
    n = starts[0].shape[0]
    num_steps = cotangents[2].shape[1]
    dys = _pad_steps(_instantiate(cotangents[2], (batch, num_steps, hidden), dtype), n * segment)

    def segment_bwd(carry, seg):
        dh, dc, dU, dW, db = carry
        h0, c0, k = seg
        valid = None if lengths is None else _valid(lengths - k * segment, segment)
        x_seg = _time_slice(xs, k, segment)
        _, _, ys, saved = _forward_loop(form, loops, U, W, b, h0, c0, x_seg, valid, True, per_iter)
        dh, dc, (gU, gW, gb), dx = _backward_and_grads(U, W, saved, c0, _time_slice(dys, k, segment), valid,
                                                       dh, dc, per_iter, x_seg, h0, ys, want_dxs is not None)
        return (dh, dc, dU + gU, dW + gW, db + gb), dx

    zeros = (jnp.zeros_like(U), jnp.zeros_like(W), jnp.zeros_like(b))
    init = vary_like((dh, dc, *zeros), U, W, b, starts, xs, dys, lengths)
    (dh0, dc0, dU, dW, db), dxs = lax.scan(segment_bwd, init, (*starts, jnp.arange(n)),
                                           reverse=True)
    if want_dxs is not None:
        dxs = _from_segments(dxs, num_steps)
    return dU, dW, db, dh0, dc0, dxs, None


_fused_lstm.defvjp(_fused_lstm_fwd, _fused_lstm_bwd, symbolic_zeros=True)


def _choose_form(batch: int) -> str:
    """Where z_t's input product goes, by shape (measured on a 2-core x86 CPU, see benchmarks/RESULTS.md).

    At batch 1 the per-step products are matrix-vector products, so hoisting ``xs U`` out of the loop as one
    tall GEMM removes half of them. At larger batches one ``[x_t, h] [U; W]`` product per step (deeper
    contraction, one call instead of two plus an add) measured fastest: 0.87x (CPU time) of the two-product
    form at (64, 34, 200, 256) and 0.95x at (32, 500, 64, 128); hoisting was slowest there (1.2-1.3x), as
    the issue's prototype also found.
    """
    return "hoist" if batch <= 8 else "concat"


def _flatten_batch(params, carry, xs):
    """Flatten any leading batch dimensions into one: the fused and cuDNN loops work on ``[B, T, ...]``.

    Returns ``(leading, xs [B, T, I], h0 [B, H], c0 [B, H])``.
    """
    leading = batch_shape(xs)
    hidden = cells.hidden_size(params)
    batch = int(np.prod(leading)) if leading else 1
    return (leading, xs.reshape(batch, *xs.shape[-2:]), carry.h.reshape(batch, hidden),
            carry.c.reshape(batch, hidden))


def _unflatten_batch(leading, h, c, ys):
    """Inverse of ``_flatten_batch`` for the results: ``(LSTMState, ys [*batch, T, H])``."""
    hidden = h.shape[-1]
    return (LSTMState(h.reshape(*leading, hidden), c.reshape(*leading, hidden)),
            ys.reshape(*leading, ys.shape[-2], hidden))


def _run_fused(params, carry, xs, lengths, reverse, segment, form, loops, steps_per_iteration):
    leading, xs, h0, c0 = _flatten_batch(params, carry, xs)
    batch, num_steps, _ = xs.shape
    if lengths is not None:
        lengths = clip_lengths(lengths, num_steps).reshape(batch)
    if reverse:
        xs = _reverse_steps(xs, lengths)
    form = form or _choose_form(batch)
    h, c, ys = _fused_lstm(form, loops, segment, steps_per_iteration, params["U"], params["W"], params["b"], h0, c0, xs,
                           lengths)
    if reverse:
        ys = _reverse_steps(ys, lengths)
    return _unflatten_batch(leading, h, c, ys)


def _reverse_steps(a, lengths):
    """Reverse batch-major ``a`` ``[B, T, F]`` in time, inside each length when ``lengths`` is given.

    Along ``a``'s own time axis, not through a time-major transpose: on an H200 (jax 0.11.2) the transposed
    form, fed to cuDNN under ``jit``, gave wrong outputs (max error 0.8; right in eager mode and when the same
    input came from the host), and this form matches ``unroll`` to 6e-8 there. The likely cause: cuDNN's custom
    call puts no layout constraint on its operands, so XLA may hand it the transpose's layout.
    """
    return jnp.flip(a, 1) if lengths is None else reverse_within_lengths(a, lengths, time_axis=1)


# ----------------------------------------------------------------------------------------------------------
# cuDNN LSTM (jax.experimental.rnn), CUDA GPUs only


def _cudnn_available(xs, params) -> bool:
    """Whether ``jax.experimental.rnn`` can run this call: float32 on a CUDA GPU default backend."""
    if xs.dtype != jnp.float32 or params["W"].dtype != jnp.float32 or jax.default_backend() != "gpu":
        return False
    # jax reports both CUDA and ROCm devices as "gpu"; the cuDNN lowering is the one tested here.
    return "rocm" not in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def to_cudnn_weights(params) -> jax.Array:
    """Pack jaxseq LSTM params into cuDNN's flat vector for one layer, one direction.

    cuDNN (and ``jax.experimental.rnn``) stores ``W_ih [4H, I]`` (= ``U.T``), ``W_hh [4H, H]`` (= ``W.T``),
    then ``b_ih`` and ``b_hh`` (``b`` and zeros), gates i, f, g, o as jaxseq.
    """
    b = params["b"]
    return jnp.concatenate([params["U"].T.reshape(-1), params["W"].T.reshape(-1), b, jnp.zeros_like(b)])


def _cudnn_precision():
    """The float32 matmul precision for cuDNN, following ``jax_default_matmul_precision`` like the other paths.

    Unset (JAX's default) lets cuDNN use TF32 tensor cores on Ampere and later, as XLA's own float32 dots may;
    "highest"/"float32" gives strict float32. cuDNN's LSTM offers nothing between TF32 and float32, so every
    other setting ("high", "tensorfloat32", "bfloat16", "default", ...) maps to TF32 (``Precision.HIGH``).
    """
    setting = jax.config.jax_default_matmul_precision
    if setting is None:
        return None
    return lax.Precision.HIGHEST if str(setting).lower() in ("highest", "float32") else lax.Precision.HIGH


def _run_cudnn(params, carry, xs, lengths, reverse):
    from jax.experimental import rnn as jrnn  # imported here: only the cuDNN path needs it

    leading, xs, h0, c0 = _flatten_batch(params, carry, xs)
    batch, num_steps, in_size = xs.shape
    hidden = h0.shape[-1]
    full = lengths is None
    lengths = (jnp.full((batch,), num_steps, jnp.int32) if full else clip_lengths(lengths, num_steps).reshape(batch))
    if reverse:
        xs = _reverse_steps(xs, lengths)
    # cuDNN fails on zero-length sequences (jax-ml/jax#17966): run them as length 1 and restore the initial
    # carry and zero outputs afterwards, which also gives them zero gradient through cuDNN.
    empty = lengths == 0
    ys, h, c = jrnn.lstm(xs, h0[None], c0[None], to_cudnn_weights(params), jnp.maximum(lengths, 1),
                         input_size=in_size, hidden_size=hidden, num_layers=1, dropout=0.0,
                         bidirectional=False, precision=_cudnn_precision())
    h = jnp.where(empty[:, None], h0, h[0])
    c = jnp.where(empty[:, None], c0, c[0])
    if not full:
        ys = jnp.where((jnp.arange(num_steps)[None, :] < lengths[:, None])[..., None], ys, 0.0)
    if reverse:
        ys = _reverse_steps(ys, lengths)
    return _unflatten_batch(leading, h, c, ys)


# ----------------------------------------------------------------------------------------------------------
# Public layers


def lstm(params, xs, *, carry=None, lengths=None, reverse: bool = False, impl: str = "auto",
         checkpoint=None, form: str | None = None, unroll: int | None = None):
    """The LSTM layer over ``xs`` ``[*batch, time, features]``: ``layer(cells.lstm, params, xs, ...)``.

    It is also the fused layer every ``cells.make_lstm`` cell declares (``FUSED["lstm"]``). Same results as
    ``jaxseq.unroll(cells.lstm.apply, params, carry, xs, lengths=..., reverse=...)``.

    Args:
      params: ``{"U": [I, 4H], "W": [H, 4H], "b": [4H]}``, gates i, f, g, o (``jaxseq.cells.lstm.init``).
      xs: inputs ``[*batch, time, features]``.
      carry: initial ``LSTMState(h, c)``, each ``[*batch, hidden]`` (a pair is converted); zeros by default.
      lengths: optional ``int[*batch]`` valid lengths in ``[0, time]``; padded steps keep the carry and emit
        zeros, ``reverse`` runs inside each length.
      reverse: run backwards in time (outputs stay aligned with inputs).
      impl: ``"auto"``, ``"scan"``, ``"fused"``, ``"native"`` or ``"cudnn"`` (see the module docstring).
      checkpoint: ``None`` (store what the backward pass needs for every step), ``"sqrt"`` (segments of
        ``ceil(√time)`` steps) or an int segment length: store only segment-start carries and recompute each
        segment in the backward pass (about one extra forward pass of time for ``O(√T)`` memory).
      form: fused paths only, where the input product goes: ``"hoist"``, ``"step"`` or ``"concat"`` (see
        ``FORMS``); None picks by shape (``_choose_form``).
      unroll: time steps per loop iteration of the scan and fused paths (``lax.scan``'s ``unroll``), as in
        Flax's ``nn.RNN``; results do not depend on it. None: 16 on GPU, 1 elsewhere (``DEFAULT_UNROLL``).

    Returns:
      ``(final_carry, ys)``: ``LSTMState`` after each sequence's last valid step, outputs ``[*batch, time, H]``.
    """
    _check_impl(impl)
    unroll = _resolve_unroll(unroll)
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None, got {form!r}")
    xs, carry, lengths = _prepare(cells.lstm, params, xs, carry, lengths)
    segment = _segment_length(checkpoint, xs.shape[-2])
    if impl == "scan":
        return _scan_layer(cells.lstm.apply, params, carry, xs, lengths, reverse, segment, unroll)
    if impl == "cudnn":
        if segment is None and _cudnn_available(xs, params):
            return _run_cudnn(params, carry, xs, lengths, reverse)
        impl = "auto"
    return _run_fused(params, carry, xs, lengths, reverse, segment, form, impl, unroll)


#: The fused layers a cell may declare (``Cell.fused``): each computes exactly that cell's step over a whole
#: sequence, with ``lstm``'s signature, for ``impl`` in ``"auto"``, ``"fused"``, ``"native"``, ``"cudnn"``.
FUSED: dict[str, Callable] = {"lstm": lstm}


def _fused_layer(cell: Cell, impl: str) -> Callable | None:
    """The fused layer that runs ``cell`` with ``impl``, or None for the reference loop."""
    if impl == "scan":
        return None
    if cell.fused is None:
        if impl == "auto":
            return None
        raise ValueError(f"impl={impl!r} needs a cell that declares a fused layer (Cell.fused, e.g. cells.lstm or "
                         f"any cells.make_lstm cell); this cell runs the reference loop: impl='auto' or 'scan'")
    if cell.fused not in FUSED:
        raise ValueError(f"cell.fused must name one of jaxseq.layers.FUSED {sorted(FUSED)} or be None, got "
                         f"{cell.fused!r}")
    return FUSED[cell.fused]


def layer(cell: Cell, params, xs, *, carry=None, lengths=None, reverse: bool = False, impl: str = "auto",
          checkpoint=None, unroll: int | None = None, time_major: bool = False):
    """Run ``cell`` over the time axis of ``xs``: the one public way to run a recurrent layer.

    Args:
      cell: any ``jaxseq.cells.Cell``. One that declares a fused layer (``cell.fused``; every
        ``cells.make_lstm`` cell) runs through it unless ``impl="scan"``; any other runs the reference loop.
      params: the cell's params (``cell.init``).
      xs: inputs ``[*batch, time, features]`` (``[time, *batch, features]`` if ``time_major``).
      carry: initial carry, leaves ``[*batch, hidden]``; zeros of ``params["W"]``'s hidden size by default.
      lengths: optional ``int[*batch]`` valid lengths in ``[0, time]`` (an array or a list of ints); padded
        steps keep the carry and emit zeros.
      reverse: run backwards in time, inside each sequence's length; outputs stay aligned with their inputs.
      impl: ``"auto"`` (fast by default), ``"scan"`` (the reference loop), ``"fused"``, ``"native"`` or
        ``"cudnn"`` (see the module docstring). A static choice: pass it as a Python string.
      checkpoint: None, ``"sqrt"`` or an int segment length: recompute segments in the backward pass
        (``O(√T)`` activation memory).
      unroll: time steps per loop iteration; None: ``DEFAULT_UNROLL`` for the backend.
      time_major: whether ``xs`` and the returned ``ys`` put time first.

    Returns:
      ``(final_carry, ys)``: the carry after each sequence's last valid step and the outputs
      ``[*batch, time, out]`` (time-major if ``time_major``).
    """
    _check_impl(impl)
    fused = _fused_layer(cell, impl)
    if time_major:
        if np.ndim(xs) < 2:
            check_sequence_inputs(params, carry, xs, lengths, time_major=True)  # raises the rank error
        final, ys = layer(cell, params, jnp.moveaxis(jnp.asarray(xs), 0, -2), carry=carry, lengths=lengths,
                          reverse=reverse, impl=impl, checkpoint=checkpoint, unroll=unroll)
        return final, jnp.moveaxis(ys, -2, 0)
    if fused is not None:
        return fused(params, xs, carry=carry, lengths=lengths, reverse=reverse, impl=impl, checkpoint=checkpoint,
                     unroll=unroll)
    unroll = _resolve_unroll(unroll)
    xs, carry, lengths = _prepare(cell, params, xs, carry, lengths)
    return _scan_layer(cell.apply, params, carry, xs, lengths, reverse, _segment_length(checkpoint, xs.shape[-2]),
                       unroll)


def gru(params, xs, *, carry=None, lengths=None, reverse: bool = False, impl: str = "auto", checkpoint=None,
        unroll: int | None = None):
    """A GRU layer (params from ``jaxseq.cells.gru.init``): ``layer(cells.gru, params, xs, ...)``.

    Arguments and results as ``layer``; the carry is ``h`` ``[*batch, hidden]``. The GRU has no fused layer
    yet, so ``impl`` is ``"auto"`` or ``"scan"``, both the reference loop.
    """
    return layer(cells.gru, params, xs, carry=carry, lengths=lengths, reverse=reverse, impl=impl,
                 checkpoint=checkpoint, unroll=unroll)


def rnn(params, xs, *, carry=None, lengths=None, reverse: bool = False, impl: str = "auto", checkpoint=None,
        activation: str = "tanh", unroll: int | None = None):
    """The chapter's simple RNN layer, tanh or relu: ``layer(cells.make_rnn(activation), params, xs, ...)``.

    Arguments and results as ``layer``; the carry is ``s`` ``[*batch, hidden]``. Reference loop only.
    """
    return layer(cells.make_rnn(activation), params, xs, carry=carry, lengths=lengths, reverse=reverse, impl=impl,
                 checkpoint=checkpoint, unroll=unroll)


def init_bidirectional(cell: Cell, key, input_size: int, hidden_size: int, dtype=jnp.float32) -> dict:
    """Params ``{"forward": ..., "backward": ...}`` for ``bidirectional``."""
    k_f, k_b = jax.random.split(key)
    return {"forward": cell.init(k_f, input_size, hidden_size, dtype),
            "backward": cell.init(k_b, input_size, hidden_size, dtype)}


def bidirectional(cell: Cell, params, xs, *, carry=None, lengths=None, merge: str | None = "concat",
                  impl: str = "auto", checkpoint=None, unroll: int | None = None, time_major: bool = False):
    """Run ``cell`` forwards and, padding-aware, backwards over ``xs`` (each direction a ``layer``) and merge.

    Args:
      cell, xs, lengths, impl, checkpoint, unroll, time_major: as ``layer``, for both directions.
      params: ``{"forward": cell_params, "backward": cell_params}`` (``init_bidirectional``).
      carry: optional ``(forward_carry, backward_carry)``; zeros by default.
      merge: ``"concat"`` (``[..., 2 * hidden]``), ``"sum"``, ``"mean"``, ``"mul"``, or ``None`` for the pair.

    Returns:
      ``((forward_final, backward_final), ys)``; the backward final carry is the state after each sequence's
      first element.
    """
    check_merge(merge)
    check_directions(params)
    for d in ("forward", "backward"):
        check_cell_params(cell, params[d], f'params["{d}"]', needs_hidden=carry is None)
    if carry is None:
        carry = (None, None)
    else:
        check_carry_pair(carry)
    kwargs = dict(lengths=as_lengths(lengths), impl=impl, checkpoint=checkpoint, unroll=unroll,
                  time_major=time_major)
    c_f, y_f = layer(cell, params["forward"], xs, carry=carry[0], reverse=False, **kwargs)
    c_b, y_b = layer(cell, params["backward"], xs, carry=carry[1], reverse=True, **kwargs)
    return (c_f, c_b), merge_outputs(y_f, y_b, merge)


_bidirectional = bidirectional  # `stacked` takes an argument named `bidirectional`, which shadows the function.


def init_stacked(cell: Cell, key, input_size: int, hidden_size: int, num_layers: int, *,
                 bidirectional: bool = False, merge: str = "concat", dtype=jnp.float32) -> list:
    """Params for ``stacked``: one entry per layer (``{"forward", "backward"}`` when bidirectional)."""
    cells.check_size("num_layers", num_layers)
    params, size = [], input_size
    for k in jax.random.split(key, num_layers):
        if bidirectional:
            params.append(init_bidirectional(cell, k, size, hidden_size, dtype))
            size = 2 * hidden_size if merge == "concat" else hidden_size
        else:
            params.append(cell.init(k, size, hidden_size, dtype))
            size = hidden_size
    return params


def stacked(cell: Cell, layer_params: Sequence[Any], xs, *, lengths=None, bidirectional: bool = False,
            merge: str = "concat", dropout_rate: float = 0.0, key=None, impl: str = "auto", checkpoint=None,
            unroll: int | None = None, time_major: bool = False):
    """Stack recurrent layers, each reading the previous layer's outputs, with dropout between layers.

    Dropout (as PyTorch's ``nn.LSTM(dropout=...)``) applies to each layer's input except the first, so not
    after the last layer. Pass ``key`` to enable it (training); ``key=None`` means deterministic. Each layer
    runs through ``layer`` (or ``bidirectional``) with ``impl``, ``checkpoint``, ``unroll`` and ``time_major``.

    Args:
      layer_params: a non-empty list with one entry per layer (``init_stacked``), each checked against
        ``cell`` up front.

    Returns:
      ``(final_carries, ys)``: a list with each layer's final carry and the last layer's outputs.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate}")
    if bidirectional and merge is None:
        raise ValueError("stacked bidirectional layers need a merge mode that gives one output, not None")
    if isinstance(layer_params, Mapping) or not isinstance(layer_params, (list, tuple)):
        raise ValueError(f"layer_params must be a list with one entry per layer (jaxseq.layers.init_stacked), got a "
                         f"{type(layer_params).__name__}")
    if not layer_params:
        raise ValueError("stacked needs at least one layer, got layer_params=[] (init_stacked with num_layers >= 1)")
    for depth, params in enumerate(layer_params):
        name = f"layer_params[{depth}]"
        if bidirectional:
            check_directions(params, name)
            for d in ("forward", "backward"):
                check_cell_params(cell, params[d], f'{name}["{d}"]')
        else:
            check_cell_params(cell, params, name)
    carries, ys, lengths = [], xs, as_lengths(lengths)
    kwargs = dict(lengths=lengths, impl=impl, checkpoint=checkpoint, unroll=unroll, time_major=time_major)
    for depth, params in enumerate(layer_params):
        if depth > 0 and key is not None:
            ys = dropout(ys, dropout_rate, jax.random.fold_in(key, depth))
        if bidirectional:
            carry, ys = _bidirectional(cell, params, ys, merge=merge, **kwargs)
        else:
            carry, ys = layer(cell, params, ys, **kwargs)
        carries.append(carry)
    return carries, ys
