"""The native CPU kernel for the fused LSTM's loops (jaxseq.native): same values and gradients as XLA's loops."""
import importlib.util
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxseq import cells, layers, native, unroll
from jaxseq.native import build
from jaxseq.cells import LSTMState

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel needs x86-64 Linux and a C++ "
                                "compiler, a one-device CPU backend, and JAXSEQ_NATIVE unset")


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def _problem(key, batch, steps, in_size, hidden):
    k = jax.random.split(key, 6)
    params = cells.lstm.init(k[0], in_size, hidden)
    xs_t = jax.random.normal(k[1], (steps, batch, in_size))
    h0, c0 = (0.5 * jax.random.normal(k[i], (batch, hidden)) for i in (2, 3))
    lengths = jax.random.randint(k[4], (batch,), 0, steps + 1).at[0].set(steps)
    dys = jax.random.normal(k[5], (steps, batch, hidden))
    return params, xs_t, h0, c0, lengths, dys


def _xla_forward(U, W, b, h0, c0, xs_t, lengths, dz_probe=None):
    """The oracle: the LSTM stepped in ``lax.scan`` over time-major ``xs_t`` ``[T, B, I]``, invalid steps keeping
    the carry and emitting zeros. Returns ``(h, c, ys [T, B, H], gates [4, T, B, H], cs [T, B, H])``: the
    activated gates i, f, g, o and the carried cell states, what the kernel's tape holds. ``dz_probe``
    ``[T, B, 4H]`` is added to each step's pre-activation, so the gradient with respect to it is ``δz_t``."""
    steps, batch = xs_t.shape[:2]
    valid = (jnp.ones((steps, batch), bool) if lengths is None
             else jnp.arange(steps)[:, None] < lengths[None, :])
    probe = jnp.zeros((steps, batch, b.shape[0]), xs_t.dtype) if dz_probe is None else dz_probe

    def step(carry, inputs):
        h, c = carry
        x, e, keep = inputs
        zi, zf, zg, zo = jnp.split(x @ U + h @ W + b + e, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        keep = keep[:, None]
        c_new = jnp.where(keep, f * c + i * g, c)
        h_new = jnp.where(keep, o * jnp.tanh(c_new), h)
        return (h_new, c_new), (jnp.where(keep, h_new, 0.0), jnp.stack([i, f, g, o]), c_new)

    (h, c), (ys, gates, cs) = lax.scan(step, (h0, c0), (xs_t, probe, valid))
    return h, c, ys, jnp.moveaxis(gates, 1, 0), cs


@jax.jit
def _xla_backward(U, W, b, h0, c0, xs_t, lengths, dys, dh, dc):
    """The oracle's cotangents for ``Σ ⟨dys, ys⟩ + ⟨dh, h_T⟩ + ⟨dc, c_T⟩``, by autodiff:
    ``(dh0, dc0, δz [T, B, 4H])``, the weight gradients ``(dU, dW, db)`` and ``dxs`` ``[T, B, I]``."""
    def loss(h0, c0, probe, U, W, b, xs_t):
        h, c, ys, _, _ = _xla_forward(U, W, b, h0, c0, xs_t, lengths, probe)
        return jnp.sum(ys * dys) + jnp.sum(h * dh) + jnp.sum(c * dc)

    probe = jnp.zeros((*xs_t.shape[:2], b.shape[0]), xs_t.dtype)
    dh0, dc0, dz, dU, dW, db, dxs = jax.grad(loss, argnums=range(7))(h0, c0, probe, U, W, b, xs_t)
    return (dh0, dc0, dz), (dU, dW, db), dxs


# Hidden sizes on and off the kernel's 16-float vectors (5 and 40 are padded; 40 is five 8-float blocks with
# AVX2), batches on and off its 6-row register blocks (remainders 1 to 5: 7, 8, 3, 10, 11; 10, 16 and 40 end in
# 5 + 5, 26 is 6 + 5 + 5 + 5 + 5; 8, too small for that, is cut 5 + 3), with and without lengths, the input
# product inside the loop and hoisted; depths I + H past the kernel's 96-row passes, with a pass boundary inside
# the input part (100, 32) and inside the recurrent part (20, 120; hoisted, 120 alone); more row blocks than
# column blocks (40, 8: one block packs every row block of x_t); input gradients of 1, 2 and 7 vectors (7 is cut
# 3 + 4: a three-vector tile). (16, 5, 56, 128) and (16, 4, 200, 64) have two threads' work (on two cores or
# more): their input gradients' 4 and 13 vectors are cut into 2 and 4 blocks, a multiple of the threads, and
# H = 64 (one block of four vectors) into two hidden blocks of two. With the weight and input gradients,
# (7, 4, 100, 32) has two threads' work in the backward too (its team counts all of a step's products): two
# hidden blocks of one vector.
@pytest.mark.parametrize("batch,steps,in_size,hidden", [(11, 9, 7, 32), (3, 5, 4, 5), (8, 6, 16, 40),
                                                         (7, 4, 100, 32), (10, 3, 20, 120), (40, 3, 9, 8),
                                                         (16, 5, 56, 128), (16, 4, 200, 64), (26, 3, 30, 48)])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("hoisted", [False, True])
def test_kernel_loops_match_xla_loops(key, batch, steps, in_size, hidden, with_lengths, hoisted):
    params, xs_t, h0, c0, lengths, dys = _problem(key, batch, steps, in_size, hidden)
    U, W, b = params["U"], params["W"], params["b"]
    oracle_lengths = lengths if with_lengths else None
    h, c, ys, gates, cs = _xla_forward(U, W, b, h0, c0, xs_t, oracle_lengths)
    expected_backward, expected_weight_grads, expected_dxs = _xla_backward(U, W, b, h0, c0, xs_t, oracle_lengths,
                                                                           dys, 0.3 * h0, 0.2 * c0)
    got = native.lstm_forward(xs_t, U, W, b, h0, c0, lengths if with_lengths else None, hoisted=hoisted,
                              save=True)
    assert_trees_close(got[:3], (h, c, ys), atol=1e-6)
    hp = native.padded_hidden(hidden)
    assert got[3].gates.shape == (steps, hp // native.LANES, batch, 4, native.LANES)
    kernel_gates, kernel_cs = got[3].unblocked()
    assert kernel_gates.shape == (4, steps, batch, hp)
    assert_trees_close(kernel_gates[..., :hidden], gates, atol=1e-6)
    assert_trees_close(kernel_cs[..., :hidden], cs, atol=1e-6)
    backward = native.lstm_backward(W, got[3], c0, dys, lengths if with_lengths else None, 0.3 * h0, 0.2 * c0)
    assert_trees_close(backward, expected_backward, atol=1e-5)
    # The weight gradients formed inside the backward loop, step by step, equal one GEMM over all steps after it.
    *backward_again, weight_grads = native.lstm_backward(W, got[3], c0, dys, lengths if with_lengths else None,
                                                         0.3 * h0, 0.2 * c0, weight_grads_of=(xs_t, h0, got[2]))
    assert_trees_close(tuple(backward_again), expected_backward, atol=1e-5)
    assert [g.shape for g in weight_grads] == [U.shape, W.shape, b.shape]
    assert_trees_close(weight_grads, expected_weight_grads, atol=1e-5)
    # Without δz as a result (a ring of three steps inside the kernel), the same carries and weight gradients.
    dh, dc, no_dz, weight_grads = native.lstm_backward(W, got[3], c0, dys, lengths if with_lengths else None,
                                                       0.3 * h0, 0.2 * c0, weight_grads_of=(xs_t, h0, got[2]),
                                                       keep_dz=False)
    assert no_dz is None
    assert_trees_close((dh, dc), expected_backward[:2], atol=1e-5)
    assert_trees_close(weight_grads, expected_weight_grads, atol=1e-5)
    # The input gradient inside the loop too (the stage after each δz_t), with and without the weight gradients.
    assert float(jnp.max(jnp.abs(expected_dxs))) > 0.1
    *rest, dxs = native.lstm_backward(W, got[3], c0, dys, lengths if with_lengths else None, 0.3 * h0, 0.2 * c0,
                                      weight_grads_of=(xs_t, h0, got[2]), keep_dz=False, input_kernel=U)
    assert dxs.shape == xs_t.shape
    assert_trees_close((tuple(rest[:2]), rest[3], dxs), (expected_backward[:2], expected_weight_grads, expected_dxs),
                       atol=1e-5)
    *backward_again, dxs = native.lstm_backward(W, got[3], c0, dys, lengths if with_lengths else None, 0.3 * h0,
                                                0.2 * c0, input_kernel=U)
    assert_trees_close((tuple(backward_again), dxs), (expected_backward, expected_dxs), atol=1e-5)
    no_tape = native.lstm_forward(xs_t, U, W, b, h0, c0, None, hoisted=hoisted, save=False)
    assert no_tape[3] is None


def test_kernel_gates_match_xla_over_the_whole_range_of_preactivations(key):
    """The kernel's own sigmoid and tanh (lstm_cpu.cc) against XLA's, pre-activations spread over ±150: the
    exp clamps, the rational tanh's clamp at ±9, and its result kept inside [-1, 1]."""
    params, xs_t, h0, c0, _, _ = _problem(key, 16, 4, 8, 32)
    # Spread by the bias alone: a large x U would make z's rounding, which differs with the order of the sums,
    # larger than the tolerance where z lands near 0.
    bias = jax.random.permutation(key, jnp.linspace(-150.0, 150.0, params["b"].size))
    params = {**params, "b": bias}
    h, c, ys, gates, cs = _xla_forward(params["U"], params["W"], params["b"], h0, c0, xs_t, None)
    got = native.lstm_forward(xs_t, params["U"], params["W"], params["b"], h0, c0, None, hoisted=False, save=True)
    kernel_gates = got[3].unblocked()[0][..., :32]
    assert_trees_close(got[:3], (h, c, ys), atol=1e-6)
    assert_trees_close(kernel_gates, gates, atol=1e-6)
    sigmoids, tanh_gate = kernel_gates[jnp.array([0, 1, 3])], kernel_gates[2]
    assert float(jnp.min(sigmoids)) >= 0.0 and float(jnp.max(sigmoids)) <= 1.0
    assert float(jnp.max(jnp.abs(tanh_gate))) <= 1.0 and float(jnp.max(jnp.abs(got[2]))) <= 1.0


def test_backward_rejects_a_tape_in_another_layout(key):
    """A tape in the planar layout ([4, T, B, Hp] and [T, B, Hp]) is refused with a message, not misread."""
    params, xs_t, h0, c0, _, dys = _problem(key, 4, 3, 5, 32)
    tape = native.lstm_forward(xs_t, params["U"], params["W"], params["b"], h0, c0, None, hoisted=False,
                               save=True)[3]
    planar = native.Tape(*tape.unblocked())
    with pytest.raises(Exception, match="the tape must be gates"):
        jax.block_until_ready(native.lstm_backward(params["W"], planar, c0, dys, None, h0, c0))


def test_kernel_tanh_coefficients_are_those_of_the_fit():
    """lstm_cpu.cc's rational tanh is what scripts/fit_tanh.py fits (float32 rounding of the same numbers)."""
    spec = importlib.util.spec_from_file_location("fit_tanh", ROOT / "scripts" / "fit_tanh.py")
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    P, Q, relative_error = fit_tanh.fit()
    assert relative_error < 2e-8
    body = native.SOURCE.read_text().split("inline vf vtanh(vf x) {")[1].split("\n}")[0]
    numerator, denominator = body.split("vf q =")
    # Horner's order, highest power first; a literal's sign may stand apart as the operator before it.
    in_kernel = [[float(sign + digits) for sign, digits in re.findall(r"([-+]?)\s*(\d\.\d+e[-+]\d+)", part)]
                 for part in (numerator, denominator)]
    np.testing.assert_allclose(in_kernel[0], P[1:][::-1], rtol=1e-6)  # P[0] = 1 and Q[0] = 1 appear as `+ x`
    np.testing.assert_allclose(in_kernel[1], Q[1:][::-1], rtol=1e-6)  # and `+ 1.0f`
    assert abs(P[0] - 1) < 1e-7 and Q[0] == 1


def _grads(run, params, xs, carry, r):
    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)
        return jnp.sum(ys * r) + jnp.sum(jnp.sin(final.h)) + 2 * jnp.sum(jnp.sin(final.c))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, carry)


