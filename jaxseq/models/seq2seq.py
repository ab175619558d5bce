"""Encoder-decoder translation model (chapter 19), with or without attention, as pure functions.

Encoder: embeddings, then stacked LSTM/GRU layers (bidirectional or not) over the source ``[batch, source]``
with its lengths; its states ``h_i`` are ``[batch, source, D]`` with ``D = 2 * hidden`` if bidirectional.

Decoder: LSTM/GRU layers of width ``D`` whose initial state is the encoder's final state (the chapter's
context vector; forward and backward final states are concatenated). Without attention that vector is all the
decoder knows about the source. With attention, each step t (Bahdanau et al. 2015, as in the chapter):

    query  = s_{t-1}  (top decoder layer's previous hidden state)
    c_t, b = attend(score, query, keys=h, values=h, mask)          b: weights over source words
    s_t    = cell([emb(y_{t-1}); c_t], s_{t-1})
    o_t    = tanh([s_t; c_t] W_c)            logits = o_t W_o + b_o

Everything is a pure function of a params dict so it plugs straight into ``jaxseq.training.fit``
(``init_params(key)``, ``loss_fn(params, batch, key)``) and the decoding contract's
``step_fn(state, tokens) -> (logits, state)``; a Flax wrapper would add nothing here.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from jaxseq import attention as attn
from jaxseq import cells, layers
from jaxseq.cells import hidden_state
from jaxseq.sequences import dropout

CELLS = {"lstm": cells.lstm, "gru": cells.gru}
ATTENTIONS = ("none",) + attn.SCORES


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Model shape. Stored with each run (``dataclasses.asdict``) so ``predict`` rebuilds the same model."""

    src_vocab: int  # source vocabulary size, specials included
    tgt_vocab: int  # target vocabulary size, specials included
    embed: int = 64  # embedding width (both languages)
    hidden: int = 128  # encoder width per direction; the decoder is D = 2*hidden wide if bidirectional
    enc_layers: int = 1  # stacked encoder layers
    dec_layers: int = 1  # stacked decoder layers; layer l starts from encoder layer min(l, enc_layers-1)
    cell: str = "lstm"  # "lstm" | "gru"
    bidirectional: bool = True  # bidirectional encoder (each word's state sees both sides)
    attention: str = "additive"  # "none" (plain seq2seq) or one of jaxseq.attention.SCORES
    attention_size: int | None = None  # additive score hidden width; None = D
    max_src_len: int = 64  # positions the location score can address (longer sources are an error)
    dropout: float = 0.2  # on embeddings, between layers and before the output layer (training only)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("src_vocab", "tgt_vocab", "embed", "hidden", "enc_layers", "dec_layers", "max_src_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def width(self) -> int:
        """D: encoder state width = decoder width."""
        return 2 * self.hidden if self.bidirectional else self.hidden


def _dense(key, n_in, n_out):
    return {"W": jax.nn.initializers.glorot_uniform()(key, (n_in, n_out)), "b": jnp.zeros((n_out,))}


def init_params(config: Seq2SeqConfig, key) -> dict:
    """All parameters as one dict pytree."""
    cell, D, E = CELLS[config.cell], config.width, config.embed
    keys = jax.random.split(key, 7)
    embed_init = jax.nn.initializers.normal(1.0 / math.sqrt(E))
    use_attention = config.attention != "none"
    dec_keys = jax.random.split(keys[3], config.dec_layers)
    params = {
        "src_embed": embed_init(keys[0], (config.src_vocab, E)),
        "tgt_embed": embed_init(keys[1], (config.tgt_vocab, E)),
        "encoder": layers.init_stacked(cell, keys[2], E, config.hidden, config.enc_layers,
                                     bidirectional=config.bidirectional),
        "decoder": [cell.init(k, (E + D if use_attention else E) if l == 0 else D, D)
                    for l, k in enumerate(dec_keys)],
        "output": _dense(keys[4], D, config.tgt_vocab),
    }
    if use_attention:
        params["score"] = attn.init_score(config.attention, keys[5], D, D, attention_size=config.attention_size,
                                          max_positions=config.max_src_len)
        params["combine"] = _dense(keys[6], 2 * D, D)
    return params


def _merge_directions(carry):
    """Concatenate a bidirectional layer's (forward, backward) final carries into one width-D carry."""
    fwd, bwd = carry
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=-1), fwd, bwd)


