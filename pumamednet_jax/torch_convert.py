"""Converts PumaMedNet weights between Flax NNX and `torch_model` (PyTorch).

The Flax side is the pure dict of `nnx.state(model, nnx.Param).to_pure_dict()`
(`{'encoder': {'convs': {0: {'kernel', 'bias'}}, ...}}`); the PyTorch side is a
flat state dict named like the Flax tree (`encoder.convs.0.weight`). Both are
numpy arrays here, and every conversion is a pure permutation of elements, so
Flax → PyTorch → Flax reproduces the parameters bitwise.

The layout rules:
  * Conv: Flax HWIO kernel → PyTorch OIHW weight (both cross-correlate).
  * ConvTranspose: Flax's `transpose_kernel=False` correlates the dilated input
    with the (H, W, in, out) kernel as stored; PyTorch's ConvTranspose2d is the
    gradient of a conv, which correlates with the spatially flipped kernel and
    stores it (in, out, H, W). So the kernel is flipped and permuted.
  * Linear: Flax (in, out) kernel → PyTorch (out, in) weight.
  * The bottleneck: Flax flattens / reshapes NHWC, PyTorch NCHW, so the rows of
    `encoder.to_mu` / `to_logvar` and the outputs (weight rows and bias) of
    `decoder.from_latent` are reordered from (h, w, c) to (c, h, w) order.

`save_safetensors` / `load_safetensors` write and read the weights with the
architecture JSON beside them; loading never unpickles.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from pumamednet_jax import models

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One parameter: where it lives on each side and how to convert it."""

  flax_path: tuple[str | int, ...]
  torch_name: str
  flax_shape: tuple[int, ...]
  torch_shape: tuple[int, ...]
  to_torch: Callable[[Array], Array]
  to_flax: Callable[[Array], Array]


def _identity(x: Array) -> Array:
  return x


def _conv(path, name, cin, cout) -> list[_Tensor]:
  k = models.KERNEL_SIZE
  return [
      _Tensor((*path, 'kernel'), f'{name}.weight', (k, k, cin, cout),
              (cout, cin, k, k),
              to_torch=lambda x: x.transpose(3, 2, 0, 1),
              to_flax=lambda x: x.transpose(2, 3, 1, 0)),
      _Tensor((*path, 'bias'), f'{name}.bias', (cout,), (cout,),
              _identity, _identity),
  ]


def _conv_transpose(path, name, cin, cout) -> list[_Tensor]:
  k = models.KERNEL_SIZE
  return [
      _Tensor((*path, 'kernel'), f'{name}.weight', (k, k, cin, cout),
              (cin, cout, k, k),
              to_torch=lambda x: x[::-1, ::-1].transpose(2, 3, 0, 1),
              to_flax=lambda x: x.transpose(2, 3, 0, 1)[::-1, ::-1]),
      _Tensor((*path, 'bias'), f'{name}.bias', (cout,), (cout,),
              _identity, _identity),
  ]


def _linear(path, name, din, dout) -> list[_Tensor]:
  return [
      _Tensor((*path, 'kernel'), f'{name}.weight', (din, dout), (dout, din),
              to_torch=lambda x: x.T, to_flax=lambda x: x.T),
      _Tensor((*path, 'bias'), f'{name}.bias', (dout,), (dout,),
              _identity, _identity),
  ]


def _linear_from_bottleneck(path, name, side, channels, dout) -> list[_Tensor]:
  """A linear layer whose input is the flattened (side, side, channels) map."""
  din = side * side * channels
  return [
      _Tensor((*path, 'kernel'), f'{name}.weight', (din, dout), (dout, din),
              to_torch=lambda x: x.reshape(side, side, channels, dout)
              .transpose(3, 2, 0, 1).reshape(dout, din),
              to_flax=lambda x: x.reshape(dout, channels, side, side)
              .transpose(2, 3, 1, 0).reshape(din, dout)),
      _Tensor((*path, 'bias'), f'{name}.bias', (dout,), (dout,),
              _identity, _identity),
  ]


def _linear_to_bottleneck(path, name, din, side, channels) -> list[_Tensor]:
  """A linear layer whose output is reshaped to the (side, side, channels) map."""
  dout = side * side * channels
  return [
      _Tensor((*path, 'kernel'), f'{name}.weight', (din, dout), (dout, din),
              to_torch=lambda x: x.reshape(din, side, side, channels)
              .transpose(3, 1, 2, 0).reshape(dout, din),
              to_flax=lambda x: x.reshape(channels, side, side, din)
              .transpose(3, 1, 2, 0).reshape(din, dout)),
      _Tensor((*path, 'bias'), f'{name}.bias', (dout,), (dout,),
              to_torch=lambda x: x.reshape(side, side, channels)
              .transpose(2, 0, 1).reshape(dout),
              to_flax=lambda x: x.reshape(channels, side, side)
              .transpose(1, 2, 0).reshape(dout)),
  ]


