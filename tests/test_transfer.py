"""Transfer learning on the tiny phantom: init_from, freezing, ResNet-18, compare."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util
from safetensors import numpy as safetensors_np

from configs import default
from input_pipeline import heads as heads_lib
from pumamednet_jax import checkpoints
from pumamednet_jax import compare
from pumamednet_jax import models
from pumamednet_jax import resnet
from pumamednet_jax import train
from pumamednet_jax import transfer
from e2e_support import shrink

TORCHVISION_SHAPES = (pathlib.Path(__file__).parent / 'data' / 'torchvision' /
                      'resnet18_state_dict_shapes.json')
COVID3 = dict(phantom__variant='covid3', head_features=('label',),
              num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=1,
              num_grid_images=0)


def flat(params):
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope='module')
def source_run(phantom_data_dir, tmp_path_factory) -> pathlib.Path:
  """A tiny run on the phantom's ChestX-ray14 variant (5 heads)."""
  workdir = tmp_path_factory.mktemp('source')
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir),
                  num_train_steps=2, eval_every_steps=2, num_grid_images=0)
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def covid3_runs(phantom_data_dir, source_run, tmp_path_factory):
  """Tiny covid3 runs: transferred with a frozen encoder and decoder (from a
  copy of the source, deleted after its first run), and ResNet-18."""
  root = tmp_path_factory.mktemp('covid3')
  source_copy = root / 'source_copy'
  shutil.copytree(source_run, source_copy)
  transferred = root / 'transferred'
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir),
                  init_from=str(source_copy), freeze='encoder_decoder', **COVID3)
  train.train_and_evaluate(config, str(transferred))
  shutil.rmtree(source_copy)
  resnet_run = root / 'resnet18'
  train.train_and_evaluate(
      shrink(default.get_config(), data_dir=str(phantom_data_dir),
             model__arch='resnet18', **COVID3), str(resnet_run))
  return {'transferred': transferred, 'resnet18': resnet_run,
          'config': config}


def test_init_from_restores_the_backbone_and_heads_of_the_same_name(
    source_run, tmp_path):
  source_config, source = checkpoints.load_params(str(source_run), 2)
  # Other heads, in another order: `label` is new, `sex` and `view` match.
  heads = (heads_lib.HeadSpec('label', heads_lib.MULTICLASS, ('a', 'b', 'c')),
           *[h for h in source_config.heads if h.name in ('sex', 'view')])
  model_config = models.ModelConfig(**{**source_config.__dict__, 'heads': heads})
  fresh = models.init_params(model_config, 7)
  config = shrink(default.get_config(), init_from=f'{source_run}:2')
  params = flat(transfer.initial_params(config, str(tmp_path), fresh,
                                        model_config))
  theirs, ours_fresh = flat(source), flat(fresh)
  for name, value in params.items():
    if name.startswith(('encoder/', 'decoder/', 'classifier/hidden/')):
      np.testing.assert_array_equal(value, theirs[name])  # bitwise
  slices = lambda config: {h.name: slice(sum(g.size for g in config.heads[:i]),
                                         sum(g.size for g in config.heads[:i + 1]))
                           for i, h in enumerate(config.heads)}
  ours, source_slices = slices(model_config), slices(source_config)
  for head in ('sex', 'view'):
    for leaf in ('kernel', 'bias'):
      np.testing.assert_array_equal(
          params[f'classifier/out/{leaf}'][..., ours[head]],
          theirs[f'classifier/out/{leaf}'][..., source_slices[head]])
  for leaf in ('kernel', 'bias'):
    np.testing.assert_array_equal(
        params[f'classifier/out/{leaf}'][..., ours['label']],
        ours_fresh[f'classifier/out/{leaf}'][..., ours['label']])
  report = json.loads((tmp_path / transfer.REPORT_FILE).read_text())
  assert report['step'] == 2 and report['fresh'] == ['classifier/out/label']
  assert {'classifier/out/sex', 'classifier/out/view',
          'encoder/convs/0/kernel'} <= set(report['restored'])


