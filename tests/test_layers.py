"""Layer functions (jaxseq.layers): every implementation equals jaxseq.unroll, values and gradients."""
import functools
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

from jaxseq import bptt, cells, layers, unroll
from jaxseq.cells import LSTMState
from jaxseq.layers import init_bidirectional

B, T, I, H = 3, 7, 5, 4
LENGTHS = np.array([7, 3, 0])


def _inputs(key, cell=cells.lstm, batch=(B,)):
    k_p, k_x, k_h, k_c, k_r = jax.random.split(key, 5)
    params = cell.init(k_p, I, H)
    xs = jax.random.normal(k_x, (*batch, T, I))
    carry = cell.init_carry(batch, H)
    if isinstance(carry, LSTMState):
        carry = LSTMState(jax.random.normal(k_h, carry.h.shape), jax.random.normal(k_c, carry.c.shape))
    else:
        carry = jax.random.normal(k_h, carry.shape)
    r = jax.random.normal(k_r, (*batch, T, H))
    return params, xs, carry, r


def _value_and_grads(run, params, xs, carry, r):
    """A loss that touches every output (all steps and the final carry) and its gradients for all inputs."""

    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)
        weights = jnp.arange(1, len(jax.tree_util.tree_leaves(final)) + 1, dtype=ys.dtype)
        return jnp.sum(ys * r) + sum(w * jnp.sum(jnp.sin(leaf))
                                     for w, leaf in zip(weights, jax.tree_util.tree_leaves(final)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, carry)


def _reference(cell, lengths, reverse):
    return lambda p, xs, c: unroll(cell.apply, p, c, xs, lengths=lengths, reverse=reverse)


# Every implementation with lengths and padding-aware reverse (the hardest case); the plain forward and
# reverse directions for the two fused variants that models use most. "native" runs the kernel where it is
# available and falls back to "fused" elsewhere, so it is checked on every machine.
CASES = [(impl, checkpoint, form, True, True) for impl, checkpoint, form in [
    ("scan", None, None), ("scan", 3, None), ("fused", None, "step"), ("fused", None, "hoist"),
    ("fused", None, "concat"), ("fused", 3, None), ("fused", "sqrt", "hoist"), ("native", None, None),
    ("native", 3, "hoist"), ("auto", None, None), ("cudnn", None, None)]]
CASES += [("fused", None, None, False, False), ("fused", 3, "step", False, True)]
_EXPECTED = {}


@pytest.mark.parametrize("impl,checkpoint,form,with_lengths,reverse", CASES)
def test_lstm_matches_unroll_values_and_gradients(key, impl, checkpoint, form, with_lengths, reverse):
    params, xs, carry, r = _inputs(key)
    lengths = jnp.asarray(LENGTHS) if with_lengths else None
    if (with_lengths, reverse) not in _EXPECTED:  # autodiff through the scan: computed once per case
        _EXPECTED[with_lengths, reverse] = _value_and_grads(_reference(cells.lstm, lengths, reverse), params,
                                                            xs, carry, r)
    actual = _value_and_grads(
        lambda p, x, c: layers.lstm(p, x, carry=c, lengths=lengths, reverse=reverse, impl=impl,
                                    checkpoint=checkpoint, form=form), params, xs, carry, r)
    assert_trees_close(actual, _EXPECTED[with_lengths, reverse])


@pytest.mark.parametrize("impl,checkpoint", [("fused", None), ("fused", 3), ("scan", None)])
def test_unroll_does_not_change_results(key, impl, checkpoint):
    """``unroll`` steps per loop iteration (3 does not divide T = 7): same values and gradients."""
    params, xs, carry, r = _inputs(key)
    lengths = jnp.asarray(LENGTHS)
    run = lambda k: (lambda p, x, c: layers.lstm(p, x, carry=c, lengths=lengths, reverse=True, impl=impl,
                                                 checkpoint=checkpoint, unroll=k))
    assert_trees_close(_value_and_grads(run(3), params, xs, carry, r), _value_and_grads(run(1), params, xs, carry, r))


def test_unroll_default_follows_backend(key, monkeypatch):
    """``unroll=None`` takes ``DEFAULT_UNROLL[backend]`` (16 on GPU), visible as the scans' ``unroll``."""
    params, xs, _, _ = _inputs(key)

    def scan_unrolls(**kwargs):
        jaxpr = jax.make_jaxpr(lambda p, x: layers.lstm(p, x, **kwargs))(params, xs)
        return {eqn.params["unroll"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"}

    monkeypatch.setitem(layers.DEFAULT_UNROLL, jax.default_backend(), 5)
    assert scan_unrolls(impl="scan") == {5}
    assert scan_unrolls(impl="scan", unroll=2) == {2}
    monkeypatch.delitem(layers.DEFAULT_UNROLL, jax.default_backend())
    assert scan_unrolls(impl="scan") == {1}


def test_lstm_outputs_and_default_carry(key):
    params, xs, _, _ = _inputs(key)
    lengths = jnp.asarray(LENGTHS)
    expected = unroll(cells.lstm.apply, params, cells.lstm.init_carry((B,), H), xs, lengths=lengths)
    for impl in ("scan", "fused", "auto"):
        final, ys = layers.lstm(params, xs, lengths=lengths, impl=impl)
        assert isinstance(final, LSTMState)
        assert ys.shape == (B, T, H)
        assert_trees_close((final, ys), expected)
    # The length-0 sequence returns its initial (zero) carry and zero outputs.
    np.testing.assert_array_equal(np.asarray(final.h[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(ys[2]), 0.0)


def test_lstm_any_leading_batch_dims(key):
    params, xs, carry, r = _inputs(key, batch=(2, 3))
    run = lambda p, x, c: layers.lstm(p, x, carry=c, impl="fused", checkpoint=4)
    assert_trees_close(_value_and_grads(run, params, xs, carry, r),
                       _value_and_grads(_reference(cells.lstm, None, False), params, xs, carry, r))
    unbatched = layers.lstm(params, xs[0, 0], impl="fused")
    assert unbatched[1].shape == (T, H)
    assert_trees_close(unbatched, unroll(cells.lstm.apply, params, cells.lstm.init_carry((), H), xs[0, 0]))


def test_fused_lstm_gradients_under_vmap(key):
    params, xs, carry, r = _inputs(key)
    grad = jax.grad(lambda p, x: jnp.sum(layers.lstm(p, x, impl="fused")[1] * r[0]))
    ref = jax.grad(lambda p, x: jnp.sum(unroll(cells.lstm.apply, p, cells.lstm.init_carry((), H), x)[1] * r[0]))
    assert_trees_close(jax.vmap(grad, in_axes=(None, 0))(params, xs), jax.vmap(ref, in_axes=(None, 0))(params, xs))


@pytest.mark.parametrize("layer,impl,checkpoint", [("lstm", "fused", None), ("lstm", "fused", 3),
                                                   ("lstm", "scan", None), ("gru", "scan", 3)])
def test_layers_inside_shard_map(key, layer, impl, checkpoint):
    """Batch-sharded inside ``shard_map`` with the default (zero, replicated) carry: same values and gradients.

    The zero carry is invariant across the mesh while the sharded inputs vary; scan and the custom VJP reject
    that mismatch unless the layer casts the carry and sums the replicated weights' cotangents. The type check
    runs on a one-device mesh too, so this needs no extra devices.
    """
    cell = {"lstm": cells.lstm, "gru": cells.gru}[layer]
    params, xs, _, r = _inputs(key, cell)
    lengths = jnp.asarray(LENGTHS)
    run = functools.partial(getattr(layers, layer), lengths=lengths, reverse=True, impl=impl, checkpoint=checkpoint)

    def loss(p, x, lengths, r):
        final, ys = run(p, x, lengths=lengths)
        return jnp.sum(ys * r) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))

    def per_shard(p, x, n, r):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(p, x, n, r)
        return jax.lax.psum(value, "batch"), grads  # the parameter gradient comes out summed already

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    spec = jax.sharding.PartitionSpec
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec(), spec("batch"), spec("batch"), spec("batch")),
                            out_specs=(spec(), (spec(), spec("batch"))))
    assert_trees_close(jax.jit(sharded)(params, xs, lengths, r),
                       jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs, lengths, r))


