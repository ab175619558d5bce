"""Hand-derived backpropagation through time: the chapter's formulas as code, no autodiff inside.

Each backward pass is an explicit recursion over time (a reversed ``lax.scan`` whose body is the chapter's
formula), followed by the weight gradients as sums over all timesteps. The tests check every function against
``jax.grad`` through ``jaxseq.unroll`` and against finite differences.

Conventions are those of ``jaxseq.cells`` (row vectors): the chapter's ``U x_t`` is ``x_t @ U`` with ``U``
``[input, hidden]``, ``W s_{t-1}`` is ``s_{t-1} @ W`` with ``W`` ``[hidden, hidden]``, and the output layer
``V s_T + c`` is ``s_T @ V + c`` with ``V`` ``[hidden, classes]``. Inputs may carry leading batch
dimensions (``[*batch, time, features]``); losses are then summed over the batch.

References:
  Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks" (eqs. 3-5).
  Hochreiter & Schmidhuber 1997; Gers, Schmidhuber & Cummins 2000 (the LSTM with a forget gate).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseq import cells
from jaxseq.cells import LSTMState
from jaxseq.sequences import check_sequence_inputs, vary_like

_ACTIVATIONS = ("tanh", "relu")


def _time_major(x):
    return jnp.moveaxis(x, -2, 0)


def _outer_sum(a, b):
    """``Σ over time and batch of a_t^T b_t`` for time-major ``a [T, *batch, m]``, ``b [T, *batch, n]``."""
    return jnp.einsum("...i,...j->ij", a, b)


def _activation_grad(activation: str, s):
    """Derivative of the activation at its output ``s``: tanh' = 1 - s², relu' = [s > 0]."""
    return 1.0 - s * s if activation == "tanh" else (s > 0).astype(s.dtype)


def _rnn_forward(params, xs_t, activation: str):
    """States ``s_0 .. s_T`` ``[T + 1, *batch, H]`` of ``s_t = f(x_t U + s_{t-1} W + b)``, ``s_0 = 0``."""
    f = jnp.tanh if activation == "tanh" else jax.nn.relu
    # vary_like: inside shard_map the zero start must vary over the mesh like the (batch-sharded) inputs.
    s0 = vary_like(jnp.zeros(xs_t.shape[1:-1] + (params["W"].shape[0],), xs_t.dtype), params, xs_t)

    def step(s, x):
        s = f(x @ params["U"] + s @ params["W"] + params["b"])
        return s, s

    _, states = lax.scan(step, s0, xs_t)
    return jnp.concatenate([s0[None], states], axis=0)


def _rnn_backward(params, xs_t, states, dstates, activation: str):
    """Backward recursion ``δs_{t-1} = W^T δa_t`` with ``δa_t = f'(s_t) ⊙ (δs_t)``.

    ``dstates [T, *batch, H]`` holds the loss gradient arriving at each ``s_t`` from outside the recurrence
    (from the output layer). Returns the gradients of ``U``, ``W``, ``b``.
    """

    def step(ds_next, inputs):
        s_t, ds_out = inputs
        da = _activation_grad(activation, s_t) * (ds_out + ds_next)
        return da @ params["W"].T, da

    ds_last = vary_like(jnp.zeros_like(dstates[0]), params, states, dstates)
    _, da = lax.scan(step, ds_last, (states[1:], dstates), reverse=True)
    return {"U": _outer_sum(xs_t, da), "W": _outer_sum(states[:-1], da), "b": da.sum(axis=tuple(range(da.ndim - 1)))}


def _softmax_xent(logits, labels):
    """Cross-entropy and its gradient with respect to the logits (``softmax - onehot``)."""
    log_p = jax.nn.log_softmax(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -(onehot * log_p).sum(), jnp.exp(log_p) - onehot


def _check_rnn(params, xs, activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    missing = {"U", "W", "b", "V", "c"} - set(params)
    if missing:
        raise ValueError(f"params must hold the chapter's U, W, b, V, c; missing {sorted(missing)}")
    cells.check_params(params, "rnn")
    hidden, V, c = params["W"].shape[0], tuple(np.shape(params["V"])), tuple(np.shape(params["c"]))
    if len(V) != 2 or V[0] != hidden or c != V[1:]:
        raise ValueError(f'params["V"] {V} and params["c"] {c} must be the readout V [H, classes] and c [classes] '
                         f"with H = {hidden} (rows of W)")
    check_sequence_inputs(params, None, xs)


def _check_labels(labels, name: str, expected_shape: tuple, num_classes: int):
    """``labels`` as an array, checked: integer dtype, ``expected_shape``, and when concrete in ``[0, classes)``.

    ``one_hot`` of an out-of-range label is all zeros, which would give a silent loss of 0.
    """
    labels = labels if isinstance(labels, jax.Array) else np.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != expected_shape:
        raise ValueError(f"{name} has shape {tuple(labels.shape)}; expected {expected_shape} (one class per "
                         f"{'sequence' if name == 'label' else 'time step'} of xs)")
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        values = np.asarray(labels)
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (columns of V); got values from {values.min()} "
                             f"to {values.max()}")
    return jnp.asarray(labels)


def rnn_many_to_one_grads(params, xs, label, *, activation: str = "tanh"):
    """Loss and gradients of the chapter's many-to-one RNN, by hand.

    Model: ``s_t = tanh(x_t U + s_{t-1} W + b)``, ``s_0 = 0``; ``ŷ = softmax(s_T V + c)``;
    ``L = -log ŷ[label]``. Backward: ``δo = ŷ - y``; ``∂L/∂V = s_T^T δo``; ``∂L/∂c = δo``;
    ``δs_T = δo V^T``; ``δa_t = (1 - s_t²) ⊙ δs_t``; ``δs_{t-1} = δa_t W^T``;
    ``∂L/∂W = Σ_t s_{t-1}^T δa_t``, ``∂L/∂U = Σ_t x_t^T δa_t``, ``∂L/∂b = Σ_t δa_t``.

    Args:
      params: ``{"U": [I, H], "W": [H, H], "b": [H], "V": [H, D], "c": [D]}``.
      xs: ``[*batch, time, I]``.
      label: integer class ``[*batch]`` in ``[0, classes)`` (checked when concrete).
      activation: ``"tanh"`` (the chapter's) or ``"relu"``.

    Returns:
      ``(loss, grads)`` with grads keyed like ``params``; the loss is summed over any batch dimensions.
    """
    _check_rnn(params, xs, activation)
    label = _check_labels(label, "label", tuple(np.shape(xs)[:-2]), params["V"].shape[1])
    xs_t = _time_major(jnp.asarray(xs))
    states = _rnn_forward(params, xs_t, activation)
    loss, d_logits = _softmax_xent(states[-1] @ params["V"] + params["c"], label)
    dstates = jnp.zeros_like(states[1:]).at[-1].set(d_logits @ params["V"].T)
    grads = _rnn_backward(params, xs_t, states, dstates, activation)
    grads["V"] = jnp.einsum("...i,...j->ij", states[-1], d_logits)
    grads["c"] = d_logits.reshape(-1, d_logits.shape[-1]).sum(axis=0)
    return loss, grads


def rnn_many_to_many_grads(params, xs, labels, *, activation: str = "tanh"):
    """Loss and gradients of the many-to-many RNN: ``L = Σ_t CE(softmax(s_t V + c), y_t)``.

    Same recursion as ``rnn_many_to_one_grads`` with ``δs_t = δo_t V^T + δa_{t+1} W^T`` at every step.

    Args:
      params: as ``rnn_many_to_one_grads``.
      xs: ``[*batch, time, I]``.
      labels: integer classes ``[*batch, time]`` in ``[0, classes)`` (checked when concrete).
    """
    _check_rnn(params, xs, activation)
    labels = _check_labels(labels, "labels", tuple(np.shape(xs)[:-1]), params["V"].shape[1])
    xs_t = _time_major(jnp.asarray(xs))
    states = _rnn_forward(params, xs_t, activation)
    labels_t = jnp.moveaxis(labels, -1, 0)
    loss, d_logits = _softmax_xent(states[1:] @ params["V"] + params["c"], labels_t)
    grads = _rnn_backward(params, xs_t, states, d_logits @ params["V"].T, activation)
    grads["V"] = _outer_sum(states[1:], d_logits)
    grads["c"] = d_logits.reshape(-1, d_logits.shape[-1]).sum(axis=0)
    return loss, grads


class LSTMTape(NamedTuple):
    """What the LSTM forward keeps for the backward pass, time-major ``[T, *batch, H]``.

    ``h_prev``/``c_prev`` are the carries entering each step; ``i, f, g, o`` the activated gates;
    ``tanh_c`` is ``tanh(c_t)``.
    """

    h_prev: jax.Array
    c_prev: jax.Array
    i: jax.Array
    f: jax.Array
    g: jax.Array
    o: jax.Array
    tanh_c: jax.Array


class LSTMGrads(NamedTuple):
    """Gradients from ``lstm_grads``: ``params`` (``U``, ``W``, ``b``), ``xs`` (like the input) and ``carry0``."""

    params: dict
    xs: jax.Array
    carry0: LSTMState


def lstm_forward(params, xs_t, carry0: LSTMState):
    """LSTM forward over time-major ``xs_t [T, *batch, I]``; returns ``(final_carry, hs [T, *batch, H], tape)``."""

    def step(carry, x):
        z = x @ params["U"] + carry.h @ params["W"] + params["b"]
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c = f * carry.c + i * g
        tanh_c = jnp.tanh(c)
        h = o * tanh_c
        return LSTMState(h, c), (h, LSTMTape(carry.h, carry.c, i, f, g, o, tanh_c))

    final, (hs, tape) = lax.scan(step, vary_like(carry0, params, xs_t), xs_t)
    return final, hs, tape


def lstm_step_backward(gates, tanh_c, c_prev, dh, dc_next):
    """One step of the LSTM backward recursion (shared by ``lstm_backward`` and the fused layer).

    Args:
      gates: the activated gates ``(i, f, g, o)`` of step t, each ``[*batch, H]``.
      tanh_c: ``tanh(c_t)``; c_prev: ``c_{t-1}``.
      dh: total gradient at ``h_t`` (output gradient + recurrent term from step t+1).
      dc_next: gradient arriving at ``c_t`` from step t+1 (``δc_{t+1} ⊙ f_{t+1}``).

    Returns:
      ``(δz_t [*batch, 4H], δc_t ⊙ f_t)``: the pre-activation gradient (gate order i, f, g, o) and the
      gradient passed to ``c_{t-1}``.
    """
    dz_parts, dc_prev = lstm_step_backward_parts(gates, tanh_c, c_prev, dh, dc_next)
    return jnp.concatenate(dz_parts, axis=-1), dc_prev


def lstm_step_backward_parts(gates, tanh_c, c_prev, dh, dc_next):
    """``lstm_step_backward`` with ``δz_t`` as its four gate parts ``(δz_i, δz_f, δz_g, δz_o)``, each ``[*batch, H]``.

    The fused layer reads the gates as four arrays: on XLA:CPU a loop step that slices one ``[B, 4H]`` block
    into gates runs slower than one that reads four ``[B, H]`` arrays (benchmarks/RESULTS.md).
    """
    i, f, g, o = gates
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    return (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o)), dc * f


def lstm_backward(params, xs_t, tape: LSTMTape, dhs_t, dfinal: LSTMState):
    """The LSTM backward recursion, carrying only ``(δh, δc)`` through time.

    Per step (``δh_t`` = output gradient + the recurrent term from step ``t+1``)::

        δc_t  = δh_t ⊙ o_t ⊙ (1 − tanh²c_t) + δc_{t+1} ⊙ f_{t+1}
        δz_o = δh_t ⊙ tanh c_t ⊙ o(1−o)      δz_i = δc_t ⊙ g ⊙ i(1−i)
        δz_g = δc_t ⊙ i ⊙ (1−g²)             δz_f = δc_t ⊙ c_{t−1} ⊙ f(1−f)
        δh_{t−1} = δz_t W^T                   δc_{t−1} = δc_t ⊙ f_t

    then, after the loop, ``∂U = Σ_t x_t^T δz_t``, ``∂W = Σ_t h_{t−1}^T δz_t``, ``∂b = Σ_t δz_t`` and
    ``δx_t = δz_t U^T`` as single contractions over all timesteps.

    Returns ``LSTMGrads`` with ``xs`` time-major.
    """

    def step(carry, inputs):
        dh_next, dc_next = carry
        dh_out, t = inputs
        dz, dc_prev = lstm_step_backward((t.i, t.f, t.g, t.o), t.tanh_c, t.c_prev, dh_out + dh_next, dc_next)
        return (dz @ params["W"].T, dc_prev), dz

    dlast = vary_like((dfinal.h, dfinal.c), params, dhs_t, tape)
    (dh0, dc0), dz = lax.scan(step, dlast, (dhs_t, tape), reverse=True)
    grads = {"U": _outer_sum(xs_t, dz), "W": _outer_sum(tape.h_prev, dz), "b": dz.sum(axis=tuple(range(dz.ndim - 1)))}
    return LSTMGrads(grads, dz @ params["U"].T, LSTMState(dh0, dc0))


def lstm_grads(params, xs, dhs, carry0: LSTMState | None = None, *, dcarry: LSTMState | None = None):
    """Gradients of ``Σ_t ⟨dhs_t, h_t⟩ (+ ⟨dcarry.h, h_T⟩ + ⟨dcarry.c, c_T⟩)`` for an LSTM, by hand.

    This is the vector-Jacobian product of the LSTM layer: ``dhs`` are the loss gradients arriving at each
    output ``h_t`` (many-to-many), ``dcarry`` those arriving at the final carry (many-to-one).

    Args:
      params: ``jaxseq.cells.lstm`` params ``{"U": [I, 4H], "W": [H, 4H], "b": [4H]}`` (gates i, f, g, o).
      xs: ``[*batch, time, I]``.
      dhs: ``[*batch, time, H]``.
      carry0: initial ``LSTMState`` (zeros by default).
      dcarry: gradient arriving at the final carry (zeros by default).

    Returns:
      ``LSTMGrads(params, xs, carry0)``: gradients for every parameter, the inputs ``[*batch, time, I]`` and
      the initial carry.
    """
    xs = jnp.asarray(xs)
    hidden = params["W"].shape[0]
    batch_shape = xs.shape[:-2]
    if carry0 is None:
        carry0 = LSTMState(*(jnp.zeros((*batch_shape, hidden), xs.dtype),) * 2)
    check_sequence_inputs(params, carry0, xs)
    if tuple(jnp.shape(dhs)) != (*xs.shape[:-1], hidden):
        raise ValueError(f"dhs has shape {tuple(jnp.shape(dhs))}; expected {(*xs.shape[:-1], hidden)} "
                         "(one gradient per output h_t)")
    if dcarry is None:
        dcarry = LSTMState(jnp.zeros_like(carry0.h), jnp.zeros_like(carry0.c))
    xs_t = _time_major(xs)
    _, _, tape = lstm_forward(params, xs_t, carry0)
    grads = lstm_backward(params, xs_t, tape, _time_major(jnp.asarray(dhs)), dcarry)
    return grads._replace(xs=jnp.moveaxis(grads.xs, 0, -2))
