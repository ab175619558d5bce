"""Weight import/export between jaxseq cells and PyTorch / Keras recurrent layers.

Layouts (see ``jaxseq.cells``): jaxseq stores ``U [input, k*H]``, ``W [H, k*H]``, ``b [k*H]``.

* PyTorch keeps ``weight_ih [k*H, input]`` and ``weight_hh [k*H, H]`` (transposes of ``U``, ``W``) and two
  biases. LSTM gates i, f, g, o and GRU gates r, z, n are jaxseq's order, so only transposes are needed; the
  LSTM and RNN biases add up (``b = b_ih + b_hh``), the GRU keeps both (``b``, ``b_h``) because its
  recurrent bias sits inside the reset product.
* Keras keeps ``kernel`` = ``U``, ``recurrent_kernel`` = ``W``, ``bias`` = ``b`` with LSTM gates i, f, c, o
  (jaxseq's order). Keras GRU blocks are z, r, h and, with ``reset_after=True`` (the default), its bias is
  ``[2, 3H]`` (input row, recurrent row); import swaps the first two blocks.

Multi-layer or bidirectional torch modules come back as a list with one entry per layer (a cell's params,
or ``{"forward": ..., "backward": ...}``), the layout ``jaxseq.layers.stacked`` takes.

torch and keras are imported only by the functions that need them.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _np(tensor) -> np.ndarray:
    """A torch tensor or Keras variable as a float numpy array (no autograd graph kept)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def _from_torch_arrays(kind: str, w_ih, w_hh, b_ih, b_hh) -> dict:
    params = {"U": jnp.asarray(w_ih.T), "W": jnp.asarray(w_hh.T)}
    if kind == "gru":
        params.update(b=jnp.asarray(b_ih), b_h=jnp.asarray(b_hh))
    else:
        params["b"] = jnp.asarray(b_ih + b_hh)
    return params


def _check_torch(module, kind: str):
    expected = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind]
    name = type(module).__name__
    if name not in (expected, expected + "Cell"):
        raise ValueError(f"{kind}_from_torch expects torch.nn.{expected} or {expected}Cell, got {name}")
    if getattr(module, "proj_size", 0):
        raise ValueError("LSTM with proj_size > 0 (LSTMP) has no jaxseq equivalent")


def _from_torch(module, kind: str):
    _check_torch(module, kind)
    size = _GATES[kind] * module.hidden_size
    zeros = np.zeros(size, np.float32)
    state = {k: _np(v) for k, v in module.state_dict().items()}
    if type(module).__name__.endswith("Cell"):
        return _from_torch_arrays(kind, state["weight_ih"], state["weight_hh"], state.get("bias_ih", zeros),
                                  state.get("bias_hh", zeros))
    layers = []
    for layer in range(module.num_layers):
        directions = []
        for suffix in ([""] + (["_reverse"] if module.bidirectional else [])):
            tag = f"l{layer}{suffix}"
            directions.append(_from_torch_arrays(kind, state[f"weight_ih_{tag}"], state[f"weight_hh_{tag}"],
                                                 state.get(f"bias_ih_{tag}", zeros), state.get(f"bias_hh_{tag}", zeros)))
        layers.append({"forward": directions[0], "backward": directions[1]} if module.bidirectional else directions[0])
    if module.num_layers == 1 and not module.bidirectional:
        return layers[0]
    return layers


def lstm_from_torch(module) -> dict | list:
    """jaxseq ``cells.lstm`` params from ``torch.nn.LSTM`` / ``LSTMCell`` (list for stacked/bidirectional)."""
    return _from_torch(module, "lstm")


def gru_from_torch(module) -> dict | list:
    """jaxseq ``cells.gru`` params from ``torch.nn.GRU`` / ``GRUCell``."""
    return _from_torch(module, "gru")


def rnn_from_torch(module) -> dict | list:
    """jaxseq RNN params from ``torch.nn.RNN`` / ``RNNCell``; use ``cells.rnn`` or ``cells.relu_rnn`` to match
    the module's ``nonlinearity``."""
    return _from_torch(module, "rnn")


