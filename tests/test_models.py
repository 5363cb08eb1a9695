"""The PumaMedNet model: shapes of every output, the VAE interface, init."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from input_pipeline import heads as heads_lib
from input_pipeline import labels
from pumamednet_jax import models

CXR_HEADS = (
    heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, labels.LABELS),
    heads_lib.HeadSpec('view', heads_lib.BINARY, labels.VIEWS),
    heads_lib.HeadSpec('sex', heads_lib.BINARY, labels.SEXES),
    heads_lib.HeadSpec('age_above_median', heads_lib.BINARY, ('below', 'above')),
    heads_lib.HeadSpec('age', heads_lib.REGRESSION, scale=100.0),
)
COVID3_HEADS = (
    heads_lib.HeadSpec('label', heads_lib.MULTICLASS, labels.COVID3_CLASSES),)


def small_model_config(heads, image_size=64):
  config = default.get_config()
  config.image_size = image_size
  config.model.channels = (4, 4, 8, 8, 8, 8)
  config.model.latent_dim = 12
  config.model.classifier_hidden = 16
  return models.model_config(config, heads, 'fast')


@pytest.fixture(scope='module')
def cxr_model():
  model_config = small_model_config(CXR_HEADS, image_size=128)
  return models.bind(model_config, models.init_params(model_config, 0))


def test_output_shapes_of_every_head(cxr_model):
  images = jnp.zeros((3, 128, 128, 1))
  reconstruction, head_outputs, latents = cxr_model(images)
  assert reconstruction.shape == (3, 128, 128, 1)
  assert {k: v.shape for k, v in head_outputs.items()} == {
      'labels': (3, 15), 'view': (3,), 'sex': (3,), 'age_above_median': (3,),
      'age': (3,)}
  assert {k: v.shape for k, v in latents.items()} == {
      'mu': (3, 12), 'logvar': (3, 12), 'z': (3, 12)}


def test_multiclass_head_shape():
  model_config = small_model_config(COVID3_HEADS)
  model = models.bind(model_config, models.init_params(model_config, 0))
  _, head_outputs, _ = model(jnp.zeros((2, 64, 64, 1)))
  assert head_outputs['label'].shape == (2, 3)


def test_vae_interface_and_eval_uses_the_mean(cxr_model):
  images = jax.random.uniform(jax.random.key(0), (2, 128, 128, 1))
  mu, logvar = cxr_model.encode(images)
  reconstruction, _, latents = cxr_model(images)
  np.testing.assert_array_equal(latents['z'], mu)
  np.testing.assert_array_equal(reconstruction, cxr_model.decode(mu))
  assert float(reconstruction.min()) >= 0 and float(reconstruction.max()) <= 1
  sampled, _, train_latents = cxr_model(images, jax.random.key(1), train=True)
  assert not np.allclose(train_latents['z'], mu)
  np.testing.assert_allclose(
      train_latents['z'],
      cxr_model.reparametrize(mu, logvar, jax.random.key(1)), rtol=1e-6)
  with pytest.raises(ValueError, match='rng'):
    cxr_model(images, train=True)


def test_per_example_keys_do_not_depend_on_the_batch(cxr_model):
  mu = jnp.zeros((4, 12))
  logvar = jnp.zeros((4, 12))
  keys = jax.random.split(jax.random.key(3), 4)
  whole = cxr_model.reparametrize(mu, logvar, keys)
  halves = jnp.concatenate([cxr_model.reparametrize(mu[:2], logvar[:2], keys[:2]),
                            cxr_model.reparametrize(mu[2:], logvar[2:], keys[2:])])
  np.testing.assert_array_equal(whole, halves)


def test_architecture_of_the_paper():
  """6 stride-2 convs, 6 transposed convs, 2 dense classifier layers."""
  model_config = small_model_config(CXR_HEADS)
  params = models.abstract_params(model_config)
  assert len(params['encoder']['convs']) == 6
  assert len(params['decoder']['deconvs']) == 6
  assert set(params['classifier']) == {'hidden', 'out'}
  assert params['classifier']['out']['kernel'].shape == (16, 19)


def test_init_is_a_function_of_the_seed():
  model_config = small_model_config(COVID3_HEADS)
  first, again, other = (models.init_params(model_config, s) for s in (0, 0, 1))
  leaves = lambda tree: jax.tree.leaves(tree)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(first), leaves(again)))
  assert not np.array_equal(first['encoder']['convs'][2]['kernel'],
                            other['encoder']['convs'][2]['kernel'])


def test_image_size_must_be_a_multiple_of_64():
  with pytest.raises(ValueError, match='multiple of 64'):
    small_model_config(COVID3_HEADS, image_size=96)


def test_model_config_json_round_trip():
  model_config = dataclasses.replace(small_model_config(CXR_HEADS),
                                     conv_impl='xla')
  assert models.ModelConfig.from_json(model_config.to_json()) == model_config


def test_compute_options_are_not_part_of_the_stored_architecture():
  model_config = dataclasses.replace(small_model_config(CXR_HEADS),
                                     dtype='bfloat16', conv_impl='fast')
  stored = model_config.to_json()
  assert not set(models.COMPUTE_FIELDS) & set(stored)
  assert models.ModelConfig.from_json(stored) == dataclasses.replace(
      model_config, dtype='float32', conv_impl='xla')


@pytest.mark.parametrize('conv_impl', ['auto', 'bogus'])
def test_the_model_takes_a_concrete_conv_form(conv_impl):
  # 'auto' is the config's, resolved by the platform policy at the edge.
  with pytest.raises(ValueError, match='model.conv_impl'):
    dataclasses.replace(small_model_config(CXR_HEADS), conv_impl=conv_impl)


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  float32_config = small_model_config(CXR_HEADS)
  bfloat16_config = dataclasses.replace(float32_config, dtype='bfloat16')
  params = models.init_params(bfloat16_config, 0)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
  forward = lambda config: jax.jit(lambda p, x: models.bind(config, p)(x))
  low = forward(bfloat16_config)(params, images)
  full = forward(float32_config)(params, images)
  assert low[0].dtype == jnp.float32 and low[2]['mu'].dtype == jnp.float32
  # Rounded to bfloat16 on the way (differs), not another function (close).
  difference = float(jnp.max(jnp.abs(low[2]['mu'] - full[2]['mu'])))
  assert 0 < difference < 0.05 * max(1.0, float(jnp.max(jnp.abs(full[2]['mu']))))


@pytest.mark.parametrize('batch,chunk', [
    (6, 2),  # chunks of several images
    (5, 1),  # one image at a time
    (6, 6),  # in one piece
])
def test_in_chunks_computes_the_same_per_example_outputs(cxr_model, batch,
                                                         chunk):
  images = jax.random.uniform(jax.random.key(7), (batch, 128, 128, 1))
  run = lambda x: cxr_model(x, train=False)
  chunked = jax.jit(lambda x: models.in_chunks(run, x, chunk))
  jaxpr = str(jax.make_jaxpr(chunked)(images))
  assert ('scan' in jaxpr) == (chunk < batch)
  expected, actual = jax.jit(run)(images), chunked(images)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected),
                          jax.tree.leaves(actual)):
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
