"""Loss terms of PumaMedNet (paper Sec. 2.1.4–2.1.5): pure jnp functions.

Every term is a scalar averaged over the examples of the (per-device) batch;
`total_loss` weighs them from config and returns each term for logging. A
batch may be computed in micro-batches: with the whole batch's
`loss_normalisers`, the terms of its micro-batches add up to the batch's,
except the two options that are not means over examples (the capacity gap
and the total correlation): those are computed per micro-batch, and their
shares add up to the mean over micro-batches.
"""

import dataclasses

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import optax

from input_pipeline import assets
from input_pipeline import heads as heads_lib


# How the SSIM's Gaussian filter is computed (the same filter): 'banded' =
# `banded_filter_fn` (the CPU's fastest), 'separable' = `separable_filter_fn`
# (for accelerators).
SSIM_FILTERS = ('banded', 'separable')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the loss terms (from `config.loss`)."""

  ssim_weight: float = 1.0
  recon_weight: float = 1.0
  beta: float = 1.0
  beta_warmup_steps: int = 0
  classification_weight: float = 1.0
  age_weight: float = 1.0
  ssim_filter_size: int = 7
  ssim_filter_sigma: float = 1.5
  ssim_filter: str = 'banded'  # one of SSIM_FILTERS
  capacity_gamma: float = 0.0
  capacity_max: float = 25.0
  capacity_steps: int = 0
  tc_weight: float = 0.0

  @classmethod
  def from_config(cls, config) -> 'LossConfig':
    loss = config.loss
    for name in ('ssim_weight', 'recon_weight', 'beta', 'classification_weight',
                 'age_weight', 'beta_warmup_steps', 'capacity_gamma',
                 'capacity_max', 'capacity_steps', 'tc_weight'):
      if loss[name] < 0:
        raise ValueError(f'config.loss.{name} must be >= 0, got {loss[name]}')
    if loss.lung_weight < 1:
      raise ValueError(
          f'config.loss.lung_weight must be >= 1, got {loss.lung_weight}')
    if not 1 <= loss.ssim_filter_size <= config.image_size:
      raise ValueError('config.loss.ssim_filter_size must be in [1, image_size], '
                       f'got {loss.ssim_filter_size}')
    if loss.ssim_filter not in SSIM_FILTERS:
      raise ValueError(f'config.loss.ssim_filter must be one of {SSIM_FILTERS}, '
                       f'got {loss.ssim_filter!r}')
    return cls(
        ssim_weight=loss.ssim_weight,
        recon_weight=loss.recon_weight,
        beta=loss.beta,
        beta_warmup_steps=loss.beta_warmup_steps,
        classification_weight=loss.classification_weight,
        age_weight=loss.age_weight,
        ssim_filter_size=loss.ssim_filter_size,
        ssim_filter_sigma=loss.ssim_filter_sigma,
        ssim_filter=loss.ssim_filter,
        capacity_gamma=loss.capacity_gamma,
        capacity_max=loss.capacity_max,
        capacity_steps=loss.capacity_steps,
        tc_weight=loss.tc_weight,
    )


def lung_weight_map(image_size: int, lung_weight: float) -> np.ndarray:
  """Per-pixel loss weights (paper Fig. 2a): 1 outside the lungs, up to
  `lung_weight` where the population lung probability is 1. Shape (S, S, 1)."""
  lung_probability = assets.lung_prior(image_size)
  # The population map peaks below 1; its maximum gets the full lung weight.
  lung_probability = lung_probability / max(float(lung_probability.max()), 1e-6)
  weights = 1.0 + (lung_weight - 1.0) * lung_probability
  return weights[..., None].astype(np.float32)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over the trailing (H, W, C) axes of each example, weighted."""
  axes = tuple(range(-3, 0))
  weights = jnp.broadcast_to(weights, values.shape)
  return jnp.sum(values * weights, axis=axes) / jnp.maximum(
      jnp.sum(weights, axis=axes), 1e-12)


def gaussian_window(filter_size: int, filter_sigma: float) -> np.ndarray:
  """dm-pix's 1-D SSIM window (the same taps as `dm_pix.ssim` builds)."""
  half = filter_size // 2
  shift = (2 * half - filter_size + 1) / 2
  taps = np.exp(-0.5 * ((np.arange(filter_size) - half + shift) / filter_sigma)**2)
  return (taps / taps.sum()).astype(np.float32)


