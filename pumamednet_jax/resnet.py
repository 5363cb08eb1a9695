"""ResNet-18 (He et al., 2016) in Flax NNX, in torchvision's layout: the
baseline of the paper's transfer experiment (Table 2).

  image ─▶ encoder (conv1 7×7/2, bn1, ReLU, max-pool 3×3/2, layer1..layer4 of
           two BasicBlocks each, global average pool) ─▶ classifier.out ─▶ heads

The backbone sits under `encoder` and the final dense layer (torchvision's
`fc`) under `classifier/out`, as in PumaMedNet, so freezing, `init_from` and
the heads work the same for both. With 3 input channels and 1,000 classes it
has torchvision's 11,689,512 parameters; our runs use a 1-channel stem and
the data set's heads. BatchNorm keeps torchvision's momentum (0.1, Flax's 0.9)
and epsilon; its running statistics are `nnx.BatchStat` variables, carried in
the parameter tree beside the parameters.

`from_torchvision` maps a torchvision ResNet-18 state dict (read from
safetensors) onto these parameters.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from input_pipeline import heads as heads_lib
from pumamednet_jax import models

STAGES = (64, 128, 256, 512)  # widths of layer1..layer4
BLOCKS_PER_STAGE = 2
BN_MOMENTUM = 0.9  # torchvision's momentum=0.1 (weight of the new batch)
BN_EPSILON = 1e-5
# torchvision's init: Kaiming normal (fan_out) for every conv.
CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(cin: int, cout: int, size: int, stride: int, dtype, rngs) -> nnx.Conv:
  pad = (size - 1) // 2
  return nnx.Conv(cin, cout, (size, size), strides=stride,
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                  kernel_init=CONV_INIT, rngs=rngs)


def conv_patches(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  """`layer(x)` (no bias) as one matmul of the k×k patches (im2col): XLA:CPU
  runs the gradients of strided and 3×3 convolutions with slow generic
  loops, and those of slices and matmuls fast (the forms of `fast_conv`
  cover only PumaMedNet's 4×4 stride-2 layers)."""
  kh, kw, cin, cout = layer.kernel.shape
  stride, ((pad, _), _) = layer.strides, layer.padding  # as `_conv` builds it
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(layer.dtype)
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kw) // stride + 1
  patches = jnp.concatenate(
      [x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
       for i in range(kh) for j in range(kw)], axis=-1)
  kernel = layer.kernel[...].astype(layer.dtype).reshape(kh * kw * cin, cout)
  return (patches.reshape(-1, kh * kw * cin) @ kernel).reshape(
      x.shape[0], h, w, cout)


def _apply(layer: nnx.Conv, x: jax.Array, conv_impl: str) -> jax.Array:
  """The conv in the platform's form: patches on the CPU ('fast')."""
  return conv_patches(layer, x) if conv_impl == 'fast' else layer(x)


def _bn(features: int, dtype, rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3×3 convs with batch norm, plus the input (through a strided 1×1
  conv and batch norm, `downsample`, where the shape changes)."""

  def __init__(self, cin: int, cout: int, stride: int, dtype, conv_impl: str,
               *, rngs: nnx.Rngs):
    self.conv_impl = conv_impl
    self.conv1 = _conv(cin, cout, 3, stride, dtype, rngs)
    self.bn1 = _bn(cout, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, 1, dtype, rngs)
    self.bn2 = _bn(cout, dtype, rngs)
    self.downsample = (nnx.List([_conv(cin, cout, 1, stride, dtype, rngs),
                                 _bn(cout, dtype, rngs)])
                       if stride != 1 or cin != cout else None)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = dict(use_running_average=not train)
    conv = lambda layer, x: _apply(layer, x, self.conv_impl)
    y = jax.nn.relu(self.bn1(conv(self.conv1, x), **norm))
    y = self.bn2(conv(self.conv2, y), **norm)
    if self.downsample is not None:
      shortcut, bn = self.downsample
      x = bn(conv(shortcut, x), **norm)
    return jax.nn.relu(x + y)


class Backbone(nnx.Module):
  """Stem, four stages and global average pooling: (B, S, S, C) → (B, 512)."""

  def __init__(self, in_channels: int, dtype, conv_impl: str, *,
               rngs: nnx.Rngs):
    self.conv_impl = conv_impl
    self.conv1 = _conv(in_channels, STAGES[0], 7, 2, dtype, rngs)
    self.bn1 = _bn(STAGES[0], dtype, rngs)
    cin = STAGES[0]
    for i, width in enumerate(STAGES):
      blocks = []
      for j in range(BLOCKS_PER_STAGE):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(BasicBlock(cin, width, stride, dtype, conv_impl,
                                 rngs=rngs))
        cin = width
      setattr(self, f'layer{i + 1}', nnx.List(blocks))

  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    x = _apply(self.conv1, images, self.conv_impl)
    x = jax.nn.relu(self.bn1(x, use_running_average=not train))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i in range(len(STAGES)):
      for block in getattr(self, f'layer{i + 1}'):
        x = block(x, train)
    return jnp.mean(x, axis=(1, 2))


class Classifier(nnx.Module):
  """torchvision's `fc`: one dense layer to every head's logits."""

  def __init__(self, num_outputs: int, dtype, *, rngs: nnx.Rngs):
    self.out = nnx.Linear(STAGES[-1], num_outputs, dtype=dtype, rngs=rngs)


class ResNet18(nnx.Module):
  """ResNet-18 with the model interface of `models.PumaMedNet`: it returns
  (None, head outputs, {}), having no reconstruction and no latents."""

  def __init__(self, heads: Sequence[heads_lib.HeadSpec], *, in_channels: int = 1,
               dtype='float32', conv_impl: str = 'xla', rngs: nnx.Rngs):
    self.heads = tuple(heads)
    dtype = jnp.dtype(dtype)
    self.encoder = Backbone(in_channels, dtype, conv_impl, rngs=rngs)
    self.classifier = Classifier(sum(h.size for h in self.heads), dtype,
                                 rngs=rngs)

  def encode(self, images: jax.Array, train: bool = False
             ) -> tuple[jax.Array, None]:
    """(B, S, S, C) images in [0, 1] → ((B, 512) features, None): the shape
    of `PumaMedNet.encode`'s (mu, logvar), for the code that scores heads."""
    return self.encoder(images, train), None

  def classify(self, features: jax.Array) -> dict[str, jax.Array]:
    """(B, 512) features → {head name: logits}."""
    logits = self.classifier.out(features).astype(jnp.float32)
    return models.split_heads(logits, self.heads)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None, *,
               train: bool = False):
    del rng  # deterministic
    return None, self.classify(self.encode(images, train)[0]), {}