BATCH_SHARDED = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxseq import cells, layers
    jax.config.update("jax_num_cpu_devices", 2)
    B, T, I, H = 4, 6, 3, 5
    params = cells.lstm.init(jax.random.PRNGKey(0), I, H)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
    r = jax.random.normal(jax.random.PRNGKey(2), (B, T, H))
    lengths = jnp.array([6, 2, 0, 5])
    def grads(impl, checkpoint=None):
        loss = lambda p, x, n: jnp.sum(layers.lstm(p, x, lengths=n, impl=impl, checkpoint=checkpoint)[1] * r)
        return jax.jit(jax.grad(loss))
    mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
    shard = NamedSharding(mesh, PartitionSpec("batch"))
    expected = jax.tree.leaves(grads("scan")(params, xs, lengths))
    error = lambda actual: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(actual), expected))
    out = {}
    for checkpoint in (None, 3):
        step = grads("fused", checkpoint)
        args = (params, jax.device_put(xs, shard), jax.device_put(lengths, shard))
        hlo = step.lower(*args).compile().as_text()
        # The same inside shard_map: each device's half, the replicated weights' gradients summed over both.
        spec = PartitionSpec("batch")
        per_shard = jax.shard_map(lambda p, x, n, r: jax.grad(lambda p: jnp.sum(
            layers.lstm(p, x, lengths=n, impl="fused", checkpoint=checkpoint)[1] * r))(p),
            mesh=mesh, in_specs=(PartitionSpec(), spec, spec, spec), out_specs=PartitionSpec())
        out[str(checkpoint)] = {"gathers": len(re.findall(r"all-gather", hlo)), "error": error(step(*args)),
                                "shard_map error": error(jax.jit(per_shard)(params, xs, lengths, r))}
    print(json.dumps(out))
