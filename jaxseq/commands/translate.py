"""``jaxseq translate {train,eval,predict,compare}``: chapter 19's English->Vietnamese seq2seq, with or
without attention.

Examples::

    jaxseq translate train --attention additive --epochs 10 --out runs/tatoeba-additive
    jaxseq translate eval --run runs/tatoeba-additive --src dev.en --ref dev.vi --hyp-out dev.hyp
    jaxseq translate predict --run runs/tatoeba-additive "I love teaching" --beam 5 --plot attn.png
    jaxseq translate compare runs/tatoeba-* --plot bleu_vs_length.png

``train`` reads the shipped Tatoeba pairs (``--data tatoeba``, no download) or an IWSLT-style folder
(``--data DIR`` with ``train.en/vi`` and ``tst2012.en/vi``), trains with ``jaxseq.training.fit``, then translates
the dev set (beam search) and writes ``metrics.json`` (BLEU overall and by source length; results only, no
timings) and ``dev.hyp`` into the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from jaxseq.commands import positive_int, reword

MODEL_FILE = "model.json"
LENGTH_EDGES = (1, 5, 7, 9, 11, 13)  # BLEU-by-length bins: 1-4, 5-6, 7-8, 9-10, 11-12, 13+ source tokens


def register(subparsers) -> None:
    p = subparsers.add_parser("translate", help="seq2seq translation (English->Vietnamese) with attention",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train a model and report dev BLEU")
    t.add_argument("--data", default="tatoeba", help="'tatoeba' (shipped) or a folder with train.{en,vi} and "
                   "tst2012.{en,vi} (IWSLT'15, Stanford preprocessing)")
    t.add_argument("--attention", default="additive",
                   choices=["none", "cosine", "additive", "location", "general", "dot", "scaled_dot"])
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    t.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    t.add_argument("--layers", type=int, default=1, help="encoder layers")
    t.add_argument("--dec-layers", type=int, default=1, help="decoder layers")
    t.add_argument("--unidirectional", action="store_true", help="forward-only encoder")
    t.add_argument("--embed", type=int, default=64)
    t.add_argument("--hidden", type=int, default=64, help="encoder width per direction")
    t.add_argument("--dropout", type=float, default=0.2)
    t.add_argument("--max-len", type=int, default=10, help="drop training pairs longer than this (tokens)")
    t.add_argument("--min-count", type=positive_int, default=2, help="vocabulary: minimum training count")
    t.add_argument("--max-vocab", type=int, default=None, help="vocabulary: maximum size (specials included)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--bucket-widths", default=None,
                   help="comma-separated padded widths for length buckets (default: the library grid)")
    t.add_argument("--beam", type=int, default=5, help="beam width for the final dev translation")
    t.add_argument("--restart", action="store_true", help="discard an existing run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="BLEU of a trained run on a source/reference file pair")
    e.add_argument("--run", dest="run_dir", required=True, help="a translate train run folder")
    e.add_argument("--src", required=True)
    e.add_argument("--ref", required=True)
    e.add_argument("--hyp-out", default=None, help="write the detokenised translations here, one per line")
    e.add_argument("--beam", type=positive_int, default=5)
    e.set_defaults(run=run_eval)

    r = sub.add_parser("predict", help="translate one sentence")
    r.add_argument("--run", dest="run_dir", required=True, help="a translate train run folder")
    r.add_argument("text")
    r.add_argument("--beam", type=positive_int, default=5)
    r.add_argument("--plot", default=None, help="write the attention map PNG here")
    r.set_defaults(run=run_predict)

    c = sub.add_parser("compare", help="table of dev BLEU over several runs; BLEU-vs-length plot")
    c.add_argument("runs", nargs="+", help="run folders (each with the metrics.json that train writes)")
    c.add_argument("--plot", default=None, help="write the BLEU against source length PNG here")
    c.set_defaults(run=run_compare)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


# --- shared pieces ---------------------------------------------------------------------------------------------

class Translator:
    """A trained model with its vocabularies: tokenised sentences in, token lists (and attention) out."""

    def __init__(self, config, params, src_vocab, tgt_vocab, tokenizer: str):
        from jaxseq.data import translation as tr

        self.config, self.params = config, params
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.tokenizer = tokenizer
        self.tokenize = tr.TOKENIZERS[tokenizer]
        self._jitted = {}

    @classmethod
    def load(cls, run_dir) -> "Translator":
        from jaxseq import training
        from jaxseq.data import translation as tr
        from jaxseq.models import seq2seq

        run_dir = pathlib.Path(run_dir)
        if not (run_dir / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / MODEL_FILE} not found: is {run_dir} a 'jaxseq translate "
                                    "train' run folder?")
        meta = _read_json(run_dir / MODEL_FILE)
        try:
            config = seq2seq.Seq2SeqConfig(**meta["model"])
            tokenizer = meta["tokenizer"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{run_dir / MODEL_FILE} is not a 'jaxseq translate train' model file (bad or missing "
                             f"entry {error})") from None
        src_vocab, tgt_vocab = tr.load_vocabs(run_dir)
        params = training.restore_params(str(run_dir), lambda k: seq2seq.init_params(config, k))
        return cls(config, params, src_vocab, tgt_vocab, tokenizer)

    def prepare(self, text: str, moses_escaped: bool = False) -> list[str]:
        from jaxseq.data import translation as tr

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
        import numpy as np

        from jaxseq.data import translation as tr

        if beam < 1:
            raise ValueError(f"--beam must be >= 1, got {beam}")
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
        import numpy as np

        from jaxseq.data import translation as tr
        from jaxseq.models import seq2seq

        src = np.asarray([self.src_vocab.encode(source)], np.int32)
        tgt_out = self.tgt_vocab.encode(target, add_eos=True)
        tgt_in = np.asarray([[tr.BOS_ID] + tgt_out[:-1]], np.int32)
        state = seq2seq.encode(self.config, self.params, src, np.asarray([src.shape[1]], np.int32))
        _, weights = seq2seq.decode_teacher_forced(self.config, self.params, state, tgt_in)
        return np.asarray(weights[0])


def bleu_report(translator: Translator, sources: list[list[str]], references: list[str], *, beam: int):
    """Translate, then sacreBLEU (detokenised) + tokenised BLEU + BLEU by source length."""
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


# --- train -----------------------------------------------------------------------------------------------------

def run_train(args) -> int:
    import jax
    import numpy as np

    from jaxseq import training
    from jaxseq.data import translation as tr
    from jaxseq.models import seq2seq

    for flag in ("epochs", "hidden", "embed", "max_len", "batch_size", "layers", "dec_layers", "beam"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    widths = tr.DEFAULT_WIDTHS
    if args.bucket_widths:
        try:
            widths = tuple(sorted(int(w) for w in args.bucket_widths.split(",")))
        except ValueError:
            raise ValueError(f"--bucket-widths must be comma-separated integers, got {args.bucket_widths!r}")
        if widths[-1] < args.max_len + 1:
            raise ValueError(f"--bucket-widths: the largest width {widths[-1]} must hold --max-len + 1 "
                             f"(</s>) = {args.max_len + 1}")

    corpus = (tr.load_tatoeba(max_len=args.max_len, seed=args.seed) if args.data == "tatoeba"
              else tr.load_iwslt_dir(args.data, max_len=args.max_len))
    tok = tr.TOKENIZERS[corpus.tokenizer]
    print(f"data {corpus.name}: {corpus.stats.summary()}; train {len(corpus.train)}, dev {len(corpus.dev)} pairs")
    src_vocab = tr.Vocab.build([tok(p.source) for p in corpus.train], min_count=args.min_count,
                               max_size=args.max_vocab)
    tgt_vocab = tr.Vocab.build([tok(p.target) for p in corpus.train], min_count=args.min_count,
                               max_size=args.max_vocab)
    dev_sources = [tok(p.source) for p in corpus.dev]
    model = seq2seq.Seq2SeqConfig(
        src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), embed=args.embed, hidden=args.hidden,
        enc_layers=args.layers, dec_layers=args.dec_layers, cell=args.cell,
        bidirectional=not args.unidirectional, attention=args.attention, dropout=args.dropout,
        max_src_len=max(64, max(len(s) for s in dev_sources)))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tr.save_vocabs(out, src_vocab, tgt_vocab)
    meta = {"model": dataclasses.asdict(model), "tokenizer": corpus.tokenizer, "data": corpus.name,
            "max_len": args.max_len, "min_count": args.min_count, "max_vocab": args.max_vocab,
            "bucket_widths": list(widths)}
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    train = tr.BucketedBatches(tr.EncodedPairs.from_pairs(corpus.train, src_vocab, tgt_vocab, tokenizer=tok),
                               args.batch_size, seed=args.seed, widths=widths)
    # Dev loss uses the dev pairs within --max-len, padded to one shape: one extra compilation, not one per bucket.
    dev_short = tr.filter_length(corpus.dev, args.max_len, tokenizer=tok)
    dev_batches = tr.BucketedBatches(tr.EncodedPairs.from_pairs(dev_short, src_vocab, tgt_vocab, tokenizer=tok),
                                     args.batch_size, seed=0, bucketing=False, widths=widths)
    loss = lambda p, b, k: seq2seq.loss_fn(model, p, b, k)  # noqa: E731
    eval_loss = jax.jit(lambda p, b: seq2seq.loss_fn(model, p, b, None))

    def evaluate(params) -> dict[str, float]:
        total, tokens = 0.0, 0.0
        for i in range(dev_batches.num_batches(0)):
            value, aux = eval_loss(params, dev_batches.batch(0, i))
            total += float(value) * float(aux["tokens"])
            tokens += float(aux["tokens"])
        return {"dev_loss": total / tokens, "dev_perplexity": float(np.exp(total / tokens))}

    config = training.TrainConfig(out_dir=str(out), seed=args.seed, epochs=args.epochs,
                                  batch_size=args.batch_size, learning_rate=args.lr, best_metric="dev_loss",
                                  restart=args.restart, progress=not args.no_progress, log_every=20)
    print(f"model: {model}\nbuckets (source, target widths): {train.shapes()}")
    try:
        result = training.fit(config, init_params=lambda k: seq2seq.init_params(model, k), loss_fn=loss,
                              train=train, evaluate=evaluate, run_config=meta)
    except ValueError as error:
        raise reword(error) from None
    if result.already_finished:
        print(f"{out}: already finished at step {result.step}; translating the dev set with its best checkpoint")

    translator = Translator.load(out)
    report, detok = bleu_report(translator, dev_sources, [p.target for p in corpus.dev], beam=args.beam)
    evaluation = evaluate(translator.params)
    results = {"data": corpus.name, "attention": args.attention, "epochs": args.epochs,
               "train_pairs": len(corpus.train), "dev_pairs": len(corpus.dev),
               "vocab": {"source": len(src_vocab), "target": len(tgt_vocab)},
               "dev_loss": round(evaluation["dev_loss"], 4), "dev": report}
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "dev.hyp").write_text("\n".join(detok) + "\n", encoding="utf-8")
    print(f"dev sacreBLEU {report['sacrebleu']} ({report['sacrebleu_signature']}), tokenised BLEU "
          f"{report['tokenized_bleu']}, beam {args.beam}, {len(corpus.dev)} pairs -> {out / 'metrics.json'}")
    return 0


# --- eval / predict --------------------------------------------------------------------------------------------

def _read_text_lines(path, flag: str) -> list[str]:
    from jaxseq.data import translation as tr

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        lines = tr.read_lines(path)
    except ValueError as error:
        raise ValueError(f"{flag} {error}") from None
    if not lines:
        raise ValueError(f"{flag} {path} is empty: expected one sentence per line")
    return lines


def run_eval(args) -> int:
    from jaxseq.data import translation as tr

    if args.hyp_out and pathlib.Path(args.hyp_out).is_dir():
        raise ValueError(f"--hyp-out {args.hyp_out} is a folder; expected a file to write the translations to")
    sources, references = _read_text_lines(args.src, "--src"), _read_text_lines(args.ref, "--ref")
    translator = Translator.load(args.run_dir)
    if len(sources) != len(references):
        raise ValueError(f"misaligned files: --src {args.src} has {len(sources)} lines, --ref {args.ref} has "
                         f"{len(references)}")
    escaped = translator.tokenizer == "whitespace"  # IWSLT-style runs read Moses-escaped files
    tokenised = [translator.prepare(s, escaped) for s in sources]
    refs = [tr.clean(tr.unescape_moses(r) if escaped else r) for r in references]
    empty = [i + 1 for i, s in enumerate(tokenised) if not s]
    if empty:
        raise ValueError(f"--src {args.src}: line {empty[0]} is empty ({len(empty)} empty lines in all)")
    report, detok = bleu_report(translator, tokenised, refs, beam=args.beam)
    if args.hyp_out:
        pathlib.Path(args.hyp_out).write_text("\n".join(detok) + "\n", encoding="utf-8")
    print(f"sacreBLEU {report['sacrebleu']:.2f}  signature: {report['sacrebleu_signature']}")
    print(f"tokenised BLEU {report['tokenized_bleu']:.2f}  (no re-tokenisation; for comparison with published "
          "IWSLT numbers only)")
    for row in report["bleu_by_source_length"]:
        print(f"  source length {row['bin']:>5}: {row['sentences']:4d} sentences, sacreBLEU {row['bleu']:.2f}")
    return 0


def run_predict(args) -> int:
    from jaxseq import plots
    from jaxseq.data import translation as tr

    translator = Translator.load(args.run_dir)
    source = translator.prepare(args.text, translator.tokenizer == "whitespace")
    if not source:
        raise ValueError("the text to translate is empty")
    unknown = [t for t in source if translator.src_vocab.encode([t]) == [tr.UNK_ID]]
    if unknown:
        print(f"note: not in the source vocabulary (read as <unk>): {' '.join(unknown)}", file=sys.stderr)
    target = translator.translate([source], beam=args.beam)[0]
    print(tr.detokenize(target))
    if args.plot:
        if translator.config.attention == "none":
            raise ValueError("--plot needs a model with attention; this run was trained with --attention none")
        weights = translator.attention(source, target)
        path = plots.attention_map(weights, source, target + [tr.EOS], args.plot,
                                   title=f"{translator.config.attention} attention")
        print(f"attention map -> {path}", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from jaxseq import plots

    rows, curves = [], {}
    for run_dir in args.runs:
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
        label = f"{results['attention']}, {results['epochs']} ep ({results['dev']['sacrebleu']:.1f})"
        curves[label] = results["dev"]["bleu_by_source_length"]
    bins = [r["bin"] for r in rows[0]["dev"]["bleu_by_source_length"]]
    print("| attention | epochs | dev sacreBLEU | tokenised BLEU | dev loss | "
          + " | ".join(f"BLEU len {b}" for b in bins) + " |")
    print("|---" * (5 + len(bins)) + "|")
    for r in rows:
        by_len = {x["bin"]: x["bleu"] for x in r["dev"]["bleu_by_source_length"]}
        print(f"| {r['attention']} | {r['epochs']} | {r['dev']['sacrebleu']:.2f} | {r['dev']['tokenized_bleu']:.2f} | "
              f"{r['dev_loss']:.3f} | " + " | ".join(f"{by_len.get(b, float('nan')):.1f}" for b in bins) + " |")
    print(f"signature: {rows[0]['dev']['sacrebleu_signature']}; dev sentences per length bin: "
          + ", ".join(f"{x['bin']}: {x['sentences']}" for x in rows[0]["dev"]["bleu_by_source_length"]))
    if args.plot:
        print(f"plot -> {plots.bleu_vs_length(curves, args.plot)}")
    return 0
