"""Checks and helpers every recurrent-layer path shares: input checks, lengths, masks, merges, shard_map types.

A leaf of the core: it imports only JAX, NumPy and ``jaxseq.cells``, so the reference loop (``jaxseq.scan``),
the layers (``jaxseq.layers``), the hand BPTT (``jaxseq.bptt``), the native kernel's wrapper and the gradient
measurements can all build on it without importing each other.

Conventions (as ``jaxseq.scan``): public tensors are ``[*batch, time, features]`` (``time_major``:
``[time, *batch, features]``); ``lengths`` ``int[*batch]`` marks each sequence's valid prefix.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseq import cells
from jaxseq.cells import Cell, LSTMState

MERGES = ("concat", "sum", "mean", "mul", None)


def _describe(x) -> str:
    return f"shape {tuple(np.shape(x))} and dtype {jnp.result_type(x)}"


def as_lengths(lengths):
    """``lengths`` as an array: a list or tuple of ints becomes a NumPy array (still concrete, so still checked)."""
    if lengths is None or hasattr(lengths, "shape"):
        return lengths
    try:
        return np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # a list of traced lengths under jit
        return jnp.asarray(lengths)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"lengths must be an int array [*batch] (one length per sequence), got {lengths!r}") from e


def _check_kernels(params) -> tuple[int, Any] | None:
    """``(hidden, dtype)`` from a jaxseq-layout ``params`` (``U [I, G]``, ``W [H, G]``, biases ``[G]``), else None.

    Any cell kind: only the layout's internal consistency is checked here (``jaxseq.cells.check_params`` knows
    each kind's ``G``).
    """
    if not (isinstance(params, Mapping) and "U" in params and "W" in params):
        return None
    U, W = tuple(np.shape(params["U"])), tuple(np.shape(params["W"]))
    if len(U) != 2 or len(W) != 2 or U[1] != W[1] or W[0] == 0 or W[1] % W[0]:
        raise ValueError(
            f"params U {U} and W {W} do not fit together: expected U [input, k * hidden] and W [hidden, k * hidden] "
            f"with the same k * hidden columns (k gate blocks, see jaxseq.cells)")
    for name in ("b", "b_h"):
        if name in params and tuple(np.shape(params[name])) != (W[1],):
            raise ValueError(f'params["{name}"] has shape {tuple(np.shape(params[name]))} but W {W} has {W[1]} '
                             f"columns: expected {name} of shape {(W[1],)}")
    return W[0], params["W"].dtype


def check_sequence_inputs(params, carry, xs, lengths=None, *, time_major: bool = False) -> None:
    """Raise a ``ValueError`` naming the argument if ``xs``, ``carry`` or ``lengths`` do not fit ``params``.

    Runs at trace time on shapes and dtypes only, so errors appear before ``lax.scan`` is entered. Cells that
    follow jaxseq's layout (``params["U"]``, ``params["W"]``) also get their feature size, dtype, the kernels'
    and biases' shapes and the carry's hidden size and dtype checked.
    """
    if np.ndim(xs) < 2:
        raise ValueError(
            f"xs must be a sequence of feature vectors, [batch, time, features] (or [time, features]); got "
            f"{_describe(xs)}")
    time_axis = 0 if time_major else np.ndim(xs) - 2
    num_steps = np.shape(xs)[time_axis]
    if num_steps == 0:
        raise ValueError(f"xs has an empty time axis (axis {time_axis}) in {_describe(xs)}: nothing to unroll")
    batch = batch_shape(xs, time_major)
    kernels = _check_kernels(params)
    if isinstance(params, Mapping) and "U" in params:
        expected = params["U"].shape[0]
        if np.shape(xs)[-1] != expected:
            raise ValueError(
                f"xs has {np.shape(xs)[-1]} features (last axis of {_describe(xs)}) but the cell's input kernel "
                f"U {tuple(params['U'].shape)} expects {expected}")
        if jnp.issubdtype(jnp.result_type(xs), jnp.floating) and jnp.result_type(xs) != params["U"].dtype:
            raise ValueError(
                f"xs has dtype {jnp.result_type(xs)} but the cell's params have dtype {params['U'].dtype}; cast one "
                f"of them (e.g. xs.astype({params['U'].dtype.name}))")
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(carry)[0]):
        name = f"carry{jax.tree_util.keystr(path)} (carry leaf {i})" if path else "carry"
        hidden = np.shape(leaf)[-1] if np.ndim(leaf) else "hidden"
        if kernels is not None:
            hidden, dtype = kernels
            if np.ndim(leaf) == 0 or np.shape(leaf)[-1] != hidden:
                raise ValueError(
                    f"{name} has {_describe(leaf)} but the cell's recurrent kernel W "
                    f"{tuple(params['W'].shape)} has hidden size {hidden}; expected shape {(*batch, hidden)}")
            if jnp.result_type(leaf) != dtype:
                raise ValueError(
                    f"{name} has {_describe(leaf)} but the cell's params have dtype {dtype}; "
                    f"expected dtype {dtype} (e.g. init_carry(..., dtype=params['W'].dtype))")
        if tuple(np.shape(leaf)[:-1]) != batch:
            raise ValueError(
                f"{name} has {_describe(leaf)} but xs {tuple(np.shape(xs))} has batch shape "
                f"{batch}; expected carry shape {(*batch, hidden)}")
    if lengths is not None:
        if tuple(np.shape(lengths)) != batch:
            raise ValueError(
                f"lengths has shape {tuple(np.shape(lengths))} but xs {tuple(np.shape(xs))} has batch shape "
                f"{batch}; expected one length per sequence, shape {batch}")
        if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise ValueError(f"lengths must be integers, got dtype {jnp.result_type(lengths)}")
        if not isinstance(lengths, jax.core.Tracer):
            values = np.asarray(lengths)
            if values.size and (values.min() < 0 or values.max() > num_steps):
                raise ValueError(
                    f"lengths must lie in [0, {num_steps}] (the time axis of xs {tuple(np.shape(xs))}); got values "
                    f"from {values.min()} to {values.max()}")


def batch_shape(xs, time_major: bool = False) -> tuple:
    """The leading batch dimensions of ``xs`` ``[*batch, time, features]`` (``[time, *batch, features]``)."""
    shape = tuple(np.shape(xs))
    return shape[1:-1] if time_major else shape[:-2]


def clip_lengths(lengths, num_steps: int):
    """``lengths`` as ``int32`` clipped into ``[0, num_steps]``; None stays None.

    Concrete lengths are range-checked by ``check_sequence_inputs``; a traced length under ``jit`` cannot be, so
    every path clips it the same way rather than reading out of range.
    """
    return None if lengths is None else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, num_steps)


def mask_like(valid: jax.Array, leaf: jax.Array) -> jax.Array:
    """Broadcast a ``[*batch]`` mask against a ``[*batch, ...]`` leaf."""
    return valid.reshape(valid.shape + (1,) * (leaf.ndim - valid.ndim))


def reverse_within_lengths(xs: jax.Array, lengths: jax.Array, time_axis: int = 0) -> jax.Array:
    """Reverse each sequence of ``xs`` inside its own length along ``time_axis``.

    ``time_axis=0``: time-major ``[time, *batch, ...]``; ``time_axis=1``: batch-major ``[batch, time, ...]``
    with ``lengths`` ``[batch]``. Position ``t < L`` maps to ``L - 1 - t``; padded positions stay where they
    are. The map is its own inverse, so the same call un-reverses outputs. Nothing is transposed: the gather
    runs along the data's own time axis.
    """
    num_steps = xs.shape[time_axis]
    t = jnp.arange(num_steps).reshape([num_steps if d == time_axis else 1 for d in range(lengths.ndim + 1)])
    lengths = jnp.expand_dims(lengths, time_axis)
    index = jnp.where(t < lengths, lengths - 1 - t, t)  # [time, *batch] or [batch, time]
    index = index.reshape(index.shape + (1,) * (xs.ndim - index.ndim))
    return jnp.take_along_axis(xs, index, axis=time_axis)


def _varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes along which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)  # this jax (0.10); older releases keep the set in ``aval.vma``
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def vary_like(tree, *refs):
    """``tree`` with every leaf made to vary over the ``shard_map`` mesh axes that any leaf of ``refs`` varies over.

    Inside ``shard_map`` a scan's carry must enter with the same varying axes it leaves with. A zero initial carry
    (or a zero cotangent) is invariant, while a step that reads batch-sharded inputs makes it vary, so scan would
    reject it; this casts the initial carry up front. Outside ``shard_map`` nothing varies and ``tree`` comes back
    unchanged.
    """
    axes = frozenset().union(*(_varying_axes(leaf) for leaf in jax.tree_util.tree_leaves(refs)))
    if not axes:
        return tree

    def cast(leaf):
        missing = tuple(sorted(axes - _varying_axes(leaf)))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree_util.tree_map(cast, tree)


def sum_like(cotangents, primals):
    """Sum each cotangent over the ``shard_map`` axes it varies over and its primal does not.

    A custom VJP's backward pass must return cotangents typed like its primal inputs. Inside ``shard_map`` a
    replicated (invariant) weight meets per-shard data, so its cotangent comes out per-shard; its gradient is
    the sum over the shards, which is what autodiff's transpose of the implicit broadcast gives too. ``None``
    cotangents (non-differentiable inputs) pass through.
    """
    def reduce(ct, primal):
        if ct is None:
            return None
        extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
        return lax.psum(ct, extra) if extra else ct

    return tuple(reduce(ct, primal) for ct, primal in zip(cotangents, primals))


def merge_outputs(y_forward: jax.Array, y_backward: jax.Array, merge: str | None):
    """Combine the two directions' outputs: concat (features), sum, mean, mul, or None for the pair."""
    if merge == "concat":
        return jnp.concatenate([y_forward, y_backward], axis=-1)
    if merge == "sum":
        return y_forward + y_backward
    if merge == "mean":
        return (y_forward + y_backward) / 2
    if merge == "mul":
        return y_forward * y_backward
    if merge is None:
        return y_forward, y_backward
    check_merge(merge)