def banded_filter_fn(filter_size: int, filter_sigma: float, image_size: int):
  """A `filter_fn` for `dm_pix.ssim`: its separable Gaussian 'valid' filter
  as two matrix products with a banded matrix.

  The same filter as dm-pix's default (`jnp.convolve` over every row and
  column), but XLA runs it as matmuls: about 10× faster on the CPU at 64 px
  and 5× at 256 px, forward and backward.
  """
  taps = gaussian_window(filter_size, filter_sigma)
  size_out = image_size - filter_size + 1
  band = np.zeros((size_out, image_size), np.float32)
  for row in range(size_out):
    band[row, row:row + filter_size] = taps
  band = jnp.asarray(band)

  def filter_fn(images: jax.Array) -> jax.Array:  # (..., H, W, C) → valid
    return jnp.einsum('ih,...hwc,jw->...ijc', band, images, band,
                      precision=jax.lax.Precision.HIGHEST)

  return filter_fn


def separable_filter_fn(filter_size: int, filter_sigma: float):
  """A `filter_fn` for `dm_pix.ssim`: its separable Gaussian 'valid' filter
  as two 1-D convolutions, each a sum of `filter_size` shifted slices.

  For accelerators: 2·filter_size multiply-adds a pixel where the banded
  matmuls take 2·image_size, in one loop fused with the SSIM's element-wise
  terms, and exact float32 (a float32 conv or matmul at default precision
  runs as TF32 on recent GPUs, too coarse for E[x²] − E[x]²).
  """
  taps = [float(t) for t in gaussian_window(filter_size, filter_sigma)]

  def filter_1d(images: jax.Array, axis: int) -> jax.Array:
    size = images.shape[axis] - filter_size + 1
    return sum(tap * jax.lax.slice_in_dim(images, k, k + size, axis=axis)
               for k, tap in enumerate(taps))

  def filter_fn(images: jax.Array) -> jax.Array:  # (..., H, W, C) → valid
    return filter_1d(filter_1d(images, images.ndim - 3), images.ndim - 2)

  return filter_fn


def ssim(a: jax.Array, b: jax.Array, filter_size: int, filter_sigma: float,
         return_map: bool = False, filter_form: str = 'banded') -> jax.Array:
  """`dm_pix.ssim` (per image, or its map) with the Gaussian filter computed
  as `filter_form` says (one of SSIM_FILTERS)."""
  if filter_form == 'banded':
    filter_fn = banded_filter_fn(filter_size, filter_sigma, a.shape[-2])
  elif filter_form == 'separable':
    filter_fn = separable_filter_fn(filter_size, filter_sigma)
  else:
    raise ValueError(f'ssim filter must be one of {SSIM_FILTERS}, got '
                     f'{filter_form!r}')
  return dm_pix.ssim(a, b, max_val=1.0, filter_size=filter_size,
                     filter_sigma=filter_sigma, return_map=return_map,
                     filter_fn=filter_fn)


def ssim_loss(reconstruction: jax.Array, target: jax.Array,
              weight_map: jax.Array, filter_size: int,
              filter_sigma: float, filter_form: str = 'banded') -> jax.Array:
  """1 − SSIM, the per-pixel SSIM map averaged with the lung weight map.

  SSIM filters with 'valid' padding, so the weight map is cropped to the
  SSIM map's support (the centre of the image).
  """
  ssim_map = ssim(reconstruction, target, filter_size, filter_sigma,
                  return_map=True, filter_form=filter_form)
  crop = (filter_size - 1) // 2
  size = ssim_map.shape[-2]
  weights = weight_map[crop:crop + size, crop:crop + size]
  return jnp.mean(1.0 - weighted_mean(ssim_map, weights))


def masked_reconstruction_loss(reconstruction: jax.Array, target: jax.Array,
                               weight_map: jax.Array) -> jax.Array:
  """Mean absolute error weighted per pixel; zero-weight pixels do not count."""
  return jnp.mean(weighted_mean(jnp.abs(reconstruction - target), weight_map))


