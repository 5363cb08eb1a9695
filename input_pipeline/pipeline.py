"""tf.data input: prepared TFDS data → NumPy batches for the train and eval steps.

tf.data only reads, decodes, batches and prefetches; the defects are applied
later, on the accelerator. Images stay uint8 until they reach the device.

A run reads one data set, or a mixture of several (`config.dataset =
'pretrain'`, the paper's pre-training on DTD, Textures and Medical MNIST). The
training stream is a pure function of (seed, step): epoch e of a data set is
its split in stored order, shuffled with the seed (seed, e); the epochs are
concatenated (and, for a mixture, sampled with `sample_from_datasets` by
weight). A run resumed at step s starts from example s × batch_size of that
stream, so it sees exactly what an uninterrupted run would have seen. Every
process reads the same global stream and decodes only its own slice of each
global batch, so what a step sees does not depend on the number of hosts.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import heads as heads_lib
from input_pipeline import preparation

# Features that can become heads, in head order.
HEAD_FEATURES = ('labels', 'view', 'sex', 'age', 'label')
FOLDER_DATASETS = ('covid3', 'textures', 'medical_mnist')
# Sets of the pre-training mixture; DTD comes from TFDS's own `dtd` builder.
MIXTURE_DATASETS = ('dtd', 'textures', 'medical_mnist')
KNOWN_DATASETS = ('cxr_phantom', 'chestxray14', *FOLDER_DATASETS, 'dtd',
                  'pretrain')
# Data sets rendered on first use; the others are prepared beforehand.
GENERATED_DATASETS = ('cxr_phantom',)


@dataclasses.dataclass(frozen=True)
class Source:
  """One data set read by a run, with its share of the training stream."""

  name: str
  builder: tfds.core.DatasetBuilder
  weight: float = 1.0


def _data_dir(config) -> str | None:
  return os.path.expanduser(config.data_dir) if config.data_dir else None


def get_builder(config, name: str | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of data set `name` (default `config.dataset`)."""
  name = name or config.dataset
  data_dir = _data_dir(config)
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
  if name == 'dtd':
    # Colour images of any size: made grey and square-resized when decoded.
    return tfds.builder('dtd', data_dir=data_dir)
  raise ValueError(f'config.dataset: unknown data set {name!r}; known: '
                   f'{", ".join(KNOWN_DATASETS)}')


def get_sources(config) -> tuple[Source, ...]:
  """The data sets of the run: `config.dataset`, or the mixture's."""
  if config.dataset != 'pretrain':
    return (Source(config.dataset, get_builder(config)),)
  names = tuple(config.mixture.datasets)
  weights = tuple(config.mixture.weights)
  unknown = [n for n in names if n not in MIXTURE_DATASETS]
  if unknown or not names:
    raise ValueError(f'config.mixture.datasets: {names} must be a non-empty '
                     f'subset of {MIXTURE_DATASETS}')
  if len(weights) != len(names) or min(weights) <= 0:
    raise ValueError(f'config.mixture.weights: {weights} needs one positive '
                     f'weight per data set of config.mixture.datasets {names}')
  total = sum(weights)
  return tuple(Source(n, get_builder(config, n), w / total)
               for n, w in zip(names, weights))


def prepare(sources: Sequence[Source] | tfds.core.DatasetBuilder) -> None:
  """Renders the phantom on first use; real sets must have been prepared."""
  if isinstance(sources, tfds.core.DatasetBuilder):
    sources = (Source(sources.name, sources),)
  for source in sources:
    builder = source.builder
    if builder.name in GENERATED_DATASETS:
      preparation.download_and_prepare(builder)
    elif not builder.is_prepared():
      config_name = builder.builder_config.name if builder.builder_config else ''
      raise FileNotFoundError(
          f'data set {builder.name} (config {config_name!r}) is not prepared in '
          f'{builder.data_dir_root}. Prepare it once with:\n  python -m '
          f'input_pipeline.prepare --dataset {builder.name} --manual_dir DIR '
          f'--data_dir {builder.data_dir_root} [--image_size S]\n(README, '
          '"Real data sets"), and pass the same directory as --config.data_dir.')


def age_median(builder: tfds.core.DatasetBuilder) -> float:
  metadata = builder.info.metadata or {}
  if 'age_median' not in metadata:
    raise ValueError(f'data set {builder.info.full_name} has an age feature but '
                     "no info.metadata['age_median']; prepare it again")
  return float(metadata['age_median'])