@pytest.mark.parametrize("checkpoint,reverse", [(None, False), (None, True), ("sqrt", True), (3, False)])
@pytest.mark.parametrize("kernel_weight_grads", [False, True])
def test_layer_gradients_through_kernel_match_autodiff(key, monkeypatch, checkpoint, reverse, kernel_weight_grads):
    monkeypatch.setattr(layers, "KERNEL_WEIGHT_GRADS_MIN_BATCH", 1 if kernel_weight_grads else 10 ** 9)
    batch, steps, in_size, hidden = 5, 11, 6, 20
    k = jax.random.split(key, 5)
    params = cells.lstm.init(k[0], in_size, hidden)
    xs = jax.random.normal(k[1], (batch, steps, in_size))
    carry = LSTMState(jax.random.normal(k[2], (batch, hidden)), jax.random.normal(k[3], (batch, hidden)))
    r = jax.random.normal(k[4], (batch, steps, hidden))
    lengths = jnp.array([11, 4, 0, 1, 9])

    def fused(p, x, c):
        return layers.lstm(p, x, carry=c, lengths=lengths, reverse=reverse, impl="native", checkpoint=checkpoint)

    assert "jaxseq_lstm_forward" in _lowered_text(jax.grad(lambda p: fused(p, xs, carry)[1].sum()), params)
    assert "jaxseq_lstm_backward" in _lowered_text(jax.grad(lambda p: fused(p, xs, carry)[1].sum()), params)
    expected = _grads(lambda p, x, c: unroll(cells.lstm.apply, p, c, x, lengths=lengths, reverse=reverse),
                      params, xs, carry, r)
    assert_trees_close(_grads(fused, params, xs, carry, r), expected)
    # The parameters alone: no input gradient, so with the weight gradients in the kernel it keeps no δz.
    def params_loss(run):
        def loss(p):
            final, ys = run(p, xs, carry)
            return jnp.sum(ys * r) + jnp.sum(jnp.sin(final.h)) + 2 * jnp.sum(jnp.sin(final.c))

        return jax.grad(loss)

    if kernel_weight_grads and checkpoint is None:
        assert "keep_dz = 0" in _lowered_text(params_loss(fused), params)
    assert_trees_close(jax.jit(params_loss(fused))(params), expected[1][0])


