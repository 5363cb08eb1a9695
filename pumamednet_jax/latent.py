"""Latent-shift explanations: the image with less, or more, of a finding.

Latent shift (Cohen et al., 2021, "Gifsplanation via Latent Shift"): the
latent z of an image is moved along the gradient of the classifier's
probability, z_λ = z + λ ∂p/∂z, and every shifted latent is decoded. Here the
classifier reads the latent itself, so ∂p/∂z is exact and cheap. The gradient
is scaled to unit length: λ counts standard deviations of the prior N(0, I)
along it. Frames with λ < 0 show the image with less of the finding, λ > 0
with more; the probability under each frame is the model's score of that
decoded frame, encoded again (what the model says of the picture shown).
"""

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
