"""fast_conv computes what the Flax conv layers compute, values and gradients."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from input_pipeline import heads as heads_lib
from pumamednet_jax import fast_conv
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import summary
from pumamednet_jax import train

# Agreement asked of the fast formulation: float32 rounding (summation order)
# relative to the largest magnitude compared.
TOLERANCE = 1e-5


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, what
  scale = max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(actual - expected).max())
  assert error <= TOLERANCE * scale, f'{what}: max error {error:.3g} (scale {scale:.3g})'


def nnx_layer(kind, cin, cout, dtype=jnp.float32):
  """The model's layer, built the way models.py builds it."""
  rngs = nnx.Rngs(0)
  if kind == 'conv':
    return nnx.Conv(cin, cout, (4, 4), strides=2, padding=models.CONV_PADDING,
                    dtype=dtype, rngs=rngs)
  return nnx.ConvTranspose(cin, cout, (4, 4), strides=2,
                           padding=models.CONV_TRANSPOSE_PADDING, dtype=dtype,
                           rngs=rngs)


def layer_outputs_and_grads(fn, x, kernel, bias, cotangent):
  def loss(x, kernel, bias):
    return jnp.sum(fn(x, kernel, bias) * cotangent)

  @jax.jit  # one compilation instead of many small eager ones
  def run(x, kernel, bias):
    return (fn(x, kernel, bias),) + jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)
  return run(x, kernel, bias)


def conv_with_matmul_grad(forward_form, grad_form):
  """fast_conv.conv's layer: one form's forward, another's gradient."""
  def layer(x, kernel, bias):
    return fast_conv.conv_with_matmul_grad(x, kernel, bias, forward_form,
                                           grad_form)
  layer.__name__ = f'{forward_form}_forward_{grad_form}_grad'
  return layer


FORMULATIONS = [
    ('conv', fast_conv.conv_patches, 3, 5),
    ('conv', fast_conv.conv_shift, 6, 4),
    ('conv', fast_conv.conv_lax, 6, 4),
    ('conv', fast_conv.conv_direct, 1, 5),
    ('conv', fast_conv.conv_direct, 2, 3),
    ('conv', fast_conv.conv_one_pixel, 6, 4),  # on 2×2 images
    ('conv', conv_with_matmul_grad('lax', 'shift'), 6, 4),
    ('conv', conv_with_matmul_grad('lax', 'patches'), 6, 4),
    ('conv', conv_with_matmul_grad('direct', 'patches'), 1, 5),
    ('conv', conv_with_matmul_grad('patches', 'shift'), 1, 5),
    ('conv_transpose', fast_conv.conv_transpose_subpixel, 6, 4),
    ('conv_transpose', fast_conv.conv_transpose_subpixel, 8, 1),
    ('conv_transpose', fast_conv.conv_transpose_col2im, 6, 4),
    ('conv_transpose', fast_conv.conv_transpose_col2im, 8, 1),
    ('conv_transpose', fast_conv.conv_transpose_reversed, 6, 4),
    ('conv_transpose', fast_conv.conv_transpose_reversed, 8, 1),
]
# conv / conv_transpose pick a formulation from the shapes; the model
# test below runs them at the model's widths (both picks of each).


@pytest.mark.parametrize('kind,formulation,cin,cout', FORMULATIONS,
                         ids=lambda v: getattr(v, '__name__', str(v)))
def test_formulation_matches_the_flax_layer(kind, formulation, cin, cout):
  layer = nnx_layer(kind, cin, cout)
  keys = jax.random.split(jax.random.key(1), 3)
  # Non-square, and a bias that is not zero, so a swapped axis or a dropped
  # bias would show.
  height, width = (6, 10) if kind == 'conv' else (3, 5)
  if formulation is fast_conv.conv_one_pixel:
    height, width = 2, 2
  x = jax.random.normal(keys[0], (2, height, width, cin))
  kernel = layer.kernel[...]
  bias = jax.random.normal(keys[1], (cout,))
  graphdef = nnx.graphdef(layer)

  def reference(x, kernel, bias):
    return nnx.merge(graphdef, {'kernel': kernel, 'bias': bias})(x)

  expected_shape = jax.eval_shape(reference, x, kernel, bias).shape
  cotangent = jax.random.normal(keys[2], expected_shape)
  expected = layer_outputs_and_grads(reference, x, kernel, bias, cotangent)
  actual = layer_outputs_and_grads(formulation, x, kernel, bias, cotangent)
  for name, a, e in zip(('output', 'd/dx', 'd/dkernel', 'd/dbias'), actual, expected):
    assert_close(a, e, name)


