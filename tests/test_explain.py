"""The latent-space library, the judges and the explain command."""

import base64
import html.parser
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from input_pipeline import heads as heads_lib
from input_pipeline import phantom
from input_pipeline import pipeline
from pumamednet_jax import checkpoints
from pumamednet_jax import explain
from pumamednet_jax import faithfulness
from pumamednet_jax import judge as judge_lib
from pumamednet_jax import latent as latent_lib
from pumamednet_jax import models
from pumamednet_jax import platform as platform_lib
from e2e_support import REPO_ROOT, shrink

HEADS = heads_lib.chestxray14_heads()
# The phantom of these tests: enough test images for the judges' groups.
DATA_OVERRIDES = {'phantom__num_train': 8, 'phantom__num_validation': 48,
                  'phantom__num_test': 160}


def tiny_config(**overrides):
  return shrink(default.get_config(), **DATA_OVERRIDES, **overrides)


@pytest.fixture(scope='module')
def model_parts():
  config = tiny_config()
  model_config = models.model_config(config, HEADS, 'xla')
  params = jax.device_get(models.init_params(model_config, 3))
  return model_config, params


@pytest.fixture(scope='module')
def latent_model(model_parts):
  policy = platform_lib.for_devices(jax.local_devices()[:1])
  return latent_lib.LatentModel(*model_parts, policy, batch_size=16)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, model_parts):
  workdir = tmp_path_factory.mktemp('run')
  checkpoints.save_params(str(workdir), *model_parts, step=4)
  return workdir


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  pipeline.prepare(pipeline.get_builder(tiny_config(data_dir=str(data_dir))))
  return data_dir


# --- The latent library -------------------------------------------------------


def test_batched_functions_equal_the_model_on_any_number_of_images(
    latent_model, model_parts):
  images, _, _ = phantom.render_examples(0, 'test', range(21), 64)
  z = latent_model.encode(images)  # two batches of 16, the second padded
  model = models.bind(*model_parts)
  mu, _ = model.encode(images[..., None].astype(np.float32) / 255.0)
  np.testing.assert_allclose(z, mu, rtol=1e-4, atol=1e-5)
  outputs = model.classify(mu)
  sex = latent_lib.outputs_of(HEADS).index(
      latent_lib.Output('sex', HEADS[2], 0))
  np.testing.assert_allclose(latent_model.scores(z)[:, sex],
                             jax.nn.sigmoid(outputs['sex']), rtol=1e-4,
                             atol=1e-6)
  decoded = latent_model.decode(z)
  assert decoded.shape == (21, 64, 64)
  np.testing.assert_allclose(latent_model.frame_scores(decoded),
                             latent_model.scores(latent_model.encode(
                                 np.rint(decoded * 255).astype(np.uint8))),
                             atol=0.05)


def test_direction_interpolation_and_traversal():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(40, 6)).astype(np.float32)
  member = np.arange(40) < 10
  direction = latent_lib.group_direction(z, member)
  np.testing.assert_allclose(direction, z[:10].mean(0) - z[10:].mean(0),
                             rtol=1e-6)
  moved = latent_lib.interpolations(z, direction, (-2.0, 0.0, 1.0))
  np.testing.assert_allclose(moved[:, 1], z)
  np.testing.assert_allclose(moved[:, 2] - moved[:, 1],
                             np.broadcast_to(direction, z.shape), rtol=1e-5)
  mean, std = z.mean(0), z.std(0)
  steps = latent_lib.traversals(z, 3, mean, std, (-3.0, 0.0, 3.0))
  np.testing.assert_allclose(steps[:, :, 3],
                             np.broadcast_to(mean[3] + np.array([-3, 0, 3])
                                             * std[3], (40, 3)), rtol=1e-5)
  np.testing.assert_array_equal(np.delete(steps, 3, axis=2),
                                np.repeat(np.delete(z, 3, axis=1)[:, None], 3,
                                          axis=1))
  with pytest.raises(ValueError, match='both groups'):
    latent_lib.group_direction(z, np.ones(40, bool))


