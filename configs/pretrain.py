"""Pre-training on textures and medical images (paper Sec. 2.1.6, Fig. 2b).

The paper pre-trains the autoencoder on a mixture of the Describable Textures
Dataset (TFDS `dtd`), the Textures Classification set and Medical MNIST before
ChestX-ray14. Each set keeps its own class head (`dtd_label`,
`textures_label`, `medical_mnist_label`), trained only on that set's examples;
the reconstruction of the clean image is trained on all of them.
"""

import ml_collections

from configs import chestxray14


def get_config():
  # The paper preset's size, optimiser and loop, on the pre-training mixture.
  config = chestxray14.get_config()
  config.dataset = 'pretrain'
  config.mixture = ml_collections.ConfigDict()
  # Data sets of the mixture (prepared with `python -m input_pipeline.prepare`).
  config.mixture.datasets = ('dtd', 'textures', 'medical_mnist')
  # Sampling weights: each set's share of the paper's 73,268 images (5,640 /
  # 8,674 / 58,954). Only train splits are read, and DTD's TFDS train split
  # holds 1,880 of its images, so those repeat about 3× as often as the others.
  config.mixture.weights = (5_640.0, 8_674.0, 58_954.0)
  config.num_train_steps = 20_000
  return config