""")


def test_fused_lstm_batch_sharded_over_two_devices():
    """Data parallel over two devices, by GSPMD (as jaxseq.training shards a batch) and by shard_map: right
    gradients, and no activation gathers.

    Merging a sharded batch into the weight-gradient GEMM's rows once made every device gather all the
    activations and repeat the GEMM.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", BATCH_SHARDED], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for checkpoint, result in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert result["gathers"] == 0, (checkpoint, result)
        assert result["error"] < 1e-5 and result["shard_map error"] < 1e-5, (checkpoint, result)


@pytest.mark.parametrize("impl,checkpoint", [("fused", None), ("fused", "sqrt"), ("auto", None)])
def test_bidirectional_lstm_matches_scan_bidirectional(key, impl, checkpoint):
    params = init_bidirectional(cells.lstm, key, I, H)
    _, xs, _, _ = _inputs(key)
    r = jax.random.normal(jax.random.PRNGKey(5), (B, T, 2 * H))
    lengths = jnp.asarray(LENGTHS)

    def loss(run):
        def f(p, x):
            (c_f, c_b), ys = run(p, x)
            return jnp.sum(ys * r) + jnp.sum(jnp.cos(c_f.c)) + jnp.sum(jnp.sin(c_b.h))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, xs)

    expected = loss(lambda p, x: layers.bidirectional(cells.lstm, p, x, lengths=lengths, impl="scan"))
    actual = loss(lambda p, x: layers.bidirectional(cells.lstm, p, x, lengths=lengths, impl=impl,
                                                    checkpoint=checkpoint))
    assert_trees_close(actual, expected)


@pytest.mark.parametrize("name,checkpoint", [("gru", None), ("rnn", 3)])
def test_gru_and_rnn_layers_match_unroll(key, name, checkpoint):
    cell = {"gru": cells.gru, "rnn": cells.rnn}[name]
    layer = getattr(layers, name)
    params, xs, carry, r = _inputs(key, cell)
    lengths = jnp.asarray(LENGTHS)
    expected = _value_and_grads(_reference(cell, lengths, True), params, xs, carry, r)
    actual = _value_and_grads(lambda p, x, c: layer(p, x, carry=c, lengths=lengths, reverse=True,
                                                    checkpoint=checkpoint), params, xs, carry, r)
    assert_trees_close(actual, expected)


