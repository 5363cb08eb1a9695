"""The model's stride-2 convolutions in formulations that XLA:CPU runs fast.

Each function computes exactly what one of the model's Flax layers computes,
from the same parameter arrays (the HWIO `kernel` and the `bias` that nnx
stores), so the checkpoint layout does not change:

  conv(x, kernel, bias)
      == nnx.Conv(k=4, strides=2, padding=((1, 1), (1, 1)))
  conv_transpose(x, kernel, bias)
      == nnx.ConvTranspose(k=4, strides=2, padding=((2, 2), (2, 2)),
                           transpose_kernel=False)

`conv_transpose_cudnn` is the transposed conv for accelerators (conv_impl
'cudnn'), in the forms XLA:GPU hands to cuDNN's kernels; see its docstring.

Why: XLA:CPU runs a convolution with a dilated input (the input gradient of a
strided conv, and a transposed conv) with a slow generic loop, and kernel
gradients as convolutions with huge windows; that made the model's train step
several times slower than PyTorch's. Here the strided conv's forward pass is
XLA's own convolution, run by Eigen's kernel (programs compiled with the
CPU's compiler options, `platform.CPU_COMPILER_OPTIONS`; under XLA's default
options YNNPACK takes it, 1.5–3× slower), and everything else heavy is a 2-D
matmul or a stride-1 2×2 convolution, between cheap fused re-indexings:

  * Strided conv: `conv_with_matmul_grad` computes the forward pass with one
    form (XLA's conv; with Cin = 1, a direct sum of strided slices) and the
    gradients through a matmul form below (custom VJP). A 2×2 image (the last
    encoder layer at 64 px) is one matmul, `conv_one_pixel`.
  * Strided conv, "shift" form: pad by 1 and space-to-depth by 2 turn the
    4×4 stride-2 conv into a 2×2 stride-1 conv on 4·Cin channels; one matmul
    gives each block's contribution to its 4 neighbouring outputs (4·Cout
    columns), and a shifted sum adds them up.
  * Strided conv, "patches" form (im2col): the 16·Cin values under each
    output's window, times the (16·Cin, Cout) kernel. Cheaper when Cin is
    small (the first layer: Cin = 1) or the image is small.
  * Transposed conv, "sub-pixel" form: output pixel (2m+a, 2n+b) only sees the
    2×2 input window at (m+a-1, n+b-1), through the kernel taps
    (2·dy+a, 2·dx+b); a stride-1 2×2 conv with 4·Cout outputs gives all four
    output phases, then depth-to-space. Its gradient is written by hand
    (custom VJP): a stride-1 conv for the input, a matmul for the kernel.
  * Transposed conv, "col2im" form: each input pixel times the (Cin, 16·Cout)
    kernel, then the overlapping 4×4 footprints are added up. Cheaper when
    Cout is small (the last layer: Cout = 1).

`conv` and `conv_transpose` pick the form from the shapes. Matmuls are always
2-D with one contracting dimension: with several (e.g. (batch, height, width)
for a kernel gradient) XLA:CPU first transposes the big operand, which cost
more than the matmul itself. The kernel re-arrangements happen inside the
jitted function, on the small kernels. Results agree with the lax
convolutions up to float32 rounding (summation order).
"""

import functools

import jax
import jax.numpy as jnp
from flax.nnx.nn import dtypes
from jax import lax

# Forms of the model's convolutions (`models.ModelConfig.conv_impl`): 'xla' =
# the Flax layers (lax convolutions), 'fast' = this module's CPU forms,
# 'cudnn' = the Flax strided convs and `conv_transpose_cudnn` (GPUs).
FORMS = ('xla', 'fast', 'cudnn')


# Layouts of every lax convolution here: NHWC images, HWIO kernels (as nnx).
_NHWC = ('NHWC', 'HWIO', 'NHWC')

# The 2×2 window offsets (dy, dx), in the order of the stacked channels.
_TAPS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _matmul(x: jax.Array, matrix: jax.Array) -> jax.Array:
  """(..., K) @ (K, N) as one 2-D matmul."""
  product = lax.dot_general(x.reshape(-1, x.shape[-1]), matrix,
                            (((1,), (0,)), ((), ())))
  return product.reshape(*x.shape[:-1], matrix.shape[-1])


