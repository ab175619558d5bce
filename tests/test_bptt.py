"""Hand-derived BPTT (jaxseq.bptt) against jax.grad through jaxseq.unroll and central finite differences."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq
from jaxseq import bptt, cells
from jaxseq.cells import LSTMState
from helpers import assert_trees_close

# (batch_shape, time, input, hidden, classes, seed): unbatched, batched, longer, multi-dim batch.
SHAPES = [((), 5, 3, 4, 3, 0), ((2,), 7, 2, 5, 4, 1), ((3,), 12, 4, 3, 2, 2), ((2, 2), 4, 3, 6, 5, 3)]

# Jitted once per shape: eager op-by-op dispatch of scans and einsums dominated the suite's time.
rnn_many_to_one = jax.jit(bptt.rnn_many_to_one_grads, static_argnames="activation")
rnn_many_to_many = jax.jit(bptt.rnn_many_to_many_grads, static_argnames="activation")
lstm_grads = jax.jit(bptt.lstm_grads)


def _rnn_params(key, I, H, D, dtype, activation="tanh"):
    k1, k2, k3 = jax.random.split(key, 3)
    params = cells.make_rnn(activation).init(k1, I, H, dtype)
    # Non-zero biases and a larger W so every term of the recursion matters.
    params["b"] = 0.3 * jax.random.normal(k3, (H,), dtype)
    params["W"] = 1.5 * params["W"]
    params["V"] = jax.random.normal(k2, (H, D), dtype) / np.sqrt(H)
    params["c"] = 0.1 * jnp.arange(D, dtype=dtype)
    return params


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rnn_loss_autodiff(params, xs, labels, activation, many_to_many):
    cell = cells.make_rnn(activation)
    rnn_params = {k: params[k] for k in ("U", "W", "b")}
    carry0 = cell.init_carry(xs.shape[:-2], params["W"].shape[0], xs.dtype)
    last, ss = jaxseq.unroll(cell.apply, rnn_params, carry0, xs)
    states = ss if many_to_many else last
    log_p = jax.nn.log_softmax(states @ params["V"] + params["c"])
    return -jnp.take_along_axis(log_p, labels[..., None], axis=-1).sum()


def _rnn_case(shape, dtype, activation="tanh"):
    batch, T, I, H, D, seed = shape
    k_p, k_x, k_y = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = _rnn_params(k_p, I, H, D, dtype, activation)
    xs = jax.random.normal(k_x, (*batch, T, I), dtype)
    return params, xs, k_y, batch, T, D


@pytest.mark.parametrize("shape,activation", [(s, "tanh") for s in SHAPES] + [(SHAPES[1], "relu")])
def test_rnn_many_to_one_matches_autodiff_float32(shape, activation):
    params, xs, k_y, batch, T, D = _rnn_case(shape, jnp.float32, activation)
    label = jax.random.randint(k_y, batch, 0, D)
    loss, grads = rnn_many_to_one(params, xs, label, activation=activation)
    ref_loss, ref_grads = jax.value_and_grad(_rnn_loss_autodiff)(params, xs, label, activation, False)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_rnn_many_to_many_matches_autodiff_float32(shape):
    params, xs, k_y, batch, T, D = _rnn_case(shape, jnp.float32)
    labels = jax.random.randint(k_y, (*batch, T), 0, D)
    loss, grads = rnn_many_to_many(params, xs, labels)
    ref_loss, ref_grads = jax.value_and_grad(_rnn_loss_autodiff)(params, xs, labels, "tanh", True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_rnn_float64_autodiff_and_finite_differences(shape):
    with jax.enable_x64(True):
        params, xs, k_y, batch, T, D = _rnn_case(shape, jnp.float64)
        label = jax.random.randint(k_y, batch, 0, D)
        _, grads = rnn_many_to_one(params, xs, label)
        ref = jax.grad(_rnn_loss_autodiff)(params, xs, label, "tanh", False)
        assert_trees_close(grads, ref, rtol=1e-10, atol=1e-12)
        # Central differences along random directions: (L(p + εd) - L(p - εd)) / 2ε = <∇L, d>.
        loss = jax.jit(lambda p: bptt.rnn_many_to_one_grads(p, xs, label)[0])
        for i in range(3):
            keys = jax.random.split(jax.random.PRNGKey(100 + i), len(params))
            d = {k: jax.random.normal(kk, v.shape, v.dtype) for kk, (k, v) in zip(keys, params.items())}
            eps = 1e-6
            plus = jax.tree_util.tree_map(lambda p, v: p + eps * v, params, d)
            minus = jax.tree_util.tree_map(lambda p, v: p - eps * v, params, d)
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            analytic = sum(jnp.vdot(grads[k], d[k]) for k in params)
            np.testing.assert_allclose(fd, analytic, rtol=1e-7)


def _lstm_case(shape, dtype, seed_offset=0):
    batch, T, I, H, _, seed = shape
    k_p, k_x, k_d, k_c, k_b = jax.random.split(jax.random.PRNGKey(seed + seed_offset), 5)
    params = cells.lstm.init(k_p, I, H, dtype)
    params["b"] = params["b"] + 0.2 * jax.random.normal(k_b, params["b"].shape, dtype)
    xs = jax.random.normal(k_x, (*batch, T, I), dtype)
    dhs = jax.random.normal(k_d, (*batch, T, H), dtype)
    kc1, kc2, kc3, kc4 = jax.random.split(k_c, 4)
    carry0 = LSTMState(0.5 * jax.random.normal(kc1, (*batch, H), dtype), jax.random.normal(kc2, (*batch, H), dtype))
    dcarry = LSTMState(jax.random.normal(kc3, (*batch, H), dtype), jax.random.normal(kc4, (*batch, H), dtype))
    return params, xs, dhs, carry0, dcarry


@jax.jit
def _lstm_objective(params, xs, carry0, dhs, dcarry):
    final, hs = jaxseq.unroll(cells.lstm.apply, params, carry0, xs)
    return jnp.vdot(hs, dhs) + jnp.vdot(final.h, dcarry.h) + jnp.vdot(final.c, dcarry.c)


@pytest.mark.parametrize("shape", SHAPES)
def test_lstm_grads_match_autodiff_float32(shape):
    params, xs, dhs, carry0, dcarry = _lstm_case(shape, jnp.float32)
    got = lstm_grads(params, xs, dhs, carry0, dcarry=dcarry)
    ref_p, ref_x, ref_c = jax.grad(_lstm_objective, argnums=(0, 1, 2))(params, xs, carry0, dhs, dcarry)
    assert_trees_close(got, bptt.LSTMGrads(ref_p, ref_x, ref_c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_lstm_grads_float64_autodiff_and_finite_differences(shape):
    with jax.enable_x64(True):
        params, xs, dhs, carry0, dcarry = _lstm_case(shape, jnp.float64)
        got = lstm_grads(params, xs, dhs, carry0, dcarry=dcarry)
        ref = jax.grad(_lstm_objective, argnums=(0, 1, 2))(params, xs, carry0, dhs, dcarry)
        assert_trees_close(got, bptt.LSTMGrads(*ref), rtol=1e-10, atol=1e-12)
        objective = jax.jit(lambda p, x, c: _lstm_objective(p, x, c, dhs, dcarry))
        primal = (params, xs, carry0)
        leaves, treedef = jax.tree_util.tree_flatten(primal)
        keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
        direction = treedef.unflatten([jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
        eps = 1e-6
        shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, primal, direction)
        fd = (objective(*shift(1)) - objective(*shift(-1))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(tuple(got)),
                                                      jax.tree_util.tree_leaves(direction)))
        np.testing.assert_allclose(fd, analytic, rtol=1e-7)


def test_lstm_grads_default_carry_and_many_to_one():
    params, xs, dhs, _, _ = _lstm_case(SHAPES[1], jnp.float32)
    zero_dhs = jnp.zeros_like(dhs)
    dcarry = LSTMState(jnp.ones(dhs.shape[:-2] + dhs.shape[-1:]), jnp.zeros(dhs.shape[:-2] + dhs.shape[-1:]))
    got = bptt.lstm_grads(params, xs, zero_dhs, dcarry=dcarry)

    def many_to_one(p):
        final, _ = jaxseq.unroll(cells.lstm.apply, p, cells.lstm.init_carry(xs.shape[:-2], 5), xs)
        return final.h.sum()

    assert_trees_close(got.params, jax.grad(many_to_one)(params), rtol=1e-5, atol=1e-6)


def test_bad_input_messages():
    params, xs, dhs, _, _ = _lstm_case(SHAPES[1], jnp.float32)
    with pytest.raises(ValueError, match="dhs has shape"):
        bptt.lstm_grads(params, xs, dhs[..., :2])
    with pytest.raises(ValueError, match="features"):
        bptt.lstm_grads(params, xs[..., :1], dhs)
    rnn_params, rxs, *_ = _rnn_case(SHAPES[0], jnp.float32)
    del rnn_params["V"]
    with pytest.raises(ValueError, match="missing \\['V'\\]"):
        bptt.rnn_many_to_one_grads(rnn_params, rxs, 0)


def test_labels_out_of_range_or_misshapen_are_rejected():
    params, xs, k_y, batch, T, D = _rnn_case(SHAPES[1], jnp.float32)  # batch (2,), D = 4 classes
    # one_hot of an out-of-range label is all zeros: the loss would silently be 0.
    for bad in (D, D + 2, -1):
        with pytest.raises(ValueError, match=rf"label must lie in \[0, {D}\) .* from {min(bad, 0)} to {max(bad, 0)}"):
            bptt.rnn_many_to_one_grads(params, xs, jnp.array([0, bad]))
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {D}\)"):
            bptt.rnn_many_to_many_grads(params, xs, jnp.zeros((*batch, T), int).at[1, 3].set(bad))
    with pytest.raises(ValueError, match=r"label has shape \(3,\); expected \(2,\)"):
        bptt.rnn_many_to_one_grads(params, xs, jnp.zeros(3, int))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\); expected \(2, 7\)"):
        bptt.rnn_many_to_many_grads(params, xs, jnp.zeros(2, int))
    with pytest.raises(ValueError, match="label must be integer class indices, got dtype float32"):
        bptt.rnn_many_to_one_grads(params, xs, jnp.zeros(2))
    with pytest.raises(ValueError, match=r'params\["V"\] \(6, 4\) and params\["c"\] \(4,\) must be the readout'):
        bptt.rnn_many_to_one_grads({**params, "V": jnp.zeros((6, D))}, xs, [0, 1])
    with pytest.raises(ValueError, match=r'params\["b"\] has shape \(3,\)'):
        bptt.rnn_many_to_one_grads({**params, "b": jnp.zeros(3)}, xs, [0, 1])
    # A list is taken; traced labels are not inspected (no host sync under jit).
    loss, _ = bptt.rnn_many_to_one_grads(params, xs, [0, D - 1])
    np.testing.assert_allclose(loss, rnn_many_to_one(params, xs, jnp.array([0, D - 1]))[0], rtol=1e-6)


def test_hand_bptt_inside_shard_map():
    """Batch-sharded inside ``shard_map`` (a one-device mesh checks the types): same loss and gradients.

    The zero initial states are invariant across the mesh while the sharded inputs vary; scan rejects that
    unless the recursions cast their start. Each shard's sums are its own, so they are psum-ed over the mesh.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    spec = jax.sharding.PartitionSpec

    def sharded(fn, params, *batched):
        summed = lambda *args: jax.tree_util.tree_map(lambda a: jax.lax.psum(jnp.sum(a), "batch"), fn(*args))
        in_specs = (spec(),) + (spec("batch"),) * len(batched)
        return jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=in_specs, out_specs=spec()))(params, *batched)

    def summed(result):
        return jax.tree_util.tree_map(jnp.sum, result)

    params, xs, k_y, batch, T, D = _rnn_case(SHAPES[1], jnp.float32)
    label, labels = jax.random.randint(k_y, batch, 0, D), jax.random.randint(k_y, (*batch, T), 0, D)
    assert_trees_close(sharded(bptt.rnn_many_to_one_grads, params, xs, label),
                       summed(rnn_many_to_one(params, xs, label)))
    assert_trees_close(sharded(bptt.rnn_many_to_many_grads, params, xs, labels),
                       summed(rnn_many_to_many(params, xs, labels)))
    lstm_params, xs, dhs, _, _ = _lstm_case(SHAPES[1], jnp.float32)
    assert_trees_close(sharded(bptt.lstm_grads, lstm_params, xs, dhs), summed(lstm_grads(lstm_params, xs, dhs)))
