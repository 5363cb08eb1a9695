"""Tests of the chestxray14 TFDS builder on a tiny tree of real files."""

import csv
import gzip
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import chestxray14
from input_pipeline import decode
from input_pipeline import labels
from input_pipeline import quarantine

_IMAGE_SIZE = 64


def _prepare(manual_dir, data_dir, **options):
  builder = chestxray14.builder(data_dir=data_dir, image_size=_IMAGE_SIZE,
                                num_workers=0, **options)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


@pytest.fixture(scope='module')
def prepared(chestxray14_manual_dir, tmp_path_factory):
  """(builder, {split: [examples as NumPy]}) of the tiny tree at 64 px."""
  builder = _prepare(chestxray14_manual_dir,
                     tmp_path_factory.mktemp('chestxray14_data'),
                     max_quarantine_fraction=0.05)
  examples = {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
              for split in ('train', 'validation', 'test')}
  return builder, examples


@pytest.fixture(scope='module')
def csv_rows(chestxray14_manual_dir):
  with open(chestxray14_manual_dir / 'Data_Entry_2017_v2020.csv',
            newline='') as file:
    return {row[0]: row for row in list(csv.reader(file))[1:]}


def test_features_match_the_data_contract(prepared):
  builder, _ = prepared
  features = builder.info.features
  assert features['image'].shape == (_IMAGE_SIZE, _IMAGE_SIZE, 1)
  assert features['image'].np_dtype == np.uint8
  assert features['labels'].shape == (15,)
  assert features['view'].names == list(labels.VIEWS)
  assert features['sex'].names == list(labels.SEXES)
  assert builder.builder_config.name == '64_val0.1_seed0'


def test_splits_and_quarantine(prepared, csv_rows, chestxray14_broken):
  builder, examples = prepared
  test_patients = {name for name, row in csv_rows.items()
                   if int(row[3]) % 4 == 0}
  num_broken_test = sum(name in test_patients for name in chestxray14_broken)
  assert len(examples['test']) == len(test_patients) - num_broken_test
  total = sum(len(split) for split in examples.values())
  assert total == len(csv_rows) - len(chestxray14_broken)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      s: len(e) for s, e in examples.items()}
  names = {ex['image_index'].decode() for split in examples.values()
           for ex in split}
  assert not names & set(chestxray14_broken)
  # Each broken file is named once, with its reason.
  quarantined = builder.info.metadata['quarantined']
  by_name = {record['file'].split('/')[-1]: record for record in quarantined}
  assert len(quarantined) == len(by_name) == len(chestxray14_broken)
  for name, problem in chestxray14_broken.items():
    assert problem in by_name[name]['reason']
  assert by_name['00000008_001.png']['split'] == 'test'


def test_splits_are_patient_disjoint(prepared, csv_rows, chestxray14_broken):
  _, examples = prepared
  patients = {split: {int(ex['patient_id']) for ex in split_examples}
              for split, split_examples in examples.items()}
  assert patients['validation'] and patients['train'] and patients['test']
  assert not patients['train'] & patients['validation']
  assert not patients['train'] & patients['test']
  assert not patients['validation'] & patients['test']
  assert all(patient % 4 == 0 for patient in patients['test'])
  # All images of a train_val patient are in its split.
  for split in ('train', 'validation'):
    in_split = {ex['image_index'].decode() for ex in examples[split]}
    expected = {name for name, row in csv_rows.items()
                if int(row[3]) in patients[split]}
    assert in_split == expected - set(chestxray14_broken)
  # About validation_fraction of the train_val patients.
  num_train_val = len(patients['train'] | patients['validation'])
  assert len(patients['validation']) == round(0.1 * num_train_val)
  assert dict(prepared[0].info.metadata['patients']) == {
      split: len(ids) for split, ids in patients.items()}