def _layout(config: models.ModelConfig) -> list[_Tensor]:
  """Every parameter of the architecture, in PyTorch's state-dict order."""
  side, last = config.bottleneck_size, config.channels[-1]
  tensors = []
  widths = (1, *config.channels)
  for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
    tensors += _conv(('encoder', 'convs', i), f'encoder.convs.{i}', cin, cout)
  for head in ('to_mu', 'to_logvar'):
    tensors += _linear_from_bottleneck(('encoder', head), f'encoder.{head}',
                                       side, last, config.latent_dim)
  tensors += _linear_to_bottleneck(('decoder', 'from_latent'),
                                   'decoder.from_latent', config.latent_dim,
                                   side, last)
  widths = (*reversed(config.channels), 1)
  for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
    tensors += _conv_transpose(('decoder', 'deconvs', i), f'decoder.deconvs.{i}',
                               cin, cout)
  tensors += _linear(('classifier', 'hidden'), 'classifier.hidden',
                     config.latent_dim, config.classifier_hidden)
  tensors += _linear(('classifier', 'out'), 'classifier.out',
                     config.classifier_hidden, config.num_outputs)
  return tensors


def _describe(config: models.ModelConfig) -> str:
  return (f'image_size={config.image_size}, channels={tuple(config.channels)}, '
          f'latent_dim={config.latent_dim}, '
          f'classifier_hidden={config.classifier_hidden}, '
          f'{config.num_outputs} head outputs')


def _check(found: Mapping[str, tuple[int, ...]],
           expected: Mapping[str, tuple[int, ...]], what: str,
           config: models.ModelConfig) -> None:
  """Raises one error listing every missing, unexpected or misshapen tensor."""
  problems = [f'  {name}: missing (expected shape {shape})'
              for name, shape in expected.items() if name not in found]
  problems += [f'  {name}: unexpected tensor of shape {shape}'
               for name, shape in found.items() if name not in expected]
  problems += [
      f'  {name}: shape {found[name]} in the {what}, but the architecture '
      f'expects {shape}'
      for name, shape in expected.items()
      if name in found and tuple(found[name]) != shape
  ]
  if problems:
    raise ValueError(
        f'The {what} does not match the architecture ({_describe(config)}):\n'
        + '\n'.join(problems))


def _flatten(tree: Mapping[Any, Any], prefix=()) -> dict[tuple, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, (*prefix, key)))
    else:
      flat[(*prefix, key)] = value
  return flat


def _path_name(path: tuple) -> str:
  return '/'.join(str(key) for key in path)


def flax_to_torch(params: Mapping[str, Any],
                  config: models.ModelConfig) -> dict[str, Array]:
  """Flax param pure dict → PyTorch state dict (numpy, float32, contiguous)."""
  layout = _layout(config)
  # List keys may come back from a checkpoint as strings ('0'): compare by name.
  found = {_path_name(path): value for path, value in _flatten(params).items()}
  _check({name: tuple(np.shape(value)) for name, value in found.items()},
         {_path_name(t.flax_path): t.flax_shape for t in layout},
         'Flax parameters', config)
  return {
      t.torch_name: np.ascontiguousarray(
          t.to_torch(np.asarray(found[_path_name(t.flax_path)], np.float32)))
      for t in layout
  }


def torch_to_flax(state_dict: Mapping[str, Any],
                  config: models.ModelConfig,
                  source: str = 'PyTorch state dict') -> dict[str, Any]:
  """PyTorch state dict (numpy arrays) → Flax param pure dict (float32).

  `source` names the weights (a file name) in errors.
  """
  layout = _layout(config)
  _check({name: tuple(np.shape(value)) for name, value in state_dict.items()},
         {t.torch_name: t.torch_shape for t in layout}, source, config)
  params: dict[str, Any] = {}
  for t in layout:
    node = params
    for key in t.flax_path[:-1]:
      node = node.setdefault(key, {})
    value = np.asarray(state_dict[t.torch_name])
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f'{source}: tensor {t.torch_name} has dtype '
                       f'{value.dtype}, expected a floating point type')
    node[t.flax_path[-1]] = np.ascontiguousarray(
        t.to_flax(value.astype(np.float32, copy=False)))
  return params


def config_path(weights_path: str) -> str:
  """The architecture JSON beside the weights: model.safetensors → model.json."""
  return os.path.splitext(weights_path)[0] + '.json'


def save_safetensors(path: str, config: models.ModelConfig,
                     params: Mapping[str, Any]) -> str:
  """Writes the Flax params as a PyTorch safetensors file and its config JSON.

  Returns the path of the JSON.
  """
  state_dict = flax_to_torch(params, config)
  json_path = config_path(path)
  if os.path.abspath(json_path) == os.path.abspath(path):
    raise ValueError(f'{path}: the weights file needs a suffix (.safetensors) '
                     'so that the config JSON can go beside it')
  safetensors_numpy.save_file(state_dict, path, metadata={'format': 'pt'})
  with open(json_path, 'w') as f:
    json.dump(config.to_json(), f, indent=2)
    f.write('\n')
  return json_path


def load_config(json_path: str) -> models.ModelConfig:
  """Reads the architecture JSON written by `save_safetensors`."""
  try:
    with open(json_path) as f:
      return models.ModelConfig.from_json(json.load(f))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{json_path}: cannot read the model config: {e!r}') from e


def load_safetensors(
    path: str, json_path: str | None = None
) -> tuple[models.ModelConfig, dict[str, Any]]:
  """Reads a safetensors state dict into (model config, Flax params).

  The architecture comes from `json_path` (by default the JSON beside the
  weights); tensors that do not fit it raise an error naming each tensor and
  both shapes. Safetensors holds raw arrays only: nothing is unpickled.
  """
  config = load_config(json_path or config_path(path))
  try:
    state_dict = safetensors_numpy.load_file(path)
  except (OSError, safetensors.SafetensorError) as e:
    raise ValueError(f'{path}: cannot read safetensors weights: {e!r}') from e
  return config, torch_to_flax(state_dict, config, source=path)
