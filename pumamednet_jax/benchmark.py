"""Throughput benchmark.

  python -m pumamednet_jax.benchmark --config CONFIG [--batch N]
      [--image_size S] [--vs_torch] [--json OUT]

Measures, on this process's devices: compile time of the train step; steady
state train-step and inference images/s (after warm-up, timed with
`block_until_ready`); FLOPs per image from XLA's cost analysis (of the model
computed with lax convolutions, whatever `model.conv_impl` runs); the achieved
GFLOP/s and its fraction of a matmul peak measured in the same run; the input
pipeline's images/s (the real tf.data pipeline alone, from prepared data);
peak memory; device kind and count.

The train step is the real one (`train.make_steps`: on-device defects, model,
all losses, Adam) on a fixed synthetic batch. Rounds of every measurement
alternate, and the figures are medians over rounds, so that load from other
processes on a shared machine hits everything alike; each measurement of a
round starts with one untimed call and lasts at least 0.25 s. With
`--vs_torch`, the same architecture (`torch_model`, with the same weights) and
the same losses run in PyTorch eager on the same batch, on the same kind of
device (the CPU with the same thread count, or a CUDA GPU) in the same dtype,
in the same rounds (and, when the JAX step uses micro-batches, over them too);
speed-ups are medians over rounds of the per-round ratio. The
PyTorch step gets its defective images for free (made once, up front), so
the JAX step, which makes them on the device each step, does more work.
"""

import functools
import json
import os
import resource
import statistics
import time

import cpuinfo
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from input_pipeline import heads as heads_lib
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import losses
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import summary
from pumamednet_jax import train


def defective_pair(config, batch) -> tuple[np.ndarray, np.ndarray]:
  """(clean, defective) float images of a host batch, defects drawn once."""
  clean = batch['image'].astype(np.float32) / 255.0
  defect_config = defects_lib.DefectConfig.from_config(config)
  defective = jax.jit(lambda key, images: defects_lib.random_defects_batch(
      key, images, defect_config))(jax.random.key(config.seed), clean)
  return clean, np.asarray(defective)


def synthetic_batch(config, heads, batch_size: int, seed: int = 0) -> dict:
  """A training batch with the shapes and dtypes of the real one."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, spec in summary.abstract_batch(config, heads, batch_size).items():
    if name == 'image':
      batch[name] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
    elif spec.dtype == jnp.int32:
      batch[name] = rng.integers(0, 2, spec.shape).astype(np.int32)
    else:
      batch[name] = rng.integers(0, 2, spec.shape).astype(np.float32)
  return batch


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready(), tree)
  return tree


# Each timed measurement of a round lasts at least this long: an inference
# call takes milliseconds, and a few of them alone are mostly noise.
MIN_SECONDS_PER_MEASUREMENT = 0.25


def _minor_page_faults() -> int:
  """The process's minor page faults so far (first touches of fresh pages)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn, repeats: int, min_seconds: float = 0.0) -> tuple[float, float]:
  """Seconds and minor page faults per call of `fn` (which must finish its
  work), over at least `repeats` calls and `min_seconds`."""
  faults = _minor_page_faults()
  calls, start = 0, time.perf_counter()
  while calls < repeats or time.perf_counter() - start < min_seconds:
    fn()
    calls += 1
  seconds = (time.perf_counter() - start) / calls
  return seconds, (_minor_page_faults() - faults) / calls


