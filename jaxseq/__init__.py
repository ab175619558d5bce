"""jaxseq: recurrent sequence models in JAX, from the chapter's equations to fast, measured layers.

Core (pure functions): ``cells`` (rnn, lstm, gru); ``layer`` / ``bidirectional`` / ``stacked`` (from
``jaxseq.layers``: the one way to run a recurrent layer, fast by default, the reference loop with
``impl="scan"``); ``unroll`` (the reference loop itself, ``jaxseq.scan``); ``bptt`` (hand-derived backward
passes); ``gradients`` (gradient norms vs theory); ``interop`` (PyTorch / Keras weights). Flax wrappers in
``jaxseq.nn``; models in ``jaxseq.models``; the training loop in ``jaxseq.training``. The module map and the
import rules are in docs/architecture.md.
"""
from jaxseq import bptt, cells, gradients, interop, layers, scan
from jaxseq.cells import Cell, LSTMState
from jaxseq.layers import bidirectional, layer, stacked
from jaxseq.scan import unroll

__all__ = ["Cell", "LSTMState", "bidirectional", "bptt", "cells", "gradients", "interop", "layer", "layers", "scan",
           "stacked", "unroll"]
__version__ = "0.1.0"
