"""Pre-training on textures and medical images (paper Sec. 2.1.6, Fig. 2b).

The paper pre-trains the autoencoder on a mixture of the Describable Textures
Dataset (TFDS `dtd`), the Textures Classification set and Medical MNIST before
ChestX-ray14. Each set keeps its own class head (`dtd_label`,
`textures_label`, `medical_mnist_label`), trained only on that set's examples;
the reconstruction of the clean image is trained on all of them.
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'pretrain'
  config.image_size = 256
  config.mixture = ml_collections.ConfigDict()
  # Data sets of the mixture (prepared with `python -m input_pipeline.prepare`).
  config.mixture.datasets = ('dtd', 'textures', 'medical_mnist')
  # Sampling weights: each set's share of the paper's 73,268 images (5,640 /
  # 8,674 / 58,954). Only train splits are read, and DTD's TFDS train split
  # holds 1,880 of its images, so those repeat about 3× as often as the others.
  config.mixture.weights = (5_640.0, 8_674.0, 58_954.0)
  config.batch_size = 64
  config.num_train_steps = 20_000
  config.learning_rate = 1e-3
  # Terms summed with equal weights (the demo's 4 is for its short run).
  config.loss.classification_weight = 1.0
  config.warmup_steps = 1_000
  config.log_every_steps = 200
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 1_000
  return config