def test_relu_rnn_layer(key):
    params, xs, carry, _ = _inputs(key, cells.relu_rnn)
    assert_trees_close(layers.rnn(params, xs, carry=carry, activation="relu"),
                       unroll(cells.relu_rnn.apply, params, carry, xs))


def test_fused_gradients_match_hand_bptt(key):
    params, xs, carry, r = _inputs(key)
    dcarry = LSTMState(jnp.cos(carry.h), jnp.sin(carry.c))  # any cotangent for the final carry
    grads = jax.grad(lambda p, x, c: _inner(layers.lstm(p, x, carry=c, impl="fused"), r, dcarry),
                     argnums=(0, 1, 2))(params, xs, carry)
    expected = bptt.lstm_grads(params, xs, r, carry0=carry, dcarry=dcarry)
    assert_trees_close(grads, (expected.params, expected.xs, expected.carry0))


def _inner(outputs, r, dcarry):
    final, ys = outputs
    return jnp.sum(ys * r) + jnp.sum(final.h * dcarry.h) + jnp.sum(final.c * dcarry.c)


def test_cudnn_weight_layout_matches_jax_experimental_rnn_reference(key):
    """The packing for cuDNN, checked on any backend through jax.experimental.rnn's own lax.scan reference."""
    from jax.experimental import rnn as jrnn

    params, xs, carry, _ = _inputs(key)
    lengths = jnp.asarray([7, 3, 1], jnp.int32)  # the reference, like cuDNN, needs lengths >= 1
    W_ih, W_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(layers.to_cudnn_weights(params), I, H, 1, False)
    ys, h, c = jrnn.lstm_ref(xs, carry.h[None], carry.c[None], W_ih, W_hh, b_ih, b_hh, lengths, I, H, 1, 0.0,
                             False)
    final, expected = unroll(cells.lstm.apply, params, carry, xs, lengths=lengths)
    assert_trees_close((LSTMState(h[0], c[0]), ys), (final, expected))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN path needs a CUDA GPU")
def test_cudnn_path_on_gpu_matches_unroll(key):
    params, xs, carry, r = _inputs(key)
    lengths = jnp.asarray(LENGTHS)
    expected = _value_and_grads(_reference(cells.lstm, lengths, True), params, xs, carry, r)
    actual = _value_and_grads(lambda p, x, c: layers.lstm(p, x, carry=c, lengths=lengths, reverse=True,
                                                          impl="cudnn"), params, xs, carry, r)
    assert_trees_close(actual, expected, rtol=1e-4, atol=1e-5)  # cuDNN sums in its own order


def test_checkpoint_reduces_compiled_memory():
    """The segment policy must shrink the backward pass's temporaries (compiled memory analysis)."""
    batch, steps, size = 2, 144, 16
    params = cells.lstm.init(jax.random.PRNGKey(0), size, size)
    xs = jnp.zeros((batch, steps, size))

    def temp_bytes(**kwargs):
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layers.lstm(p, x, **kwargs)[1])))
        analysis = grad.lower(params, xs).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    full, fused, segmented = (temp_bytes(impl="scan"), temp_bytes(impl="fused"),
                              temp_bytes(impl="fused", checkpoint="sqrt"))
    assert segmented * 3 < full, (segmented, full)
    assert segmented * 2 < fused, (segmented, fused)


def test_bad_arguments_raise_value_errors(key):
    params, xs, _, _ = _inputs(key)
    with pytest.raises(ValueError, match="impl"):
        layers.lstm(params, xs, impl="cuda")
    with pytest.raises(ValueError, match="checkpoint"):
        layers.lstm(params, xs, checkpoint=0)
    with pytest.raises(ValueError, match="form"):
        layers.lstm(params, xs, form="fast")
    with pytest.raises(ValueError, match="unroll"):
        layers.lstm(params, xs, unroll=0)
    with pytest.raises(ValueError, match="impl='fused' needs a cell that declares a fused layer"):
        layers.gru(cells.gru.init(key, I, H), xs, impl="fused")
    with pytest.raises(ValueError, match="features"):
        layers.lstm(params, xs[..., :2])
    with pytest.raises(ValueError, match="lengths"):
        layers.lstm(params, xs, lengths=jnp.asarray([1, 2]))
    with pytest.raises(ValueError, match=r"\[batch, time, features\]"):
        layers.lstm(params, xs[0, 0, :])


