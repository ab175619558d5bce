"""Evaluation metrics, grouped by task (forecasting errors, BLEU, accuracy). Pure numpy on host arrays."""
from __future__ import annotations
