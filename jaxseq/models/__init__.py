"""Models built on the pure cells — classifier, captioning, seq2seq, forecasting — as modules and losses only;
the workflows around them (data, training, scoring, runs) are ``jaxseq.tasks``."""
