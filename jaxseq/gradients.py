"""Gradient norms across time steps, measured beside the vanishing/exploding-gradient theory.

Three measurements, each with the theory it is checked against:

* ``carry_grads``: ``∂L/∂s_t`` for every step ``t`` in ONE backward pass, for any cell run by
  ``jaxseq.unroll``. A zero perturbation ``ε_t`` is added to the carry after each step and the loss is
  differentiated with respect to all ``ε_t`` at once (``∂L/∂ε_t = ∂L/∂s_t``).
* ``jacobian_norms``: ``‖∂s_T/∂s_t‖`` (spectral and Frobenius) for every ``t``, either from the dense
  per-step Jacobians (small state) or matrix-free by power iteration with ``jvp``/``vjp`` (spectral) and
  Hutchinson probes (Frobenius). ``wrt``/``of`` pick a carry field, e.g. ``of="c", wrt="c"`` for the LSTM's
  cell path ``‖∂c_T/∂c_t‖``.
* theory: ``linear_power_norms`` (linear RNN, exact: ``∂s_T/∂s_t = W^{T−t}``), ``rnn_upper_bound``
  (``(γ σ_max(W))^{T−t}``, γ = 1 for tanh/relu, ¼ for sigmoid), ``spectral_radius`` (the asymptotic decay
  rate ``ρ(W)^{T−t}``), ``forget_gate_products`` (the LSTM's direct cell path ``Π_{j>t} f_j``).

Row-vector convention as in ``jaxseq.cells`` (``s_t = f(x_t U + s_{t−1} W + b)``), so the step Jacobian is
``diag(f′) Wᵀ``; every norm used here is invariant under transposition.

Far-apart steps give norms like ``1e-30``: float32 products underflow there, so the experiments run in
float64 (``jax.config.update("jax_enable_x64", True)`` and float64 params).

References:
  Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks" (ICML), §2–3.
  Bengio, Simard & Frasconi 1994, "Learning long-term dependencies with gradient descent is difficult".
  Hochreiter & Schmidhuber 1997, "Long short-term memory"; Gers, Schmidhuber & Cummins 2000, "Learning to
  forget: continual prediction with LSTM".
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxseq import cells
from jaxseq.cells import Cell, LSTMState, glorot_uniform, orthogonal, zeros
from jaxseq.scan import unroll
from jaxseq.sequences import check_sequence_inputs, vary_like

#: Bound on ``|f′|`` for each activation (Pascanu et al. 2013, §3.2): the γ in ``(γ σ_max(W))^{T−t}``.
ACTIVATION_GAMMA = {"linear": 1.0, "tanh": 1.0, "relu": 1.0, "sigmoid": 0.25}
METHODS = ("auto", "dense", "power")
#: Largest flattened carry for which ``method="auto"`` builds dense Jacobians ([time, S, S] floats).
DENSE_MAX_STATE = 256


# --------------------------------------------------------------------------------------------- cells

def make_linear_rnn(*, kernel_init=glorot_uniform, recurrent_init=orthogonal, bias_init=zeros) -> Cell:
    """Linear RNN ``s_t = x_t U + s_{t−1} W + b`` (identity activation), same layout as ``cells.make_rnn``.

    Its step Jacobian is exactly ``Wᵀ``, so ``∂s_T/∂s_t = (W^{T−t})ᵀ``: the one case where the theory is exact.
    """

    def init(key, input_size: int, hidden_size: int, dtype=jnp.float32):
        k_u, k_w, k_b = jax.random.split(key, 3)
        return {"U": kernel_init(k_u, (input_size, hidden_size), dtype),
                "W": recurrent_init(k_w, (hidden_size, hidden_size), dtype),
                "b": bias_init(k_b, (hidden_size,), dtype)}

    def init_carry(batch_shape, hidden_size: int, dtype=jnp.float32):
        return jnp.zeros((*tuple(batch_shape), hidden_size), dtype)

    def apply(params, carry, x):
        s = x @ params["U"] + carry @ params["W"] + params["b"]
        return s, s

    return Cell(init, init_carry, apply)


linear_rnn: Cell = make_linear_rnn()


# --------------------------------------------------------------------------------- ∂L/∂s_t, one pass

def carry_grads(apply: Callable, params, carry, xs, loss_fn: Callable, *, lengths=None, reverse: bool = False,
                output_of: Callable | None = cells.hidden_state):
    """``∂L/∂s_t`` for every time step in one backward pass.

    Args:
      apply: a cell's step function (``Cell.apply``).
      params, carry, xs, lengths, reverse: as for ``jaxseq.unroll``; ``xs`` is ``[*batch, time, features]``.
      loss_fn: ``loss_fn(ys, final_carry) -> scalar`` with ``ys`` ``[*batch, time, out]``: the rest of the
        model (readout, loss) after the recurrence.
      output_of: how the cell's output ``y_t`` is made from its carry, so that a perturbation of ``s_t`` also
        reaches ``y_t`` (``jaxseq.cells.hidden_state`` fits every jaxseq cell). ``None`` keeps the cell's own ``y_t``, i.e.
        only the recurrent path through ``s_t`` is measured.

    Returns:
      ``(loss, grads)``: ``grads`` has the carry's structure with leaves ``[*batch, time, size]``; entry ``t``
      is ``∂L/∂s_t`` where ``s_t`` is the carry after reading ``x_t``. Padded steps (``t ≥ length``) get 0.
    """
    xs = jnp.asarray(xs)
    check_sequence_inputs(params, carry, xs, lengths)
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    sizes = [leaf.shape[-1] for leaf in leaves]
    num_features = xs.shape[-1]
    # The perturbations ride along the input features, so `unroll` handles lengths and reverse as usual.
    probes = [jnp.zeros(xs.shape[:-1] + (size,), xs.dtype) for size in sizes]
    splits = np.cumsum([num_features, *sizes])[:-1].tolist()

    def step(wrapped, c, x_and_eps):
        x, *eps = jnp.split(x_and_eps, splits, axis=-1)
        c, y = apply(wrapped["cell"], c, x)
        c = jax.tree_util.tree_unflatten(treedef, [leaf + e for leaf, e in zip(jax.tree_util.tree_leaves(c), eps)])
        return c, (y if output_of is None else output_of(c))

    def loss_of_probes(probes):
        # Wrapping params hides their "U" from unroll's feature check, which the probes would fail.
        final, ys = unroll(step, {"cell": params}, carry, jnp.concatenate([xs, *probes], axis=-1),
                           lengths=lengths, reverse=reverse)
        return loss_fn(ys, final)

    loss, grads = jax.value_and_grad(loss_of_probes)(probes)
    return loss, jax.tree_util.tree_unflatten(treedef, grads)


def timestep_norms(grads) -> jax.Array:
    """Euclidean norm over the features of every leaf together: ``[*batch, time, size]`` leaves -> ``[*batch, time]``.

    Scaled by the largest entry first, so norms of 1e-30 or 1e30 do not under- or overflow in float32 when
    squared.
    """
    leaves = jax.tree_util.tree_leaves(grads)
    largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g), axis=-1) for g in leaves])
    scale = jnp.where(largest > 0, largest, 1)[..., None]
    return scale[..., 0] * jnp.sqrt(sum(jnp.sum(jnp.square(g / scale), axis=-1) for g in leaves))


# ----------------------------------------------------------------------------------- ‖∂s_T/∂s_t‖

class JacobianNorms(NamedTuple):
    """Norms of ``∂s_T/∂s_t`` for ``t = 0 … T`` (``t = 0`` is the initial carry, ``t = T`` the identity)."""

    timesteps: jax.Array  # int[T + 1]
    spectral: jax.Array  # [T + 1]
    frobenius: jax.Array  # [T + 1]; a Hutchinson estimate when method="power"


def trajectory(apply: Callable, params, carry, xs):
    """Carries before each step, flattened: ``[time, S]`` (``S`` = total carry size), and the final carry."""

    def step(p, c, x):
        new, _ = apply(p, c, x)
        return new, ravel_pytree(c)[0]

    final, prev = unroll(step, params, carry, xs)
    return prev, final


def _field_indices(carry, field: str | None) -> tuple:
    """Positions of one carry field (e.g. "c" of an LSTMState) inside the flattened carry; all if None.

    Works on shapes alone (host numpy, in ``ravel_pytree``'s leaf order), so it also runs under ``jit``.
    """
    template = jax.tree_util.tree_map(lambda leaf: np.zeros(np.shape(leaf)), carry)
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(template))
    if field is None:
        return tuple(range(size))
    if not hasattr(template, "_fields") or field not in template._fields:
        raise ValueError(f"carry field {field!r} not found: the carry is {type(carry).__name__}"
                         f"{' with fields ' + str(template._fields) if hasattr(template, '_fields') else ''}; "
                         f"use None for the whole carry")
    marked = template._replace(**{field: np.ones_like(getattr(template, field))})
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(marked)])
    return tuple(int(i) for i in np.flatnonzero(flat))


def _dense_norms(step_flat, prev, xs, in_idx, out_idx):
    jacobians = jax.vmap(jax.jacfwd(step_flat))(prev, xs)  # [T, S, S]; row j is ∂s_{j+1}/∂s_j
    eye = vary_like(jnp.eye(prev.shape[1], dtype=prev.dtype), jacobians)  # shard_map: vary like the data
    # P_t = J_T ⋯ J_{t+1}, built from the end: P_{t−1} = P_t J_t.
    first, later = lax.scan(lambda p, j: (p @ j, p), eye, jacobians, reverse=True)
    products = jnp.concatenate([first[None], later])[:, out_idx][:, :, in_idx]
    return (jnp.linalg.norm(products, ord=2, axis=(-2, -1)),
            jnp.linalg.norm(products, ord="fro", axis=(-2, -1)))


def _power_norms(step_flat, prev, xs, in_idx, out_idx, num_iters, num_probes, key):
    num_steps, size = prev.shape
    starts = jnp.arange(num_steps + 1)  # row t of a [T + 1, ...] stack carries the vector started at s_t

    def forward(vectors):
        """Row t of ``vectors`` [T + 1, S] -> ``J_T ⋯ J_{t+1} v_t``, all rows in one pass over time."""
        def body(v, inputs):
            s, x, j = inputs
            _, push = jax.linearize(lambda state: step_flat(state, x), s)
            moved = jax.vmap(push)(v)
            return jnp.where((starts < j)[:, None], moved, v), None
        return lax.scan(body, vary_like(vectors, prev, xs), (prev, xs, jnp.arange(1, num_steps + 1)))[0]

    def backward(vectors):
        """Row t -> ``J_{t+1}ᵀ ⋯ J_Tᵀ u_t``: the transposed products, by vjp from the end."""
        def body(u, inputs):
            s, x, j = inputs
            _, pull = jax.vjp(lambda state: step_flat(state, x), s)
            moved = jax.vmap(lambda row: pull(row)[0])(u)
            return jnp.where((starts < j)[:, None], moved, u), None
        return lax.scan(body, vary_like(vectors, prev, xs), (prev, xs, jnp.arange(1, num_steps + 1)),
                        reverse=True)[0]

    def embed(v, idx):
        return jnp.zeros((num_steps + 1, size), prev.dtype).at[:, idx].set(v)

    def normalise(v):
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return v / jnp.where(norm > 0, norm, 1)

    k_start, k_probe = jax.random.split(key)
    v = normalise(jax.random.normal(k_start, (num_steps + 1, len(in_idx)), prev.dtype))

    def iterate(_, v):
        return normalise(backward(embed(forward(embed(v, in_idx))[:, out_idx], out_idx))[:, in_idx])

    v = lax.fori_loop(0, num_iters, iterate, vary_like(v, prev, xs))
    spectral = jnp.linalg.norm(forward(embed(v, in_idx))[:, out_idx], axis=-1)
    # Hutchinson: E‖A z‖² = ‖A‖_F² for z ~ N(0, I).
    probes = jax.random.normal(k_probe, (num_probes, num_steps + 1, len(in_idx)), prev.dtype)
    pushed = jax.vmap(lambda z: forward(embed(z, in_idx))[:, out_idx])(probes)
    frobenius = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(pushed), axis=-1), axis=0))
    return spectral, frobenius


@functools.partial(jax.jit, static_argnames=("apply", "in_idx", "out_idx", "method", "num_iters", "num_probes"))
def _norms(apply, params, carry, xs, key, *, in_idx, out_idx, method, num_iters, num_probes):
    """The jitted body of ``jacobian_norms`` (static cell and index sets, so repeated calls reuse one compile)."""
    _, unravel = ravel_pytree(carry)

    def step_flat(state, x):
        return ravel_pytree(apply(params, unravel(state), x)[0])[0]

    prev, _ = trajectory(apply, params, carry, xs)
    in_idx, out_idx = np.asarray(in_idx), np.asarray(out_idx)
    if method == "dense":
        return _dense_norms(step_flat, prev, xs, in_idx, out_idx)
    return _power_norms(step_flat, prev, xs, in_idx, out_idx, num_iters, num_probes, key)


def jacobian_norms(apply: Callable, params, carry, xs, *, wrt: str | None = None, of: str | None = None,
                   method: str = "auto", num_iters: int = 100, num_probes: int = 32, key=None) -> JacobianNorms:
    """``‖∂s_T/∂s_t‖`` (spectral and Frobenius) for ``t = 0 … T`` along one sequence.

    Args:
      apply, params: the cell (``Cell.apply``) and its params.
      carry: initial carry ``s_0`` (leaves ``[hidden]``, no batch axis; ``vmap`` for batches and seeds).
      xs: inputs ``[time, features]``.
      wrt, of: carry field (e.g. ``"h"`` or ``"c"`` of an ``LSTMState``) to differentiate with respect to
        and of; ``None`` is the whole carry. ``of="c", wrt="c"`` gives the LSTM cell path ``∂c_T/∂c_t``.
      method: ``"dense"`` (exact: per-step Jacobians ``[time, S, S]`` and their products; ``S`` = carry size),
        ``"power"`` (matrix-free: power iteration on ``AᵀA`` with jvp/vjp for the spectral norm, a
        Hutchinson estimate from ``num_probes`` Gaussian probes for the Frobenius norm; memory
        ``O(time · S)``, cost ``O(time² · num_iters)`` Jacobian-vector products), or ``"auto"`` (dense up
        to ``S = DENSE_MAX_STATE``).
      num_iters: power iterations (all ``t`` iterate together); the estimate approaches σ_max from below.
      key: PRNG key for the power-iteration start and probes (required for ``"power"``).

    Returns:
      ``JacobianNorms(timesteps, spectral, frobenius)``, each ``[T + 1]``.
    """
    xs = jnp.asarray(xs)
    check_sequence_inputs(params, carry, xs)
    if xs.ndim != 2:
        raise ValueError(f"xs must be one sequence [time, features], got shape {xs.shape}; use jax.vmap over "
                         f"a batch or over seeds")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    in_idx, out_idx = _field_indices(carry, wrt), _field_indices(carry, of)
    if method == "auto":
        method = "dense" if len(_field_indices(carry, None)) <= DENSE_MAX_STATE else "power"
    if method == "power" and key is None:
        raise ValueError("method='power' needs key= (a PRNG key for the power-iteration start vectors)")

    spectral, frobenius = _norms(apply, params, carry, xs, key, in_idx=in_idx, out_idx=out_idx, method=method,
                                 num_iters=num_iters, num_probes=num_probes)
    return JacobianNorms(jnp.arange(xs.shape[0] + 1), spectral, frobenius)


# ------------------------------------------------------------------------------------------- theory

def linear_power_norms(W, num_steps: int) -> np.ndarray:
    """Exact ``‖W^{T−t}‖₂`` for ``t = 0 … T`` (float64 on the host): the linear RNN's ``‖∂s_T/∂s_t‖₂``."""
    W = np.asarray(W, np.float64)
    power, norms = np.eye(W.shape[0]), []
    for _ in range(num_steps + 1):
        norms.append(np.linalg.norm(power, 2))
        power = power @ W
    return np.asarray(norms[::-1])


def distances(num_steps: int) -> jax.Array:
    """``T − t`` for ``t = 0 … T``."""
    return num_steps - jnp.arange(num_steps + 1)


def sigma_max(W) -> jax.Array:
    """Largest singular value of ``W`` (Pascanu's λ₁)."""
    return jnp.linalg.norm(W, ord=2)


def spectral_radius(W) -> jax.Array:
    """Largest eigenvalue modulus ``ρ(W)``: ``‖W^k‖^{1/k} → ρ(W)`` (Gelfand), the asymptotic decay rate."""
    return jnp.max(jnp.abs(jnp.linalg.eigvals(W)))


def rnn_upper_bound(W, num_steps: int, gamma: float = 1.0) -> jax.Array:
    """``(γ σ_max(W))^{T−t}`` for ``t = 0 … T``: bounds ``‖∂s_T/∂s_t‖₂`` when ``|f′| ≤ γ``.

    ``‖diag(f′) Wᵀ‖ ≤ γ σ_max(W)`` per step, and norms are sub-multiplicative (Pascanu et al. 2013, eq. 7).
    Below ``1/γ`` it forces vanishing; above, growth becomes possible but is not guaranteed.
    """
    return (gamma * sigma_max(W)) ** distances(num_steps)


def rate_line(rate, num_steps: int) -> jax.Array:
    """``rate^{T−t}`` for ``t = 0 … T`` (e.g. the spectral-radius decay ``ρ(W)^{T−t}``)."""
    return jnp.asarray(rate) ** distances(num_steps)


def lstm_forget_gates(params, carry: LSTMState, xs) -> jax.Array:
    """Forget gates ``f_t`` ``[time, hidden]`` of ``cells.lstm`` along the trajectory from ``carry`` over ``xs``."""
    hidden = params["W"].shape[0]

    def step(p, c, x):
        z = x @ p["U"] + c.h @ p["W"] + p["b"]
        f = jax.nn.sigmoid(z[..., hidden:2 * hidden])
        new, _ = cells.lstm.apply(p, c, x)
        return new, f

    return unroll(step, params, carry, xs)[1]


def gru_update_gates(params, carry, xs) -> jax.Array:
    """Update gates ``z_t`` ``[time, hidden]`` of ``cells.gru``: the GRU's direct path ``∂h_t/∂h_{t−1} ⊇ diag(z_t)``."""
    hidden = params["W"].shape[0]

    def step(p, c, x):
        pre = (x @ p["U"] + p["b"] + c @ p["W"] + p["b_h"])[..., hidden:2 * hidden]
        new, _ = cells.gru.apply(p, c, x)
        return new, jax.nn.sigmoid(pre)

    return unroll(step, params, carry, xs)[1]


def forget_gate_products(gates) -> jax.Array:
    """``Π_{j=t+1}^{T} f_j`` ``[T + 1, hidden]`` for ``t = 0 … T`` from gates ``[T, hidden]`` (row ``T`` is 1).

    For the LSTM this is the diagonal Jacobian of the direct cell path ``c_{t} → c_{t+1} → … → c_T`` with the
    gates held fixed (``∂c_j/∂c_{j−1} = diag(f_j)``); the full ``∂c_T/∂c_t`` adds paths through ``h``.
    Its spectral norm is the max over units, its Frobenius norm the root sum of squares.
    """
    gates = jnp.asarray(gates)
    ones = jnp.ones((1,) + gates.shape[1:], gates.dtype)
    return jnp.cumprod(jnp.concatenate([gates, ones])[::-1], axis=0)[::-1]



# ------------------------------------------------------------------------------ random models, profiles

CELLS = ("linear", "rnn", "lstm", "gru")
INITS = ("gaussian", "orthogonal", "symmetric")


def recurrent_matrix(key, hidden: int, sigma: float, init: str = "gaussian", dtype=jnp.float32) -> jax.Array:
    """A ``[hidden, hidden]`` matrix with largest singular value exactly ``sigma``.

    ``"gaussian"``: N(0, 1/hidden) entries rescaled (then ρ(W) is well below σ_max, about σ_max/2 for large
    ``hidden``); ``"orthogonal"``: ``sigma`` times an orthogonal matrix (every singular value ``sigma``,
    ρ = σ_max); ``"symmetric"``: a symmetric Gaussian matrix rescaled (normal, so ``‖W^k‖₂ = ρ^k`` exactly).
    Jittable and ``vmap``-able over ``key`` and ``sigma``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "orthogonal":
        return sigma * orthogonal(key, (hidden, hidden), dtype)
    g = jax.random.normal(key, (hidden, hidden), dtype) / jnp.sqrt(jnp.asarray(hidden, dtype))
    if init == "symmetric":
        g = (g + g.T) / 2
    return g * (sigma / sigma_max(g))


def make_cell(name: str, *, activation: str = "tanh", forget_bias: float = 1.0) -> Cell:
    """The cell a profile measures: ``"linear"``, ``"rnn"`` (``activation`` tanh|relu), ``"lstm"``, ``"gru"``."""
    if name not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {name!r}")
    if name == "linear":
        return linear_rnn
    if name == "rnn":
        return cells.make_rnn(activation)
    if name == "lstm":
        return cells.make_lstm(forget_bias=forget_bias)
    return cells.make_gru()


def random_params(key, name: str, input_size: int, hidden: int, *, sigma: float, init: str = "gaussian",
                  activation: str = "tanh", forget_bias: float = 1.0, dtype=jnp.float32):
    """The cell's usual init with every recurrent gate block replaced by ``recurrent_matrix(…, sigma, init)``."""
    k_cell, k_rec = jax.random.split(key)
    params = make_cell(name, activation=activation, forget_bias=forget_bias).init(k_cell, input_size, hidden, dtype)
    blocks = params["W"].shape[1] // hidden
    keys = jax.random.split(k_rec, blocks)
    params["W"] = jnp.concatenate([recurrent_matrix(k, hidden, sigma, init, dtype) for k in keys], axis=1)
    return params


def profile(name: str, *, steps: int, hidden: int, sigma: float, seed: int = 0, activation: str = "tanh",
            forget_bias: float = 1.0, init: str = "gaussian", input_size: int = 1, dtype=jnp.float64,
            method: str = "auto") -> dict:
    """Measure ``‖∂s_T/∂s_t‖`` of one random cell on N(0, 1) inputs, with its theory beside it.

    Measured: ``‖∂h_T/∂h_t‖₂`` (linear, rnn, gru) or the LSTM cell path ``‖∂c_T/∂c_t‖₂``. Theory and its kind:
    linear ``‖W^{T−t}‖₂`` ("exact"); rnn ``(γ σ_max(W))^{T−t}`` ("upper_bound"); lstm ``max_units Π f``
    and gru ``max_units Π z`` ("direct_path": the gated self-loop alone, gates held fixed — neither exact nor
    a bound, since the other paths run through ``h``).

    Returns:
      A JSON-ready dict: ``cell``, ``timesteps`` (t = 0 … T), ``measured``, ``frobenius``, ``theory``,
      ``theory_kind``, ``spectral_radius_line`` (ρ(W)^{T−t}; rnn/linear only, else None) and the settings.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive number of time steps, got {steps}")
    if hidden < 1:
        raise ValueError(f"hidden must be a positive size, got {hidden}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma_max must be > 0 and finite, got {sigma}")
    if not math.isfinite(forget_bias):
        raise ValueError(f"forget_bias must be a finite number, got {forget_bias}")
    if name == "rnn" and activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be tanh or relu for the rnn cell, got {activation!r}")
    k_params, k_x, k_power = jax.random.split(jax.random.PRNGKey(seed), 3)
    cell = make_cell(name, activation=activation, forget_bias=forget_bias)
    params = random_params(k_params, name, input_size, hidden, sigma=sigma, init=init, activation=activation,
                           forget_bias=forget_bias, dtype=dtype)
    xs = jax.random.normal(k_x, (steps, input_size), dtype)
    carry = cell.init_carry((), hidden, dtype)
    field = "c" if name == "lstm" else None
    norms = jacobian_norms(cell.apply, params, carry, xs, wrt=field, of=field, method=method, key=k_power)
    W = params["W"][:, :hidden]
    rho_line = None
    if name == "linear":
        theory, kind = linear_power_norms(W, steps), "exact"
        rho_line = rate_line(spectral_radius(W), steps)
    elif name == "rnn":
        theory, kind = rnn_upper_bound(W, steps, ACTIVATION_GAMMA[activation]), "upper_bound"
        rho_line = rate_line(spectral_radius(W), steps)
    else:
        gates = lstm_forget_gates(params, carry, xs) if name == "lstm" else gru_update_gates(params, carry, xs)
        theory, kind = jnp.max(forget_gate_products(gates), axis=-1), "direct_path"
    as_list = lambda a: None if a is None else np.asarray(a, np.float64).tolist()  # noqa: E731
    return {"cell": name, "timesteps": [int(t) for t in norms.timesteps], "measured": as_list(norms.spectral),
            "frobenius": as_list(norms.frobenius), "theory": as_list(theory), "theory_kind": kind,
            "spectral_radius_line": as_list(rho_line),
            "measured_quantity": "||dc_T/dc_t||_2" if name == "lstm" else "||dh_T/dh_t||_2",
            "settings": {"activation": activation if name == "rnn" else None, "steps": steps, "hidden": hidden,
                         "sigma_max": sigma, "forget_bias": forget_bias if name == "lstm" else None, "seed": seed,
                         "init": init, "input_size": input_size, "dtype": jnp.dtype(dtype).name,
                         "method": method}}
