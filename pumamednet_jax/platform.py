"""How the model is computed on the devices it runs on: the platform policy.

Decided once, from the platform of the mesh's devices ('cpu', 'gpu', 'tpu'),
where the mesh is built, and passed down as plain values: the form of the
convolutions, the chunks that inference and the eval step run in, the
automatic micro-batch of the train step, and the XLA compiler options of the
jitted programs. Nothing else in the package asks JAX which backend it runs.
"""

import dataclasses
from collections.abc import Iterable

import jax

from pumamednet_jax import fast_conv

# config.model.conv_impl: a form of `fast_conv.FORMS`, or 'auto': 'fast' on
# the CPU, 'xla' elsewhere (cuDNN and the TPU convolution emitters handle
# strided and transposed convolutions well).
CONV_IMPLS = ('auto', *fast_conv.FORMS)

# On the CPU the model runs over pieces of the batch of at most this many
# pixels: inference and the eval step in chunks, the train step in
# micro-batches (also at most CPU_MICRO_BATCH_IMAGES images). XLA:CPU
# allocates a program's temporaries as one block per call; glibc maps a block
# over 32 MB afresh at every call, and whether it recycles one a little
# smaller depends on the process's history; a fresh block is page-faulted
# through at every call (docs/platform.md has the measurements).
CPU_CHUNK_PIXELS = 2 * 256 * 256
CPU_MICRO_BATCH_IMAGES = 16

# XLA:CPU compiler options for every program that runs the model. XLA:CPU
# hands convolutions to YNNPACK by default, and for this model's strided
# convolutions its Eigen kernels are faster (the forward form of
# `fast_conv.conv` is XLA's own convolution); YNNPACK keeps the dots and
# reductions, as by default.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


@dataclasses.dataclass(frozen=True)
class Policy:
  """The platform's choices, as plain values."""

  platform: str  # the devices' platform: 'cpu', 'gpu', 'tpu'
  conv_impl: str  # the convolutions' form, one of `fast_conv.FORMS`
  # Pixels per piece of the batch, and images per automatic micro-batch;
  # None: the whole batch in one piece.
  chunk_pixels: int | None
  micro_batch_images: int | None
  # `jax.jit(..., compiler_options=...)` of every program that runs the model.
  compiler_options: dict[str, str] = dataclasses.field(
      default_factory=dict, hash=False)

  def inference_chunk(self, shape: tuple[int, ...]) -> int:
    """Images per chunk of an inference or eval pass over a batch of images
    of `shape` (batch, height, width, ...)."""
    batch, height, width = shape[:3]
    if self.chunk_pixels is None:
      return batch
    return chunk_size(batch, self.chunk_pixels // (height * width))

  def micro_batch_size(self, local_size: int, image_size: int) -> int:
    """Examples per forward and backward pass of the train step when the
    config leaves it automatic."""
    if self.chunk_pixels is None:
      return local_size
    return chunk_size(local_size, min(self.micro_batch_images,
                                      self.chunk_pixels // image_size**2))


def chunk_size(batch: int, limit: int) -> int:
  """The largest divisor of `batch` that is at most `limit` (at least 1)."""
  return max(d for d in range(1, min(batch, max(limit, 1)) + 1) if batch % d == 0)


def check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(
        f'config.model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')


def for_platform(platform: str, conv_impl: str = 'auto') -> Policy:
  """The policy of devices of `platform`; `conv_impl` is the config's."""
  check_conv_impl(conv_impl)
  on_cpu = platform == 'cpu'
  if conv_impl == 'auto':
    conv_impl = 'fast' if on_cpu else 'xla'
  return Policy(
      platform=platform,
      conv_impl=conv_impl,
      chunk_pixels=CPU_CHUNK_PIXELS if on_cpu else None,
      micro_batch_images=CPU_MICRO_BATCH_IMAGES if on_cpu else None,
      compiler_options=dict(CPU_COMPILER_OPTIONS) if on_cpu else {})


def for_devices(devices: Iterable[jax.Device], conv_impl: str = 'auto') -> Policy:
  """The policy of `devices` (all of one platform)."""
  platforms = sorted({device.platform for device in devices})
  if len(platforms) != 1:
    raise ValueError(f'the mesh needs devices of one platform, got {platforms}')
  return for_platform(platforms[0], conv_impl)


def for_mesh(mesh: jax.sharding.Mesh, conv_impl: str = 'auto') -> Policy:
  """The policy of the mesh's devices."""
  return for_devices(mesh.devices.flat, conv_impl)
