"""The latent space of a checkpoint: encodings, directions and edits.

Everything the explanations need, as jitted functions over fixed-size
batches (NumPy in, NumPy out) and small pure functions of latent arrays:

  LatentModel        encode images to latent means; decode latents; the
                     classifier's logits and scores of latents; the scores
                     of decoded frames encoded again; logit gradients.
  group_direction    z̄₁ − z̄₀ between two groups of an attribute (paper
                     Sec. 3.1); `interpolations` moves images along it.
  gradient_relevance mean |∂logit/∂z_j| · std(z_j): how much a typical
                     change of latent j moves each logit, to first order.
  ablation_relevance mean |logit(z) − logit(z with z_j := mean_j)|: what
                     latent j contributes, measured without linearising.
  ablate, traversals set latents to their means; move one latent over
                     ±3 standard deviations of its distribution.
  latent_shift       Cohen et al. (2021) counterfactuals, below.

Latent shift (Cohen et al., 2021, "Gifsplanation via Latent Shift"): the
latent z of an image is moved along the gradient of the classifier's
probability, z_λ = z + λ ∂p/∂z, and every shifted latent is decoded. Here the
classifier reads the latent itself, so ∂p/∂z is exact and cheap. The gradient
is scaled to unit length: λ counts standard deviations of the prior N(0, I)
along it. Frames with λ < 0 show the image with less of the finding, λ > 0
with more; the probability under each frame is the model's score of that
decoded frame, encoded again (what the model says of the picture shown).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import figure

from input_pipeline import heads as heads_lib
from pumamednet_jax import models
from pumamednet_jax import platform as platform_lib

# λ of the frames, in prior standard deviations along the gradient.
SHIFTS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


def latent_shift(params: dict, image: jax.Array, index: jax.Array, *,
                 model_config: models.ModelConfig, head: heads_lib.HeadSpec,
                 policy: platform_lib.Policy, shifts=SHIFTS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Latent-shift frames of one image for class `index` of `head`.

  Args:
    params: the model's parameters.
    image: (S, S) float image in [0, 1].
    index: the class of `head` (an int array: one compiled program for all).
    model_config: the architecture.
    head: a multi-label, binary or multi-class head.
    policy: the platform policy (inference chunks).
    shifts: λ of each frame.

  Returns:
    frames (K, S, S) in [0, 1], the probability of each frame (K,), and the
    probability of the image itself.
  """
  model = models.bind(model_config, params)

  def probability(outputs):
    scores = models.head_scores(head, outputs[head.name])
    return scores if scores.ndim == 1 else jnp.take(scores, index, axis=-1)

  mu, _ = model.encode(image[None, ..., None])
  gradient = jax.grad(lambda z: probability(model.classify(z[None]))[0])(mu[0])
  # A saturated sigmoid can have a zero gradient: the frames then repeat z.
  direction = gradient / jnp.maximum(jnp.linalg.norm(gradient), 1e-12)
  latents = mu + jnp.asarray(shifts, jnp.float32)[:, None] * direction
  frames = model.decode(latents)
  _, outputs, _ = models.in_chunks(lambda x: model(x, train=False), frames,
                                   policy.inference_chunk(frames.shape))
  return (frames[..., 0], probability(outputs),
          probability(model.classify(mu))[0])


