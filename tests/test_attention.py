"""The six score functions against numpy oracles written from the chapter's table, and masking in attend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

from jaxseq import attention as attn

B, S, N = 3, 5, 4


def _inputs(key):
    kq, kk = jax.random.split(key)
    return jax.random.normal(kq, (B, N)), jax.random.normal(kk, (B, S, N))


def _oracle(name, params, q, k):
    """Per (batch, position) loops, straight from the formulas."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    out = np.zeros((q.shape[0], k.shape[1]))
    for b in range(q.shape[0]):
        for i in range(k.shape[1]):
            s, h = q[b], k[b, i]
            if name == "cosine":
                beta = np.log1p(np.exp(p["beta_raw"]))
                out[b, i] = beta * s @ h / (np.linalg.norm(s) * np.linalg.norm(h))
            elif name == "additive":
                W = np.concatenate([p["W_q"], p["W_k"]], axis=0)  # W [s; h] with the blocks stacked
                out[b, i] = p["v"] @ np.tanh(np.concatenate([s, h]) @ W)
            elif name == "location":
                out[b, i] = (s @ p["W"])[i]
            elif name == "general":
                out[b, i] = s @ p["W"] @ h
            elif name == "dot":
                out[b, i] = s @ h
            elif name == "scaled_dot":
                out[b, i] = s @ h / np.sqrt(len(h))
    return out


