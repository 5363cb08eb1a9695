"""The GPU train step's forms side by side, in one process (issue 23's table).

  python -m scripts.gpu_benchmark --out DIR [--image_size 256] [--rounds 5]
      [--experiments a,b,...] [--deadline_s 390]

Runs the experiments of EXPERIMENTS in order on this process's devices, each
the real train step (`train.make_steps`, through `benchmark.JaxEntries`) of
the paper preset (`configs/chestxray14.py`, its heads built here, so no data
set is needed) on a synthetic batch, and appends one JSON line per experiment
to DIR/results.jsonl as soon as it is measured (a run stopped early keeps what
it measured); then writes DIR/summary.md. Per experiment: images/s (median
of rounds), compile time, the count of each cuDNN call in the compiled
program, and the 10 ops that took the most time in a 5-step `jax.profiler`
trace (parsed from its Perfetto JSON; the trace stays under --trace_dir).

"best" is the fastest float32 conv_impl measured before it. PyTorch's step
(`benchmark.TorchEntries`) runs where torch has the device JAX runs on (CUDA
beside a GPU); the tf.data pipeline (a phantom rendered at --image_size, on
this machine's CPU cores) where TensorFlow is installed. Either is skipped
with a line saying why otherwise. Experiments not started by --deadline_s
seconds are skipped the same way, so that the run ends in its time.
"""

import collections
import dataclasses
import gc
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax

from configs import chestxray14
from input_pipeline import heads as heads_lib
from pumamednet_jax import benchmark
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib

CUDNN_CALLS = ('__cudnn$convForward', '__cudnn$convBackwardInput',
               '__cudnn$convBackwardFilter', '__cudnn$convBiasActivationForward')
PROFILE_STEPS = 5
TOP_OPS = 10

# Today's forms, and the accelerator forms (conv_impl set per experiment).
STOCK = {'conv_impl': 'xla', 'ssim_filter': 'banded', 'equalize_impl': 'scatter'}
ACCELERATOR = {'ssim_filter': 'separable', 'equalize_impl': 'compare'}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One row of the table: a framework's train step in one setting."""

  name: str
  kind: str = 'jax'  # 'jax', 'torch' or 'pipeline'
  dtype: str = 'float32'
  batch: int = 64
  # Settings (config keys below model/loss/defects) over the preset's; 'best'
  # as conv_impl: the fastest float32 conv_impl measured so far.
  conv_impl: str = 'xla'
  ssim_filter: str = 'separable'
  equalize_impl: str = 'compare'
  defects: bool = True
  compiler_options: tuple[tuple[str, bool], ...] = ()  # XLA flags


# In order of what the acceptance needs first (float32 batch 64 and
# bfloat16 batch 256 against PyTorch), then the variants.
EXPERIMENTS = (
    Experiment('float32_b64_xla', conv_impl='xla'),
    Experiment('float32_b64_cudnn', conv_impl='cudnn'),
    Experiment('torch_float32_b64', kind='torch'),
    Experiment('bfloat16_b256_stock', dtype='bfloat16', batch=256, **STOCK),
    Experiment('bfloat16_b256_best', dtype='bfloat16', batch=256,
               conv_impl='best'),
    Experiment('torch_bfloat16_b256', kind='torch', dtype='bfloat16', batch=256),
    Experiment('float32_b64_fast', conv_impl='fast'),
    Experiment('float32_b64_best_no_defects', conv_impl='best', defects=False),
    Experiment('float32_b64_best_banded_ssim', conv_impl='best',
               ssim_filter='banded'),
    Experiment('float32_b64_best_force_nchw', conv_impl='best',
               compiler_options=(('xla_gpu_force_conv_nchw', True),)),
    Experiment('pipeline', kind='pipeline', batch=256),
)
CONV_IMPL_EXPERIMENTS = ('float32_b64_xla', 'float32_b64_cudnn', 'float32_b64_fast')