def matmul_peak_gflops(dtype: str, platform: str, repeats: int = 5) -> float:
  """Best GFLOP/s of a square matmul in `dtype` (the model's compute dtype:
  a bfloat16 model is held to the bfloat16 peak) on the default device, of
  `platform`."""
  n = 2048 if platform == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  _block(matmul(a, b))
  best = min(_timed(lambda: _block(matmul(a, b)), 1)[0] for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def peak_memory() -> tuple[float, str]:
  """Peak bytes in use on the first local device, else the host's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return float(stats['peak_bytes_in_use']), 'device peak bytes in use'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return float(rss), 'host peak RSS (whole process)'


class JaxEntries:
  """The JAX train step and inference functions on one batch; the train step
  compiled with `compiler_options` (XLA flags) besides the mesh's own."""

  def __init__(self, config, model_config, batch_size: int, mesh,
               policy: platform_lib.Policy,
               compiler_options: dict[str, str] | None = None):
    self.model_config = model_config
    optimizer = train.create_optimizer(config)
    train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                      policy)
    replicated = jax.sharding.NamedSharding(mesh, parallel.REPLICATED)
    self.state = jax.jit(
        functools.partial(train.create_train_state, model_config, optimizer,
                          config.seed), out_shardings=replicated)()
    host_batch = synthetic_batch(config, model_config.heads, batch_size)
    self.host_batch = host_batch
    self.batch = parallel.shard_batch(host_batch, mesh)
    start = time.perf_counter()
    self.train_compiled = train_fn.lower(self.state, self.batch).compile(
        compiler_options or None)
    self.compile_seconds = time.perf_counter() - start

    def encode_classify(params, images):
      model = models.bind(model_config, params)
      return models.in_chunks(lambda x: model.classify(model.encode(x)[0]),
                              images, policy.inference_chunk(images.shape))

    def reconstruct(params, images):
      model = models.bind(model_config, params)
      return models.in_chunks(lambda x: model(x)[0], images,
                              policy.inference_chunk(images.shape))

    self.images = parallel.shard_batch(
        {'x': host_batch['image'].astype(np.float32) / 255.0}, mesh)['x']
    data_parallel = functools.partial(
        parallel.data_parallel, mesh=mesh, out_specs=parallel.SHARDED,
        donate_state=False, compiler_options=policy.compiler_options)
    self.infer_fn = data_parallel(encode_classify)
    self.reconstruct_fn = data_parallel(reconstruct)
  def train_step(self):
    self.state, step_metrics = self.train_compiled(self.state, self.batch)
    _block((self.state.params, step_metrics))

  def infer(self):
    _block(self.infer_fn(self.state.params, self.images))

  def reconstruct(self):
    _block(self.reconstruct_fn(self.state.params, self.images))


def torch_device(torch, platform: str):
  """Where the PyTorch port runs: on the device kind that JAX runs on (of
  `platform`)."""
  if platform == 'cpu':
    return torch.device('cpu')
  if platform == 'gpu' and torch.cuda.is_available():
    return torch.device('cuda')
  raise RuntimeError(
      f'--vs_torch compares the frameworks on the same device: JAX runs on '
      f'{platform} ({jax.devices()[0].device_kind}) and this PyTorch '
      f'{torch.__version__} has no such device (a CUDA build of PyTorch runs '
      f'on NVIDIA GPUs; without --vs_torch the benchmark runs anywhere)')


