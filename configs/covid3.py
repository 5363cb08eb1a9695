"""Fine-tuning on COVID-19 / Pneumonia / Normal (paper Sec. 2.1.6, Table 2).

The last link of pre-training → ChestX-ray14 → covid3 (docs/transfer.md):
  python main.py --config=configs/covid3.py --workdir=DIR \
      --config.data_dir=OUT --config.init_from=CHESTXRAY14_WORKDIR
The encoder and decoder come from the ChestX-ray14 (or pre-training) run;
the 3-class softmax head `label` starts fresh.
"""

from configs import chestxray14


def get_config():
  # The paper preset's size and model, so a ChestX-ray14 run transfers.
  config = chestxray14.get_config()
  config.dataset = 'covid3'
  # One multi-class head (COVID-19, Pneumonia, Normal): softmax cross-entropy.
  config.head_features = ('label',)
  # The run to start from: WORKDIR[:STEP] of a ChestX-ray14 or pre-training
  # run (set it on the command line; '' trains from scratch).
  config.init_from = ''
  # ~15k training images: about 20 epochs at batch 64.
  config.num_train_steps = 5_000
  # Fine-tuning: a lower peak rate than from scratch, a short warm-up.
  config.learning_rate = 3e-4
  config.warmup_steps = 200
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
