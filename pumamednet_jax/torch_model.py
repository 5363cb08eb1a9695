"""PumaMedNet-CXR in PyTorch: a standalone port of `pumamednet_jax.models`.

This file imports only torch and the standard library, so it can be copied
alone into a PyTorch project. It builds the architecture from the JSON that
`python -m pumamednet_jax.export_torch` writes beside the safetensors weights:

  import json, torch
  from safetensors.torch import load_file
  import torch_model

  with open('model.json') as f:
    config = torch_model.ModelConfig.from_json(json.load(f))
  model = torch_model.PumaMedNet(config).eval()
  model.load_state_dict(load_file('model.safetensors'))
  reconstruction, heads, latent = model(images)  # images: (B, 1, S, S) in [0, 1]

Tensors are NCHW. The parameter names follow the Flax tree
(`encoder.convs.0.weight`, `decoder.from_latent.bias`, `classifier.out.weight`,
...); the exporter has already reordered the dense weights next to the
bottleneck, so `forward` flattens and reshapes in PyTorch's own NCHW order.
"""

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NUM_STRIDED_LAYERS = 6  # six stride-2 layers: the bottleneck is image_size / 64
KERNEL_SIZE = 4

MULTILABEL = 'multilabel'  # independent sigmoids, one per name
BINARY = 'binary'  # one sigmoid logit
MULTICLASS = 'multiclass'  # softmax logits over names
REGRESSION = 'regression'  # one value: the target divided by `scale`
KINDS = (MULTILABEL, BINARY, MULTICLASS, REGRESSION)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One classifier output (as `input_pipeline.heads.HeadSpec`)."""

  name: str
  kind: str
  names: tuple[str, ...] = ()  # class names; for BINARY (negative, positive)
  scale: float = 1.0  # REGRESSION: prediction * scale is the target (age)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'head {self.name!r}: kind {self.kind!r} not in {KINDS}')
    if self.kind in (MULTILABEL, MULTICLASS) and not self.names:
      raise ValueError(f'head {self.name!r}: a {self.kind} head needs names')

  @property
  def size(self) -> int:
    """Number of logits this head takes from the classifier's output."""
    return len(self.names) if self.kind in (MULTILABEL, MULTICLASS) else 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture, read from the JSON of `models.ModelConfig.to_json()`."""

  image_size: int
  channels: tuple[int, ...]  # encoder conv widths; the decoder mirrors them
  latent_dim: int
  classifier_hidden: int
  heads: tuple[HeadSpec, ...]
  leaky_relu_slope: float = 0.15

  def __post_init__(self):
    if len(self.channels) != NUM_STRIDED_LAYERS:
      raise ValueError(
          f'channels needs {NUM_STRIDED_LAYERS} widths, got {self.channels}')
    if self.image_size % 2**NUM_STRIDED_LAYERS or self.image_size <= 0:
      raise ValueError(
          f'image_size must be a positive multiple of {2**NUM_STRIDED_LAYERS}, '
          f'got {self.image_size}')

  @property
  def bottleneck_size(self) -> int:
    return self.image_size // 2**NUM_STRIDED_LAYERS

  @property
  def num_outputs(self) -> int:
    return sum(head.size for head in self.heads)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'ModelConfig':
    """Reads the parsed JSON config; unknown keys are an error."""
    data = dict(data)
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
      raise ValueError(f'model config: unknown keys {unknown}; known: '
                       f'{sorted(fields)}')
    data['channels'] = tuple(data['channels'])
    data['heads'] = tuple(
        HeadSpec(name=head['name'], kind=head['kind'],
                 names=tuple(head.get('names', ())),
                 scale=float(head.get('scale', 1.0)))
        for head in data['heads'])
    return cls(**data)


def split_heads(logits: torch.Tensor,
                heads: tuple[HeadSpec, ...]) -> dict[str, torch.Tensor]:
  """Splits the concatenated logits into one tensor per head.

  Multi-label and multi-class heads keep a trailing class axis; binary and
  regression heads are squeezed to shape (batch,).
  """
  outputs, start = {}, 0
  for head in heads:
    part = logits[:, start:start + head.size]
    start += head.size
    if head.kind in (BINARY, REGRESSION):
      part = part[:, 0]
    outputs[head.name] = part
  return outputs


class Encoder(nn.Module):
  """Six stride-2 convolutions, flatten, then two linear maps to mu and logvar."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.slope = config.leaky_relu_slope
    widths = (1, *config.channels)
    self.convs = nn.ModuleList([
        nn.Conv2d(cin, cout, KERNEL_SIZE, stride=2, padding=1)
        for cin, cout in zip(widths[:-1], widths[1:])
    ])
    flat = config.bottleneck_size**2 * config.channels[-1]
    self.to_mu = nn.Linear(flat, config.latent_dim)
    self.to_logvar = nn.Linear(flat, config.latent_dim)

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images
    for conv in self.convs:
      x = F.leaky_relu(conv(x), self.slope)
    x = x.flatten(1)  # NCHW flatten: the exporter ordered the weights for it
    return self.to_mu(x), self.to_logvar(x)


