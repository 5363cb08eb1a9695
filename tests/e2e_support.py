"""Helpers of the end-to-end tests: the default config, shrunk.

Tests shrink `configs/default.py` rather than define configs of their own.
"""

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# `configs/default.py` shrunk for end-to-end tests (a few seconds a step).
TINY_OVERRIDES = {
    'phantom.num_train': 96,
    'phantom.num_validation': 32,
    'phantom.num_test': 32,
    'model.channels': (4, 4, 8, 8, 8, 8),
    'model.latent_dim': 8,
    'model.classifier_hidden': 8,
    'batch_size': 8,
    'shuffle_buffer': 64,
    'num_train_steps': 4,
    'warmup_steps': 1,
    'log_every_steps': 2,
    'eval_every_steps': 4,
    'checkpoint_every_steps': 2,
    'num_grid_images': 2,
}


def shrink(config, **overrides):
  """Applies TINY_OVERRIDES, then `overrides` ('a.b' keys as 'a__b')."""
  for key, value in {**TINY_OVERRIDES,
                     **{k.replace('__', '.'): v for k, v in overrides.items()}}.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def config_flags(config_file: str, **overrides) -> list[str]:
  """main.py flags for `config_file` shrunk like `shrink`."""
  merged = {**TINY_OVERRIDES, **{k.replace('__', '.'): v for k, v in overrides.items()}}
  return [f'--config={config_file}'] + [
      f'--config.{key}={value}' for key, value in merged.items()]
