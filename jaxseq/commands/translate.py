"""``jaxseq translate {train,eval,predict,compare}``: English->Vietnamese seq2seq, with or without attention.

The workflow is ``jaxseq.tasks.translate``; this module maps flags onto it.

Examples::

    jaxseq translate train --attention additive --epochs 16 --out runs/tatoeba-additive   # shipped Tatoeba pairs
    jaxseq translate predict --run runs/tatoeba-additive "I love teaching" --beam 5 --plot attn.png
    jaxseq translate eval --run runs/tatoeba-additive --split test     # or --src my.en --ref my.vi
    jaxseq translate compare runs/tatoeba-* --plot bleu_vs_length.png

``train`` reads the shipped Tatoeba pairs (``--data tatoeba``, no download) or an IWSLT-style folder
(``--data DIR`` with ``train.en/vi`` and ``tst2012.en/vi``), trains with ``jaxseq.training.fit``, then translates
the dev set (beam search) and writes ``metrics.json`` (BLEU overall and by source length; results only, no
timings) and ``dev.hyp`` into the run folder. ``eval`` scores a run on its own held-out split (``--split dev``
or ``test``) or on any file pair (``--src`` and ``--ref``, one sentence per line).
"""
from __future__ import annotations

import pathlib
import sys

from jaxseq.commands import positive_int, reword
from jaxseq.tasks import translate


