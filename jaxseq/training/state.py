"""The train state, the optimizer factory and the jitted train / eval steps.

`TrainState` (params, optimizer state, step, RNG key) is one pytree, so jit, donation, sharding and Orbax take it
whole. `make_train_step` gives one jitted `train_step(state, batch) -> (state, metrics)` with the state donated;
a step whose loss or gradients are not finite is not applied (selected away inside the jitted step, so no host
sync per step is needed).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseq.training.config import TRAJECTORY_FIELDS, TrainConfig
from jaxseq.training.data import ArrayBatches, BatchSource

Params = Any
LossFn = Callable[[Params, dict, Any], tuple[jax.Array, dict]]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "opt_state", "step", "key"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training, as one pytree (jit, donation, sharding and Orbax take it whole).

    params: the model params (float32 even under mixed precision).
    opt_state: the optax state.
    step: int32 scalar, the number of batches consumed (applied or skipped as non-finite).
    key: raw uint32 PRNG key; the dropout key of step s is `fold_in(key, s)`, so it never needs to advance.
    """

    params: Params
    opt_state: Any
    step: jax.Array
    key: jax.Array

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


def create_train_state(params: Params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      key=jnp.asarray(key))


def make_optimizer(config: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip, then the optimizer with its schedule) and the schedule (for logging the lr)."""
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=config.warmup_steps,
                                                      decay_steps=max(total_steps, config.warmup_steps + 1))
    if config.optimizer == "adam":
        opt = optax.adam(schedule)
    elif config.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        opt = optax.sgd(schedule)
        if config.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
    parts = [opt] if config.clip_norm is None else [optax.clip_by_global_norm(config.clip_norm), opt]
    return optax.chain(*parts), schedule


def injected_learning_rate(opt_state) -> float | None:
    """The `learning_rate` hyperparameter held in an optax state, or None when it holds none (or several).

    `optax.inject_hyperparams` keeps the learning rate of the last update in its state: that is how a custom
    `tx` makes its learning rate readable (and logged by fit). Reading it is a host sync.
    """
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "learning_rate", filtering=lambda path, value: isinstance(value, (jax.Array, np.ndarray, float)))
    return float(jax.device_get(found[0][1])) if len(found) == 1 else None


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _compute_loss(loss_fn: LossFn, params, batch, key, mixed_precision: bool):
    """loss_fn under the precision policy: bf16 params and float inputs in, float32 loss and metrics out.

    The cast sits inside the differentiated function, so gradients come back float32 like the params.
    """
    if mixed_precision:
        params, batch = _cast_floats(params, jnp.bfloat16), _cast_floats(batch, jnp.bfloat16)
    loss, aux = loss_fn(params, batch, key)
    aux = {name: jnp.mean(jnp.asarray(value, jnp.float32)) for name, value in dict(aux or {}).items()}
    return jnp.asarray(loss, jnp.float32), aux


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mixed_precision: bool = False,
                    donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted `train_step(state, batch) -> (state, metrics)`; the input state is donated (its buffers reused).

    `loss_fn(params, batch, dropout_key) -> (scalar loss, dict of scalar metrics)`. The returned metrics hold
    `loss`, `grad_norm`, `finite` (bool) and the loss_fn's metrics. When the loss or any gradient is not
    finite the params and optimizer state are kept as they were (a select inside the step: the update is
    computed anyway for the good case, so this costs one elementwise select and no host round trip); the step
    counter still advances, since it counts consumed batches.
    """
    def step(state: TrainState, batch: dict):
        dropout_key = jax.random.fold_in(state.key, state.step)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: _compute_loss(loss_fn, p, batch, dropout_key, mixed_precision), has_aux=True)(state.params)
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite &= jnp.all(jnp.isfinite(g))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        state = state.replace(params=keep_if_finite(params, state.params),
                              opt_state=keep_if_finite(opt_state, state.opt_state), step=state.step + 1)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def _cached_step(loss_fn, tx, mixed_precision: bool):
    return make_train_step(loss_fn, tx, mixed_precision=mixed_precision)


@functools.lru_cache(maxsize=8)
def _cached_config_optimizer(config: TrainConfig, total_steps: int):
    return make_optimizer(config, total_steps)


def _cached(fn, *args):
    try:
        return fn(*args)
    except TypeError:  # an unhashable argument (e.g. a callable object as loss_fn): build afresh
        return fn.__wrapped__(*args)


def optimizer_and_step(loss_fn: LossFn, config: TrainConfig, total_steps: int,
                       tx: optax.GradientTransformation | None = None):
    """`(tx, schedule or None, train_step)`: config's optimizer (or the given `tx`) and its jitted step.

    Both are reused across fit calls with the same loss_fn and trajectory settings (or the same `tx` object): a
    new jitted function would compile again, and reusing it makes re-running fit (resume, more epochs, a
    notebook cell run twice) start at once. The schedule is None for a custom `tx`: fit cannot know its
    learning rate except through `injected_learning_rate`.
    """
    schedule = None
    if tx is None:
        if config.schedule == "constant":
            total_steps = 0  # the step count only shapes decaying schedules
        key = TrainConfig(out_dir="", **{name: getattr(config, name) for name in TRAJECTORY_FIELDS if name != "seed"})
        tx, schedule = _cached(_cached_config_optimizer, key, total_steps)
    return tx, schedule, _cached(_cached_step, loss_fn, tx, config.mixed_precision)


def make_eval_step(loss_fn: LossFn, *, mixed_precision: bool = False) -> Callable[[Params, dict], dict]:
    """Jitted `eval_step(params, batch) -> {"loss": ..., **metrics}`; loss_fn gets `dropout_key=None`.

    A key of None is the signal for deterministic evaluation: a loss_fn with dropout must skip it then.
    """
    def step(params, batch):
        loss, aux = _compute_loss(loss_fn, params, batch, None, mixed_precision)
        return {**aux, "loss": loss}

    return jax.jit(step)


def make_eval_fn(loss_fn: LossFn, source: BatchSource, *, mixed_precision: bool = False
                 ) -> Callable[[Params], dict[str, float]]:
    """An `evaluate(params) -> {name: float}` for `fit`: example-weighted means of eval_step over epoch 0.

    Build an `ArrayBatches` eval source with `drop_remainder=False`, or its last partial batch is left out.
    """
    eval_step = make_eval_step(loss_fn, mixed_precision=mixed_precision)
    if isinstance(source, ArrayBatches) and source.drop_remainder and source.num_examples % source.batch_size:
        warnings.warn(f"make_eval_fn: the eval source leaves out {source.num_examples % source.batch_size} of its "
                      f"{source.num_examples} examples (batch_size={source.batch_size}, drop_remainder=True); build "
                      "it with drop_remainder=False to evaluate all of them", stacklevel=2)

    def evaluate(params) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        for index in range(source.num_batches(0)):
            batch = source.batch(0, index)
            n = len(next(iter(batch.values())))
            for name, value in jax.device_get(eval_step(params, batch)).items():
                totals[name] = totals.get(name, 0.0) + float(value) * n
            count += n
        return {name: total / count for name, total in totals.items()}

    return evaluate