def check_merge(merge) -> None:
    """Raise a ``ValueError`` unless ``merge`` is one of ``MERGES``."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def check_directions(params, name: str = "params") -> None:
    """Raise a ``ValueError`` unless ``params`` is ``{"forward": cell_params, "backward": cell_params}``."""
    if not (isinstance(params, Mapping) and "forward" in params and "backward" in params):
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f'{name} must be {{"forward": cell_params, "backward": cell_params}} for a bidirectional '
                         f"layer (jaxseq.layers.init_bidirectional); got {got}")


def check_cell_params(cell: Cell, params, name: str = "params", *, needs_hidden: bool = True) -> None:
    """Check ``params`` against ``cell``'s layout: the full layout when ``cell.layout`` names one of
    ``jaxseq.cells.LAYOUTS``; for other cells, when ``needs_hidden``, that the recurrent kernel ``params["W"]``
    (read for a zero carry's hidden size) is there."""
    if cell.layout is not None:
        cells.check_params(params, cell.layout, name)
    elif needs_hidden and not (isinstance(params, Mapping) and np.ndim(params.get("W")) == 2):
        hint = (" (per-direction params: pass bidirectional=True)"
                if isinstance(params, Mapping) and {"forward", "backward"} <= set(params) else "")
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f'{name} must be a cell\'s params with a recurrent kernel "W" [hidden, k * hidden] '
                         f"(cell.init); got {got}{hint}")


def check_carry_pair(carry) -> None:
    """Raise a ``ValueError`` unless ``carry`` is a ``(forward_carry, backward_carry)`` pair."""
    if isinstance(carry, LSTMState) or not (isinstance(carry, (tuple, list)) and len(carry) == 2):
        got = "a single LSTMState" if isinstance(carry, LSTMState) else f"a {type(carry).__name__}"
        raise ValueError(f"carry of a bidirectional layer must be a pair (forward_carry, backward_carry), got {got}")


def dropout(x: jax.Array, rate: float, key) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by ``1 / (1 - rate)``.

    ``key=None`` (evaluation) or ``rate == 0`` returns ``x`` unchanged.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
