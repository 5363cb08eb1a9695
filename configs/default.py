"""Default config: the phantom chest X-ray set at 64×64, a CPU demo.

Sized so that `make demo` trains a useful model in under 10 minutes on a
2-core CPU. Variants (`chestxray14.py`, ...) import this file and override it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Data ---------------------------------------------------------------
  # TFDS name of the data set: cxr_phantom | chestxray14 | covid3 | pretrain.
  config.dataset = 'cxr_phantom'
  # TFDS data directory of prepared data ('' = TFDS's ~/tensorflow_datasets).
  config.data_dir = ''
  # Side of the square grayscale images the model sees (a multiple of 64).
  config.image_size = 64
  # Dataset features that get a classifier head (in this order); () = all the
  # data set has among: labels, view, sex, age (+ age_above_median), label.
  config.head_features = ()
  # Real sets: share of train carved out as validation (None = the set's
  # default, ChestX-ray14 10% of its train_val patients), as prepared.
  config.validation_fraction = ml_collections.config_dict.placeholder(float)
  # Folder sets without a test folder: share carved out as test (None = default).
  config.test_fraction = ml_collections.config_dict.placeholder(float)
  # Seed of those carvings (by patient for ChestX-ray14), as prepared.
  config.split_seed = 0
  # Split used for evaluation during training.
  config.eval_split = 'validation'
  # Examples evaluated at each evaluation (0 = the whole split).
  config.num_eval_examples = 0
  # Shuffle buffer of the training stream (examples).
  config.shuffle_buffer = 4096

  # Phantom data set (used when dataset == 'cxr_phantom').
  config.phantom = ml_collections.ConfigDict()
  # Renderer variant: 'chestxray14' (15 findings) or 'covid3' (3 classes).
  config.phantom.variant = 'chestxray14'
  # Number of train / validation / test images rendered.
  config.phantom.num_train = 20_000
  config.phantom.num_validation = 2_000
  config.phantom.num_test = 2_000
  # Seed of the renderer (different seeds give different data sets).
  config.phantom.seed = 0
  # Confounder strength in [0, 1]: how strongly a support device follows a finding.
  config.phantom.confounder_strength = 0.0

  # --- Model --------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  # Widths of the six stride-2 encoder convs; the decoder mirrors them.
  config.model.channels = (32, 48, 64, 96, 96, 96)
  # Size of the latent space (the paper: 100 variables).
  config.model.latent_dim = 100
  # Width of the classifier's hidden dense layer.
  config.model.classifier_hidden = 64
  # Negative slope of every LeakyReLU (the paper: 0.15).
  config.model.leaky_relu_slope = 0.15
  # Compute dtype: float32, or bfloat16 on GPU/TPU (parameters stay float32).
  config.model.dtype = 'float32'
  # Conv formulation: 'auto' ('fast' on CPU, 'xla' on GPU/TPU), 'xla', 'fast'
  # or 'cudnn' (transposed convs in the patterns XLA:GPU hands to cuDNN).
  config.model.conv_impl = 'auto'
  # Architecture: 'pumamednet' (the β-VAE) or 'resnet18' (torchvision's
  # ResNet-18 with a 1-channel stem and the data set's heads, trained with the
  # classification losses only; the widths above do not apply to it).
  config.model.arch = 'pumamednet'
  # resnet18 only: a torchvision ResNet-18 state dict (.safetensors) to start
  # from ('' = fresh); its stem is summed to one channel, `fc` left out.
  config.model.torchvision_weights = ''

  # --- Losses -------------------------------------------------------------
  config.loss = ml_collections.ConfigDict()
  # Weight of 1 - SSIM (lung-weighted SSIM map) in the total loss.
  config.loss.ssim_weight = 1.0
  # Weight of the lung-weighted mean absolute reconstruction error.
  config.loss.recon_weight = 1.0
  # Weight inside the lungs of the lung weight map (1 outside the lungs).
  config.loss.lung_weight = 4.0
  # β of the β-VAE KL term (sum over latents, mean over the batch, per pixel).
  config.loss.beta = 1.0
  # Steps over which β ramps linearly from 0 to its value (0 = no warm-up).
  config.loss.beta_warmup_steps = 0
  # Capacity objective (Burgess et al. 2018): γ of γ·|KL − C| (per pixel, as
  # β), which then replaces β·KL (0 = off).
  config.loss.capacity_gamma = 0.0
  # The capacity C_max in nats (KL summed over latents, mean over examples).
  config.loss.capacity_max = 25.0
  # Steps over which C rises linearly from 0 to capacity_max (0 = at once).
  config.loss.capacity_steps = 2_000
  # Extra weight on the total correlation of z (β-TCVAE, Chen et al. 2018:
  # β_TC = β + tc_weight), estimated per micro-batch (0 = off).
  config.loss.tc_weight = 0.0
  # Weight of the classification losses (BCE / cross-entropy): 4 favours the
  # findings in the short CPU demo (the paper preset sums the terms with 1).
  config.loss.classification_weight = 4.0
  # Weight of the age regression loss (squared error on age / 100).
  config.loss.age_weight = 1.0
  # SSIM window: Gaussian filter size and sigma (dm-pix defaults are 11 / 1.5).
  config.loss.ssim_filter_size = 7
  config.loss.ssim_filter_sigma = 1.5
  # How the SSIM filter is computed: 'banded' (matmuls; fastest on the CPU) or
  # 'separable' (two 1-D convolutions as shifted sums; for GPUs/TPUs).
  config.loss.ssim_filter = 'banded'

  # --- Defects applied on the device to the model's input ----------------
  config.defects = ml_collections.ConfigDict()
  # Probability of a random rotation, and its maximum angle in degrees.
  config.defects.rotate_prob = 0.5
  config.defects.max_rotation_degrees = 15.0
  # Probability of a horizontal flip.
  config.defects.flip_prob = 0.5
  # Probability of a Gaussian blur, and its sigma range in pixels at 64 px
  # (scaled with image_size).
  config.defects.blur_prob = 0.3
  config.defects.blur_sigma_min = 0.5
  config.defects.blur_sigma_max = 1.5
  # Probability of histogram equalization.
  config.defects.equalize_prob = 0.2
  # How equalize counts grey levels: 'scatter' (bincount; fastest on the CPU)
  # or 'compare' (compare-and-sum against the 256 levels; for GPUs/TPUs).
  config.defects.equalize_impl = 'scatter'
  # Probability of autocontrast.
  config.defects.autocontrast_prob = 0.2

  # --- Transfer learning -------------------------------------------------
  # Start a new run from another run's checkpoint, 'WORKDIR' (its latest
  # step) or 'WORKDIR:STEP': its encoder and decoder (same shapes required)
  # and each head of the same name and size; the other heads start fresh.
  # Used only when this run's workdir has no checkpoint yet ('' = off).
  config.init_from = ''
  # Parts left as they are during training: 'none', 'encoder' or
  # 'encoder_decoder' (no updates, no optimizer state).
  config.freeze = 'none'

  # --- Optimisation -------------------------------------------------------
  # Global batch size (split over all devices of all hosts).
  config.batch_size = 32
  # Number of training steps (6–8 minutes of `make demo` on a 2-core CPU at 64 px).
  config.num_train_steps = 3_000
  # Peak learning rate of Adam.
  config.learning_rate = 3e-3
  # Linear warm-up steps before cosine decay to 0.
  config.warmup_steps = 200
  # Examples per device in one forward and backward pass (it must divide the
  # batch per device); the step's gradient is the whole batch's either way.
  # 0 = automatic: on the CPU micro-batches of ≤ 16 images and ≤ 2·256² pixels
  # (faster), on GPU/TPU the whole batch.
  config.micro_batch_size = 0
  # Global-norm gradient clipping (0 = off).
  config.grad_clip_norm = 1.0
  # Seed of parameter init, data order, defects and sampling.
  config.seed = 0

  # --- Loop ---------------------------------------------------------------
  # Steps between training-metric logs.
  config.log_every_steps = 100
  # Steps between evaluations (and best-checkpoint decisions).
  config.eval_every_steps = 1_500
  # Steps between checkpoints.
  config.checkpoint_every_steps = 500
  # Checkpoints kept (besides the best by validation mean AUC).
  config.keep_checkpoints = 3
  # Stop with an error after this many consecutive non-finite steps.
  config.max_consecutive_nonfinite = 5
  # Images per evaluation grid (defective input | reconstruction | clean).
  config.num_grid_images = 8

  return config
