"""The time loop: ``unroll`` over ``lax.scan`` with lengths, padding-aware reverse, bidirectional and stacking.

Public tensors are batch-major ``[*batch, time, features]`` (``time_major=True`` takes
``[time, *batch, features]``); the scan itself always runs time-major.

Variable length: ``lengths`` ``int[*batch]`` marks each sequence's valid prefix. Padded steps keep the carry
and emit zeros, so the final carry is each sequence's last valid one and a length-0 sequence returns its
initial carry. ``reverse=True`` runs each sequence backwards *inside its own length*: the padding stays at the
end and outputs stay aligned with their inputs (unlike a plain ``lax.scan(reverse=True)``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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
    batch_shape = _batch_shape(xs, time_major)
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
                    f"{tuple(params['W'].shape)} has hidden size {hidden}; expected shape {(*batch_shape, hidden)}")
            if jnp.result_type(leaf) != dtype:
                raise ValueError(
                    f"{name} has {_describe(leaf)} but the cell's params have dtype {dtype}; "
                    f"expected dtype {dtype} (e.g. init_carry(..., dtype=params['W'].dtype))")
        if tuple(np.shape(leaf)[:-1]) != batch_shape:
            raise ValueError(
                f"{name} has {_describe(leaf)} but xs {tuple(np.shape(xs))} has batch shape "
                f"{batch_shape}; expected carry shape {(*batch_shape, hidden)}")
    if lengths is not None:
        if tuple(np.shape(lengths)) != batch_shape:
            raise ValueError(
                f"lengths has shape {tuple(np.shape(lengths))} but xs {tuple(np.shape(xs))} has batch shape "
                f"{batch_shape}; expected one length per sequence, shape {batch_shape}")
        if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise ValueError(f"lengths must be integers, got dtype {jnp.result_type(lengths)}")
        if not isinstance(lengths, jax.core.Tracer):
            values = np.asarray(lengths)
            if values.size and (values.min() < 0 or values.max() > num_steps):
                raise ValueError(
                    f"lengths must lie in [0, {num_steps}] (the time axis of xs {tuple(np.shape(xs))}); got values "
                    f"from {values.min()} to {values.max()}")


def _batch_shape(xs, time_major: bool) -> tuple:
    shape = tuple(np.shape(xs))
    return shape[1:-1] if time_major else shape[:-2]


def _mask_like(valid: jax.Array, leaf: jax.Array) -> jax.Array:
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


def unroll(apply: Callable, params, carry, xs, *, lengths=None, reverse: bool = False, unroll: int = 1,
           time_major: bool = False):
    """Run ``apply(params, carry, x_t) -> (carry, y_t)`` over the time axis of ``xs`` with ``lax.scan``.

    Args:
      apply: a cell's step function (``Cell.apply``) or any function of that shape.
      params: the cell's parameter pytree.
      carry: initial carry, leaves ``[*batch, hidden]`` (e.g. ``cell.init_carry(batch_shape, hidden)``).
      xs: inputs ``[*batch, time, features]`` (``[time, *batch, features]`` if ``time_major``).
      lengths: optional ``int[*batch]`` valid lengths in ``[0, time]`` (an array, or a list of ints); padded steps
        keep the carry and emit zeros. Checked when concrete; under ``jit`` a traced length outside the range is
        clipped into it.
      reverse: run backwards in time (inside each sequence's length when ``lengths`` is given); outputs stay
        aligned with their inputs.
      unroll: steps per scan iteration, passed to ``lax.scan``.
      time_major: whether ``xs`` and the returned ``ys`` put time first.

    Returns:
      ``(final_carry, ys)``: the carry after each sequence's last valid step and the outputs
      ``[*batch, time, out]`` (time-major if ``time_major``).
    """
    xs, lengths = jnp.asarray(xs), as_lengths(lengths)
    check_sequence_inputs(params, carry, xs, lengths, time_major=time_major)
    xs_t = xs if time_major else jnp.moveaxis(xs, -2, 0)
    carry = vary_like(carry, params, xs, lengths)

    if lengths is None:
        carry, ys = lax.scan(lambda c, x: apply(params, c, x), carry, xs_t, reverse=reverse, unroll=unroll)
    else:
        num_steps = xs_t.shape[0]
        lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, num_steps)
        if reverse:
            xs_t = reverse_within_lengths(xs_t, lengths)

        def step(c, inputs):
            x, t = inputs
            valid = t < lengths
            new_c, y = apply(params, c, x)
            new_c = jax.tree_util.tree_map(lambda n, o: jnp.where(_mask_like(valid, n), n, o), new_c, c)
            return new_c, jnp.where(_mask_like(valid, y), y, jnp.zeros((), y.dtype))

        carry, ys = lax.scan(step, carry, (xs_t, jnp.arange(num_steps)), unroll=unroll)
        if reverse:
            ys = reverse_within_lengths(ys, lengths)
    return carry, (ys if time_major else jnp.moveaxis(ys, 0, -2))


_unroll = unroll  # `bidirectional` and `stacked` take an argument named `unroll`, which shadows the function.


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
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def check_directions(params, name: str = "params") -> None:
    """Raise a ``ValueError`` unless ``params`` is ``{"forward": cell_params, "backward": cell_params}``."""
    if not (isinstance(params, Mapping) and "forward" in params and "backward" in params):
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f'{name} must be {{"forward": cell_params, "backward": cell_params}} for a bidirectional '
                         f"layer (jaxseq.scan.init_bidirectional); got {got}")


def check_cell_params(cell: Cell, params, name: str = "params", *, needs_hidden: bool = True) -> None:
    """Check ``params`` against ``cell``'s layout: the full layout for the kinds in ``jaxseq.cells.LAYOUTS``;
    for other cells, when ``needs_hidden``, that the recurrent kernel ``params["W"]`` (read for a zero carry's
    hidden size) is there."""
    if cell.kind in cells.LAYOUTS:
        cells.check_params(params, cell.kind, name)
    elif needs_hidden and not (isinstance(params, Mapping) and np.ndim(params.get("W")) == 2):
        hint = (" (per-direction params: pass bidirectional=True)"
                if isinstance(params, Mapping) and {"forward", "backward"} <= set(params) else "")
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f'{name} must be a cell\'s params with a recurrent kernel "W" [hidden, k * hidden] '
                         f"(cell.init); got {got}{hint}")


def init_bidirectional(cell: Cell, key, input_size: int, hidden_size: int, dtype=jnp.float32) -> dict:
    """Params ``{"forward": ..., "backward": ...}`` for ``bidirectional``."""
    k_f, k_b = jax.random.split(key)
    return {"forward": cell.init(k_f, input_size, hidden_size, dtype),
            "backward": cell.init(k_b, input_size, hidden_size, dtype)}


def check_carry_pair(carry) -> None:
    """Raise a ``ValueError`` unless ``carry`` is a ``(forward_carry, backward_carry)`` pair."""
    if isinstance(carry, LSTMState) or not (isinstance(carry, (tuple, list)) and len(carry) == 2):
        got = "a single LSTMState" if isinstance(carry, LSTMState) else f"a {type(carry).__name__}"
        raise ValueError(f"carry of a bidirectional layer must be a pair (forward_carry, backward_carry), got {got}")


def bidirectional(cell: Cell, params, xs, *, lengths=None, merge: str | None = "concat", carry=None,
                  unroll: int = 1, time_major: bool = False):
    """Run ``cell`` forwards and, padding-aware, backwards over ``xs`` and merge the outputs.

    Args:
      params: ``{"forward": cell_params, "backward": cell_params}`` (see ``init_bidirectional``).
      carry: optional ``(forward_carry, backward_carry)``; zeros by default.
      merge: ``"concat"`` (``[..., 2 * hidden]``), ``"sum"``, ``"mean"``, ``"mul"``, or ``None`` for the pair.

    Returns:
      ``((forward_final, backward_final), ys)``; the backward final carry is the state after each sequence's
      first element.
    """
    # The reference loop for every cell: `bidirectional_layer` with each direction an `unroll`.
    return bidirectional_layer(cell, params, xs, lengths=lengths, merge=merge, carry=carry, unroll=unroll,
                               time_major=time_major, impl="scan")


def init_stacked(cell: Cell, key, input_size: int, hidden_size: int, num_layers: int, *,
                 bidirectional: bool = False, merge: str = "concat", dtype=jnp.float32) -> list:
    """Params for ``stacked``: one entry per layer (``{"forward", "backward"}`` when bidirectional)."""
    cells.check_size("num_layers", num_layers)
    layers, size = [], input_size
    for k in jax.random.split(key, num_layers):
        if bidirectional:
            layers.append(init_bidirectional(cell, k, size, hidden_size, dtype))
            size = 2 * hidden_size if merge == "concat" else hidden_size
        else:
            layers.append(cell.init(k, size, hidden_size, dtype))
            size = hidden_size
    return layers


def layer(cell: Cell, params, carry, xs, *, lengths=None, reverse: bool = False, unroll: int | None = None,
          time_major: bool = False, impl: str = "auto"):
    """One recurrent layer, one direction, by the fastest path: what models and the Flax wrappers call.

    For an LSTM cell (``cell.kind == "lstm"``: ``cells.lstm`` or any ``cells.make_lstm``; batch-major input,
    ``impl`` other than ``"scan"``) this is ``jaxseq.layers.lstm``, the fused layer whose backward pass is the
    hand BPTT (``impl`` goes to it). Any other cell, ``time_major`` or ``impl="scan"`` runs ``unroll`` over the
    cell, the reference loop. ``unroll=None`` means the per-backend
    default steps per loop iteration (``jaxseq.layers.DEFAULT_UNROLL``: 16 on GPU, 1 elsewhere) on either path.
    Same arguments and results as ``unroll``.
    """
    from jaxseq import layers  # layers builds on this module

    layers._check_impl(impl)
    if cell.kind in cells.LAYOUTS:
        cells.check_params(params, cell.kind)
        carry = None if carry is None else cells.check_carry(carry, cell.kind)
    if cell.kind == "lstm" and impl != "scan" and not time_major:
        return layers.lstm(params, xs, carry=carry, lengths=lengths, reverse=reverse, impl=impl, unroll=unroll)
    if impl not in ("auto", "scan"):
        raise ValueError(f"impl={impl!r} exists for LSTM cells (batch-major) only; use 'auto' or 'scan'")
    return _unroll(cell.apply, params, carry, xs, lengths=lengths, reverse=reverse,
                   unroll=layers._resolve_unroll(unroll), time_major=time_major)


def bidirectional_layer(cell: Cell, params, xs, *, lengths=None, merge: str | None = "concat", carry=None,
                        unroll: int | None = None, time_major: bool = False, impl: str = "auto"):
    """``bidirectional`` with each direction run by ``layer`` (the fused LSTM for LSTM cells)."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    check_directions(params)
    for d in ("forward", "backward"):
        check_cell_params(cell, params[d], f'params["{d}"]', needs_hidden=carry is None)
    if carry is None:
        batch_shape = _batch_shape(xs, time_major)
        carry = tuple(cell.init_carry(batch_shape, params[d]["W"].shape[0], params[d]["W"].dtype)
                      for d in ("forward", "backward"))
    else:
        check_carry_pair(carry)
    lengths = as_lengths(lengths)
    kwargs = dict(lengths=lengths, unroll=unroll, time_major=time_major, impl=impl)
    c_f, y_f = layer(cell, params["forward"], carry[0], xs, reverse=False, **kwargs)
    c_b, y_b = layer(cell, params["backward"], carry[1], xs, reverse=True, **kwargs)
    return (c_f, c_b), merge_outputs(y_f, y_b, merge)


def stacked(cell: Cell, layer_params: Sequence[Any], xs, *, lengths=None, bidirectional: bool = False,
            merge: str = "concat", dropout_rate: float = 0.0, key=None, unroll: int | None = None,
            time_major: bool = False, impl: str = "auto"):
    """Stack recurrent layers, each reading the previous layer's outputs, with dropout between layers.

    Dropout (as PyTorch's ``nn.LSTM(dropout=...)``) applies to each layer's input except the first, so not
    after the last layer. Pass ``key`` to enable it (training); ``key=None`` means deterministic. Each layer
    runs through ``layer``: the fused LSTM layer for LSTM cells (``impl="scan"`` for the plain loop).

    ``layer_params`` is a non-empty list (``init_stacked``); each entry is checked against ``cell`` up front.

    Returns:
      ``(final_carries, ys)``: a list with each layer's final carry and the last layer's outputs.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate}")
    if bidirectional and merge is None:
        raise ValueError("stacked bidirectional layers need a merge mode that gives one output, not None")
    if isinstance(layer_params, Mapping) or not isinstance(layer_params, (list, tuple)):
        raise ValueError(f"layer_params must be a list with one entry per layer (jaxseq.scan.init_stacked), got a "
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
    for depth, params in enumerate(layer_params):
        if depth > 0 and dropout_rate > 0.0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, depth), 1.0 - dropout_rate, ys.shape)
            ys = jnp.where(keep, ys / (1.0 - dropout_rate), jnp.zeros((), ys.dtype))
        if bidirectional:
            carry, ys = bidirectional_layer(cell, params, ys, lengths=lengths, merge=merge, unroll=unroll,
                                            time_major=time_major, impl=impl)
        else:
            carry0 = cell.init_carry(_batch_shape(ys, time_major), params["W"].shape[0], params["W"].dtype)
            carry, ys = layer(cell, params, carry0, ys, lengths=lengths, unroll=unroll, time_major=time_major,
                              impl=impl)
        carries.append(carry)
    return carries, ys