def test_init_from_a_model_of_another_shape_names_the_tensor(source_run,
                                                             tmp_path):
  config = shrink(default.get_config(), init_from=str(source_run),
                  model__channels=(6, 4, 8, 8, 8, 8))
  source_config, _ = checkpoints.load_params(str(source_run))
  model_config = models.ModelConfig(**{**source_config.__dict__,
                                       'channels': (6, 4, 8, 8, 8, 8)})
  # The decoder mirrors the first encoder width: its last hidden layer differs too.
  with pytest.raises(ValueError, match=r'decoder/deconvs/4/bias is \(4,\) in '
                     f'{source_run} but \\(6,\\) in this model'):
    transfer.initial_params(config, str(tmp_path),
                            models.init_params(model_config, 0), model_config)


@pytest.mark.parametrize('suffix, message', [
    ('', 'no checkpoints in'),
    (':5', 'no checkpoint for step 5'),
    (':x', 'WORKDIR or WORKDIR:STEP'),
])
def test_init_from_bad_input_is_a_one_line_error(source_run, tmp_path, suffix,
                                                 message):
  workdir = str(tmp_path / 'empty') if suffix == '' else str(source_run)
  config = shrink(default.get_config(), init_from=workdir + suffix)
  with pytest.raises((FileNotFoundError, ValueError), match=message) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)


def test_frozen_parts_stay_bitwise_and_the_run_resumes_on_its_own(
    covid3_runs, source_run):
  workdir = covid3_runs['transferred']
  _, source = checkpoints.load_params(str(source_run))
  _, first = checkpoints.load_params(str(workdir), 1)
  model_config, last = checkpoints.load_params(str(workdir), 2)
  theirs, after_one, after_two = flat(source), flat(first), flat(last)
  for name, value in after_two.items():
    if name.startswith(('encoder/', 'decoder/')):
      np.testing.assert_array_equal(value, theirs[name])
  assert not np.array_equal(after_one['classifier/out/kernel'],
                            after_two['classifier/out/kernel'])
  assert [h.name for h in model_config.heads] == ['label']
  # Resumes from its own checkpoint (the source is gone), Adam state and all.
  config = covid3_runs['config']
  config.num_train_steps = 3
  train.train_and_evaluate(config, str(workdir))
  _, resumed = checkpoints.load_params(str(workdir), 3)
  np.testing.assert_array_equal(flat(resumed)['encoder/to_mu/kernel'],
                                theirs['encoder/to_mu/kernel'])


def test_resnet18_has_torchvisions_parameters_and_layout():
  imagenet = (heads_lib.HeadSpec('label', heads_lib.MULTICLASS,
                                 tuple(map(str, range(1000)))),)
  model = nnx.eval_shape(lambda: resnet.ResNet18(imagenet, in_channels=3,
                                                 rngs=nnx.Rngs(0)))
  assert models.count_params_tree(nnx.state(model, nnx.Param)) == 11_689_512
  real = json.loads(TORCHVISION_SHAPES.read_text())
  layout = resnet.torchvision_layout(3, 1000)
  assert list(layout) == list(real)
  assert {k: list(v) for k, v in layout.items()} == real


