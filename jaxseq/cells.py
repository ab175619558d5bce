"""Pure recurrent cells: the chapter's RNN, LSTM and GRU as three pure functions each.

A cell is ``Cell(init, init_carry, apply, layout=None, fused=None)``:

* ``init(key, input_size, hidden_size, dtype=float32) -> params`` (a dict of arrays),
* ``init_carry(batch_shape, hidden_size, dtype=float32) -> carry`` (zeros),
* ``apply(params, carry, x) -> (carry, y)``: one time step, exactly a ``lax.scan`` body once ``params``
  are bound. ``x`` is ``[*batch, input_size]`` with any number of leading batch dimensions (none too).
  The library cells' ``apply`` checks its params' layout (shapes only, at trace time), so another cell's
  params give a one-line ``ValueError`` naming what was expected.
* ``layout``: ``"rnn"``, ``"lstm"`` or ``"gru"`` if params and carry follow that layout (``LAYOUTS``), so a
  layer can check them before its loop starts; None (the default) for any other cell. Never picks an
  implementation.
* ``fused``: the explicit declaration that a whole-sequence implementation computes exactly this cell's
  step, by the name of a fused layer in ``jaxseq.layers.FUSED`` (``"lstm"``: the fused LSTM layer with the
  hand-BPTT backward). ``jaxseq.layers.layer`` runs a cell through it (``impl="auto"``); a cell without it
  runs the reference loop (``jaxseq.unroll``), like every core in Haiku's ``dynamic_unroll``. Only
  ``make_lstm`` sets it: a cell you build with your own ``apply`` is never replaced by a kernel.

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

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = dict
Initializer = Callable[[jax.Array, tuple, Any], jax.Array]


class Cell(NamedTuple):
    """A recurrent cell as three pure functions (see the module docstring)."""

    init: Callable[..., Params]
    init_carry: Callable[..., Any]
    apply: Callable[[Params, Any, jax.Array], tuple[Any, jax.Array]]
    layout: str | None = None  # a key of LAYOUTS when params and carry follow that layout (checked up front)
    fused: str | None = None  # a key of jaxseq.layers.FUSED: a whole-layer implementation of exactly this step


class LSTMState(NamedTuple):
    """LSTM carry: hidden state ``h`` and cell state ``c``, each ``[*batch, hidden]``."""

    h: jax.Array
    c: jax.Array


def hidden_state(carry):
    """The hidden state ``h`` of a carry: ``carry.h`` for an ``LSTMState``, the carry itself otherwise.

    This is the output ``y_t`` every jaxseq cell emits from its carry (the readout models put on top).
    """
    return carry.h if isinstance(carry, LSTMState) else carry


# Params layout of each cell kind: k gate blocks and the bias names, i.e. U [I, kH], W [H, kH], each bias [kH].
LAYOUTS = {"rnn": (1, ("b",)), "lstm": (4, ("b",)), "gru": (3, ("b", "b_h"))}
_NAMES = {"rnn": "an RNN", "lstm": "an LSTM", "gru": "a GRU"}


def check_size(name: str, value) -> int:
    """``value`` as an int if it is a positive int (a size such as ``hidden_size``), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _layout(kind: str) -> str:
    """``{"U": [I, 4H], "W": [H, 4H], "b": [4H]}`` for ``kind``."""
    blocks, biases = LAYOUTS[kind]
    k = f"{blocks}H" if blocks > 1 else "H"
    return "{" + ", ".join([f'"U": [I, {k}]', f'"W": [H, {k}]'] + [f'"{b}": [{k}]' for b in biases]) + "}"


def _looks_like(params, kind: str) -> str:
    """A hint naming the other cell kind whose layout ``params["W"]`` fits, if any."""
    W = tuple(np.shape(params.get("W"))) if "W" in params else ()
    for other, (blocks, biases) in LAYOUTS.items():
        if other != kind and len(W) == 2 and W[1] == blocks * W[0] and set(biases) <= set(params):
            return f" (these look like {other.upper()} params)"
    return ""