def register(subparsers) -> None:
    p = subparsers.add_parser("translate", help="seq2seq translation (English->Vietnamese) with attention",
                              description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    defaults = translate.TranslateConfig()

    t = sub.add_parser("train", help="train a model and report dev BLEU")
    t.add_argument("--data", default="tatoeba", help="'tatoeba' (shipped) or a folder with train.{en,vi} and "
                   "tst2012.{en,vi} (IWSLT'15, Stanford preprocessing)")
    t.add_argument("--attention", default="additive",
                   choices=["none", "cosine", "additive", "location", "general", "dot", "scaled_dot"],
                   help="attention score function; none: the plain encoder-decoder")
    t.add_argument("--epochs", type=int, default=translate.TRAINING_DEFAULTS["epochs"],
                   help="passes over the training pairs")
    t.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    t.add_argument("--cell", default=defaults.cell, choices=["gru", "lstm"], help="recurrent cell of both halves")
    t.add_argument("--layers", type=int, default=defaults.layers, help="encoder layers")
    t.add_argument("--dec-layers", type=int, default=defaults.dec_layers, help="decoder layers")
    t.add_argument("--unidirectional", action="store_true", help="forward-only encoder")
    t.add_argument("--embed", type=int, default=defaults.embed, help="word embedding size (source and target)")
    t.add_argument("--hidden", type=int, default=defaults.hidden, help="encoder width per direction")
    t.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate")
    t.add_argument("--max-len", type=int, default=defaults.max_len,
                   help="drop training pairs longer than this (tokens)")
    t.add_argument("--min-count", type=positive_int, default=defaults.min_count,
                   help="vocabulary: minimum training count")
    t.add_argument("--max-vocab", type=int, default=defaults.max_vocab,
                   help="vocabulary: maximum size (specials included)")
    t.add_argument("--batch-size", type=int, default=translate.TRAINING_DEFAULTS["batch_size"],
                   help="sentence pairs per step")
    t.add_argument("--lr", type=float, default=translate.TRAINING_DEFAULTS["learning_rate"],
                   help="Adam learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and dropout")
    t.add_argument("--bucket-widths", default=None,
                   help="comma-separated padded widths for length buckets (default: the library grid)")
    t.add_argument("--beam", type=int, default=defaults.beam, help="beam width for the final dev translation")
    t.add_argument("--restart", action="store_true", help="discard an existing run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="BLEU of a trained run on its dev or test split, or on a file pair")
    e.add_argument("--run", dest="run_dir", required=True, help="a translate train run folder")
    e.add_argument("--split", choices=["dev", "test"], default=None,
                   help="score the run's own held-out split (Tatoeba: 631 dev / 627 test pairs) instead of files")
    e.add_argument("--src", help="English sentences, one per line (with --ref, instead of --split)")
    e.add_argument("--ref", help="their Vietnamese reference translations, one per line")
    e.add_argument("--hyp-out", default=None, help="write the detokenised translations here, one per line")
    e.add_argument("--beam", type=positive_int, default=5, help="beam width (1 = greedy)")
    e.set_defaults(run=run_eval)

    r = sub.add_parser("predict", help="translate one sentence")
    r.add_argument("--run", dest="run_dir", required=True, help="a translate train run folder")
    r.add_argument("text", help="the English sentence")
    r.add_argument("--beam", type=positive_int, default=5, help="beam width (1 = greedy)")
    r.add_argument("--plot", default=None, help="write the attention map PNG here")
    r.set_defaults(run=run_predict)

    c = sub.add_parser("compare", help="table of dev BLEU over several runs; BLEU-vs-length plot")
    c.add_argument("runs", nargs="+", help="run folders (each with the metrics.json that train writes)")
    c.add_argument("--plot", default=None, help="write the BLEU against source length PNG here")
    c.set_defaults(run=run_compare)


def run_train(args) -> int:
    from jaxseq import training

    for flag in ("epochs", "hidden", "embed", "max_len", "batch_size", "layers", "dec_layers", "beam"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    widths = None
    if args.bucket_widths:
        try:
            widths = tuple(sorted(int(w) for w in args.bucket_widths.split(",")))
        except ValueError:
            raise ValueError(f"--bucket-widths must be comma-separated integers, got {args.bucket_widths!r}")
        if widths[-1] < args.max_len + 1:
            raise ValueError(f"--bucket-widths: the largest width {widths[-1]} must hold --max-len + 1 "
                             f"(</s>) = {args.max_len + 1}")
    config = translate.TranslateConfig(
        data=args.data, attention=args.attention, cell=args.cell, layers=args.layers, dec_layers=args.dec_layers,
        bidirectional=not args.unidirectional, embed=args.embed, hidden=args.hidden, dropout=args.dropout,
        max_len=args.max_len, min_count=args.min_count, max_vocab=args.max_vocab, bucket_widths=widths,
        beam=args.beam)
    train_config = training.TrainConfig(out_dir=args.out, seed=args.seed, epochs=args.epochs,
                                        batch_size=args.batch_size, learning_rate=args.lr, restart=args.restart,
                                        progress=not args.no_progress, log_every=20)
    try:
        result = translate.train_and_evaluate(config, train_config)
    except ValueError as error:
        raise reword(error) from None
    report = result.metrics["dev"]
    print(f"dev sacreBLEU {report['sacrebleu']} ({report['sacrebleu_signature']}), tokenised BLEU "
          f"{report['tokenized_bleu']}, beam {args.beam}, {result.metrics['dev_pairs']} pairs -> "
          f"{result.out_dir / 'metrics.json'}")
    return 0


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
    if args.hyp_out and pathlib.Path(args.hyp_out).is_dir():
        raise ValueError(f"--hyp-out {args.hyp_out} is a folder; expected a file to write the translations to")
    if args.split is not None:
        if args.src or args.ref:
            raise ValueError("give either --split or --src with --ref, not both")
        report, detok = translate.evaluate_split(args.run_dir, args.split, beam=args.beam)
    else:
        if not (args.src and args.ref):
            raise ValueError("expected --split dev|test, or both --src and --ref")
        sources, references = _read_text_lines(args.src, "--src"), _read_text_lines(args.ref, "--ref")
        if len(sources) != len(references):
            raise ValueError(f"misaligned files: --src {args.src} has {len(sources)} lines, --ref {args.ref} has "
                             f"{len(references)}")
        report, detok = translate.evaluate(translate.load_run(args.run_dir), sources, references, beam=args.beam)
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

    run = translate.load_run(args.run_dir)
    if args.plot and run.config.attention == "none":
        raise ValueError("--plot needs a model with attention; this run was trained with --attention none")
    prediction = translate.predict(run, args.text, beam=args.beam)
    if prediction.unknown:
        print(f"note: not in the source vocabulary (read as <unk>): {' '.join(prediction.unknown)}",
              file=sys.stderr)
    print(prediction.text)
    if args.plot:
        weights = run.attention(prediction.source, prediction.target)
        path = plots.attention_map(weights, prediction.source, prediction.target + [tr.EOS], args.plot,
                                   title=f"{run.config.attention} attention")
        print(f"attention map -> {path}", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from jaxseq import plots

    rows = translate.compare(args.runs)
    curves = {f"{r['attention']}, {r['epochs']} ep ({r['dev']['sacrebleu']:.1f})": r["dev"]["bleu_by_source_length"]
              for r in rows}
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
