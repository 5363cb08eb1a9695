"""Side-by-side speed of the model in JAX (each conv_impl) and PyTorch eager.

Batch 32, float32, on this machine's CPU. In ONE process, rounds alternate
between the entries (JAX train step per conv_impl, the PyTorch train step,
inference of each, a JAX matmul as the machine's peak), so that load from
other processes hits all of them alike; medians over the rounds are reported.

  train step  forward + backward of MSE reconstruction + β·KL + BCE on the
              multi-label head w.r.t. all parameters, then an Adam update
  encode      encoder + classifier on mu (inference)
  reconstruct encoder + decoder on mu (inference)

GFLOP/s use the FLOPs that XLA counts for the plain ('xla') formulation of the
same computation, so that numbers are comparable across entries.

  .venv/bin/python -m scripts.conv_speed --image_sizes=64,256 --rounds=7
"""

import ctypes
import dataclasses
import json
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from configs import default
from input_pipeline import labels as labels_lib
from pumamednet_jax import heads as heads_lib
from pumamednet_jax import models
from pumamednet_jax import torch_convert
from pumamednet_jax import torch_model

_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['64', '256'], 'Image sides.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Alternating rounds (medians over them).')
_IMPLS = flags.DEFINE_list(
    'conv_impls', ['xla', 'matmul'],
    "JAX conv_impl values; 'xla' at 256 px takes ~10 s per train step.")
_SKIP_XLA_TRAIN_ABOVE = flags.DEFINE_integer(
    'skip_xla_train_above', 128,
    "Leave out the 'xla' train step above this image size (it is very slow); "
    'its FLOP count is still used.')
_TORCH_THREADS = flags.DEFINE_integer('torch_threads', 2, 'torch.set_num_threads.')
_COMPILER_OPTIONS = flags.DEFINE_string(
    'compiler_options', '{}',
    'JSON dict of XLA debug options for every JAX compilation, e.g. '
    '\'{"xla_cpu_use_xnnpack": false}\'.')
_OUTPUT_JSON = flags.DEFINE_string('output_json', '', 'Also write results here.')
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    'keep_freed_memory', False,
    'Make glibc malloc serve every allocation from its heap and never give '
    'freed memory back (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=max), so that '
    'big buffers are not page-faulted in anew each step (for both frameworks).')

LEARNING_RATE = 1e-3


def _heads():
  return (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL,
                             names=tuple(labels_lib.LABELS)),)


def _model_config(image_size: int, conv_impl: str) -> models.ModelConfig:
  config = default.get_config()
  config.image_size = image_size
  return dataclasses.replace(models.model_config(config, _heads()),
                             conv_impl=conv_impl)


def _jax_loss(model_config, params, images, targets, eps):
  model = models.bind(model_config, params)
  mu, logvar = model.encode(images)
  z = mu + jnp.exp(0.5 * logvar) * eps
  recon, heads = model.decode(z), model.classify(z)
  kl = -0.5 * jnp.mean(jnp.sum(1 + logvar - mu**2 - jnp.exp(logvar), axis=-1))
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(heads['labels'], targets))
  return jnp.mean((recon - images)**2) + kl / images[0].size + bce


def _torch_loss(model, images, targets, eps):
  mu, logvar = model.encode(images)
  z = mu + torch.exp(0.5 * logvar) * eps
  recon, heads = model.decode(z), model.classify(z)
  kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu**2 - torch.exp(logvar), dim=-1))
  bce = torch.nn.functional.binary_cross_entropy_with_logits(heads['labels'], targets)
  return torch.mean((recon - images)**2) + kl / images[0].numel() + bce


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


class _Entry:
  """A timed callable; `run` blocks until its result is ready."""

  def __init__(self, name, run, flops_key):
    self.name, self.run, self.flops_key = name, run, flops_key
    self.seconds = []
    self.faults = []


def _jax_entries(image_size, batch, impl, options, flops, skip_train):
  model_config = _model_config(image_size, impl)
  optimizer = optax.adam(LEARNING_RATE)
  images, targets, eps = batch

  def train_step(params, opt_state, images, targets, eps):
    loss, grads = jax.value_and_grad(
        lambda p: _jax_loss(model_config, p, images, targets, eps))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def encode(params, images):
    model = models.bind(model_config, params)
    mu, _ = model.encode(images)
    return model.classify(mu)['labels']

  def reconstruct(params, images):
    model = models.bind(model_config, params)
    return model.decode(model.encode(images)[0])

  params = models.init_params(model_config, 0)
  state = {'params': params, 'opt': optimizer.init(params)}
  entries = []
  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      state['params'], state['opt'], images, targets, eps).compile(options)
  flops[(image_size, 'train')] = flops.get((image_size, 'train')) or _flops(step)
  compile_s = time.perf_counter() - start
  print(f'  {image_size}px jax {impl}: train step compiled in {compile_s:.1f} s, '
        f'XLA counts {_flops(step) / 1e9:.2f} GFLOP, temp buffers '
        f'{step.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB', flush=True)

  def run_step():
    state['params'], state['opt'], loss = step(state['params'], state['opt'],
                                               images, targets, eps)
    loss.block_until_ready()
  if not skip_train:
    entries.append(_Entry(f'jax {impl} train', run_step, (image_size, 'train')))
  for name, fn in (('encode', encode), ('reconstruct', reconstruct)):
    compiled = jax.jit(fn).lower(params, images).compile(options)
    flops[(image_size, name)] = flops.get((image_size, name)) or _flops(compiled)
    entries.append(_Entry(
        f'jax {impl} {name}',
        lambda c=compiled: jax.block_until_ready(c(state['params'], images)),
        (image_size, name)))
  return entries


