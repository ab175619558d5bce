"""Sub-commands of the ``jaxseq`` console script, one module each (discovered by ``jaxseq.cli``)."""