def _pad_spatial(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _space_to_depth(x: jax.Array) -> jax.Array:
  """(B, 2H, 2W, C) → (B, H, W, 4C); channels (row parity, column parity, c)."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // 2, width // 2,
                                                4 * channels)


def _windows_2x2(x: jax.Array) -> jax.Array:
  """(B, H+1, W+1, C) → (B, H, W, 4C): the 2×2 window at each position.

  Channels are ordered (tap in _TAPS order, c).

  Written as a sum of zero-padded slices, which XLA fuses into one loop (a
  concatenate of slices became five separate copies).
  """
  height, width, channels = x.shape[1] - 1, x.shape[2] - 1, x.shape[3]
  windows = 0
  for tap, (dy, dx) in enumerate(_TAPS):
    block = x[:, dy:dy + height, dx:dx + width]
    windows = windows + jnp.pad(
        block, ((0, 0), (0, 0), (0, 0), (tap * channels, (3 - tap) * channels)))
  return windows


def _interleave_phases(phases) -> jax.Array:
  """phases[a][b]: (B, H, W, C) → (B, 2H, 2W, C).

  out[2m + a, 2n + b] = phases[a][b][m, n].
  """
  batch, height, width, channels = phases[0][0].shape
  rows = [jnp.stack(phases[a], axis=3) for a in (0, 1)]  # (B, H, W, 2[b], C)
  return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, channels)


def conv_patches(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The strided conv as im2col × matmul; see the module docstring."""
  in_channels, out_channels = kernel.shape[2:]
  # Window of output (i, j): taps (2·dy + ry, 2·dx + rx), i.e. the 2×2 window
  # at (i, j) of the space-to-depth image, channels ordered (dy, dx, ry, rx, c).
  patches = _windows_2x2(_space_to_depth(_pad_spatial(x)))
  # (dy, ry, dx, rx, c, o) → rows (dy, dx, ry, rx, c).
  matrix = kernel.reshape(2, 2, 2, 2, in_channels, out_channels)
  matrix = matrix.transpose(0, 2, 1, 3, 4, 5).reshape(16 * in_channels,
                                                      out_channels)
  return _matmul(patches, matrix) + bias


def conv_shift(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The strided conv as space-to-depth, matmul and a shifted sum."""
  in_channels, out_channels = kernel.shape[2:]
  batch, height, width = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
  blocks = _space_to_depth(_pad_spatial(x))  # (B, H+1, W+1, 4·Cin): (ry, rx, c)
  # matrix[(ry, rx, c), (dy, dx, o)] = kernel[2·dy + ry, 2·dx + rx, c, o]
  matrix = kernel.reshape(2, 2, 2, 2, in_channels, out_channels)
  matrix = matrix.transpose(1, 3, 4, 0, 2, 5).reshape(4 * in_channels,
                                                      4 * out_channels)
  # Block (p, q) feeds output (p - dy, q - dx) through tap (dy, dx).
  contributions = _matmul(blocks, matrix).reshape(batch, height + 1,
                                                  width + 1, 4, out_channels)
  out = sum(contributions[:, dy:dy + height, dx:dx + width, tap]
            for tap, (dy, dx) in enumerate(_TAPS))
  return out + bias


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """(4, 4, Cin, Cout) → (2, 2, Cin, 4·Cout).

  [dy, dx, c, (a, b, o)] = kernel[2·dy + a, 2·dx + b, c, o].
  """
  in_channels, out_channels = kernel.shape[2:]
  # (dy, a, dx, b, c, o)
  kernel = kernel.reshape(2, 2, 2, 2, in_channels, out_channels)
  return kernel.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, in_channels,
                                                    4 * out_channels)


def _phases_to_space(phases: jax.Array, out_channels: int) -> jax.Array:
  """(B, H+1, W+1, 4·C) → (B, 2H, 2W, C).

  out[2m + a, 2n + b] = phases[m + a, n + b, (a, b)].
  """
  batch, rows, cols, _ = phases.shape
  height, width = rows - 1, cols - 1
  phases = phases.reshape(batch, rows, cols, 2, 2, out_channels)
  return _interleave_phases([[phases[:, a:a + height, b:b + width, a, b]
                              for b in (0, 1)] for a in (0, 1)])


def _space_to_phases(grad: jax.Array) -> jax.Array:
  """The adjoint of _phases_to_space, as one fused loop (padded slices)."""
  batch, height2, width2, channels = grad.shape
  grad = grad.reshape(batch, height2 // 2, 2, width2 // 2, 2, channels)
  phases = 0
  for a in (0, 1):
    for b in (0, 1):
      phase = 2 * a + b
      phases = phases + jnp.pad(grad[:, :, a, :, b], (
          (0, 0), (a, 1 - a), (b, 1 - b),
          (phase * channels, (3 - phase) * channels)))
  return phases


def _conv2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 VALID correlation with a 2×2 kernel.

  XLA:CPU runs this one well (Eigen, under CPU_COMPILER_OPTIONS): faster
  than the 2×2 windows × matmul it replaces in the forward pass.
  """
  return lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_transpose_subpixel(x: jax.Array, kernel: jax.Array,
                            bias: jax.Array) -> jax.Array:
  """The transposed conv as a 2×2 conv to 4·Cout phases, then depth-to-space.

  XLA's own gradient of that conv computes the kernel gradient as a
  convolution with a huge window (slow on CPU); `_subpixel_vjp` uses a matmul.
  """
  phases = _conv2x2(_pad_spatial(x), _subpixel_kernel(kernel))
  return _phases_to_space(phases, kernel.shape[-1]) + bias


def _subpixel_fwd(x, kernel, bias):
  return conv_transpose_subpixel(x, kernel, bias), (x, kernel)


def _subpixel_vjp(residuals, grad):
  x, kernel = residuals
  in_channels, out_channels = kernel.shape[2:]
  phases_grad = _space_to_phases(grad)  # (B, H+1, W+1, 4·Cout)
  subpixel_kernel = _subpixel_kernel(kernel)
  # Input: the phases are a 2×2 correlation of the padded input, so its
  # gradient is a 2×2 correlation of the padded phase gradient with the
  # flipped kernel (input and output channels swapped).
  flipped = subpixel_kernel[::-1, ::-1].transpose(0, 1, 3, 2)
  x_grad = _conv2x2(_pad_spatial(phases_grad), flipped)[:, 1:-1, 1:-1]
  # Kernel: windows^T @ phase gradient, one (4·Cin, M) × (M, 4·Cout) matmul.
  windows = _windows_2x2(_pad_spatial(x))
  matrix_grad = lax.dot_general(
      windows.reshape(-1, 4 * in_channels),
      phases_grad.reshape(-1, 4 * out_channels), (((0,), (0,)), ((), ())))
  kernel_grad = matrix_grad.reshape(2, 2, in_channels, 2, 2, out_channels)
  kernel_grad = kernel_grad.transpose(0, 3, 1, 4, 2, 5).reshape(kernel.shape)
  return x_grad, kernel_grad, jnp.sum(grad, axis=(0, 1, 2))


conv_transpose_subpixel.defvjp(_subpixel_fwd, _subpixel_vjp)


def conv_transpose_col2im(x: jax.Array, kernel: jax.Array,
                          bias: jax.Array) -> jax.Array:
  """The transposed conv as matmul with (Cin, 16·Cout), then overlap-add."""
  in_channels, out_channels = kernel.shape[2:]
  batch, height, width = x.shape[:3]
  matrix = kernel.transpose(2, 0, 1, 3).reshape(in_channels, 16 * out_channels)
  footprints = _matmul(x, matrix).reshape(batch, height, width, 4, 4,
                                          out_channels)
  # Input pixel i reaches output 2i + 2 - k through tap k; padded by one pixel,
  # output 2m + a gathers taps (k, index into the padded input) below.
  footprints = jnp.pad(footprints,
                       ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  taps = {0: ((2, 1), (0, 0)), 1: ((1, 1), (3, 2))}
  out = _interleave_phases([[
      sum(footprints[:, py:py + height, px:px + width, ky, kx]
          for ky, py in taps[a] for kx, px in taps[b])
      for b in (0, 1)] for a in (0, 1)])
  return out + bias


def conv_lax(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The strided conv as XLA's convolution (Eigen's kernel on the CPU,
  under CPU_COMPILER_OPTIONS): the fastest forward for Cin > 1."""
  return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                  dimension_numbers=_NHWC) + bias


def conv_direct(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The strided conv as a sum of 16·Cin strided slices times kernel rows:
  one fused loop that writes each output once (with the bias and whatever
  element-wise op follows). The first layer's (Cin = 1) fastest forward:
  a conv or matmul with one input channel spends its time in memory passes."""
  height, width = x.shape[1] // 2, x.shape[2] // 2
  padded = _pad_spatial(x)
  out = bias
  for ky in range(4):
    for kx in range(4):
      for c in range(x.shape[3]):
        tap = padded[:, ky:ky + 2 * height:2, kx:kx + 2 * width:2, c:c + 1]
        out = out + tap * kernel[ky, kx, c]
  return out


def conv_one_pixel(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The strided conv of a 2×2 image: its one output pixel sees the image
  through the kernel's central 2×2 taps only (the rest meets the padding),
  so it is one (B, 4·Cin) × (4·Cin, Cout) matmul. XLA:CPU lowers this conv to
  a slow generic loop: the last encoder layer at 64 px took 0.4 ms of 7."""
  batch, height, width, in_channels = x.shape
  if (height, width) != (2, 2):
    raise ValueError(f'conv_one_pixel takes 2×2 images, got {height}×{width}')
  matrix = kernel[1:3, 1:3].reshape(4 * in_channels, kernel.shape[-1])
  return _matmul(x.reshape(batch, 1, 1, 4 * in_channels), matrix) + bias


_CONV_FORMS = {'lax': conv_lax, 'direct': conv_direct,
               'patches': conv_patches, 'shift': conv_shift}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_with_matmul_grad(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                          forward_form: str, grad_form: str) -> jax.Array:
  """The strided conv computed by `forward_form`, differentiated through
  `grad_form` (a matmul form: XLA's own gradients of a strided conv are a
  dilated conv and a huge-window conv, both slow on the CPU)."""
  return _CONV_FORMS[forward_form](x, kernel, bias)


def _conv_fwd(x, kernel, bias, forward_form, grad_form):
  return conv_with_matmul_grad(x, kernel, bias, forward_form,
                               grad_form), (x, kernel)


def _conv_vjp(forward_form, grad_form, residuals, grad):
  del forward_form
  x, kernel = residuals
  # The form is linear in (x, kernel); XLA drops its unused forward matmul.
  _, vjp = jax.vjp(lambda x, kernel: _CONV_FORMS[grad_form](x, kernel, 0.0),
                   x, kernel)
  return (*vjp(grad), jnp.sum(grad, axis=(0, 1, 2)))


conv_with_matmul_grad.defvjp(_conv_fwd, _conv_vjp)


# Jitted so that eager calls (notebooks, tests) compile one program per layer
# instead of one per small op; inside a jitted step this is inlined.
@functools.partial(jax.jit, static_argnames='dtype')
def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
         dtype=None) -> jax.Array:
  """nnx.Conv(k=4, strides=2, padding=((1, 1), (1, 1))) on NHWC `x`.

  `kernel` is (4, 4, Cin, Cout) HWIO and `bias` (Cout,), as nnx stores them;
  `dtype` is the layer's compute dtype, cast to as the layer does.
  """
  x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
  if x.shape[1:3] == (2, 2):
    # One matmul; XLA differentiates that as fast as any form here.
    return conv_one_pixel(x, kernel, bias)
  grad_form = ('patches' if _patches_cost(x.shape, kernel.shape)
               <= _shift_cost(x.shape, kernel.shape) else 'shift')
  return conv_with_matmul_grad(x, kernel, bias,
                               _forward_form(x.shape, kernel.shape), grad_form)


def _forward_form(x_shape, kernel_shape) -> str:
  """The fastest forward in per-layer measurements (batch 32, 64 and 256 px,
  under CPU_COMPILER_OPTIONS): XLA's conv, except for the single input
  channel of the first layer (direct: 40 ms at 256 px where XLA's conv takes
  81 and PyTorch's 80)."""
  del kernel_shape
  return 'direct' if x_shape[-1] == 1 else 'lax'


# Rough cost of a formulation's train step, in float32 values moved through
# memory (written, then read) plus FLOPs / 100 (on the 2-core CPU a value
# moved costs about as much time as 100 FLOPs); `conv` uses it to pick the
# gradient form. It picks patches for the first layer (Cin = 1) and for small
# images, the shifted sum elsewhere: the faster one in per-layer forward +
# backward measurements at 64 and 256 px.
def _patches_cost(x_shape, kernel_shape):
  batch, height, width, _ = x_shape
  cin, cout = kernel_shape[2:]
  positions = batch * (height // 2) * (width // 2)
  return positions * (2 * 16 * cin + 32 * cin * cout / 100)


def _shift_cost(x_shape, kernel_shape):
  batch, height, width, _ = x_shape
  cin, cout = kernel_shape[2:]
  positions = batch * (height // 2 + 1) * (width // 2 + 1)
  return positions * (2 * 4 * (cin + cout) + 32 * cin * cout / 100)


@functools.partial(jax.jit, static_argnames='dtype')
def conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   dtype=None) -> jax.Array:
  """nnx.ConvTranspose(k=4, strides=2, padding=((2, 2), (2, 2))) on NHWC `x`.

  (transpose_kernel=False: out[o] = Σ_k x_dilated[o + k - 2] · kernel[k].)
  """
  x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
  in_channels, out_channels = kernel.shape[2:]
  # Memory per input position: 4·Cin + 4·Cout for sub-pixel, 16·Cout for
  # col2im; the last layer (Cout = 1) takes col2im.
  if 3 * out_channels < in_channels:
    return conv_transpose_col2im(x, kernel, bias)
  return conv_transpose_subpixel(x, kernel, bias)



# nnx.ConvTranspose's padding of the dilated input (k - 1 - p for PyTorch's p = 1).
_TRANSPOSE_PADDING = ((2, 2), (2, 2))


def _reversed(kernel: jax.Array) -> jax.Array:
  """The kernel with both spatial axes reversed."""
  return lax.rev(kernel, (0, 1))


def _strided_conv_hwoi(grad: jax.Array, flipped: jax.Array) -> jax.Array:
  """(B, 2H, 2W, Cout) → (B, H, W, Cin): the k=4, s=2, p=1 conv with the
  flipped kernel read as HWOI (its output channels are the kernel's inputs)."""
  return lax.conv_general_dilated(grad, flipped, (2, 2), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWOI', 'NHWC'))


@jax.custom_vjp
def conv_transpose_reversed(x: jax.Array, kernel: jax.Array,
                            bias: jax.Array) -> jax.Array:
  """nnx.ConvTranspose's function in the patterns that XLA:GPU's conv
  rewriter maps to cuDNN's kernels (conv_rewriter.cc):

  * forward: a conv with an input (lhs) dilation becomes cuDNN's
    backward-data kernel only when its filter is an explicit reverse. The
    filter here is reverse(reverse(kernel)); the optimization barrier keeps
    XLA's simplifier from folding the two reverses into the kernel itself.
  * input gradient: the strided conv of the output gradient with the flipped
    kernel (cuDNN's forward kernel).
  * kernel gradient: that strided conv's kernel gradient, with a kernel
    (rhs) dilation and no input dilation (cuDNN's backward-filter kernel).
    XLA's own kernel gradient of the forward keeps its input dilation, which
    no cuDNN kernel takes: a forward conv whose filter is the whole gradient.
  """
  flipped = lax.optimization_barrier(_reversed(kernel))
  out = lax.conv_general_dilated(x, _reversed(flipped), (1, 1),
                                 _TRANSPOSE_PADDING, lhs_dilation=(2, 2),
                                 dimension_numbers=_NHWC)
  return out + bias


def _reversed_fwd(x, kernel, bias):
  return conv_transpose_reversed(x, kernel, bias), (x, kernel)


def _reversed_vjp(residuals, grad):
  x, kernel = residuals
  # out[2i + 2 - k] gets x[i] · kernel[k], so the input gradient at i is
  # Σ_k grad[2i - 1 + k] · kernel[3 - k]: a strided conv of the gradient with
  # the flipped kernel; the kernel gradient is that conv's kernel gradient for
  # the cotangent x, flipped back.
  x_grad, kernel_vjp = jax.vjp(lambda flipped: _strided_conv_hwoi(grad, flipped),
                               _reversed(kernel))
  (flipped_grad,) = kernel_vjp(x)
  return x_grad, _reversed(flipped_grad), jnp.sum(grad, axis=(0, 1, 2))


conv_transpose_reversed.defvjp(_reversed_fwd, _reversed_vjp)


@functools.partial(jax.jit, static_argnames='dtype')
def conv_transpose_cudnn(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                         dtype=None) -> jax.Array:
  """`conv_transpose` for accelerators: `conv_transpose_reversed`, cast to
  the layer's compute dtype as nnx does."""
  x, kernel, bias = dtypes.promote_dtype((x, kernel, bias), dtype=dtype)
  return conv_transpose_reversed(x, kernel, bias)
