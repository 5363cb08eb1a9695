r"""Prepares a real data set once: decode, resize, split, write TFDS files.

  python -m input_pipeline.prepare --dataset chestxray14 \
      --manual_dir ~/downloads/chestxray14 --data_dir ~/tensorflow_datasets

Data sets: chestxray14, covid3, textures, medical_mnist (from the user's files
in --manual_dir), and dtd (downloaded by TFDS's own `dtd` builder; no
--manual_dir). Writes the TFDS data under --data_dir, and

  <data_dir>/<dataset>/summary.json
    {"dataset", "config", "version", "image_size", "prepared_dir",
     "splits": {split: examples},
     "label_counts": {label: examples, over all splits},
     "label_counts_per_split": {split: {label: examples}},
     "patients": {split: patients}          (chestxray14 only),
     "age_median": years, median of train   (chestxray14 only),
     "quarantined": [{"file", "reason", "split"}],
     "duplicates": [{"file", "duplicate_of", "split"}]  (folder sets),
     "ignored_files": [file]                 (folder sets)}
  <data_dir>/<dataset>/quarantine.csv   (file, reason, split), also written
    when preparation fails for too many broken files.

Preparing again with the same settings reuses the prepared data (TFDS) and
rewrites the summary from it. One preparation of a data set version runs at a
time, and it first removes what killed ones left (`preparation`).
"""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import chestxray14
from input_pipeline import folders
from input_pipeline import labels
from input_pipeline import preparation
from input_pipeline import quarantine

# Data sets made from the user's files, and those TFDS downloads itself.
MANUAL_DATASETS = (chestxray14.NAME,) + tuple(folders.BUILDERS)
DOWNLOADED_DATASETS = ('dtd',)
DATASETS = MANUAL_DATASETS + DOWNLOADED_DATASETS

_DATASET = flags.DEFINE_string(
    'dataset', None, f'Data set to prepare: {", ".join(DATASETS)}.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with the downloaded files of the data set (see '
    'README); not used for dtd.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data directory to write (config.data_dir of '
    'training).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256,
                                   'Side of the square images.')
_VALIDATION_FRACTION = flags.DEFINE_float(
    'validation_fraction', None, 'chestxray14: fraction of the train_val '
    'patients in validation (default 0.1). Folder sets: fraction of the '
    'training images carved out as validation when there is no validation '
    'folder (default: covid3 0.1, others 0.05).')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', None, 'Folder sets: fraction of the training images '
    'carved out as test when there is no test folder (default: covid3 0.095, '
    'others 0).')
_SPLIT_SEED = flags.DEFINE_integer('split_seed', 0,
                                   'Seed of the validation / test draw.')
_MAX_QUARANTINE_FRACTION = flags.DEFINE_float(
    quarantine.MAX_FRACTION_FLAG, quarantine.DEFAULT_MAX_FRACTION,
    'Fail when more than this fraction of the files are missing or broken.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Decoding processes (default: one per CPU core).')


def get_builder(dataset: str, *, data_dir, image_size: int = 256,
                validation_fraction: float | None = None,
                test_fraction: float | None = None, split_seed: int = 0,
                max_quarantine_fraction: float = (
                    quarantine.DEFAULT_MAX_FRACTION),
                num_workers: int | None = None) -> tfds.core.DatasetBuilder:
  """The builder of `dataset` for these settings (see the flags)."""
  if dataset == chestxray14.NAME:
    if test_fraction is not None:
      raise ValueError('chestxray14 has the official test split; '
                       'test_fraction does not apply.')
    return chestxray14.builder(
        data_dir=data_dir, image_size=image_size,
        validation_fraction=(chestxray14.DEFAULT_VALIDATION_FRACTION
                             if validation_fraction is None
                             else validation_fraction),
        split_seed=split_seed, max_quarantine_fraction=max_quarantine_fraction,
        num_workers=num_workers)
  if dataset in folders.BUILDERS:
    return folders.builder(
        dataset, data_dir=data_dir, image_size=image_size,
        validation_fraction=validation_fraction, test_fraction=test_fraction,
        split_seed=split_seed, max_quarantine_fraction=max_quarantine_fraction,
        num_workers=num_workers)
  if dataset in DOWNLOADED_DATASETS:
    # Gray / resize happen in the input pipeline for TFDS's own sets.
    return tfds.builder(dataset, data_dir=data_dir)
  raise ValueError(
      f'unknown data set {dataset!r}; known: {", ".join(DATASETS)}')


