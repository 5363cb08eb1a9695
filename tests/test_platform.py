"""The platform policy: what the CPU and an accelerator compute with."""

import subprocess

import pytest

from e2e_support import REPO_ROOT
from pumamednet_jax import fast_conv
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib


def test_cpu_devices_get_the_fast_convs_options_and_chunks():
  policy = platform_lib.for_mesh(parallel.create_mesh())
  assert policy.platform == 'cpu'
  assert policy.conv_impl == 'fast'
  assert policy.compiler_options == platform_lib.CPU_COMPILER_OPTIONS
  # At most 16 images and 2·256² pixels a micro-batch, a divisor of the batch.
  assert [policy.micro_batch_size(32, size) for size in (64, 128, 256, 512)] == [
      16, 8, 2, 1]
  assert policy.micro_batch_size(24, 128) == 8
  assert policy.micro_batch_size(3, 256) == 1
  assert policy.micro_batch_size(8, 64) == 8  # small enough: the whole batch
  # Inference: chunks of at most 2·256² pixels, a divisor of the batch.
  assert policy.inference_chunk((32, 256, 256, 1)) == 2
  assert policy.inference_chunk((6, 128, 128, 1)) == 6
  assert policy.inference_chunk((5, 256, 256, 1)) == 1
  assert policy.inference_chunk((12, 64, 64, 1)) == 12


@pytest.mark.parametrize('platform', ['gpu', 'tpu'])
def test_accelerators_get_lax_convs_no_options_and_whole_batches(platform):
  policy = platform_lib.for_platform(platform)
  assert policy.platform == platform
  assert policy.conv_impl == 'xla'
  assert policy.compiler_options == {}
  assert policy.micro_batch_size(32, 256) == 32
  assert policy.inference_chunk((32, 512, 512, 1)) == 32


@pytest.mark.parametrize('platform', ['cpu', 'gpu'])
@pytest.mark.parametrize('conv_impl', fast_conv.FORMS)
def test_a_configured_conv_form_is_kept(platform, conv_impl):
  assert platform_lib.for_platform(platform, conv_impl).conv_impl == conv_impl


def test_a_bad_conv_impl_names_the_config_key():
  with pytest.raises(ValueError, match=r'config\.model\.conv_impl'):
    platform_lib.for_platform('cpu', 'bogus')


def test_nothing_in_the_package_asks_jax_for_its_backend():
  # Platform choices come from the mesh's devices, through the policy.
  found = subprocess.run(
      ['grep', '-rl', '--include=*.py', 'default_backend', 'pumamednet_jax'],
      cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
  assert found == []