def kl_divergence(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, exp(logvar)) || N(0, I)): sum over latents, mean over the batch."""
  per_example = 0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, axis=-1)
  return jnp.mean(per_example)


def beta_at(step: jax.Array, config: LossConfig) -> jax.Array:
  """β with an optional linear warm-up from 0."""
  if config.beta_warmup_steps <= 0:
    return jnp.asarray(config.beta, jnp.float32)
  ramp = jnp.minimum(step.astype(jnp.float32) / config.beta_warmup_steps, 1.0)
  return config.beta * ramp


def capacity_at(step: jax.Array, config: LossConfig) -> jax.Array:
  """The KL target C of the capacity objective (nats): raised linearly from 0
  to `capacity_max` over `capacity_steps` (at once when 0)."""
  if config.capacity_steps <= 0:
    return jnp.asarray(config.capacity_max, jnp.float32)
  ramp = jnp.minimum(step.astype(jnp.float32) / config.capacity_steps, 1.0)
  return config.capacity_max * ramp


def gaussian_log_density(z: jax.Array, mu: jax.Array,
                         logvar: jax.Array) -> jax.Array:
  """log N(z; mu, exp(logvar)) per dimension."""
  return -0.5 * (jnp.log(2 * jnp.pi) + logvar + (z - mu)**2 * jnp.exp(-logvar))


def total_correlation(z: jax.Array, mu: jax.Array,
                      logvar: jax.Array) -> jax.Array:
  """Total correlation KL(q(z) || prod_d q(z_d)) of the aggregate posterior,
  estimated on the batch by minibatch-weighted sampling (Chen et al. 2018).

  q(z_i) and q(z_id) are the batch's mixtures of its M posteriors,
  (1/M) sum_j q(z_i | x_j). Chen et al.'s weights 1/(N M) for a data set of N
  examples would add (D - 1) log N, a constant without gradient that is left
  out: the estimate is 0 when all posteriors of the batch are the same.
  """
  batch = z.shape[0]
  # (i, j, d): the density of sample i under the posterior of example j.
  log_q = gaussian_log_density(z[:, None, :], mu[None], logvar[None])
  log_joint = jax.nn.logsumexp(log_q.sum(axis=-1), axis=1) - jnp.log(batch)
  log_marginals = jax.nn.logsumexp(log_q, axis=1) - jnp.log(batch)
  return jnp.mean(log_joint - log_marginals.sum(axis=-1))


def known_targets(mask: jax.Array, target: jax.Array) -> jax.Array:
  """How many targets a head's loss averages over: the known ones (at least 1)."""
  return jnp.maximum(jnp.sum(jnp.broadcast_to(mask, target.shape)), 1.0)


def head_loss(head: heads_lib.HeadSpec, output: jax.Array, target: jax.Array,
              mask: jax.Array, normaliser: jax.Array | None = None) -> jax.Array:
  """The loss of one head; `mask` marks the targets that are known (1) or not.

  The sum over known targets divided by `normaliser`: by default their count,
  their mean; the whole batch's count when `output` is a micro-batch's.
  """
  if normaliser is None:
    normaliser = known_targets(mask, target)
  if head.kind in (heads_lib.MULTILABEL, heads_lib.BINARY):
    per_target = optax.sigmoid_binary_cross_entropy(
        output, target.astype(jnp.float32))
  elif head.kind == heads_lib.MULTICLASS:
    per_target = optax.softmax_cross_entropy_with_integer_labels(
        output, target.astype(jnp.int32))
  else:  # Regression: squared error on the scaled target (age / 100).
    per_target = (output - target.astype(jnp.float32) / head.scale)**2
  return jnp.sum(per_target * jnp.broadcast_to(mask, per_target.shape)) / normaliser


def target_mask(batch: dict[str, jax.Array], head: heads_lib.HeadSpec,
                target: jax.Array) -> jax.Array:
  """`<name>_mask` from the batch, or all ones (every target known)."""
  mask = batch.get(f'{head.name}_mask')
  if mask is None:
    return jnp.ones(target.shape, jnp.float32)
  return mask.astype(jnp.float32)


