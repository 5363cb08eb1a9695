"""The β study on the tiny config: every setting trains, is scored and tabulated."""

import json

import pytest

from configs import default
from pumamednet_jax import study
from e2e_support import shrink


def test_study_tabulates_each_setting(phantom_data_dir, tmp_path):
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir),
                  num_grid_images=0)
  settings = {name: study.SETTINGS[name] for name in ('beta4', 'tc')}
  rows = study.run_study(config, str(tmp_path), settings=settings,
                         num_samples=300, factor_vae_votes=8)
  assert [row['setting'] for row in rows] == ['beta4', 'tc']
  saved = json.loads((tmp_path / 'study.json').read_text())
  assert saved == json.loads(json.dumps(rows))
  for row in rows:
    for key, _ in study.COLUMNS[2:]:
      assert 0.0 <= row[key] <= 1.0, key
  table = (tmp_path / 'study.md').read_text().splitlines()
  assert len(table) == 2 + len(settings)
  assert 'loss.tc_weight=5.0' in table[-1]
  assert (tmp_path / 'tc' / 'disentangle' / 'mi.png').exists()
  # Run again: trained and scored runs are reused, the table is the same.
  assert study.run_study(config, str(tmp_path), settings=settings,
                         num_samples=300, factor_vae_votes=8) == rows


def test_every_setting_names_existing_config_keys():
  config = default.get_config()
  for overrides in study.SETTINGS.values():
    study.with_overrides(config, overrides)
  with pytest.raises(KeyError, match='config.loss.gamma does not exist'):
    study.with_overrides(config, {'loss.gamma': 1.0})
