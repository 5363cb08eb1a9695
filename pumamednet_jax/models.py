"""PumaMedNet-CXR (Minutti-Martinez et al., 2023, Sec. 2.1) in Flax NNX.

A β-VAE whose latent also feeds a small classifier:

  image ─▶ Encoder (6 stride-2 convs) ─▶ (mu, logvar) ─▶ z ─┬▶ Decoder (dense + 6 ConvTranspose) ─▶ image
                                                            └▶ ClassifierHead (2 dense) ─▶ heads

LeakyReLU(0.15) everywhere; no batch norm, dropout or skip connections (the
paper found they cost explainability). The encoder uses 4×4 kernels with
stride 2 and padding 1, as in the β-VAE of Burgess et al. (the paper's [7]),
and the decoder mirrors it with 4×4 ConvTranspose (stride 2, padding 1), so
every layer halves or doubles the size exactly and the PyTorch layers are
`Conv2d(k=4, s=2, p=1)` / `ConvTranspose2d(k=4, s=2, p=1)`.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from input_pipeline import heads as heads_lib
from pumamednet_jax import fast_conv

NUM_STRIDED_LAYERS = 6  # six stride-2 layers: the bottleneck is image_size / 64
KERNEL_SIZE = 4
# lax padding of a k=4, s=2 layer that matches PyTorch's padding=1: the conv
# pads 1 on each side; the transposed conv pads its dilated input k-1-p = 2.
CONV_PADDING = ((1, 1), (1, 1))
CONV_TRANSPOSE_PADDING = ((2, 2), (2, 2))
# Architectures (`config.model.arch`): the β-VAE, or the ResNet-18 baseline
# (`resnet.py`), which uses only image_size, heads and dtype of ModelConfig.
PUMAMEDNET, RESNET18 = 'pumamednet', 'resnet18'
ARCHS = (PUMAMEDNET, RESNET18)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the architecture (and so the parameter shapes)."""

  image_size: int
  channels: tuple[int, ...]  # encoder conv widths; the decoder mirrors them
  latent_dim: int
  classifier_hidden: int
  heads: tuple[heads_lib.HeadSpec, ...]
  leaky_relu_slope: float = 0.15
  # Compute dtype of convolutions and dense layers (parameters stay float32).
  dtype: str = 'float32'
  # How the convolutions are computed (same function, same parameters):
  # 'xla' (lax convolutions), 'fast' (`fast_conv`, fast on XLA:CPU) or 'cudnn'
  # (transposed convs in cuDNN's patterns, for GPUs); the platform policy
  # picks it (`platform.Policy.conv_impl`).
  conv_impl: str = 'xla'
  arch: str = PUMAMEDNET

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'model.arch must be one of {ARCHS}, got {self.arch!r}')
    if len(self.channels) != NUM_STRIDED_LAYERS:
      raise ValueError(
          f'model.channels needs {NUM_STRIDED_LAYERS} widths, got {self.channels}')
    if self.image_size % 2**NUM_STRIDED_LAYERS or self.image_size <= 0:
      raise ValueError(
          f'image_size must be a positive multiple of {2**NUM_STRIDED_LAYERS}, '
          f'got {self.image_size}')
    if self.conv_impl not in fast_conv.FORMS:
      raise ValueError(f'model.conv_impl must be one of {fast_conv.FORMS}, '
                       f'got {self.conv_impl!r}')

  @property
  def bottleneck_size(self) -> int:
    return self.image_size // 2**NUM_STRIDED_LAYERS

  @property
  def num_outputs(self) -> int:
    return sum(h.size for h in self.heads)

  def to_json(self) -> dict[str, Any]:
    """The architecture as JSON: what checkpoints and the PyTorch port store.

    The compute options (`COMPUTE_FIELDS`) are left out: they change how the
    same function is computed, not the weights, so a checkpoint trained with
    one can be evaluated or resumed with another.
    """
    data = dataclasses.asdict(self)
    for name in COMPUTE_FIELDS:
      del data[name]
    data['channels'] = list(self.channels)
    data['heads'] = [h.to_json() for h in self.heads]
    if self.arch == PUMAMEDNET:  # the JSON that the PyTorch port reads
      del data['arch']
    return data

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'ModelConfig':
    data = dict(data)
    data['channels'] = tuple(data['channels'])
    data['heads'] = tuple(heads_lib.HeadSpec.from_json(h) for h in data['heads'])
    return cls(**data)


