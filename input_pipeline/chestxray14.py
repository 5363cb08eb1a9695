"""TFDS builder `chestxray14`: NIH ChestX-ray14 from the user's download.

Reads, from the manual directory (see `MANUAL_DOWNLOAD_INSTRUCTIONS`):
`Data_Entry_2017_v2020.csv` (or `Data_Entry_2017.csv`, optionally gzipped),
`train_val_list.txt`, `test_list.txt` and the 112,120 PNGs, found anywhere
below it (`images/`, `images_001/images/` ... `images_012/images/`, or flat).

Splits:
* `test`: the official test list (25,596 images, 2,797 patients).
* `train` and `validation`: the official train_val list divided by patient ID;
  a seeded random `validation_fraction` of its patients (not of its images)
  form `validation`. No patient is in two splits (checked, also for the
  official lists).

Each image is decoded once (`input_pipeline.decode`: gray, padded to a square,
Lanczos-resized to `image_size`) in worker processes, and stored as PNG.
Missing or broken files, and CSV rows with invalid metadata, are quarantined
(`input_pipeline.quarantine`); above `max_quarantine_fraction` of the listed
images the preparation fails.

The CSV is read by position: its header has 11 fields (12 with the trailing
comma of the 2017 file), because `OriginalImage[Width,Height]` and
`OriginalImagePixelSpacing[x,y]` each span two columns. The first seven header
names are checked so that a re-ordered file fails instead of being misread.

Ages: the 2017 CSV holds a few impossible ages (e.g. 412, 414; the v2020 file
corrected them). Ages above `MAX_AGE_YEARS` are unknown: `age_mask` is 0 and
`age` holds the median age of the train split's known ages. Ages written as
`058Y`, `006M`, `010W` or `030D` are converted to years.
"""

import collections
import csv
import dataclasses
import gzip
import os
import pathlib
import re

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import decode
from input_pipeline import labels
from input_pipeline import quarantine

NAME = 'chestxray14'
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'
CSV_GLOB = 'Data_Entry_2017*.csv'
# Ages above this (in years) are data errors of the 2017 CSV: unknown.
MAX_AGE_YEARS = 120.0
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0
STANDARD_IMAGE_SIZES = (256, 512)

# Expected header names at positions 0-6 (lower case, spaces removed; several
# spellings are seen in the wild), and the first fields of the first row.
_HEADER = (('imageindex',), ('findinglabels', 'findings'), ('follow-up#',
           'followup#', 'follow-up', 'followup'), ('patientid',),
           ('patientage', 'age'), ('patientgender', 'patientsex', 'gender',
                                   'sex'), ('viewposition', 'view'))
_AGE = re.compile(r'^(\d+(?:\.\d*)?)\s*([YMWD]?)$', re.IGNORECASE)
_YEARS_PER_UNIT = {'': 1.0, 'Y': 1.0, 'M': 1 / 12, 'W': 7 / 365.25,
                   'D': 1 / 365.25}

_DESCRIPTION = """\
NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients with 14
text-mined findings (plus `No Finding`), view (PA/AP), sex and age. Official
test split; train/validation divided by patient from the official train_val
list. Images are grayscale, padded to a square and resized once.
"""