class TorchEntries:
  """The PyTorch port's train step (same losses) and inference, eager, on the
  device JAX runs on; a bfloat16 model runs under autocast (parameters and
  losses float32, as in JAX)."""

  def __init__(self, config, model_config: models.ModelConfig, params,
               host_batch: dict[str, np.ndarray], platform: str):
    import torch  # pylint: disable=g-import-not-at-top
    from pumamednet_jax import torch_convert  # pylint: disable=g-import-not-at-top
    from pumamednet_jax import torch_model  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = torch_device(torch, platform)
    self.heads = model_config.heads
    self.model = torch_model.PumaMedNet(
        torch_model.ModelConfig.from_json(model_config.to_json()))
    weights = torch_convert.flax_to_torch(jax.device_get(params), model_config)
    self.model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
    self.model.to(self.device)
    self.compute_dtype = getattr(torch, model_config.dtype)
    self.optimizer = torch.optim.Adam(self.model.parameters(),
                                      lr=config.learning_rate)
    self.grad_clip_norm = config.grad_clip_norm
    self.loss_config = losses.LossConfig.from_config(config)
    batch = host_batch
    clean, defective = defective_pair(config, batch)
    nchw = lambda x: torch.tensor(x.transpose(0, 3, 1, 2), device=self.device)
    self.clean, self.defective = nchw(clean), nchw(defective)
    self.targets = {h.name: torch.tensor(batch[h.name], device=self.device)
                    for h in self.heads}
    weight_map = losses.lung_weight_map(config.image_size, config.loss.lung_weight)
    self.weight_map = torch.tensor(weight_map[None, None, ..., 0],
                                   device=self.device)
    window = losses.gaussian_window(self.loss_config.ssim_filter_size,
                                    self.loss_config.ssim_filter_sigma)
    self.window = torch.tensor(window, device=self.device)
    self.generator = torch.Generator(device=self.device).manual_seed(0)

  def _autocast(self):
    """Computes the model in its dtype (parameters stay float32)."""
    return self.torch.autocast(self.device.type, dtype=self.compute_dtype,
                               enabled=self.compute_dtype != self.torch.float32)

  def _model(self, images, **kwargs):
    """The model's (reconstruction, outputs, latents), computed in the
    model's dtype and returned in float32 (the losses' dtype)."""
    with self._autocast():
      reconstruction, outputs, latents = self.model(images, **kwargs)
    as_float = lambda tensors: {name: t.float() for name, t in tensors.items()}
    return reconstruction.float(), as_float(outputs), as_float(latents)

  def _finish(self):
    """Waits for the device's queued work (a timed call must include it)."""
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def _filter(self, x):
    """The SSIM's separable Gaussian, 'valid' (as dm-pix computes it)."""
    size = self.window.shape[0]
    x = self.torch.nn.functional.conv2d(x, self.window.view(1, 1, size, 1))
    return self.torch.nn.functional.conv2d(x, self.window.view(1, 1, 1, size))

  def _weighted_mean(self, values, weights):
    weights = weights.expand_as(values)
    return (values * weights).sum((1, 2, 3)) / weights.sum((1, 2, 3))

  def _loss(self, reconstruction, latents, outputs, examples=slice(None)):
    """Our total loss of the batch's `examples` (all by default), as their
    share of the whole batch's (every target of this batch is known, so the
    heads' means need no masks)."""
    functional = self.torch.nn.functional
    c1, c2 = 0.01**2, 0.03**2
    a, b = reconstruction, self.clean[examples]
    mu_a, mu_b = self._filter(a), self._filter(b)
    var_a = self._filter(a * a) - mu_a**2
    var_b = self._filter(b * b) - mu_b**2
    cov = self._filter(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) /
                ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    crop = (self.window.shape[0] - 1) // 2
    size = ssim_map.shape[-1]
    ssim_weights = self.weight_map[..., crop:crop + size, crop:crop + size]
    ssim = (1 - self._weighted_mean(ssim_map, ssim_weights)).mean()
    recon = self._weighted_mean((a - b).abs(), self.weight_map).mean()
    mu, logvar = latents['mu'], latents['logvar']
    kl = (0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(-1)).mean()
    config = self.loss_config
    total = (config.ssim_weight * ssim + config.recon_weight * recon +
             config.beta * kl / a[0].numel())
    for head in self.heads:
      output, target = outputs[head.name], self.targets[head.name][examples]
      if head.kind in (heads_lib.MULTILABEL, heads_lib.BINARY):
        loss = functional.binary_cross_entropy_with_logits(output, target)
        total = total + config.classification_weight * loss
      elif head.kind == heads_lib.MULTICLASS:
        loss = functional.cross_entropy(output, target.long())
        total = total + config.classification_weight * loss
      else:
        loss = ((output - target / head.scale)**2).mean()
        total = total + config.age_weight * loss
    return total * (a.shape[0] / self.clean.shape[0])

  def eval_loss(self) -> float:
    """The total loss with z = mu (no sampling): to compare with JAX's."""
    with self.torch.no_grad():
      reconstruction, outputs, latents = self._model(self.defective)
      return float(self._loss(reconstruction, latents, outputs))

  def train_step(self, micro_batch_size: int | None = None):
    """One step on the batch, its gradient summed over micro-batches of
    `micro_batch_size` examples when given (as the JAX step may)."""
    self.optimizer.zero_grad(set_to_none=True)
    size = self.defective.shape[0]
    micro_batch_size = micro_batch_size or size
    for start in range(0, size, micro_batch_size):
      examples = slice(start, start + micro_batch_size)
      reconstruction, outputs, latents = self._model(
          self.defective[examples], train=True, generator=self.generator)
      self._loss(reconstruction, latents, outputs, examples).backward()
    if self.grad_clip_norm:
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                          self.grad_clip_norm)
    self.optimizer.step()
    self._finish()

  def infer(self):
    with self.torch.inference_mode(), self._autocast():
      mu, _ = self.model.encode(self.defective)
      self.model.classify(mu)
    self._finish()

  def reconstruct(self):
    with self.torch.inference_mode():
      self._model(self.defective)
    self._finish()


