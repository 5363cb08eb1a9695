"""TFDS builder of `cxr_phantom`, the procedural phantom chest X-ray data set.

No download: every example is rendered by `input_pipeline.phantom` as a pure
function of (seed, split, index, settings), so a data set is identical bytes
wherever and however often it is prepared. Settings (image size, variant, split
sizes, seed, confounder strength, prevalence floor) are encoded in the
BuilderConfig name, so different settings live in different directories.

  builder = cxr_phantom.builder(data_dir=None, image_size=64, num_train=20_000,
                                num_validation=2_000, num_test=2_000)
  builder.download_and_prepare()
  train = builder.as_dataset(split='train')

Besides train / validation / test (drawn with the configured confounder
strength), every data set has the bias-audit splits, whose support device
follows its own rule (`phantom.AUDIT_SPLIT_STRENGTHS`): validation_deconfounded
and test_deconfounded (device independent of every finding), and
test_anticorrelated (device mostly on the confounder target's negatives).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import struct
from typing import Any, Iterator
import zlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import labels as labels_lib
from input_pipeline import phantom

_VERSION = tfds.core.Version('1.1.0')
# Examples rendered per task (vectorised in numpy), and rendering threads.
_RENDER_BLOCK = 256
_RENDER_THREADS = 2

# Scalar generating factors stored as float32 / int64 features.
_FLOAT_FACTORS = ('body_size', 'inspiration', 'heart_size', 'breast_size',
                  'exposure', 'rotation_degrees', 'shift_x', 'shift_y',
                  'noise_level') + phantom.DERIVED_FACTORS
_INT_FACTORS = ('support_device', 'texture_seed')


@dataclasses.dataclass(eq=False, kw_only=True)
class CxrPhantomConfig(tfds.core.BuilderConfig):
  """Settings of one phantom data set (see `builder`)."""
  image_size: int = 64
  variant: str = 'chestxray14'
  num_train: int = 20_000
  num_validation: int = 2_000
  num_test: int = 2_000
  seed: int = 0
  confounder_strength: float = 0.0
  prevalence_floor: float = phantom.DEFAULT_PREVALENCE_FLOOR


def _number(value: float) -> str:
  return f'{value:g}'.replace('.', 'p').replace('-', 'm')


def config_name(*, image_size: int, variant: str, num_train: int,
                num_validation: int, num_test: int, seed: int,
                confounder_strength: float, prevalence_floor: float) -> str:
  """The BuilderConfig name: every setting, so each has its own directory."""
  return (f'{variant}_{image_size}px_{num_train}-{num_validation}-{num_test}'
          f'_seed{seed}_conf{_number(confounder_strength)}'
          f'_floor{_number(prevalence_floor)}')


def _validate(*, image_size, variant, num_train, num_validation, num_test,
              seed, confounder_strength, prevalence_floor) -> None:
  def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  phantom.check_image_size(image_size)
  phantom.check_variant(variant)
  for name, value in (('num_train', num_train),
                      ('num_validation', num_validation),
                      ('num_test', num_test)):
    if not is_int(value) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')
  if not is_int(seed) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  if not isinstance(confounder_strength, (int, float)) or not (
      0.0 <= confounder_strength <= 1.0):
    raise ValueError(
        f'confounder_strength must be in [0, 1], got {confounder_strength!r}')
  if not isinstance(prevalence_floor, (int, float)) or not (
      0.0 <= prevalence_floor <= 0.5):
    raise ValueError(
        f'prevalence_floor must be in [0, 0.5], got {prevalence_floor!r}')


def make_config(*, image_size: int, variant: str = 'chestxray14',
                num_train: int, num_validation: int, num_test: int,
                seed: int = 0, confounder_strength: float = 0.0,
                prevalence_floor: float = phantom.DEFAULT_PREVALENCE_FLOOR
                ) -> CxrPhantomConfig:
  """A validated config named after its settings."""
  settings = dict(image_size=image_size, variant=variant, num_train=num_train,
                  num_validation=num_validation, num_test=num_test, seed=seed,
                  confounder_strength=float(confounder_strength),
                  prevalence_floor=float(prevalence_floor))
  _validate(**settings)
  description = (
      f'{variant} phantom at {image_size}x{image_size} px, '
      f'{num_train}/{num_validation}/{num_test} train/validation/test images, '
      f'seed {seed}, confounder strength {confounder_strength:g}, '
      f'prevalence floor {prevalence_floor:g}.')
  return CxrPhantomConfig(name=config_name(**settings),
                          description=description, version=_VERSION,
                          **settings)


class CxrPhantom(tfds.core.GeneratorBasedBuilder):
  """Procedural phantom chest X-rays with known generating factors."""

  VERSION = _VERSION
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'Bias-audit splits validation_deconfounded, test_deconfounded '
               'and test_anticorrelated; the other splits are unchanged.',
  }
  BUILDER_CONFIGS = [
      make_config(image_size=size, variant='chestxray14', num_train=20_000,
                  num_validation=2_000, num_test=2_000)
      for size in (64, 128, 256)
  ] + [
      make_config(image_size=64, variant='covid3', num_train=6_000,
                  num_validation=1_000, num_test=1_000),
  ]

  # TFDS looks for a builder's source file (to find a checksums file) with
  # `importlib_resources`, which it does not install on Python >= 3.9; name
  # the file directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    features = {
        'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
        'lung_mask': tfds.features.Image(shape=(size, size, 1),
                                         dtype=np.uint8),
        'view': tfds.features.ClassLabel(names=labels_lib.VIEWS),
        'sex': tfds.features.ClassLabel(names=labels_lib.SEXES),
        'age': tfds.features.Scalar(dtype=np.float32),
        'id': tfds.features.Text(),
        'severity': tfds.features.Scalar(dtype=np.float32),
    }
    if config.variant == 'chestxray14':
      findings = len(labels_lib.FINDINGS)
      features['labels'] = tfds.features.Tensor(
          shape=(len(labels_lib.LABELS),), dtype=np.uint8)
      features['finding_severity'] = tfds.features.Tensor(
          shape=(findings,), dtype=np.float32)
      features['finding_side'] = tfds.features.Tensor(
          shape=(findings,), dtype=np.uint8)
    else:
      features['label'] = tfds.features.ClassLabel(
          names=labels_lib.COVID3_CLASSES)
    for name in _FLOAT_FACTORS:
      features[name] = tfds.features.Scalar(dtype=np.float32)
    for name in _INT_FACTORS:
      features[name] = tfds.features.Scalar(dtype=np.int64)
    return self.dataset_info_from_configs(
        description=(
            'Procedural phantom frontal chest X-rays (input_pipeline/phantom)'
            ': anatomy with a lung shape from 517 real masks, patient factors '
            '(sex, age, AP/PA view) visible in the image, the 14 ChestX-ray14 '
            'findings (or the 3 covid3 classes) with anatomically placed '
            'signatures, and every generating factor as a feature. Label '
            'co-occurrence follows the real ChestX-ray14 metadata, with each '
            'finding lifted to at least the prevalence floor. '
            'lung_mask: 255 on the lung fields. finding_side: 0 none, '
            '1 patient right (image left), 2 left, 3 both.'),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager   # nothing to download
    config = self.builder_config
    return {
        'train': self._generate_examples('train', config.num_train),
        'validation': self._generate_examples('validation',
                                              config.num_validation),
        'test': self._generate_examples('test', config.num_test),
        'validation_deconfounded': self._generate_examples(
            'validation_deconfounded', config.num_validation),
        'test_deconfounded': self._generate_examples('test_deconfounded',
                                                     config.num_test),
        'test_anticorrelated': self._generate_examples('test_anticorrelated',
                                                       config.num_test),
    }

  def _sample_kwargs(self) -> dict[str, Any]:
    config = self.builder_config
    return dict(prevalence_floor=config.prevalence_floor,
                confounder_strength=config.confounder_strength)

  def _generate_examples(self, split: str, count: int
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    blocks = [range(start, min(start + _RENDER_BLOCK, count))
              for start in range(0, count, _RENDER_BLOCK)]
    tasks = [(config.seed, split, block, config.image_size, config.variant,
              self._sample_kwargs()) for block in blocks]
    ages = []
    for block, (images, masks, factors_list) in zip(
        blocks, _render_blocks(tasks)):
      ages.extend(factors['age'] for factors in factors_list)
      yield from self._examples(split, block, images, masks, factors_list)
    if split == 'train':
      # Written with the data set info once all splits are generated.
      self.info.metadata['age_median'] = float(
          np.median(np.asarray(ages, np.float32)))

  def _examples(self, split, block, images, masks, factors_list):
    variant = self.builder_config.variant
    seed = self.builder_config.seed
    for index, image, mask, factors in zip(block, images, masks,
                                           factors_list):
      severity = np.asarray(factors['sign_severity'], np.float32)
      example = {
          'image': image,
          'lung_mask': mask,
          'view': int(factors['view']),
          'sex': int(factors['sex']),
          'age': np.float32(factors['age']),
          'id': f'phantom-seed{seed}-{split}-{index:06d}',
      }
      if variant == 'chestxray14':
        findings = len(labels_lib.FINDINGS)
        example['labels'] = np.asarray(factors['labels'], np.uint8)
        example['finding_severity'] = severity[:findings]
        example['finding_side'] = np.asarray(factors['sign_side'][:findings],
                                             np.uint8)
        example['severity'] = np.float32(severity[:findings].max())
      else:
        example['label'] = int(factors['label'])
        example['severity'] = np.float32(severity.max())
      for name in _FLOAT_FACTORS:
        example[name] = np.float32(factors[name])
      for name in _INT_FACTORS:
        example[name] = np.int64(factors[name])
      yield index, example


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + tag + data
          + struct.pack('>I', zlib.crc32(tag + data)))


def _png(image: np.ndarray) -> bytes:
  """8-bit grayscale PNG bytes of a (H, W) uint8 image.

  A minimal encoder (no row filters, zlib level 3): PIL's save costs ~3x more
  per small image, and encoding is a third of the generation time.
  """
  height, width = image.shape
  rows = np.zeros((height, width + 1), np.uint8)   # filter byte 0 per row
  rows[:, 1:] = image
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header)
          + _png_chunk(b'IDAT', zlib.compress(rows.tobytes(), 3))
          + _png_chunk(b'IEND', b''))


def _render_blocks(tasks):
  """Renders and PNG-encodes blocks in order, a few ahead, in threads.

  numpy and zlib release the GIL, so rendering overlaps with TFDS's
  serialisation in this thread; threads, unlike processes, need no picklable
  __main__ and are safe next to TensorFlow's own threads.
  """
  with concurrent.futures.ThreadPoolExecutor(_RENDER_THREADS) as pool:
    pending = collections.deque()
    for task in tasks:
      pending.append(pool.submit(_render_block, task))
      if len(pending) > _RENDER_THREADS:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _render_block(task):
  seed, split, block, image_size, variant, sample_kwargs = task
  images, masks, factors_list = phantom.render_examples(
      seed, split, block, image_size, variant, **sample_kwargs)
  return ([_png(image) for image in images], [_png(mask) for mask in masks],
          factors_list)


def builder(*, data_dir: str | None, image_size: int,
            variant: str = 'chestxray14', num_train: int, num_validation: int,
            num_test: int, seed: int = 0, confounder_strength: float = 0.0,
            prevalence_floor: float = phantom.DEFAULT_PREVALENCE_FLOOR
            ) -> tfds.core.DatasetBuilder:
  """The `cxr_phantom` builder for these settings (not yet prepared).

  Args:
    data_dir: TFDS data directory; None = TFDS's default.
    image_size: image side in pixels (32..2048).
    variant: 'chestxray14' (15-long multi-hot `labels`) or 'covid3' (`label`).
    num_train, num_validation, num_test: split sizes (>= 1).
    seed: data set seed (>= 0); examples are pure functions of it.
    confounder_strength: in [0, 1], how strongly the support device follows
      the confounder target (phantom.CONFOUNDER_TARGETS); 0 = independent.
    prevalence_floor: minimum prevalence of each finding, in [0, 0.5].

  Raises:
    ValueError: naming the bad argument.
  """
  config = make_config(image_size=image_size, variant=variant,
                       num_train=num_train, num_validation=num_validation,
                       num_test=num_test, seed=seed,
                       confounder_strength=confounder_strength,
                       prevalence_floor=prevalence_floor)
  registered = {c.name for c in CxrPhantom.BUILDER_CONFIGS}
  return CxrPhantom(config=config.name if config.name in registered else config,
                    data_dir=data_dir)
