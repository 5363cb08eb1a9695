"""Data parallelism: 1 vs 8 devices, and 2 processes vs 1, give the same
parameters for the same global batch; 2 processes of main.py prepare the data
once and stop together."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from e2e_support import REPO_ROOT, config_flags
from pumamednet_jax import checkpoints

WORKER = str(REPO_ROOT / 'tests' / 'distributed_worker.py')


def worker_env(num_devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / 'tests')])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def coordinator_address() -> str:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return f'127.0.0.1:{probe.getsockname()[1]}'


def run_workers(tmp_path, name, num_devices, num_processes=1):
  outputs = [tmp_path / f'{name}_{i}.npz' for i in range(num_processes)]
  extra = [[]]
  if num_processes > 1:
    address = coordinator_address()
    extra = [[address, str(num_processes), str(i)]
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


def test_two_hosts_prepare_once_and_stop_at_the_same_step(tmp_path):
  # Both processes start on an empty data directory: process 0 renders the
  # phantom while process 1 waits.
  data_dir, workdir = tmp_path / 'data', tmp_path / 'run'
  address = coordinator_address()
  flags = config_flags('configs/default.py', data_dir=str(data_dir),
                       num_train_steps=1000, checkpoint_every_steps=2,
                       eval_every_steps=1000, log_every_steps=1000,
                       num_grid_images=0)
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  processes = []
  for index, log in enumerate(logs):
    with open(log, 'w') as file:
      processes.append(subprocess.Popen(
          [sys.executable, 'main.py', f'--workdir={workdir}', '--distributed',
           f'--coordinator_address={address}', '--num_processes=2',
           f'--process_id={index}', *flags],
          env=worker_env(1), cwd=REPO_ROOT, stdout=file,
          stderr=subprocess.STDOUT))
  try:
    deadline = time.time() + 300
    while not any(p.name.isdigit() for p in (workdir / 'checkpoints').glob('*')):
      assert all(p.poll() is None for p in processes), [
          log.read_text()[-3000:] for log in logs]
      assert time.time() < deadline, 'no checkpoint within 300 s'
      time.sleep(0.05)
    # A preemption notice reaches one process only.
    processes[1].send_signal(signal.SIGTERM)
    for process in processes:
      process.wait(timeout=300)
  finally:
    for process in processes:
      process.kill()
  outputs = [log.read_text() for log in logs]
  for process, output in zip(processes, outputs):
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
  saved = [re.findall(r'saved the checkpoint of step (\d+)', output)
           for output in outputs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  manager = checkpoints.create_manager(str(workdir), read_only=True)
  assert manager.latest_step() == int(saved[0][0]) > 2
  # One process prepared the data, completely.
  assert ['Downloading and preparing' in output for output in outputs] == [
      True, False]
  assert len(list(data_dir.glob('cxr_phantom/*/*/dataset_info.json'))) == 1
  assert not list(data_dir.glob('cxr_phantom/*/incomplete.*'))
