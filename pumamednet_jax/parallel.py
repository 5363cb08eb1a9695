"""Data parallelism: the device mesh, the shard_map'd step, multi-host input.

The train and eval steps are written as per-device code that averages with
`lax.pmean` over the `batch` mesh axis (what `pmap` did), and compiled with
`jax.jit(jax.shard_map(...))` over every device of every process. Parameters
are replicated; batches are split along their first axis.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'
REPLICATED = P()
SHARDED = P(AXIS)


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def check_batch_size(batch_size: int, *, key: str = 'config.batch_size') -> None:
  """The global batch must split evenly over processes and devices."""
  if batch_size <= 0 or batch_size % jax.device_count():
    raise ValueError(
        f'{key} = {batch_size} must be a positive multiple of the number of '
        f'devices ({jax.device_count()} over {jax.process_count()} process(es))')


def local_batch_size(global_batch_size: int) -> int:
  """Examples this process feeds per step."""
  return global_batch_size // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts an identical-on-every-process pytree on all devices, replicated."""
  sharding = NamedSharding(mesh, REPLICATED)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's share of it."""
  sharding = NamedSharding(mesh, SHARDED)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def example_index(local_size: int) -> jax.Array:
  """Inside shard_map: the position of each local example in the global batch.

  Keys derived from it make every example's random draws independent of how
  the batch is split over devices.
  """
  start = jax.lax.axis_index(AXIS) * local_size
  return start + jax.numpy.arange(local_size)


def data_parallel(step_fn: Callable, mesh: Mesh, *, out_specs: Any,
                  donate_state: bool,
                  compiler_options: dict[str, str]) -> Callable:
  """jit(shard_map(step_fn)) with a replicated first argument (the state or
  the parameters) and a batch split over devices as the second, compiled with
  `compiler_options` (the platform policy's)."""
  mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(REPLICATED, SHARDED),
                         out_specs=out_specs)
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else (),
                 compiler_options=dict(compiler_options))


def placed(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Abstract arrays (shapes, dtypes) of `tree` placed on `sharding`: what to
  lower a computation, or restore a checkpoint, for."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def gather(tree: Any) -> Any:
  """Brings a (possibly multi-host) sharded or replicated pytree to NumPy."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def wait_for_all_processes(name: str, timeout_s: float) -> None:
  """A barrier of all processes through the coordination service: no device
  collective, so nothing times out while one process works alone."""
  if jax.process_count() == 1:
    return
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
