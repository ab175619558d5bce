"""Flax wrappers only call the pure functions: same params in, same numbers out; nn.RNN keeps Flax's contract."""
import dataclasses
import inspect

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen.recurrent import flip_sequences

import jaxseq
from jaxseq import cells, nn
from helpers import assert_trees_close


def test_rnn_module_equals_pure_unroll(key):
    xs = jax.random.normal(key, (2, 5, 3))
    lengths = jnp.array([5, 2])
    module = nn.RNN(cells.lstm, 4, reverse=True, keep_order=True, return_carry=True)
    variables = module.init(key, xs, seq_lengths=lengths)
    params = variables["params"]["cell"]
    assert set(params) == {"U", "W", "b"}
    got = jax.jit(module.apply)(variables, xs, seq_lengths=lengths)
    expected = jaxseq.unroll(cells.lstm.apply, params, cells.lstm.init_carry((2,), 4), xs, lengths=lengths,
                             reverse=True)
    assert_trees_close(got, expected)
    # time_major as a call keyword, as in Flax.
    final, ys = module.apply(variables, jnp.swapaxes(xs, 0, 1), seq_lengths=lengths, time_major=True)
    assert_trees_close((final, jnp.swapaxes(ys, 0, 1)), expected)


def test_rnn_follows_flax_linen_rnn_contract(key):
    """Same attribute and call keyword names as flax.linen.RNN (which takes a Flax cell, not a jaxseq Cell), the
    outputs alone unless return_carry, and reversed outputs in reversed order unless keep_order."""
    flax_fields = {f.name for f in dataclasses.fields(flax.linen.RNN)}
    ours = {f.name for f in dataclasses.fields(nn.RNN)}
    assert {"time_major", "return_carry", "reverse", "keep_order", "unroll"} <= flax_fields & ours
    flax_keywords = set(inspect.signature(flax.linen.RNN.__call__).parameters) - {"self", "init_key"}
    assert flax_keywords == set(inspect.signature(nn.RNN.__call__).parameters) - {"self"}

    xs = jax.random.normal(key, (2, 5, 3))
    lengths = jnp.array([5, 2])
    module = nn.RNN(cells.gru, 4)
    variables = module.init(key, xs)
    ys = module.apply(variables, xs, seq_lengths=lengths)
    assert ys.shape == (2, 5, 4)
    carry, ys_again = module.apply(variables, xs, seq_lengths=lengths, return_carry=True)
    assert_trees_close(ys_again, ys)
    aligned = module.apply(variables, xs, seq_lengths=lengths, reverse=True, keep_order=True)
    flax_order = module.apply(variables, xs, seq_lengths=lengths, reverse=True)
    assert_trees_close(flax_order, flip_sequences(aligned, lengths, num_batch_dims=1, time_major=False))
    assert not np.allclose(flax_order, aligned)


def test_bidirectional_and_stacked_modules(key):
    xs = jax.random.normal(key, (2, 5, 3))
    bi = nn.Bidirectional(cells.gru, 4, merge="sum", return_carry=True)
    variables = bi.init(key, xs)
    assert_trees_close(bi.apply(variables, xs),
                       jaxseq.bidirectional(cells.gru, variables["params"]["directions"], xs, merge="sum"))
    stack = nn.StackedRNN(cells.lstm, 4, num_layers=2, dropout_rate=0.5)
    variables = stack.init(key, xs)
    y_eval = stack.apply(variables, xs)
    _, y_pure = jaxseq.stacked(cells.lstm, variables["params"]["layers"], xs)
    assert_trees_close(y_eval, y_pure)
    y_train = stack.apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(y_train, y_eval)


def test_sizes_and_layer_count_must_be_positive(key):
    xs = jnp.zeros((2, 5, 3))
    for module, name in [(nn.RNN(cells.lstm, 0), "hidden_size"), (nn.Bidirectional(cells.gru, -1), "hidden_size"),
                         (nn.RNN(cells.make_rnn("relu"), 2.0), "hidden_size"),
                         (nn.StackedRNN(cells.lstm, 4, num_layers=0), "num_layers")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            module.init(key, xs)


def test_rnn_module_runs_a_custom_cell_whose_params_do_not_say_the_hidden_size(key):
    """The module knows hidden_size, so a custom cell's params need no recurrent kernel "W" to size the carry."""
    def init(k, input_size, hidden_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(k)
        return {"Wx": jax.random.normal(k1, (input_size, hidden_size), dtype) * 0.3,
                "Wh": jax.random.normal(k2, (hidden_size, hidden_size), dtype) * 0.3}

    def apply(params, h, x):
        h = jnp.tanh(x @ params["Wx"] + h @ params["Wh"])
        return h, h

    cell = cells.Cell(init, lambda batch, hidden, dtype=jnp.float32: jnp.zeros((*batch, hidden), dtype), apply)
    xs = jax.random.normal(key, (2, 5, 3))
    module = nn.RNN(cell, 4, return_carry=True)
    variables = module.init(key, xs)
    final, ys = module.apply(variables, xs)
    expected = jaxseq.unroll(apply, variables["params"]["cell"], jnp.zeros((2, 4)), xs)
    assert_trees_close((final, ys), expected)
