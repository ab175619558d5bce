"""Image captioning models: the chapter's merge model, init-inject (Show and Tell) and soft attention
(Show, Attend and Tell), trained by teacher forcing over whole captions and decoded with ``jaxseq.decoding``.

The merge model of the chapter (section 18.4.5), per layer at its configuration (2,048-d image features,
vocabulary 1,652, embedding 200, LSTM 256)::

    image [B, 2048] -> Dropout 0.5 -> image_dense 256, ReLU          524,544 params
    words [B, T]    -> embedding 200 (frozen GloVe in the chapter)   330,400
                    -> Dropout 0.5 -> lstm 256                       467,968
    add             -> decoder 256, ReLU                              65,792
                    -> output 1,652 (softmax)                        424,564     total 1,813,268

The chapter trains it on every caption prefix, left-padded to 34, one sample per (prefix, next word); here one
pass over the whole caption gives the logits for every prefix at once (``__call__``), and ``caption_loss``
averages the cross-entropy over real tokens, which equals the chapter's objective on the same batch
(``seed_prefix_batch`` + ``seed_prefix_logits`` build that objective for tests and benchmarks).

Variants (``variant=``):

* ``"merge"``: as above; the image joins after the LSTM (Tanti et al. 2018's "merge").
* ``"inject"``: the image is the LSTM's initial hidden state (Vinyals et al. 2015, "init-inject"); the
  decoder reads the LSTM output alone.
* ``"attention"``: features are a spatial grid ``[B, P, D]``; each step attends over it with an additive
  (Bahdanau) score from the previous hidden state, the context joins the word at the LSTM input and is
  added to the LSTM output as in merge (Xu et al. 2015, soft attention). The initial state comes from the
  mean feature.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq import decoding, layers
from jaxseq.cells import LSTMState, check_size, make_lstm

VARIANTS = ("merge", "inject", "attention")

_lstm = make_lstm(forget_bias=0.0)  # Keras' LSTM bias starts at 0 (+1 forget only with unit_forget_bias)


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """Model configuration (the chapter's values as defaults, except the vocabulary)."""

    vocab_size: int                # words + padding index 0 (1,652 on Flickr8k at min_count 10)
    embed_dim: int = 200           # GloVe 6B 200-d in the chapter
    hidden: int = 256              # LSTM and dense widths in the chapter
    variant: str = "merge"         # "merge" | "inject" | "attention"
    dropout: float = 0.5           # on image features and word embeddings, as in the chapter
    freeze_embedding: bool = False  # True with GloVe: the embedding gets no gradient (chapter: trainable=False)
    attention_dim: int = 256       # width of the additive attention score (attention variant only)

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "hidden", "attention_dim"):
            check_size(f"CaptionConfig.{name}", getattr(self, name))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"CaptionConfig.dropout must be in [0, 1), got {self.dropout}")


