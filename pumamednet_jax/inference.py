"""The model over a split: a checkpoint restored onto the mesh, and every
head's scores for each example, in jitted data-parallel batches.

Shared by the evaluation during training and the analysis commands.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pumamednet_jax import checkpoints
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import losses
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib

DEFECTIVE = 'defective/'  # prefix of the scores of the defective images


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint's step, model and parameters (replicated over the mesh)."""

  workdir: str
  step: int
  model_config: models.ModelConfig
  params: dict
  policy: platform_lib.Policy  # of the mesh the parameters live on

  def model(self) -> models.PumaMedNet:
    return models.bind(self.model_config, self.params)


def load_checkpoint(workdir: str, mesh, step: int | None = None, *,
                    compute_from=None) -> Checkpoint:
  """The checkpoint of `step`, or else the best by validation mean AUC, or
  else the latest. `compute_from` (a config) sets the model's compute options
  (`models.COMPUTE_FIELDS`), which checkpoints do not store; the convolutions'
  form is then the platform policy's for that config."""
  manager = checkpoints.create_manager(workdir, asynchronous=False,
                                       read_only=True)
  step = checkpoints.choose_step(manager, workdir, step)
  model_config = checkpoints.restore_model_config(manager, step)
  policy = platform_lib.for_mesh(
      mesh, 'auto' if compute_from is None else compute_from.model.conv_impl)
  model_config = dataclasses.replace(model_config, conv_impl=policy.conv_impl)
  if compute_from is not None:
    model_config = dataclasses.replace(model_config,
                                       dtype=compute_from.model.dtype)
  replicated = jax.sharding.NamedSharding(mesh, parallel.REPLICATED)
  abstract = parallel.placed(models.abstract_params(model_config), replicated)
  restored = checkpoints.restore(manager, step, abstract_params=abstract,
                                 abstract_opt_state=None)
  manager.close()
  return Checkpoint(workdir, step, model_config, restored['params'], policy)


def load_on_device(workdir: str, step: int | None = None) -> Checkpoint:
  """`load_checkpoint` on this process's first device: what the analysis
  commands (disentangle, bias, explain) run single-device jitted code with."""
  mesh = jax.sharding.Mesh(jax.local_devices()[:1], (parallel.AXIS,))
  return load_checkpoint(workdir, mesh, step)


def score_step(params: dict, batch: dict[str, jax.Array], *,
               model_config: models.ModelConfig,
               defects: defects_lib.DefectConfig, seed: int, defective: bool,
               ssim: tuple[int, float, str] | None,
               policy: platform_lib.Policy) -> dict[str, jax.Array]:
  """Per-example outputs, written per device (call it inside shard_map).

  For every head `<name>/score`, `<name>/target` and `<name>/mask` on the
  clean image; with `defective`, `defective/<name>/score` on the image with
  the defects of its position in the split (the same at every evaluation);
  with `ssim` (filter size, sigma, filter form), `ssim_reconstruction` and
  `ssim_defective`, each against the clean image (`ssim_reconstruction` NaN
  for a model without a decoder). z = mu.
  """
  model = models.bind(model_config, params)
  clean = batch['image'].astype(jnp.float32) / 255.0
  classify = lambda images: model.classify(model.encode(images)[0])
  outputs = {'index': batch['index'], 'valid': batch['valid']}
  chunk = policy.inference_chunk(clean.shape)
  head_outputs = models.in_chunks(classify, clean, chunk)
  for head in model_config.heads:
    target = batch[head.name]
    outputs[f'{head.name}/score'] = models.head_scores(head,
                                                       head_outputs[head.name])
    outputs[f'{head.name}/target'] = target.astype(jnp.float32)
    outputs[f'{head.name}/mask'] = losses.target_mask(batch, head, target)
  if not (defective or ssim):
    return outputs
  keys = defects_lib.example_keys(seed, defects_lib.EVAL_STREAM, 0,
                                  batch['index'])
  _, images = defects_lib.defective_inputs(batch['image'], keys, defects)
  if ssim:
    reconstruction, head_outputs, _ = models.in_chunks(
        lambda x: model(x, train=False), images, chunk)
    similarity = functools.partial(losses.ssim, filter_size=ssim[0],
                                   filter_sigma=ssim[1], filter_form=ssim[2])
    outputs['ssim_defective'] = similarity(images, clean)
    outputs['ssim_reconstruction'] = (
        jnp.full_like(outputs['ssim_defective'], jnp.nan)
        if reconstruction is None else similarity(reconstruction, clean))
  else:
    head_outputs = models.in_chunks(classify, images, chunk)
  if defective:
    for head in model_config.heads:
      outputs[f'{DEFECTIVE}{head.name}/score'] = models.head_scores(
          head, head_outputs[head.name])
  return outputs


def make_score_fn(mesh, model_config: models.ModelConfig,
                  defects: defects_lib.DefectConfig, seed: int, *,
                  policy: platform_lib.Policy, defective: bool = True,
                  ssim: tuple[int, float, str] | None = None):
  """`score_step` as a data-parallel (jit ∘ shard_map) function of
  (params, batch)."""
  return parallel.data_parallel(
      functools.partial(score_step, model_config=model_config, defects=defects,
                        seed=seed, defective=defective, ssim=ssim,
                        policy=policy),
      mesh, out_specs=parallel.SHARDED, donate_state=False,
      compiler_options=policy.compiler_options)


def score_split(score_fn, params, batches, mesh) -> dict[str, np.ndarray]:
  """Runs `score_fn` over the batches; the outputs of the real (not padding)
  examples, concatenated in split order."""
  parts = [parallel.gather(score_fn(params, parallel.shard_batch(b, mesh)))
           for b in batches]
  if not parts:
    raise ValueError('the split has no examples')
  outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = outputs['valid'] > 0
  order = np.argsort(outputs['index'][keep], kind='stable')
  return {k: v[keep][order] for k, v in outputs.items()}


def defective_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`outputs` with each head's scores replaced by those of the defective
  images."""
  replaced = dict(outputs)
  for key, value in outputs.items():
    if key.startswith(DEFECTIVE):
      replaced[key[len(DEFECTIVE):]] = value
  return replaced