def test_bidirectional_vmap_and_shard_map_through_kernel(key):
    batch, steps, in_size, hidden = 4, 6, 3, 16
    k = jax.random.split(key, 4)
    params = {"forward": cells.lstm.init(k[0], in_size, hidden), "backward": cells.lstm.init(k[1], in_size, hidden)}
    xs = jax.random.normal(k[2], (batch, steps, in_size))
    lengths = jnp.array([6, 2, 5, 1])

    def loss(impl):
        return lambda p, x: jnp.sum(jnp.sin(layers.bidirectional(cells.lstm, p, x, lengths=lengths, impl=impl)[1]))

    expected = jax.grad(loss("scan"), argnums=(0, 1))(params, xs)
    assert "jaxseq_lstm_backward" in _lowered_text(jax.grad(loss("native")), params, xs)
    assert_trees_close(jax.jit(jax.grad(loss("native"), argnums=(0, 1)))(params, xs), expected)
    # vmap over a stack of two weight sets: the custom call runs once per set.
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    per_set = jax.jit(jax.vmap(jax.grad(loss("native")), in_axes=(0, None)))(stacked, xs)
    assert_trees_close(jax.tree.map(lambda a: a[1], per_set),
                       jax.grad(loss("scan"))(jax.tree.map(lambda a: 2 * a, params), xs))
    # Inside shard_map on a one-device mesh: the results vary like the sharded inputs.
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    spec = PartitionSpec("batch")
    sharded = jax.shard_map(lambda p, x: jax.grad(lambda p: jnp.sum(jnp.sin(layers.lstm(
        p, x, impl="native")[1])))(p), mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=PartitionSpec())
    assert_trees_close(jax.jit(sharded)(params["forward"], xs),
                       jax.grad(lambda p: jnp.sum(jnp.sin(layers.lstm(p, xs, impl="scan")[1])))(params["forward"]))