_CITATION = """\
@inproceedings{wang2017chestxray,
  title={ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on
         Weakly-Supervised Classification and Localization of Common Thorax
         Diseases},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and
          Bagheri, Mohammadhadi and Summers, Ronald M},
  booktitle={CVPR},
  pages={2097--2106},
  year={2017}
}
"""


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Data_Entry_2017*.csv."""
  image_index: str
  labels: tuple[int, ...]  # Multi-hot in the order of labels.LABELS.
  follow_up: int
  patient_id: int
  age: float | None  # Years; None = unknown.
  sex: str
  view: str


@dataclasses.dataclass(eq=False)
class Chestxray14Config(tfds.core.BuilderConfig):
  """Image size and the patient-level train / validation division."""
  image_size: int = 256
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  split_seed: int = DEFAULT_SPLIT_SEED


def config_name(image_size: int, validation_fraction: float,
                split_seed: int) -> str:
  """'256' / '512' for the standard configs, else e.g. '64_val0.2_seed1'."""
  if (image_size in STANDARD_IMAGE_SIZES and
      validation_fraction == DEFAULT_VALIDATION_FRACTION and
      split_seed == DEFAULT_SPLIT_SEED):
    return str(image_size)
  return f'{image_size}_val{validation_fraction:g}_seed{split_seed}'


def _make_config(image_size: int, validation_fraction: float,
                 split_seed: int) -> Chestxray14Config:
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}')
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError('validation_fraction (of the train_val patients) must be '
                     f'in (0, 1), got {validation_fraction}')
  return Chestxray14Config(
      name=config_name(image_size, validation_fraction, split_seed),
      description=(f'{image_size}x{image_size} grayscale; validation = '
                   f'{validation_fraction:g} of the train_val patients '
                   f'(seed {split_seed}).'),
      image_size=image_size,
      validation_fraction=validation_fraction,
      split_seed=split_seed)


class Chestxray14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14, official test split, patient-level validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      _make_config(size, DEFAULT_VALIDATION_FRACTION, DEFAULT_SPLIT_SEED)
      for size in STANDARD_IMAGE_SIZES
  ]
  # TFDS looks for a builder's source file (to find a checksums file) with
  # `importlib_resources`, which it does not install on Python >= 3.9; name
  # the file directly.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC
(about 45 GB): `Data_Entry_2017_v2020.csv`, `train_val_list.txt`,
`test_list.txt` and the 12 archives `images_001.tar.gz` ... `images_012.tar.gz`.
Put the three text files in the manual directory and unpack the archives
there, so that it holds e.g.
  <manual_dir>/Data_Entry_2017_v2020.csv
  <manual_dir>/train_val_list.txt
  <manual_dir>/test_list.txt
  <manual_dir>/images/00000001_000.png ...    (the archives' own layout), or
  <manual_dir>/images_001/images/*.png ...    (one folder per archive), or
  <manual_dir>/*.png                           (flat).
Then run
  python -m input_pipeline.prepare --dataset chestxray14 \\
      --manual_dir <manual_dir> --data_dir <data_dir>
"""

  def __init__(self, *,
               max_quarantine_fraction: float = quarantine.DEFAULT_MAX_FRACTION,
               num_workers: int | None = None, **kwargs):
    """See `builder`; other arguments go to tfds.core.GeneratorBasedBuilder."""
    self._max_quarantine_fraction = max_quarantine_fraction
    self._num_workers = num_workers
    self.quarantine = quarantine.Quarantine(NAME, max_quarantine_fraction)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
            'labels': tfds.features.Tensor(shape=(len(labels.LABELS),),
                                           dtype=np.uint8),
            'view': tfds.features.ClassLabel(names=labels.VIEWS),
            'sex': tfds.features.ClassLabel(names=labels.SEXES),
            'age': tfds.features.Scalar(dtype=np.float32),
            'age_mask': tfds.features.Scalar(dtype=np.uint8),
            'patient_id': tfds.features.Scalar(dtype=np.int32),
            'follow_up': tfds.features.Scalar(dtype=np.int32),
            'image_index': tfds.features.Text(),
            'id': tfds.features.Text(),
        }),
        homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    self._manual_dir = manual_dir
    csv_path, train_val_path, test_path = find_metadata_files(manual_dir)
    rows, invalid_rows = read_data_entry(csv_path)
    split_images = {
        'train_val': read_split_list(train_val_path),
        'test': read_split_list(test_path),
    }
    image_paths = index_images(manual_dir)
    if not image_paths:
      raise FileNotFoundError(
          f'{NAME}: no PNG images found under {manual_dir}. Unpack '
          'images_001.tar.gz ... images_012.tar.gz there (see the manual '
          'download instructions).')
    config = self.builder_config
    plan = plan_splits(rows, invalid_rows, split_images, image_paths,
                       csv_name=csv_path.name,
                       validation_fraction=config.validation_fraction,
                       split_seed=config.split_seed)
    self.quarantine = quarantine.Quarantine(NAME, self._max_quarantine_fraction)
    for record in plan.quarantined:
      self.quarantine.add(record.file, record.reason, record.split)
    self._num_done = len(plan.quarantined)
    # Fail before hours of decoding when files are already missing.
    self.quarantine.check(plan.num_listed)
    known_train_ages = [row.age for row, _ in plan.splits['train']
                        if row.age is not None]
    self._imputed_age = float(np.median(known_train_ages)
                              if known_train_ages else 0.0)
    metadata = self.info.metadata
    metadata.update({
        'source_csv': csv_path.name,
        'image_size': config.image_size,
        'validation_fraction': config.validation_fraction,
        'split_seed': config.split_seed,
        'unlisted_rows': plan.num_unlisted,
        'label_counts': {},
        'patients': {},
        'quarantined': [],
    })
    logging.info('%s: %s listed images; %d quarantined before decoding.',
                 NAME, plan.num_listed, len(plan.quarantined))
    return {split: self._generate_examples(split, items)
            for split, items in plan.splits.items()}

  def _generate_examples(self, split: str, items: list[tuple[Row, str]]):
    rows_by_path = {path: row for row, path in items}
    counts = np.zeros(len(labels.LABELS), np.int64)
    patients, ages = set(), []
    for path, png, reason in decode.prepare_files(
        [path for _, path in items], self.builder_config.image_size,
        self._num_workers):
      row = rows_by_path[path]
      if png is None:
        self.quarantine.add(os.path.relpath(path, self._manual_dir), reason,
                            split)
        continue
      counts += row.labels
      patients.add(row.patient_id)
      if row.age is not None:
        ages.append(row.age)
      yield row.image_index, {
          'image': png,
          'labels': np.asarray(row.labels, np.uint8),
          'view': row.view,
          'sex': row.sex,
          'age': np.float32(row.age if row.age is not None
                            else self._imputed_age),
          'age_mask': np.uint8(row.age is not None),
          'patient_id': np.int32(row.patient_id),
          'follow_up': np.int32(row.follow_up),
          'image_index': row.image_index,
          'id': row.image_index,
      }
    self._num_done += len(items)
    self.quarantine.check(self._num_done)
    metadata = self.info.metadata
    metadata['label_counts'][split] = dict(
        zip(labels.LABELS, (int(c) for c in counts)))
    metadata['patients'][split] = len(patients)
    metadata['quarantined'] = self.quarantine.as_json()
    if split == 'train':
      metadata['age_median'] = float(np.median(ages)) if ages else 0.0


