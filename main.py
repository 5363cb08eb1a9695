"""Trains and evaluates PumaMedNet: `python main.py --config=configs/default.py --workdir=DIR`.

Re-running with the same --workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host runs; '
                  'the coordinator is found from the environment or the flags '
                  'below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries:
  """Drops the INFO chatter of orbax and TFDS from the log (warnings stay)."""

  NOISY = ('/orbax/', '/tensorflow_datasets/')

  def filter(self, record) -> bool:
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        part in record.pathname for part in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  # TensorFlow only reads data here; keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    # CPU-only clusters need gloo for cross-process collectives; GPU and TPU
    # backends ignore this setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  from pumamednet_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d / %d, devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
