"""Data parallelism: 1 vs 8 devices, and 2 processes vs 1, give the same
parameters for the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np

from e2e_support import REPO_ROOT

WORKER = str(REPO_ROOT / 'tests' / 'distributed_worker.py')


def worker_env(num_devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / 'tests')])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def run_workers(tmp_path, name, num_devices, num_processes=1):
  outputs = [tmp_path / f'{name}_{i}.npz' for i in range(num_processes)]
  extra = [[]]
  if num_processes > 1:
    with socket.socket() as probe:
      probe.bind(('127.0.0.1', 0))
      port = probe.getsockname()[1]
    extra = [[f'127.0.0.1:{port}', str(num_processes), str(i)]
             for i in range(num_processes)]
  processes = [subprocess.Popen([sys.executable, WORKER, str(out), *args],
                                env=worker_env(num_devices), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
               for out, args in zip(outputs, extra)]
  for process in processes:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
  return [dict(np.load(out)) for out in outputs]


def assert_close(actual, expected):
  """Each parameter array within 1e-5 of the expected one, relative to the
  array's largest magnitude (elements near 0 have no relative precision)."""
  assert actual.keys() == expected.keys()
  for key in expected:
    relative = np.max(np.abs(actual[key] - expected[key])) / np.max(
        np.abs(expected[key]))
    assert relative <= 1e-5, f'{key}: relative difference {relative}'


def test_one_and_eight_devices_and_two_hosts_agree(tmp_path):
  (one_device,) = run_workers(tmp_path, 'one', num_devices=1)
  (eight_devices,) = run_workers(tmp_path, 'eight', num_devices=8)
  # Two processes on localhost, two CPU devices each, disjoint input shards.
  two_hosts = run_workers(tmp_path, 'hosts', num_devices=2, num_processes=2)
  # The parameters moved: the comparison is not between initial values.
  changed = [k for k in one_device if 'kernel' in k]
  assert changed
  assert_close(eight_devices, one_device)
  for process_params in two_hosts:
    assert_close(process_params, one_device)