def experiment_config(base, experiment: Experiment, conv_impl: str):
  """The preset's config with the experiment's settings."""
  config = base.copy_and_resolve_references()
  config.batch_size = experiment.batch
  config.micro_batch_size = 0
  config.model.dtype = experiment.dtype
  config.model.conv_impl = conv_impl
  config.loss.ssim_filter = experiment.ssim_filter
  config.defects.equalize_impl = experiment.equalize_impl
  if not experiment.defects:
    for name in ('rotate_prob', 'flip_prob', 'blur_prob', 'equalize_prob',
                 'autocontrast_prob'):
      config.defects[name] = 0.0
  return config


def cudnn_calls(hlo_text: str) -> dict[str, int]:
  """How many custom calls of each cuDNN convolution a compiled program has."""
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"',
                                           hlo_text))
  return {call: targets.get(call, 0) for call in CUDNN_CALLS}


def top_ops(trace_dir: str, count: int = TOP_OPS) -> list[dict]:
  """The ops that took the most time in a jax.profiler trace: the device's
  ops where the trace has a device (GPU streams), else the XLA threads' ops on
  the host (the CPU backend). Total microseconds and calls per op name."""
  paths = sorted(glob.glob(os.path.join(trace_dir, '**',
                                        'perfetto_trace.json.gz'),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(paths[-1], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for event in events:
    if event.get('ph') == 'M' and event.get('name') == 'process_name':
      processes[event['pid']] = event['args']['name']
    elif event.get('ph') == 'M' and event.get('name') == 'thread_name':
      threads[event['pid'], event['tid']] = event['args']['name']
  devices = {pid for pid, name in processes.items()
             if name.startswith('/device:')}

  def is_op(event):
    if event.get('ph') != 'X':
      return False
    if devices:
      return event['pid'] in devices
    thread = threads.get((event['pid'], event['tid']), '')
    return (thread.startswith('tf_XLA') and not event['name'].startswith('end:')
            and 'ThunkExecutor' not in event['name'])

  totals, calls = collections.Counter(), collections.Counter()
  for event in filter(is_op, events):
    totals[event['name']] += float(event.get('dur', 0.0))
    calls[event['name']] += 1
  return [{'op': name, 'total_us': round(total, 1), 'calls': calls[name]}
          for name, total in totals.most_common(count)]


def images_per_sec(step, batch: int, rounds: int, steps: int,
                   min_seconds: float) -> float:
  """Median over rounds of a round's images/s (one untimed step first)."""
  rates = []
  for _ in range(rounds):
    step()
    seconds, _ = benchmark._timed(step, steps, min_seconds)  # pylint: disable=protected-access
    rates.append(batch / seconds)
  return statistics.median(rates)


def profile(step, trace_dir: str) -> list[dict]:
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(PROFILE_STEPS):
      step()
  return top_ops(trace_dir)


def run_jax(config, heads, experiment: Experiment, conv_impl: str, *,
            rounds: int, steps: int, min_seconds: float, trace_dir: str) -> dict:
  """One JAX experiment's figures."""
  config = experiment_config(config, experiment, conv_impl)
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  entries = benchmark.JaxEntries(config, model_config, experiment.batch, mesh,
                                 policy,
                                 compiler_options=dict(experiment.compiler_options))
  result = {
      'compile_seconds': entries.compile_seconds,
      'cudnn_calls': cudnn_calls(entries.train_compiled.as_text()),
      'images_per_sec': images_per_sec(entries.train_step, experiment.batch,
                                       rounds, steps, min_seconds),
  }
  result['top_ops'] = profile(entries.train_step,
                              os.path.join(trace_dir, experiment.name))
  result['trace_dir'] = os.path.join(trace_dir, experiment.name)
  return result


def run_torch(config, heads, experiment: Experiment, *, rounds: int,
              steps: int, min_seconds: float) -> dict:
  """PyTorch's step (the same losses, eager), or why it cannot run here."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    return {'skipped': f'torch is not importable ({error})'}
  platform = platform_lib.for_mesh(parallel.create_mesh()).platform
  try:
    benchmark.torch_device(torch, platform)
  except RuntimeError as error:
    return {'skipped': str(error)}
  config = experiment_config(config, experiment, 'xla')
  model_config = models.model_config(config, heads, 'xla')
  host_batch = benchmark.synthetic_batch(config, heads, experiment.batch)
  entries = benchmark.TorchEntries(config, model_config,
                                   models.init_params(model_config, config.seed),
                                   host_batch, platform)
  return {'images_per_sec': images_per_sec(entries.train_step, experiment.batch,
                                           rounds, steps, min_seconds),
          'torch_version': torch.__version__, 'device': str(entries.device)}


def run_pipeline(experiment: Experiment, *, image_size: int, data_dir: str,
                 num_images: int, num_batches: int) -> dict:
  """The tf.data pipeline's images/s on this machine's CPU cores, reading a
  phantom rendered at `image_size` into `data_dir`."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    from configs import default  # pylint: disable=g-import-not-at-top
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    return {'skipped': f'TensorFlow is not importable ({error})'}
  config = default.get_config()
  config.data_dir = data_dir
  config.image_size = image_size
  config.phantom.num_train = num_images
  config.phantom.num_validation = config.phantom.num_test = 8
  config.shuffle_buffer = min(config.shuffle_buffer, num_images)
  sources = pipeline.get_sources(config)
  start = time.perf_counter()
  pipeline.prepare(sources)
  prepare_seconds = time.perf_counter() - start
  heads = pipeline.head_specs(sources, config.head_features)
  return {'images_per_sec': benchmark.pipeline_images_per_sec(
              config, sources, heads, experiment.batch, num_batches),
          'cpu_cores': len(os.sched_getaffinity(0)),
          'image_size': image_size,
          'prepare_seconds': prepare_seconds}


def run(out_dir: str, *, image_size: int = 256, experiments=None,
        rounds: int = 5, steps: int = 10, min_seconds: float = 0.25,
        deadline_s: float = float('inf'), trace_dir: str | None = None,
        data_dir: str | None = None, pipeline_images: int = 512,
        pipeline_batches: int = 8, scale_batch: float = 1.0,
        base_config=None) -> list[dict]:
  """Runs `experiments` (names, default all) in EXPERIMENTS' order; writes
  out_dir/results.jsonl line by line and out_dir/summary.md; returns the
  lines. `base_config` (default the paper preset) and `scale_batch` shrink
  the model and the batches (tests)."""
  os.makedirs(out_dir, exist_ok=True)
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='gpu_benchmark_traces_')
  data_dir = data_dir or tempfile.mkdtemp(prefix='gpu_benchmark_data_')
  names = [e.name for e in EXPERIMENTS]
  wanted = set(experiments or names)
  unknown = wanted - set(names)
  if unknown:
    raise ValueError(f'--experiments: unknown {sorted(unknown)}; known: '
                     f'{", ".join(names)}')
  config = base_config or chestxray14.get_config()
  config.image_size = image_size
  heads = heads_lib.chestxray14_heads()
  start = time.perf_counter()
  lines, rates = [], {}
  path = os.path.join(out_dir, 'results.jsonl')
  with open(path, 'w') as results:
    for experiment in EXPERIMENTS:
      if experiment.name not in wanted:
        continue
      experiment = dataclasses.replace(
          experiment, batch=max(1, round(experiment.batch * scale_batch)))
      conv_impl = experiment.conv_impl
      if conv_impl == 'best':
        conv_impl = max(rates, key=rates.get) if rates else 'cudnn'
      line = {'experiment': experiment.name, 'kind': experiment.kind,
              'dtype': experiment.dtype, 'batch': experiment.batch,
              'image_size': image_size,
              'device_kind': jax.devices()[0].device_kind,
              'backend': jax.default_backend()}
      if experiment.kind == 'jax':
        line.update(conv_impl=conv_impl, ssim_filter=experiment.ssim_filter,
                    equalize_impl=experiment.equalize_impl,
                    defects=experiment.defects,
                    compiler_options=dict(experiment.compiler_options))
      elapsed = time.perf_counter() - start
      if elapsed > deadline_s:
        line['skipped'] = f'not started by the deadline ({elapsed:.0f} s)'
      elif experiment.kind == 'jax':
        line.update(run_jax(config, heads, experiment, conv_impl, rounds=rounds,
                            steps=steps, min_seconds=min_seconds,
                            trace_dir=trace_dir))
        if experiment.name in CONV_IMPL_EXPERIMENTS:
          rates[conv_impl] = line['images_per_sec']
      elif experiment.kind == 'torch':
        line.update(run_torch(config, heads, experiment, rounds=rounds,
                              steps=steps, min_seconds=min_seconds))
      else:
        line.update(run_pipeline(experiment, image_size=image_size,
                                 data_dir=data_dir,
                                 num_images=pipeline_images,
                                 num_batches=pipeline_batches))
      line['seconds'] = time.perf_counter() - start - elapsed
      results.write(json.dumps(line) + '\n')
      results.flush()
      print(summary_row(line), flush=True)
      lines.append(line)
      gc.collect()  # the experiment's device buffers, before the next
  with open(os.path.join(out_dir, 'summary.md'), 'w') as f:
    f.write(summary(lines))
  return lines


def summary_row(line: dict) -> str:
  if 'skipped' in line:
    return f"| {line['experiment']} | skipped: {line['skipped']} |"
  if line['kind'] == 'pipeline':
    return (f"| pipeline | {line['images_per_sec']:,.0f} images/s on "
            f"{line['cpu_cores']} CPU cores at {line['image_size']} px |")
  figures = f"{line['images_per_sec']:,.0f} images/s"
  if line['kind'] == 'torch':
    return f"| {line['experiment']} | {figures} (torch {line['torch_version']}) |"
  calls = ', '.join(f"{name.split('$')[1]} {count}"
                    for name, count in line['cudnn_calls'].items() if count)
  ops = '; '.join(f"{op['op']} {op['total_us'] / PROFILE_STEPS / 1e3:.2f} ms"
                  for op in line['top_ops'][:3])
  return (f"| {line['experiment']} | {figures}, compile "
          f"{line['compile_seconds']:.0f} s, conv_impl {line['conv_impl']}; "
          f"cuDNN: {calls or 'none'}; top ops per step: {ops} |")


def summary(lines: list[dict]) -> str:
  """The table, and each JAX step's speed relative to PyTorch's in its
  dtype and batch where both ran."""
  device = lines[0]['device_kind'] if lines else '?'
  rows = [f'Train step, {device}, one process\n', '| experiment | figures |',
          '| --- | --- |'] + [summary_row(line) for line in lines]
  torch_rates = {(l['dtype'], l['batch']): l['images_per_sec'] for l in lines
                 if l['kind'] == 'torch' and 'images_per_sec' in l}
  ratios = [f"{l['experiment']}: {l['images_per_sec'] / torch_rates[l['dtype'], l['batch']]:.2f}× PyTorch"
            for l in lines if l['kind'] == 'jax' and 'images_per_sec' in l
            and (l['dtype'], l['batch']) in torch_rates]
  return '\n'.join(rows + [''] + ratios) + '\n'


def define_flags() -> None:
  flags.DEFINE_string('out', None, 'Folder of results.jsonl and summary.md.')
  flags.mark_flag_as_required('out')
  flags.DEFINE_integer('image_size', 256, 'Image side.')
  flags.DEFINE_list('experiments', [], 'Names to run (default: all).')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds per experiment (median).')
  flags.DEFINE_integer('steps', 10, 'Steps per round, at least.')
  flags.DEFINE_float('deadline_s', 390.0, 'Experiments not started by then '
                     'are skipped.')
  flags.DEFINE_string('trace_dir', None, 'Profiler traces (default: a '
                      'temporary folder).')
  flags.DEFINE_string('data_dir', None, 'Where the pipeline experiment '
                      'renders its phantom (default: a temporary folder).')
  flags.DEFINE_integer('pipeline_images', 512, 'Phantom images rendered '
                       'for the pipeline experiment.')


def main(argv):
  del argv
  # Before JAX starts its backend: PyTorch shares the GPU in this process.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  values = flags.FLAGS
  run(values.out, image_size=values.image_size,
      experiments=values.experiments or None, rounds=values.rounds,
      steps=values.steps, deadline_s=values.deadline_s,
      trace_dir=values.trace_dir, data_dir=values.data_dir,
      pipeline_images=values.pipeline_images)
  with open(os.path.join(values.out, 'summary.md')) as f:
    print(f.read())


if __name__ == '__main__':
  define_flags()
  app.run(main)
