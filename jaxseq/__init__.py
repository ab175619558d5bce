"""jaxseq: recurrent sequence models in JAX, from the chapter's equations to fast, measured layers."""
from jaxseq import cells, scan
from jaxseq.cells import Cell, LSTMState
from jaxseq.scan import bidirectional, stacked, unroll

__all__ = ["Cell", "LSTMState", "bidirectional", "cells", "scan", "stacked", "unroll"]
__version__ = "0.1.0"