class Decoder(nn.Module):
  """Linear from the latent to C×(S/64)×(S/64), then six ConvTranspose2d."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.slope = config.leaky_relu_slope
    self.bottleneck_shape = (config.channels[-1], config.bottleneck_size,
                             config.bottleneck_size)
    flat = config.bottleneck_size**2 * config.channels[-1]
    self.from_latent = nn.Linear(config.latent_dim, flat)
    widths = (*reversed(config.channels), 1)
    self.deconvs = nn.ModuleList([
        nn.ConvTranspose2d(cin, cout, KERNEL_SIZE, stride=2, padding=1)
        for cin, cout in zip(widths[:-1], widths[1:])
    ])

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    x = F.leaky_relu(self.from_latent(z), self.slope)
    x = x.reshape(z.shape[0], *self.bottleneck_shape)
    for deconv in self.deconvs[:-1]:
      x = F.leaky_relu(deconv(x), self.slope)
    return torch.sigmoid(self.deconvs[-1](x))


class ClassifierHead(nn.Module):
  """Two linear layers with ReLU between, from the latent to every head."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.heads = config.heads
    self.hidden = nn.Linear(config.latent_dim, config.classifier_hidden)
    self.out = nn.Linear(config.classifier_hidden, config.num_outputs)

  def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
    return split_heads(self.out(F.relu(self.hidden(z))), self.heads)


class PumaMedNet(nn.Module):
  """The β-VAE with a classifier on its latent."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.config = config
    self.encoder = Encoder(config)
    self.decoder = Decoder(config)
    self.classifier = ClassifierHead(config)

  def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S) images in [0, 1] → (mu, logvar), each (B, latent_dim)."""
    size = self.config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, size, size):
      raise ValueError(f'images must have shape (B, 1, {size}, {size}), got '
                       f'{tuple(images.shape)}')
    return self.encoder(images)

  @staticmethod
  def reparametrize(mu: torch.Tensor, logvar: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples z = mu + sigma * eps with eps ~ N(0, I)."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype,
                      device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps

  def decode(self, z: torch.Tensor) -> torch.Tensor:
    """(B, latent_dim) → (B, 1, S, S) images in [0, 1]."""
    return self.decoder(z)

  def classify(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, latent_dim) → {head name: logits (or the scaled regression value)}."""
    return self.classifier(z)

  def forward(self, images: torch.Tensor, *, train: bool = False,
              generator: torch.Generator | None = None):
    """Returns (reconstruction, head outputs, {mu, logvar, z}).

    When training, z is sampled (with `generator`, if given); otherwise z = mu.
    """
    mu, logvar = self.encode(images)
    z = self.reparametrize(mu, logvar, generator) if train else mu
    return self.decode(z), self.classify(z), {'mu': mu, 'logvar': logvar, 'z': z}