def decoder_layer_shapes(image_size):
  """(Cin, Cout, input side) of every decoder layer of the default widths."""
  config = default.get_config()
  widths = (*reversed(config.model.channels), 1)
  side = image_size // 2**models.NUM_STRIDED_LAYERS
  return [(cin, cout, side * 2**i)
          for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))]


@pytest.mark.parametrize('cin,cout,side', decoder_layer_shapes(256),
                         ids=lambda v: str(v))
def test_reversed_filter_form_matches_every_decoder_layer(cin, cout, side):
  """The accelerator form at the paper preset's decoder shapes (256 px)."""
  layer = nnx_layer('conv_transpose', cin, cout)
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (2, side, side, cin))
  kernel = layer.kernel[...]
  bias = jax.random.normal(keys[1], (cout,))
  graphdef = nnx.graphdef(layer)

  def reference(x, kernel, bias):
    return nnx.merge(graphdef, {'kernel': kernel, 'bias': bias})(x)

  cotangent = jax.random.normal(keys[2], (2, 2 * side, 2 * side, cout))
  expected = layer_outputs_and_grads(reference, x, kernel, bias, cotangent)
  actual = layer_outputs_and_grads(fast_conv.conv_transpose_reversed, x,
                                   kernel, bias, cotangent)
  for name, a, e in zip(('output', 'd/dx', 'd/dkernel', 'd/dbias'), actual, expected):
    assert_close(a, e, name)


def test_layers_cast_to_the_compute_dtype_like_flax():
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 4))
  for kind, fn in (('conv', fast_conv.conv),
                   ('conv_transpose', fast_conv.conv_transpose),
                   ('conv_transpose', fast_conv.conv_transpose_cudnn)):
    layer = nnx_layer(kind, 4, 16, dtype=jnp.bfloat16)
    out = jax.jit(fn, static_argnames='dtype')(
        x, layer.kernel[...], layer.bias[...], dtype=layer.dtype)
    expected = nnx.jit(lambda layer, x: layer(x))(layer, x)
    assert out.dtype == expected.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(expected, np.float32), atol=0.05, rtol=0.05)


def model_pair(image_size, impl='fast'):
  """The same parameters in a model with lax convolutions and one with `impl`."""
  config = default.get_config()
  heads = (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, names=('a', 'b', 'c')),
           heads_lib.HeadSpec('sex', heads_lib.BINARY, names=('M', 'F')))
  base = dataclasses.replace(models.model_config(config, heads, 'xla'),
                             image_size=image_size)
  params = models.init_params(dataclasses.replace(base, conv_impl='xla'), 0)
  return (params, dataclasses.replace(base, conv_impl='xla'),
          dataclasses.replace(base, conv_impl=impl))


def model_outputs_and_grads(model_config, params, images, rng):
  def loss(params, images):
    recon, heads, latent = models.bind(model_config, params)(images, rng, train=True)
    return (jnp.mean((recon - images) ** 2) + jnp.mean(latent['mu'] ** 2)
            + jnp.mean(jnp.exp(latent['logvar']))
            + sum(jnp.mean(jnp.sin(v)) for v in heads.values()))

  @jax.jit
  def run(params, images):
    recon, heads, latent = models.bind(model_config, params)(images, rng, train=True)
    grads = jax.grad(loss, argnums=(0, 1))(params, images)
    return {'recon': recon, 'heads': heads, 'latent': latent}, grads
  return run(params, images)


@pytest.mark.parametrize('impl', ['fast', 'cudnn'])
def test_model_with_fast_convs_matches_the_flax_layers(impl):
  image_size = 64
  params, plain, fast = model_pair(image_size, impl)
  images = jax.random.uniform(jax.random.key(3), (2, image_size, image_size, 1))
  rng = jax.random.key(4)
  expected = model_outputs_and_grads(plain, params, images, rng)
  actual = model_outputs_and_grads(fast, params, images, rng)
  leaves_expected = jax.tree_util.tree_leaves_with_path(expected)
  leaves_actual = jax.tree.leaves(actual)
  assert len(leaves_expected) == len(leaves_actual)
  for (path, e), a in zip(leaves_expected, leaves_actual):
    assert_close(a, e, jax.tree_util.keystr(path))