def builder(*, data_dir: str | os.PathLike | None,
            image_size: int = 256,
            validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
            split_seed: int = DEFAULT_SPLIT_SEED,
            max_quarantine_fraction: float = quarantine.DEFAULT_MAX_FRACTION,
            num_workers: int | None = None) -> Chestxray14:
  """The `chestxray14` builder for these settings (standard or custom config).

  Args:
    data_dir: TFDS data directory (None or '' = TFDS's default).
    image_size: side of the square images.
    validation_fraction: fraction of the train_val patients in `validation`.
    split_seed: seed of the patient draw.
    max_quarantine_fraction: preparation fails above this fraction of
      missing or broken listed images (does not change the data).
    num_workers: decoding processes (None = one per core; does not change
      the data).

  Returns:
    The builder; config '256' or '512' when the split settings are the
    defaults, else a custom config named by `config_name`.
  """
  name = config_name(image_size, validation_fraction, split_seed)
  config = (name if name in Chestxray14.builder_configs else
            _make_config(image_size, validation_fraction, split_seed))
  return Chestxray14(config=config,
                     data_dir=os.fspath(data_dir) if data_dir else None,
                     max_quarantine_fraction=max_quarantine_fraction,
                     num_workers=num_workers)


def find_metadata_files(
    manual_dir: pathlib.Path
) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(CSV, train_val list, test list) in `manual_dir`, or a clear error.

  Of several CSVs, Data_Entry_2017_v2020.csv (corrected ages) is preferred.
  """
  if not manual_dir.is_dir():
    raise FileNotFoundError(f'{NAME}: manual_dir {manual_dir} does not exist.')
  candidates = sorted(list(manual_dir.glob(CSV_GLOB)) +
                      list(manual_dir.glob(CSV_GLOB + '.gz')))
  if not candidates:
    raise FileNotFoundError(
        f'{NAME}: no {CSV_GLOB} in {manual_dir}. Download '
        'Data_Entry_2017_v2020.csv from '
        'https://nihcc.app.box.com/v/ChestXray-NIHCC and put it there.')
  candidates.sort(key=lambda path: ('v2020' not in path.name, path.name))
  if len(candidates) > 1:
    logging.info('%s: using %s (of %s).', NAME, candidates[0].name,
                 [path.name for path in candidates])
  split_lists = []
  for name in (TRAIN_VAL_LIST, TEST_LIST):
    path = manual_dir / name
    if not path.is_file():
      raise FileNotFoundError(
          f'{NAME}: official split list {name} not found: expected '
          f'{path}. Download it from '
          'https://nihcc.app.box.com/v/ChestXray-NIHCC.')
    split_lists.append(path)
  return candidates[0], split_lists[0], split_lists[1]


def read_data_entry(path) -> tuple[list[Row], dict[str, str]]:
  """Parses Data_Entry_2017*.csv(.gz) by position.

  Args:
    path: the CSV (gzipped if its name ends in .gz).

  Returns:
    (valid rows, {image index: reason} for rows with invalid values).

  Raises:
    ValueError: the header is not ChestX-ray14's, or an image appears twice.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rt', newline='', encoding='utf-8-sig') as file:
    reader = csv.reader(file)
    header = next(reader, None)
    _check_header(header, path)
    rows, invalid = [], {}
    for line_number, fields in enumerate(reader, start=2):
      if not any(field.strip() for field in fields):
        continue
      image_index = fields[0].strip()
      try:
        row = _parse_row(fields)
      except ValueError as error:
        invalid[image_index or f'<line {line_number}>'] = (
            f'invalid row at {path.name}:{line_number}: {error}')
        continue
      rows.append(row)
  seen = set()
  for row in rows:
    if row.image_index in seen:
      raise ValueError(f'{path}: image {row.image_index} has two rows.')
    seen.add(row.image_index)
  return rows, invalid