class CaptionModel(nn.Module):
    """See the module docstring. Inputs: ``features`` ``[B, D]`` (or ``[B, P, D]`` grids, pooled by mean for
    merge/inject), ``tokens`` ``int32[B, T]`` starting with ``startseq``, padding 0."""

    config: CaptionConfig

    def setup(self):
        c = self.config
        if c.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {c.variant!r}")
        self.embedding = nn.Embed(c.vocab_size, c.embed_dim,
                                  embedding_init=nn.initializers.uniform(0.1))  # Keras: U(-0.05, 0.05)
        self.image_dense = nn.Dense(c.hidden)
        self.decoder = nn.Dense(c.hidden)
        self.output = nn.Dense(c.vocab_size)
        self.drop = nn.Dropout(c.dropout)
        if c.variant == "attention":
            self.att_features = nn.Dense(c.attention_dim)
            self.att_hidden = nn.Dense(c.attention_dim, use_bias=False)
            self.att_score = nn.Dense(1, use_bias=False)
            self.init_h = nn.Dense(c.hidden)
            self.init_c = nn.Dense(c.hidden)
        # The attention context (projected image positions, ``hidden`` wide) joins the word at the input.
        input_size = c.embed_dim + (c.hidden if c.variant == "attention" else 0)
        self.lstm = self.param("lstm", lambda key: _lstm.init(key, input_size, c.hidden))

    def _embed(self, tokens, deterministic: bool):
        e = self.embedding(tokens)
        if self.config.freeze_embedding:
            e = jax.lax.stop_gradient(e)
        return self.drop(e, deterministic=deterministic)

    def _pooled(self, features):
        if features.ndim in (3, 4):  # a spatial grid ([B, P, D] or [B, h, w, D]): merge/inject read its mean
            return features.mean(axis=tuple(range(1, features.ndim - 1)))
        if features.ndim != 2:
            raise ValueError(f"features must be [batch, features] or [batch, positions, features], got shape "
                             f"{features.shape}")
        return features

    def _grid(self, features):
        if features.ndim == 4:
            features = features.reshape(features.shape[0], -1, features.shape[-1])
        if features.ndim != 3:
            raise ValueError(f"the attention variant needs grid features [batch, positions, features] (or "
                             f"[batch, height, width, features]); got shape {features.shape}")
        return features

    def _head(self, h, image, deterministic: bool):
        del deterministic  # the chapter has no dropout after the LSTM
        merged = h if image is None else h + image
        return self.output(nn.relu(self.decoder(merged)))

    def init_state(self, features, deterministic: bool = True):
        """Decoder state before the first word: a dict pytree, leaves ``[B, ...]``."""
        c = self.config
        if c.variant == "attention":
            grid = self._grid(features)
            mean = grid.mean(axis=1)
            lstm = LSTMState(jnp.tanh(self.init_h(mean)), jnp.tanh(self.init_c(mean)))
            values = nn.relu(self.image_dense(self.drop(grid, deterministic=deterministic)))  # [B, P, hidden]
            return {"lstm": lstm, "values": values, "keys": self.att_features(values)}
        image = nn.relu(self.image_dense(self.drop(self._pooled(features), deterministic=deterministic)))
        zeros = jnp.zeros((image.shape[0], c.hidden), image.dtype)
        if c.variant == "inject":
            return {"lstm": LSTMState(image, zeros)}
        return {"lstm": LSTMState(zeros, zeros), "image": image}

    def _attend(self, state):
        """Soft attention: weights ``[B, P]`` and context ``[B, hidden]`` from the previous hidden state."""
        scores = self.att_score(jnp.tanh(state["keys"] + self.att_hidden(state["lstm"].h)[:, None, :]))[..., 0]
        weights = jax.nn.softmax(scores, axis=-1)
        return weights, jnp.einsum("bp,bpd->bd", weights, state["values"])

    def step(self, state, tokens, deterministic: bool = True):
        """One decoding step: ``(state, int32[B]) -> (logits [B, V], state)`` for ``jaxseq.decoding``."""
        x = self._embed(tokens, deterministic)
        if self.config.variant == "attention":
            _, context = self._attend(state)
            lstm, h = _lstm.apply(self.lstm, state["lstm"], jnp.concatenate([x, context], axis=-1))
            image = context
        else:
            lstm, h = _lstm.apply(self.lstm, state["lstm"], x)
            image = state.get("image")
        return self._head(h, image, deterministic), {**state, "lstm": lstm}

    def __call__(self, features, tokens, deterministic: bool = True):
        """Teacher forcing: logits ``[B, T, V]``; position ``t`` predicts the word after ``tokens[:, :t+1]``."""
        state = self.init_state(features, deterministic)
        if self.config.variant == "attention":
            # Attention reads the previous hidden state, so the whole step runs inside the scan.
            step = nn.scan(lambda module, s, tok: module.step(s, tok, deterministic)[::-1],
                           variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                           in_axes=1, out_axes=1)
            _, logits = step(self, state, tokens)
            return logits
        x = self._embed(tokens, deterministic)
        _, hs = layers.layer(_lstm, self.lstm, x, carry=state["lstm"])  # the fused LSTM layer (hand-BPTT backward)
        image = state.get("image")
        return self._head(hs, None if image is None else image[:, None, :], deterministic)

    def attention_weights(self, features, tokens):
        """Attention weights ``[B, T, P]`` along a caption (attention variant; for plots)."""
        state = self.init_state(features)
        weights = []
        for t in range(tokens.shape[1]):
            weights.append(self._attend(state)[0])
            _, state = self.step(state, tokens[:, t])
        return jnp.stack(weights, axis=1)

    def seed_prefix_logits(self, features, prefixes):
        """The chapter's forward pass: ``prefixes`` ``int32[N, L]`` left-padded with 0 (Keras ``mask_zero``:
        padded steps keep the LSTM state); returns next-word logits ``[N, V]`` from the last step only."""
        if self.config.variant != "merge":
            raise ValueError(f"the chapter's prefix objective is defined for the merge model, not "
                             f"{self.config.variant!r}")
        state = self.init_state(features)
        x = self._embed(prefixes, True)
        def masked(p, carry, inputs):
            xt, valid = inputs
            new, _ = _lstm.apply(p, carry, xt)
            new = jax.tree_util.tree_map(lambda n, o: jnp.where(valid[:, None], n, o), new, carry)
            return new, new.h

        final, _ = _masked_unroll(masked, self.lstm, state["lstm"], x, prefixes != 0)
        return self._head(final.h, state["image"], True)


def _masked_unroll(step, params, carry, xs, valid):
    """``lax.scan`` of ``step(params, carry, (x_t, valid_t))`` over ``[B, T, ...]`` inputs, time-major inside."""
    return jax.lax.scan(lambda c, inp: step(params, c, inp), carry,
                        (jnp.moveaxis(xs, 1, 0), jnp.moveaxis(valid, 1, 0)))


