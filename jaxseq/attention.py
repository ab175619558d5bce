"""The chapter's six attention score functions and ``attend``, as pure functions over explicit params.

Notation (chapter 19): the query ``s`` is the decoder state ``[batch, query]``; the keys ``h_i`` are the
encoder states ``[batch, source, key]``. A score function returns one score per source position
``[batch, source]``; ``attend`` turns the scores into weights with a softmax over the valid (unpadded)
positions and returns the weighted sum of the values.

=============  ====================================  ========================================
name           score a(s, h_i)                        params
=============  ====================================  ========================================
cosine         cos(s, h_i) (content-based)            ``beta`` (sharpening, see below)
additive       vᵀ tanh(W [s; h_i])                     ``W_q [query, A]``, ``W_k [key, A]``, ``v [A]``
location       softmax(W s) over positions            ``W [query, max_positions]``
general        sᵀ W h_i                                ``W [query, key]``
dot            sᵀ h_i                                  none (query and key sizes must match)
scaled_dot     sᵀ h_i / √n, n = key size               none (query and key sizes must match)
=============  ====================================  ========================================

Additive splits ``W`` into its query and key blocks (``W [s; h] = W_q s + W_k h``), so the key half is
computed once per sentence rather than once per decoder step.

Cosine scores lie in [-1, 1], so a softmax over them is nearly uniform; following the content-based
addressing of Graves et al. (2014, Neural Turing Machines) the score is multiplied by a learned key strength
``beta = softplus(beta_raw)`` (starting at 10). Location-based scores depend only on the query and the
position index, not on the keys: ``W`` has one column per source position up to ``max_positions``.

References:
  Bahdanau, Cho & Bengio 2015 (additive); Luong, Pham & Manning 2015 (general, dot, location);
  Vaswani et al. 2017 (scaled dot); Graves, Wayne & Danihelka 2014 (content-based / cosine).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Params = dict

SCORES = ("cosine", "additive", "location", "general", "dot", "scaled_dot")

_glorot = jax.nn.initializers.glorot_uniform()


def _check_param(score_name: str, params: Params, key: str, expected: tuple, why: str) -> None:
    """Raise a ``ValueError`` naming ``params[key]`` unless it has shape ``expected``; a str entry is a free size."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{score_name} attention params must be a dict (init_score), got {type(params).__name__}")
    if key not in params:
        raise ValueError(f'{score_name} attention params are missing "{key}" (init_score("{score_name}", ...)); got '
                         f"keys {sorted(params)}")
    shape = tuple(jnp.shape(params[key]))
    if len(shape) != len(expected) or any(isinstance(e, int) and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join(map(str, expected)) + "]"
        raise ValueError(f'{score_name} attention\'s params["{key}"] has shape {shape}; expected {want} ({why})')


def cosine_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Content-based score ``beta * cos(s, h_i)``; ``query [batch, n]``, ``keys [batch, source, n]``."""
    _check_same_size("cosine", query, keys)
    _check_param("cosine", params, "beta_raw", (), "a scalar key strength")
    eps = jnp.asarray(1e-8, query.dtype)
    q = query / jnp.maximum(jnp.linalg.norm(query, axis=-1, keepdims=True), eps)
    k = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), eps)
    beta = jax.nn.softplus(params["beta_raw"])
    return beta * jnp.einsum("bn,bsn->bs", q, k)


def additive_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Additive (Bahdanau) score ``vᵀ tanh(W_q s + W_k h_i)`` ``[batch, source]``."""
    _check_param("additive", params, "v", ("A",), "A: the attention size")
    size = params["v"].shape[0]
    _check_param("additive", params, "W_q", (query.shape[-1], size),
                 f"W_q [query, A]: query has {query.shape[-1]} features, v has A = {size}")
    _check_param("additive", params, "W_k", (keys.shape[-1], size),
                 f"W_k [key, A]: keys have {keys.shape[-1]} features, v has A = {size}")
    hidden = jnp.tanh((query @ params["W_q"])[:, None, :] + keys @ params["W_k"])
    return hidden @ params["v"]


def location_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Location-based score ``W s`` restricted to the first ``source`` positions ``[batch, source]``.

    The keys only give the number of positions; a source longer than ``max_positions`` is an error.
    """
    _check_param("location", params, "W", (query.shape[-1], "max_positions"),
                 f"W [query, max_positions]: query has {query.shape[-1]} features")
    source = keys.shape[-2]
    max_positions = params["W"].shape[1]
    if source > max_positions:
        raise ValueError(f"location attention was built for at most {max_positions} source positions, "
                         f"got keys with {source}; rebuild it with a larger max_positions")
    return query @ params["W"][:, :source]


def general_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """General (bilinear) score ``sᵀ W h_i`` ``[batch, source]``."""
    _check_param("general", params, "W", (query.shape[-1], keys.shape[-1]),
                 f"W [query, key]: query has {query.shape[-1]} features, keys have {keys.shape[-1]}")
    return jnp.einsum("bq,bsq->bs", query, keys @ params["W"].T)


def _check_same_size(name: str, query: jax.Array, keys: jax.Array) -> None:
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"{name} attention needs query and keys of the same size, got query "
                         f"{query.shape} and keys {keys.shape}; use 'general' or 'additive' for different sizes")


def dot_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Dot-product score ``sᵀ h_i`` ``[batch, source]``."""
    del params
    _check_same_size("dot", query, keys)
    return jnp.einsum("bn,bsn->bs", query, keys)


def scaled_dot_score(params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Scaled dot-product score ``sᵀ h_i / √n`` with ``n`` the key size ``[batch, source]``."""
    del params
    _check_same_size("scaled_dot", query, keys)
    return jnp.einsum("bn,bsn->bs", query, keys) / math.sqrt(keys.shape[-1])


class Score(NamedTuple):
    """A score function and the initialiser of its params."""

    init: Callable[..., Params]
    apply: Callable[[Params, jax.Array, jax.Array], jax.Array]


def _init_cosine(key, query_size, key_size, *, attention_size, max_positions, dtype):
    del key, attention_size, max_positions
    if query_size != key_size:
        raise ValueError(f"cosine attention needs query_size == key_size, got {query_size} and {key_size}")
    # softplus(beta_raw) = 10: sharp enough that the softmax can prefer one word from the start.
    return {"beta_raw": jnp.asarray(10.0 + math.log1p(-math.exp(-10.0)), dtype)}


def _init_additive(key, query_size, key_size, *, attention_size, max_positions, dtype):
    del max_positions
    k_q, k_k, k_v = jax.random.split(key, 3)
    return {"W_q": _glorot(k_q, (query_size, attention_size), dtype),
            "W_k": _glorot(k_k, (key_size, attention_size), dtype),
            "v": jax.random.normal(k_v, (attention_size,), dtype) / math.sqrt(attention_size)}


def _init_location(key, query_size, key_size, *, attention_size, max_positions, dtype):
    del key_size, attention_size
    if max_positions is None or max_positions < 1:
        raise ValueError(f"location attention needs max_positions >= 1, got {max_positions}")
    return {"W": _glorot(key, (query_size, max_positions), dtype)}


def _init_general(key, query_size, key_size, *, attention_size, max_positions, dtype):
    del attention_size, max_positions
    return {"W": _glorot(key, (query_size, key_size), dtype)}


def _init_none(key, query_size, key_size, *, attention_size, max_positions, dtype, name):
    del key, attention_size, max_positions, dtype
    if query_size != key_size:
        raise ValueError(f"{name} attention needs query_size == key_size, got {query_size} and {key_size}")
    return {}


SCORE_FUNCTIONS: dict[str, Score] = {
    "cosine": Score(_init_cosine, cosine_score),
    "additive": Score(_init_additive, additive_score),
    "location": Score(_init_location, location_score),
    "general": Score(_init_general, general_score),
    "dot": Score(lambda *a, **k: _init_none(*a, **k, name="dot"), dot_score),
    "scaled_dot": Score(lambda *a, **k: _init_none(*a, **k, name="scaled_dot"), scaled_dot_score),
}


def _lookup(name: str) -> Score:
    if name not in SCORE_FUNCTIONS:
        raise ValueError(f"attention score must be one of {SCORES}, got {name!r}")
    return SCORE_FUNCTIONS[name]


def init_score(name: str, key, query_size: int, key_size: int, *, attention_size: int | None = None,
               max_positions: int | None = None, dtype=jnp.float32) -> Params:
    """Params of score function ``name`` (a dict, empty for dot and scaled_dot).

    Args:
      attention_size: width ``A`` of the additive score's hidden layer (default ``query_size``).
      max_positions: number of source positions the location score can address (required for it).
    """
    return _lookup(name).init(key, query_size, key_size, attention_size=attention_size or query_size,
                              max_positions=max_positions, dtype=dtype)


def score(name: str, params: Params, query: jax.Array, keys: jax.Array) -> jax.Array:
    """Scores ``[batch, source]`` of ``query [batch, query]`` against ``keys [batch, source, key]``."""
    return _lookup(name).apply(params, query, keys)


def masked_softmax(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last axis where ``mask`` is true; masked positions get exactly zero weight.

    A row with no valid position (an empty source) gets all-zero weights rather than NaN.
    """
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    mask = mask.astype(bool)
    # The shift only guards exp against overflow and softmax is shift-invariant, so no gradient through it.
    peak = jnp.max(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1, keepdims=True)
    shifted = scores - jax.lax.stop_gradient(peak)
    # where() before exp: padded scores never reach exp, so they cannot overflow or leak weight.
    e = jnp.where(mask, jnp.exp(jnp.where(mask, shifted, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def attend(name: str, params: Params, query: jax.Array, keys: jax.Array, values: jax.Array | None = None,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention read-out: ``b = softmax(a(s, h_i))`` over valid positions, ``context = Σ_i b_i v_i``.

    Args:
      name: one of ``SCORES``.
      params: from ``init_score(name, ...)``.
      query: ``[batch, query]`` (the decoder state).
      keys: ``[batch, source, key]`` (the encoder states).
      values: ``[batch, source, value]``; the keys when omitted (the chapter's ``k_i = v_i = h_i``).
      mask: ``bool[batch, source]``, true at real (unpadded) source positions; all valid when omitted.

    Returns:
      ``(context [batch, value], weights [batch, source])``; weights sum to 1 over valid positions and are
      exactly 0 at padded ones.
    """
    query, keys = jnp.asarray(query), jnp.asarray(keys)
    if query.ndim != 2 or keys.ndim != 3 or query.shape[0] != keys.shape[0]:
        raise ValueError(f"attend expects query [batch, query] and keys [batch, source, key], got query "
                         f"{query.shape} and keys {keys.shape}")
    values = keys if values is None else jnp.asarray(values)
    mask = None if mask is None else jnp.asarray(mask)
    if values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"values must be [batch, source, value] with [batch, source] = {keys.shape[:2]} as keys, "
                         f"got shape {values.shape}")
    if mask is not None and mask.shape != keys.shape[:2]:
        raise ValueError(f"mask must be [batch, source] = {keys.shape[:2]}, got {mask.shape}")
    weights = masked_softmax(score(name, params, query, keys), mask)
    context = jnp.einsum("bs,bsv->bv", weights, values)
    return context, weights


def mask_from_lengths(lengths: jax.Array, size: int) -> jax.Array:
    """``bool[batch, size]``: true at positions ``< lengths``."""
    return jnp.arange(size)[None, :] < jnp.asarray(lengths)[:, None]
