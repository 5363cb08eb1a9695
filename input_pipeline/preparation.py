"""Prepares a TFDS data set with one preparation at a time, none left half-done.

TFDS writes a data set version into `<config dir>/incomplete.XXXXXX_<version>/`
and renames it to `<config dir>/<version>/` when done, so a preparation killed
part-way leaves its `incomplete.*` folder behind, and two preparations at once
race for the rename (`FileExistsError`).

`download_and_prepare` holds an exclusive lock on `<config dir>/.<version>.lock`
while it prepares. The lock is an `flock` of the file: the kernel releases it
when its process ends, however it ends (SIGKILL included), so no pid or age has
to be judged. A process that holds the lock is the only live preparation of
that version (through this module), so the `incomplete.*_<version>` folders it
finds were left by preparations that died: it removes them, and only them
(other versions and configs have other names or folders). A process that finds
the lock held waits for it, then reuses the prepared data.

`flock` works on local disks and on NFS (Linux maps it to NFS locks);
data directories on object stores (`gs://...`) are neither locked nor cleaned.
Preparations that do not go through this module (`tfds build`) take no lock.
"""

import contextlib
import fcntl
import os
import pathlib
import re
import shutil

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants


def _is_local(path) -> bool:
  return '://' not in os.fspath(path)


def lock_path(builder: tfds.core.DatasetBuilder) -> pathlib.Path:
  """The lock file of the builder's data set version."""
  return pathlib.Path(builder.data_dir).parent / f'.{builder.version}.lock'


def incomplete_dirs(builder: tfds.core.DatasetBuilder) -> list[pathlib.Path]:
  """The `incomplete.*` folders of the builder's data set version."""
  parent = pathlib.Path(builder.data_dir).parent
  if not parent.is_dir():
    return []
  # TFDS names them `incomplete.` + 6 random characters + `_` + version.
  pattern = re.compile(re.escape(constants.INCOMPLETE_PREFIX) +
                       r'[A-Z0-9]{6}_' + re.escape(str(builder.version)))
  return sorted(path for path in parent.iterdir()
                if path.is_dir() and pattern.fullmatch(path.name))


@contextlib.contextmanager
def _exclusive(path: pathlib.Path):
  """Holds an exclusive flock of `path` (the standard library's fcntl: a few
  lines, released by the kernel when the process dies)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as file:  # closing the file releases the lock
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('waiting for the preparation that holds %s', path)
      fcntl.flock(file, fcntl.LOCK_EX)
    yield


def download_and_prepare(builder: tfds.core.DatasetBuilder,
                         download_config=None) -> None:
  """`builder.download_and_prepare`, alone and after removing what killed
  preparations of the same version left; reuses data prepared meanwhile."""
  if not _is_local(builder.data_dir):
    builder.download_and_prepare(download_config=download_config)
    return
  with _exclusive(lock_path(builder)):
    for path in incomplete_dirs(builder):
      logging.warning('removing %s, left by a preparation that did not finish',
                      path)
      shutil.rmtree(path)
    builder.download_and_prepare(download_config=download_config)
    if not builder.info.splits:  # prepared by another process meanwhile
      builder.info.read_from_directory(builder.data_dir)
