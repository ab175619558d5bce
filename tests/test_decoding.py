"""Greedy, sampling and beam search against brute-force oracles on a prefix-dependent toy model."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import decoding

VOCAB, END = 4, 3  # tokens 1, 2 are words, 3 ends, 0 is padding


def prefix_model(key, vocab=VOCAB, peaked=2.0):
    """A step function whose logits depend on the whole prefix: the state is a hash of the tokens so far."""

    @jax.jit
    def logits_of(code):
        return peaked * jax.random.normal(jax.random.fold_in(key, code), (vocab,))

    def step_fn(state, tokens):
        code = (state * 31 + tokens + 1) % 1000003  # stays inside int32
        return jax.vmap(logits_of)(code), code

    @jax.jit
    def oracle_logp(code):
        return jax.nn.log_softmax(logits_of(code).at[0].set(-jnp.inf))

    def logp_of(code0, start, sequence):  # oracle: score a whole sequence by stepping one token at a time
        total, code, prev = 0.0, code0, start
        for tok in sequence:
            code = (code * 31 + prev + 1) % 1000003
            total += float(oracle_logp(jnp.int32(code))[tok])
            prev = tok
        return total

    return step_fn, logp_of


def all_hypotheses(max_len):
    """Every sequence of words 1..END-1 ended by END within max_len, or cut at max_len."""
    out = []
    for n in range(1, max_len + 1):
        for body in itertools.product(range(1, END), repeat=n - 1):
            out.append(body + (END,))
    out += list(itertools.product(range(1, END), repeat=max_len))
    return out


def test_greedy_follows_argmax_of_the_carried_state(key):
    step_fn, _ = prefix_model(key)
    state, start = jnp.array([5, 6, 7], jnp.int32), jnp.array([1, 1, 2], jnp.int32)
    tokens, lengths = jax.jit(lambda s, t: decoding.greedy(step_fn, s, t, max_len=6, end_token=END))(state, start)
    for b in range(3):  # oracle: a Python loop, one step at a time
        code, prev, expect = state[b:b + 1], start[b:b + 1], []
        for _ in range(6):
            logits, code = step_fn(code, prev)
            prev = jnp.argmax(logits.at[:, 0].set(-jnp.inf), axis=-1).astype(jnp.int32)
            expect.append(int(prev[0]))
            if expect[-1] == END:
                break
        np.testing.assert_array_equal(tokens[b, :len(expect)], expect)
        assert np.all(np.asarray(tokens[b, len(expect):]) == 0)
        assert int(lengths[b]) == len(expect)


def test_padding_after_end_and_lengths(key):
    step_fn, _ = prefix_model(key, peaked=0.5)
    tokens, lengths = decoding.sample(step_fn, jnp.arange(64, dtype=jnp.int32), jnp.ones(64, jnp.int32), key,
                                      max_len=5, end_token=END)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert (tokens != 0).sum(axis=1).tolist() == lengths.tolist()
    for row, n in zip(tokens, lengths):
        assert row[:n].min() > 0
        assert n == 5 or row[n - 1] == END
    assert len(set(lengths.tolist())) > 1


def test_sampling_matches_softmax_with_temperature(key):
    logits = jnp.array([0.0, 1.0, 0.5, -1.0])

    def step_fn(state, tokens):
        return jnp.broadcast_to(logits, (tokens.shape[0], 4)), state

    n = 20000
    for temperature in (0.5, 2.0):
        tokens, _ = decoding.sample(step_fn, jnp.zeros(n), jnp.ones(n, jnp.int32), key, max_len=1,
                                    end_token=END, temperature=temperature)
        freq = np.bincount(np.asarray(tokens[:, 0]), minlength=4) / n
        expect = np.asarray(jax.nn.softmax(logits.at[0].set(-jnp.inf) / temperature))
        np.testing.assert_allclose(freq, expect, atol=0.015)


def test_low_temperature_sampling_is_greedy(key):
    step_fn, _ = prefix_model(key)
    state, start = jnp.arange(8, dtype=jnp.int32), jnp.ones(8, jnp.int32)
    g, gl = decoding.greedy(step_fn, state, start, max_len=6, end_token=END)
    s, sl = decoding.sample(step_fn, state, start, key, max_len=6, end_token=END, temperature=1e-4)
    np.testing.assert_array_equal(g, s)
    np.testing.assert_array_equal(gl, sl)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_wide_beam_is_exhaustive_search(key, alpha):
    """With a beam wider than the number of hypotheses nothing is pruned: beam = brute-force ranking."""
    step_fn, logp_of = prefix_model(key)
    max_len = 3
    hyps = all_hypotheses(max_len)
    state, start = jnp.array([11, 12], jnp.int32), jnp.array([1, 2], jnp.int32)
    tokens, scores, lengths = decoding.beam_search(step_fn, state, start, beam_size=len(hyps), max_len=max_len,
                                                   end_token=END, length_penalty=alpha)
    for b in range(2):
        oracle = sorted(((logp_of(int(state[b]), int(start[b]), h) / ((5 + len(h)) / 6) ** alpha, h)
                         for h in hyps), reverse=True)
        got = [tuple(int(x) for x in tokens[b, i, :int(lengths[b, i])]) for i in range(len(hyps))]
        assert got == [h for _, h in oracle]
        np.testing.assert_allclose(scores[b], [s for s, _ in oracle], rtol=1e-5, atol=1e-5)


def test_beam_of_one_is_greedy_and_beams_are_sorted(key):
    step_fn, _ = prefix_model(key)
    state, start = jnp.arange(5, dtype=jnp.int32), jnp.ones(5, jnp.int32)
    g, gl = decoding.greedy(step_fn, state, start, max_len=7, end_token=END)
    b, s, bl = decoding.beam_search(step_fn, state, start, beam_size=1, max_len=7, end_token=END)
    np.testing.assert_array_equal(b[:, 0], g)
    np.testing.assert_array_equal(bl[:, 0], gl)
    _, s, _ = decoding.beam_search(step_fn, state, start, beam_size=4, max_len=7, end_token=END)
    assert np.all(np.diff(np.asarray(s), axis=1) <= 0)


def test_beam_is_batched_and_finds_better_than_greedy(key):
    step_fn, logp_of = prefix_model(key, peaked=1.0)
    state, start = jnp.arange(16, dtype=jnp.int32), jnp.ones(16, jnp.int32)
    run = jax.jit(lambda s, t: decoding.beam_search(step_fn, s, t, beam_size=3, max_len=6, end_token=END,
                                                    length_penalty=0.0))
    tokens, scores, lengths = run(state, start)
    one = run(state[4:5], start[4:5])
    np.testing.assert_array_equal(one[0][0], tokens[4])
    g, gl = decoding.greedy(step_fn, state, start, max_len=6, end_token=END)
    for i in range(16):
        greedy_score = logp_of(i, 1, [int(x) for x in g[i, :int(gl[i])]])
        assert float(scores[i, 0]) >= greedy_score - 1e-5
        np.testing.assert_allclose(scores[i, 0], logp_of(i, 1, [int(x) for x in tokens[i, 0, :int(lengths[i, 0])]]),
                                   rtol=1e-5)


def test_bad_arguments_are_named():
    step_fn, _ = prefix_model(jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="start_tokens"):
        decoding.greedy(step_fn, jnp.zeros(2, jnp.int32), jnp.ones((2, 1), jnp.int32), max_len=3, end_token=END)
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(step_fn, jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32), jax.random.PRNGKey(0),
                        max_len=3, end_token=END, temperature=0.0)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(step_fn, jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32), beam_size=0, max_len=3,
                             end_token=END)