def check_params(params, kind: str, name: str = "params") -> None:
    """Raise a ``ValueError`` naming the key if ``params`` do not follow ``kind``'s layout (see ``LAYOUTS``).

    Shapes only (trace time): ``U [I, kH]``, ``W [H, kH]`` and each bias ``[kH]`` with ``H`` the rows of ``W``.
    Extra keys are allowed (e.g. the readout ``V``, ``c`` of ``jaxseq.bptt``).
    """
    blocks, biases = LAYOUTS[kind]
    expected = f"{_NAMES[kind]} expects {_layout(kind)} (jaxseq.cells.{kind}.init)"
    if not isinstance(params, Mapping):
        raise ValueError(f"{name} must be a dict of arrays: {expected}; got {type(params).__name__}")
    missing = [k for k in ("U", "W", *biases) if k not in params]
    if missing:
        hint = (" (per-direction params: run them with a bidirectional layer)"
                if {"forward", "backward"} <= set(params) else _looks_like(params, kind))
        raise ValueError(f"{name} is missing {missing}: {expected}; got keys {sorted(params)}{hint}")
    shape = {k: tuple(np.shape(params[k])) for k in ("U", "W", *biases)}
    if len(shape["W"]) != 2:
        raise ValueError(f'{name}["W"] has shape {shape["W"]}: {expected}')
    hidden = shape["W"][0]
    rows = shape["U"][0] if len(shape["U"]) == 2 else "I"
    wanted = {"U": (rows, blocks * hidden), "W": (hidden, blocks * hidden), **{b: (blocks * hidden,) for b in biases}}
    for k, want in wanted.items():
        if shape[k] != want:
            raise ValueError(f'{name}["{k}"] has shape {shape[k]} but {expected}: with H = {hidden} (rows of W), '
                             f'{k} should have shape {want}{_looks_like(params, kind)}')


def check_carry(carry, kind: str, name: str = "carry"):
    """``carry`` checked for ``kind``'s structure: an ``LSTMState(h, c)`` (a pair is converted) or one array.

    Shapes and dtypes are ``jaxseq.sequences.check_sequence_inputs``' part.
    """
    if kind == "lstm":
        if isinstance(carry, LSTMState):
            return carry
        if isinstance(carry, (tuple, list)) and len(carry) == 2 and all(hasattr(c, "shape") for c in carry):
            return LSTMState(*carry)
        got = (f"{type(carry).__name__} of {len(carry)}" if isinstance(carry, (tuple, list))
               else f"an array of shape {tuple(np.shape(carry))}" if hasattr(carry, "shape")
               else type(carry).__name__)
        raise ValueError(f"{name} must be an LSTMState(h, c), h and c each [*batch, hidden] "
                         f"(jaxseq.cells.lstm.init_carry); got {got}")
    if kind in LAYOUTS and not hasattr(carry, "shape"):
        raise ValueError(f"{name} must be one array h [*batch, hidden] for {_NAMES[kind]} "
                         f"(jaxseq.cells.{kind}.init_carry); got {type(carry).__name__}")
    return carry


glorot_uniform: Initializer = jax.nn.initializers.glorot_uniform()
orthogonal: Initializer = jax.nn.initializers.orthogonal()
zeros: Initializer = jax.nn.initializers.zeros


def _blockwise(init: Initializer, key, rows: int, hidden: int, blocks: int, dtype) -> jax.Array:
    """Initialise each gate block on its own, as Keras does for recurrent kernels (each block orthogonal)."""
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([init(k, (rows, hidden), dtype) for k in keys], axis=1)


def _kernels(key, input_size, hidden_size, blocks, dtype, kernel_init, recurrent_init):
    check_size("input_size", input_size)
    check_size("hidden_size", hidden_size)
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
        check_params(params, "rnn")
        carry = check_carry(carry, "rnn")
        s = f(x @ params["U"] + carry @ params["W"] + params["b"])
        return s, s

    return Cell(init, init_carry, apply, layout="rnn")


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
        check_params(params, "lstm")
        carry = check_carry(carry, "lstm")
        z = x @ params["U"] + carry.h @ params["W"] + params["b"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMState(h, c), h

    # The step is exactly the standard LSTM whatever the initialisers, so the fused layer may run it.
    return Cell(init, init_carry, apply, layout="lstm", fused="lstm")


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
        check_params(params, "gru")
        carry = check_carry(carry, "gru")
        zx = x @ params["U"] + params["b"]
        zh = carry @ params["W"] + params["b_h"]
        rx, zx_, nx = jnp.split(zx, 3, axis=-1)
        rh, zh_, nh = jnp.split(zh, 3, axis=-1)
        r = jax.nn.sigmoid(rx + rh)
        z = jax.nn.sigmoid(zx_ + zh_)
        n = jnp.tanh(nx + r * nh)
        h = (1 - z) * n + z * carry
        return h, h

    return Cell(init, init_carry, apply, layout="gru")


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
