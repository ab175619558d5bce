"""jaxseq: recurrent sequence models in JAX, from the chapter's equations to fast, measured layers.

Core (pure functions): ``cells`` (rnn, lstm, gru), ``unroll`` / ``bidirectional`` / ``stacked`` (the time
loop), ``bptt`` (hand-derived backward passes), ``layers`` (fast LSTM layer), ``gradients`` (gradient norms vs
theory), ``interop`` (PyTorch / Keras weights). Flax wrappers in ``jaxseq.nn``; models in ``jaxseq.models``;
the training loop in ``jaxseq.training``.
"""
from jaxseq import bptt, cells, gradients, interop, layers, scan
from jaxseq.cells import Cell, LSTMState
from jaxseq.scan import bidirectional, stacked, unroll

__all__ = ["Cell", "LSTMState", "bidirectional", "bptt", "cells", "gradients", "interop", "layers", "scan", "stacked", "unroll"]
__version__ = "0.1.0"