def test_resnet18_starts_from_a_torchvision_state_dict(tmp_path):
  rng = np.random.default_rng(0)
  state_dict = {name: rng.normal(size=shape).astype(np.float32)
                for name, shape in resnet.torchvision_layout(3, 1000).items()}
  path = tmp_path / 'resnet18.safetensors'
  safetensors_np.save_file(state_dict, str(path))
  heads = (heads_lib.HeadSpec('label', heads_lib.MULTICLASS, ('a', 'b', 'c')),)
  model_config = models.ModelConfig(
      image_size=64, channels=(4, 4, 8, 8, 8, 8), latent_dim=8,
      classifier_hidden=8, heads=heads, arch=models.RESNET18)
  fresh = models.init_params(model_config, 0)
  config = shrink(default.get_config(), model__arch='resnet18',
                  model__torchvision_weights=str(path))
  params = flat(transfer.initial_params(config, str(tmp_path), fresh,
                                        model_config))
  np.testing.assert_array_equal(params['encoder/conv1/kernel'],
                                state_dict['conv1.weight'].sum(1, keepdims=True)
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      params['encoder/layer2/0/downsample/0/kernel'],
      state_dict['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  for torch_leaf, leaf in (('weight', 'scale'), ('bias', 'bias'),
                           ('running_mean', 'mean'), ('running_var', 'var')):
    np.testing.assert_array_equal(params[f'encoder/layer4/1/bn2/{leaf}'],
                                  state_dict[f'layer4.1.bn2.{torch_leaf}'])
  np.testing.assert_array_equal(params['classifier/out/kernel'],
                                flat(fresh)['classifier/out/kernel'])
  report = json.loads((tmp_path / transfer.REPORT_FILE).read_text())
  assert report['fresh'] == ['classifier/out/bias', 'classifier/out/kernel']
  # 20 convs and 20 batch norms × 4 (num_batches_tracked and fc left out).
  assert len(report['restored']) == 100


def test_resnet18_trains_its_batch_norm_statistics(covid3_runs):
  model_config, params = checkpoints.load_params(str(covid3_runs['resnet18']))
  assert model_config.arch == models.RESNET18
  stats = flat(params)
  assert np.any(stats['encoder/bn1/mean'] != 0)  # fresh: zeros
  assert np.any(stats['encoder/bn1/var'] != 1)


def test_resnet18_run_report_has_scores_but_no_defects_table(covid3_runs):
  out = covid3_runs['resnet18'] / 'report' / 'test'
  report = json.loads((out / 'report.json').read_text())
  assert report['heads'] and 0 <= report['mean_auc']['value'] <= 1
  assert 'no decoder' in report['defects']['skipped']
  assert not report['defects']['conditions']
  assert not (out / 'defects.png').exists()
  assert 'no decoder' in (out / 'report.md').read_text()
  transferred = covid3_runs['transferred'] / 'report' / 'test'
  assert json.loads((transferred / 'report.json').read_text())['defects'][
      'conditions']
  assert (transferred / 'defects.png').exists()


def test_compare_writes_table_2(covid3_runs, tmp_path):
  runs = [str(covid3_runs['transferred']), str(covid3_runs['resnet18'])]
  result = compare.write(runs, str(tmp_path), num_resamples=50)
  saved = json.loads((tmp_path / 'compare.json').read_text())
  assert list(saved) == runs
  transferred, resnet_entry = saved[runs[0]], saved[runs[1]]
  assert resnet_entry['params'] == models.num_params(
      checkpoints.load_params(runs[1])[0])
  assert transferred['params'] < resnet_entry['params']
  for entry in saved.values():
    assert sum(r['support'] for r in entry['per_class'].values()) == 32
    assert list(entry['per_class']) == ['COVID-19', 'Pneumonia', 'Normal']
    auc = entry['macro_auc']
    assert auc['ci_low'] <= auc['value'] <= auc['ci_high']
    assert entry['train_images_per_s'] > 0
  difference = resnet_entry['macro_auc_minus_first']
  assert difference['value'] == pytest.approx(
      resnet_entry['macro_auc']['value'] - transferred['macro_auc']['value'])
  assert 0 <= difference['p_value'] <= 1
  assert result == saved
  table = (tmp_path / 'compare.md').read_text()
  assert '| Precision | Recall | F1 | Support |' in table
  assert runs[1] in table


@pytest.mark.parametrize('size, stride, cin', [(7, 2, 1), (3, 1, 8), (3, 2, 8),
                                               (1, 2, 8)])
def test_resnet18_patches_form_computes_the_flax_conv(size, stride, cin):
  layer = resnet._conv(cin, 16, size, stride, np.float32, nnx.Rngs(0))  # pylint: disable=protected-access
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, cin))
  np.testing.assert_allclose(resnet.conv_patches(layer, x), layer(x),
                             rtol=1e-4, atol=1e-4)
