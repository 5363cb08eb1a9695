"""Exports a trained checkpoint as PyTorch weights (safetensors) + config JSON.

  python -m pumamednet_jax.export_torch --workdir W [--step N] \
      --output model.safetensors

writes `model.safetensors` (a PyTorch state dict for `torch_model.PumaMedNet`)
and, beside it, `model.json` (the architecture: `torch_model.ModelConfig`).
The port has only the PumaMedNet architecture: a ResNet-18 checkpoint is
refused.
"""

from absl import app
from absl import flags
from absl import logging

from pumamednet_jax import checkpoints
from pumamednet_jax import models
from pumamednet_jax import torch_convert


def export(workdir: str, output: str, step: int | None = None) -> str:
  """Writes the checkpoint's weights to `output`; returns the JSON's path."""
  model_config, params = checkpoints.load_params(workdir, step)
  models.require_pumamednet(
      model_config, workdir,
      'export_torch: the PyTorch port has only the PumaMedNet architecture')
  return torch_convert.save_safetensors(output, model_config, params)


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string(
      'workdir', None, 'Training directory whose checkpoint is exported.')
  flags.DEFINE_integer(
      'step', None, 'Checkpoint step to export (default: the latest).')
  flags.DEFINE_string(
      'output', None,
      'The .safetensors file to write; the architecture JSON goes beside it '
      '(model.safetensors → model.json).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    json_path = export(flags.FLAGS.workdir, flags.FLAGS.output,
                       flags.FLAGS.step)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f'export_torch: {error}') from None
  logging.info('Wrote %s and %s', flags.FLAGS.output, json_path)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
