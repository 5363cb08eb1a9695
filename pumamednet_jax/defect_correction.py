"""How well the model corrects each defect (paper Sec. 3, Fig. 3).

Each defect alone at fixed strengths, and all together, applied to clean
images: the SSIM and PSNR against the clean image of the defective image
and of the model's reconstruction of it, per image, in jitted data-parallel
batches; means with bootstrap intervals.
"""

import dataclasses
import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from pumamednet_jax import defects as defects_lib
from pumamednet_jax import losses
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import stats

ROTATIONS = (5.0, 10.0, 15.0)  # degrees
BLUR_SIGMAS = (0.5, 1.0, 1.5)  # pixels at 64 px, scaled with the image size
MEASURES = ('ssim_defective', 'psnr_defective', 'ssim_reconstruction',
            'psnr_reconstruction')


@dataclasses.dataclass(frozen=True)
class Condition:
  """A fixed defect: `defects.apply_defects` with every draw given."""

  name: str
  label: str  # for tables and figures
  config: defects_lib.DefectConfig
  drawn: tuple[tuple[str, float], ...]

  def apply(self, image: jax.Array) -> jax.Array:
    return defects_lib.apply_defects(image, dict(self.drawn), self.config)


def conditions(image_size: int) -> tuple[Condition, ...]:
  """No defect, each defect alone at its strengths, then all together."""
  scale = image_size / 64
  none = dict(rotate=False, degrees=0.0, flip=False, blur=False, sigma=1.0,
              equalize=False, autocontrast=False)

  def condition(name, label, **drawn):
    sigma = drawn.get('sigma', 1.0)
    config = defects_lib.DefectConfig(
        rotate_prob=float(drawn.get('rotate', False)),
        max_rotation_degrees=drawn.get('degrees', 0.0),
        flip_prob=float(drawn.get('flip', False)),
        blur_prob=float(drawn.get('blur', False)),
        blur_sigma_min=sigma, blur_sigma_max=sigma,
        equalize_prob=float(drawn.get('equalize', False)),
        autocontrast_prob=float(drawn.get('autocontrast', False)))
    return Condition(name, label, config, tuple({**none, **drawn}.items()))

  return (
      condition('none', 'none'),
      *[condition(f'rotate_{d:g}', f'rotate {d:g}°', rotate=True, degrees=d)
        for d in ROTATIONS],
      condition('flip', 'flip', flip=True),
      *[condition(f'blur_{s:g}', f'blur σ={s * scale:g} px', blur=True,
                  sigma=s * scale) for s in BLUR_SIGMAS],
      condition('equalize', 'equalize', equalize=True),
      condition('autocontrast', 'autocontrast', autocontrast=True),
      condition('all', f'all (rotate {ROTATIONS[1]:g}°, flip, blur σ='
                f'{BLUR_SIGMAS[1] * scale:g} px, equalize, autocontrast)',
                rotate=True, degrees=ROTATIONS[1], flip=True, blur=True,
                sigma=BLUR_SIGMAS[1] * scale, equalize=True, autocontrast=True),
  )


def correction_step(params: dict, batch: dict[str, jax.Array], *,
                    model_config: models.ModelConfig,
                    conditions_: tuple[Condition, ...],
                    ssim: tuple[int, float, str], grid_examples: int,
                    policy: platform_lib.Policy) -> dict[str, jax.Array]:
  """Per-example measures of every condition, written per device (call it
  inside shard_map); `<condition>/images`: (defective, reconstruction) of
  the first `grid_examples` examples of the device."""
  model = models.bind(model_config, params)
  clean = batch['image'].astype(jnp.float32) / 255.0
  reconstruct = lambda images: model.decode(model.encode(images)[0])
  similarity = functools.partial(losses.ssim, filter_size=ssim[0],
                                 filter_sigma=ssim[1], filter_form=ssim[2])
  outputs = {'index': batch['index'], 'valid': batch['valid']}
  # Every condition's images through the model in one batch: one copy of the
  # model in the compiled program, not one per condition.
  defective = jnp.stack([jax.vmap(c.apply)(clean) for c in conditions_])
  flat = defective.reshape(-1, *clean.shape[1:])
  reconstruction = models.in_chunks(
      reconstruct, flat, policy.inference_chunk(flat.shape)).reshape(
          defective.shape)
  for i, condition in enumerate(conditions_):
    name = condition.name
    outputs[f'{name}/ssim_defective'] = similarity(defective[i], clean)
    outputs[f'{name}/psnr_defective'] = dm_pix.psnr(defective[i], clean)
    outputs[f'{name}/ssim_reconstruction'] = similarity(reconstruction[i], clean)
    outputs[f'{name}/psnr_reconstruction'] = dm_pix.psnr(reconstruction[i],
                                                          clean)
    outputs[f'{name}/images'] = jnp.stack(
        [defective[i, :grid_examples], reconstruction[i, :grid_examples]],
        axis=1)
  return outputs


def measure(params, batches, mesh, model_config: models.ModelConfig,
            ssim: tuple[int, float, str], policy: platform_lib.Policy,
            grid_examples: int = 2):
  """Per-example measures of each condition over the batches, and the grid
  images: {condition: (examples, 2, S, S, 1)} of the first batch."""
  conditions_ = conditions(model_config.image_size)
  step = parallel.data_parallel(
      functools.partial(correction_step, model_config=model_config,
                        conditions_=conditions_, ssim=ssim,
                        grid_examples=grid_examples, policy=policy),
      mesh, out_specs=parallel.SHARDED, donate_state=False,
      compiler_options=policy.compiler_options)
  parts, images = [], None
  for batch in batches:
    out = parallel.gather(step(params, parallel.shard_batch(batch, mesh)))
    if images is None:
      images = {c.name: out.pop(f'{c.name}/images') for c in conditions_}
    else:
      for c in conditions_:
        out.pop(f'{c.name}/images')
    parts.append(out)
  if not parts:
    raise ValueError('the split has no examples')
  merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = merged['valid'] > 0
  order = np.argsort(merged['index'][keep], kind='stable')
  return {k: v[keep][order] for k, v in merged.items()}, images


def table(measures: dict[str, np.ndarray], conditions_: tuple[Condition, ...],
          resampling: stats.Resampling, level: float = 0.95) -> dict[str, dict]:
  """{condition: {label, measure: {mean, ci_low, ci_high}}}, the intervals
  over the same resamples. The unchanged image (no defect) has SSIM 1 and an
  infinite PSNR: left out (None)."""
  statistics = {}
  for condition in conditions_:
    for m in MEASURES:
      if condition.name == 'none' and m.endswith('_defective'):
        continue
      key = f'{condition.name}/{m}'
      statistics[key] = stats.mean_statistic(measures[key])
  replicates = stats.bootstrap(statistics, resampling)
  rows = {}
  for condition in conditions_:
    name = condition.name
    row = {'label': condition.label}
    for m in MEASURES:
      key = f'{name}/{m}'
      if key in replicates:
        low, high = stats.interval(replicates[key], level)
        row[m] = {'mean': float(np.mean(measures[key])), 'ci_low': low,
                  'ci_high': high}
      else:
        row[m] = None
    rows[name] = row
  return rows
