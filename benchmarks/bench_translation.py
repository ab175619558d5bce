"""Translation speed: training tokens/s with length bucketing vs padding every batch to the maximum length, and
beam-search (width 5) latency per sentence.

Run (about 10 CPU-minutes, mostly compilation)::

    .venv/bin/python benchmarks/bench_translation.py [--run runs/tatoeba-additive] [--out benchmarks/translation.json]

Both training variants see the same shipped Tatoeba pairs (up to --max-len tokens), the same model (bidirectional
LSTM encoder, additive attention) and the same jitted Adam step. Every batch shape is compiled before timing;
then rounds alternate between the two variants (interleaved, so machine load hits both alike) and the median
round is reported. Tokens/s counts real target tokens (padding excluded). Expect bucketing to be well over 2x
faster here: Tatoeba sentences average ~8 tokens but the longest are ~40, and padded steps cost full price.

Beam latency: one sentence at a time (batch 1) from the Tatoeba dev split, after warm-up, median over sentences;
also the per-sentence cost when 64 sentences are decoded as one batch. With --run the trained model is used
(it stops when every beam has emitted </s>); without it a random model of the same shape decodes to max length.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import decoding
from jaxseq.data import translation as tr
from jaxseq.models import seq2seq


def _train_variants(args):
    corpus = tr.load_tatoeba(max_len=args.max_len)
    src_vocab = tr.build_vocab([tr.tokenize(p.source) for p in corpus.train], min_count=2)
    tgt_vocab = tr.build_vocab([tr.tokenize(p.target) for p in corpus.train], min_count=2)
    data = tr.EncodedPairs.from_pairs(corpus.train, src_vocab, tgt_vocab)
    widths = tuple(int(w) for w in args.widths.split(","))
    variants = {"bucketed": tr.BucketedBatches(data, args.batch_size, seed=0, widths=widths),
                "padded_to_max": tr.BucketedBatches(data, args.batch_size, seed=0, bucketing=False, widths=widths)}
    config = seq2seq.Seq2SeqConfig(len(src_vocab), len(tgt_vocab), embed=64, hidden=64, attention="additive")
    params = seq2seq.init_params(config, jax.random.PRNGKey(0))
    tx = optax.adam(1e-3)

    @jax.jit
    def train_step(params, opt_state, batch, key):
        grads = jax.grad(lambda p: seq2seq.loss_fn(config, p, batch, key)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    print(f"train pairs {len(data)} (<= {args.max_len} tokens), batch {args.batch_size}, widths {widths}")
    for name, source in variants.items():
        print(f"  {name}: {source.num_batches(0)} batches/epoch, shapes {source.shapes()}")
        batches = {}
        for i in range(source.num_batches(0)):  # one example batch per shape, for compiling
            b = source.batch(0, i)
            batches.setdefault((b["src"].shape[1], b["tgt_out"].shape[1]), b)
        t0 = time.perf_counter()
        for b in batches.values():
            jax.block_until_ready(train_step(params, opt_state, b, jax.random.PRNGKey(0)))
        print(f"  {name}: compiled {len(batches)} shapes in {time.perf_counter() - t0:.1f} s")

    # Each round: the same number of batches from each variant, drawn in its own epoch order.
    results = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, source in variants.items():
            n = source.num_batches(0)
            picks = [(r * args.batches + j) % n for j in range(args.batches)]
            batches = [source.batch(0, i) for i in picks]
            tokens = sum(int(b["tgt_len"].sum()) for b in batches)
            t0 = time.perf_counter()
            p, s = params, opt_state
            for j, b in enumerate(batches):
                p, s = train_step(p, s, b, jax.random.PRNGKey(j))
            jax.block_until_ready(p)
            results[name].append(tokens / (time.perf_counter() - t0))
    out = {name: {"tokens_per_s_median": statistics.median(v), "rounds": [round(x, 1) for x in v]}
           for name, v in results.items()}
    out["speedup"] = out["bucketed"]["tokens_per_s_median"] / out["padded_to_max"]["tokens_per_s_median"]
    padding = {name: 1 - source.real_tokens() / sum(source.batch(0, i)["tgt_out"].size
                                                    for i in range(source.num_batches(0)))
               for name, source in variants.items()}
    out["padding_fraction_target"] = {k: round(v, 3) for k, v in padding.items()}
    return out


def _beam_latency(args):
    if args.run:
        from jaxseq.tasks import translate

        translator = translate.load_run(args.run)
        config, params, src_vocab = translator.config, translator.params, translator.src_vocab
        label = f"trained run {args.run}"
    else:
        corpus = tr.load_tatoeba(max_len=args.max_len)
        src_vocab = tr.build_vocab([tr.tokenize(p.source) for p in corpus.train], min_count=2)
        config = seq2seq.Seq2SeqConfig(len(src_vocab), 1600, embed=64, hidden=64, attention="additive")
        params = seq2seq.init_params(config, jax.random.PRNGKey(0))
        label = "random model (decodes to max length)"
    corpus = tr.load_tatoeba(max_len=args.max_len)
    sentences = [src_vocab.encode(tr.tokenize(p.source)) for p in corpus.dev if len(tr.tokenize(p.source)) <= 12]
    width, max_len = 12, 34

    def make(batch_size):
        @jax.jit
        def run(params, src, src_len):
            state = seq2seq.encode(config, params, src, src_len)
            start = jnp.full((batch_size,), tr.BOS_ID, jnp.int32)
            return decoding.beam_search(seq2seq.make_step_fn(config, params), state, start, beam_size=5,
                                        max_len=max_len, end_token=tr.EOS_ID)[0]
        return run

    single, batched = make(1), make(64)
    as_batch = lambda rows, n: tr.make_batch(rows, [[tr.EOS_ID]] * len(rows), batch_size=n,  # noqa: E731
                                             src_width=width, tgt_width=1)
    b = as_batch(sentences[:1], 1)
    jax.block_until_ready(single(params, b["src"], b["src_len"]))
    times = []
    for s in sentences[:args.sentences]:
        b = as_batch([s], 1)
        t0 = time.perf_counter()
        jax.block_until_ready(single(params, b["src"], b["src_len"]))
        times.append(time.perf_counter() - t0)
    b = as_batch(sentences[:64], 64)
    jax.block_until_ready(batched(params, b["src"], b["src_len"]))
    batch_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(batched(params, b["src"], b["src_len"]))
        batch_times.append(time.perf_counter() - t0)
    return {"model": label, "beam": 5, "max_len": max_len, "sentences": len(times),
            "latency_ms_median_batch1": 1000 * statistics.median(times),
            "latency_ms_p90_batch1": 1000 * float(np.percentile(times, 90)),
            "ms_per_sentence_batch64": 1000 * statistics.median(batch_times) / 64}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=40, help="longest training pair kept (tokens)")
    parser.add_argument("--widths", default="11,21,41", help="bucket widths (padded_to_max uses the largest)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="batches per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=30, help="sentences timed for beam latency")
    parser.add_argument("--run", default=None, help="a 'jaxseq translate train' run folder for beam latency")
    parser.add_argument("--parts", default="train,beam", help="which measurements: train, beam or both")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    info = {"device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "note": "2-core CPU shared with other jobs running at the same time"}
    print(info)
    parts = set(args.parts.split(","))
    if not parts <= {"train", "beam"}:
        parser.error(f"--parts must name train and/or beam, got {args.parts!r}")
    results = {"info": info}
    if "train" in parts:
        results["training"] = _train_variants(args)
    if "beam" in parts:
        results["beam_search"] = _beam_latency(args)
    print(json.dumps(results, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