def write_strip(path: str, image: np.ndarray, frames: np.ndarray,
                probabilities: np.ndarray, image_probability: float,
                finding: str, shifts=SHIFTS) -> None:
  """Writes the input and its frames side by side, probabilities below."""
  num_panels = 1 + len(frames)
  fig = figure.Figure(figsize=(1.7 * num_panels, 2.5), dpi=120,
                      layout='constrained')
  axes = fig.subplots(1, num_panels)
  panels = [(image, f'input\np = {image_probability:.3f}')] + [
      (frame, f'λ = {shift:+g}\np = {p:.3f}')
      for frame, shift, p in zip(frames, shifts, probabilities)]
  for ax, (picture, caption) in zip(axes, panels):
    ax.imshow(picture, cmap='gray', vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(caption, fontsize=9)
  fig.suptitle(f'{finding}: latent shift z + λ·∂p/∂z / |∂p/∂z|', fontsize=10)
  fig.savefig(path)


# --- The model as batched functions of latents -------------------------------


@dataclasses.dataclass(frozen=True)
class Output:
  """One column of the classifier's concatenated outputs."""
  name: str  # the class name (multi-label, multi-class) or the head's name
  head: heads_lib.HeadSpec
  index: int  # the class index within the head (0 for binary, regression)


def outputs_of(heads) -> tuple[Output, ...]:
  """The classifier's output columns, in its order."""
  return tuple(Output(name, head, i) for head in heads
               for i, name in enumerate(
                   head.names if head.kind in (heads_lib.MULTILABEL,
                                               heads_lib.MULTICLASS)
                   else (head.name,)))


def _flat(heads, outputs: dict[str, jax.Array], transform) -> jax.Array:
  """(B, K) of every head's outputs (after `transform(head, output)`)."""
  return jnp.concatenate([
      transform(head, outputs[head.name]).reshape(
          outputs[head.name].shape[0], -1) for head in heads], axis=-1)


def _logits(head, output):
  del head
  return output


class LatentModel:
  """A model's encoder, decoder and classifier as jitted functions of NumPy
  arrays, computed over batches of `batch_size` (the last one padded), so
  each function compiles once whatever the number of examples."""

  def __init__(self, model_config: models.ModelConfig, params: dict,
               policy: platform_lib.Policy, batch_size: int = 64):
    self.config = model_config
    self.policy = policy
    self.batch_size = batch_size
    self.outputs = outputs_of(model_config.heads)
    self._params = jax.device_put(params)
    heads = model_config.heads
    chunked = functools.partial(_chunked, policy=policy)
    options = policy.compiler_options or None

    def encode(params, images):
      model = models.bind(model_config, params)
      return chunked(lambda x: model.encode(x)[0], images[..., None])

    def decode(params, z):
      return models.bind(model_config, params).decode(z)[..., 0]

    def logits(params, z):
      return _flat(heads, models.bind(model_config, params).classify(z),
                   _logits)

    def scores(params, z):
      return _flat(heads, models.bind(model_config, params).classify(z),
                   models.head_scores)

    def frame_scores(params, frames):
      return scores(params, encode(params, frames))

    def gradients(params, z):
      one = lambda v: logits(params, v[None])[0]
      return jax.vmap(jax.jacrev(one))(z)

    def masked_logits(params, z, masks, mean):
      # (C, B, K): the logits with the latents of each mask set to the mean.
      return jax.vmap(lambda m: logits(params, jnp.where(m, mean, z)))(masks)

    self._fns = {name: jax.jit(fn, compiler_options=options) for name, fn in (
        ('encode', encode), ('decode', decode), ('logits', logits),
        ('scores', scores), ('frame_scores', frame_scores),
        ('gradients', gradients), ('masked_logits', masked_logits))}

  def _run(self, name: str, inputs: np.ndarray, *constants,
           axis: int = 0) -> np.ndarray:
    """`name` over batches of `inputs`, its outputs joined on `axis`."""
    inputs = np.asarray(inputs, np.float32)
    count = inputs.shape[0]
    padded = -(-count // self.batch_size) * self.batch_size
    inputs = np.concatenate(
        [inputs, np.zeros((padded - count, *inputs.shape[1:]), np.float32)])
    parts = [jax.device_get(self._fns[name](
        self._params, inputs[start:start + self.batch_size], *constants))
             for start in range(0, padded, self.batch_size)]
    return np.take(np.concatenate(parts, axis=axis), np.arange(count),
                   axis=axis)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 images → latent means (N, D)."""
    return self._run('encode', np.asarray(images, np.float32) / 255.0)

  def decode(self, z: np.ndarray) -> np.ndarray:
    """(N, D) latents → (N, S, S) images in [0, 1]."""
    return self._run('decode', z)

  def logits(self, z: np.ndarray) -> np.ndarray:
    """(N, D) → (N, K) logits of `self.outputs` (age: the scaled value)."""
    return self._run('logits', z)

  def scores(self, z: np.ndarray) -> np.ndarray:
    """(N, D) → (N, K) probabilities of `self.outputs` (age in years)."""
    return self._run('scores', z)

  def frame_scores(self, frames: np.ndarray) -> np.ndarray:
    """(N, S, S) images in [0, 1] → the scores of their encodings: what the
    model says of a decoded picture."""
    return self._run('frame_scores', frames)

  def gradients(self, z: np.ndarray) -> np.ndarray:
    """(N, D) → (N, K, D): ∂logit_k/∂z_j at each latent."""
    return self._run('gradients', z)

  def masked_logits(self, z: np.ndarray, masks: np.ndarray,
                    mean: np.ndarray) -> np.ndarray:
    """(N, D) latents, (C, D) bool masks → (C, N, K): the logits with the
    latents of each mask set to `mean`."""
    return self._run('masked_logits', z, np.asarray(masks, bool),
                     np.asarray(mean, np.float32), axis=1)


def _chunked(fn, images, policy):
  return models.in_chunks(fn, images, policy.inference_chunk(images.shape))


# --- Directions, edits and relevance ------------------------------------------


def group_direction(z: np.ndarray, member: np.ndarray) -> np.ndarray:
  """z̄₁ − z̄₀: the mean latent of the examples with `member` true minus that
  of the others."""
  member = np.asarray(member, bool)
  if member.all() or not member.any():
    raise ValueError(f'a group direction needs examples in both groups; got '
                     f'{int(member.sum())} of {member.size}')
  return z[member].mean(axis=0) - z[~member].mean(axis=0)


def interpolations(z: np.ndarray, direction: np.ndarray,
                   alphas) -> np.ndarray:
  """(N, D) latents → (N, A, D): z + α·direction for every α."""
  alphas = np.asarray(alphas, np.float32)
  return z[:, None, :] + alphas[None, :, None] * direction[None, None, :]


def traversals(z: np.ndarray, index: int, mean: np.ndarray, std: np.ndarray,
               steps) -> np.ndarray:
  """(N, D) → (N, T, D): latent `index` set to mean + t·std for each step t
  (standard deviations of its distribution), the others as they are."""
  steps = np.asarray(steps, np.float32)
  out = np.repeat(z[:, None, :], len(steps), axis=1)
  out[:, :, index] = mean[index] + steps[None, :] * std[index]
  return out


def ablate(z: np.ndarray, indices, mean: np.ndarray) -> np.ndarray:
  """A copy of z with the latents `indices` set to their means."""
  out = np.array(z, copy=True)
  out[:, list(indices)] = mean[list(indices)]
  return out


def gradient_relevance(model: LatentModel, z: np.ndarray) -> np.ndarray:
  """(K, D): mean over examples of |∂logit_k/∂z_j|, times std(z_j).

  The first-order change of logit k when latent j moves by one standard
  deviation of its distribution: gradients alone would favour latents that
  hardly vary (and so carry no information); the std puts them on the scale
  the data uses.
  """
  return np.abs(model.gradients(z)).mean(axis=0) * z.std(axis=0)[None, :]


def ablation_relevance(model: LatentModel, z: np.ndarray) -> np.ndarray:
  """(K, D): mean over examples of |logit_k(z) − logit_k(z, z_j := mean_j)|.

  Occlusion of one latent at a time, exact where the gradient is a local
  linearisation (the classifier is a ReLU network).
  """
  ablated = model.masked_logits(z, np.eye(z.shape[1], dtype=bool),
                                z.mean(axis=0))
  return np.abs(ablated - model.logits(z)[None]).mean(axis=1).T


RELEVANCE_METHODS = {'gradient': gradient_relevance,
                     'ablation': ablation_relevance}
