"""Tests of the PyTorch port: torch_model, torch_convert and the two CLIs."""

import ast
import functools
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from configs import default
from input_pipeline import heads as heads_lib
from input_pipeline import labels
from pumamednet_jax import checkpoints
from pumamednet_jax import models
from pumamednet_jax import torch_convert
from pumamednet_jax import torch_model

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADS = (
    heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, labels.LABELS),
    heads_lib.HeadSpec('view', heads_lib.BINARY, labels.VIEWS),
    heads_lib.HeadSpec('sex', heads_lib.BINARY, labels.SEXES),
    heads_lib.HeadSpec('age_above_median', heads_lib.BINARY),
    heads_lib.HeadSpec('age', heads_lib.REGRESSION, scale=100.0),
)
TOLERANCE = 1e-5
NUM_INPUTS = 16


def _model_config(image_size: int, **model_overrides) -> models.ModelConfig:
  """The default config's model at `image_size` (64: default, 256: paper)."""
  config = default.get_config()
  config.image_size = image_size
  config.model.update(model_overrides)
  return models.model_config(config, HEADS, 'fast')


def _random_params(model_config: models.ModelConfig, seed: int = 0) -> dict:
  """Random He-scaled weights and non-zero biases (numpy, Flax layout).

  NNX's own initializers compile slowly on CPU, and their zero biases would
  not test the bias layouts.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(key, 'key', key)) for key in path]
    if names[-1] == 'bias':
      return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    if len(leaf.shape) == 4:  # (4, 4, in, out); a stride-2 ConvTranspose
      # output sees 2×2 of the 16 taps.
      fan_in = leaf.shape[2] * (4 if 'deconvs' in names else 16)
    else:
      fan_in = leaf.shape[0]
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, models.abstract_params(model_config))


def _fixed_inputs(image_size: int, real_png: pathlib.Path) -> np.ndarray:
  """16 fixed (S, S, 1) images in [0, 1], the real chest X-ray first."""
  real = np.asarray(
      Image.open(real_png).convert('L').resize((image_size, image_size),
                                               Image.BILINEAR),
      np.float32) / 255.0
  rows, cols = np.mgrid[0:image_size, 0:image_size] / (image_size - 1)
  radius = np.hypot(rows - 0.4, cols - 0.6)
  rng = np.random.default_rng(1)
  images = [
      real,
      real[:, ::-1],
      real[::-1, :],
      1.0 - real,
      real.T,
      np.clip(real + rng.normal(0.0, 0.1, real.shape), 0.0, 1.0),
      np.zeros_like(real),
      np.ones_like(real),
      cols,
      rows,
      (np.floor(rows * 8) + np.floor(cols * 8)) % 2,
      (radius < 0.3).astype(np.float32),
      0.5 + 0.5 * np.sin(12 * rows) * np.cos(5 * cols),
      *rng.uniform(0.0, 1.0, (3, image_size, image_size)),
  ]
  assert len(images) == NUM_INPUTS
  return np.stack(images)[..., None].astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _jax_outputs(model_config, params, images):
  model = models.bind(model_config, params)
  mu, logvar = model.encode(images)
  return {'mu': mu, 'logvar': logvar, 'reconstruction': model.decode(mu),
          **model.classify(mu)}


def _torch_outputs(model, images):
  with torch.no_grad():
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    mu, logvar = model.encode(nchw)
    reconstruction = model.decode(mu).numpy().transpose(0, 2, 3, 1)
    outputs = {'mu': mu.numpy(), 'logvar': logvar.numpy(),
               'reconstruction': reconstruction}
    outputs.update({name: value.numpy()
                    for name, value in model.classify(mu).items()})
  return outputs


def _load_torch(weights: pathlib.Path, state_dict=None):
  """What the README does: config JSON beside the weights, strict loading."""
  with open(torch_convert.config_path(str(weights))) as f:
    config = torch_model.ModelConfig.from_json(json.load(f))
  model = torch_model.PumaMedNet(config).eval()
  model.load_state_dict(state_dict or safetensors.torch.load_file(weights))
  return model


def _max_differences(expected, actual):
  assert expected.keys() == actual.keys()
  for name in expected:
    assert actual[name].shape == expected[name].shape, name
  return {name: float(np.max(np.abs(np.asarray(expected[name]) - actual[name])))
          for name in expected}


@pytest.mark.parametrize('image_size', [64, 256], ids=['default', 'paper'])
def test_jax_and_torch_agree(image_size, tmp_path, real_data_dir):
  model_config = _model_config(image_size)
  params = _random_params(model_config)
  if image_size == 256:
    assert models.count_params_tree(params) == 1_405_916  # the paper's model
  images = _fixed_inputs(image_size,
                          real_data_dir / 'real_cxr' / '00000001_000.png')
  expected = jax.tree.map(np.asarray,
                          _jax_outputs(model_config, params, images))
  # Not a trivial agreement: the reconstructions and latents vary.
  assert np.ptp(expected['reconstruction']) > 0.1
  assert np.min(np.std(expected['mu'], axis=0)) > 1e-2

  weights = tmp_path / 'model.safetensors'
  torch_convert.save_safetensors(str(weights), model_config, params)
  torch_net = _load_torch(weights)
  differences = _max_differences(expected, _torch_outputs(torch_net, images))
  assert max(differences.values()) < TOLERANCE, differences
  assert {head.name for head in HEADS} <= differences.keys()
  assert expected['labels'].shape == (NUM_INPUTS, len(labels.LABELS))
  assert expected['age'].shape == (NUM_INPUTS,)

  # The fixtures catch the classic porting errors: an unflipped
  # ConvTranspose kernel and (with a 4×4 bottleneck) an NHWC flatten order.
  naive = safetensors.torch.load_file(weights)
  for i in range(len(model_config.channels)):
    naive[f'decoder.deconvs.{i}.weight'] = torch.from_numpy(
        params['decoder']['deconvs'][i]['kernel'].transpose(2, 3, 0, 1).copy())
  for path in ('encoder.to_mu', 'encoder.to_logvar', 'decoder.from_latent'):
    first, second = path.split('.')
    for flax_name, torch_name in (('kernel', 'weight'), ('bias', 'bias')):
      naive[f'{path}.{torch_name}'] = torch.from_numpy(
          params[first][second][flax_name].T.copy())
  naive_differences = _max_differences(
      expected, _torch_outputs(_load_torch(weights, naive), images))
  assert naive_differences['reconstruction'] > 1e-3, naive_differences
  if image_size > 64:
    assert naive_differences['mu'] > 1e-3, naive_differences


def test_torch_model_imports_only_torch_and_the_standard_library():
  tree = ast.parse((REPO / 'pumamednet_jax' / 'torch_model.py').read_text())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, 'relative import in torch_model.py'
      modules.add(node.module.split('.')[0])
  assert modules <= {'torch', 'dataclasses', 'json', 'math', 'typing'}, modules


def test_readme_lines_run_with_torch_model_copied_alone(tmp_path):
  """The copied file runs in a fresh interpreter where JAX cannot import."""
  model_config = _model_config(64)
  params = _random_params(model_config, seed=3)
  torch_convert.save_safetensors(str(tmp_path / 'model.safetensors'),
                                 model_config, params)
  (tmp_path / 'torch_model.py').write_text(
      (REPO / 'pumamednet_jax' / 'torch_model.py').read_text())
  script = """
