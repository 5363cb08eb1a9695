"""Imports PyTorch weights (safetensors) into an orbax checkpoint.

  python -m pumamednet_jax.import_torch --weights model.safetensors --workdir W2

reads the architecture from the JSON beside the weights (`model.json`, or
--model_config) and writes a checkpoint of step --step that `main.py` can
evaluate or resume from (with a fresh optimizer state). Safetensors files hold
raw arrays only: nothing is unpickled.
"""

from absl import app
from absl import flags
from absl import logging

from pumamednet_jax import checkpoints
from pumamednet_jax import torch_convert

def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string(
      'weights', None, 'The .safetensors state dict of `torch_model.PumaMedNet`.')
  flags.DEFINE_string(
      'model_config', None,
      'Architecture JSON (default: beside the weights, model.json).')
  flags.DEFINE_string(
      'workdir', None, 'Directory to write the orbax checkpoint to.')
  flags.DEFINE_integer('step', 0, 'Step number of the checkpoint.')
  flags.mark_flags_as_required(['weights', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  model_config, params = torch_convert.load_safetensors(
      flags.FLAGS.weights, flags.FLAGS.model_config)
  checkpoints.save_params(flags.FLAGS.workdir, model_config, params, flags.FLAGS.step)
  logging.info('Wrote step %d of %s to %s', flags.FLAGS.step, flags.FLAGS.weights,
               flags.FLAGS.workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
