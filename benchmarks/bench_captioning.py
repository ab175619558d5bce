"""Captioning throughput: jaxseq's pipeline against the chapter's (seed's), same merge model, same device.

Two seed baselines, both the chapter's algorithm: ``seed-keras`` is the chapter's code itself on Keras 3
(JAX backend): the same layers, ``train_on_batch`` on the expanded samples, ``model.predict`` per word;
``seed-jax`` is the same algorithm with jaxseq's model, jitted (no Keras overhead: what the algorithm costs).

1. Training, captions per second. Seed: the chapter's ``data_generator`` (every caption expanded into
   (prefix, next word) samples, each prefix left-padded to 34, one-hot targets over the 1,652 words), then
   one Adam step on those samples with the model run once per prefix (Keras' ``mask_zero`` LSTM over 34
   steps). jaxseq: one teacher-forced pass over whole captions with the masked loss (``caption_loss``),
   batches of similar length (``CaptionBatches``, padded to a multiple of 8). The seed's host-side expansion
   is timed with its step (it runs every epoch in the chapter). Same captions per step (6 photos x 5
   captions, the chapter's batch), plus a larger batch for jaxseq alone.
2. Greedy decoding, captions per second. Seed: the chapter's ``greedySearch`` (per image, per word: pad the
   prefix to 34, run the model on it, argmax on the host). jaxseq: ``decoding.greedy`` carrying the LSTM state
   (one cell step per word), unbatched (1 image) and batched; beam search of width 3 and 5, batched.

The chapter's configuration: 2,048-d image features, vocabulary 1,652, embedding 200, LSTM 256 (1,813,268
parameters). Caption lengths are the real Flickr8k training captions' when ``JAXSEQ_SHARED_DATA`` is set,
else drawn from 8..20 words. Random parameters do not emit ``endseq``, so every decoder produces the full 34
words: equal work per caption for all. Timings: warm-up (all shapes compiled) first, then ``--repeats``
rounds that alternate the contenders; median per contender and the ratio of medians.

Run: ``.venv/bin/python benchmarks/bench_captioning.py [--repeats 5]``.
Expect: training >= 10x, batched greedy >= 100x the seed's captions per second.
"""
from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
import platform
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-batches", type=int, default=4, help="distinct 6-photo batches cycled in training")
    p.add_argument("--big-batch", type=int, default=256, help="captions per step for jaxseq's large batch")
    p.add_argument("--seed-images", type=int, default=2, help="images captioned per sample by the seed loops")
    p.add_argument("--no-keras", action="store_true", help="skip the seed-keras baseline")
    p.add_argument("--decode-batch", type=int, default=256, help="images per batched decode")
    return p.parse_args(argv)


@functools.lru_cache(maxsize=1)
def _real_lengths():
    root = os.environ.get("JAXSEQ_SHARED_DATA")
    if root and os.path.isdir(os.path.join(root, "flickr8k")):
        from jaxseq.data import flickr8k
        from jaxseq.data.text import clean_caption

        caps = flickr8k.load_captions(os.path.join(root, "flickr8k", flickr8k.TOKEN_FILE))
        train = sorted(flickr8k.load_split(os.path.join(root, "flickr8k", flickr8k.SPLIT_FILES["train"])))
        return tuple(len(clean_caption(c).split()) + 2 for i in train for c in caps[i])
    return None


