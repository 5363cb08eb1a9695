"""Loss terms: their zeros, their masks, and the lung weight map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from input_pipeline import assets
from input_pipeline import heads as heads_lib
from pumamednet_jax import losses


def random_images(seed, shape=(2, 32, 32, 1)):
  return jax.random.uniform(jax.random.key(seed), shape)


def test_ssim_loss_of_identical_images_is_zero():
  images = random_images(0)
  weights = jnp.ones((32, 32, 1))
  assert float(losses.ssim_loss(images, images, weights, 7, 1.5)) == pytest.approx(
      0.0, abs=1e-6)
  assert float(losses.ssim_loss(images, random_images(1), weights, 7, 1.5)) > 0.5


def test_kl_of_the_standard_normal_is_zero():
  mu, logvar = jnp.zeros((4, 100)), jnp.zeros((4, 100))
  assert float(losses.kl_divergence(mu, logvar)) == 0.0
  # Sum over latents, mean over the batch: 0.5 * mu^2 per unit mean.
  assert float(losses.kl_divergence(jnp.ones((4, 100)), logvar)) == pytest.approx(50.0)


def test_masked_loss_ignores_zero_weight_pixels():
  clean = random_images(0)
  weights = jnp.zeros((32, 32, 1)).at[:16].set(1.0)
  corrupted = clean.at[:, 16:].set(1.0 - clean[:, 16:])  # only zero-weight rows
  assert float(losses.masked_reconstruction_loss(corrupted, clean, weights)) == 0.0
  corrupted = clean.at[:, :4].set(1.0 - clean[:, :4])
  assert float(losses.masked_reconstruction_loss(corrupted, clean, weights)) > 0.0


def test_ssim_loss_weights_follow_the_map():
  clean = random_images(0)
  damaged = clean.at[:, 20:].set(0.0)
  weights_here = jnp.zeros((32, 32, 1)).at[20:].set(1.0)
  weights_elsewhere = jnp.zeros((32, 32, 1)).at[:10].set(1.0)
  assert float(losses.ssim_loss(damaged, clean, weights_here, 7, 1.5)) > 0.5
  assert float(losses.ssim_loss(damaged, clean, weights_elsewhere, 7, 1.5)) == (
      pytest.approx(0.0, abs=1e-6))


def test_head_losses_respect_label_masks():
  head = heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, ('a', 'b'))
  logits = jnp.array([[10.0, -10.0]])
  target = jnp.array([[1.0, 1.0]])  # the second label is wrong...
  unknown_second = jnp.array([[1.0, 0.0]])  # ...but unknown
  assert float(losses.head_loss(head, logits, target, unknown_second)) < 1e-3
  assert float(losses.head_loss(head, logits, target, jnp.ones((1, 2)))) > 4


def test_age_loss_is_on_the_scaled_age():
  head = heads_lib.HeadSpec('age', heads_lib.REGRESSION, scale=100.0)
  loss = losses.head_loss(head, jnp.array([0.5, 0.3]), jnp.array([50.0, 40.0]),
                          jnp.ones(2))
  assert float(loss) == pytest.approx(0.01 / 2)


def test_multiclass_loss():
  head = heads_lib.HeadSpec('label', heads_lib.MULTICLASS, ('x', 'y', 'z'))
  right = losses.head_loss(head, jnp.array([[0.0, 9.0, 0.0]]), jnp.array([1]),
                           jnp.ones(1))
  wrong = losses.head_loss(head, jnp.array([[0.0, 9.0, 0.0]]), jnp.array([2]),
                           jnp.ones(1))
  assert float(right) < 1e-3 < 5 < float(wrong)


def test_lung_weight_map_is_one_outside_and_lung_weight_inside():
  weights = losses.lung_weight_map(64, 4.0)
  assert weights.shape == (64, 64, 1)
  assert weights.min() == pytest.approx(1.0, abs=0.02)
  assert weights.max() == pytest.approx(4.0)
  prior = assets.lung_prior(64)
  assert weights[..., 0][prior > 0.6].mean() > 3 > 1.1 > weights[..., 0][prior < 0.05].mean()


def test_total_loss_logs_every_term_and_warms_beta_up():
  config = default.get_config()
  config.loss.beta_warmup_steps = 10
  loss_config = losses.LossConfig.from_config(config)
  heads = (heads_lib.HeadSpec('view', heads_lib.BINARY),)
  clean = random_images(0, (2, 64, 64, 1))
  kwargs = dict(
      reconstruction=random_images(1, (2, 64, 64, 1)), clean=clean,
      head_outputs={'view': jnp.zeros(2)},
      latents={'mu': jnp.ones((2, 100)), 'logvar': jnp.zeros((2, 100))},
      batch={'view': jnp.ones(2)}, heads=heads,
      weight_map=jnp.asarray(losses.lung_weight_map(64, 4.0)), config=loss_config)
  total0, terms0 = losses.total_loss(step=jnp.int32(0), **kwargs)
  total5, terms5 = losses.total_loss(step=jnp.int32(5), **kwargs)
  assert set(terms0) == {'ssim', 'recon', 'kl', 'head_view', 'total'}
  assert float(losses.beta_at(jnp.int32(0), loss_config)) == 0.0
  assert float(losses.beta_at(jnp.int32(5), loss_config)) == 0.5
  np.testing.assert_allclose(float(total5 - total0),
                             0.5 * float(terms0['kl']) / (64 * 64), rtol=1e-5)


def test_micro_batch_terms_add_up_to_the_whole_batch():
  loss_config = losses.LossConfig.from_config(default.get_config())
  heads = (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, ('a', 'b')),
           heads_lib.HeadSpec('label', heads_lib.MULTICLASS, ('x', 'y', 'z')),
           heads_lib.HeadSpec('age', heads_lib.REGRESSION, scale=100.0))
  keys = jax.random.split(jax.random.key(3), 8)
  size = 6
  # Known labels are spread unevenly over the two halves: a mean of the
  # halves' means would weigh them wrongly.
  batch = {
      'labels': jax.random.bernoulli(keys[0], 0.5, (size, 2)).astype(jnp.float32),
      'labels_mask': jnp.array([[1, 1], [1, 0], [0, 0], [1, 1], [1, 1], [1, 1]],
                               jnp.float32),
      'label': jax.random.randint(keys[1], (size,), 0, 3),
      'label_mask': jnp.array([1, 0, 0, 1, 1, 1], jnp.float32),
      'age': jax.random.uniform(keys[2], (size,), maxval=90.0),
  }
  arguments = dict(
      reconstruction=random_images(4, (size, 64, 64, 1)),
      clean=random_images(5, (size, 64, 64, 1)),
      head_outputs={'labels': jax.random.normal(keys[3], (size, 2)),
                    'label': jax.random.normal(keys[4], (size, 3)),
                    'age': jax.random.uniform(keys[5], (size,))},
      latents={'mu': jax.random.normal(keys[6], (size, 100)),
               'logvar': jax.random.normal(keys[7], (size, 100))},
      batch=batch)
  common = dict(heads=heads, weight_map=jnp.asarray(losses.lung_weight_map(64, 4.0)),
                step=jnp.int32(0), config=loss_config)
  _, whole = losses.total_loss(**arguments, **common)
  normalisers = losses.loss_normalisers(batch, heads, size)
  halves = [losses.total_loss(**jax.tree.map(lambda x, part=part: x[part], arguments),
                              normalisers=normalisers, **common)[1]
            for part in (slice(0, 3), slice(3, 6))]
  summed = jax.tree.map(lambda a, b: a + b, *halves)
  assert set(summed) == set(whole)
  for name in whole:
    np.testing.assert_allclose(summed[name], whole[name], rtol=1e-6, err_msg=name)
  # Without the whole batch's normalisers the halves' heads do not add up.
  own = [losses.total_loss(**jax.tree.map(lambda x, part=part: x[part], arguments),
                           **common)[1] for part in (slice(0, 3), slice(3, 6))]
  assert abs(float(own[0]['head_label'] + own[1]['head_label']) / 2 -
             float(whole['head_label'])) > 1e-3


@pytest.mark.parametrize('key, value', [('beta', -1.0), ('lung_weight', 0.5),
                                        ('ssim_weight', -0.1),
                                        ('ssim_filter', 'fft')])
def test_bad_loss_config_names_the_key(key, value):
  config = default.get_config()
  config.loss[key] = value
  with pytest.raises(ValueError, match=f'config.loss.{key}'):
    losses.LossConfig.from_config(config)


@pytest.mark.parametrize('size', [32, 64])
def test_banded_ssim_filter_matches_dm_pix(size):
  import dm_pix  # pylint: disable=g-import-not-at-top
  a, b = random_images(0, (2, size, size, 1)), random_images(1, (2, size, size, 1))
  expected = dm_pix.ssim(a, b, filter_size=7, filter_sigma=1.5, return_map=True)
  # Equal up to float32 rounding (the variances E[x²] − μ² cancel).
  np.testing.assert_allclose(losses.ssim(a, b, 7, 1.5, return_map=True),
                             expected, atol=1e-5)
  grad = lambda fn: jax.grad(lambda x: jnp.mean(fn(x)))(a)
  np.testing.assert_allclose(
      grad(lambda x: losses.ssim(x, b, 7, 1.5)),
      grad(lambda x: dm_pix.ssim(x, b, filter_size=7, filter_sigma=1.5)),
      rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize('size, filter_size', [(32, 7), (64, 11), (40, 4)])
def test_separable_ssim_filter_matches_the_banded_one(size, filter_size):
  """Values and gradients of the SSIM map and of the loss, both forms."""
  a = random_images(2, (2, size, size, 1))
  b = jnp.clip(a + 0.2 * random_images(3, (2, size, size, 1)), 0, 1)
  ssim_map = lambda x, form: losses.ssim(x, b, filter_size, 1.5,
                                         return_map=True, filter_form=form)
  np.testing.assert_allclose(ssim_map(a, 'separable'), ssim_map(a, 'banded'),
                             atol=1e-5)
  weights = jnp.asarray(losses.lung_weight_map(size, 4.0))
  loss = lambda x, form: losses.ssim_loss(x, b, weights, filter_size, 1.5, form)
  np.testing.assert_allclose(loss(a, 'separable'), loss(a, 'banded'), atol=1e-6)
  grads = {form: jax.jit(jax.grad(loss), static_argnums=1)(a, form)
           for form in losses.SSIM_FILTERS}
  scale = float(jnp.abs(grads['banded']).max())
  np.testing.assert_allclose(grads['separable'], grads['banded'],
                             atol=1e-5 * scale)
  with pytest.raises(ValueError, match='ssim filter'):
    ssim_map(a, 'fft')


def test_loss_config_reads_the_ssim_filter():
  config = default.get_config()
  assert losses.LossConfig.from_config(config).ssim_filter == 'banded'
  config.loss.ssim_filter = 'separable'
  assert losses.LossConfig.from_config(config).ssim_filter == 'separable'


def test_total_correlation_of_known_batches():
  key = jax.random.key(0)
  z = jax.random.normal(key, (6, 3))
  same = jnp.zeros((6, 3))
  # All posteriors equal: q(z) = prod_d q(z_d), no total correlation.
  assert float(losses.total_correlation(z, same, same)) == pytest.approx(
      0.0, abs=1e-5)
  # M narrow posteriors on the diagonal: z_1 = z_2 takes M equally likely
  # values, so TC = H(z_1) + H(z_2) - H(z_1, z_2) = log M.
  centres = jnp.arange(6.0)[:, None] * jnp.ones((1, 2))
  narrow = jnp.full((6, 2), -10.0)
  assert float(losses.total_correlation(centres, centres, narrow)) == (
      pytest.approx(np.log(6), abs=1e-4))
  # Against a direct computation with scipy on a random batch.
  from scipy import special, stats  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(key, 3)
  mu = np.asarray(jax.random.normal(keys[0], (5, 4)))
  logvar = np.asarray(0.5 * jax.random.normal(keys[1], (5, 4)))
  sample = np.asarray(jax.random.normal(keys[2], (5, 4)))
  log_q = stats.norm.logpdf(sample[:, None], mu[None], np.exp(0.5 * logvar)[None])
  expected = np.mean(special.logsumexp(log_q.sum(-1), axis=1) -
                     special.logsumexp(log_q, axis=1).sum(-1) + 3 * np.log(5))
  np.testing.assert_allclose(losses.total_correlation(sample, mu, logvar),
                             expected, rtol=1e-5)


def test_capacity_and_total_correlation_terms_of_the_total_loss():
  config = default.get_config()
  heads = ()
  clean = random_images(0, (2, 64, 64, 1))
  latents = {'mu': jnp.ones((2, 100)), 'logvar': jnp.zeros((2, 100)),
             'z': jax.random.normal(jax.random.key(1), (2, 100))}
  kwargs = dict(
      reconstruction=random_images(1, (2, 64, 64, 1)), clean=clean,
      head_outputs={}, latents=latents, batch={}, heads=heads,
      weight_map=jnp.asarray(losses.lung_weight_map(64, 4.0)))
  base_total, base = losses.total_loss(
      step=jnp.int32(5), config=losses.LossConfig.from_config(config), **kwargs)
  assert set(base) == {'ssim', 'recon', 'kl', 'total'}
  reconstruction = float(base['ssim'] + base['recon'])
  # KL = 50 nats; C rises to 20 over 10 steps: 10 at step 5.
  config.loss.capacity_gamma = 100.0
  config.loss.capacity_max = 20.0
  config.loss.capacity_steps = 10
  capacity_config = losses.LossConfig.from_config(config)
  assert float(losses.capacity_at(jnp.int32(5), capacity_config)) == 10.0
  assert float(losses.capacity_at(jnp.int32(50), capacity_config)) == 20.0
  total, terms = losses.total_loss(step=jnp.int32(5), config=capacity_config,
                                   **kwargs)
  assert float(terms['capacity_gap']) == pytest.approx(40.0)
  assert float(total) == pytest.approx(reconstruction + 100 * 40 / 4096, rel=1e-6)
  assert float(base_total) == pytest.approx(reconstruction + 50 / 4096, rel=1e-6)
  # The TC penalty adds tc_weight · TC per pixel to β·KL.
  config.loss.capacity_gamma = 0.0
  config.loss.tc_weight = 5.0
  total, terms = losses.total_loss(
      step=jnp.int32(5), config=losses.LossConfig.from_config(config), **kwargs)
  tc = float(losses.total_correlation(latents['z'], latents['mu'],
                                      latents['logvar']))
  assert float(terms['tc']) == pytest.approx(tc)
  assert float(total) == pytest.approx(float(base_total) + 5 * tc / 4096,
                                       rel=1e-6)


@pytest.mark.parametrize('option', ['capacity', 'tc'])
def test_train_step_runs_with_each_loss_option(option):
  import optax  # pylint: disable=g-import-not-at-top
  from e2e_support import shrink  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import benchmark, models, parallel, train  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import platform as platform_lib  # pylint: disable=g-import-not-at-top
  overrides = ({'loss__capacity_gamma': 50.0, 'loss__capacity_steps': 4}
               if option == 'capacity' else {'loss__tc_weight': 5.0})
  # Micro-batches of 4: the per-micro-batch terms run inside the scan.
  config = shrink(default.get_config(), micro_batch_size=4, **overrides)
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  mesh = jax.sharding.Mesh(jax.devices()[:1], (parallel.AXIS,))
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  optimizer = optax.sgd(1e-3)
  train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                    policy)
  state = parallel.replicate(train.create_train_state(
      model_config, optimizer, config.seed), mesh)
  batch = parallel.shard_batch(
      benchmark.synthetic_batch(config, heads, config.batch_size), mesh)
  for _ in range(2):
    state, step_metrics = train_fn(state, batch)
  step_metrics = jax.device_get(step_metrics)
  assert int(state.step) == 2 and float(step_metrics['nonfinite']) == 0.0
  term = 'capacity_gap' if option == 'capacity' else 'tc'
  assert np.isfinite(step_metrics[term]) and np.isfinite(step_metrics['total'])
  if option == 'capacity':
    assert float(step_metrics['capacity']) == pytest.approx(25.0 / 4)
    assert float(step_metrics['capacity_gap']) == pytest.approx(
        abs(float(step_metrics['kl']) - 25.0 / 4), rel=0.2)
  else:
    assert float(step_metrics['tc']) > 0.0
