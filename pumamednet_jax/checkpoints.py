"""Orbax checkpoints of a training run (current `args=` API).

A checkpoint step holds these items:
  params        the model parameters, a nested dict of arrays (the Flax tree)
  opt_state     the optimizer state (absent in checkpoints imported from PyTorch)
  train_meta    JSON: counters that the loop carries (non-finite steps, ...)
  model_config  JSON: `models.ModelConfig`, so a checkpoint rebuilds its model

The manager keeps the last `keep` steps and, beside them, the best step by
validation mean AUC.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from pumamednet_jax import models

CHECKPOINT_SUBDIR = 'checkpoints'
BEST_METRIC = 'mean_auc'
ITEMS = ('params', 'opt_state', 'train_meta', 'model_config')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def create_manager(workdir: str, *, keep: int = 3, asynchronous: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  policy = preservation_policy.AnyPreservationPolicy([
      preservation_policy.LatestN(n=keep),
      preservation_policy.BestN(
          get_metric_fn=lambda metrics: metrics[BEST_METRIC], reverse=False,
          n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=asynchronous,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, *, params: Any,
         opt_state: Any | None, train_meta: dict[str, Any],
         model_config: models.ModelConfig,
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  """Starts saving one step (asynchronously, where the manager is async)."""
  items = {
      'params': ocp.args.StandardSave(params),
      'train_meta': ocp.args.JsonSave(train_meta),
      'model_config': ocp.args.JsonSave(model_config.to_json()),
  }
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                      force=force)


def has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(str(manager.directory), str(step), item))


def restore_model_config(manager: ocp.CheckpointManager,
                         step: int) -> models.ModelConfig:
  restored = manager.restore(
      step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return models.ModelConfig.from_json(restored['model_config'])


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_params: Any,
            abstract_opt_state: Any | None) -> dict[str, Any]:
  """Restores params (and opt_state when asked and present) onto the shardings
  of the abstract trees; returns a dict of the restored items."""
  items = {
      'params': ocp.args.StandardRestore(abstract_params),
      'train_meta': ocp.args.JsonRestore(),
  }
  if abstract_opt_state is not None and has_item(manager, step, 'opt_state'):
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return {name: restored[name] for name in items}


def _resolve_step(manager: ocp.CheckpointManager, workdir: str,
                  step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise FileNotFoundError(
        f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
        f'available steps: {sorted(steps)}')
  return step


def choose_step(manager: ocp.CheckpointManager, workdir: str,
                step: int | None = None) -> int:
  """`step` (checked), or else the best step by validation mean AUC, or
  else (no step has that metric) the latest."""
  if step is not None:
    return _resolve_step(manager, workdir, step)
  scored = {}
  for candidate in manager.all_steps():
    metrics = manager.metrics(candidate) or {}
    if BEST_METRIC in metrics:
      scored[candidate] = metrics[BEST_METRIC]
  if scored:
    return max(scored, key=lambda s: (scored[s], s))
  return _resolve_step(manager, workdir, None)


def load_params(workdir: str,
                step: int | None = None) -> tuple[models.ModelConfig, dict]:
  """The model config and parameters (NumPy) of a step (default: the latest)."""
  manager = create_manager(workdir, asynchronous=False, read_only=True)
  step = _resolve_step(manager, workdir, step)
  model_config = restore_model_config(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(models.abstract_params(model_config))))
  manager.close()
  return model_config, jax.tree.map(np.asarray, restored['params'])


def save_params(workdir: str, model_config: models.ModelConfig, params: dict,
                step: int = 0) -> None:
  """Writes a parameters-only checkpoint (fresh optimizer state on resume)."""
  manager = create_manager(workdir, asynchronous=False)
  save(manager, step, params=params, opt_state=None,
       train_meta={'imported': True}, model_config=model_config, force=True)
  manager.wait_until_finished()
  manager.close()
