"""Model summary: `python -m pumamednet_jax.summary --config CONFIG`.

Prints the per-module parameter table, the forward and train-step FLOPs per
image from XLA's cost analysis, and as its last line `total_params: N`.
Needs no prepared data: the heads come from the data set's feature spec.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from clu import parameter_overview
from ml_collections import config_flags

from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import train


def abstract_batch(config, heads, batch_size: int) -> dict:
  """Shapes of a training batch, for lowering without data."""
  size = config.image_size
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.uint8)}
  for head in heads:
    shape = (batch_size, head.size) if head.kind == 'multilabel' else (batch_size,)
    dtype = jnp.int32 if head.kind == 'multiclass' else jnp.float32
    batch[head.name] = jax.ShapeDtypeStruct(shape, dtype)
  return batch


def flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


# FLOPs are counted in a program compiled for this process's CPU, whatever
# runs the model: XLA's GPU cost analysis leaves out the convolutions it hands
# to cuDNN, and counting needs no other host.
def _counting_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(jax.local_devices(backend='cpu')[:1], (parallel.AXIS,))


def nominal(model_config: models.ModelConfig) -> models.ModelConfig:
  """The model computed with lax convolutions: the FLOPs we report are the
  model's, not those of a faster formulation of it (`fast_conv`)."""
  return dataclasses.replace(model_config, conv_impl='xla')


def forward_flops_per_image(model_config: models.ModelConfig,
                            batch_size: int) -> float:
  model_config = nominal(model_config)
  on_cpu = jax.sharding.NamedSharding(_counting_mesh(), parallel.REPLICATED)
  params = parallel.placed(models.abstract_params(model_config), on_cpu)
  size = model_config.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.float32,
                                sharding=on_cpu)
  forward = jax.jit(lambda p, x: models.bind(model_config, p)(x))
  return flops(forward.lower(params, images).compile()) / batch_size


def train_flops_per_image(config, model_config, batch_size: int) -> float:
  """FLOPs of one whole train step (defects, model, losses, Adam) per image."""
  model_config = nominal(model_config)
  # In one piece: XLA's cost analysis counts a loop's body once, so a step
  # over micro-batches would count only one of them.
  config = config.copy_and_resolve_references()
  config.micro_batch_size = batch_size
  optimizer = train.create_optimizer(config)
  mesh = _counting_mesh()
  policy = platform_lib.for_mesh(mesh, model_config.conv_impl)
  train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                    policy)
  state = parallel.placed(
      jax.eval_shape(functools.partial(train.create_train_state, model_config,
                                       optimizer, 0)),
      jax.sharding.NamedSharding(mesh, parallel.REPLICATED))
  batch = parallel.placed(
      abstract_batch(config, model_config.heads, batch_size),
      jax.sharding.NamedSharding(mesh, parallel.SHARDED))
  return flops(train_fn.lower(state, batch).compile()) / batch_size


def main(argv):
  del argv
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  train.check_config(config)
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  # Parameters and FLOPs of the nominal model (`nominal`).
  model_config = models.model_config(config, heads, 'xla')
  params = models.abstract_params(model_config)
  print(parameter_overview.get_parameter_overview(params, include_stats=False))
  print(f'heads: {", ".join(f"{h.name} ({h.kind}, {h.size})" for h in heads)}')
  print(f'image size: {config.image_size}; latent: {model_config.latent_dim}')
  print(f'forward FLOPs per image: {forward_flops_per_image(model_config, 8):.4g}')
  print('train-step FLOPs per image: '
        f'{train_flops_per_image(config, model_config, 8):.4g}')
  print(f'total_params: {models.count_params_tree(params)}')


if __name__ == '__main__':
  # Flags only when run as a program: other tools import the functions above.
  config_flags.DEFINE_config_file('config', None, 'Configuration file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  app.run(main)