@pytest.mark.parametrize("name", attn.SCORES)
def test_score_matches_formula(name, key):
    q, k = _inputs(key)
    params = attn.init_score(name, jax.random.fold_in(key, 1), N, N, attention_size=6, max_positions=7)
    np.testing.assert_allclose(attn.score(name, params, q, k), _oracle(name, params, q, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", attn.SCORES)
def test_padded_positions_get_exactly_zero_weight(name, key):
    q, k = _inputs(key)
    params = attn.init_score(name, jax.random.fold_in(key, 1), N, N, max_positions=S)
    lengths = jnp.array([5, 2, 1])
    mask = attn.mask_from_lengths(lengths, S)
    context, weights = attn.attend(name, params, q, k, mask=mask)
    weights = np.asarray(weights)
    assert np.all(weights[~np.asarray(mask)] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    # Garbage (huge) keys/values in padded slots change nothing: the padding is invisible.
    junk = jnp.where(mask[..., None], k, 1e4)
    context2, weights2 = attn.attend(name, params, q, junk, mask=mask)
    assert_trees_close((context2, weights2), (context, weights), rtol=1e-5, atol=1e-6)
    # The unpadded part alone gives the same answer (row 1 has 2 valid positions).
    c1, w1 = attn.attend(name, params, q[1:2], k[1:2, :2])
    assert_trees_close((c1[0], w1[0]), (context[1], weights[1, :2]), rtol=1e-5, atol=1e-6)


def test_empty_source_gives_zero_weights_and_finite_gradient(key):
    q, k = _inputs(key)
    params = attn.init_score("additive", key, N, N)
    mask = attn.mask_from_lengths(jnp.array([0, 3, 5]), S)
    context, weights = attn.attend("additive", params, q, k, mask=mask)
    assert np.all(np.asarray(weights[0]) == 0.0) and np.all(np.asarray(context[0]) == 0.0)
    grads = jax.grad(lambda p, k: attn.attend("additive", p, q, k, mask=mask)[0].sum(), argnums=(0, 1))(params, k)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_context_is_weighted_sum_of_values(key):
    q, k = _inputs(key)
    v = jax.random.normal(jax.random.fold_in(key, 2), (B, S, 7))
    context, weights = attn.attend("dot", {}, q, k, v)
    np.testing.assert_allclose(context, np.einsum("bs,bsv->bv", weights, v), rtol=1e-5)
    np.testing.assert_allclose(weights, jax.nn.softmax(np.einsum("bn,bsn->bs", q, k), -1), rtol=1e-5)


def test_cosine_ignores_key_scale_and_scaled_dot_divides_by_sqrt_n(key):
    q, k = _inputs(key)
    params = attn.init_score("cosine", key, N, N)
    np.testing.assert_allclose(attn.score("cosine", params, q, 3.0 * k), attn.score("cosine", params, q, k),
                               rtol=1e-5)
    np.testing.assert_allclose(attn.score("scaled_dot", {}, q, k), attn.score("dot", {}, q, k) / 2.0, rtol=1e-6)


def test_different_query_and_key_sizes(key):
    q = jnp.ones((B, 3))
    k = jnp.ones((B, S, 4))
    for name in ("additive", "general", "location"):
        params = attn.init_score(name, key, 3, 4, max_positions=S)
        assert attn.attend(name, params, q, k)[0].shape == (B, 4)
    for name in ("dot", "scaled_dot", "cosine"):
        with pytest.raises(ValueError, match="query"):
            attn.init_score(name, key, 3, 4)
        if name != "cosine":
            with pytest.raises(ValueError, match="same size"):
                attn.score(name, {}, q, k)


def test_errors_name_the_problem(key):
    q, k = _inputs(key)
    with pytest.raises(ValueError, match="must be one of"):
        attn.attend("bilinear", {}, q, k)
    params = attn.init_score("location", key, N, N, max_positions=3)
    with pytest.raises(ValueError, match="at most 3 source positions"):
        attn.score("location", params, q, k)
    with pytest.raises(ValueError, match="max_positions"):
        attn.init_score("location", key, N, N)
    with pytest.raises(ValueError, match=r"mask must be \[batch, source\]"):
        attn.attend("dot", {}, q, k, mask=jnp.ones((B, S + 1), bool))
    with pytest.raises(ValueError, match="query"):
        attn.attend("dot", {}, q[0], k)


def test_params_that_do_not_fit_query_or_keys_name_the_key(key):
    q, k = _inputs(key)  # N = 4 features each
    additive = attn.init_score("additive", key, N, N, attention_size=6)
    with pytest.raises(ValueError, match=r'additive attention\'s params\["W_k"\] has shape \(4, 6\); expected \[3, 6\] '
                                         r"\(W_k \[key, A\]: keys have 3 features"):
        attn.attend("additive", additive, q, k[..., :3])
    with pytest.raises(ValueError, match=r'params\["W_q"\] has shape \(4, 6\); expected \[5, 6\]'):
        attn.attend("additive", additive, jnp.ones((B, 5)), k)
    with pytest.raises(ValueError, match=r'additive attention params are missing "v"'):
        attn.attend("additive", {"W_q": additive["W_q"], "W_k": additive["W_k"]}, q, k)
    general = attn.init_score("general", key, N, N)
    with pytest.raises(ValueError, match=r'general attention\'s params\["W"\] has shape \(4, 4\); expected \[4, 3\]'):
        attn.attend("general", general, q, k[..., :3])
    location = attn.init_score("location", key, N, N, max_positions=S)
    with pytest.raises(ValueError, match=r'params\["W"\] has shape \(4, 5\); expected \[2, max_positions\]'):
        attn.attend("location", location, q[:, :2], k)
    with pytest.raises(ValueError, match=r'cosine attention params are missing "beta_raw"'):
        attn.attend("cosine", {}, q, k)
    with pytest.raises(ValueError, match=r"values must be \[batch, source, value\] .* got shape \(3, 4, 2\)"):
        attn.attend("dot", {}, q, k, values=jnp.ones((B, S - 1, 2)))


def test_jit_and_grad_through_every_score(key):
    q, k = _inputs(key)
    mask = attn.mask_from_lengths(jnp.array([5, 3, 4]), S)
    for name in attn.SCORES:
        params = attn.init_score(name, key, N, N, max_positions=S)
        f = jax.jit(lambda p, q: attn.attend(name, p, q, k, mask=mask)[0].sum())
        g = jax.grad(f, argnums=(0, 1))(params, q)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g)), name