def _feature_heads(builder, head_features) -> list[heads_lib.HeadSpec]:
  """Heads of one data set's features (see `head_specs`)."""
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
      specs.append(heads_lib.labels_head())
    elif isinstance(feature, tfds.features.ClassLabel):
      kind = heads_lib.BINARY if feature.num_classes == 2 else heads_lib.MULTICLASS
      specs.append(heads_lib.HeadSpec(name, kind, tuple(feature.names)))
    elif name == 'age':
      specs.extend(heads_lib.age_heads())
    else:
      raise ValueError(f'config.head_features: feature {name!r} of type '
                       f'{type(feature).__name__} cannot be a head')
  return specs


def mixture_head_name(source: str) -> str:
  return f'{source}_label'


def head_specs(sources: Sequence[Source] | tfds.core.DatasetBuilder,
               head_features=()) -> tuple[heads_lib.HeadSpec, ...]:
  """The classifier heads that the data's features support.

  `labels` (15 multi-hot) → a multi-label head; a 2-class ClassLabel (view,
  sex) → a binary head; a ClassLabel with more classes → a multi-class head;
  `age` → an age regression head plus a binary "age above the median" head
  (paper Fig. 4). A mixture gets one multi-class head per data set,
  `<set>_label`, trained only on that set's examples.
  """
  if isinstance(sources, tfds.core.DatasetBuilder):
    sources = (Source(sources.name, sources),)
  if len(sources) == 1:
    return tuple(_feature_heads(sources[0].builder, head_features))
  specs = []
  for source in sources:
    label = source.builder.info.features['label']
    specs.append(heads_lib.HeadSpec(mixture_head_name(source.name),
                                    heads_lib.MULTICLASS, tuple(label.names)))
  return tuple(specs)


def _encoded(source: Source, split: str, heads, multi: bool) -> tf.data.Dataset:
  """A split in stored order: the encoded image and every head's target
  (and mask), computed from the raw features."""
  builder = source.builder
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {builder.info.full_name} '
                     f'(splits: {", ".join(builder.info.splits.keys())})')
  features = builder.info.features
  median = (age_median(builder)
            if any(h.name == heads_lib.AGE_ABOVE_MEDIAN for h in heads) else None)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})

  def targets(example):
    out = {'image': example['image']}
    for head in heads:
      if multi:  # a mixture: each set fills its own head, masks the others
        mine = head.name == mixture_head_name(source.name)
        out[head.name] = (tf.cast(example['label'], tf.int32) if mine
                          else tf.constant(0, tf.int32))
        out[f'{head.name}_mask'] = tf.constant(1.0 if mine else 0.0)
        continue
      name = 'age' if head.name == heads_lib.AGE_ABOVE_MEDIAN else head.name
      if head.name == heads_lib.AGE_ABOVE_MEDIAN:
        out[head.name] = tf.cast(example['age'] > median, tf.float32)
      elif head.kind == heads_lib.MULTICLASS:
        out[head.name] = tf.cast(example[name], tf.int32)
      else:
        out[head.name] = tf.cast(example[name], tf.float32)
      if f'{name}_mask' in features:
        out[f'{head.name}_mask'] = tf.cast(example[f'{name}_mask'], tf.float32)
    return out

  return ds.map(targets)


def _decode_fn(image_size: int):
  """Encoded PNG/JPEG → (S, S, 1) uint8. Prepared sets are already S×S grey;
  others (DTD) are converted to grey, padded to a square and resized."""

  def decode(example):
    example = dict(example)
    image = tf.io.decode_image(example['image'], channels=1,
                               expand_animations=False)
    height, width = tf.shape(image)[0], tf.shape(image)[1]

    def square_resize():
      side = tf.maximum(height, width)
      padded = tf.image.pad_to_bounding_box(image, (side - height) // 2,
                                            (side - width) // 2, side, side)
      resized = tf.image.resize(padded, (image_size, image_size),
                                method='lanczos3', antialias=True)
      return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)

    same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
    image = tf.cond(same, lambda: image, square_resize)
    image.set_shape((image_size, image_size, 1))
    example['image'] = image
    return example

  return decode


def num_examples(sources: Sequence[Source], split: str) -> int:
  return sum(s.builder.info.splits[split].num_examples for s in sources)


def _epochs(encoded: tf.data.Dataset, seed: int, shuffle_buffer: int,
            start_epoch: int) -> tf.data.Dataset:
  """Epochs start_epoch, start_epoch + 1, ... each shuffled by (seed, epoch)."""

  def epoch(e):
    return encoded.shuffle(shuffle_buffer,
                           seed=tf.cast(seed, tf.int64) * 1_000_003 + e,
                           reshuffle_each_iteration=False)

  return tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)


