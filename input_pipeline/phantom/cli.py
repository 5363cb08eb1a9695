"""Preview command: python -m input_pipeline.phantom --out DIR [--num N ...].

Writes phantom images, their lung masks, factors.csv and a contact sheet.
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Sequence

import numpy as np
from PIL import Image

from input_pipeline.phantom import factors as factors_lib
from input_pipeline.phantom import render


def contact_sheet(images: np.ndarray, columns: int | None = None,
                  gap: int = 2) -> np.ndarray:
  """Tiles (N, S, S) uint8 images into one grid image (uint8)."""
  count, size = images.shape[0], images.shape[1]
  columns = columns or int(np.ceil(np.sqrt(count)))
  rows = int(np.ceil(count / columns))
  sheet = np.full((rows * (size + gap) - gap, columns * (size + gap) - gap),
                  255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    sheet[r * (size + gap):r * (size + gap) + size,
          c * (size + gap):c * (size + gap) + size] = image
  return sheet


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m input_pipeline.phantom',
      description='Writes phantom chest X-rays, their lung masks, '
                  'factors.csv and a contact sheet sheet.png.')
  parser.add_argument('--out', required=True, help='Output directory.')
  parser.add_argument('--num', type=int, default=16, help='Number of images.')
  parser.add_argument('--size', type=int, default=256,
                      help=f'Image side in pixels ({render.MIN_IMAGE_SIZE}..'
                           f'{render.MAX_IMAGE_SIZE}).')
  parser.add_argument('--seed', type=int, default=0, help='Data set seed.')
  parser.add_argument('--variant', default='chestxray14',
                      choices=factors_lib.VARIANTS)
  parser.add_argument('--confounder_strength', type=float, default=0.0)
  parser.add_argument('--split', default='train', choices=factors_lib.SPLITS)
  args = parser.parse_args(argv)
  if args.num <= 0:
    parser.error(f'--num must be a positive number of images, got {args.num}')
  if not render.MIN_IMAGE_SIZE <= args.size <= render.MAX_IMAGE_SIZE:
    parser.error(f'--size must be in [{render.MIN_IMAGE_SIZE}, '
                 f'{render.MAX_IMAGE_SIZE}] pixels, got {args.size}')
  if not 0.0 <= args.confounder_strength <= 1.0:
    parser.error('--confounder_strength must be in [0, 1], got '
                 f'{args.confounder_strength}')
  try:
    os.makedirs(args.out, exist_ok=True)
    probe = os.path.join(args.out, '.write_test')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as error:
    parser.error(f'--out {args.out!r} is not a writable directory: '
                 f'{error.strerror or error}')
  return args


def main(argv: Sequence[str] | None = None) -> None:
  """Writes the preview that the command line `argv` asks for."""
  args = _parse_args(argv)
  images, masks, factors_list = render.render_examples(
      args.seed, args.split, range(args.num), args.size, args.variant,
      confounder_strength=args.confounder_strength)
  rows = []
  for i, (image, mask, factors) in enumerate(zip(images, masks, factors_list)):
    name = f'{args.split}_{i:05d}'
    Image.fromarray(image).save(os.path.join(args.out, f'{name}.png'))
    Image.fromarray(mask).save(os.path.join(args.out, f'{name}_mask.png'))
    rows.append(factors_lib.factor_row(factors, name))
  with open(os.path.join(args.out, 'factors.csv'), 'w', newline='') as out:
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  Image.fromarray(contact_sheet(images)).save(
      os.path.join(args.out, 'sheet.png'), optimize=True)
  print(f'Wrote {args.num} images of {args.size} px, masks, factors.csv and '
        f'sheet.png to {args.out}')