# ModelConfig fields that choose how to compute, not what: not stored.
COMPUTE_FIELDS = ('dtype', 'conv_impl')


def leaky_relu(x: jax.Array, slope: float) -> jax.Array:
  return jnp.where(x >= 0, x, slope * x)


def apply_conv(layer, x: jax.Array, forms: dict, conv_impl: str) -> jax.Array:
  """`layer(x)`, or the same function of the same parameters through
  `forms[conv_impl]` (a `fast_conv` function) when conv_impl is a key of
  `forms`."""
  form = forms.get(conv_impl)
  if form is not None:
    return form(x, layer.kernel[...], layer.bias[...], dtype=layer.dtype)
  return layer(x)


# The forms of each layer kind by conv_impl ('xla' and what is missing: the
# Flax layer). Under 'cudnn' the strided convs stay Flax's: XLA:GPU already
# maps them and their gradients to cuDNN's kernels.
CONV_FORMS = {'fast': fast_conv.conv}
CONV_TRANSPOSE_FORMS = {'fast': fast_conv.conv_transpose,
                        'cudnn': fast_conv.conv_transpose_cudnn}


class Encoder(nnx.Module):
  """Six stride-2 convolutions, flatten, then two dense maps to mu and logvar."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.slope = config.leaky_relu_slope
    self.conv_impl = config.conv_impl
    dtype = jnp.dtype(config.dtype)
    widths = (1, *config.channels)
    self.convs = nnx.List([
        nnx.Conv(cin, cout, (KERNEL_SIZE, KERNEL_SIZE), strides=2,
                 padding=CONV_PADDING, dtype=dtype, rngs=rngs)
        for cin, cout in zip(widths[:-1], widths[1:])
    ])
    flat = config.bottleneck_size**2 * config.channels[-1]
    self.to_mu = nnx.Linear(flat, config.latent_dim, dtype=dtype, rngs=rngs)
    self.to_logvar = nnx.Linear(flat, config.latent_dim, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images
    for conv in self.convs:
      x = leaky_relu(apply_conv(conv, x, CONV_FORMS, self.conv_impl),
                     self.slope)
    # NHWC flatten; the PyTorch port reorders the dense rows to match it.
    x = x.reshape(x.shape[0], -1)
    return (self.to_mu(x).astype(jnp.float32),
            self.to_logvar(x).astype(jnp.float32))


class Decoder(nnx.Module):
  """Dense from the latent to (S/64)×(S/64)×C, then six ConvTranspose layers."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.slope = config.leaky_relu_slope
    self.conv_impl = config.conv_impl
    self.bottleneck_shape = (config.bottleneck_size, config.bottleneck_size,
                             config.channels[-1])
    dtype = jnp.dtype(config.dtype)
    flat = config.bottleneck_size**2 * config.channels[-1]
    self.from_latent = nnx.Linear(config.latent_dim, flat, dtype=dtype, rngs=rngs)
    widths = (*reversed(config.channels), 1)
    self.deconvs = nnx.List([
        nnx.ConvTranspose(cin, cout, (KERNEL_SIZE, KERNEL_SIZE), strides=2,
                          padding=CONV_TRANSPOSE_PADDING, dtype=dtype, rngs=rngs)
        for cin, cout in zip(widths[:-1], widths[1:])
    ])

  def __call__(self, z: jax.Array) -> jax.Array:
    x = leaky_relu(self.from_latent(z), self.slope)
    x = x.reshape(z.shape[0], *self.bottleneck_shape)
    for i, deconv in enumerate(self.deconvs):
      x = apply_conv(deconv, x, CONV_TRANSPOSE_FORMS, self.conv_impl)
      if i < len(self.deconvs) - 1:
        x = leaky_relu(x, self.slope)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class ClassifierHead(nnx.Module):
  """Two dense layers with ReLU between, from the latent to every head's logits."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.heads = config.heads
    dtype = jnp.dtype(config.dtype)
    self.hidden = nnx.Linear(config.latent_dim, config.classifier_hidden,
                             dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(config.classifier_hidden, config.num_outputs,
                          dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
    logits = self.out(jax.nn.relu(self.hidden(z))).astype(jnp.float32)
    return split_heads(logits, self.heads)


def split_heads(logits: jax.Array,
                heads: Sequence[heads_lib.HeadSpec]) -> dict[str, jax.Array]:
  """Splits the classifier's concatenated logits into one array per head.

  Multi-label and multi-class heads keep a trailing class axis; binary and
  regression heads are squeezed to shape (batch,).
  """
  outputs, start = {}, 0
  for head in heads:
    part = logits[:, start:start + head.size]
    start += head.size
    if head.kind in (heads_lib.BINARY, heads_lib.REGRESSION):
      part = part[:, 0]
    outputs[head.name] = part
  return outputs


class PumaMedNet(nnx.Module):
  """The β-VAE with a classifier on its latent (big_vision's VAE interface)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.classifier = ClassifierHead(config, rngs=rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, S, S, 1) images in [0, 1] → (mu, logvar), each (B, latent_dim)."""
    return self.encoder(images)

  @staticmethod
  def reparametrize(mu: jax.Array, logvar: jax.Array,
                    rng: jax.Array) -> jax.Array:
    """Samples z = mu + sigma * eps with eps ~ N(0, I).

    `rng` is one key for the batch, or one key per example (shape (B,)), so
    that an example's draw does not depend on how a batch is split over
    devices.
    """
    if rng.ndim == 1:
      eps = jax.vmap(lambda key: jax.random.normal(key, mu.shape[1:], mu.dtype))(rng)
    else:
      eps = jax.random.normal(rng, mu.shape, mu.dtype)
    return mu + jnp.exp(0.5 * logvar) * eps

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, latent_dim) → (B, S, S, 1) images in [0, 1]."""
    return self.decoder(z)

  def classify(self, z: jax.Array) -> dict[str, jax.Array]:
    """(B, latent_dim) → {head name: logits (or the scaled regression value)}."""
    return self.classifier(z)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None,
               *, train: bool = False):
    """Returns (reconstruction, head outputs, {mu, logvar, z}).

    When training, z is sampled with `rng`; otherwise z = mu.
    """
    mu, logvar = self.encode(images)
    if train:
      if rng is None:
        raise ValueError('PumaMedNet(train=True) needs an rng to sample z')
      z = self.reparametrize(mu, logvar, rng)
    else:
      z = mu
    return self.decode(z), self.classify(z), {'mu': mu, 'logvar': logvar, 'z': z}


def head_scores(head: heads_lib.HeadSpec, output: jax.Array) -> jax.Array:
  """Probabilities (or the regression value in the target's units)."""
  if head.kind == heads_lib.MULTICLASS:
    return jax.nn.softmax(output, axis=-1)
  if head.kind == heads_lib.REGRESSION:
    return output * head.scale
  return jax.nn.sigmoid(output)


def model_config(config, heads: Sequence[heads_lib.HeadSpec],
                 conv_impl: str) -> ModelConfig:
  """The ModelConfig of an ml_collections config and the data set's heads,
  with the convolutions' form that the platform policy picked."""
  return ModelConfig(
      image_size=config.image_size,
      channels=tuple(config.model.channels),
      latent_dim=config.model.latent_dim,
      classifier_hidden=config.model.classifier_hidden,
      heads=tuple(heads),
      leaky_relu_slope=config.model.leaky_relu_slope,
      dtype=config.model.dtype,
      conv_impl=conv_impl,
      arch=config.model.arch,
  )


def build(model_config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The model of `model_config.arch`."""
  if model_config.arch == RESNET18:
    from pumamednet_jax import resnet  # pylint: disable=g-import-not-at-top
    return resnet.ResNet18(model_config.heads, dtype=model_config.dtype,
                           conv_impl=model_config.conv_impl, rngs=rngs)
  return PumaMedNet(model_config, rngs=rngs)


# What the parameter tree holds: parameters, and BatchNorm's running
# statistics (ResNet-18), which the train step sets rather than the optimizer.
STATE = (nnx.Param, nnx.BatchStat)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(model_config: ModelConfig, seed: int) -> dict:
  """Initial parameters as a nested dict of arrays (the checkpoint layout).

  Jitted (built eagerly, every initializer would compile on its own), and
  drawn with the 'rbg' generator, which XLA:CPU compiles in a fraction of
  threefry's time; the same seed gives the same parameters on one backend.
  """
  model = build(model_config, nnx.Rngs(jax.random.key(seed, impl='rbg')))
  return nnx.to_pure_dict(nnx.state(model, nnx.Any(*STATE)))


def abstract_params(model_config: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, without allocating them."""
  return jax.eval_shape(lambda: init_params(model_config, 0))


@functools.lru_cache(maxsize=16)
def _graphdef(model_config: ModelConfig):
  return nnx.graphdef(nnx.eval_shape(
      lambda: build(model_config, nnx.Rngs(0))))


def bind(model_config: ModelConfig, params: dict) -> PumaMedNet:
  """A model that computes with the given parameters (inside jit, too)."""
  return nnx.merge(_graphdef(model_config), params)


def has_decoder(model_config: ModelConfig) -> bool:
  """Whether the model reconstructs its input (not ResNet-18)."""
  return model_config.arch == PUMAMEDNET


def require_pumamednet(model_config: ModelConfig, workdir: str,
                       why: str) -> None:
  """Refuses the checkpoint of `workdir` unless it is a PumaMedNet: `why`
  says what needs one (e.g. 'disentangle needs a latent code')."""
  if model_config.arch != PUMAMEDNET:
    raise ValueError(f'{why}, but the checkpoint in {workdir} has the '
                     f'{model_config.arch} architecture')


def batch_stats(model: nnx.Module) -> dict:
  """The BatchNorm statistics of a bound model (after a training forward
  pass: the updated ones), as a nested dict; {} for PumaMedNet."""
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def with_batch_stats(params: dict, stats: dict, frozen: Sequence[str] = ()
                     ) -> dict:
  """`params` with the BatchNorm statistics of `stats` (those of `batch_stats`),
  but for the top-level parts named in `frozen`."""
  if not stats:
    return params
  flat = traverse_util.flatten_dict(params)
  for path, value in traverse_util.flatten_dict(stats).items():
    if path[0] not in frozen:
      flat[path] = value
  return traverse_util.unflatten_dict(flat)


def num_params(model_config: ModelConfig) -> int:
  """Trainable parameters (BatchNorm's running statistics not counted)."""
  model = nnx.eval_shape(lambda: build(model_config, nnx.Rngs(0)))
  return count_params_tree(nnx.state(model, nnx.Param))


def count_params_tree(params: dict) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def in_chunks(fn, images: jax.Array, chunk: int):
  """`fn(images)` for an `fn` with per-example outputs, computed over chunks
  of `chunk` images in a loop (`lax.map`); in one piece when `chunk` is the
  whole batch (the platform policy's `inference_chunk`)."""
  batch = images.shape[0]
  if batch % chunk:
    raise ValueError(f'chunks of {chunk} images do not divide a batch of {batch}')
  if chunk == batch:
    return fn(images)
  outputs = jax.lax.map(fn, images.reshape(batch // chunk, chunk,
                                           *images.shape[1:]))
  return jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), outputs)
