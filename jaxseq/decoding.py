"""Autoregressive decoding over any step function: greedy, temperature sampling and beam search.

The model is seen only through one step::

    step_fn(state, tokens: int32[N]) -> (logits float[N, vocab], new_state)

where ``state`` is any pytree whose leaves have leading dimension ``N`` (an ``LSTMState``, an image vector,
an attention memory ...). Each decoder feeds the previous token and carries the state, so a step costs one
cell application: the prefix is never re-run (the chapter's greedy search re-runs the whole model on the
padded prefix for every word, ``O(T^2)``).

Conventions shared by the three decoders:

* ``start_tokens`` ``int32[B]`` is fed first and is not part of the output.
* Output tokens ``int32[B, max_len]`` (beam: ``[B, beam, max_len]``) hold the generated words; after
  ``end_token`` they are padding ``0``. Token 0 is padding and is never generated.
* ``lengths`` count the tokens up to and including ``end_token`` (``max_len`` if it never came).
* All are pure and jittable (``lax.while_loop``; they stop as soon as every sequence has ended), and batched:
  wrap them in ``jax.jit`` with ``step_fn`` closed over or static.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]

# Finite stand-in for -inf on beams that do not exist yet, so that sums stay finite and comparable.
_DEAD = -1e9


def _check(start_tokens, max_len: int, end_token: int) -> None:
    if jnp.ndim(start_tokens) != 1:
        raise ValueError(f"start_tokens must be int32[batch], got shape {jnp.shape(start_tokens)}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if end_token <= 0:
        raise ValueError(f"end_token must be a positive token id (0 is padding), got {end_token}")


def _no_padding(logits: jax.Array) -> jax.Array:
    """Forbid token 0 (padding) so that a zero in the output always means 'after the end'."""
    return logits.at[..., 0].set(-jnp.inf)


def _autoregress(step_fn: StepFn, state, start_tokens, choose, *, max_len: int, end_token: int):
    """Shared loop of greedy and sampling: ``choose(logits, t) -> int32[B]``."""
    _check(start_tokens, max_len, end_token)
    start_tokens = jnp.asarray(start_tokens, jnp.int32)
    batch = start_tokens.shape[0]

    def cond(carry):
        t, _, _, _, done, _ = carry
        return (t < max_len) & ~jnp.all(done)

    def body(carry):
        t, prev, state, tokens, done, lengths = carry
        logits, state = step_fn(state, prev)
        token = jnp.where(done, 0, choose(_no_padding(logits), t).astype(jnp.int32))
        tokens = tokens.at[:, t].set(token)
        lengths = jnp.where(done, lengths, t + 1)
        return t + 1, token, state, tokens, done | (token == end_token), lengths

    init = (jnp.int32(0), start_tokens, state, jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    _, _, _, tokens, _, lengths = lax.while_loop(cond, body, init)
    return tokens, lengths


def greedy(step_fn: StepFn, state, start_tokens, *, max_len: int, end_token: int):
    """Pick the most likely token at every step.

    Args:
      step_fn: ``(state, int32[B]) -> (logits[B, V], state)``.
      state: initial decoder state, leaves ``[B, ...]``.
      start_tokens: ``int32[B]``, fed first (e.g. ``startseq``).
      max_len: most tokens generated per sequence (the chapter: 34).
      end_token: id that ends a sequence (``endseq``); it is kept in the output.

    Returns:
      ``(tokens int32[B, max_len], lengths int32[B])``.
    """
    return _autoregress(step_fn, state, start_tokens, lambda logits, t: jnp.argmax(logits, axis=-1),
                        max_len=max_len, end_token=end_token)


def sample(step_fn: StepFn, state, start_tokens, key, *, max_len: int, end_token: int,
           temperature: float = 1.0):
    """Draw each token from ``softmax(logits / temperature)``; step ``t`` uses ``fold_in(key, t)``.

    ``temperature`` < 1 sharpens towards greedy, > 1 flattens. Returns ``(tokens, lengths)`` as ``greedy``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy for the limit 0), got {temperature}")

    def choose(logits, t):
        return jax.random.categorical(jax.random.fold_in(key, t), logits / temperature, axis=-1)

    return _autoregress(step_fn, state, start_tokens, choose, max_len=max_len, end_token=end_token)