def _check_header(header: list[str] | None, path: pathlib.Path) -> None:
  if not header:
    raise ValueError(f'{path} is empty; expected the ChestX-ray14 CSV.')
  names = [re.sub(r'\s+', '', name).lower() for name in header]
  problems = [
      f'column {i + 1} is {header[i]!r}, expected {expected[0]!r}'
      for i, expected in enumerate(_HEADER)
      if i >= len(names) or names[i] not in expected
  ] if len(names) >= len(_HEADER) else [f'{len(names)} columns']
  if problems:
    raise ValueError(
        f'{path} does not have the ChestX-ray14 header ({"; ".join(problems)}).'
        ' Expected: Image Index, Finding Labels, Follow-up #, Patient ID, '
        'Patient Age, Patient Gender, View Position, ...')


def _parse_row(fields: list[str]) -> Row:
  if len(fields) < len(_HEADER):
    raise ValueError(f'{len(fields)} fields, expected at least {len(_HEADER)}')
  image_index, findings, follow_up, patient_id, age, sex, view = (
      field.strip() for field in fields[:len(_HEADER)])
  if not image_index:
    raise ValueError('empty Image Index')
  return Row(
      image_index=image_index,
      labels=parse_findings(findings),
      follow_up=_parse_int(follow_up, 'Follow-up #'),
      patient_id=_parse_int(patient_id, 'Patient ID'),
      age=parse_age(age),
      sex=_parse_choice(sex, labels.SEXES, 'Patient Gender'),
      view=_parse_choice(view, labels.VIEWS, 'View Position'))


def parse_findings(text: str) -> tuple[int, ...]:
  """'Effusion|Mass' -> multi-hot over labels.LABELS (No Finding derived)."""
  names = [name.strip() for name in text.split('|') if name.strip()]
  if not names:
    raise ValueError('empty Finding Labels')
  multi_hot = [0] * len(labels.LABELS)
  for name in names:
    if name == labels.NO_FINDING:
      continue
    if name not in labels.FINDINGS:
      raise ValueError(f'unknown finding {name!r}')
    multi_hot[labels.FINDINGS.index(name)] = 1
  # The data contract: No Finding = 1 iff no finding is set.
  multi_hot[-1] = int(not any(multi_hot))
  return tuple(multi_hot)


def parse_age(text: str) -> float | None:
  """'58' / '058Y' / '006M' / '010W' / '030D' -> years; None above 120."""
  match = _AGE.match(text.strip())
  if not match:
    raise ValueError(f'invalid Patient Age {text!r}')
  years = float(match.group(1)) * _YEARS_PER_UNIT[match.group(2).upper()]
  return None if years > MAX_AGE_YEARS else years


def _parse_int(text: str, column: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'invalid {column} {text!r}') from None


def _parse_choice(text: str, choices: tuple[str, ...], column: str) -> str:
  if text.upper() not in choices:
    raise ValueError(f'unknown {column} {text!r}, expected one of {choices}')
  return text.upper()


def read_split_list(path) -> list[str]:
  """Image names of an official split list, one per line."""
  with open(path) as file:
    return [line.strip() for line in file if line.strip()]


def index_images(manual_dir) -> dict[str, str]:
  """{file name: path} of the PNGs anywhere below `manual_dir`."""
  found: dict[str, str] = {}
  duplicates = 0
  for folder, subfolders, files in os.walk(manual_dir):
    subfolders.sort()
    for name in sorted(files):
      if name.lower().endswith('.png') and not name.startswith('.'):
        if name in found:
          duplicates += 1
          continue
        found[name] = os.path.join(folder, name)
  if duplicates:
    logging.warning('%s: %d image names appear in two folders; the first in '
                    'sorted order is used.', NAME, duplicates)
  return found


