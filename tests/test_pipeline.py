"""The tf.data pipeline: a deterministic, resumable, host-independent training
stream; padded eval batches; heads from features; the pre-training mixture."""

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import chestxray14
from configs import default
from configs import pretrain
from e2e_support import shrink
from input_pipeline import folders
from input_pipeline import heads as heads_lib
from input_pipeline import labels
from input_pipeline import pipeline


@pytest.fixture(scope='module')
def phantom_sources(phantom_data_dir):
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir))
  sources = pipeline.get_sources(config)
  return sources, pipeline.head_specs(sources)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_heads_come_from_the_features(phantom_sources):
  _, heads = phantom_sources
  assert [(h.name, h.kind, h.size) for h in heads] == [
      ('labels', 'multilabel', 15), ('view', 'binary', 1), ('sex', 'binary', 1),
      ('age_above_median', 'binary', 1), ('age', 'regression', 1)]
  assert heads[0].names == labels.LABELS


def test_train_stream_is_a_pure_function_of_seed_and_step(phantom_sources):
  sources, heads = phantom_sources
  kwargs = dict(seed=3, image_size=64, global_batch_size=8, shuffle_buffer=64)
  # 96 training examples: 12 steps an epoch; 30 steps cross two epoch ends.
  full = take(pipeline.create_train_iterator(sources, heads, **kwargs), 30)
  assert_batches_equal(
      full, take(pipeline.create_train_iterator(sources, heads, **kwargs), 30))
  resumed = take(pipeline.create_train_iterator(sources, heads, start_step=17,
                                                **kwargs), 13)
  assert_batches_equal(full[17:], resumed)
  # Each epoch holds every example once, in a new order.
  epoch0 = np.concatenate([b['image'] for b in full[:12]])
  epoch1 = np.concatenate([b['image'] for b in full[12:24]])
  key = lambda images: sorted(map(bytes, images))
  assert key(epoch0) == key(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  batch = full[0]
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, 64, 64, 1)
  assert batch['labels'].shape == (8, 15)
  assert set(np.unique(batch['age_above_median'])) <= {0.0, 1.0}
  other_seed = take(pipeline.create_train_iterator(
      sources, heads, **{**kwargs, 'seed': 4}), 1)
  assert not np.array_equal(other_seed[0]['image'], batch['image'])


def test_processes_read_disjoint_slices_of_the_same_global_batch(phantom_sources):
  sources, heads = phantom_sources
  kwargs = dict(seed=0, image_size=64, global_batch_size=8, shuffle_buffer=64,
                start_step=5)
  whole = take(pipeline.create_train_iterator(sources, heads, **kwargs), 2)
  halves = [take(pipeline.create_train_iterator(
      sources, heads, process_index=p, process_count=2, **kwargs), 2)
            for p in range(2)]
  for step in range(2):
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]),
          whole[step][key])


def test_eval_batches_are_padded_and_indexed(phantom_sources):
  sources, heads = phantom_sources
  batches = list(pipeline.create_eval_batches(
      sources, heads, split='validation', image_size=64, global_batch_size=12))
  assert len(batches) == 3  # 32 examples: 12 + 12 + 8 and 4 padding
  valid = np.concatenate([b['valid'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert valid.sum() == 32 and not valid[32:].any()
  np.testing.assert_array_equal(index[:32], np.arange(32))
  per_process = [list(pipeline.create_eval_batches(
      sources, heads, split='validation', image_size=64, global_batch_size=12,
      process_index=p, process_count=2)) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 3
  np.testing.assert_array_equal(
      np.concatenate([per_process[0][0]['image'], per_process[1][0]['image']]),
      batches[0]['image'])


def test_unprepared_real_data_set_says_how_to_prepare_it(tmp_path):
  config = default.get_config()
  config.dataset = 'chestxray14'
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='input_pipeline.prepare --dataset '
                     'chestxray14'):
    pipeline.prepare(pipeline.get_sources(config))


def test_unknown_data_set_names_the_key():
  config = default.get_config()
  config.dataset = 'mnist'
  with pytest.raises(ValueError, match='config.dataset'):
    pipeline.get_sources(config)


def test_decoding_makes_foreign_images_grey_and_square():
  """DTD's images are colour JPEGs of any size."""
  colour = np.zeros((30, 60, 3), np.uint8)
  colour[:, :, 0] = 200  # red: grey 0.299 * 200 ≈ 60
  buffer = io.BytesIO()
  Image.fromarray(colour).save(buffer, format='JPEG', quality=95)
  decoded = pipeline._decode_fn(16)({'image': tf.constant(buffer.getvalue())})
  image = decoded['image'].numpy()
  assert image.shape == (16, 16, 1) and image.dtype == np.uint8
  # Padded top and bottom with black (the image is twice as wide as high).
  assert image[8, 8, 0] == pytest.approx(60, abs=4)
  assert image[0, 8, 0] < 5 and image[15, 8, 0] < 5


def write_class_folders(root, class_names, per_class, rng):
  for name in class_names:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f'{i}.png')


def test_pretraining_mixture_samples_every_set_with_its_own_head(tmp_path):
  rng = np.random.default_rng(0)
  data_dir = tmp_path / 'prepared'
  for name, classes in (('textures', ('bark', 'brick', 'sand')),
                        ('medical_mnist', folders.MedicalMnist.CLASS_NAMES)):
    write_class_folders(tmp_path / name, classes, 8, rng)
    folders.builder(name, data_dir=data_dir, image_size=32,
                    num_workers=0).download_and_prepare(
                        download_config=tfds.download.DownloadConfig(
                            manual_dir=str(tmp_path / name)))
  config = pretrain.get_config()
  config.image_size = 32
  config.data_dir = str(data_dir)
  config.mixture.datasets = ('textures', 'medical_mnist')
  config.mixture.weights = (1.0, 3.0)
  sources = pipeline.get_sources(config)
  pipeline.prepare(sources)
  heads = pipeline.head_specs(sources)
  assert [(h.name, h.kind, h.size) for h in heads] == [
      ('textures_label', 'multiclass', 3), ('medical_mnist_label', 'multiclass', 6)]
  batches = take(pipeline.create_train_iterator(
      sources, heads, seed=0, image_size=32, global_batch_size=16,
      shuffle_buffer=64), 8)
  textures = np.concatenate([b['textures_label_mask'] for b in batches])
  medical = np.concatenate([b['medical_mnist_label_mask'] for b in batches])
  # Exactly one set per example, sampled roughly 1 : 3.
  np.testing.assert_array_equal(textures + medical, 1.0)
  assert 0.1 < textures.mean() < 0.45
  resumed = take(pipeline.create_train_iterator(
      sources, heads, seed=0, image_size=32, global_batch_size=16,
      shuffle_buffer=64, start_step=5), 3)
  assert_batches_equal(batches[5:], resumed)
  with pytest.raises(ValueError, match='config.mixture.weights'):
    config.mixture.weights = (1.0,)
    pipeline.get_sources(config)


@pytest.mark.parametrize('get_config', [chestxray14.get_config, default.get_config])
def test_chestxray14_heads_are_the_pipelines(get_config):
  config = get_config()
  assert heads_lib.chestxray14_heads() == pipeline.head_specs(
      pipeline.get_sources(config), config.head_features)