@pytest.mark.parametrize('method', sorted(latent_lib.RELEVANCE_METHODS))
def test_relevance_finds_the_only_latents_the_classifier_reads(
    model_parts, method):
  """A classifier that reads latents 2 and 5 only: both methods give every
  other latent zero relevance, and 2 and 5 more than zero for every head."""
  model_config, params = model_parts
  params = jax.tree.map(np.array, params)
  kernel = params['classifier']['hidden']['kernel']
  read = [2, 5]
  kernel[np.setdiff1d(np.arange(kernel.shape[0]), read)] = 0.0
  policy = platform_lib.for_devices(jax.local_devices()[:1])
  model = latent_lib.LatentModel(model_config, params, policy, batch_size=16)
  z = np.random.default_rng(1).normal(size=(48, model_config.latent_dim))
  relevance = latent_lib.RELEVANCE_METHODS[method](model, z.astype(np.float32))
  assert relevance.shape == (len(model.outputs), model_config.latent_dim)
  others = np.setdiff1d(np.arange(model_config.latent_dim), read)
  # Zero up to rounding (a batched matmul sums in another order).
  np.testing.assert_allclose(relevance[:, others], 0.0, atol=1e-6)
  assert (relevance[:, read].sum(axis=1) > 1e-4).all()
  ablated = model.logits(latent_lib.ablate(z, read, z.mean(0)))
  assert np.ptp(ablated, axis=0).max() < 1e-5  # nothing left to read


def test_judges_read_sex_view_and_heart_size_from_phantom_images():
  images, _, factors = phantom.render_examples(0, 'test', range(480), 64)
  examples = judge_lib.Examples(images, {
      'labels': np.stack([f['labels'] for f in factors]),
      'sex': np.array([f['sex'] for f in factors]),
      'view': np.array([f['view'] for f in factors]),
      'age': np.array([f['age'] for f in factors], np.float32),
      'cardiothoracic_ratio': np.array([f['cardiothoracic_ratio']
                                        for f in factors], np.float32),
  }, age_median=50.0)
  judges = judge_lib.fit_judges(images / 255.0, examples, ('sex', 'view'))
  assert judges.heldout['sex']['heldout_auc'] > 0.9
  assert judges.heldout['view']['heldout_auc'] > 0.9
  assert judges.heldout['heart_size']['heldout_r2'] > 0.3
  shuffled = judge_lib.Examples(images, {
      'sex': np.random.default_rng(0).permutation(examples.features['sex'])},
                                None)
  chance = judge_lib.fit_judges(images / 255.0, shuffled, ('sex',))
  assert chance.heldout['sex']['heldout_auc'] < 0.75
  with pytest.raises(ValueError, match='valid: health, age, sex, view'):
    judge_lib.check_attributes(['height'], examples)


def test_specificity_and_rho_on_known_curves():
  steps = np.linspace(-2, 2, 5)
  rising = np.tile(steps, (3, 1))
  assert faithfulness.median_rho(steps, rising) == pytest.approx(1.0)
  assert faithfulness.median_rho(steps, -rising) == pytest.approx(-1.0)
  assert faithfulness.median_rho(steps, np.ones((3, 5))) == 0.0
  judged = {'a': rising, 'b': 0.2 * rising, 'c': -0.5 * rising}
  worst, each = faithfulness.specificity(judged, 'a', ['b', 'c'])
  assert worst == pytest.approx(0.5)
  assert each == pytest.approx({'b': 0.2, 'c': 0.5})


# --- The command --------------------------------------------------------------


class _PageParser(html.parser.HTMLParser):
  """Collects the page's elements by id, external references and the data."""

  def __init__(self):
    super().__init__()
    self.ids, self.external, self.options, self.data = {}, [], 0, None
    self._in_data = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if 'id' in attrs:
      self.ids[attrs['id']] = (tag, attrs)
    for key in ('src', 'href'):
      if attrs.get(key) and not attrs[key].startswith('data:'):
        self.external.append(attrs[key])
    self._in_data = attrs.get('id') == 'data'

  def handle_endtag(self, tag):
    self._in_data = False

  def handle_data(self, data):
    if self._in_data:
      self.data = (self.data or '') + data


