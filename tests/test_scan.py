"""Cells and the time loop against a hand-stepped Python loop (the oracle), plus transforms and bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq import cells
from jaxseq.cells import LSTMState
from helpers import assert_trees_close

CELLS = {"rnn": cells.rnn, "relu_rnn": cells.relu_rnn, "lstm": cells.lstm, "gru": cells.gru}
I, H, T = 3, 4, 6


def hand_loop(cell, params, carry, xs_t):
    """Oracle: step the cell over time-major inputs in Python; returns (final carry, stacked outputs)."""
    ys = []
    for x in xs_t:
        carry, y = cell.apply(params, carry, x)
        ys.append(y)
    return carry, jnp.stack(ys)


def hand_masked(cell, params, xs, lengths, reverse):
    """Oracle for lengths: run each sequence alone over its valid prefix (reversed if asked), zeros after."""
    finals, outs = [], []
    for x, n in zip(xs, lengths):
        carry = cell.init_carry((), H)
        seq = x[:n][::-1] if reverse else x[:n]
        if n:
            carry, ys = hand_loop(cell, params, carry, seq)
            ys = ys[::-1] if reverse else ys
        else:
            ys = jnp.zeros((0, H))
        finals.append(carry)
        outs.append(jnp.concatenate([ys, jnp.zeros((x.shape[0] - n, H))]))
    return jax.tree_util.tree_map(lambda *c: jnp.stack(c), *finals), jnp.stack(outs)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("unroll", [1, 3])
@pytest.mark.parametrize("batch_shape", [(), (2,), (2, 3)])
def test_unroll_matches_hand_loop(name, unroll, batch_shape, key):
    cell = CELLS[name]
    k_p, k_x = jax.random.split(key)
    params = cell.init(k_p, I, H)
    xs = jax.random.normal(k_x, (*batch_shape, T, I))
    carry0 = cell.init_carry(batch_shape, H)
    final, ys = jaxseq.unroll(cell.apply, params, carry0, xs, unroll=unroll)
    ref_final, ref_ys = hand_loop(cell, params, carry0, jnp.moveaxis(xs, -2, 0))
    assert ys.shape == (*batch_shape, T, H)
    assert_trees_close((final, ys), (ref_final, jnp.moveaxis(ref_ys, 0, -2)))
    # reverse=True without lengths: the loop runs backwards, outputs stay aligned with their inputs.
    final_r, ys_r = jaxseq.unroll(cell.apply, params, carry0, xs, reverse=True, unroll=unroll)
    ref_final_r, ref_ys_r = hand_loop(cell, params, carry0, jnp.moveaxis(xs, -2, 0)[::-1])
    assert_trees_close((final_r, ys_r), (ref_final_r, jnp.moveaxis(ref_ys_r[::-1], 0, -2)))


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_keep_carry_emit_zeros_and_reverse_inside_length(name, reverse, key):
    cell = CELLS[name]
    k_p, k_x = jax.random.split(key)
    params = cell.init(k_p, I, H)
    xs = jax.random.normal(k_x, (4, T, I))
    lengths = jnp.array([T, 3, 0, 1])
    final, ys = jaxseq.unroll(cell.apply, params, cell.init_carry((4,), H), xs, lengths=lengths, reverse=reverse)
    ref_final, ref_ys = hand_masked(cell, params, xs, [T, 3, 0, 1], reverse)
    assert_trees_close((final, ys), (ref_final, ref_ys))
    # A length-0 sequence returns its initial carry exactly.
    assert all(float(jnp.abs(leaf[2]).max()) == 0.0 for leaf in jax.tree_util.tree_leaves(final))


def test_time_major_equals_batch_major(key):
    params = cells.lstm.init(key, I, H)
    xs = jax.random.normal(key, (2, T, I))
    carry0 = cells.lstm.init_carry((2,), H)
    lengths = jnp.array([T, 2])
    bm = jaxseq.unroll(cells.lstm.apply, params, carry0, xs, lengths=lengths, reverse=True)
    tm_final, tm_ys = jaxseq.unroll(cells.lstm.apply, params, carry0, jnp.swapaxes(xs, 0, 1), lengths=lengths,
                                    reverse=True, time_major=True)
    assert_trees_close(bm, (tm_final, jnp.swapaxes(tm_ys, 0, 1)))


@pytest.mark.parametrize("merge", ["concat", "sum", "mean", "mul", None])
def test_bidirectional_merges_padding_aware_directions(merge, key):
    k_p, k_x = jax.random.split(key)
    params = jaxseq.layers.init_bidirectional(cells.gru, k_p, I, H)
    xs = jax.random.normal(k_x, (3, T, I))
    lengths = jnp.array([T, 4, 1])
    (c_f, c_b), ys = jaxseq.bidirectional(cells.gru, params, xs, lengths=lengths, merge=merge)
    ref_cf, y_f = hand_masked(cells.gru, params["forward"], xs, [T, 4, 1], reverse=False)
    ref_cb, y_b = hand_masked(cells.gru, params["backward"], xs, [T, 4, 1], reverse=True)
    expected = {"concat": jnp.concatenate([y_f, y_b], -1), "sum": y_f + y_b, "mean": (y_f + y_b) / 2,
                "mul": y_f * y_b, None: (y_f, y_b)}[merge]
    assert_trees_close((c_f, c_b, ys), (ref_cf, ref_cb, expected))


def test_stacked_layers_and_dropout_between_layers(key):
    params = jaxseq.layers.init_stacked(cells.lstm, key, I, H, num_layers=3)
    xs = jax.random.normal(key, (2, T, I))
    carries, ys = jaxseq.stacked(cells.lstm, params, xs)
    h = xs
    for p in params:  # oracle: three unrolls, one after the other
        _, h = jaxseq.unroll(cells.lstm.apply, p, cells.lstm.init_carry((2,), H), h)
    assert_trees_close(ys, h)
    assert len(carries) == 3
    # Dropout: deterministic without a key, random with one, different per key, zero rate = identity.
    _, y_drop = jaxseq.stacked(cells.lstm, params, xs, dropout_rate=0.5, key=jax.random.PRNGKey(1))
    _, y_drop2 = jaxseq.stacked(cells.lstm, params, xs, dropout_rate=0.5, key=jax.random.PRNGKey(2))
    _, y_nokey = jaxseq.stacked(cells.lstm, params, xs, dropout_rate=0.5)
    assert not np.allclose(y_drop, ys) and not np.allclose(y_drop, y_drop2)
    assert_trees_close(y_nokey, ys)
    # Bidirectional stack: second layer reads 2H features.
    bi = jaxseq.layers.init_stacked(cells.gru, key, I, H, num_layers=2, bidirectional=True)
    assert bi[1]["forward"]["U"].shape == (2 * H, 3 * H)
    (_, ys_bi) = jaxseq.stacked(cells.gru, bi, xs, bidirectional=True, lengths=jnp.array([T, 3]))
    assert ys_bi.shape == (2, T, 2 * H) and float(jnp.abs(ys_bi[1, 3:]).max()) == 0.0


def _primitives(key, cell, **kwargs):
    xs = jax.random.normal(key, (2, T, I))
    params = cell.init(key, I, H)
    jaxpr = jax.make_jaxpr(lambda p, x: jaxseq.layer(cell, p, x, carry=cell.init_carry((2,), H), **kwargs))(
        params, xs)
    return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


def test_layer_runs_a_declared_fused_layer_and_the_reference_loop_otherwise(key):
    """``jaxseq.layer`` (what stacked, the nn wrappers and the models call) runs the fused LSTM layer for the cells
    that declare it (``Cell.fused``: every ``make_lstm`` cell) and the reference loop for every other cell."""
    assert "custom_vjp_call" in _primitives(key, cells.lstm)
    assert "custom_vjp_call" in _primitives(key, cells.make_lstm(forget_bias=0.0))  # any make_lstm cell
    scanned = _primitives(key, cells.lstm, impl="scan")
    assert "scan" in scanned and "custom_vjp_call" not in scanned
    assert "scan" in _primitives(key, cells.gru)
    with pytest.raises(ValueError, match="impl='fused' needs a cell that declares a fused layer"):
        _primitives(key, cells.gru, impl="fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        _primitives(key, cells.lstm, impl="cuda")


def test_a_user_built_cell_is_never_silently_fused(key):
    """The layout (for checks) and the fused layer are separate declarations: a cell with the LSTM layout but its
    own step runs that step in the reference loop; declaring ``fused="lstm"`` is what selects the fused layer."""
    calls = []

    def my_apply(params, carry, x):
        calls.append(1)
        return cells.lstm.apply(params, carry, x)

    mine = cells.Cell(cells.lstm.init, cells.lstm.init_carry, my_apply, layout="lstm")
    assert "custom_vjp_call" not in _primitives(key, mine) and calls
    declared = mine._replace(fused="lstm")
    assert "custom_vjp_call" in _primitives(key, declared)
    with pytest.raises(ValueError, match=r"cell.fused must name one of jaxseq.layers.FUSED \['lstm'\]"):
        _primitives(key, mine._replace(fused="gru"))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_another_cells_params_give_one_line_errors(key, name):
    """``unroll(cells.X.apply, <params of another cell>)`` says what X expects instead of failing inside the step
    (a KeyError, TypeError or AttributeError from the scan body before each cell checked its params)."""
    cell = CELLS[name]
    xs = jnp.zeros((2, T, I))
    for other in sorted(o for o in CELLS if CELLS[o].layout != cell.layout):
        params = CELLS[other].init(key, I, H)
        with pytest.raises(ValueError, match=r'^params(\["\w+"\])? .*expects \{"U"') as error:
            jaxseq.unroll(cell.apply, params, cell.init_carry((2,), H), xs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^carry must be"):
        wrong_carry = cells.gru.init_carry((2,), H) if name == "lstm" else cells.lstm.init_carry((2,), H)
        cell.apply(cell.init(key, I, H), wrong_carry, xs[:, 0])


def test_hidden_state_of_a_carry(key):
    h, c = jnp.ones((2, H)), jnp.zeros((2, H))
    assert cells.hidden_state(LSTMState(h, c)) is h
    assert cells.hidden_state(c) is c


def test_lstm_forget_bias_and_initialisers(key):
    params = cells.lstm.init(key, I, H)
    np.testing.assert_array_equal(params["b"], jnp.concatenate([jnp.zeros(H), jnp.ones(H), jnp.zeros(2 * H)]))
    plain = cells.make_lstm(forget_bias=0.0).init(key, I, H)
    np.testing.assert_array_equal(plain["b"], jnp.zeros(4 * H))
    # Orthogonal recurrent blocks (Keras): each H×H gate block of W is orthogonal.
    for block in jnp.split(params["W"], 4, axis=1):
        np.testing.assert_allclose(block.T @ block, jnp.eye(H), atol=1e-5)
    custom = cells.make_rnn(kernel_init=jax.nn.initializers.ones).init(key, I, H)
    np.testing.assert_array_equal(custom["U"], jnp.ones((I, H)))


def test_composes_with_jit_vmap_grad_jvp(key):
    cell = cells.lstm
    params = cell.init(key, I, H)
    xs = jax.random.normal(key, (5, T, I))
    lengths = jnp.array([T, 1, 2, 3, 0])

    def loss(p, x, n):
        final, ys = jaxseq.unroll(cell.apply, p, cell.init_carry(x.shape[:-2], H), x, lengths=n)
        return (ys ** 2).sum() + final.c.sum()

    eager = loss(params, xs, lengths)
    np.testing.assert_allclose(jax.jit(loss)(params, xs, lengths), eager, rtol=1e-6)
    per_example = jax.vmap(loss, in_axes=(None, 0, 0))(params, xs, lengths)
    np.testing.assert_allclose(per_example.sum(), eager, rtol=1e-5)
    g = jax.jit(jax.grad(loss))(params, xs, lengths)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    _, jvp_out = jax.jvp(lambda p: loss(p, xs, lengths), (params,), (tangent,))
    np.testing.assert_allclose(jvp_out, sum(g[k].sum() for k in g), rtol=1e-4)


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_bfloat16(name, key):
    cell = CELLS[name]
    params32 = cell.init(key, I, H)
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params32)
    xs = jax.random.normal(key, (2, T, I))
    final, ys = jaxseq.unroll(cell.apply, params16, cell.init_carry((2,), H, jnp.bfloat16), xs.astype(jnp.bfloat16))
    assert ys.dtype == jnp.bfloat16
    _, ys32 = jaxseq.unroll(cell.apply, params32, cell.init_carry((2,), H), xs)
    np.testing.assert_allclose(ys.astype(jnp.float32), ys32, atol=5e-2)  # bf16 keeps ~3 significant digits


def test_bad_input_names_argument_shape_and_expectation(key):
    params = cells.lstm.init(key, I, H)
    carry = cells.lstm.init_carry((2,), H)
    xs = jnp.zeros((2, T, I))
    cases = [
        (dict(xs=jnp.zeros((I,))), r"xs must be a sequence .* got shape \(3,\)"),
        (dict(xs=jnp.zeros((2, T, I + 1))), r"xs has 4 features .* expects 3"),
        (dict(xs=jnp.zeros((2, 0, I))), r"empty time axis"),
        (dict(xs=xs.astype(jnp.bfloat16)), r"dtype bfloat16 but the cell's params have dtype float32"),
        (dict(lengths=jnp.array([T + 1, 0])), r"lengths must lie in \[0, 6\]"),
        (dict(lengths=jnp.array([-1, 0])), r"lengths must lie in \[0, 6\]"),
        (dict(lengths=jnp.array([1, 2, 3])), r"lengths has shape \(3,\) .* expected one length per sequence"),
        (dict(lengths=jnp.array([1.0, 2.0])), r"lengths must be integers"),
        (dict(carry=cells.lstm.init_carry((3,), H)),
         r"carry\.h \(carry leaf 0\) has shape \(3, 4\) .* batch shape \(2,\)"),
    ]
    for overrides, pattern in cases:
        args = dict(xs=xs, carry=carry, lengths=None) | overrides
        with pytest.raises(ValueError, match=pattern):
            jaxseq.unroll(cells.lstm.apply, params, args["carry"], args["xs"], lengths=args["lengths"])
    with pytest.raises(ValueError, match="merge must be one of"):
        jaxseq.bidirectional(cells.lstm, jaxseq.layers.init_bidirectional(cells.lstm, key, I, H), xs, merge="max")
    with pytest.raises(ValueError, match="activation must be one of"):
        cells.make_rnn("sigmoid")
    # The check runs at trace time under jit too, before lax.scan is entered.
    with pytest.raises(ValueError, match="features"):
        jax.jit(functools.partial(jaxseq.unroll, cells.lstm.apply))(params, carry, jnp.zeros((2, T, 5)))


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_carry_hidden_size_and_dtype_are_checked_before_the_scan(key, name):
    cell = CELLS[name]
    params = cell.init(key, I, H)
    xs = jnp.zeros((2, T, I))
    leaf = r"carry\.h \(carry leaf 0\)" if name == "lstm" else "carry"
    with pytest.raises(ValueError, match=leaf + r" has shape \(2, 5\) .* W \(4, \d+\) has hidden size 4; "
                                         r"expected shape \(2, 4\)"):
        jaxseq.unroll(cell.apply, params, cell.init_carry((2,), H + 1), xs)
    with pytest.raises(ValueError, match=leaf + r" has .* dtype bfloat16 but the cell's params have dtype float32"):
        jax.jit(functools.partial(jaxseq.unroll, cell.apply))(params, cell.init_carry((2,), H, jnp.bfloat16), xs)
    with pytest.raises(ValueError, match=r'params\["b"\] has shape \(3,\)'):
        jaxseq.unroll(cell.apply, {**params, "b": jnp.zeros(3)}, cell.init_carry((2,), H), xs)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_init_rejects_sizes_that_are_not_positive_ints(key, name):
    for input_size, hidden_size, bad in [(I, 0, "hidden_size"), (0, H, "input_size"), (I, -1, "hidden_size"),
                                         (I, 2.5, "hidden_size"), (True, H, "input_size")]:
        with pytest.raises(ValueError, match=f"{bad} must be a positive int"):
            CELLS[name].init(key, input_size, hidden_size)
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        jaxseq.layers.init_stacked(CELLS[name], key, I, H, 0)


def test_bidirectional_and_stacked_params_structure_is_checked(key):
    xs = jnp.zeros((2, T, I))
    lstm_params, gru_params = cells.lstm.init(key, I, H), cells.gru.init(key, I, H)
    bi_params = jaxseq.layers.init_bidirectional(cells.lstm, key, I, H)
    structure = r'must be \{"forward": cell_params, "backward": cell_params\}'
    with pytest.raises(ValueError, match=r"^params " + structure + r".*got keys \['U', 'W', 'b'\]"):
        jaxseq.bidirectional(cells.lstm, lstm_params, xs)
    with pytest.raises(ValueError, match=r"^layer_params\[1\] " + structure):
        jaxseq.stacked(cells.lstm, [bi_params, lstm_params], xs, bidirectional=True)
    with pytest.raises(ValueError, match=r"layer_params\[0\] is missing \['U', 'W', 'b'\].*per-direction params"):
        jaxseq.stacked(cells.lstm, [bi_params], xs)
    with pytest.raises(ValueError, match=r'params\["backward"\] is missing \[\'b_h\'\]: a GRU expects .*LSTM params'):
        jaxseq.bidirectional(cells.gru, {"forward": gru_params, "backward": lstm_params}, xs)
    with pytest.raises(ValueError, match=r'layer_params\[0\]\["forward"\]\["U"\] has shape \(3, 12\).*U should have '
                                         r"shape \(3, 16\) \(these look like GRU params\)"):
        jaxseq.stacked(cells.lstm, [{"forward": gru_params, "backward": gru_params}], xs, bidirectional=True)
    with pytest.raises(ValueError, match=r"carry of a bidirectional layer must be a pair .* single LSTMState"):
        jaxseq.bidirectional(cells.lstm, bi_params, xs, carry=cells.lstm.init_carry((2,), H))
    with pytest.raises(ValueError, match="carry must be an LSTMState"):
        jaxseq.layer(cells.lstm, lstm_params, xs, carry=jnp.zeros((2, H)), impl="scan")


def test_stacked_needs_at_least_one_layer(key):
    xs = jnp.zeros((2, T, I))
    with pytest.raises(ValueError, match="at least one layer"):
        jaxseq.stacked(cells.lstm, [], xs)
    with pytest.raises(ValueError, match="layer_params must be a list"):
        jaxseq.stacked(cells.lstm, cells.lstm.init(key, I, H), xs)


def test_lengths_given_as_a_list_or_numpy_array(key):
    params = cells.gru.init(key, I, H)
    xs = jax.random.normal(key, (3, T, I))
    carry = cells.gru.init_carry((3,), H)
    expected = jaxseq.unroll(cells.gru.apply, params, carry, xs, lengths=jnp.array([T, 2, 0]), reverse=True)
    for lengths in ([T, 2, 0], (T, 2, 0), np.array([T, 2, 0])):
        assert_trees_close(jaxseq.unroll(cells.gru.apply, params, carry, xs, lengths=lengths, reverse=True), expected)
    bi_params = jaxseq.layers.init_bidirectional(cells.gru, key, I, H)
    assert_trees_close(jaxseq.bidirectional(cells.gru, bi_params, xs, lengths=[T, 2, 0]),
                       jaxseq.bidirectional(cells.gru, bi_params, xs, lengths=jnp.array([T, 2, 0])))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 6\]"):
        jaxseq.unroll(cells.gru.apply, params, carry, xs, lengths=[T + 1, 2, 0])
    with pytest.raises(ValueError, match="lengths must be an int array"):
        jaxseq.unroll(cells.gru.apply, params, carry, xs, lengths=[[1], 2, 0])