@pytest.mark.parametrize("impl", ["scan", "fused"])
def test_lstm_carry_structure_size_and_dtype_are_checked(key, impl):
    params, xs, carry, _ = _inputs(key)
    with pytest.raises(ValueError, match=r"carry\.h \(carry leaf 0\) has shape \(3, 5\) .* W \(4, 16\) has hidden "
                                         r"size 4; expected shape \(3, 4\)"):
        layers.lstm(params, xs, carry=cells.lstm.init_carry((B,), H + 1), impl=impl)
    with pytest.raises(ValueError, match=r"carry\.c \(carry leaf 1\) has .* dtype bfloat16 but the cell's params "
                                         r"have dtype float32"):
        layers.lstm(params, xs, carry=LSTMState(carry.h, carry.c.astype(jnp.bfloat16)), impl=impl)
    with pytest.raises(ValueError, match=r"carry must be an LSTMState\(h, c\).* got an array of shape \(3, 4\)"):
        layers.lstm(params, xs, carry=carry.h, impl=impl)
    with pytest.raises(ValueError, match=r"carry must be an LSTMState\(h, c\).* got tuple of 3"):
        layers.lstm(params, xs, carry=(carry.h, carry.c, carry.c), impl=impl)
    # A plain (h, c) pair is still taken as an LSTMState.
    assert_trees_close(layers.lstm(params, xs, carry=tuple(carry), impl=impl), layers.lstm(params, xs, carry=carry))


