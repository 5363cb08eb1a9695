"""scripts/gpu_benchmark.py runs end to end on the CPU with tiny shapes, line
by line, and without TensorFlow. (Speeds are measured by running it, never
asserted.)"""

import json
import os
import subprocess
import sys

from configs import chestxray14
from e2e_support import REPO_ROOT
from e2e_support import shrink
from scripts import gpu_benchmark

# The tiny model of the end-to-end tests, on the paper preset.
TINY_MODEL = {'model.channels': (4, 4, 8, 8, 8, 8), 'model.latent_dim': 8,
              'model.classifier_hidden': 8}


def tiny_preset():
  return shrink(chestxray14.get_config(), **{
      k.replace('.', '__'): v for k, v in TINY_MODEL.items()})


def test_every_experiment_writes_its_line(tmp_path):
  out = tmp_path / 'out'
  names = ['float32_b64_cudnn', 'torch_float32_b64',
           'float32_b64_best_force_nchw', 'pipeline']
  lines = gpu_benchmark.run(
      str(out), image_size=64, experiments=names, rounds=2, steps=1,
      min_seconds=0.0, trace_dir=str(tmp_path / 'traces'),
      data_dir=str(tmp_path / 'tfds'), pipeline_images=16, pipeline_batches=2,
      scale_batch=1 / 16, base_config=tiny_preset())
  written = [json.loads(line)
             for line in (out / 'results.jsonl').read_text().splitlines()]
  assert [line['experiment'] for line in written] == names
  assert written == json.loads(json.dumps(lines))
  cudnn, torch, nchw, pipeline_line = written
  for line in (cudnn, nchw):
    assert line['images_per_sec'] > 0 and line['compile_seconds'] > 0
    assert line['batch'] == 4 and line['image_size'] == 64
    # The CPU has no cuDNN; what is counted is every call type, each 0.
    assert line['cudnn_calls'] == dict.fromkeys(gpu_benchmark.CUDNN_CALLS, 0)
    ops = line['top_ops']
    assert 0 < len(ops) <= gpu_benchmark.TOP_OPS
    assert all(op['total_us'] > 0 and op['calls'] > 0 for op in ops)
    assert ops == sorted(ops, key=lambda op: -op['total_us'])
    assert os.path.isdir(line['trace_dir'])
  # 'best': the fastest conv_impl measured before, the only one here.
  assert nchw['conv_impl'] == 'cudnn'
  assert nchw['compiler_options'] == {'xla_gpu_force_conv_nchw': True}
  assert cudnn['ssim_filter'] == 'separable'
  assert cudnn['equalize_impl'] == 'compare'
  assert torch['images_per_sec'] > 0 and torch['device'] == 'cpu'
  assert pipeline_line['images_per_sec'] > 0
  assert pipeline_line['cpu_cores'] == len(os.sched_getaffinity(0))
  summary = (out / 'summary.md').read_text()
  assert 'float32_b64_cudnn' in summary and 'PyTorch' in summary
  assert 'pipeline' in summary


def test_past_the_deadline_experiments_are_skipped(tmp_path):
  lines = gpu_benchmark.run(str(tmp_path), image_size=64, deadline_s=-1.0)
  assert [line['experiment'] for line in lines] == [
      e.name for e in gpu_benchmark.EXPERIMENTS]
  assert all('deadline' in line['skipped'] for line in lines)
  assert 'skipped' in (tmp_path / 'summary.md').read_text()


def test_cudnn_calls_are_counted_by_target():
  text = ('%a = custom-call(), custom_call_target="__cudnn$convForward"\n'
          '%b = custom-call(), custom_call_target="__cudnn$convBackwardFilter"\n'
          '%c = custom-call(), custom_call_target="__cudnn$convForward"\n')
  assert gpu_benchmark.cudnn_calls(text) == {
      '__cudnn$convForward': 2, '__cudnn$convBackwardInput': 0,
      '__cudnn$convBackwardFilter': 1, '__cudnn$convBiasActivationForward': 0}


# Run in a child process where importing TensorFlow fails, as on a GPU
# machine without it: the JAX experiments run, the pipeline is skipped.
WITHOUT_TENSORFLOW = '''
import importlib.abc, json, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError('no ' + name)
sys.meta_path.insert(0, NoTensorFlow())
from e2e_support import shrink
from configs import chestxray14
from scripts import gpu_benchmark
config = shrink(chestxray14.get_config(), **{k.replace('.', '__'): v
                for k, v in %r.items()})
lines = gpu_benchmark.run(sys.argv[1], image_size=64, rounds=1, steps=1,
                          min_seconds=0.0, scale_batch=1 / 16,
                          experiments=['float32_b64_xla', 'pipeline'],
                          base_config=config)
assert 'tensorflow' not in sys.modules
print(json.dumps(lines))
''' % TINY_MODEL


def test_runs_without_tensorflow(tmp_path):
  env = dict(os.environ, PYTHONPATH=f'{REPO_ROOT}:{REPO_ROOT / "tests"}')
  done = subprocess.run([sys.executable, '-c', WITHOUT_TENSORFLOW,
                         str(tmp_path)], capture_output=True, text=True,
                        env=env, cwd=REPO_ROOT, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  xla, pipeline_line = json.loads(done.stdout.splitlines()[-1])
  assert xla['images_per_sec'] > 0
  assert 'TensorFlow is not importable' in pipeline_line['skipped']