def _torch_entries(image_size, batch):
  model_config = _model_config(image_size, 'xla')
  torch_config = torch_model.ModelConfig.from_json(
      {k: v for k, v in model_config.to_json().items() if k != 'conv_impl'})
  model = torch_model.PumaMedNet(torch_config)
  state_dict = torch_convert.flax_to_torch(models.init_params(model_config, 0),
                                           model_config)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  optimizer = torch.optim.Adam(model.parameters(), LEARNING_RATE)
  images, targets, eps = (torch.from_numpy(np.asarray(a)) for a in batch)
  images = images.permute(0, 3, 1, 2).contiguous()

  def train_step():
    loss = _torch_loss(model, images, targets, eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  def encode():
    with torch.no_grad():
      model.classify(model.encode(images)[0])

  def reconstruct():
    with torch.no_grad():
      model.decode(model.encode(images)[0])
  return [_Entry('torch train', train_step, (image_size, 'train')),
          _Entry('torch encode', encode, (image_size, 'encode')),
          _Entry('torch reconstruct', reconstruct, (image_size, 'reconstruct'))]


def _matmul_entry(options):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
  compiled = jax.jit(lambda a: a @ a).lower(a).compile(options)
  return _Entry('jax matmul 2048^3', lambda: compiled(a).block_until_ready(),
                'matmul'), 2.0 * 2048**3


def _time_rounds(entries, rounds):
  for entry in entries:  # warm-up (first runs allocate and fault in memory)
    entry.run()
    entry.run()
  for _ in range(rounds):
    for entry in entries:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      entry.run()
      entry.seconds.append(time.perf_counter() - start)
      entry.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def keep_freed_memory():
  """glibc: no mmap for big blocks, no trimming, so freed memory is reused."""
  libc = ctypes.CDLL('libc.so.6')
  m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
  if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
    raise RuntimeError('mallopt failed')


def main(argv):
  del argv
  if _KEEP_FREED_MEMORY.value:
    keep_freed_memory()
  torch.set_num_threads(_TORCH_THREADS.value)
  options = json.loads(_COMPILER_OPTIONS.value)
  print(f'jax {jax.__version__} ({jax.default_backend()}, '
        f'{jax.local_devices()[0].device_kind}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), batch {_BATCH_SIZE.value}, '
        f'options {options}, keep_freed_memory {_KEEP_FREED_MEMORY.value}',
        flush=True)
  results = []
  for image_size in (int(s) for s in _IMAGE_SIZES.value):
    rng = np.random.default_rng(image_size)
    batch = (rng.random((_BATCH_SIZE.value, image_size, image_size, 1), np.float32),
             (rng.random((_BATCH_SIZE.value, len(labels_lib.LABELS))) < 0.2
              ).astype(np.float32),
             rng.standard_normal((_BATCH_SIZE.value, 100), np.float32))
    flops, entries = {}, []
    for impl in _IMPLS.value:
      skip = impl == 'xla' and image_size > _SKIP_XLA_TRAIN_ABOVE.value
      entries += _jax_entries(image_size, tuple(jnp.asarray(a) for a in batch),
                              impl, options, flops, skip)
    entries += _torch_entries(image_size, batch)
    matmul, flops['matmul'] = _matmul_entry(options)
    entries.append(matmul)
    _time_rounds(entries, _ROUNDS.value)
    torch_median = {e.flops_key: float(np.median(e.seconds))
                    for e in entries if e.name.startswith('torch')}
    print(f'\n{image_size}px, batch {_BATCH_SIZE.value}, {_ROUNDS.value} rounds '
          '(ms: median [min-max]; speed vs torch = torch median / median)')
    for e in entries:
      median = float(np.median(e.seconds))
      row = {'image_size': image_size, 'entry': e.name,
             'median_ms': 1e3 * median, 'min_ms': 1e3 * min(e.seconds),
             'max_ms': 1e3 * max(e.seconds),
             'gflops_per_s': flops[e.flops_key] / median / 1e9,
             'speed_vs_torch': torch_median.get(e.flops_key, np.nan) / median,
             'page_faults_mib': float(np.median(e.faults)) * 4 / 1024}
      results.append(row)
      print(f"  {e.name:24s} {row['median_ms']:9.1f} [{row['min_ms']:.1f}-"
            f"{row['max_ms']:.1f}]  {row['speed_vs_torch']:5.2f}x torch  "
            f"{row['gflops_per_s']:6.1f} GFLOP/s  faults {row['page_faults_mib']:5.0f} MiB",
            flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
