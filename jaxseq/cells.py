"""Pure recurrent cells: the chapter's RNN, LSTM and GRU as three pure functions each.

A cell is ``Cell(init, init_carry, apply, kind)``:

* ``init(key, input_size, hidden_size, dtype=float32) -> params`` (a dict of arrays),
* ``init_carry(batch_shape, hidden_size, dtype=float32) -> carry`` (zeros),
* ``apply(params, carry, x) -> (carry, y)``: one time step, exactly a ``lax.scan`` body once ``params``
  are bound. ``x`` is ``[*batch, input_size]`` with any number of leading batch dimensions (none too).
* ``kind``: ``"lstm"`` for cells from ``make_lstm`` (their step is the standard LSTM, so ``jaxseq.scan.layer``
  may run them as the fused layer ``jaxseq.layers.lstm``), ``"custom"`` (the default) otherwise.

Parameter layout (one convention for every cell, row vectors so that a batch is one GEMM):

* ``U``: input kernel ``[input_size, k * hidden]``; the chapter's ``U x_t`` is ``x_t @ U`` here, i.e. the
  stored array is the transpose of the chapter's ``m x n`` matrix.
* ``W``: recurrent kernel ``[hidden, k * hidden]``; the chapter's ``W s_{t-1}`` is ``s_{t-1} @ W``.
* ``b``: bias ``[k * hidden]``. The GRU has a second bias ``b_h`` (see below).

Gate blocks along the last axis (each ``hidden`` wide):

* RNN  (k=1): ``s_t = f(x_t U + s_{t-1} W + b)``, ``f`` = tanh or relu.
* LSTM (k=4): order **i, f, g, o** (input, forget, candidate c̃, output)::

      i = σ(z_i)  f = σ(z_f)  g = tanh(z_g)  o = σ(z_o)      z = x_t U + h_{t-1} W + b
      c_t = f ⊙ c_{t-1} + i ⊙ g                              h_t = o ⊙ tanh(c_t)

  PyTorch ``nn.LSTM`` uses the same order (i, f, g, o) with ``weight_ih [4H, I]`` (= ``U.T``),
  ``weight_hh [4H, H]`` (= ``W.T``) and two biases (``b = b_ih + b_hh``). Keras ``LSTM`` uses the same
  order (i, f, c, o) and the same layout: ``kernel`` = ``U``, ``recurrent_kernel`` = ``W``, ``bias`` = ``b``.
  The forget-gate bias starts at 1 by default (Gers et al. 2000; Keras ``unit_forget_bias``).
* GRU  (k=3): order **r, z, n** (reset, update, new) as PyTorch/cuDNN, with the reset applied after the
  recurrent product (PyTorch; Keras ``reset_after=True``)::

      r = σ(x U_r + b_r + h W_r + bh_r)   z = σ(x U_z + b_z + h W_z + bh_z)
      n = tanh(x U_n + b_n + r ⊙ (h W_n + bh_n))      h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}

  ``b`` is the input bias (PyTorch ``b_ih``), ``b_h`` the recurrent bias (``b_hh``). Keras orders its
  blocks z, r, h, so import swaps the first two (see ``jaxseq.interop``).

Initialisers follow Keras: Glorot-uniform input kernels, orthogonal recurrent kernels, zero biases; each is
overridable through the factories ``make_rnn``, ``make_lstm`` and ``make_gru``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = dict
Initializer = Callable[[jax.Array, tuple, Any], jax.Array]


class Cell(NamedTuple):
    """A recurrent cell as three pure functions (see the module docstring)."""

    init: Callable[..., Params]
    init_carry: Callable[..., Any]
    apply: Callable[[Params, Any, jax.Array], tuple[Any, jax.Array]]
    kind: str = "custom"  # "lstm": the standard LSTM step, which the fused layer may replace


class LSTMState(NamedTuple):
    """LSTM carry: hidden state ``h`` and cell state ``c``, each ``[*batch, hidden]``."""

    h: jax.Array
    c: jax.Array


glorot_uniform: Initializer = jax.nn.initializers.glorot_uniform()
orthogonal: Initializer = jax.nn.initializers.orthogonal()
zeros: Initializer = jax.nn.initializers.zeros


def _blockwise(init: Initializer, key, rows: int, hidden: int, blocks: int, dtype) -> jax.Array:
    """Initialise each gate block on its own, as Keras does for recurrent kernels (each block orthogonal)."""
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([init(k, (rows, hidden), dtype) for k in keys], axis=1)


def _kernels(key, input_size, hidden_size, blocks, dtype, kernel_init, recurrent_init):
    k_in, k_rec = jax.random.split(key)
    return (kernel_init(k_in, (input_size, blocks * hidden_size), dtype),
            _blockwise(recurrent_init, k_rec, hidden_size, hidden_size, blocks, dtype))


_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def make_rnn(activation: str = "tanh", *, kernel_init: Initializer = glorot_uniform,
             recurrent_init: Initializer = orthogonal, bias_init: Initializer = zeros) -> Cell:
    """The chapter's simple RNN: ``s_t = f(x_t U + s_{t-1} W + b)`` with ``f`` = tanh or relu.

    Carry and output are both ``s_t`` ``[*batch, hidden]``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    f = _ACTIVATIONS[activation]

    def init(key, input_size: int, hidden_size: int, dtype=jnp.float32) -> Params:
        k_w, k_b = jax.random.split(key)
        U, W = _kernels(k_w, input_size, hidden_size, 1, dtype, kernel_init, recurrent_init)
        return {"U": U, "W": W, "b": bias_init(k_b, (hidden_size,), dtype)}

    def init_carry(batch_shape, hidden_size: int, dtype=jnp.float32):
        return jnp.zeros((*tuple(batch_shape), hidden_size), dtype)

    def apply(params, carry, x):
        s = f(x @ params["U"] + carry @ params["W"] + params["b"])
        return s, s

    return Cell(init, init_carry, apply)