# --- torchvision's state dict ------------------------------------------------

def _bn_names(prefix: str, width: int) -> list[tuple[str, tuple[int, ...]]]:
  return [(f'{prefix}.{name}', (width,)) for name in
          ('weight', 'bias', 'running_mean', 'running_var')] + [
              (f'{prefix}.num_batches_tracked', ())]


def torchvision_layout(in_channels: int = 3,
                       num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """Names and shapes of torchvision's `resnet18().state_dict()`, in order."""
  layout = [('conv1.weight', (STAGES[0], in_channels, 7, 7)),
            *_bn_names('bn1', STAGES[0])]
  cin = STAGES[0]
  for i, width in enumerate(STAGES):
    for j in range(BLOCKS_PER_STAGE):
      block = f'layer{i + 1}.{j}'
      layout += [(f'{block}.conv1.weight', (width, cin, 3, 3)),
                 *_bn_names(f'{block}.bn1', width),
                 (f'{block}.conv2.weight', (width, width, 3, 3)),
                 *_bn_names(f'{block}.bn2', width)]
      if i > 0 and j == 0:
        layout += [(f'{block}.downsample.0.weight', (width, cin, 1, 1)),
                   *_bn_names(f'{block}.downsample.1', width)]
      cin = width
  layout += [('fc.weight', (num_classes, STAGES[-1])), ('fc.bias', (num_classes,))]
  return dict(layout)


# torchvision's tensor name → the Flax leaf name (a 1-D `weight` is a
# BatchNorm's scale).
_LEAF = {'weight': 'kernel', 'running_mean': 'mean', 'running_var': 'var'}


def _flax_path(torch_name: str, ndim: int) -> str:
  *modules, leaf = torch_name.split('.')
  leaf = 'scale' if leaf == 'weight' and ndim == 1 else _LEAF.get(leaf, leaf)
  top = ['classifier', 'out'] if modules == ['fc'] else ['encoder', *modules]
  return '/'.join(top + [leaf])


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:  # OIHW → HWIO
    return value.transpose(2, 3, 1, 0)
  if leaf == 'kernel':  # (out, in) → (in, out)
    return value.T
  return value


def from_torchvision(state_dict: dict[str, np.ndarray], params: dict
                     ) -> tuple[dict, list[str], list[str]]:
  """`params` (a ResNet18's nested dict) with the tensors of a torchvision
  ResNet-18 state dict. A 3-channel stem feeding a 1-channel model is summed
  over its colour channels (a grey image repeated 3× gives the same
  activations); `fc` is taken only where the heads have its shape.
  Returns (params, restored paths, fresh paths)."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  by_name = {'/'.join(map(str, path)): path for path in flat}
  restored = []
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    value = np.asarray(value, np.float32)
    path = _flax_path(name, value.ndim)
    if path not in by_name:
      raise ValueError(f'torchvision tensor {name}: no parameter {path} in '
                       'the ResNet-18')
    value = _to_flax(value, path.rsplit('/', 1)[-1])
    target = flat[by_name[path]].shape
    if name == 'conv1.weight' and value.shape[2] == 3 and target[2] == 1:
      value = value.sum(axis=2, keepdims=True)
    if value.shape != target:
      if name.startswith('fc.'):
        continue  # other classes than ours: our heads start fresh
      raise ValueError(f'torchvision tensor {name}: shape {value.shape} (as '
                       f'Flax) does not match {path} {target}')
    flat[by_name[path]] = value
    restored.append(path)
  fresh = sorted(set(by_name) - set(restored))
  return traverse_util.unflatten_dict(flat), sorted(restored), fresh
