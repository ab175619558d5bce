"""English->Vietnamese translation: train a seq2seq model with or without attention, score BLEU::

    result = translate.train_and_evaluate(TranslateConfig(attention="additive"),
                                          TrainConfig(out_dir="runs/t", **translate.TRAINING_DEFAULTS))
    run = translate.load_run("runs/t")
    translate.predict(run, "I love teaching", beam=5)       # Prediction(source, target, text)
    translate.evaluate(run, sources, references, beam=5)    # BLEU report + detokenised hypotheses
    translate.evaluate_split("runs/t", "test", beam=5)      # the same on the run's held-out test split
    translate.compare(["runs/t", "runs/u"])                 # the metrics.json of each, checked

Training reads the shipped Tatoeba pairs (``data="tatoeba"``, no download) or an IWSLT-style folder
(``train.en/vi`` and ``tst2012.en/vi``), trains with ``jaxseq.training.fit`` (best checkpoint by dev loss), then
translates the dev set (beam search) and writes ``metrics.json`` (BLEU overall and by source length; results
only, no timings) and ``dev.hyp`` into the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np

from jaxseq import tasks

MODEL_FILE = "model.json"
LENGTH_EDGES = (1, 5, 7, 9, 11, 13)  # BLEU-by-length bins: 1-4, 5-6, 7-8, 9-10, 11-12, 13+ source tokens
# The training settings the model defaults were chosen with (the command line's defaults): Adam, batch 32, 16
# epochs. TrainConfig's own defaults (lr 1e-3) reach about 2 BLEU less in 16 epochs.
TRAINING_DEFAULTS = {"epochs": 16, "batch_size": 32, "learning_rate": 2e-3}

log = logging.getLogger("jaxseq.tasks.translate")


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
    """Data and model of a translation run (the training hyper-parameters live in ``TrainConfig``)."""

    data: str = "tatoeba"  # "tatoeba" (shipped) or a folder with train.{en,vi} and tst2012.{en,vi}
    attention: str = "additive"  # "none" or a score function of jaxseq.attention
    # The model defaults were chosen by dev BLEU (docs/translation.md): at the same sizes and training settings a
    # bi-GRU encoder reached 10.6 in 16 epochs and a bi-LSTM 6.8.
    cell: str = "gru"  # gru | lstm
    layers: int = 1  # encoder layers
    dec_layers: int = 1  # decoder layers
    bidirectional: bool = True  # bidirectional encoder
    embed: int = 128
    hidden: int = 64  # encoder width per direction (the decoder is 2 * hidden wide)
    dropout: float = 0.1
    split_seed: int = 0  # Tatoeba's dev/test hold-out; fixed apart from the training seed, so seeds share it
    max_len: int = 10  # drop training pairs longer than this (tokens)
    min_count: int = 2  # vocabulary: minimum training count
    max_vocab: int | None = None  # vocabulary: maximum size (specials included)
    bucket_widths: tuple[int, ...] | None = None  # padded widths of the length buckets; None = the library grid
    beam: int = 5  # beam width of the final dev translation

    def __post_init__(self):
        for name in ("layers", "dec_layers", "embed", "hidden", "max_len", "min_count", "beam"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bucket_widths is not None and max(self.bucket_widths) < self.max_len + 1:
            raise ValueError(f"bucket_widths: the largest width {max(self.bucket_widths)} must hold max_len + 1 "
                             f"(</s>) = {self.max_len + 1}")


@dataclasses.dataclass(frozen=True)
class TranslateResult:
    """What ``train_and_evaluate`` measured (``metrics`` is also ``out_dir/metrics.json``)."""

    metrics: dict  # data, attention, epochs, sizes, dev_loss and the dev BLEU report ("dev")
    hypotheses: list  # detokenised dev translations, as in out_dir/dev.hyp
    out_dir: pathlib.Path
    already_finished: bool  # the run folder held a finished run, which was scored again, not retrained


@dataclasses.dataclass(frozen=True)
class Prediction:
    source: list  # the source tokens as the model read them
    target: list  # the translated tokens
    text: str  # the detokenised translation
    unknown: list  # source tokens outside the vocabulary (read as <unk>)


# --- a trained model --------------------------------------------------------------------------------------------

class Translator:
    """A trained model with its vocabularies: tokenised sentences in, token lists (and attention) out."""

    def __init__(self, config, params, src_vocab, tgt_vocab, tokenizer: str):
        from jaxseq.data import translation as tr

        self.config, self.params = config, params
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.tokenizer = tokenizer
        self.tokenize = tr.TOKENIZERS[tokenizer]
        self._jitted = {}

    def prepare(self, text: str, moses_escaped: bool | None = None) -> list[str]:
        """Tokens of raw ``text``; Moses escapes are undone for IWSLT-style runs unless told otherwise."""
        from jaxseq.data import translation as tr

        if moses_escaped is None:
            moses_escaped = self.tokenizer == "whitespace"  # IWSLT-style runs read Moses-escaped files
        return self.tokenize(tr.clean(tr.unescape_moses(text) if moses_escaped else text))

    def _decoder(self, beam: int, max_len: int):
        import jax

        from jaxseq import decoding
        from jaxseq.data import translation as tr
        from jaxseq.models import seq2seq

        if (beam, max_len) not in self._jitted:
            config = self.config

            def run(params, src, src_len):
                state = seq2seq.encode(config, params, src, src_len)
                start = jax.numpy.full((src.shape[0],), tr.BOS_ID, jax.numpy.int32)
                tokens, _, _ = decoding.beam_search(seq2seq.make_step_fn(config, params), state, start,
                                                    beam_size=beam, max_len=max_len, end_token=tr.EOS_ID)
                return tokens[:, 0]
            self._jitted[(beam, max_len)] = jax.jit(run)
        return self._jitted[(beam, max_len)]

    def translate(self, sentences: list[list[str]], *, beam: int = 5, chunk: int = 64) -> list[list[str]]:
        """Beam-search translations of tokenised sentences (best hypothesis each), in fixed-shape chunks so
        one compilation serves the whole set."""
        from jaxseq.data import translation as tr

        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        ids = [self.src_vocab.encode(s) for s in sentences]
        width = max(1, max(len(s) for s in ids))
        if self.config.attention == "location" and width > self.config.max_src_len:
            raise ValueError(f"a source sentence has {width} tokens; this location-attention model addresses "
                             f"at most {self.config.max_src_len} positions")
        # Vietnamese runs ~1.3x longer than English in tokens; 2x + 10 leaves room without wasting steps.
        decode = self._decoder(beam, 2 * width + 10)
        out = []
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            batch = tr.make_batch(part, [[tr.EOS_ID]] * len(part), batch_size=chunk, src_width=width,
                                  tgt_width=1)
            tokens = np.asarray(decode(self.params, batch["src"], batch["src_len"]))
            out += [self.tgt_vocab.decode(row) for row in tokens[:len(part)]]
        return out

    def attention(self, source: list[str], target: list[str]):
        """Attention weights ``[len(target) + 1, len(source)]`` of the model reading ``target`` (+ ``</s>``)."""
        from jaxseq.data import translation as tr
        from jaxseq.models import seq2seq

        if self.config.attention == "none":
            raise ValueError("this run was trained without attention (attention='none'); it has no attention map")
        src = np.asarray([self.src_vocab.encode(source)], np.int32)
        tgt_out = self.tgt_vocab.encode(target, add_end=True)
        tgt_in = np.asarray([[tr.BOS_ID] + tgt_out[:-1]], np.int32)
        state = seq2seq.encode(self.config, self.params, src, np.asarray([src.shape[1]], np.int32))
        _, weights = seq2seq.decode_teacher_forced(self.config, self.params, state, tgt_in)
        return np.asarray(weights[0])


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def load_run(run_dir) -> Translator:
    """The best checkpoint (by dev loss) of a run folder written by ``train_and_evaluate``.

    Raises:
      FileNotFoundError: no such folder, no checkpoint or no model/vocabulary file. ValueError: another task's
      run, or a broken model file.
    """
    from jaxseq import training
    from jaxseq.data import translation as tr
    from jaxseq.models import seq2seq

    run_dir = pathlib.Path(run_dir)
    tasks.run_config(run_dir, "translate")
    if not (run_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / MODEL_FILE} not found: is {run_dir} a 'jaxseq translate train' run "
                                "folder?")
    meta = _read_json(run_dir / MODEL_FILE)
    try:
        config = seq2seq.Seq2SeqConfig(**meta["model"])
        tokenizer = meta["tokenizer"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{run_dir / MODEL_FILE} is not a 'jaxseq translate train' model file (bad or missing "
                         f"entry {error})") from None
    src_vocab, tgt_vocab = tr.load_vocabs(run_dir)
    params = training.restore_params(str(run_dir.resolve()), lambda k: seq2seq.init_params(config, k))
    return Translator(config, params, src_vocab, tgt_vocab, tokenizer)


def bleu_report(translator: Translator, sources: list[list[str]], references: list[str], *,
                beam: int) -> tuple[dict, list[str]]:
    """Translate, then sacreBLEU (detokenised) + tokenised BLEU + BLEU by source length; and the hypotheses."""
    from jaxseq import metrics
    from jaxseq.data import translation as tr

    hyps = translator.translate(sources, beam=beam)
    detok = [tr.detokenize(h) for h in hyps]
    score, signature = metrics.corpus_bleu(detok, references)
    ref_tokens = [translator.tokenize(r) for r in references]
    report = {
        "sentences": len(sources),
        "beam": beam,
        "sacrebleu": round(score, 2),
        "sacrebleu_signature": signature,
        "tokenized_bleu": round(metrics.tokenized_bleu(hyps, ref_tokens), 2),
        "bleu_by_source_length": [{**row, "bleu": round(row["bleu"], 2)} for row in
                                  metrics.bleu_by_length(detok, references, [len(s) for s in sources],
                                                         LENGTH_EDGES)],
    }
    return report, detok


def evaluate(run: Translator, sources: list[str], references: list[str], *, beam: int = 5) -> tuple[dict, list[str]]:
    """BLEU of ``run`` on raw source and reference sentences (one each per line of a file pair)."""
    from jaxseq.data import translation as tr

    if len(sources) != len(references):
        raise ValueError(f"misaligned sentences: {len(sources)} sources but {len(references)} references")
    escaped = run.tokenizer == "whitespace"
    tokenised = [run.prepare(s) for s in sources]
    refs = [tr.clean(tr.unescape_moses(r) if escaped else r) for r in references]
    empty = [i + 1 for i, s in enumerate(tokenised) if not s]
    if empty:
        raise ValueError(f"source sentence {empty[0]} is empty ({len(empty)} empty sentences in all)")
    return bleu_report(run, tokenised, refs, beam=beam)


def evaluate_split(run_dir, split: str = "test", *, beam: int = 5) -> tuple[dict, list[str]]:
    """BLEU of a run on its own data's ``"dev"`` or ``"test"`` split, scored as training scores dev (so
    ``"dev"`` reproduces ``metrics.json``); the report and the detokenised translations."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    run_dir = pathlib.Path(run_dir)
    translator = load_run(run_dir)
    meta = _read_json(run_dir / MODEL_FILE)
    if "data_path" not in meta:
        raise ValueError(f"{run_dir / MODEL_FILE} does not say which data the run read (written by an older "
                         "jaxseq); score it on a file pair instead")
    corpus = _load_corpus(meta["data_path"], meta["max_len"], meta["split_seed"])
    pairs = corpus.dev if split == "dev" else corpus.test
    if not pairs:
        raise ValueError(f"{corpus.name} has no {split} split (an IWSLT-style folder needs tst2013.en/vi for test)")
    return bleu_report(translator, [translator.tokenize(p.source) for p in pairs], [p.target for p in pairs],
                       beam=beam)