def loss_normalisers(batch: dict[str, jax.Array],
                     heads: tuple[heads_lib.HeadSpec, ...],
                     num_examples: int) -> dict[str, jax.Array]:
  """What `total_loss` divides by, from the whole (per-device) batch: the
  number of examples, and per head the number of known targets."""
  normalisers = {'examples': jnp.asarray(num_examples, jnp.float32)}
  for head in heads:
    target = batch[head.name]
    normalisers[f'head_{head.name}'] = known_targets(
        target_mask(batch, head, target), target)
  return normalisers


def total_loss(
    *,
    reconstruction: jax.Array,
    clean: jax.Array,
    head_outputs: dict[str, jax.Array],
    latents: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    heads: tuple[heads_lib.HeadSpec, ...],
    weight_map: jax.Array,
    step: jax.Array,
    config: LossConfig,
    normalisers: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of all terms, and every term on its own for logging.

  β multiplies the KL divided by the number of pixels, because the
  reconstruction terms are per-pixel means: β = 1 is then the plain VAE
  objective (reconstruction summed over pixels + KL) and β > 1 the β-VAE.
  Two options, scaled the same way: with `capacity_gamma` > 0, γ |KL − C|
  replaces β KL (Burgess et al. 2018, C from `capacity_at`); with
  `tc_weight` > 0, that weight times the total correlation of the sampled z
  is added (β-TCVAE, Chen et al. 2018, whose β_TC is β + tc_weight).

  `normalisers` (`loss_normalisers` of the whole batch) when the arguments
  are one micro-batch of it: then every returned value is that micro-batch's
  share, and the shares of all micro-batches add up to the batch's values.
  By default the arguments are the whole batch. The capacity gap and the
  total correlation are the micro-batch's own (the TC estimate needs the z
  of a whole batch; it gets the micro-batch's), so over micro-batches they
  add up to the mean of the micro-batches' values, not to the batch's.
  """
  if normalisers is None:
    normalisers = loss_normalisers(batch, heads, clean.shape[0])
  # The per-example terms: this (micro-)batch's mean times its share of the batch.
  share = clean.shape[0] / normalisers['examples']
  terms = {
      'ssim': share * ssim_loss(reconstruction, clean, weight_map,
                                config.ssim_filter_size,
                                config.ssim_filter_sigma, config.ssim_filter),
      'recon': share * masked_reconstruction_loss(reconstruction, clean,
                                                  weight_map),
      'kl': share * kl_divergence(latents['mu'], latents['logvar']),
  }
  num_pixels = np.prod(clean.shape[1:])
  total = (config.ssim_weight * terms['ssim'] +
           config.recon_weight * terms['recon'])
  if config.capacity_gamma > 0:
    kl = kl_divergence(latents['mu'], latents['logvar'])
    terms['capacity_gap'] = share * jnp.abs(kl - capacity_at(step, config))
    total = total + config.capacity_gamma * terms['capacity_gap'] / num_pixels
  else:
    total = total + beta_at(step, config) * terms['kl'] / num_pixels
  if config.tc_weight > 0:
    terms['tc'] = share * total_correlation(latents['z'], latents['mu'],
                                            latents['logvar'])
    total = total + config.tc_weight * terms['tc'] / num_pixels
  heads_total, head_terms = heads_loss(head_outputs=head_outputs, batch=batch,
                                       heads=heads, config=config,
                                       normalisers=normalisers)
  terms.update(head_terms)
  terms['total'] = total + heads_total
  return terms['total'], terms


def heads_loss(
    *,
    head_outputs: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    heads: tuple[heads_lib.HeadSpec, ...],
    config: LossConfig,
    normalisers: dict[str, jax.Array],
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the heads' losses, and each head's loss: the whole
  loss of a classifier without a decoder (ResNet-18)."""
  total, terms = jnp.zeros((), jnp.float32), {}
  for head in heads:
    target = batch[head.name]
    loss = head_loss(head, head_outputs[head.name], target,
                     target_mask(batch, head, target),
                     normalisers[f'head_{head.name}'])
    terms[f'head_{head.name}'] = loss
    weight = (config.age_weight if head.kind == heads_lib.REGRESSION else
              config.classification_weight)
    total = total + weight * loss
  terms['total'] = total
  return total, terms