def test_labels_and_metadata_follow_the_csv(prepared, csv_rows):
  builder, examples = prepared
  for split_examples in examples.values():
    for ex in split_examples:
      row = csv_rows[ex['image_index'].decode()]
      findings = set(row[1].split('|')) - {labels.NO_FINDING}
      expected = [int(name in findings) for name in labels.FINDINGS]
      expected.append(int(not findings))
      np.testing.assert_array_equal(ex['labels'], expected)
      assert labels.VIEWS[ex['view']] == row[6]
      assert labels.SEXES[ex['sex']] == row[5]
      assert ex['age'] == float(row[4]) and ex['age_mask'] == 1
      assert ex['patient_id'] == int(row[3])
      assert ex['follow_up'] == int(row[2])
      assert ex['id'] == ex['image_index']
  train_ages = [float(ex['age']) for ex in examples['train']]
  assert builder.info.metadata['age_median'] == pytest.approx(
      np.median(train_ages))


def test_real_image_row_one(prepared, real_data_dir):
  _, examples = prepared
  first = [ex for ex in examples['train'] + examples['validation']
           if ex['image_index'] == b'00000001_000.png']
  assert len(first) == 1
  ex = first[0]
  # Row 1: Cardiomegaly, patient 1, 57-year-old man, PA.
  assert [labels.LABELS[i] for i in np.flatnonzero(ex['labels'])] == [
      'Cardiomegaly']
  assert (labels.VIEWS[ex['view']], labels.SEXES[ex['sex']]) == ('PA', 'M')
  assert (ex['age'], ex['patient_id'], ex['follow_up']) == (57, 1, 0)
  expected = decode.load_grayscale(
      real_data_dir / 'real_cxr' / '00000001_000.png', _IMAGE_SIZE)
  np.testing.assert_array_equal(ex['image'][..., 0], expected)


def test_label_counts_metadata(prepared):
  builder, examples = prepared
  for split, counts in builder.info.metadata['label_counts'].items():
    totals = np.sum([ex['labels'] for ex in examples[split]], axis=0)
    assert counts == dict(zip(labels.LABELS, totals.tolist()))


def test_reloads_from_disk(prepared):
  builder, examples = prepared
  reloaded = chestxray14.builder(data_dir=builder.data_dir_root,
                                 image_size=_IMAGE_SIZE)
  assert reloaded.info.splits['test'].num_examples == len(examples['test'])
  assert reloaded.info.metadata['age_median'] == builder.info.metadata[
      'age_median']


def test_too_many_broken_files_fails_clearly(chestxray14_manual_dir, tmp_path):
  with pytest.raises(quarantine.TooManyBrokenFilesError) as error:
    _prepare(chestxray14_manual_dir, tmp_path, max_quarantine_fraction=0.001)
  message = str(error.value)
  assert 'chestxray14' in message and 'max_quarantine_fraction' in message
  assert 'missing image' in message
  assert len(error.value.records) >= 1