def test_layer_uses_kernel_only_where_it_is_faster(key):
    """impl="auto" picks the kernel by shape; "native" always takes it, "fused" never (a static choice)."""
    def text(batch, hidden, dtype=jnp.float32, training=False, impl="auto"):
        params = jax.tree.map(lambda a: a.astype(dtype), cells.lstm.init(key, 64, hidden))

        def run(p):
            return layers.lstm(p, jnp.zeros((batch, 10, 64), dtype), impl=impl)[1]

        return _lowered_text(jax.grad(lambda p: run(p).sum()) if training else run, params)

    assert "jaxseq_lstm_forward" in text(32, 128)
    assert "jaxseq_lstm_forward" in text(1, 256)  # forward only: two threads' work per step
    if native.usable_cpus() > 1:
        assert "jaxseq_lstm_forward" in text(4, 256)
    assert "jaxseq_lstm_forward" not in text(1, 128)  # ... one thread's: XLA's loop is faster
    assert "jaxseq_lstm_backward" in text(1, 128, training=True)  # training: the kernel at every shape
    assert "jaxseq_lstm_forward" in text(1, 128, impl="native")  # at every shape when asked for
    assert "jaxseq_lstm_forward" not in text(32, 128, impl="fused")
    assert "jaxseq_lstm_backward" not in text(32, 128, training=True, impl="fused")
    assert "jaxseq_lstm_forward" not in text(32, 128, jnp.bfloat16)