def init_params(model: CaptionModel, key, feature_shape: tuple, *, embedding_matrix=None):
    """Parameters for ``feature_shape`` (one example's, e.g. ``(2048,)`` or ``(64, 1280)``).

    ``embedding_matrix`` ``[vocab, embed_dim]`` (GloVe) replaces the initial embedding.
    """
    features = jnp.zeros((1, *feature_shape), jnp.float32)
    params = model.init(key, features, jnp.ones((1, 2), jnp.int32))["params"]
    if embedding_matrix is not None:
        expected = params["embedding"]["embedding"].shape
        if tuple(embedding_matrix.shape) != tuple(expected):
            raise ValueError(f"embedding_matrix has shape {tuple(embedding_matrix.shape)}, expected {expected} "
                             f"(vocabulary x embed_dim)")
        params = {**params, "embedding": {"embedding": jnp.asarray(embedding_matrix, jnp.float32)}}
    return params


def count_params(params) -> dict[str, int]:
    """Parameter count per top-level layer, plus ``"total"``."""
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sub))
              for name, sub in params.items()}
    counts["total"] = sum(counts.values())
    return counts


def caption_loss(model: CaptionModel, params, batch: dict, key) -> tuple[jax.Array, dict]:
    """Masked teacher-forcing cross-entropy, the ``loss_fn`` of ``jaxseq.training.fit``.

    Args:
      batch: ``features`` ``[B, D]`` (or grids) and ``tokens`` ``int32[B, T+1]``: ``startseq w1 .. endseq``
        right-padded with 0. Inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
      key: dropout key (None: deterministic).
    Returns:
      ``(mean cross-entropy over real target tokens, {"loss", "accuracy", "tokens"})``.
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    deterministic = key is None
    logits = model.apply({"params": params}, batch["features"], inputs, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": key})
    mask = (targets != 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    n = jnp.maximum(mask.sum(), 1.0)
    loss = (ce * mask).sum() / n
    accuracy = ((jnp.argmax(logits, -1) == targets) * mask).sum() / n
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": mask.sum()}


def seed_prefix_batch(features: np.ndarray, tokens: np.ndarray, vocab_size: int, max_len: int = 34):
    """The chapter's ``data_generator``: one sample per (caption prefix, next word).

    Args:
      features: ``[B, D]``; tokens: ``int32[B, T]`` right-padded captions ``startseq .. endseq``.
    Returns:
      ``(features [N, D], prefixes int32[N, max_len] left-padded, one_hot float32[N, vocab_size])``.
    """
    xs, prefixes, targets = [], [], []
    for f, row in zip(np.asarray(features), np.asarray(tokens)):
        seq = row[row != 0]
        for i in range(1, len(seq)):
            prefix = np.zeros(max_len, np.int32)
            prefix[max_len - min(i, max_len):] = seq[max(0, i - max_len):i]  # pad_sequences: pre-pad, pre-cut
            xs.append(f)
            prefixes.append(prefix)
            one_hot = np.zeros(vocab_size, np.float32)
            one_hot[seq[i]] = 1.0
            targets.append(one_hot)
    return np.stack(xs), np.stack(prefixes), np.stack(targets)


def seed_loss(model: CaptionModel, params, features, prefixes, one_hot):
    """The chapter's objective: categorical cross-entropy of each prefix's next word, mean over samples."""
    logits = model.apply({"params": params}, features, prefixes, method=CaptionModel.seed_prefix_logits)
    return -(one_hot * jax.nn.log_softmax(logits)).sum(-1).mean()


@functools.partial(jax.jit, static_argnames=("model", "method", "beam_size", "max_len", "start", "end",
                                             "temperature", "length_penalty"))
def generate(model: CaptionModel, params, features, *, start: int, end: int, max_len: int = 34,
             method: str = "greedy", beam_size: int = 3, length_penalty: float = 0.6, temperature: float = 1.0,
             key=None):
    """Caption a batch of images ``features`` ``[B, ...]`` with the carried LSTM state (jitted; the model and
    the decoding settings are static).

    Args:
      start, end: the ``startseq`` and ``endseq`` ids; max_len: most words per caption (the chapter: 34).
      method: ``"greedy"``, ``"sample"`` (needs ``key``; ``temperature``) or ``"beam"`` (``beam_size``,
        ``length_penalty``).

    Returns:
      ``(tokens int32[B, max_len], lengths int32[B])`` (for beam search, the best beam).
    """
    state = model.apply({"params": params}, features, method=CaptionModel.init_state)

    def step_fn(s, tokens):
        return model.apply({"params": params}, s, tokens, method=CaptionModel.step)

    start_tokens = jnp.full((features.shape[0],), start, jnp.int32)
    if method == "greedy":
        return decoding.greedy(step_fn, state, start_tokens, max_len=max_len, end_token=end)
    if method == "sample":
        if key is None:
            raise ValueError("method='sample' needs a PRNG key (key=jax.random.PRNGKey(...))")
        return decoding.sample(step_fn, state, start_tokens, key, max_len=max_len, end_token=end,
                               temperature=temperature)
    if method == "beam":
        tokens, _, lengths = decoding.beam_search(step_fn, state, start_tokens, beam_size=beam_size,
                                                  max_len=max_len, end_token=end, length_penalty=length_penalty)
        return tokens[:, 0], lengths[:, 0]
    raise ValueError(f"method must be 'greedy', 'sample' or 'beam', got {method!r}")