def test_explain_writes_figures_faithfulness_and_a_self_contained_page(
    workdir, data_dir, tmp_path):
  config = tiny_config(data_dir=str(data_dir))
  settings = explain.Settings(num_images=3, num_eval=12, num_judge=160,
                              heads=('Cardiomegaly', 'sex'))
  out = tmp_path / 'explain'
  result = explain.explain(str(workdir), str(out), config, settings)
  for name in ['relevance.json', 'relevance.png', 'explain.json',
               'index.html', 'traversal_Cardiomegaly.png',
               'traversal_sex.png'] + [
                   f'interpolation_{a}.png'
                   for a in explain.DEFAULT_ATTRIBUTES]:
    assert (out / name).stat().st_size > 0, name
  saved = json.loads((out / 'explain.json').read_text())
  assert set(saved['interpolation']) == set(explain.DEFAULT_ATTRIBUTES)
  for values in saved['interpolation'].values():
    assert {'rho_model', 'rho_judge', 'specificity'} <= set(values)
    assert -1.0 <= values['rho_model'] <= 1.0
  assert {'top5_auc_drop', 'random5_auc_drop', 'greedy5_auc_drop'} <= set(
      saved['ablation']['sex'])
  assert 'rho_judge_heart_size' in saved['traversal']['Cardiomegaly']
  assert set(saved['judge']) == {'health', 'age', 'sex', 'view',
                                 'Cardiomegaly', 'heart_size'}
  assert 'heldout_r2' in saved['judge']['heart_size']
  assert 'heldout_auc' in saved['judge']['sex']
  assert saved['interpolation'] == json.loads(json.dumps(
      result['interpolation']))

  relevance = json.loads((out / 'relevance.json').read_text())
  ranked = relevance['ranking']['gradient']['Cardiomegaly']
  assert sorted(r['latent'] for r in ranked) == list(range(8))
  scores = [r['score'] for r in ranked]
  assert scores == sorted(scores, reverse=True)

  parser = _PageParser()
  parser.feed((out / 'index.html').read_text())
  assert parser.external == []
  for element in ('image', 'edit', 'slider', 'frame', 'scores'):
    assert element in parser.ids
  assert parser.ids['slider'][1]['type'] == 'range'
  data = json.loads(parser.data)
  assert len(data['images']) == 3
  kinds = [e['kind'] for e in data['edits']]
  assert kinds.count('attribute') == len(explain.DEFAULT_ATTRIBUTES)
  assert kinds.count('latent') >= explain.TOP_LATENTS
  edit = data['edits'][0]
  strip = Image.open(io.BytesIO(base64.b64decode(edit['strips'][2])))
  assert strip.size == (64 * len(edit['steps']), 64)
  assert np.asarray(edit['scores']).shape == (3, len(edit['steps']),
                                              len(data['heads']))


def test_unknown_names_list_the_valid_ones(workdir, data_dir, tmp_path):
  config = tiny_config(data_dir=str(data_dir))
  with pytest.raises(ValueError, match=r"'height'.*valid: health, age, sex"):
    explain.explain(str(workdir), str(tmp_path), config,
                    explain.Settings(attributes=('health', 'height')))
  with pytest.raises(ValueError,
                     match=r"'Heart'.*valid: Atelectasis, .*age_above_median"):
    explain.explain(str(workdir), str(tmp_path), config,
                    explain.Settings(heads=('Heart',)))


def test_command_line_says_when_the_workdir_has_no_checkpoint(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  for workdir in (empty, tmp_path / 'missing'):
    completed = subprocess.run(
        [sys.executable, '-m', 'pumamednet_jax.explain',
         f'--workdir={workdir}', f'--out={tmp_path / "out"}'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert completed.returncode == 1, completed.stderr
    assert 'explain: no checkpoint in' in completed.stderr
    assert str(workdir) in completed.stderr
