"""TFDS builders for image-folder data sets: covid3, textures, medical_mnist.

One generic builder (`FolderBuilder`), parametrised per data set by its class
names (fixed, or read from the folders) and its default split fractions.

Layouts of the manual directory (both searched recursively for images):
* split folders: `<dir>/<split>/<class>/...`, split folders named train /
  training, val / valid / validation, test / testing;
* class folders only: `<dir>/<class>/...`.
Splits that have no folder are carved, deterministically and stratified by
class, out of the training images: `test_fraction` of them for `test` (when
there is no test folder) and `validation_fraction` for `validation` (when
there is no validation folder), with `np.random.default_rng(split_seed)`.

No patient IDs exist in these sets, so splits cannot be made patient-disjoint;
what is checked is identical files. Byte-identical copies are kept together:
a carve assigns all copies to one split, and a copy found in two given split
folders is left out of the less-evaluative one (train < validation < test),
listed under `duplicates`. Copies with different classes are quarantined.

Images are decoded once by `input_pipeline.decode` (grayscale, padded to a
square, Lanczos-resized) in worker processes and stored as PNG; broken files
are quarantined (`input_pipeline.quarantine`). Files without an image suffix
(see `decode.IMAGE_EXTENSIONS`) are not images of the set: they are listed
under `ignored_files`.
"""

import collections
import dataclasses
import hashlib
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

STANDARD_IMAGE_SIZES = (256, 512)
DEFAULT_SPLIT_SEED = 0
# Folder names (normalised: lower case, letters and digits only) -> split.
SPLIT_FOLDERS = {
    'train': 'train', 'training': 'train',
    'val': 'validation', 'valid': 'validation', 'validation': 'validation',
    'test': 'test', 'testing': 'test',
}
# Order of preference of a duplicated file: kept in the last split.
_SPLIT_PRIORITY = ('train', 'validation', 'test')


