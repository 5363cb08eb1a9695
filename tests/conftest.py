"""Shared pytest fixtures, and a persistent XLA compilation cache for the run.

The cache (a fresh temporary folder per session, inherited by subprocesses
through the environment) lets the several `main.py` processes of the resume
tests compile the same train step once.
"""

import os
import pathlib
import tempfile

import pytest

from e2e_support import shrink

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='pumamednet_jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session')
def phantom_data_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding the tiny phantom of TINY_OVERRIDES."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  config = shrink(default.get_config(), data_dir=str(data_dir))
  pipeline.prepare(pipeline.get_builder(config))
  return data_dir


@pytest.fixture(scope='session')
def real_data_dir() -> pathlib.Path:
  """The small real files of tests/data (sources in its README.md)."""
  return pathlib.Path(__file__).resolve().parent / 'data'


# --- A tiny ChestX-ray14 download (input_pipeline tests, end-to-end tests) ---

# Rows of the real Data_Entry_2017_v2020.csv in the tiny tree (52 patients,
# 25 of them with several images).
CHESTXRAY14_NUM_ROWS = 240
# Broken files of the tiny tree: image name -> what is wrong with it.
CHESTXRAY14_BROKEN = {
    '00000002_000.png': 'empty file',
    '00000003_001.png': 'truncated image',
    '00000008_001.png': 'not an image',  # A test-split image.
    '00000013_010.png': 'missing image',
}


@pytest.fixture(scope='session')
def chestxray14_manual_dir(real_data_dir, tmp_path_factory) -> pathlib.Path:
  """A ChestX-ray14 download in the official layout, made of real rows.

  The first CHESTXRAY14_NUM_ROWS rows of the real CSV; the real
  00000001_000.png for row 1 and 64x64 noise PNGs (one RGBA) for the others,
  split over images_001/images/, images_002/images/ and the top folder; split
  lists with the patients whose ID is a multiple of 4 in test_list.txt; the
  CHESTXRAY14_BROKEN files.
  """
  import csv  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('chestxray14_manual')
  source = real_data_dir / 'chestxray14' / 'Data_Entry_2017_v2020.csv.gz'
  with gzip.open(source, 'rt', newline='') as file:
    lines = file.read().splitlines()[:CHESTXRAY14_NUM_ROWS + 1]
  (root / 'Data_Entry_2017_v2020.csv').write_text('\n'.join(lines) + '\n')
  rows = list(csv.reader(lines[1:]))
  rng = np.random.default_rng(14)
  folders = [root / 'images_001' / 'images', root / 'images_002' / 'images',
             root]
  for folder in folders:
    folder.mkdir(parents=True, exist_ok=True)
  for index, row in enumerate(rows):
    name = row[0]
    path = folders[0 if index < 100 else 1 if index < 200 else 2] / name
    if name == '00000001_000.png':
      shutil.copy(real_data_dir / 'real_cxr' / name, path)
    elif CHESTXRAY14_BROKEN.get(name) == 'missing image':
      continue
    else:
      noise = rng.integers(0, 256, (64, 64, 4 if index == 50 else 1),
                           dtype=np.uint8)
      Image.fromarray(noise.squeeze()).save(path)
  for name, problem in CHESTXRAY14_BROKEN.items():
    path = next((f / name for f in folders if (f / name).exists()), None)
    if problem == 'empty file':
      path.write_bytes(b'')
    elif problem == 'truncated image':
      path.write_bytes(path.read_bytes()[:200])
    elif problem == 'not an image':
      path.write_text('This is not a PNG.\n')
  test = [row[0] for row in rows if int(row[3]) % 4 == 0]
  train_val = [row[0] for row in rows if int(row[3]) % 4 != 0]
  (root / 'test_list.txt').write_text('\n'.join(sorted(test)) + '\n')
  (root / 'train_val_list.txt').write_text('\n'.join(sorted(train_val)) + '\n')
  return root


@pytest.fixture(scope='session')
def chestxray14_broken() -> dict[str, str]:
  """The broken files of `chestxray14_manual_dir`: name -> problem."""
  return dict(CHESTXRAY14_BROKEN)
