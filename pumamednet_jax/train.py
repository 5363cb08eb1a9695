"""Training and evaluation of PumaMedNet: state, data-parallel steps, the loop."""

import dataclasses
import functools
import itertools
import math
import os
import signal
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from PIL import Image

from input_pipeline import heads as heads_lib
from pumamednet_jax import checkpoints
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import inference
from pumamednet_jax import losses
from pumamednet_jax import metrics as metrics_lib
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import preemption as preemption_lib
from pumamednet_jax import transfer

# How long the other processes wait for process 0 to prepare the data sets.
PREPARE_TIMEOUT_S = 4 * 3600
# The run's config as JSON, in its workdir.
CONFIG_FILE = 'config.json'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  nonfinite_consecutive: jax.Array  # non-finite steps in a row
  nonfinite_total: jax.Array  # non-finite (skipped) steps in the run


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the jitted steps close over: computed once from the config, so the
  hot path never reads the config."""

  model: models.ModelConfig
  loss: losses.LossConfig
  defects: defects_lib.DefectConfig
  seed: int
  micro_batch_size: int  # config.micro_batch_size (0 = automatic)
  policy: platform_lib.Policy  # of the mesh's devices
  frozen: tuple[str, ...] = ()  # parts left unchanged (transfer.FREEZE)


def check_config(config) -> None:
  """Fails before any compute on a bad config, naming the key."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  if config.dataset not in pipeline.KNOWN_DATASETS:
    raise ValueError(f'config.dataset: unknown data set {config.dataset!r}; '
                     f'known: {", ".join(pipeline.KNOWN_DATASETS)}')
  step = 2**models.NUM_STRIDED_LAYERS
  if config.image_size <= 0 or config.image_size % step:
    raise ValueError(f'config.image_size must be a positive multiple of {step}, '
                     f'got {config.image_size}')
  if len(config.model.channels) != models.NUM_STRIDED_LAYERS or min(
      config.model.channels) <= 0:
    raise ValueError(f'config.model.channels needs {models.NUM_STRIDED_LAYERS} '
                     f'positive widths, got {tuple(config.model.channels)}')
  for key in ('latent_dim', 'classifier_hidden'):
    if config.model[key] <= 0:
      raise ValueError(f'config.model.{key} must be > 0, got {config.model[key]}')
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ValueError("config.model.dtype must be 'float32' or 'bfloat16', got "
                     f'{config.model.dtype!r}')
  platform_lib.check_conv_impl(config.model.conv_impl)
  for key in ('batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints',
              'max_consecutive_nonfinite'):
    if config[key] <= 0:
      raise ValueError(f'config.{key} must be > 0, got {config[key]}')
  for key in ('num_train_steps', 'warmup_steps', 'grad_clip_norm',
              'num_eval_examples', 'num_grid_images'):
    if config[key] < 0:
      raise ValueError(f'config.{key} must be >= 0, got {config[key]}')
  if config.learning_rate <= 0:
    raise ValueError(f'config.learning_rate must be > 0, got {config.learning_rate}')
  parallel.check_batch_size(config.batch_size)
  check_micro_batch_size(config.micro_batch_size,
                         config.batch_size // jax.device_count())
  losses.LossConfig.from_config(config)
  defects_lib.DefectConfig.from_config(config)
  transfer.check_config(config)


def create_optimizer(config) -> optax.GradientTransformation:
  """Adam with linear warm-up and cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, max(config.num_train_steps - 1, 0)),
      decay_steps=max(config.num_train_steps, 1), end_value=0.0)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adam(schedule))
  return transfer.freeze_optimizer(optax.chain(*parts), config.freeze)


def create_train_state(model_config: models.ModelConfig,
                       optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
  params = models.init_params(model_config, seed)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      nonfinite_consecutive=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
  )


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_micro_batch_size(requested: int, local_size: int) -> None:
  """config.micro_batch_size is 0 (automatic) or divides the per-device batch."""
  if requested < 0:
    raise ValueError('config.micro_batch_size must be >= 0 (0 = automatic), '
                     f'got {requested}')
  if requested and local_size % requested:
    raise ValueError(f'config.micro_batch_size = {requested} does not divide '
                     f'the batch per device ({local_size})')


def micro_batch_size(requested: int, local_size: int, image_size: int,
                     policy: platform_lib.Policy) -> int:
  """Examples per forward and backward pass of the train step:
  `config.micro_batch_size`, or if 0 the platform policy's."""
  check_micro_batch_size(requested, local_size)
  return requested or policy.micro_batch_size(local_size, image_size)


def sum_over_micro_batches(fn, inputs, size: int):
  """Σ fn(micro-batch) over the micro-batches of `size` examples of `inputs`
  (a pytree of arrays with a leading batch axis), one after another in a
  loop; fn(inputs) when `size` is the whole batch."""
  batch = jax.tree.leaves(inputs)[0].shape[0]
  if size == batch:
    return fn(inputs)
  stacked = jax.tree.map(
      lambda x: x.reshape(batch // size, size, *x.shape[1:]), inputs)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      fn, jax.tree.map(lambda x: x[0], stacked)))
  total, _ = jax.lax.scan(
      lambda acc, micro: (jax.tree.map(jnp.add, acc, fn(micro)), None),
      zeros, stacked)
  return total


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               step_config: StepConfig, optimizer: optax.GradientTransformation,
               weight_map: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step, written per device (call it inside shard_map).

  The gradient and loss terms are the whole batch's, computed as sums over
  micro-batches (`micro_batch_size`): the same values, less memory at a time.
  """
  local_size = batch['image'].shape[0]
  keys = defects_lib.example_keys(step_config.seed, defects_lib.TRAIN_STREAM,
                                  state.step, parallel.example_index(local_size))
  heads = step_config.model.heads
  normalisers = losses.loss_normalisers(batch, heads, local_size)
  # Differentiate a per-device copy of the replicated parameters: each device
  # gets the gradient of its own examples (as under pmap), averaged below.
  # (Through the replicated value itself, shard_map would psum it already.)
  local_params = jax.lax.pcast(state.params, parallel.AXIS, to='varying')
  micro_size = micro_batch_size(step_config.micro_batch_size, local_size,
                                batch['image'].shape[1], step_config.policy)

  def grads_and_terms(micro):
    micro_batch, micro_keys = micro
    clean, defective = defects_lib.defective_inputs(
        micro_batch['image'], micro_keys, step_config.defects)
    latent_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(micro_keys)

    def loss_fn(params):
      model = models.bind(step_config.model, params)
      reconstruction, head_outputs, latents = model(defective, latent_keys,
                                                    train=True)
      if reconstruction is None:  # ResNet-18: the classification losses only
        loss, terms = losses.heads_loss(
            head_outputs=head_outputs, batch=micro_batch, heads=heads,
            config=step_config.loss, normalisers=normalisers)
      else:
        loss, terms = losses.total_loss(
            reconstruction=reconstruction, clean=clean,
            head_outputs=head_outputs, latents=latents, batch=micro_batch,
            heads=heads, weight_map=weight_map, step=state.step,
            config=step_config.loss, normalisers=normalisers)
      return loss, (terms, models.batch_stats(model))

    (_, (terms, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(local_params)
    # BatchNorm statistics: the mean over the micro-batches.
    stats = jax.tree.map(lambda x: x * (micro_size / local_size), stats)
    return grads, terms, stats

  grads, terms, stats = sum_over_micro_batches(grads_and_terms, (batch, keys),
                                               micro_size)
  stats = jax.lax.pmean(stats, parallel.AXIS)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  terms = jax.lax.pmean(terms, parallel.AXIS)
  terms['beta'] = losses.beta_at(state.step, step_config.loss)
  if step_config.loss.capacity_gamma > 0:
    terms['capacity'] = losses.capacity_at(state.step, step_config.loss)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = models.with_batch_stats(
      optax.apply_updates(state.params, updates), stats, step_config.frozen)
  # A non-finite loss or gradient never reaches the parameters.
  finite = jnp.isfinite(terms['total']) & _all_finite(grads)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=jax.tree.map(keep_if_bad, params, state.params),
      opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state),
      nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  step_metrics = dict(terms)
  step_metrics['grad_norm'] = optax.tree.norm(grads)
  step_metrics['nonfinite'] = (~finite).astype(jnp.float32)
  step_metrics['nonfinite_consecutive'] = new_state.nonfinite_consecutive
  return new_state, step_metrics


def image_grid_step(params: dict, batch: dict[str, jax.Array], *,
                    step_config: StepConfig) -> jax.Array:
  """(B, S, 3S) rows of defective input | reconstruction | clean image."""
  keys = defects_lib.example_keys(step_config.seed, defects_lib.EVAL_STREAM, 0,
                                  batch['index'])
  clean, defective = defects_lib.defective_inputs(batch['image'], keys,
                                                  step_config.defects)
  model = models.bind(step_config.model, params)
  reconstruction, _, _ = models.in_chunks(
      model, defective, step_config.policy.inference_chunk(defective.shape))
  return jnp.concatenate([defective, reconstruction, clean], axis=2)[..., 0]


def make_steps(config, model_config: models.ModelConfig, mesh,
               optimizer: optax.GradientTransformation,
               policy: platform_lib.Policy):
  """The data-parallel (jit ∘ shard_map) train, eval and image-grid steps of
  `config` (losses, defects, seed) for `model_config`, over `mesh`, computed
  as `policy` (the mesh's) says."""
  step_config = StepConfig(
      model=model_config, loss=losses.LossConfig.from_config(config),
      defects=defects_lib.DefectConfig.from_config(config), seed=config.seed,
      micro_batch_size=config.micro_batch_size, policy=policy,
      frozen=transfer.FREEZE[config.freeze])
  data_parallel = functools.partial(
      parallel.data_parallel, mesh=mesh,
      compiler_options=policy.compiler_options)
  weight_map = jnp.asarray(losses.lung_weight_map(config.image_size,
                                                  config.loss.lung_weight))
  train = data_parallel(
      functools.partial(train_step, step_config=step_config, optimizer=optimizer,
                        weight_map=weight_map),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED), donate_state=True)
  evaluate = inference.make_score_fn(
      mesh, model_config, step_config.defects, config.seed, policy=policy,
      ssim=(config.loss.ssim_filter_size, config.loss.ssim_filter_sigma,
            config.loss.ssim_filter))
  grid = data_parallel(
      functools.partial(image_grid_step, step_config=step_config),
      out_specs=parallel.SHARDED, donate_state=False)
  return train, evaluate, grid


def evaluate(eval_fn, grid_fn, params, batches, mesh, heads,
             num_grid_images: int) -> tuple[dict[str, float], np.ndarray | None]:
  """Scores the batches' clean and defective images; returns the metrics of
  both (those of the defective images under `defective/`) and an image grid
  of the first batch."""
  grid = None
  if num_grid_images:
    batches = iter(batches)
    first = next(batches, None)
    if first is not None:
      rows = parallel.gather(grid_fn(params, parallel.shard_batch(first, mesh)))
      grid = np.concatenate(list(rows[:num_grid_images]), axis=0)
      batches = itertools.chain([first], batches)
  outputs = inference.score_split(eval_fn, params, batches, mesh)
  report = metrics_lib.eval_report(outputs, heads)
  defective = metrics_lib.eval_report(inference.defective_outputs(outputs), heads)
  report.update({f'defective/{k}': v for k, v in defective.items()
                 if k.startswith(('auc', 'mean_auc', 'accuracy', 'mae'))})
  return report, grid


def write_grid(workdir: str, step: int, grid: np.ndarray) -> str:
  path = os.path.join(workdir, 'images', f'grid_{step:07d}.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.uint8(np.clip(grid, 0, 1) * 255 + 0.5)).save(path)
  return path


def hparams(config) -> dict[str, bool | int | float | str]:
  """The whole config as TensorBoard hyperparameters: nested keys dotted
  ('model.dtype'), tuples, lists and None as strings."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      if isinstance(value, Mapping):
        visit(f'{prefix}{key}.', value)
      else:
        flat[f'{prefix}{key}'] = (
            value if isinstance(value, (bool, int, float, str)) else str(value))

  visit('', config.to_dict())
  return flat


def prepared_sources(config) -> tuple[Any, ...]:
  """The run's data sets (`pipeline.Source`s), prepared once: process 0 prepares them (renders the
  phantom) while the others wait, then every process opens them. A data
  directory local to each host is prepared then on each other host, by one of
  its processes (the others wait for its preparation lock)."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  try:
    if jax.process_index() == 0:
      pipeline.prepare(pipeline.get_sources(config))
  finally:
    # Reached when process 0 fails too: the others then fail on their own
    # (a real data set not prepared) rather than wait out the timeout.
    parallel.wait_for_all_processes('pumamednet_data_prepared',
                                    PREPARE_TIMEOUT_S)
  sources = pipeline.get_sources(config)
  pipeline.prepare(sources)
  return sources


def restore_or_init(manager, model_config, optimizer, seed: int, mesh):
  """The latest checkpoint's state, or a fresh one; replicated over the mesh.

  Initialisation goes through `jax.eval_shape` first, so restoring never
  allocates a throw-away model.
  """
  abstract = jax.eval_shape(
      lambda: create_train_state(model_config, optimizer, seed))
  replicated = jax.sharding.NamedSharding(mesh, parallel.REPLICATED)
  abstract = parallel.placed(abstract, replicated)
  step = manager.latest_step()
  if step is None:
    init = jax.jit(lambda: create_train_state(model_config, optimizer, seed),
                   out_shardings=replicated)
    return init()
  saved_config = checkpoints.restore_model_config(manager, step)
  if saved_config.to_json() != model_config.to_json():
    raise ValueError(
        f'the checkpoint at step {step} in {manager.directory} was written for '
        f'another model ({saved_config}); this config builds {model_config}. '
        'Use a fresh --workdir or the matching config.')
  restored = checkpoints.restore(manager, step, abstract_params=abstract.params,
                                 abstract_opt_state=abstract.opt_state)
  meta = restored['train_meta']
  if 'opt_state' in restored:
    opt_state = restored['opt_state']
  else:  # imported weights: a fresh optimizer
    logging.info('checkpoint %d has no optimizer state; starting Adam afresh', step)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(restored['params'])
  counter = lambda value: jax.device_put(jnp.asarray(value, jnp.int32), replicated)
  return TrainState(
      step=counter(step),
      params=restored['params'],
      opt_state=opt_state,
      nonfinite_consecutive=counter(meta.get('nonfinite_consecutive', 0)),
      nonfinite_total=counter(meta.get('nonfinite_total', 0)),
  )


def _save(manager, state: TrainState, model_config, eval_metrics=None,
          force=False) -> None:
  step = int(state.step)
  train_meta = {
      'nonfinite_consecutive': int(state.nonfinite_consecutive),
      'nonfinite_total': int(state.nonfinite_total),
  }
  best_metric = None
  if eval_metrics is not None and not math.isnan(eval_metrics['mean_auc']):
    best_metric = {checkpoints.BEST_METRIC: eval_metrics['mean_auc']}
  checkpoints.save(manager, step, params=state.params, opt_state=state.opt_state,
                   train_meta=train_meta, model_config=model_config,
                   metrics=best_metric, force=force)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates;
  returns the final eval metrics."""
  # TensorFlow (tf.data, clu's summary writers) only here and in check_config:
  # the steps above run where it is not installed (a GPU benchmark machine).
  # pylint: disable=g-import-not-at-top
  from clu import metric_writers
  from clu import periodic_actions
  from input_pipeline import pipeline
  # pylint: enable=g-import-not-at-top
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  sources = prepared_sources(config)
  heads = pipeline.head_specs(sources, config.head_features)
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  optimizer = create_optimizer(config)
  train_fn, eval_fn, grid_fn = make_steps(config, model_config, mesh, optimizer,
                                          policy)

  manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints)
  state = restore_or_init(manager, model_config, optimizer, config.seed, mesh)
  is_main = jax.process_index() == 0
  if manager.latest_step() is None:
    state = state.replace(params=jax.device_put(
        transfer.initial_params(config, workdir, state.params, model_config),
        jax.sharding.NamedSharding(mesh, parallel.REPLICATED)))
    if is_main:  # what `compare` reads of the run
      with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
  start_step = int(state.step)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    writer.write_hparams(hparams(config))
  logging.info('model: %d parameters; heads: %s; devices: %d on %d process(es); '
               'starting at step %d of %d', models.num_params(model_config),
               [h.name for h in heads], jax.device_count(), jax.process_count(),
               start_step, config.num_train_steps)

  def eval_batches():
    return pipeline.create_eval_batches(
        sources, heads, split=config.eval_split, image_size=config.image_size,
        global_batch_size=config.batch_size,
        num_examples_limit=config.num_eval_examples,
        process_index=jax.process_index(), process_count=jax.process_count())

  def run_eval(step):
    with report_progress.timed('eval'):
      report, grid = evaluate(
          eval_fn, grid_fn, state.params, eval_batches(), mesh, heads,
          config.num_grid_images if models.has_decoder(model_config) else 0)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in report.items()})
    if grid is not None and is_main:
      writer.write_images(step, {'eval/defective|reconstruction|clean':
                                 grid[None, ..., None]})
      write_grid(workdir, step, grid)
    logging.info('eval at step %d: mean_auc=%.4f on the images as they are, '
                 '%.4f with defects; ssim with defects=%.4f, of the '
                 'reconstruction=%.4f', step, report['mean_auc'],
                 report['defective/mean_auc'], report['ssim_defective'],
                 report['ssim_reconstruction'])
    return report

  train_iter = pipeline.create_train_iterator(
      sources, heads, seed=config.seed, image_size=config.image_size,
      global_batch_size=config.batch_size,
      start_step=start_step, shuffle_buffer=config.shuffle_buffer,
      process_index=jax.process_index(), process_count=jax.process_count())
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=writer)
  collection, train_metrics = None, None
  pending = None  # the previous step's metrics, checked one step late
  report = None
  with preemption_lib.Preemption(manager) as preemption:
    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = parallel.shard_batch(next(train_iter), mesh)
        state, step_metrics = train_fn(state, batch)
      if pending is not None:
        _check_nonfinite(pending, config, manager)
      pending = step_metrics
      if collection is None:
        collection = metrics_lib.train_collection(step_metrics.keys())
      merged = collection.single_from_model_output(**step_metrics)
      train_metrics = merged if train_metrics is None else train_metrics.merge(merged)
      report_progress(step)
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        values = train_metrics.compute()
        writer.write_scalars(step, {f'train/{k}': v for k, v in values.items()})
        train_metrics = None
      is_eval = step % config.eval_every_steps == 0 or last
      report = run_eval(step) if is_eval else None
      preempted = preemption.reached(step)
      if is_eval or step % config.checkpoint_every_steps == 0 or preempted:
        _save(manager, state, model_config, report, force=preempted)
      if preempted:
        manager.wait_until_finished()
        logging.warning('SIGTERM (preemption): saved the checkpoint of step %d; '
                        'exiting', step)
        writer.flush()
        raise SystemExit(128 + signal.SIGTERM)
    if pending is not None:
      _check_nonfinite(pending, config, manager)
  if report is None:  # nothing left to train: evaluate the checkpoint
    report = run_eval(start_step)
  manager.wait_until_finished()
  writer.flush()
  # Imported here: they read data and draw figures (TensorFlow, matplotlib),
  # which the train step alone (e.g. the GPU benchmark) does without.
  from pumamednet_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  final = evaluate_lib.evaluate(config, workdir, report_split(config, sources))
  for line in report_lib.run_summary_lines(final, workdir, model_config):
    logging.info('%s', line)
  return report


def report_split(config, sources) -> str:
  """The split of the report at the end of training: test, or the eval
  split where the data set has no test examples."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  splits = sources[0].builder.info.splits
  if 'test' in splits and pipeline.num_examples(sources, 'test'):
    return 'test'
  return config.eval_split


def _check_nonfinite(step_metrics, config, manager) -> None:
  consecutive = int(step_metrics['nonfinite_consecutive'])
  if consecutive >= config.max_consecutive_nonfinite:
    manager.wait_until_finished()
    raise FloatingPointError(
        f'{consecutive} consecutive training steps had a non-finite loss or '
        f'gradient (config.max_consecutive_nonfinite = '
        f'{config.max_consecutive_nonfinite}); they were skipped, and the last '
        f'good checkpoint is step {manager.latest_step()} in {manager.directory}. '
        'Lower config.learning_rate or check the data.')
