"""Tests of the folder data set builders (covid3, textures, medical_mnist)."""

import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from input_pipeline import decode
from input_pipeline import folders
from input_pipeline import labels

_IMAGE_SIZE = 32


def _write_images(folder, count, rng, *, colour=False, size=(24, 40)):
  folder.mkdir(parents=True, exist_ok=True)
  for index in range(count):
    shape = size + (3,) if colour else size
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    # PNG and JPEG alternate, as in real collections.
    suffix = '.jpg' if index % 2 else '.png'
    Image.fromarray(pixels).save(folder / f'{index:03d}{suffix}')


def _prepare(name, manual_dir, data_dir, **options):
  builder = folders.builder(name, data_dir=data_dir, image_size=_IMAGE_SIZE,
                            num_workers=0, **options)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_covid3_split_folders_with_aliases(tmp_path):
  rng = np.random.default_rng(0)
  manual = tmp_path / 'covid'
  for split, count in (('train', 20), ('test', 4)):
    _write_images(manual / split / 'COVID19', count, rng, colour=True)
    _write_images(manual / split / 'Viral Pneumonia', count, rng)
    _write_images(manual / split / 'NORMAL', count, rng)
  # A leak: a test image also in train; a broken file; a stray text file.
  shutil.copy(manual / 'test' / 'NORMAL' / '000.png',
              manual / 'train' / 'NORMAL' / 'copy_of_test.png')
  (manual / 'train' / 'COVID19' / 'zero.png').write_bytes(b'')
  (manual / 'train' / 'NORMAL' / 'notes.txt').write_text('from the source')

  builder = _prepare('covid3', manual, tmp_path / 'data',
                     max_quarantine_fraction=0.05)
  assert builder.info.features['label'].names == list(labels.COVID3_CLASSES)
  splits = {s: _examples(builder, s) for s in ('train', 'validation', 'test')}
  # test is the folder; validation is carved from train (0.1 of 20 a class).
  assert len(splits['test']) == 12
  assert len(splits['validation']) == 6
  assert len(splits['train']) == 54
  for split, examples in splits.items():
    names = [builder.info.features['label'].int2str(ex['label'])
             for ex in examples]
    assert set(names) == set(labels.COVID3_CLASSES), split
  ids = {s: {ex['id'].decode() for ex in e} for s, e in splits.items()}
  assert 'train/NORMAL/copy_of_test.png' not in ids['train']
  assert all(i.startswith('test/') for i in ids['test'])
  metadata = builder.info.metadata
  assert metadata['duplicates'] == [{
      'file': 'train/NORMAL/copy_of_test.png',
      'duplicate_of': 'test/NORMAL/000.png', 'split': 'train'}]
  assert [(q['file'], q['reason']) for q in metadata['quarantined']] == [
      ('train/COVID19/zero.png', 'empty file (0 bytes)')]
  assert metadata['ignored_files'] == ['train/NORMAL/notes.txt']
  # Images are the decoder's output, colour turned to gray.
  example = next(ex for ex in splits['test']
                 if ex['id'] == b'test/COVID19/001.jpg')
  np.testing.assert_array_equal(
      example['image'][..., 0],
      decode.load_grayscale(manual / 'test' / 'COVID19' / '001.jpg',
                            _IMAGE_SIZE))


def test_textures_class_names_from_folders(tmp_path):
  rng = np.random.default_rng(1)
  manual = tmp_path / 'textures'
  for name in ('woven', 'banded', 'dotted'):
    _write_images(manual / name, 20, rng, colour=True, size=(30, 30))
  builder = _prepare('textures', manual, tmp_path / 'data')
  assert builder.info.features['label'].names == ['banded', 'dotted', 'woven']
  assert set(builder.info.splits) == {'train', 'validation'}  # No test.
  validation = _examples(builder, 'validation')
  # 0.05 of 20 images per class, stratified.
  assert sorted(ex['label'] for ex in validation) == [0, 1, 2]
  assert builder.info.splits['train'].num_examples == 57
  # Class names come back with the prepared data.
  reloaded = folders.builder('textures', data_dir=tmp_path / 'data',
                             image_size=_IMAGE_SIZE)
  assert reloaded.info.features['label'].names == ['banded', 'dotted', 'woven']


def test_medical_mnist_rejects_unknown_folders(tmp_path):
  rng = np.random.default_rng(2)
  manual = tmp_path / 'medical_mnist'
  for name in ('AbdomenCT', 'HAND', 'Knee'):
    _write_images(manual / name, 2, rng, size=(16, 16))
  with pytest.raises(ValueError, match=r"\['Knee'\] .* not classes of "
                     'medical_mnist. Its class folders are named AbdomenCT, '
                     'BreastMRI, ChestCT, CXR, Hand, HeadCT'):
    _prepare('medical_mnist', manual, tmp_path / 'data')
  shutil.rmtree(manual / 'Knee')
  builder = _prepare('medical_mnist', manual, tmp_path / 'data',
                     validation_fraction=0.0)
  assert builder.info.features['label'].names == [
      'AbdomenCT', 'BreastMRI', 'ChestCT', 'CXR', 'Hand', 'HeadCT']
  assert builder.info.metadata['class_folders'] == {'AbdomenCT': 'AbdomenCT',
                                                    'HAND': 'Hand'}
  labels_seen = sorted(ex['label'] for ex in _examples(builder, 'train'))
  assert labels_seen == [0, 0, 4, 4]


def test_carving_keeps_copies_together_and_drops_conflicts(tmp_path):
  rng = np.random.default_rng(3)
  files, paths = [], []
  for class_name in ('a', 'b'):
    for index in range(10):
      path = tmp_path / f'{class_name}{index}.bin'
      path.write_bytes(rng.bytes(32))
      files.append(folders.FolderImage(path.name, class_name, 'train'))
      paths.append(str(path))
  for copy in range(3):  # Three copies of a0 in class a.
    path = tmp_path / f'a0_copy{copy}.bin'
    shutil.copy(tmp_path / 'a0.bin', path)
    files.append(folders.FolderImage(path.name, 'a', 'train'))
    paths.append(str(path))
  shutil.copy(tmp_path / 'b1.bin', tmp_path / 'conflict.bin')  # b1 as 'a'.
  files.append(folders.FolderImage('conflict.bin', 'a', 'train'))
  paths.append(str(tmp_path / 'conflict.bin'))

  for seed in range(5):
    plan = folders.plan_folder_splits(
        files, paths, class_names=('a', 'b'), validation_fraction=0.3,
        test_fraction=0.2, split_seed=seed)
    split_of = {item.path: split for split, items in plan.splits.items()
                for item in items}
    copies = {split_of[f'a0_copy{c}.bin'] for c in range(3)}
    assert copies == {split_of['a0.bin']}
    assert sorted(q.file for q in plan.quarantined) == ['b1.bin',
                                                        'conflict.bin']
    assert len(plan.splits['test']) >= 2 and len(plan.splits['validation']) >= 4
  # Deterministic for a seed.
  again = folders.plan_folder_splits(
      files, paths, class_names=('a', 'b'), validation_fraction=0.3,
      test_fraction=0.2, split_seed=4)
  assert again.splits == plan.splits


def test_config_names():
  assert folders.builder('covid3', data_dir=None).builder_config.name == '256'
  assert folders.builder('textures', data_dir=None,
                         image_size=512).builder_config.name == '512'
  assert folders.builder(
      'covid3', data_dir=None, image_size=64,
      split_seed=2).builder_config.name == '64_val0.1_test0.095_seed2'
  with pytest.raises(ValueError, match='unknown folder data set'):
    folders.builder('cifar', data_dir=None)