def normalize_folder_name(name: str) -> str:
  """'COVID-19' -> 'covid19', 'Viral Pneumonia' -> 'viralpneumonia'."""
  return re.sub(r'[^a-z0-9]', '', name.lower())


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Image size and how missing splits are carved."""
  image_size: int = 256
  validation_fraction: float = 0.1
  test_fraction: float = 0.0
  split_seed: int = DEFAULT_SPLIT_SEED


def config_name(image_size: int, validation_fraction: float,
                test_fraction: float, split_seed: int,
                defaults: tuple[float, float]) -> str:
  """'256' / '512' with the default splits, else e.g. '64_val0.1_test0_seed0'.

  Args:
    image_size: side of the square images.
    validation_fraction: see FolderConfig.
    test_fraction: see FolderConfig.
    split_seed: see FolderConfig.
    defaults: the set's default (validation_fraction, test_fraction).
  """
  if (image_size in STANDARD_IMAGE_SIZES and
      (validation_fraction, test_fraction) == tuple(defaults) and
      split_seed == DEFAULT_SPLIT_SEED):
    return str(image_size)
  return (f'{image_size}_val{validation_fraction:g}_test{test_fraction:g}'
          f'_seed{split_seed}')


def make_config(image_size: int, validation_fraction: float,
                test_fraction: float, split_seed: int,
                defaults: tuple[float, float]) -> FolderConfig:
  """A FolderConfig, named by `config_name`."""
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}')
  if not (0.0 <= validation_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and
          validation_fraction + test_fraction < 1.0):
    raise ValueError(
        'validation_fraction and test_fraction must be in [0, 1) with a sum '
        f'below 1, got {validation_fraction} and {test_fraction}')
  return FolderConfig(
      name=config_name(image_size, validation_fraction, test_fraction,
                       split_seed, defaults),
      description=(f'{image_size}x{image_size} grayscale; splits without a '
                   f'folder: validation {validation_fraction:g} and test '
                   f'{test_fraction:g} of the training images '
                   f'(seed {split_seed}).'),
      image_size=image_size,
      validation_fraction=validation_fraction,
      test_fraction=test_fraction,
      split_seed=split_seed)


def _standard_configs(validation_fraction: float,
                      test_fraction: float) -> list[FolderConfig]:
  defaults = (validation_fraction, test_fraction)
  return [make_config(size, validation_fraction, test_fraction,
                      DEFAULT_SPLIT_SEED, defaults)
          for size in STANDARD_IMAGE_SIZES]


@dataclasses.dataclass(frozen=True)
class FolderImage:
  """An image file of a folder data set."""
  path: str  # Relative to the manual directory.
  class_name: str
  split: str  # Split of its folder ('train' when there are no split folders).


class FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """An image-folder data set; subclasses name the set and its classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  # TFDS looks for a builder's source file (to find a checksums file) with
  # `importlib_resources`, which it does not install on Python >= 3.9; name
  # the file directly.
  code_path = epath.Path(__file__)
  # Class names in label order; None = the sorted class folder names.
  CLASS_NAMES: tuple[str, ...] | None = None
  # Extra folder spellings: normalised folder name -> class name (the class
  # names themselves are always accepted, in any case or punctuation).
  CLASS_ALIASES: dict[str, str] = {}
  DEFAULT_VALIDATION_FRACTION = 0.1
  DEFAULT_TEST_FRACTION = 0.0
  HOMEPAGE = ''
  DESCRIPTION = ''

  def __init__(self, *,
               max_quarantine_fraction: float = quarantine.DEFAULT_MAX_FRACTION,
               num_workers: int | None = None, **kwargs):
    """See `builder`; other arguments go to tfds.core.GeneratorBasedBuilder."""
    self._max_quarantine_fraction = max_quarantine_fraction
    self._num_workers = num_workers
    self.quarantine = quarantine.Quarantine(self.name, max_quarantine_fraction)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    label = (tfds.features.ClassLabel(names=self.CLASS_NAMES)
             if self.CLASS_NAMES else tfds.features.ClassLabel())
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
            'label': label,
            # Path of the source file, relative to the manual directory.
            'id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    self._manual_dir = manual_dir
    accepted = list(self.CLASS_NAMES or ()) + sorted(self.CLASS_ALIASES)
    scan = scan_folders(manual_dir, self.name, self._class_of_folder,
                        ', '.join(accepted))
    class_names = self.CLASS_NAMES or tuple(
        sorted(set(scan.class_folders.values())))
    if len(class_names) < 2:
      raise ValueError(
          f'{self.name}: found {len(class_names)} class folder(s) '
          f'({sorted(scan.class_folders)}) in {manual_dir}; --manual_dir must '
          'be the folder that holds the class folders (or the split folders).')
    if not self.CLASS_NAMES:
      self.info.features['label'].names = list(class_names)
    config = self.builder_config
    plan = plan_folder_splits(
        scan.files, [str(manual_dir / f.path) for f in scan.files],
        class_names=class_names,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction, split_seed=config.split_seed)
    self.quarantine = quarantine.Quarantine(self.name,
                                            self._max_quarantine_fraction)
    for record in plan.quarantined:
      self.quarantine.add(record.file, record.reason, record.split)
    self._num_done = len(plan.quarantined)
    self.quarantine.check(len(scan.files) - len(plan.duplicates))
    self.info.metadata.update({
        'image_size': config.image_size,
        'layout': scan.layout,
        'class_folders': scan.class_folders,
        'validation_fraction': config.validation_fraction,
        'test_fraction': config.test_fraction,
        'split_seed': config.split_seed,
        'label_counts': {},
        'quarantined': self.quarantine.as_json(),
        'duplicates': plan.duplicates,
        'ignored_files': scan.ignored_files,
    })
    return {split: self._generate_examples(split, items)
            for split, items in plan.splits.items() if items}

  def _class_of_folder(self, folder: str) -> str | None:
    """The class a folder holds; None when the set has no such class."""
    if not self.CLASS_NAMES:
      return folder
    accepted = {normalize_folder_name(n): n for n in self.CLASS_NAMES}
    accepted.update(self.CLASS_ALIASES)
    return accepted.get(normalize_folder_name(folder))

  def _generate_examples(self, split: str, items: list[FolderImage]):
    label_names = self.info.features['label'].names
    by_path = {str(self._manual_dir / item.path): item for item in items}
    counts = collections.Counter()
    for path, png, reason in decode.prepare_files(
        list(by_path), self.builder_config.image_size, self._num_workers):
      item = by_path[path]
      if png is None:
        self.quarantine.add(item.path, reason, split)
        continue
      counts[item.class_name] += 1
      yield item.path, {'image': png, 'label': item.class_name,
                        'id': item.path}
    self._num_done += len(items)
    self.quarantine.check(self._num_done)
    metadata = self.info.metadata
    metadata['label_counts'][split] = {name: counts[name]
                                       for name in label_names}
    metadata['quarantined'] = self.quarantine.as_json()