import sys
for blocked in ('jax', 'flax', 'tensorflow', 'pumamednet_jax'):
  sys.modules[blocked] = None
import json, torch
from safetensors.torch import load_file, save_file
import torch_model

with open('model.json') as f:
  config = torch_model.ModelConfig.from_json(json.load(f))
model = torch_model.PumaMedNet(config).eval()
model.load_state_dict(load_file('model.safetensors'))
images = torch.linspace(0, 1, 2 * 64 * 64).reshape(2, 1, 64, 64)
with torch.no_grad():
  reconstruction, heads, latent = model(images)
  sampled = model(images, train=True, generator=torch.Generator().manual_seed(0))
save_file({'reconstruction': reconstruction, 'mu': latent['mu'],
           'z': sampled[2]['z'],
           **{name: out.contiguous() for name, out in heads.items()}},
          'outputs.safetensors')
"""
  subprocess.run([sys.executable, '-c', script], cwd=tmp_path, check=True)
  outputs = safetensors.torch.load_file(tmp_path / 'outputs.safetensors')
  assert outputs['reconstruction'].shape == (2, 1, 64, 64)
  assert outputs['labels'].shape == (2, len(labels.LABELS))
  assert outputs['view'].shape == outputs['age'].shape == (2,)
  assert torch.all(torch.isfinite(outputs['z']))
  assert not torch.equal(outputs['z'], outputs['mu'])


def _assert_bitwise_equal(expected, actual):
  expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  assert [path for path, _ in actual_leaves] == [
      path for path, _ in expected_leaves]
  for (path, want), (_, got) in zip(expected_leaves, actual_leaves):
    assert got.dtype == np.float32 and want.dtype == np.float32, path
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), path


def test_safetensors_round_trip_is_bitwise(tmp_path):
  model_config = _model_config(256)
  params = _random_params(model_config, seed=1)
  weights = tmp_path / 'model.safetensors'
  torch_convert.save_safetensors(str(weights), model_config, params)
  restored_config, restored = torch_convert.load_safetensors(str(weights))
  assert restored_config.to_json() == model_config.to_json()
  _assert_bitwise_equal(params, restored)


@pytest.mark.parametrize(
    'overrides, tensor, found_shape, expected_shape',
    [(dict(latent_dim=64), 'encoder.to_mu.weight', (64, 96), (100, 96)),
     (dict(channels=(32, 48, 64, 96, 96, 128)), 'encoder.convs.5.weight',
      (128, 96, 4, 4), (96, 96, 4, 4))],
    ids=['latent', 'channels'])
def test_another_architecture_is_a_clear_error(
    overrides, tensor, found_shape, expected_shape, tmp_path):
  other_config = _model_config(64, **overrides)
  other_params = _random_params(other_config)
  weights = tmp_path / 'other.safetensors'
  torch_convert.save_safetensors(str(weights), other_config, other_params)
  json_path = tmp_path / 'expected.json'
  json_path.write_text(json.dumps(_model_config(64).to_json()))

  with pytest.raises(ValueError) as error:
    torch_convert.load_safetensors(str(weights), str(json_path))
  message = str(error.value)
  assert str(weights) in message
  line = next(line for line in message.splitlines()
              if line.strip().startswith(tensor + ':'))
  assert str(found_shape) in line and str(expected_shape) in line, line

  # PyTorch's strict loading names the tensor and both shapes, too.
  with open(json_path) as f:
    torch_net = torch_model.PumaMedNet(
        torch_model.ModelConfig.from_json(json.load(f)))
  with pytest.raises(RuntimeError, match=tensor):
    torch_net.load_state_dict(safetensors.torch.load_file(weights))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  model_config = _model_config(64)
  params = _random_params(model_config)
  state_dict = torch_convert.flax_to_torch(params, model_config)
  del state_dict['classifier.out.bias']
  state_dict['decoder.extra.weight'] = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError) as error:
    torch_convert.torch_to_flax(state_dict, model_config, source='sd.pt')
  message = str(error.value)
  assert 'sd.pt' in message
  assert 'classifier.out.bias: missing (expected shape (19,))' in message
  assert 'decoder.extra.weight: unexpected tensor of shape (2, 3)' in message


def test_unknown_config_key_is_an_error():
  data = _model_config(64).to_json()
  data['skip_connections'] = True
  with pytest.raises(ValueError, match='skip_connections'):
    torch_model.ModelConfig.from_json(data)


def _run_module(module: str, *args: str) -> None:
  result = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]


def test_cli_export_then_import_reproduces_the_checkpoint(tmp_path):
  model_config = _model_config(256)
  params = _random_params(model_config, seed=2)
  checkpoints.save_params(str(tmp_path / 'trained'), model_config, params,
                          step=7)
  weights = tmp_path / 'export' / 'model.safetensors'
  weights.parent.mkdir()

  _run_module('pumamednet_jax.export_torch', f'--workdir={tmp_path}/trained',
              '--step=7', f'--output={weights}')
  _run_module('pumamednet_jax.import_torch', f'--weights={weights}',
              f'--workdir={tmp_path}/imported')

  exported = json.loads((weights.parent / 'model.json').read_text())
  assert models.ModelConfig.from_json(exported).to_json() == model_config.to_json()
  torch_net = _load_torch(weights)
  assert torch_net.config.image_size == 256
  imported_config, imported = checkpoints.load_params(str(tmp_path / 'imported'))
  assert imported_config.to_json() == model_config.to_json()
  _assert_bitwise_equal(params, imported)
