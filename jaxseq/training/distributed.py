"""Many devices: a `jax.sharding.Mesh` with one `data` axis, batches split over it, params replicated.

The same calls run on 1 CPU, 8 GPUs or a TPU slice; `initialize_distributed` joins several hosts.
"""
from __future__ import annotations

import os

import jax
import numpy as np


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` once, for several hosts (or several processes on one).

    On a cluster that JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU) it reads everything from there.
    Elsewhere run the same command on every host with JAX_COORDINATOR_ADDRESS=host:port of process 0 (JAX reads
    it), JAXSEQ_NUM_PROCESSES and JAXSEQ_PROCESS_ID (0 .. N-1): JAX reads no variable for these two, so they are
    passed on from here. See docs/distributed.md.

    It must run before any other JAX call in the process: call it first thing, or set TrainConfig.distributed
    and make fit the first thing that touches JAX.
    """
    if jax.distributed.is_initialized():
        return
    given = {}
    for variable, argument in (("JAXSEQ_NUM_PROCESSES", "num_processes"), ("JAXSEQ_PROCESS_ID", "process_id")):
        value = os.environ.get(variable)
        if value is not None:
            try:
                given[argument] = int(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r}: expected an int") from None
    jax.distributed.initialize(**given)


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a one-process run); `name` must match across processes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis `data` over the first `num_devices` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Copy every leaf to every device of the mesh (params and optimizer state are small next to activations)."""
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def put_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Split a host batch `{name: [batch, ...]}` over the mesh's `data` axis.

    The batch dimension must divide evenly over the devices: a ragged batch is an error rather than padded,
    because padding would need a mask in every loss_fn to keep the loss unchanged.
    """
    sizes = {name: np.shape(v)[0] if np.ndim(v) else None for name, v in batch.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays must share a leading batch dimension, got {sizes}")
    size = next(iter(sizes.values()))
    devices = mesh.devices.size
    if size % devices:
        raise ValueError(f"batch of {size} examples does not divide over {devices} devices on the 'data' axis; "
                         f"use a batch_size that is a multiple of {devices} (or drop_remainder=True), or set "
                         "num_devices")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # Several hosts: every host builds the same global batch; each contributes its own contiguous slice.
    per_host = size // jax.process_count()
    lo = jax.process_index() * per_host
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(v)[lo:lo + per_host], np.shape(v))
            for name, v in batch.items()}