def pipeline_images_per_sec(config, sources, heads, batch_size: int,
                            num_batches: int) -> float:
  """Images/s of the training input pipeline alone (decode, batch, prefetch)."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare(sources)
  iterator = pipeline.create_train_iterator(
      sources, heads, seed=config.seed, image_size=config.image_size,
      global_batch_size=batch_size, shuffle_buffer=config.shuffle_buffer,
      process_index=jax.process_index(), process_count=jax.process_count())
  for _ in range(3):  # warm-up: fills the shuffle buffer and prefetch
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  local_batch = parallel.local_batch_size(batch_size)
  return num_batches * local_batch / (time.perf_counter() - start)


def run(config, *, vs_torch: bool, rounds: int, steps: int,
        measure_pipeline: bool, pipeline_batches: int) -> dict:
  """All measurements; returns the results dict (the JSON)."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  train.check_config(config)
  batch_size = config.batch_size
  sources = pipeline.get_sources(config)
  heads = pipeline.head_specs(sources, config.head_features)
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  threads = len(os.sched_getaffinity(0))
  results = {
      'config_dataset': config.dataset,
      'image_size': config.image_size,
      'batch_size': batch_size,
      'dtype': config.model.dtype,
      'conv_impl': model_config.conv_impl,
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'backend': policy.platform,
      'cpu_threads': threads,
      'cpu_model': cpu_model(),
      # Changes both frameworks' speed on the CPU (huge pages: README, Performance).
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'params': models.count_params_tree(models.abstract_params(model_config)),
      'rounds': rounds,
      'steps_per_round': steps,
      # Examples per forward and backward pass of the JAX train step.
      'micro_batch_size': train.micro_batch_size(
          config.micro_batch_size, batch_size // jax.device_count(),
          config.image_size, policy),
  }
  jax_entries = JaxEntries(config, model_config, batch_size, mesh, policy)
  results['compile_seconds'] = jax_entries.compile_seconds
  results['train_flops_per_image'] = summary.train_flops_per_image(
      config, model_config, batch_size=8)
  results['forward_flops_per_image'] = summary.forward_flops_per_image(
      model_config, batch_size=8)
  entries = {'jax': jax_entries}
  if vs_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)  # XLA:CPU uses every core it may
    entries['torch'] = TorchEntries(config, model_config,
                                    jax_entries.state.params,
                                    jax_entries.host_batch, policy.platform)
    results['torch_device'] = str(entries['torch'].device)
    results['torch_version'] = torch.__version__
  # (framework, kind) → the call that a round times, in the order timed.
  calls = {}
  for kind in ('train', 'infer', 'reconstruct'):
    for framework, entry in entries.items():
      calls[framework, kind] = getattr(entry, 'train_step' if kind == 'train'
                                       else kind)
  if vs_torch and results['micro_batch_size'] < batch_size:
    # PyTorch's step over the same micro-batches as the JAX step's, too:
    # what PyTorch gains from them, measured rather than assumed.
    calls['torch', 'train_micro'] = functools.partial(
        entries['torch'].train_step, results['micro_batch_size'])
  for call in calls.values():  # warm-up: allocations, caches, autotuning
    call()
    call()
  seconds = {measurement: [] for measurement in calls}
  page_faults = {measurement: [] for measurement in calls}
  peaks = []
  for round_index in range(rounds):
    for measurement, call in calls.items():
      # One call untimed first: the previous measurement (often the other
      # framework's) has just evicted this one's data from the caches.
      call()
      call_seconds, call_faults = _timed(call, steps,
                                         MIN_SECONDS_PER_MEASUREMENT)
      seconds[measurement].append(call_seconds)
      page_faults[measurement].append(call_faults)
    peaks.append(matmul_peak_gflops(config.model.dtype, policy.platform,
                                    repeats=2))
    logging.info('round %d/%d: %s', round_index + 1, rounds,
                 {f'{f}/{k}': f'{batch_size / s[-1]:.1f} img/s'
                  for (f, k), s in seconds.items()})
  per_sec = lambda framework, kind: statistics.median(
      batch_size / s for s in seconds[framework, kind])
  speedup = lambda kind, torch_kind: statistics.median(
      t / j for j, t in zip(seconds['jax', kind], seconds['torch', torch_kind]))
  results['train_images_per_sec'] = per_sec('jax', 'train')
  results['infer_images_per_sec'] = per_sec('jax', 'infer')
  results['reconstruct_images_per_sec'] = per_sec('jax', 'reconstruct')
  # Fresh memory touched per call: what makes a CPU figure swing with the
  # host (README, Performance); medians over rounds.
  results['page_faults_per_call'] = {
      f'{framework}/{kind}': statistics.median(faults)
      for (framework, kind), faults in page_faults.items()}
  results['matmul_peak_gflops'] = max(peaks)
  results['achieved_gflops'] = (results['train_flops_per_image'] *
                                results['train_images_per_sec'] / 1e9)
  results['fraction_of_matmul_peak'] = (results['achieved_gflops'] /
                                        results['matmul_peak_gflops'])
  if vs_torch:
    for kind in ('train', 'infer', 'reconstruct'):
      results[f'torch_{kind}_images_per_sec'] = per_sec('torch', kind)
      results[f'{kind}_speedup_vs_torch'] = speedup(kind, kind)
    if ('torch', 'train_micro') in seconds:
      results['torch_micro_train_images_per_sec'] = per_sec('torch', 'train_micro')
      results['train_speedup_vs_torch_micro'] = speedup('train', 'train_micro')
  results['peak_memory_bytes'], results['peak_memory_kind'] = peak_memory()
  if measure_pipeline:
    results['pipeline_images_per_sec'] = pipeline_images_per_sec(
        config, sources, heads, batch_size, pipeline_batches)
    results['pipeline_over_train'] = (results['pipeline_images_per_sec'] /
                                      results['train_images_per_sec'])
  return results


