"""The phantom transfer experiment of `make transfer` (docs/transfer.md).

The demo's model (configs/default.py, workdir/demo) fine-tuned on the
phantom's covid3 variant (COVID-19 / Pneumonia / Normal), against the same
architecture and ResNet-18 trained from scratch:
  python main.py --config=configs/covid3_phantom.py --workdir=DIR \
      --config.init_from=workdir/demo [--config.phantom.num_train=500]
"""

from configs import default


def get_config():
  # The demo's size and model, so that the demo's checkpoint transfers.
  config = default.get_config()
  config.phantom.variant = 'covid3'
  # Training images (the experiment: 500 and 2,000); the test split is the
  # same for every num_train (an image is a function of seed, split, index).
  config.phantom.num_train = 2_000
  config.phantom.num_validation = 500
  config.phantom.num_test = 1_000
  # The 3-class softmax head only, as on the real covid3 set.
  config.head_features = ('label',)
  # WORKDIR[:STEP] of the run to start from ('' = from scratch).
  config.init_from = ''
  config.num_train_steps = 500
  config.learning_rate = 1e-3
  config.warmup_steps = 50
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