def caption_lengths(rng, n):
    """Token counts (startseq .. endseq) of n training captions."""
    lengths = _real_lengths()
    if lengths:
        return rng.choice(lengths, size=n), "Flickr8k training captions"
    return rng.integers(10, 23, size=n), "uniform 8..20 words"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    import jax

    jax.block_until_ready(out)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxseq.data.text import CaptionBatches
    from jaxseq.models import captioning as cap

    V, D, MAX = 1652, 2048, 34
    model = cap.CaptionModel(cap.CaptionConfig(vocab_size=V))
    params = cap.init_params(model, jax.random.PRNGKey(0), (D,))
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}; jax {jax.__version__}; "
          f"params {cap.count_params(params)['total']:,}")
    rng = np.random.default_rng(0)
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def make_captions(n):
        lengths, source = caption_lengths(rng, n)
        tokens = np.zeros((n, MAX + 1), np.int32)
        for row, k in zip(tokens, np.minimum(lengths, MAX + 1)):
            row[:k] = np.r_[1, rng.integers(3, V, size=k - 2), 2]
        return tokens, source

    # --- training ---------------------------------------------------------------------------------------------
    per_step = 30  # 6 photos x 5 captions, the chapter's batch
    n_images = 16 * per_step // 5
    pool_tokens, source = make_captions(16 * per_step)
    features = rng.normal(size=(n_images, D)).astype(np.float32)
    source_batches = CaptionBatches(features, np.arange(16 * per_step) // 5, pool_tokens, per_step, seed=0)
    batches = [tuple(source_batches.batch(0, i).values()) for i in range(args.train_batches)]
    big_batches = CaptionBatches(features, np.arange(16 * per_step) // 5, pool_tokens, args.big_batch, seed=0)
    big = tuple(big_batches.batch(0, 0).values())
    print(f"caption lengths: {source}; {per_step} captions/step; prefix samples per step "
          f"{[int((t[:, 1:] != 0).sum()) for _, t in batches]}; padded widths {[t.shape[1] for _, t in batches]}")

    @jax.jit
    def ours_step(params, opt_state, features, tokens, key):
        (loss, _), grads = jax.value_and_grad(
            lambda p: cap.caption_loss(model, p, {"features": features, "tokens": tokens}, key), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def seed_step(params, opt_state, features, prefixes, one_hot):
        # Both steps run without dropout: it would cost the same small amount in each.
        loss, grads = jax.value_and_grad(lambda p: cap.seed_loss(model, p, features, prefixes, one_hot))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run_seed(batch):
        features, tokens = batch
        xs, prefixes, one_hot = cap.seed_prefix_batch(features, tokens, V, max_len=MAX)
        return seed_step(params, opt_state, xs, prefixes, one_hot)

    def run_ours(batch):
        features, tokens = batch
        return ours_step(params, opt_state, features, tokens, None)

    keras_model = None if args.no_keras else seed_keras_model(V, D, MAX)
    # The training benchmark updates the Keras model; decoding restores its random initial weights, since a
    # trained model learns to emit endseq early and would decode fewer words than the others (unequal work).
    keras_initial = None if keras_model is None else keras_model.get_weights()

    def run_keras(batch):
        features, tokens = batch
        xs, prefixes, one_hot = cap.seed_prefix_batch(features, tokens, V, max_len=MAX)
        return jnp.asarray(keras_model.train_on_batch([xs, prefixes], one_hot))

    contenders = {"seed-keras": run_keras, "seed-jax": run_seed, "jaxseq": run_ours}
    if keras_model is None:
        del contenders["seed-keras"]
    for fn in contenders.values():  # compile every shape first
        for b in batches:
            jax.block_until_ready(fn(b))
    jax.block_until_ready(run_ours(big))
    samples = {k: [] for k in [*contenders, f"jaxseq-{args.big_batch}"]}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            samples[name].append(per_step * len(batches) / sum(timed(fn, b) for b in batches))
        samples[f"jaxseq-{args.big_batch}"].append(args.big_batch / timed(run_ours, big))
    train = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\ntraining (captions/s, median of {args.repeats}; ratios vs seed-keras and seed-jax)")
    report(train)

    # --- greedy decoding ---------------------------------------------------------------------------------------
    prefix_logits = jax.jit(lambda f, p: model.apply({"params": params}, f, p,
                                                     method=cap.CaptionModel.seed_prefix_logits))
    images = rng.normal(size=(max(args.decode_batch, args.seed_images), D)).astype(np.float32)

    seed_words = {"seed-keras": [], "seed-jax": []}  # words per caption each seed loop produced

    def rerun_prefix_loop(features, next_word, words):
        """The chapter's greedySearch: re-run the model on the whole left-padded prefix for every word."""
        for f in features:
            seq = [1]
            for _ in range(MAX):
                padded = np.zeros((1, MAX), np.int32)
                padded[0, -len(seq):] = seq[-MAX:]
                word = next_word(f[None], padded)
                seq.append(word)
                if word == 2:
                    break
            words.append(len(seq) - 1)
        return jnp.zeros(())

    def seed_greedy(features):
        return rerun_prefix_loop(features, lambda f, p: int(np.argmax(np.asarray(prefix_logits(f, p))[0])),
                                 seed_words["seed-jax"])

    def ours(features, method="greedy", beam=1):
        return cap.generate(model, params, features, start=1, end=2, max_len=MAX, method=method, beam_size=beam)

    def keras_greedy(features):
        return rerun_prefix_loop(features, lambda f, p: int(np.argmax(keras_model.predict([f, p], verbose=0))),
                                 seed_words["seed-keras"])

    contenders = {
        "seed-keras": (keras_greedy, images[:args.seed_images]),
        "seed-jax": (seed_greedy, images[:args.seed_images]),
        "greedy-1": (ours, images[:1]),
        f"greedy-{args.decode_batch}": (ours, images[:args.decode_batch]),
        f"beam3-{args.decode_batch}": (lambda f: ours(f, "beam", 3), images[:args.decode_batch]),
        f"beam5-{args.decode_batch}": (lambda f: ours(f, "beam", 5), images[:args.decode_batch]),
    }
    if keras_model is None:
        del contenders["seed-keras"]
    else:
        keras_model.set_weights(keras_initial)
    for fn, x in contenders.values():
        timed(fn, x)
    samples = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, (fn, x) in contenders.items():
            samples[name].append(len(x) / timed(fn, x))
    decode = {k: statistics.median(v) for k, v in samples.items()}
    tokens, _ = ours(images[:4])
    seed_means = ", ".join(f"{k} {np.mean(v):.1f}" for k, v in seed_words.items() if v)
    print(f"\ngreedy/beam decoding (captions/s, median of {args.repeats}; words per caption: jaxseq e.g. "
          f"{np.asarray((np.asarray(tokens) != 0).sum(1)).tolist()}, mean {seed_means}; ratios vs seed-keras "
          "and seed-jax)")
    report(decode)
    return train, decode


def report(rates: dict) -> None:
    for name, value in rates.items():
        ratios = "".join(f"   {value / rates[base]:8.1f}x" for base in ("seed-keras", "seed-jax") if base in rates)
        print(f"  {name:<14} {value:10.1f}{ratios}")


def seed_keras_model(V, D, MAX):
    """The chapter's merge model, layer for layer, in Keras 3 (compiled as in the chapter)."""
    import keras
    from keras import layers

    inputs1 = keras.Input(shape=(D,))
    fe2 = layers.Dense(256, activation="relu")(layers.Dropout(0.5)(inputs1))
    inputs2 = keras.Input(shape=(MAX,))
    se1 = layers.Embedding(V, 200, mask_zero=True)(inputs2)
    se3 = layers.LSTM(256)(layers.Dropout(0.5)(se1))
    decoder2 = layers.Dense(256, activation="relu")(layers.add([fe2, se3]))
    outputs = layers.Dense(V, activation="softmax")(decoder2)
    model = keras.Model(inputs=[inputs1, inputs2], outputs=outputs)
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(1e-4))
    assert model.count_params() == 1_813_268, model.count_params()
    return model


if __name__ == "__main__":
    main()
