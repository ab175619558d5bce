"""Flax wrappers only call the pure functions: same params in, same numbers out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq import cells, nn
from helpers import assert_trees_close


def test_rnn_module_equals_pure_unroll(key):
    xs = jax.random.normal(key, (2, 5, 3))
    lengths = jnp.array([5, 2])
    module = nn.RNN(cells.lstm, 4, reverse=True)
    variables = module.init(key, xs, lengths=lengths)
    params = variables["params"]["cell"]
    assert set(params) == {"U", "W", "b"}
    got = jax.jit(module.apply)(variables, xs, lengths=lengths)
    expected = jaxseq.unroll(cells.lstm.apply, params, cells.lstm.init_carry((2,), 4), xs, lengths=lengths,
                             reverse=True)
    assert_trees_close(got, expected)


def test_bidirectional_and_stacked_modules(key):
    xs = jax.random.normal(key, (2, 5, 3))
    bi = nn.Bidirectional(cells.gru, 4, merge="sum")
    variables = bi.init(key, xs)
    assert_trees_close(bi.apply(variables, xs),
                       jaxseq.bidirectional(cells.gru, variables["params"]["directions"], xs, merge="sum"))
    stack = nn.StackedRNN(cells.lstm, 4, num_layers=2, dropout_rate=0.5)
    variables = stack.init(key, xs)
    _, y_eval = stack.apply(variables, xs)
    _, y_pure = jaxseq.stacked(cells.lstm, variables["params"]["layers"], xs)
    assert_trees_close(y_eval, y_pure)
    _, y_train = stack.apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(y_train, y_eval)


def test_sizes_and_layer_count_must_be_positive(key):
    xs = jnp.zeros((2, 5, 3))
    for module, name in [(nn.RNN(cells.lstm, 0), "hidden_size"), (nn.Bidirectional(cells.gru, -1), "hidden_size"),
                         (nn.RNN(cells.make_rnn("relu"), 2.0), "hidden_size"),
                         (nn.StackedRNN(cells.lstm, 4, num_layers=0), "num_layers")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            module.init(key, xs)
