"""Transfer learning: starting a run from another run's weights (or from a
torchvision ResNet-18), and freezing parts of the model.

A new run with `config.init_from = 'WORKDIR[:STEP]'` takes the source's
encoder and decoder, which must have the same shapes, the shared hidden layer
of the classifier where its shape matches, and each head whose name, kind and
size match (its columns of the classifier's output layer); every other head
starts fresh. The run writes `init_from.json` (what was restored, what is
fresh) into its workdir. Once it has checkpoints of its own, it resumes from
those and `init_from` is no longer read.
"""

import json
import os

import jax
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from pumamednet_jax import checkpoints
from pumamednet_jax import models

# config.freeze → the top-level parts of the parameter tree left unchanged.
FREEZE = {
    'none': (),
    'encoder': ('encoder',),
    'encoder_decoder': ('encoder', 'decoder'),
}
# Parts that a transferred run must take whole from its source.
BACKBONE = ('encoder', 'decoder')
REPORT_FILE = 'init_from.json'


def check_config(config) -> None:
  """Fails on a bad config.init_from / freeze / model.arch, naming the key."""
  if config.freeze not in FREEZE:
    raise ValueError(f'config.freeze must be one of {tuple(FREEZE)}, got '
                     f'{config.freeze!r}')
  if config.model.arch not in models.ARCHS:
    raise ValueError(f'config.model.arch must be one of {models.ARCHS}, got '
                     f'{config.model.arch!r}')
  if config.init_from:
    parse_init_from(config.init_from)
  if config.model.torchvision_weights:
    if config.model.arch != models.RESNET18:
      raise ValueError('config.model.torchvision_weights needs '
                       "config.model.arch = 'resnet18'")
    if config.init_from:
      raise ValueError('config.init_from and config.model.torchvision_weights '
                       'both set: choose one starting point')


def parse_init_from(value: str) -> tuple[str, int | None]:
  """'WORKDIR' or 'WORKDIR:STEP' → (workdir, step or None for the latest)."""
  workdir, sep, step = value.rpartition(':')
  if not sep:
    return value, None
  if not step.isdigit() or not workdir:
    raise ValueError(f'config.init_from must be WORKDIR or WORKDIR:STEP, got '
                     f'{value!r}')
  return workdir, int(step)


def freeze_optimizer(optimizer: optax.GradientTransformation,
                     freeze: str) -> optax.GradientTransformation:
  """`optimizer` on the trained parts only: the frozen ones (FREEZE[freeze])
  get zero updates and no optimizer state. Unchanged for 'none'."""
  frozen = FREEZE[freeze]
  if not frozen:
    return optimizer

  def labels(params):
    return {part: jax.tree.map(lambda _, f=part in frozen: 'frozen' if f else
                               'trained', subtree)
            for part, subtree in params.items()}

  return optax.multi_transform(
      {'trained': optimizer, 'frozen': optax.set_to_zero()}, labels)


def _source_params(value: str):
  """(workdir, step, model config, params) of config.init_from, or a
  one-line FileNotFoundError."""
  workdir, step = parse_init_from(value)
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise FileNotFoundError(f'config.init_from: no checkpoints in {workdir} '
                            f'({checkpoints.checkpoint_dir(workdir)} does not '
                            'exist)')
  try:
    model_config, params = checkpoints.load_params(workdir, step)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.init_from: {e}') from None
  if step is None:
    manager = checkpoints.create_manager(workdir, asynchronous=False,
                                         read_only=True)
    step = manager.latest_step()
    manager.close()
  return workdir, step, model_config, params


def _head_slices(model_config: models.ModelConfig) -> dict:
  """{head name: (spec, slice of the classifier's output units)}."""
  slices, start = {}, 0
  for head in model_config.heads:
    slices[head.name] = (head, slice(start, start + head.size))
    start += head.size
  return slices


def transferred(params: dict, model_config: models.ModelConfig,
                source_params: dict, source_config: models.ModelConfig,
                source_name: str) -> tuple[dict, list[str], list[str]]:
  """`params` with what it shares with a source model (see the module's
  docstring): (params, restored names, fresh names). Output-layer heads are
  named 'classifier/out/<head>'."""
  if source_config.arch != model_config.arch:
    raise ValueError(f'config.init_from: {source_name} holds a '
                     f'{source_config.arch} model; this run builds a '
                     f'{model_config.arch}')
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  source = traverse_util.flatten_dict(source_params)
  restored, fresh = [], []
  for path, value in flat.items():
    name = '/'.join(map(str, path))
    if path[:2] == ('classifier', 'out'):
      continue  # per head, below
    theirs = source.get(path)
    if path[0] in BACKBONE:
      if theirs is None:
        raise ValueError(f'config.init_from: {source_name} has no {name}')
      if theirs.shape != value.shape:
        raise ValueError(
            f'config.init_from: {name} is {tuple(theirs.shape)} in '
            f'{source_name} but {tuple(value.shape)} in this model (same '
            'image_size and model widths needed)')
    if theirs is not None and theirs.shape == value.shape:
      flat[path] = np.asarray(theirs)
      restored.append(name)
    else:
      fresh.append(name)
  kernel, bias = ('classifier', 'out', 'kernel'), ('classifier', 'out', 'bias')
  theirs_heads = _head_slices(source_config)
  same_input = source[kernel].shape[0] == flat[kernel].shape[0]
  for head, ours in _head_slices(model_config).values():
    match = theirs_heads.get(head.name)
    name = f'classifier/out/{head.name}'
    if not (same_input and match and match[0].kind == head.kind and
            match[0].size == head.size):
      fresh.append(name)
      continue
    theirs = match[1]
    flat[kernel] = np.array(flat[kernel])
    flat[bias] = np.array(flat[bias])
    flat[kernel][:, ours] = source[kernel][:, theirs]
    flat[bias][ours] = source[bias][theirs]
    restored.append(name)
  return traverse_util.unflatten_dict(flat), restored, fresh


def _write_report(workdir: str, report: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, REPORT_FILE), 'w') as f:
      json.dump(report, f, indent=2)
  logging.info('init_from %s (step %s): %d tensors restored, fresh: %s',
               report['source'], report['step'], len(report['restored']),
               ', '.join(report['fresh']) or 'none')


def initial_params(config, workdir: str, params: dict,
                   model_config: models.ModelConfig) -> dict:
  """The starting parameters of a new run: `params` (fresh), or with what
  config.init_from / config.model.torchvision_weights gives them; writes
  WORKDIR/init_from.json then."""
  if config.init_from:
    source, step, source_config, source_params = _source_params(
        config.init_from)
    params, restored, fresh = transferred(params, model_config, source_params,
                                          source_config, source)
  elif config.model.torchvision_weights:
    from pumamednet_jax import resnet  # pylint: disable=g-import-not-at-top
    from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
    source, step = config.model.torchvision_weights, None
    if not os.path.isfile(source):
      raise FileNotFoundError('config.model.torchvision_weights: no file '
                              f'{source}')
    params, restored, fresh = resnet.from_torchvision(
        safetensors_np.load_file(source), params)
  else:
    return params
  _write_report(workdir, {'source': os.path.abspath(source), 'step': step,
                          'restored': restored, 'fresh': fresh})
  return params
