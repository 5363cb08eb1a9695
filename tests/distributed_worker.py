"""Trains 3 steps of the shrunk default model on a fixed global batch and
saves the parameters: run by test_parallel.py under 1, 8 fake CPU devices, or
as one of several processes after jax.distributed.initialize().

Usage: python tests/distributed_worker.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]
(XLA_FLAGS=--xla_force_host_platform_device_count=N sets the devices.)
"""

import sys

import jax

if len(sys.argv) > 2:
  # Cross-process collectives on CPU need gloo.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

import numpy as np  # pylint: disable=g-import-not-at-top,g-bad-import-order

from configs import default  # pylint: disable=g-import-not-at-top
from e2e_support import shrink  # pylint: disable=g-import-not-at-top
from input_pipeline import heads as heads_lib  # pylint: disable=g-import-not-at-top
from input_pipeline import labels  # pylint: disable=g-import-not-at-top
from input_pipeline import phantom  # pylint: disable=g-import-not-at-top
from pumamednet_jax import models, parallel, train  # pylint: disable=g-import-not-at-top
from pumamednet_jax import platform as platform_lib  # pylint: disable=g-import-not-at-top

GLOBAL_BATCH = 16
NUM_STEPS = 3


def global_batches():
  """The same global batches of phantom chest X-rays in every process."""
  for step in range(NUM_STEPS):
    indices = range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
    images, _, factors = phantom.render_examples(0, 'train', indices, 64)
    yield {
        'image': images[..., None],
        'labels': np.asarray([f['labels'] for f in factors], np.float32),
        'view': np.asarray([f['view'] for f in factors], np.float32),
        'age': np.asarray([f['age'] for f in factors], np.float32),
    }


def main(out_path):
  config = shrink(default.get_config(), batch_size=GLOBAL_BATCH, warmup_steps=0)
  # Left out of this comparison: the SSIM of an untrained decoder's nearly
  # constant output is float32 noise (its variances E[x²] − μ² cancel), which
  # Adam turns into sign flips that differ with the summation order. SSIM is
  # computed per example like every other term, so the data-parallel
  # arithmetic under test is the same without it.
  config.loss.ssim_weight = 0.0
  heads = (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, labels.LABELS),
           heads_lib.HeadSpec('view', heads_lib.BINARY, labels.VIEWS),
           heads_lib.HeadSpec('age', heads_lib.REGRESSION, scale=100.0))
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  optimizer = train.create_optimizer(config)
  train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                    policy)
  state = parallel.replicate(
      train.create_train_state(model_config, optimizer, config.seed), mesh)
  local = parallel.local_batch_size(GLOBAL_BATCH)
  start = jax.process_index() * local
  for batch in global_batches():
    # Each process feeds only its own, disjoint share of the global batch.
    mine = {k: v[start:start + local] for k, v in batch.items()}
    state, _ = train_fn(state, parallel.shard_batch(mine, mesh))
  params = parallel.gather(state.params)
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out_path, **flat)
  print(f'process {jax.process_index()}: {jax.device_count()} devices, done')


if __name__ == '__main__':
  main(sys.argv[1])
