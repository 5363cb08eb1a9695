"""Tests of `python -m input_pipeline.prepare` and its summary / report."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from input_pipeline import prepare
from input_pipeline import preparation
from input_pipeline import quarantine

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _read_report(path):
  with open(path, newline='') as file:
    return list(csv.DictReader(file))


def test_chestxray14_summary_and_report(chestxray14_manual_dir,
                                        chestxray14_broken, tmp_path):
  summary = prepare.prepare('chestxray14', manual_dir=chestxray14_manual_dir,
                            data_dir=tmp_path, image_size=32,
                            max_quarantine_fraction=0.05, num_workers=0)
  written = json.loads((tmp_path / 'chestxray14' / 'summary.json').read_text())
  assert written == summary
  assert summary['config'] == '32_val0.1_seed0'
  assert sum(summary['splits'].values()) == 240 - len(chestxray14_broken)
  assert set(summary['patients']) == {'train', 'validation', 'test'}
  # 52 patients; the only image of patient 2 is broken.
  assert sum(summary['patients'].values()) == 51
  # label_counts: every image has at least one label (No Finding included).
  assert sum(summary['label_counts'].values()) >= sum(
      summary['splits'].values())
  assert summary['label_counts']['Cardiomegaly'] == sum(
      counts['Cardiomegaly']
      for counts in summary['label_counts_per_split'].values())
  quarantined = {pathlib.Path(r['file']).name: r['reason']
                 for r in summary['quarantined']}
  assert set(quarantined) == set(chestxray14_broken)
  report = _read_report(tmp_path / 'chestxray14' / 'quarantine.csv')
  assert [r['file'] for r in report] == [r['file']
                                         for r in summary['quarantined']]
  # Preparing again reuses the data and gives the same summary.
  again = prepare.prepare('chestxray14', manual_dir=chestxray14_manual_dir,
                          data_dir=tmp_path, image_size=32, num_workers=0)
  assert again == summary


def test_failure_writes_the_quarantine_report(chestxray14_manual_dir,
                                              tmp_path):
  with pytest.raises(quarantine.TooManyBrokenFilesError,
                     match='max_quarantine_fraction'):
    prepare.prepare('chestxray14', manual_dir=chestxray14_manual_dir,
                    data_dir=tmp_path, image_size=32,
                    max_quarantine_fraction=0.0, num_workers=0)
  report = _read_report(tmp_path / 'chestxray14' / 'quarantine.csv')
  assert report and 'missing image' in report[0]['reason']
  assert not (tmp_path / 'chestxray14' / 'summary.json').exists()


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='known: chestxray14, covid3'):
    prepare.prepare('chestxray15', manual_dir=tmp_path, data_dir=tmp_path)
  with pytest.raises(FileNotFoundError,
                     match='does not exist or is empty(.|\n)*Medical MNIST'):
    prepare.prepare('medical_mnist', manual_dir=tmp_path / 'absent',
                    data_dir=tmp_path)
  with pytest.raises(ValueError, match='--manual_dir'):
    prepare.prepare('covid3', manual_dir=None, data_dir=tmp_path)
  (tmp_path / 'covid3' / 'Normal').mkdir(parents=True)
  with pytest.raises(ValueError, match='inside the downloaded files'):
    prepare.prepare('covid3', manual_dir=tmp_path / 'covid3',
                    data_dir=tmp_path)


def test_command_line(tmp_path):
  manual = tmp_path / 'covid3'
  rng = np.random.default_rng(0)
  for class_name in ('COVID-19', 'Pneumonia', 'Normal'):
    (manual / class_name).mkdir(parents=True)
    for index in range(12):
      Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(
          manual / class_name / f'{index}.png')
  command = [sys.executable, '-m', 'input_pipeline.prepare',
             '--dataset', 'covid3', f'--manual_dir={manual}',
             f'--data_dir={tmp_path / "data"}', '--image_size', '16',
             '--num_workers', '0']
  result = subprocess.run(command, cwd=_REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(
      (tmp_path / 'data' / 'covid3' / 'summary.json').read_text())
  # Class folders only: test (0.095) and validation (0.1) carved per class.
  assert summary['splits'] == {'train': 30, 'validation': 3, 'test': 3}
  assert summary['label_counts'] == {'COVID-19': 12, 'Pneumonia': 12,
                                     'Normal': 12}
  assert summary['quarantined'] == [] and 'patients' not in summary

  result = subprocess.run(command[:3] + ['--dataset=nih', '--data_dir=/tmp'],
                          cwd=_REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode != 0
  assert "unknown data set 'nih'" in result.stderr


def test_label_counts_of_sets_without_our_metadata(tmp_path):
  # TFDS's own sets (dtd) have no label counts in their metadata: the
  # summary counts their labels from the stored examples.
  manual = tmp_path / 'download'
  rng = np.random.default_rng(1)
  for class_name, count in (('banded', 5), ('dotted', 7)):
    (manual / class_name).mkdir(parents=True)
    for index in range(count):
      Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8)).save(
          manual / class_name / f'{index}.png')
  summary = prepare.prepare('textures', manual_dir=manual,
                            data_dir=tmp_path / 'data', image_size=8,
                            validation_fraction=0.2, num_workers=0)
  builder = prepare.get_builder('textures', data_dir=tmp_path / 'data',
                                image_size=8, validation_fraction=0.2)
  assert prepare._count_labels(builder) == summary['label_counts_per_split']  # pylint: disable=protected-access
  assert summary['label_counts'] == {'banded': 5, 'dotted': 7}


def _wait_for(condition, what, process, timeout=120.0):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, f'exited before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


def test_killed_preparation_is_cleaned_up_by_the_next(tmp_path):
  manual, data_dir = tmp_path / 'covid3', tmp_path / 'data'
  rng = np.random.default_rng(2)
  for class_name in ('COVID-19', 'Pneumonia', 'Normal'):
    (manual / class_name).mkdir(parents=True)
    for index in range(4):
      Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(
          manual / class_name / f'{index}.png')
  # Reading a named pipe blocks until someone writes to it: the first run
  # stalls inside its preparation, with its incomplete folder on disk.
  fifo = manual / 'Normal' / 'stall.png'
  os.mkfifo(fifo)
  builder = prepare.get_builder('covid3', data_dir=data_dir, image_size=16)
  other_version = (pathlib.Path(builder.data_dir).parent /
                   'incomplete.ABC123_0.0.1')
  other_version.mkdir(parents=True)
  command = [sys.executable, '-m', 'input_pipeline.prepare',
             '--dataset=covid3', f'--manual_dir={manual}',
             f'--data_dir={data_dir}', '--image_size=16', '--num_workers=0']
  logs = [tmp_path / 'first.log', tmp_path / 'second.log']
  with open(logs[0], 'w') as log:
    first = subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=log)
  try:
    _wait_for(lambda: preparation.incomplete_dirs(builder),
              'an incomplete folder', first)
    (left_behind,) = preparation.incomplete_dirs(builder)
    with open(logs[1], 'w') as log:
      second = subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=log)
    # The second run waits for the live first one and leaves its folder.
    _wait_for(lambda: 'waiting for the preparation' in logs[1].read_text(),
              'the second run to wait', second)
    assert left_behind.is_dir()
    fifo.unlink()
    Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(fifo)
  finally:
    first.kill()
    first.wait()
  assert second.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
  assert 'removing' in logs[1].read_text()
  assert not left_behind.exists() and other_version.is_dir()
  assert preparation.incomplete_dirs(builder) == []
  summary = json.loads((data_dir / 'covid3' / 'summary.json').read_text())
  assert sum(summary['splits'].values()) == 13