@dataclasses.dataclass
class SplitPlan:
  """What goes where, before decoding."""
  splits: dict[str, list[tuple[Row, str]]]  # split -> [(row, image path)]
  quarantined: list[quarantine.QuarantinedFile]
  num_listed: int  # Distinct images in the split lists.
  num_unlisted: int  # Valid CSV rows in no split list.


def plan_splits(rows: list[Row], invalid_rows: dict[str, str],
                split_images: dict[str, list[str]],
                image_paths: dict[str, str], *, csv_name: str,
                validation_fraction: float, split_seed: int) -> SplitPlan:
  """Assigns listed images to train / validation / test by patient.

  Args:
    rows: valid CSV rows.
    invalid_rows: {image index: reason} of invalid CSV rows.
    split_images: {'train_val': names, 'test': names} of the official lists.
    image_paths: {name: path} of the images found.
    csv_name: the CSV's file name (for reasons).
    validation_fraction: fraction of the train_val patients in validation.
    split_seed: seed of the patient draw.

  Returns:
    The plan: images per split (sorted by name), and the quarantined ones.

  Raises:
    ValueError: an image or a patient is in both official lists.
  """
  list_files = {'train_val': TRAIN_VAL_LIST, 'test': TEST_LIST}
  in_both = set(split_images['train_val']) & set(split_images['test'])
  if in_both:
    raise ValueError(
        f'{len(in_both)} images are in both {TRAIN_VAL_LIST} and {TEST_LIST} '
        f'(e.g. {sorted(in_both)[:3]}); use the official lists.')
  rows_by_name = {row.image_index: row for row in rows}
  # Splits are decided from the CSV alone, so that a missing or broken file
  # never moves a patient to another split.
  quarantined = []
  listed = {}  # image name -> 'train_val' | 'test', for valid CSV rows.
  for list_name, names in split_images.items():
    for name in dict.fromkeys(names):
      if name in invalid_rows:
        quarantined.append(quarantine.QuarantinedFile(
            name, invalid_rows[name], list_name))
      elif name not in rows_by_name:
        quarantined.append(quarantine.QuarantinedFile(
            name, f'listed in {list_files[list_name]} but has no row in '
            f'{csv_name}', list_name))
      else:
        listed[name] = list_name
  num_listed = len(set(split_images['train_val']) | set(split_images['test']))

  patients = {'train_val': set(), 'test': set()}
  for name, list_name in listed.items():
    patients[list_name].add(rows_by_name[name].patient_id)
  shared = patients['train_val'] & patients['test']
  if shared:
    raise ValueError(
        f'{len(shared)} patients have images in both {TRAIN_VAL_LIST} and '
        f'{TEST_LIST} (e.g. patient IDs {sorted(shared)[:5]}); the official '
        'lists are patient-disjoint: use them.')
  validation_patients = draw_validation_patients(
      patients['train_val'], validation_fraction, split_seed)

  splits = {'train': [], 'validation': [], 'test': []}
  for name in sorted(listed):
    row = rows_by_name[name]
    if listed[name] == 'test':
      split = 'test'
    elif row.patient_id in validation_patients:
      split = 'validation'
    else:
      split = 'train'
    if name in image_paths:
      splits[split].append((row, image_paths[name]))
    else:
      quarantined.append(quarantine.QuarantinedFile(
          name, f'listed in {csv_name} and {list_files[listed[name]]} but no '
          'such file under manual_dir (missing image)', split))
  all_listed = set(split_images['train_val']) | set(split_images['test'])
  num_unlisted = sum(1 for row in rows if row.image_index not in all_listed)
  return SplitPlan(splits, quarantined, num_listed, num_unlisted)


def draw_validation_patients(patient_ids, fraction: float,
                             seed: int) -> set[int]:
  """A seeded random `fraction` of the patients (at least one, if any)."""
  ordered = sorted(patient_ids)
  if not ordered:
    return set()
  count = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
  permutation = np.random.default_rng(seed).permutation(len(ordered))
  return {ordered[i] for i in permutation[:count]}


def label_counts(rows: list[Row]) -> dict[str, int]:
  """{label: images with it} over `rows`."""
  totals = np.sum([row.labels for row in rows], axis=0, dtype=np.int64)
  return dict(zip(labels.LABELS, (int(t) for t in totals)))


def count_by(rows: list[Row], field: str) -> dict[str, int]:
  """{value: rows} of a Row field (e.g. 'view', 'sex')."""
  return dict(collections.Counter(getattr(row, field) for row in rows))