@pytest.mark.parametrize("layer,cell", [(layers.gru, cells.gru), (layers.rnn, cells.rnn)])
def test_gru_and_rnn_carry_is_checked(key, layer, cell):
    params, xs, _, _ = _inputs(key, cell)
    with pytest.raises(ValueError, match=r"^carry has shape \(3, 8\) .* hidden size 4; expected shape \(3, 4\)"):
        layer(params, xs, carry=jnp.zeros((B, 2 * H)))
    with pytest.raises(ValueError, match=r"^carry has .* dtype bfloat16 .* expected dtype float32"):
        layer(params, xs, carry=jnp.zeros((B, H), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"carry must be one array h \[\*batch, hidden\] .* got LSTMState"):
        layer(params, xs, carry=cells.lstm.init_carry((B,), H))


def test_params_of_the_wrong_cell_or_shape_name_the_key(key):
    lstm_params, xs, _, _ = _inputs(key)
    gru_params = cells.gru.init(key, I, H)
    lstm_layout = r'an LSTM expects \{"U": \[I, 4H\], "W": \[H, 4H\], "b": \[4H\]\}'
    cases = [
        (layers.lstm, gru_params, r'params\["U"\] has shape \(5, 12\) but ' + lstm_layout
         + r'.*U should have shape \(5, 16\) \(these look like GRU params\)'),
        (layers.gru, lstm_params, r"params is missing \['b_h'\]: a GRU expects .*\(these look like LSTM params\)"),
        (layers.rnn, lstm_params, r'params\["U"\] has shape \(5, 16\) but an RNN expects \{"U": \[I, H\]'),
        (layers.lstm, {"U": lstm_params["U"], "b": lstm_params["b"]}, r"params is missing \['W'\]: " + lstm_layout),
        (layers.lstm, {**lstm_params, "b": jnp.zeros(7)},
         r'params\["b"\] has shape \(7,\) .*b should have shape \(16,\)'),
        (layers.lstm, {**lstm_params, "W": jnp.zeros((H, 15))}, r'params\["W"\] has shape \(4, 15\)'),
        (layers.lstm, [lstm_params["U"]], r"params must be a dict of arrays: " + lstm_layout + ".*; got list"),
    ]
    for layer, params, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            layer(params, xs)
    for impl in ("scan", "auto"):
        with pytest.raises(ValueError, match=r'^params must be \{"forward": cell_params, "backward": cell_params\}'):
            layers.bidirectional(cells.lstm, lstm_params, xs, impl=impl)
    with pytest.raises(ValueError, match=r"carry of a bidirectional layer must be a pair"):
        layers.bidirectional(cells.gru, init_bidirectional(cells.gru, key, I, H), xs, carry=jnp.zeros((B, H)))


def test_lengths_may_be_a_list(key):
    params, xs, carry, _ = _inputs(key)
    for kwargs in (dict(impl="fused"), dict(impl="scan", checkpoint=3), dict(impl="fused", checkpoint=3)):
        assert_trees_close(layers.lstm(params, xs, carry=carry, lengths=LENGTHS.tolist(), reverse=True, **kwargs),
                           layers.lstm(params, xs, carry=carry, lengths=jnp.asarray(LENGTHS), reverse=True, **kwargs))
    gru_params = cells.gru.init(key, I, H)
    assert_trees_close(layers.gru(gru_params, xs, lengths=list(LENGTHS)),
                       layers.gru(gru_params, xs, lengths=jnp.asarray(LENGTHS)))


def test_layer_entries_agree_for_every_cell(key):
    """``layer`` is the one entry: the aliases ``lstm``/``gru``/``rnn`` and ``time_major`` give its results."""
    for cell, alias in [(cells.lstm, layers.lstm), (cells.gru, layers.gru), (cells.rnn, layers.rnn)]:
        params, xs, carry, _ = _inputs(key, cell)
        expected = layer_out = layers.layer(cell, params, xs, carry=carry, lengths=LENGTHS, reverse=True)
        assert_trees_close(alias(params, xs, carry=carry, lengths=LENGTHS, reverse=True), expected)
        final, ys = layers.layer(cell, params, jnp.swapaxes(xs, 0, 1), carry=carry, lengths=LENGTHS, reverse=True,
                                 time_major=True)
        assert_trees_close((final, jnp.swapaxes(ys, 0, 1)), layer_out)


@pytest.mark.parametrize("kernel_switch", ["0", "1"])
def test_lstm_runs_where_the_os_has_no_sched_getaffinity(key, monkeypatch, kernel_switch):
    """macOS and Windows have no ``os.sched_getaffinity``. The shape rule once called it before asking whether the
    kernel was available at all, so a float32 forward with ``8·B·depth·H`` >= 400,000 raised AttributeError
    there, even with JAXSEQ_NATIVE=0."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setenv("JAXSEQ_NATIVE", kernel_switch)
    params = cells.lstm.init(key, 128, 256)
    xs = jax.random.normal(key, (1, 100, 128))  # batch 1: hoisted, depth H, 8·1·256·256 = 524,288
    expected = layers.lstm(params, xs, impl="scan")
    assert_trees_close(jax.jit(layers.lstm)(params, xs), expected, atol=1e-5)


def test_native_falls_back_to_fused_with_a_warning(key, monkeypatch, caplog):
    """``impl="native"`` where the kernel cannot run is ``"fused"`` plus a log line, never an error."""
    params, xs, carry, _ = _inputs(key)
    half = jax.tree.map(lambda a: a.astype(jnp.float16), (params, xs, carry))
    with caplog.at_level(logging.WARNING, logger="jaxseq.layers"):
        got = layers.lstm(*half[:2], carry=half[2], impl="native")
    assert "impl='native' falls back to 'fused'" in caplog.text and "float32 only, got float16" in caplog.text
    assert_trees_close(got, layers.lstm(*half[:2], carry=half[2], impl="fused"))
    monkeypatch.setenv("JAXSEQ_NATIVE", "0")
    text = jax.jit(lambda p, x: layers.lstm(p, x, impl="native")[1]).lower(params, xs).as_text()
    assert "jaxseq_lstm" not in text
    assert_trees_close(layers.lstm(params, xs, impl="native"), layers.lstm(params, xs, impl="fused"))