def prepare(dataset: str, *, manual_dir, data_dir, **options) -> dict:
  """Prepares `dataset` and writes its summary.json and quarantine.csv.

  Args:
    dataset: one of DATASETS.
    manual_dir: folder of the user's files (None for DOWNLOADED_DATASETS).
    data_dir: TFDS data directory to write.
    **options: image_size, validation_fraction, test_fraction, split_seed,
      max_quarantine_fraction, num_workers (see `get_builder`).

  Returns:
    The summary (also written to <data_dir>/<dataset>/summary.json).

  Raises:
    ValueError: unknown data set or settings.
    FileNotFoundError: manual_dir or an expected file is missing.
    quarantine.TooManyBrokenFilesError: too many missing / broken files (the
      quarantine report is written first).
  """
  if dataset not in DATASETS:
    raise ValueError(
        f'unknown data set {dataset!r}; known: {", ".join(DATASETS)}')
  if not data_dir:
    raise ValueError('data_dir is required: the TFDS directory to write.')
  data_dir = pathlib.Path(data_dir).expanduser()
  report_dir = data_dir / dataset
  download_config = None
  if dataset in MANUAL_DATASETS:
    if not manual_dir:
      raise ValueError(f'{dataset} is made from downloaded files: give '
                       '--manual_dir (see the README).')
    manual_dir = pathlib.Path(manual_dir).expanduser()
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
      instructions = type(get_builder(
          dataset, data_dir=data_dir)).MANUAL_DOWNLOAD_INSTRUCTIONS
      raise FileNotFoundError(f'{dataset}: manual_dir {manual_dir} does not '
                              f'exist or is empty.\n{instructions}')
    # Prepared files inside the download would be scanned as its images.
    if manual_dir.resolve() in (report_dir.resolve(),
                                *report_dir.resolve().parents):
      raise ValueError(
          f'{dataset}: the prepared data ({report_dir}) would be written '
          f'inside the downloaded files ({manual_dir}): choose another '
          '--data_dir.')
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  builder = get_builder(dataset, data_dir=data_dir, **options)
  report_dir.mkdir(parents=True, exist_ok=True)
  try:
    preparation.download_and_prepare(builder, download_config)
  except quarantine.TooManyBrokenFilesError as error:
    quarantine.write_csv(error.records, report_dir / 'quarantine.csv')
    raise
  summary = summarize(builder)
  (report_dir / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
  quarantine.write_csv(
      [quarantine.QuarantinedFile(**record)
       for record in summary['quarantined']], report_dir / 'quarantine.csv')
  logging.info('%s: prepared %s in %s; %d files quarantined.', dataset,
               summary['splits'], summary['prepared_dir'],
               len(summary['quarantined']))
  return summary


def summarize(builder: tfds.core.DatasetBuilder) -> dict:
  """The summary of a prepared builder, from its stored info."""
  info = builder.info
  metadata = dict(info.metadata or {})
  splits = {name: split.num_examples for name, split in info.splits.items()}
  per_split = metadata.get('label_counts') or _count_labels(builder)
  label_names = _label_names(builder)
  totals = {name: sum(counts.get(name, 0) for counts in per_split.values())
            for name in label_names}
  summary = {
      'dataset': builder.name,
      'config': builder.builder_config.name if builder.builder_config else '',
      'version': str(builder.version),
      'image_size': metadata.get('image_size'),
      'prepared_dir': os.fspath(builder.data_dir),
      'splits': splits,
      'label_counts': totals,
      'label_counts_per_split': per_split,
      'quarantined': metadata.get('quarantined', []),
  }
  for key in ('patients', 'age_median', 'duplicates', 'ignored_files',
              'source_csv', 'unlisted_rows', 'layout', 'class_folders'):
    if key in metadata:
      summary[key] = metadata[key]
  return summary


def _label_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  features = builder.info.features
  if 'labels' in features:  # chestxray14: multi-hot.
    return list(labels.LABELS)
  return list(features['label'].names)


def _count_labels(builder: tfds.core.DatasetBuilder) -> dict[str, dict]:
  """Label counts per split of a TFDS set without our metadata (dtd)."""
  names = _label_names(builder)
  per_split = {}
  for split in builder.info.splits:
    dataset = builder.as_dataset(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
    counts = np.zeros(len(names), np.int64)
    for label in dataset.map(lambda example: example['label']).batch(4096):
      counts += np.bincount(label.numpy(), minlength=len(names))
    per_split[split] = {name: int(c) for name, c in zip(names, counts)}
  return per_split


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _DATASET.value:
    raise app.UsageError(f'--dataset is required: one of {", ".join(DATASETS)}')
  if not _DATA_DIR.value:
    raise app.UsageError('--data_dir is required (the TFDS directory to write)')
  options = dict(
      image_size=_IMAGE_SIZE.value,
      validation_fraction=_VALIDATION_FRACTION.value,
      test_fraction=_TEST_FRACTION.value, split_seed=_SPLIT_SEED.value,
      max_quarantine_fraction=_MAX_QUARANTINE_FRACTION.value,
      num_workers=_NUM_WORKERS.value)
  if _DATASET.value in DOWNLOADED_DATASETS:
    options = {}
  try:
    summary = prepare(_DATASET.value, manual_dir=_MANUAL_DIR.value,
                      data_dir=_DATA_DIR.value, **options)
  except (ValueError, FileNotFoundError,
          quarantine.TooManyBrokenFilesError) as error:
    sys.exit(f'prepare: {error}')
  print(json.dumps({key: summary[key] for key in ('splits', 'label_counts')},
                   indent=2))
  print(f'{len(summary["quarantined"])} files quarantined; summary in '
        f'{pathlib.Path(_DATA_DIR.value).expanduser() / summary["dataset"]}')


if __name__ == '__main__':
  app.run(main)