class Covid3(FolderBuilder):
  """COVID-19 / Pneumonia / Normal chest X-rays (the paper's composite)."""
  CLASS_NAMES = labels.COVID3_CLASSES
  CLASS_ALIASES = {
      'covid': 'COVID-19', 'covid19': 'COVID-19', 'covid2019': 'COVID-19',
      'viralpneumonia': 'Pneumonia', 'bacterialpneumonia': 'Pneumonia',
  }
  DEFAULT_VALIDATION_FRACTION = 0.1
  # The paper tests on 1,831 of its 19,362 images (used without a test
  # folder).
  DEFAULT_TEST_FRACTION = 0.095
  BUILDER_CONFIGS = _standard_configs(DEFAULT_VALIDATION_FRACTION,
                                      DEFAULT_TEST_FRACTION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Assemble the COVID-19 / Pneumonia / Normal chest X-rays (the paper combines
public sets, e.g. github.com/agchung/Figure1-COVID-chestxray-dataset and
github.com/ieee8023/covid-chestxray-dataset for COVID-19, and the Kermany et al.
pediatric set for pneumonia / normal) into class folders:
  <manual_dir>/{train,test}/{COVID-19,Pneumonia,Normal}/*.png|jpg  or
  <manual_dir>/{COVID-19,Pneumonia,Normal}/*.png|jpg   (test carved out).
Folder names may also be COVID, COVID19, Viral Pneumonia, Bacterial Pneumonia
(any case). Then run
  python -m input_pipeline.prepare --dataset covid3 \\
      --manual_dir <manual_dir> --data_dir <data_dir>
"""
  DESCRIPTION = ('Chest X-rays in 3 classes (COVID-19, Pneumonia, Normal), '
                 'grayscale, padded to a square and resized once.')


class Textures(FolderBuilder):
  """Textures Classification set (Abin24, 2023): 64 texture classes."""
  DEFAULT_VALIDATION_FRACTION = 0.05
  DEFAULT_TEST_FRACTION = 0.0
  BUILDER_CONFIGS = _standard_configs(DEFAULT_VALIDATION_FRACTION,
                                      DEFAULT_TEST_FRACTION)
  HOMEPAGE = 'https://github.com/abin24/Textures-Dataset'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the Textures Classification data set (8,674 images, 64 classes) from
https://github.com/abin24/Textures-Dataset and unpack it so that each class is
one folder:
  <manual_dir>/<class name>/*.jpg|png   (or <manual_dir>/{train,test}/<class>/)
The class names are the folder names, in sorted order. Then run
  python -m input_pipeline.prepare --dataset textures \\
      --manual_dir <manual_dir> --data_dir <data_dir>
"""
  DESCRIPTION = ('Texture photographs in 64 classes (pre-training), grayscale '
                 '(ITU-R 601 luma), padded to a square and resized once.')


class MedicalMnist(FolderBuilder):
  """Medical MNIST / MedNIST: 58,954 64x64 medical images in 6 classes."""
  CLASS_NAMES = ('AbdomenCT', 'BreastMRI', 'ChestCT', 'CXR', 'Hand', 'HeadCT')
  DEFAULT_VALIDATION_FRACTION = 0.05
  DEFAULT_TEST_FRACTION = 0.0
  BUILDER_CONFIGS = _standard_configs(DEFAULT_VALIDATION_FRACTION,
                                      DEFAULT_TEST_FRACTION)
  HOMEPAGE = 'https://www.kaggle.com/datasets/andrewmvd/medical-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Medical MNIST (Kaggle: andrewmvd/medical-mnist) or MedNIST
(MedNIST.tar.gz of Project MONAI's tutorials), 58,954 JPEGs, and unpack it so
that the manual directory holds the six class folders:
  <manual_dir>/{AbdomenCT,BreastMRI,ChestCT,CXR,Hand,HeadCT}/*.jpeg
Then run
  python -m input_pipeline.prepare --dataset medical_mnist \\
      --manual_dir <manual_dir> --data_dir <data_dir>
"""
  DESCRIPTION = ('Medical images in 6 classes (pre-training), grayscale, '
                 'padded to a square and resized once.')


# The folder data sets, by TFDS name.
BUILDERS: dict[str, type[FolderBuilder]] = {
    Covid3.name: Covid3,
    Textures.name: Textures,
    MedicalMnist.name: MedicalMnist,
}


def builder(name: str, *, data_dir: str | os.PathLike | None,
            image_size: int = 256,
            validation_fraction: float | None = None,
            test_fraction: float | None = None,
            split_seed: int = DEFAULT_SPLIT_SEED,
            max_quarantine_fraction: float = quarantine.DEFAULT_MAX_FRACTION,
            num_workers: int | None = None) -> FolderBuilder:
  """The builder of folder data set `name` for these settings.

  Args:
    name: 'covid3', 'textures' or 'medical_mnist'.
    data_dir: TFDS data directory (None or '' = TFDS's default).
    image_size: side of the square images.
    validation_fraction: share of the training images carved out as
      `validation` when there is no validation folder (None = the set's
      default: covid3 0.1, textures and medical_mnist 0.05).
    test_fraction: same for `test` when there is no test folder (None = the
      set's default: covid3 0.095, the others 0 = no test split).
    split_seed: seed of the carving.
    max_quarantine_fraction: preparation fails above this fraction of broken
      files (does not change the data).
    num_workers: decoding processes (None = one per core).

  Returns:
    The builder; config '256' or '512' with the set's default splits, else a
    custom config named by `config_name`.
  """
  if name not in BUILDERS:
    raise ValueError(f'unknown folder data set {name!r}; known: '
                     f'{", ".join(BUILDERS)}')
  cls = BUILDERS[name]
  defaults = (cls.DEFAULT_VALIDATION_FRACTION, cls.DEFAULT_TEST_FRACTION)
  if validation_fraction is None:
    validation_fraction = cls.DEFAULT_VALIDATION_FRACTION
  if test_fraction is None:
    test_fraction = cls.DEFAULT_TEST_FRACTION
  config = make_config(image_size, validation_fraction, test_fraction,
                       split_seed, defaults)
  if config.name in cls.builder_configs:
    config = config.name
  return cls(config=config, data_dir=os.fspath(data_dir) if data_dir else None,
             max_quarantine_fraction=max_quarantine_fraction,
             num_workers=num_workers)


@dataclasses.dataclass
class FolderScan:
  """The image files of a manual directory and their classes."""
  layout: str  # 'split folders' or 'class folders'.
  files: list[FolderImage]
  class_folders: dict[str, str]  # Folder (relative) -> class name.
  ignored_files: list[str]  # Files without an image suffix (relative).


def scan_folders(manual_dir: pathlib.Path, dataset: str, class_of_folder,
                 expected_classes: str = '') -> FolderScan:
  """Finds the split / class folders and their image files.

  Args:
    manual_dir: the data set's folder.
    dataset: its name (for errors).
    class_of_folder: folder name -> class name, or None for a folder that is
      not a class of the set.
    expected_classes: the accepted class folder names (for errors).

  Raises:
    FileNotFoundError: no folders or no images.
    ValueError: folders that are neither splits nor classes of the set.
  """
  top = _subfolders(manual_dir)
  if not top:
    raise FileNotFoundError(
        f'{dataset}: no folders in {manual_dir}; expected <class>/ or '
        '<split>/<class>/ folders of images.')
  split_of = {d: SPLIT_FOLDERS.get(normalize_folder_name(d)) for d in top}
  if any(split_of.values()):
    others = [d for d in top if not split_of[d]]
    if others:
      raise ValueError(
          f'{dataset}: {manual_dir} mixes split folders '
          f'({[d for d in top if split_of[d]]}) with other folders ({others}).'
          ' Use <split>/<class>/ or <class>/ only.')
    repeated = [s for s, n in collections.Counter(split_of.values()).items()
                if n > 1]
    if repeated:
      raise ValueError(f'{dataset}: several folders of {manual_dir} name the '
                       f'split(s) {repeated}: {top}.')
    roots, layout = [(d, split_of[d]) for d in top], 'split folders'
  else:
    roots, layout = [('', 'train')], 'class folders'

  files, class_folders, ignored, unknown = [], {}, [], []
  for root, split in roots:
    root_path = manual_dir / root
    ignored += [os.path.join(root, name)
                for name in sorted(os.listdir(root_path))
                if (root_path / name).is_file() and not name.startswith('.')]
    for class_folder in _subfolders(root_path):
      relative = os.path.join(root, class_folder)
      class_name = class_of_folder(class_folder)
      if class_name is None:
        unknown.append(relative)
        continue
      class_folders[relative] = class_name
      for folder, subfolders, names in os.walk(root_path / class_folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
        for name in sorted(names):
          if name.startswith('.'):
            continue
          path = os.path.relpath(os.path.join(folder, name), manual_dir)
          if decode.is_image_file(name):
            files.append(FolderImage(path, class_name, split))
          else:
            ignored.append(path)
  if unknown:
    raise ValueError(
        f'{dataset}: the folders {unknown} of {manual_dir} are not classes of '
        f'{dataset}. Its class folders are named {expected_classes} (any '
        'case, punctuation ignored); move the others away.')
  if not files:
    raise FileNotFoundError(
        f'{dataset}: no image files ({", ".join(decode.IMAGE_EXTENSIONS)}) in '
        f'the class folders of {manual_dir}.')
  if ignored:
    logging.warning('%s: %d files without an image suffix ignored, e.g. %s',
                    dataset, len(ignored), ignored[:3])
  return FolderScan(layout, files, class_folders, ignored)


def _subfolders(path: pathlib.Path) -> list[str]:
  return sorted(entry.name for entry in os.scandir(path)
                if entry.is_dir() and not entry.name.startswith('.'))


@dataclasses.dataclass
class FolderPlan:
  """Files per split, before decoding."""
  splits: dict[str, list[FolderImage]]  # 'train', 'validation', 'test'.
  quarantined: list[quarantine.QuarantinedFile]
  # Copies left out: {'file', 'duplicate_of', 'split'}.
  duplicates: list[dict[str, str]]


def plan_folder_splits(files: list[FolderImage], paths: list[str], *,
                       class_names: tuple[str, ...],
                       validation_fraction: float, test_fraction: float,
                       split_seed: int) -> FolderPlan:
  """Splits files, keeping byte-identical copies in one split.

  Args:
    files: the scanned files, with the split of their folder.
    paths: their absolute paths (same order), read to find identical files.
    class_names: the classes, in label order (the order of the carving).
    validation_fraction: share of the training images carved out for
      `validation` if no file comes from a validation folder.
    test_fraction: same for `test`.
    split_seed: seed of the carving.

  Returns:
    The plan.
  """
  groups = collections.defaultdict(list)  # content digest -> file indices
  for index, path in enumerate(paths):
    groups[_digest(path) or f'unreadable:{index}'].append(index)

  quarantined, duplicates = [], []
  # Each group: its files that are used; all go to one split.
  kept_groups: list[list[int]] = []
  for members in groups.values():
    classes = sorted({files[i].class_name for i in members})
    if len(classes) > 1:
      for i in members:
        others = [files[j].path for j in members
                  if files[j].class_name != files[i].class_name]
        quarantined.append(quarantine.QuarantinedFile(
            files[i].path, f'identical bytes to {others[0]} of another class '
            f'(classes {classes}): contradicting labels', files[i].split))
      continue
    best = max(_SPLIT_PRIORITY.index(files[i].split) for i in members)
    kept = [i for i in members if _SPLIT_PRIORITY.index(files[i].split) == best]
    for i in members:
      if i not in kept:
        duplicates.append({'file': files[i].path,
                           'duplicate_of': files[kept[0]].path,
                           'split': files[i].split})
    kept_groups.append(kept)

  split_of_group = [files[group[0]].split for group in kept_groups]
  present = set(split_of_group)
  carve = {'test': test_fraction if 'test' not in present else 0.0,
           'validation': (validation_fraction if 'validation' not in present
                          else 0.0)}
  rng = np.random.default_rng(split_seed)
  for class_name in class_names:
    pool = sorted((g for g, split in enumerate(split_of_group)
                   if split == 'train' and
                   files[kept_groups[g][0]].class_name == class_name),
                  key=lambda g: files[kept_groups[g][0]].path)
    order = [pool[i] for i in rng.permutation(len(pool))]
    num_test = round(carve['test'] * len(pool))
    num_validation = round(carve['validation'] * len(pool))
    for g in order[:num_test]:
      split_of_group[g] = 'test'
    for g in order[num_test:num_test + num_validation]:
      split_of_group[g] = 'validation'

  splits = {split: [] for split in _SPLIT_PRIORITY}
  for group, split in zip(kept_groups, split_of_group):
    splits[split].extend(dataclasses.replace(files[i], split=split)
                         for i in group)
  for items in splits.values():
    items.sort(key=lambda item: item.path)
  return FolderPlan(splits, quarantined, duplicates)


def _digest(path: str) -> str | None:
  """SHA-1 of a file's bytes; None for empty or unreadable files."""
  try:
    with open(path, 'rb') as file:
      data = file.read()
  except OSError:
    return None
  return hashlib.sha1(data).hexdigest() if data else None
