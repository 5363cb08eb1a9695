"""The paper preset: NIH ChestX-ray14 at 256×256 (paper Sec. 2.1, Table 1).

Prepare the data set once (README, "Real data sets"), then
  python main.py --config=configs/chestxray14.py --workdir=DIR --config.data_dir=OUT
"""

from configs import default


def get_config():
  config = default.get_config()
  # ChestX-ray14 on the official test split, validation carved by patient.
  config.dataset = 'chestxray14'
  # The paper's input size (1,405,916 parameters with the default widths).
  config.image_size = 256
  config.shuffle_buffer = 16_384
  # ~78k training images: about 40 epochs at batch 64.
  config.batch_size = 64
  config.num_train_steps = 50_000
  config.learning_rate = 1e-3
  # Terms summed with equal weights (the demo's 4 is for its short run).
  config.loss.classification_weight = 1.0
  config.warmup_steps = 1_000
  config.log_every_steps = 200
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 1_000
  return config