def test_missing_metadata_files_are_named(chestxray14_manual_dir, tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(chestxray14_manual_dir, manual)
  (manual / 'test_list.txt').unlink()
  with pytest.raises(FileNotFoundError, match='test_list.txt'):
    _prepare(manual, tmp_path / 'data')
  (manual / 'Data_Entry_2017_v2020.csv').unlink()
  with pytest.raises(FileNotFoundError, match=r'Data_Entry_2017\*\.csv'):
    _prepare(manual, tmp_path / 'data')


def test_full_real_csv_known_counts(real_data_dir):
  rows, invalid = chestxray14.read_data_entry(
      real_data_dir / 'chestxray14' / 'Data_Entry_2017_v2020.csv.gz')
  assert not invalid and len(rows) == 112_120
  assert chestxray14.label_counts(rows) == {
      'No Finding': 60_361, 'Infiltration': 19_894, 'Effusion': 13_317,
      'Atelectasis': 11_559, 'Nodule': 6_331, 'Mass': 5_782,
      'Pneumothorax': 5_302, 'Consolidation': 4_667,
      'Pleural_Thickening': 3_385, 'Cardiomegaly': 2_776, 'Emphysema': 2_516,
      'Edema': 2_303, 'Fibrosis': 1_686, 'Pneumonia': 1_431, 'Hernia': 227}
  assert len({row.patient_id for row in rows}) == 30_805
  assert chestxray14.count_by(rows, 'view') == {'PA': 67_310, 'AP': 44_810}


def test_2017_csv_format(tmp_path, real_data_dir):
  # The 2017 file: a trailing comma (12 fields), impossible ages, and some
  # copies spell ages with units.
  with gzip.open(real_data_dir / 'chestxray14' /
                 'Data_Entry_2017_v2020.csv.gz', 'rt') as file:
    lines = file.read().splitlines()[:4]
  rows = [line.split(',') for line in lines]
  rows[1][4], rows[2][4], rows[3][4] = '414', '058Y', '006M'
  path = tmp_path / 'Data_Entry_2017.csv'
  path.write_text(''.join(','.join(row) + ',\n' for row in rows))
  parsed, invalid = chestxray14.read_data_entry(path)
  assert not invalid
  assert [row.age for row in parsed] == [None, 58.0, 0.5]
  assert parsed[0].labels[labels.LABELS.index('Cardiomegaly')] == 1
  assert (parsed[1].view, parsed[1].sex, parsed[1].follow_up) == ('PA', 'M', 1)


def test_csv_problems(tmp_path):
  header = ('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,'
            'Patient Gender,View Position,OriginalImage[Width,Height],'
            'OriginalImagePixelSpacing[x,y]\n')
  path = tmp_path / 'Data_Entry_2017.csv'
  path.write_text(header.replace('Patient ID,Patient Age',
                                 'Patient Age,Patient ID'))
  with pytest.raises(ValueError, match='column 4'):
    chestxray14.read_data_entry(path)
  path.write_text(header + 'a.png,Effusion,0,1,30,M,LL,1,1,0.1,0.1\n'
                  'b.png,Flu,0,2,30,F,PA,1,1,0.1,0.1\n'
                  'c.png,Mass|Nodule,3,3,30,F,AP,1,1,0.1,0.1\n')
  rows, invalid = chestxray14.read_data_entry(path)
  assert [row.image_index for row in rows] == ['c.png']
  assert "unknown View Position 'LL'" in invalid['a.png']
  assert "unknown finding 'Flu'" in invalid['b.png']


def test_plan_ignores_missing_files_when_splitting():
  rows = [chestxray14.Row(f'{p:08d}_{i:03d}.png', (0,) * 14 + (1,), i, p, 40.0,
                          'M', 'PA') for p in range(1, 41) for i in range(2)]
  names = [row.image_index for row in rows]
  lists = {'train_val': names[:60], 'test': names[60:]}
  everything = {name: f'/x/{name}' for name in names}
  plan = chestxray14.plan_splits(rows, {}, lists, everything, csv_name='x.csv',
                                 validation_fraction=0.25, split_seed=3)
  missing_one = dict(everything)
  del missing_one[plan.splits['validation'][0][0].image_index]
  plan_missing = chestxray14.plan_splits(
      rows, {}, lists, missing_one, csv_name='x.csv',
      validation_fraction=0.25, split_seed=3)
  validation = {row.patient_id for row, _ in plan.splits['validation']}
  assert len(validation) == round(0.25 * 30)
  assert {row.patient_id for row, _ in plan_missing.splits['validation']} == (
      validation)
  assert [r.split for r in plan_missing.quarantined] == ['validation']
  # A patient in both official lists is refused.
  with pytest.raises(ValueError, match='patients have images in both'):
    chestxray14.plan_splits(
        rows, {}, {'train_val': names[:61], 'test': names[61:]}, everything,
        csv_name='x.csv', validation_fraction=0.25, split_seed=3)
