"""tf.data input: prepared TFDS data → NumPy batches for the train and eval steps.

tf.data only reads, decodes, batches and prefetches; the defects are applied
later, on the accelerator. Images stay uint8 until they reach the device.

The training stream is a pure function of (seed, step): epoch e is the split
in its stored order shuffled with the seed (seed, e), and the examples of
consecutive epochs are concatenated. A run resumed at step s starts from
example s × batch_size of that stream, so it sees exactly what an
uninterrupted run would have seen. Every process reads the same global stream
and decodes only its own slice of each global batch, so the data a step sees
does not depend on the number of hosts either.
"""

from collections.abc import Iterator
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import labels as labels_lib
from pumamednet_jax import heads as heads_lib

# Features that can become heads, in head order.
HEAD_FEATURES = ('labels', 'view', 'sex', 'age', 'label')
AGE_ABOVE_MEDIAN = 'age_above_median'
AGE_SCALE = 100.0  # the age head predicts years / 100
FOLDER_DATASETS = ('covid3', 'textures', 'medical_mnist')
KNOWN_DATASETS = ('cxr_phantom', 'chestxray14', *FOLDER_DATASETS)
# Data sets rendered on first use; the others are prepared by
# `python -m input_pipeline.prepare` from the user's files.
GENERATED_DATASETS = ('cxr_phantom',)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset` at `config.image_size`."""
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  name = config.dataset
  if name == 'cxr_phantom':
    from input_pipeline import cxr_phantom  # pylint: disable=g-import-not-at-top
    phantom = config.phantom
    return cxr_phantom.builder(
        data_dir=data_dir, image_size=config.image_size, variant=phantom.variant,
        num_train=phantom.num_train, num_validation=phantom.num_validation,
        num_test=phantom.num_test, seed=phantom.seed,
        confounder_strength=phantom.confounder_strength)
  if name == 'chestxray14':
    from input_pipeline import chestxray14  # pylint: disable=g-import-not-at-top
    kwargs = {}
    if config.validation_fraction is not None:
      kwargs['validation_fraction'] = config.validation_fraction
    return chestxray14.builder(data_dir=data_dir, image_size=config.image_size,
                               split_seed=config.split_seed, **kwargs)
  if name in FOLDER_DATASETS:
    from input_pipeline import folders  # pylint: disable=g-import-not-at-top
    return folders.builder(name, data_dir=data_dir, image_size=config.image_size,
                           validation_fraction=config.validation_fraction,
                           test_fraction=config.test_fraction,
                           split_seed=config.split_seed)
  raise ValueError(f'config.dataset: unknown data set {name!r}; known: '
                   f'{", ".join(KNOWN_DATASETS)}')


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Renders the phantom on first use; real sets must have been prepared."""
  if builder.name in GENERATED_DATASETS:
    builder.download_and_prepare()
    return
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'data set {builder.name} (config {builder.builder_config.name}) is not '
        f'prepared in {builder.data_dir_root}. Prepare it once with:\n  python '
        f'-m input_pipeline.prepare --dataset {builder.name} --manual_dir DIR '
        f'--data_dir {builder.data_dir_root} --image_size '
        f'{builder.builder_config.image_size}\n(see README, "Real data sets"), '
        'and pass the same --data_dir as --config.data_dir.')


def age_median(builder: tfds.core.DatasetBuilder) -> float:
  metadata = builder.info.metadata or {}
  if 'age_median' not in metadata:
    raise ValueError(f'data set {builder.info.full_name} has an age feature but '
                     "no info.metadata['age_median']; prepare it again")
  return float(metadata['age_median'])


def head_specs(builder: tfds.core.DatasetBuilder,
               head_features=()) -> tuple[heads_lib.HeadSpec, ...]:
  """The classifier heads that the data set's features support.

  `labels` (15 multi-hot) → a multi-label head; a 2-class ClassLabel (view,
  sex) → a binary head; a ClassLabel with more classes → a multi-class head;
  `age` → an age regression head plus a binary "age above the median" head
  (paper Fig. 4).
  """
  features = builder.info.features
  wanted = tuple(head_features) or tuple(f for f in HEAD_FEATURES if f in features)
  specs = []
  for name in wanted:
    if name not in features:
      raise ValueError(
          f'config.head_features: {name!r} is not a feature of '
          f'{builder.info.full_name} (features: {", ".join(features.keys())})')
    feature = features[name]
    if name == 'labels':
      specs.append(heads_lib.HeadSpec(name, heads_lib.MULTILABEL,
                                      labels_lib.LABELS))
    elif isinstance(feature, tfds.features.ClassLabel):
      kind = heads_lib.BINARY if feature.num_classes == 2 else heads_lib.MULTICLASS
      specs.append(heads_lib.HeadSpec(name, kind, tuple(feature.names)))
    elif name == 'age':
      specs.append(heads_lib.HeadSpec(AGE_ABOVE_MEDIAN, heads_lib.BINARY,
                                      ('below', 'above')))
      specs.append(heads_lib.HeadSpec('age', heads_lib.REGRESSION,
                                      scale=AGE_SCALE))
    else:
      raise ValueError(f'config.head_features: feature {name!r} of type '
                       f'{type(feature).__name__} cannot be a head')
  return tuple(specs)


def _target_fn(builder, heads):
  """Maps a decoded example to the model's inputs and the heads' targets."""
  names = {h.name for h in heads}
  median = age_median(builder) if AGE_ABOVE_MEDIAN in names else None
  has_age_mask = 'age_mask' in builder.info.features

  def targets(example):
    out = {'image': example['image']}
    for head in heads:
      if head.name == AGE_ABOVE_MEDIAN:
        out[head.name] = tf.cast(example['age'] > median, tf.float32)
        if has_age_mask:
          out[f'{head.name}_mask'] = tf.cast(example['age_mask'], tf.float32)
      elif head.kind == heads_lib.MULTICLASS:
        out[head.name] = tf.cast(example[head.name], tf.int32)
      else:
        out[head.name] = tf.cast(example[head.name], tf.float32)
        if f'{head.name}_mask' in builder.info.features:
          out[f'{head.name}_mask'] = tf.cast(example[f'{head.name}_mask'],
                                             tf.float32)
    return out

  return targets


def _needed_features(builder, heads) -> list[str]:
  features = builder.info.features
  names = ['image']
  for head in heads:
    source = 'age' if head.name == AGE_ABOVE_MEDIAN else head.name
    names.append(source)
    for extra in (f'{source}_mask',):
      if extra in features:
        names.append(extra)
  return sorted(set(names))


def _read_split(builder, split: str, heads) -> tf.data.Dataset:
  """The split in its stored order, images still PNG-encoded."""
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {builder.info.full_name} '
                     f'(splits: {", ".join(builder.info.splits.keys())})')
  keep = _needed_features(builder, heads)
  decoders = {name: tfds.decode.SkipDecoding() for name in ('image',)}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return ds.map(lambda ex: {k: ex[k] for k in keep})


def _decode_fn(builder, heads):
  image_feature = builder.info.features['image']
  targets = _target_fn(builder, heads)

  def decode(example):
    example = dict(example)
    example['image'] = image_feature.decode_example(example['image'])
    return targets(example)

  return decode


def num_examples(builder, split: str) -> int:
  return builder.info.splits[split].num_examples


def create_train_iterator(builder, heads, *, seed: int, global_batch_size: int,
                          start_step: int = 0, shuffle_buffer: int = 4096,
                          process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of this process, starting at `start_step`."""
  if global_batch_size % process_count:
    raise ValueError(f'config.batch_size = {global_batch_size} does not split '
                     f'over {process_count} processes')
  split_size = num_examples(builder, 'train')
  if split_size < global_batch_size:
    raise ValueError(f'config.batch_size = {global_batch_size} exceeds the '
                     f'{split_size} training examples')
  base = _read_split(builder, 'train', heads)
  first_example = start_step * global_batch_size
  start_epoch, skip = divmod(first_example, split_size)

  def epoch(e):
    return base.shuffle(shuffle_buffer, seed=tf.cast(seed, tf.int64) * 1_000_003 + e,
                        reshuffle_each_iteration=False)

  stream = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  stream = stream.flat_map(epoch).skip(skip)
  local = global_batch_size // process_count
  stream = stream.batch(global_batch_size, drop_remainder=True)
  stream = stream.map(lambda b: {k: v[process_index * local:(process_index + 1) * local]
                                 for k, v in b.items()})
  stream = stream.unbatch().map(_decode_fn(builder, heads),
                                num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
  stream = stream.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(stream))


def create_eval_batches(builder, heads, *, split: str, global_batch_size: int,
                        num_examples_limit: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` in stored order, as this process's slices of full
  global batches; the last batch is padded and `valid` marks real examples."""
  ds = _read_split(builder, split, heads)
  if num_examples_limit:
    ds = ds.take(num_examples_limit)
  ds = ds.map(_decode_fn(builder, heads), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(global_batch_size).prefetch(tf.data.AUTOTUNE)
  local = global_batch_size // process_count
  offset = 0
  for batch in tfds.as_numpy(ds):
    size = len(batch['image'])
    batch['valid'] = np.ones(size, np.float32)
    # The position in the split fixes each example's eval defects.
    batch['index'] = np.arange(offset, offset + size, dtype=np.int32)
    offset += size
    if size < global_batch_size:
      batch = {k: np.concatenate([v, np.zeros((global_batch_size - size, *v.shape[1:]),
                                              v.dtype)])
               for k, v in batch.items()}
    yield {k: v[process_index * local:(process_index + 1) * local]
           for k, v in batch.items()}
