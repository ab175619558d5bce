"""Models built on the pure cells: classifier, captioning, seq2seq, forecasting."""
