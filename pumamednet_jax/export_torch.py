"""Exports a trained checkpoint as PyTorch weights (safetensors) + config JSON.

  python -m pumamednet_jax.export_torch --workdir W [--step N] \
      --output model.safetensors

writes `model.safetensors` (a PyTorch state dict for `torch_model.PumaMedNet`)
and, beside it, `model.json` (the architecture: `torch_model.ModelConfig`).
"""

from absl import app
from absl import flags
from absl import logging

from pumamednet_jax import checkpoints
from pumamednet_jax import torch_convert

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
  model_config, params = checkpoints.load_params(flags.FLAGS.workdir, flags.FLAGS.step)
  json_path = torch_convert.save_safetensors(flags.FLAGS.output, model_config, params)
  logging.info('Wrote %s and %s', flags.FLAGS.output, json_path)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
