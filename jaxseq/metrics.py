"""Evaluation metrics, grouped by task (forecasting errors, BLEU, accuracy). Pure numpy on host arrays."""
from __future__ import annotations

# --- forecasting ---
import numpy as np  # noqa: E402  (sections are appended by topic; each imports what it uses)


def rmse(actual, predicted) -> float:
    """Root mean squared error over all entries (e.g. ``[windows, horizon]`` prices)."""
    err = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    return float(np.sqrt(np.mean(err ** 2)))


def mae(actual, predicted) -> float:
    """Mean absolute error over all entries."""
    return float(np.mean(np.abs(np.asarray(predicted, np.float64) - np.asarray(actual, np.float64))))


def mape(actual, predicted) -> float:
    """Mean absolute percentage error, in percent. Undefined (ValueError) where an actual value is 0."""
    actual = np.asarray(actual, np.float64)
    if np.any(actual == 0):
        raise ValueError("mape is undefined when an actual value is 0; use mae or mase for this series")
    return float(100.0 * np.mean(np.abs((np.asarray(predicted, np.float64) - actual) / actual)))


def mase(actual, predicted, naive) -> float:
    """Mean absolute scaled error against a naive forecast on the *same* windows: MAE(model) / MAE(naive).

    With ``naive`` the persistence forecast (tomorrow = today), below 1 beats persistence and above 1 loses
    to it. (Hyndman & Koehler 2006 scale by the in-sample naive MAE instead; on a trending series such as
    BTC that scale comes from a much cheaper price era, so here the test-period persistence MAE is used.)
    """
    scale = mae(actual, naive)
    if scale == 0:
        raise ValueError("mase is undefined: the naive forecast is exact on every window (MAE 0)")
    return mae(actual, predicted) / scale


def directional_accuracy(last, actual, predicted) -> float:
    """Fraction of windows whose forecast moves in the same direction as the truth, from the origin value.

    Args:
      last: value at each window's origin ``[N]`` (today's price).
      actual, predicted: ``[N]`` or ``[N, H]``; each step's direction is ``sign(value - last)``.

    Days where the truth does not move are left out; a forecast of "no change" counts as wrong (it makes no
    call), so persistence scores 0 and is better reported as "none".
    """
    last = np.asarray(last, np.float64)
    actual = np.asarray(actual, np.float64)
    predicted = np.asarray(predicted, np.float64)
    if actual.ndim == 2:
        last = last[:, None]
    true_sign = np.sign(actual - last)
    moved = true_sign != 0
    if not moved.any():
        return float("nan")
    return float(np.mean(np.sign(predicted - last)[moved] == true_sign[moved]))


def forecast_report(last, actual, predicted, naive, *, directional: bool = True) -> dict[str, float | None]:
    """All forecasting metrics of one forecaster on price windows ``[N, H]``, as a JSON-able dict.

    ``rel_rmse`` is RMSE / RMSE(naive); ``directional_accuracy`` is None when ``directional`` is False (for
    forecasts that never call a direction, like persistence); ``mape`` is None where an actual value is 0.
    """
    return {
        "rmse": rmse(actual, predicted),
        "mae": mae(actual, predicted),
        "mape": mape(actual, predicted) if np.all(np.asarray(actual) != 0) else None,
        "mase": mase(actual, predicted, naive),
        "rel_rmse": rmse(actual, predicted) / rmse(actual, naive),
        "directional_accuracy": directional_accuracy(last, actual, predicted) if directional else None,
    }


# --- translation ---
import numpy as np  # noqa: E402,F811  (each section imports what it uses)


def corpus_bleu(hypotheses, references) -> tuple[float, str]:
    """sacreBLEU on detokenised text (13a tokenisation, mixed case): ``(score 0-100, signature)``.

    ``hypotheses`` and ``references`` are lists of strings, one reference per hypothesis.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.BLEU()
    return float(bleu.corpus_score(list(hypotheses), [list(references)]).score), str(bleu.get_signature())


def tokenized_bleu(hypotheses, references) -> float:
    """BLEU on already-tokenised text (lists of tokens), no re-tokenisation: what ``multi-bleu.perl`` and
    the published IWSLT'15 numbers (Luong & Manning 23.3, TF NMT 26.1 on tst2013) count. Not comparable to
    sacreBLEU's detokenised score."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.BLEU(tokenize="none", force=True)
    return float(bleu.corpus_score([" ".join(h) for h in hypotheses],
                                   [[" ".join(r) for r in references]]).score)


def bleu_by_length(hypotheses, references, source_lengths, edges) -> list[dict]:
    """sacreBLEU per source-length bin: bins ``[edges[i], edges[i+1])``, the last one open-ended.

    Returns one ``{"bin": "5-6", "lo", "hi", "sentences", "bleu"}`` per non-empty bin.
    """
    lengths = np.asarray(source_lengths)
    rows = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        pick = np.flatnonzero((lengths >= lo) & ((lengths < hi) if hi is not None else True))
        if len(pick) == 0:
            continue
        score, _ = corpus_bleu([hypotheses[j] for j in pick], [references[j] for j in pick])
        label = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        rows.append({"bin": label, "lo": int(lo), "hi": None if hi is None else int(hi - 1),
                     "sentences": int(len(pick)), "bleu": score})
    return rows


# --- captioning ---
import numpy as np  # noqa: E402,F811  (each section imports what it uses)


def caption_bleu(hypotheses, references) -> dict:
    """Corpus BLEU-1..4 (cumulative, uniform weights) with all references per image, via sacreBLEU.

    Args:
      hypotheses: one caption per image (cleaned, space-separated words, no startseq/endseq).
      references: a list of reference captions per image (Flickr8k: five); lists may differ in length.

    Returns:
      ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": .. (0-100), "signature": sacreBLEU's}``. Captions are
      already tokenised by the cleaning, so sacreBLEU's tokeniser is off (``tokenize="none"``); scores are
      comparable to NLTK's ``corpus_bleu`` with weights (1/n, ..., 1/n), not to the MS-COCO toolkit, whose PTB
      tokeniser and BLEU variant differ slightly.
    """
    import sacrebleu

    hypotheses, references = list(hypotheses), [list(r) for r in references]
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("caption_bleu needs at least one hypothesis")
    if min(len(r) for r in references) == 0:
        raise ValueError("every hypothesis needs at least one reference caption")
    depth = max(len(r) for r in references)
    # sacreBLEU takes reference *streams*; None fills the streams an image has no caption for.
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(depth)]
    out = {}
    for n in range(1, 5):
        bleu = sacrebleu.BLEU(tokenize="none", max_ngram_order=n)
        out[f"bleu{n}"] = float(bleu.corpus_score(hypotheses, streams).score)
    out["signature"] = str(bleu.get_signature())
    return out


def caption_cider_rouge(hypotheses, references) -> dict | None:
    """CIDEr-D and ROUGE-L from pycocoevalcap (extra ``caption-metrics``), or None when it is not installed.

    Both run in Python (no Java); the captions are used as already tokenised (no PTB tokeniser, which needs
    Java). CIDEr's document frequencies come from ``references``, so score the whole test set at once.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return None
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    res = {i: [h if h else "<empty>"] for i, h in enumerate(hypotheses)}
    gts = {i: list(r) for i, r in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "rouge_l": float(np.asarray(rouge))}