def _local_slices(ds, global_batch_size, image_size, process_index,
                  process_count):
  """Global batches of encoded examples → this process's decoded batches."""
  local = global_batch_size // process_count
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(lambda b: {k: v[process_index * local:(process_index + 1) * local]
                         for k, v in b.items()})
  ds = ds.unbatch().map(_decode_fn(image_size), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  return ds.batch(local, drop_remainder=True)


def create_train_iterator(sources: Sequence[Source], heads, *, seed: int,
                          image_size: int, global_batch_size: int,
                          start_step: int = 0, shuffle_buffer: int = 4096,
                          process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of this process, starting at `start_step`."""
  if global_batch_size % process_count:
    raise ValueError(f'config.batch_size = {global_batch_size} does not split '
                     f'over {process_count} processes')
  sizes = [num_examples([s], 'train') for s in sources]
  if min(sizes) < 1 or (len(sources) == 1 and sizes[0] < global_batch_size):
    raise ValueError(f'config.batch_size = {global_batch_size}: the training '
                     f'splits have only {sizes} examples')
  multi = len(sources) > 1
  first_example = start_step * global_batch_size
  if multi:
    streams = [_epochs(_encoded(s, 'train', heads, multi), seed + i,
                       shuffle_buffer, 0) for i, s in enumerate(sources)]
    stream = tf.data.Dataset.sample_from_datasets(
        streams, weights=[s.weight for s in sources], seed=seed,
        stop_on_empty_dataset=True).skip(first_example)
  else:
    start_epoch, skip = divmod(first_example, sizes[0])
    stream = _epochs(_encoded(sources[0], 'train', heads, multi), seed,
                     shuffle_buffer, start_epoch).skip(skip)
  stream = _local_slices(stream, global_batch_size, image_size, process_index,
                         process_count).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(stream))


def create_eval_batches(sources: Sequence[Source], heads, *, split: str,
                        image_size: int, global_batch_size: int,
                        num_examples_limit: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` (of every set, in turn) in stored order, as this
  process's slices of full global batches. The last batch is padded: `valid`
  marks real examples, and `index` gives each example's position."""
  multi = len(sources) > 1
  ds = None
  for source in sources:
    part = _encoded(source, split, heads, multi)
    ds = part if ds is None else ds.concatenate(part)
  total = num_examples(sources, split)
  if num_examples_limit:
    ds = ds.take(num_examples_limit)
    total = min(total, num_examples_limit)
  ds = ds.enumerate().map(lambda i, ex: {**ex, 'index': tf.cast(i, tf.int32),
                                         'valid': tf.constant(1.0)})
  # Pad to whole global batches, so every process gets the same number of
  # batches; padding examples are blank images with `valid` = 0.
  blank = {name: tf.zeros(spec.shape, spec.dtype)
           for name, spec in ds.element_spec.items()}
  blank['image'] = tf.io.encode_png(tf.zeros((image_size, image_size, 1), tf.uint8))
  padding = tf.data.Dataset.from_tensors(blank).repeat((-total) % global_batch_size)
  ds = _local_slices(ds.concatenate(padding), global_batch_size, image_size,
                     process_index, process_count)
  return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


def example_ids(sources: Sequence[Source], split: str,
                num_examples_limit: int = 0) -> dict[str, np.ndarray]:
  """`id` (the position where a data set has none) and, where every data set
  has one, `patient_id` of each example of `split`, in the order of
  `create_eval_batches`."""
  ids, patients = [], []
  for source in sources:
    builder = source.builder
    features = builder.info.features
    wanted = {name: True for name in ('id', 'patient_id') if name in features}
    count = builder.info.splits[split].num_examples
    if not wanted:
      ids.extend(f'{source.name}-{i}' for i in range(count))
      patients.append(None)
      continue
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding(wanted))
    part = {name: [] for name in wanted}
    for example in tfds.as_numpy(ds):
      for name in wanted:
        part[name].append(example[name])
    ids.extend(i.decode() if isinstance(i, bytes) else str(i)
               for i in part.get('id', range(count)))
    patients.append(np.asarray(part['patient_id']) if 'patient_id' in part
                    else None)
  result = {'id': np.asarray(ids, dtype=object)}
  if all(p is not None for p in patients):
    result['patient_id'] = np.concatenate(patients)
  if num_examples_limit:
    result = {k: v[:num_examples_limit] for k, v in result.items()}
  return result