def test_two_threads_give_the_same_values_call_after_call(key):
    # Batch 24, hidden 64: 8·B·(I+H)·H = 1.7M FLOPs per step, so the kernel runs on every CPU (when there are
    # several); a block claimed twice or skipped, or a stage started early, would change the values. With the
    # weight and input gradients, the backward's stages have 2 hidden blocks and 2 lagging input blocks (I = 72),
    # which may still read δz_{t+1} while the next stage runs: a ring of two δz slots, not three, failed here
    # in two of three runs.
    params, xs_t, h0, c0, lengths, dys = _problem(key, 24, 40, 72, 64)
    U, W, b = params["U"], params["W"], params["b"]
    expected = _xla_forward(U, W, b, h0, c0, xs_t, lengths)
    expected_backward, expected_weight_grads, expected_dxs = _xla_backward(U, W, b, h0, c0, xs_t, lengths, dys, h0,
                                                                           c0)
    forward = jax.jit(lambda: native.lstm_forward(xs_t, U, W, b, h0, c0, lengths, hoisted=False, save=True))
    backward = jax.jit(lambda tape: native.lstm_backward(W, tape, c0, dys, lengths, h0, c0))
    backward_all = jax.jit(lambda tape, ys: native.lstm_backward(W, tape, c0, dys, lengths, h0, c0,
                                                                 weight_grads_of=(xs_t, h0, ys), keep_dz=False,
                                                                 input_kernel=U))
    for _ in range(50):  # a race shows in a few per cent of calls (the lagging blocks' counts, fixed in the kernel)
        got = forward()
        assert_trees_close(got[:3], expected[:3], atol=1e-6)
        assert_trees_close(backward(got[3]), expected_backward, atol=1e-5)
        dh, dc, _, weight_grads, dxs = backward_all(got[3], got[2])
        assert_trees_close(((dh, dc), weight_grads, dxs), (expected_backward[:2], expected_weight_grads, expected_dxs),
                           atol=1e-5)


def test_vector_width_matches_the_cpu():
    # A build whose vectors were wider than the CPU's registers took 2.0-7.5x the time of XLA's loops (16-float
    # vectors on an AVX2 CPU: the register tiles spilled), so the width must follow the CPU the kernel is built on.
    # (JAXSEQ_NATIVE_ISA=avx2|sse narrows it on purpose: build.expected_lanes reads the setting and the CPU.)
    assert native.vector_lanes() == build.expected_lanes()
    assert native.LANES % native.vector_lanes() == 0


def test_without_a_compiler_the_layer_keeps_xla_loops(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("JAXSEQ_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="jaxseq.native"):
            assert not native.available()
        assert "no C++ compiler" in caplog.text and "no-such-compiler" in caplog.text
    finally:
        monkeypatch.undo()
        native.reset()
    assert native.available()


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("JAXSEQ_NATIVE", "0")
    assert not native.available()
