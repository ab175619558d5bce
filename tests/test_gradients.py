"""jaxseq.gradients against jax.grad one step at a time, exact linear theory, the tanh bound, and the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import cells, cli, gradients
from jaxseq.data import synthetic_tasks
from helpers import assert_trees_close


def _loss(ys, final):
    # Uses every output and the final carry, so both paths into s_t are exercised.
    return jnp.sum(jnp.sin(ys) * jnp.arange(1, ys.shape[-1] + 1)) + jnp.sum(cells.hidden_state(final) ** 2)


def _one_at_a_time(cell, params, carry, xs, t, lengths=None):
    """Oracle: ∂L/∂s_t by jax.grad of a hand-stepped Python loop with a perturbation added at step t only."""
    return _one_at_a_time_jit(cell.apply, params, carry, xs, jnp.asarray(t), lengths)


@jax.jit(static_argnums=0)
def _one_at_a_time_jit(apply, params, carry, xs, t, lengths):
    steps = xs.shape[-2]

    def loss(delta):
        c, ys = carry, []
        for j in range(steps):
            new, _ = apply(params, c, xs[..., j, :])
            # t is traced (one compile for every t): the perturbation is switched on at step t only.
            new = jax.tree_util.tree_map(lambda n, d: n + jnp.where(j == t, d, 0), new, delta)
            if lengths is not None:
                valid = (j < lengths)[..., None]
                new = jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, c)
            y = cells.hidden_state(new)
            ys.append(y if lengths is None else jnp.where((j < lengths)[..., None], y, 0))
            c = new
        return _loss(jnp.stack(ys, axis=-2), c)

    return jax.grad(loss)(jax.tree_util.tree_map(jnp.zeros_like, carry))


@pytest.mark.parametrize("name", ["rnn", "lstm"])  # GRU's carry is shaped like the RNN's
def test_carry_grads_match_one_at_a_time(name, key):
    cell = gradients.make_cell(name)
    B, T, D, H = 2, 4, 3, 4
    k_p, k_x = jax.random.split(key)
    params = gradients.random_params(k_p, name, D, H, sigma=1.3)
    xs = jax.random.normal(k_x, (B, T, D))
    carry = cell.init_carry((B,), H)
    loss, grads = gradients.carry_grads(cell.apply, params, carry, xs, _loss)
    for t in range(T):
        expected = _one_at_a_time(cell, params, carry, xs, t)
        actual = jax.tree_util.tree_map(lambda g: g[:, t], grads)
        assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6)
    norms = gradients.timestep_norms(grads)
    assert norms.shape == (B, T) and bool(jnp.all(norms > 0))


def test_carry_grads_with_lengths(key):
    cell = cells.lstm
    B, T, D, H = 3, 4, 2, 3
    k_p, k_x = jax.random.split(key)
    params = cell.init(k_p, D, H)
    xs = jax.random.normal(k_x, (B, T, D))
    lengths = jnp.array([4, 2, 0])
    carry = cell.init_carry((B,), H)
    _, grads = gradients.carry_grads(cell.apply, params, carry, xs, _loss, lengths=lengths)
    for t in range(T):
        expected = _one_at_a_time(cell, params, carry, xs, t, lengths)
        assert_trees_close(jax.tree_util.tree_map(lambda g: g[:, t], grads), expected, rtol=1e-5, atol=1e-6)
    # Padded steps cannot influence the loss.
    assert float(jnp.abs(grads.h[1, 2:]).max()) == 0.0 and float(jnp.abs(grads.c[2]).max()) == 0.0


def test_linear_rnn_equals_matrix_powers(key):
    """Experiment 1: measured ‖∂h_T/∂h_t‖₂ = ‖W^{T−t}‖₂ within relative error 1e-4 (float32)."""
    T, H = 25, 6
    k_p, k_x = jax.random.split(key)
    params = gradients.random_params(k_p, "linear", 2, H, sigma=1.1)
    xs = jax.random.normal(k_x, (T, 2))
    measured = gradients.jacobian_norms(gradients.linear_rnn.apply, params, jnp.zeros(H), xs, method="dense")
    exact = gradients.linear_power_norms(params["W"], T)
    np.testing.assert_allclose(np.asarray(measured.spectral), exact, rtol=1e-4)
    frob = [np.linalg.norm(np.linalg.matrix_power(np.asarray(params["W"], np.float64), T - t)) for t in range(T + 1)]
    np.testing.assert_allclose(np.asarray(measured.frobenius), frob, rtol=1e-4)


def test_symmetric_linear_slope_is_log_spectral_radius(key):
    T, H = 30, 8
    W = gradients.recurrent_matrix(key, H, 0.8, "symmetric")
    params = {"U": jnp.ones((1, H)), "W": W, "b": jnp.zeros(H)}
    norms = gradients.jacobian_norms(gradients.linear_rnn.apply, params, jnp.zeros(H), jnp.zeros((T, 1)))
    slope = np.polyfit(np.asarray(gradients.distances(T)), np.log(np.asarray(norms.spectral)), 1)[0]
    assert abs(slope - np.log(float(gradients.spectral_radius(W)))) < 1e-4


def test_rnn_below_bound_for_every_sigma_and_seed(activation="tanh"):
    """Experiment 2: ‖∂h_T/∂h_t‖₂ ≤ (γ σ_max)^{T−t} at every t; vmapped over seeds and σ_max in one call."""
    T, H, D = 20, 6, 2
    sigmas = jnp.array([0.5, 0.9, 1.0, 1.5, 3.0])
    seeds = jax.random.split(jax.random.PRNGKey(1), 8)
    cell = cells.make_rnn(activation)

    def one(key, sigma):
        k_p, k_x = jax.random.split(key)
        params = gradients.random_params(k_p, "rnn", D, H, sigma=sigma, activation=activation)
        xs = jax.random.normal(k_x, (T, D))
        measured = gradients.jacobian_norms(cell.apply, params, jnp.zeros(H), xs).spectral
        return measured, gradients.rnn_upper_bound(params["W"], T)

    measured, bound = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))(seeds, sigmas)
    assert measured.shape == (8, 5, T + 1)
    assert bool(jnp.all(measured <= bound * (1 + 1e-5)))
    # The bound is not vacuous: at distance 1 it is within the slack tanh' leaves.
    assert bool(jnp.all(measured[..., -2] > 0.05 * bound[..., -2]))


def test_power_iteration_matches_dense(key):
    T, H = 12, 5
    k_p, k_x, k_pow = jax.random.split(key, 3)
    params = cells.lstm.init(k_p, 2, H)
    xs = jax.random.normal(k_x, (T, 2))
    carry = cells.lstm.init_carry((), H)
    for field in ("c",):
        dense = gradients.jacobian_norms(cells.lstm.apply, params, carry, xs, wrt=field, of=field, method="dense")
        power = gradients.jacobian_norms(cells.lstm.apply, params, carry, xs, wrt=field, of=field, method="power",
                                         num_iters=300, num_probes=400, key=k_pow)
        # Power iteration approaches σ_max from below.
        assert bool(jnp.all(power.spectral <= dense.spectral * (1 + 1e-5)))
        np.testing.assert_allclose(power.spectral, dense.spectral, rtol=2e-3)
        # Hutchinson with 400 probes: a few percent.
        np.testing.assert_allclose(power.frobenius, dense.frobenius, rtol=0.15)


def test_lstm_cell_path_is_forget_gate_product_without_feedback(key):
    """With W = 0 the cell path has no feedback through h: ∂c_T/∂c_t = diag(Π f) exactly."""
    T, H = 15, 4
    k_p, k_x = jax.random.split(key)
    params = cells.make_lstm(forget_bias=1.0).init(k_p, 3, H)
    params["W"] = jnp.zeros_like(params["W"])
    xs = jax.random.normal(k_x, (T, 3))
    carry = cells.lstm.init_carry((), H)
    norms = gradients.jacobian_norms(cells.lstm.apply, params, carry, xs, wrt="c", of="c")
    products = gradients.forget_gate_products(gradients.lstm_forget_gates(params, carry, xs))
    np.testing.assert_allclose(norms.spectral, jnp.max(products, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(norms.frobenius, jnp.linalg.norm(products, axis=-1), rtol=1e-5)
    # With no input weights either, f = σ(1) exactly: the textbook 0.731^k.
    params["U"] = jnp.zeros_like(params["U"])
    f = gradients.lstm_forget_gates(params, carry, xs)
    np.testing.assert_allclose(gradients.forget_gate_products(f)[0], np.full(H, jax.nn.sigmoid(1.0) ** T), rtol=1e-5)


def test_field_errors(key):
    params = cells.rnn.init(key, 2, 3)
    with pytest.raises(ValueError, match="carry field 'c'"):
        gradients.jacobian_norms(cells.rnn.apply, params, jnp.zeros(3), jnp.zeros((4, 2)), wrt="c")
    with pytest.raises(ValueError, match="one sequence"):
        gradients.jacobian_norms(cells.rnn.apply, params, jnp.zeros((1, 3)), jnp.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="sigma_max must be > 0"):
        gradients.profile("rnn", steps=3, hidden=2, sigma=0.0)
    with pytest.raises(ValueError, match="sigma_max must be > 0 and finite, got inf"):
        gradients.profile("rnn", steps=3, hidden=2, sigma=float("inf"))
    with pytest.raises(ValueError, match="forget_bias must be a finite number, got nan"):
        gradients.profile("lstm", steps=3, hidden=2, sigma=0.9, forget_bias=float("nan"))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "--steps must be a positive"),
    (["--cell", "elman"], "invalid choice"),
    (["--sigma-max", "0"], "--sigma-max must be > 0"),
    (["--sigma-max", "-1.5"], "--sigma-max must be > 0"),
    (["--sigma-max", "inf"], "--sigma-max must be > 0 and finite, got inf"),
    (["--sigma-max", "nan"], "--sigma-max must be > 0 and finite, got nan"),
    (["--cell", "lstm", "--forget-bias", "nan"], "--forget-bias must be a finite number, got nan"),
    (["--cell", "lstm", "--forget-bias=-inf"], "--forget-bias must be a finite number, got -inf"),
])
def test_cli_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["gradnorms", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_out_that_is_a_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "afile"
    existing.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["gradnorms", "--steps", "3", "--hidden", "2", "--out", str(existing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {existing} exists and is not a folder" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cell, kind", [("linear", "exact"), ("lstm", "direct_path")])
def test_cli_writes_json_and_png(cell, kind, tmp_path, capsys):
    # float32 keeps the test from switching x64 on for the rest of the session.
    code = cli.main(["gradnorms", "--cell", cell, "--steps", "8", "--hidden", "4", "--sigma-max", "0.9",
                     "--seed", "3", "--float32", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "gradnorms.json").read_text())
    for field in ("cell", "timesteps", "measured", "theory", "theory_kind", "settings"):
        assert field in result
    assert result["cell"] == cell and result["theory_kind"] == kind
    assert result["timesteps"] == list(range(9)) and len(result["measured"]) == len(result["theory"]) == 9
    assert result["settings"]["steps"] == 8 and result["settings"]["hidden"] == 4
    if kind == "exact":
        np.testing.assert_allclose(result["measured"], result["theory"], rtol=1e-4)
    if kind == "upper_bound":
        assert all(m <= t * (1 + 1e-5) for m, t in zip(result["measured"], result["theory"]))
    assert (tmp_path / "gradnorms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "measured" in table and "theory" in table


def test_adding_problem(key):
    xs, targets = synthetic_tasks.adding_problem(key, 4000, 20)
    assert xs.shape == (4000, 20, 2) and targets.shape == (4000,)
    markers = np.asarray(xs[..., 1])
    assert (markers.sum(1) == 2).all() and (markers[:, :10].sum(1) == 1).all()
    np.testing.assert_allclose(targets, jnp.sum(xs[..., 0] * xs[..., 1], axis=1), rtol=1e-6)
    # Predicting the mean 1 gives MSE 1/6 (the baseline of experiment 4).
    assert abs(float(jnp.mean((targets - 1.0) ** 2)) - synthetic_tasks.ADDING_BASELINE_MSE) < 0.01
    with pytest.raises(ValueError, match="steps must be at least 2"):
        synthetic_tasks.adding_problem(key, 1, 1)


def test_copy_task(key):
    delay = 7
    xs, labels = synthetic_tasks.copy_task(key, 3, delay)
    tokens = np.argmax(np.asarray(xs), -1)
    assert xs.shape == (3, delay + 20, 10) and labels.shape == (3, delay + 20)
    np.testing.assert_array_equal(labels[:, -10:], tokens[:, :10])
    assert (tokens[:, 10:delay + 9] == 0).all() and (tokens[:, delay + 9] == 9).all()
    assert (np.asarray(labels[:, :-10]) == 0).all() and (tokens[:, :10] >= 1).all() and (tokens[:, :10] <= 8).all()
    assert synthetic_tasks.copy_baseline(100) == pytest.approx(0.173, abs=1e-3)  # Arjovsky et al. 2016


def test_copy_task_shorter_recall(key):
    # length=3 from 4 categories: 3 symbols, delay - 1 blanks, delimiter 5, 3 blanks.
    delay = 5
    xs, labels = synthetic_tasks.copy_task(key, 4, delay, length=3, symbols=4)
    tokens = np.argmax(np.asarray(xs), -1)
    assert xs.shape == (4, delay + 6, 6) and labels.shape == (4, delay + 6)
    np.testing.assert_array_equal(labels[:, -3:], tokens[:, :3])
    assert (tokens[:, 3:delay + 2] == 0).all() and (tokens[:, delay + 2] == 5).all()
    assert (tokens[:, :3] >= 1).all() and (tokens[:, :3] <= 4).all()
    assert synthetic_tasks.copy_baseline(delay, length=3, symbols=4) == pytest.approx(3 * np.log(4) / 11)
    with pytest.raises(ValueError, match="length and symbols"):
        synthetic_tasks.copy_task(key, 1, 5, length=0)


def test_timestep_norms_do_not_underflow_or_overflow():
    # float32: squaring 3e-30 or 3e25 directly would flush to 0 or overflow to inf.
    grads = {"h": jnp.array([[3e-30, 4e-30], [0.0, 0.0]]), "c": jnp.array([[0.0, 0.0], [3e25, 4e25]])}
    np.testing.assert_allclose(gradients.timestep_norms(grads), [5e-30, 5e25], rtol=1e-6)


def test_measurements_inside_shard_map(key):
    """``carry_grads`` and ``jacobian_norms`` (dense and power, vmapped over the batch) run batch-sharded inside
    ``shard_map`` (a one-device mesh checks the types) and give the same numbers as outside it."""
    B, T, D, H = 2, 6, 3, 4
    k_p, k_x, k_pow = jax.random.split(key, 3)
    params = cells.lstm.init(k_p, D, H)
    xs = jax.random.normal(k_x, (B, T, D))
    carry = cells.lstm.init_carry((B,), H)

    def measure(params, xs, carry):
        _, grads = gradients.carry_grads(cells.lstm.apply, params, carry, xs, _loss)
        per_sequence = lambda method: jax.vmap(lambda x, c: gradients.jacobian_norms(
            cells.lstm.apply, params, c, x, method=method, num_iters=5, num_probes=3, key=k_pow))(xs, carry)
        return grads, per_sequence("dense"), per_sequence("power")

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    spec = jax.sharding.PartitionSpec
    sharded = jax.shard_map(measure, mesh=mesh, in_specs=(spec(), spec("batch"), spec("batch")),
                            out_specs=spec("batch"))
    assert_trees_close(jax.jit(sharded)(params, xs, carry), jax.jit(measure)(params, xs, carry))