def encode(config: Seq2SeqConfig, params, src, src_len, *, key=None) -> dict:
    """Run the encoder; returns the decoder's starting state (the ``step`` state pytree).

    Args:
      src: ``int32[batch, source]`` token ids (padding anywhere past ``src_len``).
      src_len: ``int32[batch]``.
      key: dropout key (training) or None.

    Returns:
      ``{"carry": [per decoder layer], "keys": [batch, source, D], "mask": bool[batch, source]}``.
    """
    src = jnp.asarray(src)
    if src.ndim != 2:
        raise ValueError(f"src must be int [batch, source], got shape {src.shape}")
    k_emb, k_layers = (None, None) if key is None else jax.random.split(key)
    x = dropout(params["src_embed"][src], config.dropout, k_emb)
    finals, states = layers.stacked(CELLS[config.cell], params["encoder"], x, lengths=src_len,
                                  bidirectional=config.bidirectional, dropout_rate=config.dropout, key=k_layers)
    if config.bidirectional:
        finals = [_merge_directions(c) for c in finals]
    carry = [finals[min(l, config.enc_layers - 1)] for l in range(config.dec_layers)]
    return {"carry": carry, "keys": states, "mask": attn.mask_from_lengths(src_len, src.shape[1])}


def step(config: Seq2SeqConfig, params, state: dict, tokens, *, key=None):
    """One decoder step: previous tokens ``int32[N]`` -> ``(logits [N, tgt_vocab], new_state, weights)``.

    ``weights`` ``[N, source]`` are the attention weights used for this step (zeros without attention).
    """
    cell = CELLS[config.cell]
    keys = (None,) * 3 if key is None else jax.random.split(key, 3)
    x = dropout(params["tgt_embed"][tokens], config.dropout, keys[0])
    carry = state["carry"]
    if config.attention != "none":
        context, weights = attn.attend(config.attention, params["score"], hidden_state(carry[-1]),
                                       state["keys"], mask=state["mask"])
        x = jnp.concatenate([x, context], axis=-1)
    else:
        weights = jnp.zeros(state["mask"].shape, x.dtype)
    new_carry = []
    for l, (layer, c) in enumerate(zip(params["decoder"], carry)):
        if l > 0:
            x = dropout(x, config.dropout, None if key is None else jax.random.fold_in(keys[1], l))
        c, x = cell.apply(layer, c, x)
        new_carry.append(c)
    if config.attention != "none":
        x = jnp.tanh(jnp.concatenate([x, context], axis=-1) @ params["combine"]["W"] + params["combine"]["b"])
    x = dropout(x, config.dropout, keys[2])
    logits = x @ params["output"]["W"] + params["output"]["b"]
    return logits, {**state, "carry": new_carry}, weights


def decode_teacher_forced(config: Seq2SeqConfig, params, state: dict, tgt_in, *, key=None):
    """Decoder over given inputs ``int32[batch, target]``: ``(logits [batch, target, V], weights [batch,
    target, source])``."""
    def body(st, inputs):
        tokens, t = inputs
        step_key = None if key is None else jax.random.fold_in(key, t)
        logits, st, weights = step(config, params, st, tokens, key=step_key)
        return st, (logits, weights)

    tgt_in = jnp.asarray(tgt_in)
    _, (logits, weights) = jax.lax.scan(body, state, (tgt_in.T, jnp.arange(tgt_in.shape[1])))
    return jnp.moveaxis(logits, 0, 1), jnp.moveaxis(weights, 0, 1)


def loss_fn(config: Seq2SeqConfig, params, batch: dict, key=None):
    """Mean cross-entropy per real target token; aux ``{"token_accuracy", "tokens"}``.

    ``batch``: ``src``, ``src_len``, ``tgt_in``, ``tgt_out``, ``tgt_len`` as made by
    ``jaxseq.data.translation.make_batch``. Empty padding rows (``tgt_len`` 0) carry no weight.
    """
    k_enc, k_dec = (None, None) if key is None else jax.random.split(key)
    state = encode(config, params, batch["src"], batch["src_len"], key=k_enc)
    logits, _ = decode_teacher_forced(config, params, state, batch["tgt_in"], key=k_dec)
    tgt_out = jnp.asarray(batch["tgt_out"])
    mask = attn.mask_from_lengths(batch["tgt_len"], tgt_out.shape[1]).astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tgt_out)
    tokens = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == tgt_out).astype(logits.dtype)
    return (ce * mask).sum() / tokens, {"token_accuracy": (correct * mask).sum() / tokens, "tokens": mask.sum()}


def make_step_fn(config: Seq2SeqConfig, params):
    """The decoding contract's ``step_fn(state, tokens) -> (logits, state)`` with params bound."""
    def step_fn(state, tokens):
        logits, state, _ = step(config, params, state, tokens)
        return logits, state
    return step_fn