def _to_torch(params: dict, kind: str, module):
    import torch

    hidden = params["W"].shape[0]
    w_ih, w_hh = np.asarray(params["U"]).T, np.asarray(params["W"]).T
    if kind == "gru":
        b_ih, b_hh = np.asarray(params["b"]), np.asarray(params["b_h"])
    else:
        b_ih, b_hh = np.asarray(params["b"]), np.zeros_like(np.asarray(params["b"]))
    if module is None:
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
        module = cls(w_ih.shape[1], hidden, batch_first=True)
    if (module.input_size, module.hidden_size) != (w_ih.shape[1], hidden):
        raise ValueError(f"module has input {module.input_size}, hidden {module.hidden_size}; params have input "
                         f"{w_ih.shape[1]}, hidden {hidden}")
    suffix = "" if type(module).__name__.endswith("Cell") else "_l0"
    with torch.no_grad():
        for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
            getattr(module, name + suffix).copy_(torch.tensor(np.array(value, np.float32)))
    return module


def lstm_to_torch(params: dict, module=None):
    """Write single-layer jaxseq LSTM params into ``module`` (a new batch-first ``nn.LSTM`` if None)."""
    return _to_torch(params, "lstm", module)


def gru_to_torch(params: dict, module=None):
    """Write single-layer jaxseq GRU params into ``module`` (a new batch-first ``nn.GRU`` if None)."""
    return _to_torch(params, "gru", module)


def rnn_to_torch(params: dict, module=None):
    """Write single-layer jaxseq RNN params into ``module`` (a new batch-first tanh ``nn.RNN`` if None)."""
    return _to_torch(params, "rnn", module)


def lstm_from_keras_arrays(kernel, recurrent_kernel, bias=None) -> dict:
    """jaxseq LSTM params from Keras ``LSTM`` weights (same gate order and layout)."""
    bias = np.zeros(np.shape(kernel)[1], np.asarray(kernel).dtype) if bias is None else bias
    return {"U": jnp.asarray(kernel), "W": jnp.asarray(recurrent_kernel), "b": jnp.asarray(bias)}


def gru_from_keras_arrays(kernel, recurrent_kernel, bias=None) -> dict:
    """jaxseq GRU params from Keras ``GRU(reset_after=True)`` weights: blocks z, r, h become r, z, n."""
    kernel, recurrent_kernel = np.asarray(kernel), np.asarray(recurrent_kernel)
    hidden = recurrent_kernel.shape[0]
    bias = np.zeros((2, 3 * hidden), kernel.dtype) if bias is None else np.asarray(bias)
    if bias.shape != (2, 3 * hidden):
        raise ValueError(f"Keras GRU bias has shape {bias.shape}; jaxseq's GRU needs reset_after=True, "
                         f"bias shape {(2, 3 * hidden)}")
    order = np.concatenate([np.arange(hidden, 2 * hidden), np.arange(hidden), np.arange(2 * hidden, 3 * hidden)])
    return {"U": jnp.asarray(kernel[:, order]), "W": jnp.asarray(recurrent_kernel[:, order]),
            "b": jnp.asarray(bias[0, order]), "b_h": jnp.asarray(bias[1, order])}


def rnn_from_keras_arrays(kernel, recurrent_kernel, bias=None) -> dict:
    """jaxseq RNN params from Keras ``SimpleRNN`` weights (same layout)."""
    return lstm_from_keras_arrays(kernel, recurrent_kernel, bias)


def _keras_weights(layer, expected: str, convert):
    name = type(layer).__name__
    if name == "Bidirectional":
        return {"forward": _keras_weights(layer.forward_layer, expected, convert),
                "backward": _keras_weights(layer.backward_layer, expected, convert)}
    if name != expected:
        raise ValueError(f"expected a Keras {expected} layer (or Bidirectional of one), got {name}")
    if expected == "GRU" and not layer.cell.reset_after:
        raise ValueError("Keras GRU with reset_after=False is not jaxseq's GRU (reset applied after the product)")
    return convert(*[_np(w) for w in layer.get_weights()])


def lstm_from_keras(layer) -> dict:
    """jaxseq ``cells.lstm`` params from a built Keras ``LSTM`` (or ``Bidirectional(LSTM)``) layer."""
    return _keras_weights(layer, "LSTM", lstm_from_keras_arrays)


def gru_from_keras(layer) -> dict:
    """jaxseq ``cells.gru`` params from a built Keras ``GRU(reset_after=True)`` layer."""
    return _keras_weights(layer, "GRU", gru_from_keras_arrays)


def rnn_from_keras(layer) -> dict:
    """jaxseq RNN params from a built Keras ``SimpleRNN`` layer (tanh: ``cells.rnn``; relu: ``cells.relu_rnn``)."""
    return _keras_weights(layer, "SimpleRNN", rnn_from_keras_arrays)