def make_lstm(*, forget_bias: float = 1.0, kernel_init: Initializer = glorot_uniform,
              recurrent_init: Initializer = orthogonal, bias_init: Initializer = zeros) -> Cell:
    """The chapter's LSTM (gates i, f, g, o; see the module docstring). Carry ``LSTMState(h, c)``, output ``h``.

    Args:
      forget_bias: added to the forget-gate bias at initialisation (1 keeps memory early in training;
        Jozefowicz et al. 2015). Use 0 for the plain initialisation.
    """

    def init(key, input_size: int, hidden_size: int, dtype=jnp.float32) -> Params:
        k_w, k_b = jax.random.split(key)
        U, W = _kernels(k_w, input_size, hidden_size, 4, dtype, kernel_init, recurrent_init)
        b = bias_init(k_b, (4 * hidden_size,), dtype)
        b = b.at[hidden_size:2 * hidden_size].add(jnp.asarray(forget_bias, dtype))
        return {"U": U, "W": W, "b": b}

    def init_carry(batch_shape, hidden_size: int, dtype=jnp.float32) -> LSTMState:
        z = jnp.zeros((*tuple(batch_shape), hidden_size), dtype)
        return LSTMState(z, z)

    def apply(params, carry: LSTMState, x):
        z = x @ params["U"] + carry.h @ params["W"] + params["b"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMState(h, c), h

    return Cell(init, init_carry, apply, "lstm")


def make_gru(*, kernel_init: Initializer = glorot_uniform, recurrent_init: Initializer = orthogonal,
             bias_init: Initializer = zeros) -> Cell:
    """GRU with gates r, z, n and the reset applied after the recurrent product (PyTorch / cuDNN form)."""

    def init(key, input_size: int, hidden_size: int, dtype=jnp.float32) -> Params:
        k_w, k_b, k_bh = jax.random.split(key, 3)
        U, W = _kernels(k_w, input_size, hidden_size, 3, dtype, kernel_init, recurrent_init)
        return {"U": U, "W": W, "b": bias_init(k_b, (3 * hidden_size,), dtype),
                "b_h": bias_init(k_bh, (3 * hidden_size,), dtype)}

    def init_carry(batch_shape, hidden_size: int, dtype=jnp.float32):
        return jnp.zeros((*tuple(batch_shape), hidden_size), dtype)

    def apply(params, carry, x):
        zx = x @ params["U"] + params["b"]
        zh = carry @ params["W"] + params["b_h"]
        rx, zx_, nx = jnp.split(zx, 3, axis=-1)
        rh, zh_, nh = jnp.split(zh, 3, axis=-1)
        r = jax.nn.sigmoid(rx + rh)
        z = jax.nn.sigmoid(zx_ + zh_)
        n = jnp.tanh(nx + r * nh)
        h = (1 - z) * n + z * carry
        return h, h

    return Cell(init, init_carry, apply)


rnn: Cell = make_rnn("tanh")
relu_rnn: Cell = make_rnn("relu")
lstm: Cell = make_lstm()
gru: Cell = make_gru()


def input_size(params: Params) -> int:
    """Input feature size of a cell's params (rows of ``U``)."""
    return params["U"].shape[0]


def hidden_size(params: Params) -> int:
    """Hidden size of a cell's params (rows of ``W``)."""
    return params["W"].shape[0]