def predict(run: Translator, text: str, *, beam: int = 5) -> Prediction:
    """The translation of one sentence of raw text."""
    from jaxseq.data import translation as tr

    source = run.prepare(text)
    if not source:
        raise ValueError("the text to translate is empty")
    unknown = [t for t in source if run.src_vocab.encode([t]) == [tr.UNK_ID]]
    target = run.translate([source], beam=beam)[0]
    return Prediction(source, target, tr.detokenize(target), unknown)


# --- training ---------------------------------------------------------------------------------------------------

def _load_corpus(data: str, max_len: int, split_seed: int):
    from jaxseq.data import translation as tr

    return (tr.load_tatoeba(max_len=max_len, seed=split_seed) if data == "tatoeba"
            else tr.load_iwslt_dir(data, max_len=max_len))


def train_and_evaluate(config: TranslateConfig, train_config, *, callbacks=()) -> TranslateResult:
    """Train with ``jaxseq.training.fit`` (best checkpoint by dev loss), then translate the dev set with beam
    ``config.beam``. Writes ``vocab.src``, ``vocab.tgt``, ``model.json``, ``loss.png``, ``metrics.json`` and
    ``dev.hyp`` into ``train_config.out_dir``; a run found there resumes. ``callbacks``
    (``jaxseq.training.Callback``) go to ``fit``."""
    import jax

    from jaxseq import training
    from jaxseq.data import translation as tr
    from jaxseq.models import seq2seq

    widths = tuple(sorted(config.bucket_widths)) if config.bucket_widths else tr.DEFAULT_WIDTHS
    seed = train_config.seed
    corpus = _load_corpus(config.data, config.max_len, config.split_seed)
    tok = tr.TOKENIZERS[corpus.tokenizer]
    log.info("data %s: %s; train %d, dev %d pairs", corpus.name, corpus.stats.summary(), len(corpus.train),
             len(corpus.dev))
    src_vocab = tr.build_vocab([tok(p.source) for p in corpus.train], min_count=config.min_count,
                               max_size=config.max_vocab)
    tgt_vocab = tr.build_vocab([tok(p.target) for p in corpus.train], min_count=config.min_count,
                               max_size=config.max_vocab)
    dev_sources = [tok(p.source) for p in corpus.dev]
    model = seq2seq.Seq2SeqConfig(
        src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), embed=config.embed, hidden=config.hidden,
        enc_layers=config.layers, dec_layers=config.dec_layers, cell=config.cell,
        bidirectional=config.bidirectional, attention=config.attention, dropout=config.dropout,
        max_src_len=max(64, max(len(s) for s in dev_sources)))

    out = pathlib.Path(train_config.out_dir)
    # data_path is absolute for a folder, so `evaluate_split` finds the data from any working directory.
    data_path = config.data if config.data == "tatoeba" else str(pathlib.Path(config.data).resolve())
    meta = {"model": dataclasses.asdict(model), "tokenizer": corpus.tokenizer, "data": corpus.name,
            "data_path": data_path, "split_seed": config.split_seed, "max_len": config.max_len,
            "min_count": config.min_count, "max_vocab": config.max_vocab, "bucket_widths": list(widths)}

    def write_run_files(folder: pathlib.Path, step: int) -> None:
        """The vocabularies and model.json, once fit holds the folder and has accepted it (a refused or busy
        run must not overwrite the files of the run it found)."""
        del step
        tr.save_vocabs(folder, src_vocab, tgt_vocab)
        (folder / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    train = tr.BucketedBatches(tr.EncodedPairs.from_pairs(corpus.train, src_vocab, tgt_vocab, tokenizer=tok),
                               train_config.batch_size, seed=seed, widths=widths)
    # Dev loss uses the dev pairs within max_len, padded to one shape: one extra compilation, not one per bucket.
    dev_short = tr.filter_length(corpus.dev, config.max_len, tokenizer=tok)
    dev_batches = tr.BucketedBatches(tr.EncodedPairs.from_pairs(dev_short, src_vocab, tgt_vocab, tokenizer=tok),
                                     train_config.batch_size, seed=0, bucketing=False, widths=widths)
    eval_loss = jax.jit(lambda p, b: seq2seq.loss_fn(model, p, b, None))

    def dev_loss(params) -> dict[str, float]:
        total, tokens = 0.0, 0.0
        for i in range(dev_batches.num_batches(0)):
            value, aux = eval_loss(params, dev_batches.batch(0, i))
            total += float(value) * float(aux["tokens"])
            tokens += float(aux["tokens"])
        return {"dev_loss": total / tokens, "dev_perplexity": float(np.exp(total / tokens))}

    if train_config.best_metric is None:
        train_config = dataclasses.replace(train_config, best_metric="dev_loss")
    log.info("model: %s\nbuckets (source, target widths): %s", model, train.shapes())
    described = "no attention" if config.attention == "none" else f"{config.attention} attention"
    fitted = training.fit(train_config, init_params=lambda k: seq2seq.init_params(model, k),
                          loss_fn=lambda p, b, k: seq2seq.loss_fn(model, p, b, k), train=train,
                          evaluate=dev_loss, run_config=meta,
                          callbacks=[training.LambdaCallback(on_train_begin=write_run_files),
                                     training.LossCurve(title=f"translation ({described}), run "
                                                              f"{out.name}", eval_metric="dev_loss"), *callbacks])
    if fitted.already_finished:
        log.info("%s: already finished at step %d; translating the dev set with its best checkpoint", out,
                 fitted.step)

    translator = load_run(out)
    report, detok = bleu_report(translator, dev_sources, [p.target for p in corpus.dev], beam=config.beam)
    evaluation = dev_loss(translator.params)
    results = {"data": corpus.name, "attention": config.attention, "epochs": train_config.epochs,
               "train_pairs": len(corpus.train), "dev_pairs": len(corpus.dev),
               "vocab": {"source": len(src_vocab), "target": len(tgt_vocab)},
               "dev_loss": round(evaluation["dev_loss"], 4), "dev": report}
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "dev.hyp").write_text("\n".join(detok) + "\n", encoding="utf-8")
    return TranslateResult(results, detok, out, fitted.already_finished)


# --- several runs -----------------------------------------------------------------------------------------------

def compare(run_dirs) -> list[dict]:
    """The ``metrics.json`` of each run folder, checked to be a translation run's."""
    rows = []
    for run_dir in run_dirs:
        path = pathlib.Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: has 'jaxseq translate train --out {run_dir}' finished?")
        results = _read_json(path)
        missing = [key for key in ("attention", "epochs", "dev", "dev_loss") if key not in results] if isinstance(
            results, dict) else ["attention"]
        if not missing:
            dev = results["dev"] if isinstance(results["dev"], dict) else {}
            missing = [f"dev.{key}" for key in ("sacrebleu", "tokenized_bleu", "sacrebleu_signature",
                                                 "bleu_by_source_length") if key not in dev]
        if missing:
            raise ValueError(f"{run_dir} is not a translation run (its metrics.json {path} has no "
                             f"{missing[0]!r}); compare takes folders written by 'jaxseq translate train'")
        rows.append(results)
    return rows