# Vector extensions that move the CPU figures (AVX2 vs AVX-512 machines).
VECTOR_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile')


def cpu_model() -> str:
  """The CPU's name and vector extensions, e.g. 'AMD EPYC (avx2, avx512f)':
  CPU ratios are only comparable on the same kind of CPU."""
  info = cpuinfo.get_cpu_info()
  flags_ = [f for f in VECTOR_FLAGS if f in info.get('flags', ())]
  name = info.get('brand_raw') or info.get('arch') or 'unknown CPU'
  return f"{name} ({', '.join(flags_) or 'no AVX2'})"


def format_table(results: dict) -> str:
  """The results as a human-readable table."""
  rows = [
      ('device', f"{results['device_count']} × {results['device_kind']} "
                 f"({results['backend']}, {results['cpu_threads']} CPU threads "
                 f"of {results['cpu_model']})"),
      ('allocator', f"GLIBC_TUNABLES={results['glibc_tunables']}"
                    if results['glibc_tunables'] else 'glibc defaults'),
      ('config', f"{results['config_dataset']}, {results['image_size']} px, "
                 f"batch {results['batch_size']}, {results['dtype']}, "
                 f"conv_impl {results['conv_impl']}, {results['params']:,} params"),
      ('compile (train step)', f"{results['compile_seconds']:.1f} s"),
      ('train step', f"{results['train_images_per_sec']:.1f} images/s "
                     f"(micro-batches of {results['micro_batch_size']})"),
      ('inference (encode + classify)',
       f"{results['infer_images_per_sec']:.1f} images/s"),
      ('inference (reconstruction)',
       f"{results['reconstruct_images_per_sec']:.1f} images/s"),
      ('train FLOPs per image', f"{results['train_flops_per_image'] / 1e9:.3f} G"),
      ('achieved (train step)', f"{results['achieved_gflops']:.1f} GFLOP/s = "
                                f"{100 * results['fraction_of_matmul_peak']:.0f}% "
                                f"of the {results['dtype']} matmul peak "
                                f"({results['matmul_peak_gflops']:.0f} GFLOP/s)"),
      ('peak memory', f"{results['peak_memory_bytes'] / 2**20:.0f} MiB "
                      f"({results['peak_memory_kind']})"),
      ('minor page faults per call', ', '.join(
          f'{name} {faults:,.0f}'
          for name, faults in results['page_faults_per_call'].items())),
  ]
  if 'pipeline_images_per_sec' in results:
    rows.append(('input pipeline', f"{results['pipeline_images_per_sec']:.1f} "
                 f"images/s = {results['pipeline_over_train']:.1f}× the train step"))
  if 'torch_train_images_per_sec' in results:
    rows.append(('PyTorch port', f"eager on {results['torch_device']}, "
                                 f"torch {results['torch_version']}"))
    for kind, label in (('train', 'train step'),
                        ('infer', 'inference (encode + classify)'),
                        ('reconstruct', 'inference (reconstruction)')):
      rows.append((f'PyTorch {label}',
                   f"{results[f'torch_{kind}_images_per_sec']:.1f} images/s; "
                   f"JAX {results[f'{kind}_speedup_vs_torch']:.2f}× faster"))
  if 'torch_micro_train_images_per_sec' in results:
    rows.append((f"PyTorch train step, micro-batches of {results['micro_batch_size']}",
                 f"{results['torch_micro_train_images_per_sec']:.1f} images/s; "
                 f"JAX {results['train_speedup_vs_torch_micro']:.2f}× faster"))
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def define_flags() -> None:
  """The command's flags (defined only when run as a program, so that tests
  and other tools can import this module beside other flag-defining ones)."""
  config_flags.DEFINE_config_file('config', None, 'Configuration file.',
                                  lock_config=False)
  flags.mark_flags_as_required(['config'])
  flags.DEFINE_integer('batch', None,
                       'Global batch size (default: config.batch_size).')
  flags.DEFINE_integer('image_size', None,
                       'Image side (default: config.image_size).')
  flags.DEFINE_bool('vs_torch', False,
                    'Also run the PyTorch port, alternating rounds.')
  flags.DEFINE_string('json', None, 'Write the results here as JSON.')
  flags.DEFINE_integer('rounds', 5, 'Alternating rounds (medians).')
  flags.DEFINE_integer('steps', 8, 'Timed calls per round and entry, at least '
                       '(and at least 0.25 s of them).')
  flags.DEFINE_bool(
      'pipeline', True, 'Measure the input pipeline (prepares the data set '
      'when needed: the phantom is rendered, real sets need their files).')
  flags.DEFINE_integer('pipeline_batches', 30,
                       'Batches timed from the pipeline.')


def main(argv):
  del argv
  flag_values = flags.FLAGS
  config = flag_values.config
  if flag_values.batch is not None:
    config.batch_size = flag_values.batch
  if flag_values.image_size is not None:
    config.image_size = flag_values.image_size
  results = run(config, vs_torch=flag_values.vs_torch,
                rounds=flag_values.rounds, steps=flag_values.steps,
                measure_pipeline=flag_values.pipeline,
                pipeline_batches=flag_values.pipeline_batches)
  print(format_table(results))
  if flag_values.json:
    with open(flag_values.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