def gnmt_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha``; scores are ``log p / penalty``.

    References:
      Wu et al. 2016, "Google's Neural Machine Translation System", eq. 14 (arXiv 1609.08144).
    """
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn: StepFn, state, start_tokens, *, beam_size: int, max_len: int, end_token: int,
                length_penalty: float = 0.6):
    """Beam search with a GNMT length penalty, batched over ``B`` inputs with ``beam_size`` beams each.

    The state is repeated to ``B * beam_size`` rows and gathered along the surviving beams each step. Ended
    hypotheses stay in the beam with their score fixed and compete with the live ones by length-normalised
    score ``log p / ((5 + length) / 6) ** length_penalty``; the search stops when all beams have ended or
    after ``max_len`` tokens. ``beam_size=1`` is greedy search.

    Returns:
      ``(tokens int32[B, beam, max_len], scores float32[B, beam], lengths int32[B, beam])``, best first;
      ``scores`` are the normalised log-probabilities (raw sums when ``length_penalty=0``).
    """
    _check(start_tokens, max_len, end_token)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    alpha = length_penalty
    start_tokens = jnp.asarray(start_tokens, jnp.int32)
    batch, k = start_tokens.shape[0], beam_size
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), state)

    def gather(x, parent):  # x [B, K, ...] rows picked by parent [B, K]
        index = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    def cond(carry):
        t, *_, finished, _ = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, prev, state, tokens, logp, finished, lengths = carry
        logits, new_state = step_fn(state, prev.reshape(-1))
        vocab = logits.shape[-1]
        step_logp = jax.nn.log_softmax(_no_padding(logits.astype(jnp.float32)), axis=-1).reshape(batch, k, vocab)
        # An ended beam has one continuation, padding, at no cost: it carries itself into the next beam.
        ended_row = jnp.full((vocab,), -jnp.inf).at[0].set(0.0)
        step_logp = jnp.where(finished[..., None], ended_row, step_logp)
        candidates = logp[..., None] + step_logp                                    # [B, K, V]
        cand_len = jnp.where(finished, lengths, t + 1)[..., None]
        normalised = candidates / gnmt_penalty(jnp.broadcast_to(cand_len, candidates.shape), alpha)
        _, flat = lax.top_k(normalised.reshape(batch, k * vocab), k)                # [B, K]
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        logp = jnp.take_along_axis(candidates.reshape(batch, k * vocab), flat, axis=1)
        parent_finished = gather(finished, parent)
        lengths = jnp.where(parent_finished, gather(lengths, parent), t + 1)
        finished = parent_finished | (token == end_token)
        tokens = gather(tokens, parent).at[:, :, t].set(token)
        new_state = jax.tree_util.tree_map(
            lambda x: gather(x.reshape((batch, k) + x.shape[1:]), parent).reshape(x.shape), new_state)
        return t + 1, token, new_state, tokens, logp, finished, lengths

    logp = jnp.full((batch, k), _DEAD, jnp.float32).at[:, 0].set(0.0)
    init = (jnp.int32(0), jnp.repeat(start_tokens[:, None], k, axis=1), state,
            jnp.zeros((batch, k, max_len), jnp.int32), logp, jnp.zeros((batch, k), bool),
            jnp.zeros((batch, k), jnp.int32))
    # A beam that never ended has length = the last step taken (set in body).
    _, _, _, tokens, logp, _, lengths = lax.while_loop(cond, body, init)
    scores = logp / gnmt_penalty(lengths, alpha)
    order = jnp.argsort(-scores, axis=1, stable=True)
    return (jnp.take_along_axis(tokens, order[..., None], axis=1), jnp.take_along_axis(scores, order, axis=1),
            jnp.take_along_axis(lengths, order, axis=1))
