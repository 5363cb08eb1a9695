"""The benchmark: its PyTorch step computes our losses, and it reports what
the issue asks for. (Speeds are measured by running it, never asserted.)"""

import math
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from e2e_support import shrink
from input_pipeline import pipeline
from pumamednet_jax import benchmark
from pumamednet_jax import losses
from pumamednet_jax import models


def tiny_setup(**overrides):
  config = shrink(default.get_config(), **overrides)
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  return config, models.model_config(config, heads, 'fast')


def test_torch_loss_is_the_jax_loss():
  # β and the weights away from 1, so that a misplaced factor shows.
  config, model_config = tiny_setup(loss__beta=300.0, loss__recon_weight=0.5,
                                    loss__classification_weight=2.0)
  params = models.init_params(model_config, seed=3)
  batch = benchmark.synthetic_batch(config, model_config.heads, batch_size=4)
  torch_entries = benchmark.TorchEntries(config, model_config, params, batch,
                                         'cpu')

  clean, defective = benchmark.defective_pair(config, batch)
  reconstruction, head_outputs, latents = jax.jit(
      lambda p, x: models.bind(model_config, p)(x))(params, defective)
  jax_loss, terms = losses.total_loss(
      reconstruction=reconstruction, clean=jnp.asarray(clean),
      head_outputs=head_outputs, latents=latents,
      batch={k: jnp.asarray(v) for k, v in batch.items()},
      heads=model_config.heads,
      weight_map=jnp.asarray(losses.lung_weight_map(config.image_size,
                                                    config.loss.lung_weight)),
      step=jnp.asarray(0), config=losses.LossConfig.from_config(config))
  assert float(terms['kl']) > 0  # the KL term takes part
  np.testing.assert_allclose(torch_entries.eval_loss(), float(jax_loss),
                             rtol=1e-5)
  # Micro-batches' losses are their shares of the batch's: they add up to it.
  parts = []
  with torch_entries.torch.no_grad():
    for part in (slice(0, 1), slice(1, 4)):
      reconstruction, outputs, latents = torch_entries.model(
          torch_entries.defective[part])
      parts.append(float(torch_entries._loss(  # pylint: disable=protected-access
          reconstruction, latents, outputs, part)))
  np.testing.assert_allclose(sum(parts), float(jax_loss), rtol=1e-5)


def test_benchmark_reports_every_figure(phantom_data_dir):
  # In bfloat16, which the train step must also run in (parameters float32).
  # Micro-batches of 4: the PyTorch step is also timed over them.
  config, _ = tiny_setup(data_dir=str(phantom_data_dir), model__dtype='bfloat16',
                         micro_batch_size=4)
  results = benchmark.run(config, vs_torch=True, rounds=1, steps=1,
                          measure_pipeline=True, pipeline_batches=2)
  for key in ('train_images_per_sec', 'infer_images_per_sec',
              'pipeline_images_per_sec', 'train_flops_per_image',
              'achieved_gflops', 'matmul_peak_gflops',
              'torch_train_images_per_sec', 'torch_infer_images_per_sec',
              'train_speedup_vs_torch', 'infer_speedup_vs_torch',
              'compile_seconds', 'peak_memory_bytes',
              'torch_micro_train_images_per_sec', 'train_speedup_vs_torch_micro'):
    assert math.isfinite(results[key]) and results[key] > 0, key
  assert results['batch_size'] == config.batch_size
  assert results['micro_batch_size'] == 4
  assert results['dtype'] == 'bfloat16'
  assert results['device_count'] >= 1 and results['device_kind']
  assert results['cpu_model'] in benchmark.format_table(results)
  np.testing.assert_allclose(
      results['achieved_gflops'],
      results['train_flops_per_image'] * results['train_images_per_sec'] / 1e9)
  assert results['glibc_tunables'] == os.environ.get('GLIBC_TUNABLES', '')
  table = benchmark.format_table(results)
  assert 'PyTorch train step' in table and 'input pipeline' in table
  assert 'allocator' in table
  assert 'micro-batches of 4' in table and 'PyTorch train step, micro' in table
  assert set(results['page_faults_per_call']) == {
      f'{framework}/{kind}' for framework in ('jax', 'torch')
      for kind in ('train', 'infer', 'reconstruct')} | {'torch/train_micro'}
  assert all(f >= 0 for f in results['page_faults_per_call'].values())
  assert 'minor page faults per call' in table
  assert results['torch_device'] == 'cpu'  # where JAX runs (the CPU here)
  assert 'PyTorch port' in table


def test_torch_computes_a_bfloat16_model_in_bfloat16():
  # As the JAX model does (parameters float32): its latent means then differ
  # from float32's by bfloat16's rounding, and from JAX's by about as much.
  config, model_config = tiny_setup(model__dtype='bfloat16')
  params = models.init_params(model_config, seed=3)
  batch = benchmark.synthetic_batch(config, model_config.heads, batch_size=4)
  torch_entries = benchmark.TorchEntries(config, model_config, params, batch,
                                         'cpu')
  with torch_entries.torch.no_grad():
    float32_mu = torch_entries.model(torch_entries.defective)[2]['mu'].numpy()
    bfloat16_mu = torch_entries._model(  # pylint: disable=protected-access
        torch_entries.defective)[2]['mu'].numpy()
  _, defective = benchmark.defective_pair(config, batch)
  jax_mu = jax.jit(lambda p, x: models.bind(model_config, p).encode(x)[0])(
      params, defective)
  relative = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert 1e-4 < relative(bfloat16_mu, float32_mu) < 3e-2
  assert relative(bfloat16_mu, np.asarray(jax_mu, np.float32)) < 3e-2


def test_timing_counts_the_page_faults_of_fresh_memory():
  # 64 MB of a fresh anonymous mapping written at every call: the kernel maps
  # each page at its first touch (16,384 of 4 kB; 32 of 2 MB with transparent
  # huge pages always on). Writing memory already touched costs none.
  def fresh_memory():
    with mmap.mmap(-1, 64 * 2**20) as mapping:
      pages = np.frombuffer(mapping, np.float32)
      pages.fill(1.0)
      del pages  # the mapping closes only without views
  reused = np.ones(16 * 2**20, np.float32)
  def same_memory():
    reused.fill(2.0)
  _, fresh_faults = benchmark._timed(fresh_memory, repeats=3)
  _, reused_faults = benchmark._timed(same_memory, repeats=3)
  assert fresh_faults >= 16
  assert reused_faults < fresh_faults / 4



def test_cpu_model_names_the_cpu_and_its_vector_extensions():
  described = benchmark.cpu_model()
  with open('/proc/cpuinfo', encoding='utf-8') as file:
    names = {line.split(':', 1)[1].strip() for line in file
             if line.startswith('model name')}
  assert any(described.startswith(name) for name in names), (described, names)
  assert described.endswith(')') and (
      'avx2' in described or 'no AVX2' in described)