def test_model_programs_leave_convolutions_to_eigen():
  """The CPU policy's compiler options, which parallel.data_parallel
  compiles with, keep XLA:CPU's convolutions out of YNNPACK (slower for these
  layers)."""
  kernel = jax.random.normal(jax.random.key(5), (4, 4, 32, 48))
  images = jax.random.normal(jax.random.key(6), (2, 16, 16, 32))

  def layer(kernel, images):
    return fast_conv.conv_lax(images, kernel, 0.0)

  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh)
  step = parallel.data_parallel(layer, mesh, out_specs=parallel.SHARDED,
                                donate_state=False,
                                compiler_options=policy.compiler_options)
  with_options = step.lower(kernel, images).compile().as_text()
  default_options = jax.jit(layer).lower(kernel, images).compile().as_text()
  assert 'convolution(' in with_options
  assert '__ynn_fusion' not in with_options
  assert '__ynn_fusion' in default_options  # what the options change
  np.testing.assert_allclose(step(kernel, images), jax.jit(layer)(kernel, images),
                             atol=1e-4, rtol=1e-4)


def lowered_train_step(conv_impl):
  """The StableHLO text of the default config's train step (batch 2)."""
  config = default.get_config()
  config.batch_size = 2
  config.model.conv_impl = conv_impl
  heads = (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, names=('a', 'b')),)
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  optimizer = train.create_optimizer(config)
  train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                    policy)
  state = parallel.placed(
      jax.eval_shape(lambda: train.create_train_state(model_config, optimizer, 0)),
      jax.sharding.NamedSharding(mesh, parallel.REPLICATED))
  batch = parallel.placed(summary.abstract_batch(config, heads, 2),
                          jax.sharding.NamedSharding(mesh, parallel.SHARDED))
  return train_fn.lower(state, batch).as_text()


def convolutions(text):
  """(conv line, {SSA name: defining line} of its function) of every
  stablehlo.convolution."""
  found = []
  for function in text.split('func.func')[1:]:
    lines = function.splitlines()
    defined = {line.split('=')[0].strip(): line for line in lines
               if line.strip().startswith('%') and '=' in line}
    found += [(line, defined) for line in lines if 'stablehlo.convolution(' in line]
  return found


def lhs_dilated(line):
  dilation = re.search(r'lhs_dilate = \[([\d, ]+)\]', line)
  return dilation is not None and set(dilation.group(1).split(', ')) != {'1'}


def test_cudnn_train_step_has_the_convolutions_cudnn_takes():
  """XLA:GPU's conv rewriter maps a kernel gradient to cuDNN's backward-filter
  kernel only without an input (lhs) dilation, and a dilated-input conv to
  its backward-data kernel only when the filter is a reverse."""
  for impl in ('xla', 'cudnn'):
    convs = convolutions(lowered_train_step(impl))
    # Kernel gradients: batch and feature swapped, the kernel's shape out.
    kernel_grads = [line for line, _ in convs
                    if 'dim_numbers = [f, 0, 1, b]' in line]
    assert len(kernel_grads) == 12, impl  # 6 convs + 6 transposed convs
    dilated = [line for line in kernel_grads if lhs_dilated(line)]
    if impl == 'xla':
      assert len(dilated) == 6  # the transposed convs' (what the test checks)
      continue
    assert not dilated
    # Input-dilated: the encoder's input gradients (XLA's, reversed filter)
    # and the transposed convs (reversed behind an optimization barrier).
    behind_barrier = 0
    for line, defined in convs:
      if not lhs_dilated(line):
        continue
      rhs = re.search(r'convolution\((%[\w#]+), (%[\w#]+)\)', line).group(2)
      assert 'stablehlo.reverse' in defined[rhs], defined[rhs]
      source = re.search(r'stablehlo.reverse (%[\w#]+)', defined[rhs]).group(1)
      behind_barrier += 'optimization_barrier' in defined.get(source.split('#')[0], '')
    assert behind_barrier == 6
