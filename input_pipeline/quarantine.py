"""Bookkeeping of the files a data set leaves out, and its broken-file limit.

Every file that cannot be used (missing, empty, truncated, not an image, a CSV
row with invalid metadata, ...) is recorded with its reason, left out of the
prepared data, and listed in the preparation report. It is never replaced by
a black image. When more than `max_fraction` of a data set's files are left
out, preparation fails: such a fraction means a wrong directory or a damaged
download, not a few bad files.
"""

import collections
import csv
import dataclasses
import os

# Flag of `python -m input_pipeline.prepare` (and builder argument) that sets
# the limit; named in the error message.
MAX_FRACTION_FLAG = 'max_quarantine_fraction'
# Default limit: 1% of a data set's files.
DEFAULT_MAX_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class QuarantinedFile:
  """A file left out of a data set: where it is, why, and which split."""
  file: str
  reason: str
  split: str = ''


class TooManyBrokenFilesError(RuntimeError):
  """More than the allowed fraction of a data set's files are unusable."""

  def __init__(self, message: str, records: list[QuarantinedFile]):
    super().__init__(message)
    self.records = records


class Quarantine:
  """Collects the files a data set leaves out and enforces the limit."""

  def __init__(self, dataset: str, max_fraction: float = DEFAULT_MAX_FRACTION):
    if not 0.0 <= max_fraction <= 1.0:
      raise ValueError(f'{MAX_FRACTION_FLAG} must be in [0, 1], got '
                       f'{max_fraction}')
    self.dataset = dataset
    self.max_fraction = max_fraction
    self.records: list[QuarantinedFile] = []

  def add(self, file, reason: str, split: str = '') -> None:
    self.records.append(QuarantinedFile(os.fspath(file), reason, split))

  def __len__(self) -> int:
    return len(self.records)

  def check(self, num_files: int) -> None:
    """Raises TooManyBrokenFilesError if too many of `num_files` are out.

    Args:
      num_files: the files considered so far, good and quarantined.
    """
    num_out = len(self.records)
    if num_files <= 0 or num_out / num_files <= self.max_fraction:
      return
    reasons = collections.Counter(_reason_kind(r.reason) for r in self.records)
    examples = '\n'.join(f'  {r.file}: {r.reason}' for r in self.records[:5])
    raise TooManyBrokenFilesError(
        f'{self.dataset}: {num_out} of {num_files} files '
        f'({num_out / num_files:.2%}) are missing or broken, more than '
        f'{MAX_FRACTION_FLAG}={self.max_fraction:g} '
        f'({self.max_fraction:.2%}) allows. Reasons: '
        f'{dict(reasons.most_common())}. First ones:\n{examples}\n'
        'Check the manual_dir layout and the download (the full list is in '
        f'the quarantine report), or raise --{MAX_FRACTION_FLAG}.',
        list(self.records))

  def as_json(self) -> list[dict[str, str]]:
    return [dataclasses.asdict(record) for record in self.records]


def write_csv(records: list[QuarantinedFile], path) -> None:
  """Writes the quarantine report: one row per file (file, reason, split)."""
  with open(path, 'w', newline='') as report:
    writer = csv.writer(report)
    writer.writerow(('file', 'reason', 'split'))
    for record in records:
      writer.writerow((record.file, record.reason, record.split))


def _reason_kind(reason: str) -> str:
  """The reason up to its details (for the summary of an error)."""
  return reason.split(' (')[0].split(':')[0]
