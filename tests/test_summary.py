"""The summary command, and the paper preset's parameter count."""

import subprocess
import sys

from configs import chestxray14
from configs import default
from e2e_support import REPO_ROOT, shrink
from input_pipeline import pipeline
from pumamednet_jax import models
from pumamednet_jax import summary

PAPER_PARAMS = 1_405_753  # PumaMedNet-CXR, paper Sec. 2.1.3


def test_paper_preset_has_the_papers_parameter_count():
  config = chestxray14.get_config()
  heads = pipeline.head_specs(pipeline.get_sources(config))  # no data needed
  count = models.count_params_tree(
      models.abstract_params(models.model_config(config, heads, 'xla')))
  assert abs(count - PAPER_PARAMS) / PAPER_PARAMS < 0.01
  assert count == 1_405_916


def test_summary_prints_the_table_flops_and_total_params_last():
  result = subprocess.run(
      [sys.executable, '-m', 'pumamednet_jax.summary',
       '--config=configs/default.py'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == 'total_params: 972476'
  assert any('encoder/convs/0/kernel' in line and '(4, 4, 1, 32)' in line
             for line in lines)
  flops = {line.split(':')[0]: float(line.split(':')[1])
           for line in lines if 'FLOPs per image' in line}
  assert 1e7 < flops['forward FLOPs per image'] < flops[
      'train-step FLOPs per image'] < 1e9


def test_train_flops_count_every_micro_batch():
  config = shrink(default.get_config())
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  model_config = models.model_config(config, heads, 'fast')
  whole = summary.train_flops_per_image(config, model_config, 8)
  config.micro_batch_size = 2  # a loop of four micro-batches
  assert summary.train_flops_per_image(config, model_config, 8) == whole > 0


def test_flops_count_every_convolution():
  # Each of the encoder's stride-2 convs, and its mirror ConvTranspose in the
  # decoder, does k²·Cin·Cout multiply-adds per output (input) pixel of the
  # smaller side. XLA leaves out the taps that fall on padding (0.3% here,
  # 11% for the default widths at 64 px), but a count that left convolutions
  # out (XLA's GPU cost analysis does so for cuDNN's, hence the count on the
  # CPU) would fall far short.
  config = shrink(default.get_config())
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  model_config = models.model_config(config, heads, 'fast')
  channels = (1, *config.model.channels)
  multiply_adds = sum(
      models.KERNEL_SIZE**2 * c_in * c_out * (config.image_size // 2**(i + 1))**2
      for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])))
  convolution_flops = 2 * 2 * multiply_adds  # encoder and decoder, 2 per MAC
  counted = summary.forward_flops_per_image(model_config, 8)
  assert 0.8 * convolution_flops < counted < 1.25 * convolution_flops
