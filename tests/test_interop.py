"""Parity with Keras 3 (JAX backend) and PyTorch recurrent layers: outputs, final states, input and weight
gradients, through jaxseq.interop's weight conversion."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq import cells, interop
from jaxseq.cells import LSTMState
from helpers import KERAS_NOT_JAX, assert_trees_close, import_or_skip

B, T, I, H = 3, 7, 5, 4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, I)).astype(np.float32), rng.standard_normal((B, T, H)).astype(np.float32)


def _jaxseq_objective(cell, params, xs, dys):
    """Σ ⟨dys, ys⟩ + Σ final h, the same scalar every library below computes."""
    final, ys = jaxseq.unroll(cell.apply, params, cell.init_carry((B,), H), xs)
    h = final.h if isinstance(final, LSTMState) else final
    return jnp.vdot(ys, dys) + h.sum(), (final, ys)


# ----- Keras ---------------------------------------------------------------------------------------------
keras = import_or_skip("keras")

KERAS_CASES = {
    "LSTM": (cells.lstm, interop.lstm_from_keras, interop.lstm_from_keras_arrays),
    "GRU": (cells.gru, interop.gru_from_keras, interop.gru_from_keras_arrays),
    "SimpleRNN": (cells.rnn, interop.rnn_from_keras, interop.rnn_from_keras_arrays),
}


@pytest.mark.skipif(keras.backend.backend() != "jax", reason=KERAS_NOT_JAX)
@pytest.mark.parametrize("name", KERAS_CASES)
def test_keras_parity_outputs_states_and_gradients(name):
    cell, from_layer, from_arrays = KERAS_CASES[name]
    keras.utils.set_random_seed(1)
    layer = getattr(keras.layers, name)(H, return_sequences=True, return_state=True)
    layer.build((B, T, I))
    # Random biases too (Keras initialises them to zero/one), so every weight is exercised.
    layer.set_weights([w if i < 2 else np.random.default_rng(2).standard_normal(w.shape).astype(np.float32)
                       for i, w in enumerate(layer.get_weights())])
    xs, dys = _inputs()
    params = from_layer(layer)

    def keras_objective(weights, x):
        outputs, _ = layer.stateless_call(weights, [v.value for v in layer.non_trainable_variables], x)
        ys, h = outputs[0], outputs[1]
        return jnp.vdot(ys, dys) + h.sum(), outputs

    weights = [v.value for v in layer.trainable_variables]
    (k_val, k_out), (k_gw, k_gx) = jax.value_and_grad(keras_objective, argnums=(0, 1), has_aux=True)(weights, xs)
    (j_val, (final, ys)), (j_gp, j_gx) = jax.value_and_grad(
        lambda p, x: _jaxseq_objective(cell, p, x, dys), argnums=(0, 1), has_aux=True)(params, xs)

    assert_trees_close(ys, k_out[0], rtol=1e-5, atol=1e-5)
    expected_final = LSTMState(k_out[1], k_out[2]) if name == "LSTM" else k_out[1]
    assert_trees_close(final, expected_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_val, k_val, rtol=1e-5)
    assert_trees_close(j_gx, k_gx, rtol=1e-5, atol=1e-5)
    # The conversion is a permutation, so it maps Keras' weight gradients onto jaxseq's.
    assert_trees_close(j_gp, from_arrays(*k_gw), rtol=1e-5, atol=1e-5)


def test_keras_bidirectional_and_bad_layers():
    layer = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True))
    layer.build((B, T, I))
    params = interop.lstm_from_keras(layer)
    xs, _ = _inputs()
    (_, _), ys = jaxseq.bidirectional(cells.lstm, params, xs)
    np.testing.assert_allclose(ys, np.asarray(layer(xs)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected a Keras GRU"):
        interop.gru_from_keras(keras.layers.LSTM(H))
    old_gru = keras.layers.GRU(H, reset_after=False)
    old_gru.build((B, T, I))
    with pytest.raises(ValueError, match="reset_after=False"):
        interop.gru_from_keras(old_gru)


# ----- PyTorch -------------------------------------------------------------------------------------------
# A fixture, not a module-level import: without torch only these tests skip, not the Keras ones above.
@pytest.fixture
def torch():
    return import_or_skip("torch")


TORCH_CASES = {
    "LSTM": (cells.lstm, interop.lstm_from_torch, interop.lstm_to_torch, {}),
    "GRU": (cells.gru, interop.gru_from_torch, interop.gru_to_torch, {}),
    "RNN": (cells.rnn, interop.rnn_from_torch, interop.rnn_to_torch, {"nonlinearity": "tanh"}),
    "RNN-relu": (cells.relu_rnn, interop.rnn_from_torch, interop.rnn_to_torch, {"nonlinearity": "relu"}),
}


def _torch_objective(torch, module, xs, dys):
    x = torch.tensor(xs, requires_grad=True)
    ys, state = module(x)
    h = state[0] if isinstance(state, tuple) else state
    value = (ys * torch.tensor(dys)).sum() + h[-1].sum()
    value.backward()
    return value, ys, state, x.grad


@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_parity_outputs_states_and_gradients(name, torch):
    cell, from_torch, to_torch, kwargs = TORCH_CASES[name]
    torch.manual_seed(0)
    module = getattr(torch.nn, name.split("-")[0])(I, H, batch_first=True, **kwargs)
    xs, dys = _inputs(3)
    params = from_torch(module)
    t_val, t_ys, t_state, t_gx = _torch_objective(torch, module, xs, dys)
    (j_val, (final, ys)), (j_gp, j_gx) = jax.value_and_grad(
        lambda p, x: _jaxseq_objective(cell, p, x, dys), argnums=(0, 1), has_aux=True)(params, xs)
    np.testing.assert_allclose(ys, t_ys.detach().numpy(), rtol=1e-5, atol=1e-5)
    expected = (LSTMState(t_state[0][0].detach().numpy(), t_state[1][0].detach().numpy()) if name == "LSTM"
                else t_state[0].detach().numpy())
    assert_trees_close(final, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_val, t_val.item(), rtol=1e-5)
    assert_trees_close(j_gx, t_gx.numpy(), rtol=1e-5, atol=1e-5)
    torch_grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    np.testing.assert_allclose(j_gp["U"], torch_grads["weight_ih_l0"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_gp["W"], torch_grads["weight_hh_l0"].T, rtol=1e-5, atol=1e-5)
    # b = b_ih + b_hh (LSTM/RNN), so both torch biases receive jaxseq's bias gradient; the GRU keeps both.
    np.testing.assert_allclose(j_gp["b"], torch_grads["bias_ih_l0"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_gp.get("b_h", j_gp["b"]), torch_grads["bias_hh_l0"], rtol=1e-5, atol=1e-5)
    # Round trip: jaxseq params written back into a fresh module give the same outputs.
    back = to_torch(params, getattr(torch.nn, name.split("-")[0])(I, H, batch_first=True, **kwargs))
    np.testing.assert_allclose(back(torch.tensor(xs))[0].detach().numpy(), t_ys.detach().numpy(), atol=1e-6)


def test_torch_stacked_bidirectional_lstm(torch):
    torch.manual_seed(0)
    module = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
    layers = interop.lstm_from_torch(module)
    assert len(layers) == 2 and set(layers[0]) == {"forward", "backward"}
    xs, _ = _inputs(4)
    _, ys = jaxseq.stacked(cells.lstm, layers, xs, bidirectional=True)
    np.testing.assert_allclose(ys, module(torch.tensor(xs))[0].detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects torch.nn.GRU"):
        interop.gru_from_torch(module)
