r"""Predictions for image files: probabilities, calls, corrected images.

  python -m pumamednet_jax.predict \
      (--workdir W [--step N] | --weights model.safetensors [--model_config model.json]) \
      --out DIR [--batch 32] [--explain] [--overwrite] PATH...

PATHs are files or folders, searched recursively for image files (the
suffixes of `decode.IMAGE_EXTENSIONS`, and DICOM files without a suffix).
Every file is decoded as data preparation does (`input_pipeline.decode`:
DICOM windows, MONOCHROME1, colour to luma, padding to a square, Lanczos), in
worker processes, and the model runs on batches of them, jitted on the
default device. DIR receives:

  predictions.csv, predictions.json  one row per file: `file`, `error` (why
      the file could not be read; then no prediction), `warning`,
      `prob/<head>` (`prob/labels/<Finding>` for the findings, age in years),
      `call/<Finding>` (1 or 0 at the thresholds of the checkpoint's
      evaluation report, W/report/{test,validation}/report.json), and
      `top_finding`; the JSON also describes every column.
  corrected/<path>.png  the input at the model's size beside its
      reconstruction; <path> is the file's path below the PATH it was found in.
      Not written for a ResNet-18 checkpoint, which does not reconstruct (its
      rows' `corrected` is empty).
  explain/<path>.png  with --explain: latent-shift frames for the top finding
      (a PumaMedNet checkpoint only: they need its latent code and decoder).

The exit status is 2 when any file could not be read, 0 otherwise.
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pydicom
from absl import app
from absl import flags
from absl import logging
from PIL import Image

from input_pipeline import decode
from pumamednet_jax import checkpoints
from pumamednet_jax import latent as latent_lib
from pumamednet_jax import models
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import prediction_table as table
from pumamednet_jax import torch_convert

CORRECTED_DIR, EXPLAIN_DIR = 'corrected', 'explain'
# Splits whose evaluation report gives thresholds, in order of preference.
REPORT_SPLITS = ('test', 'validation')
# Warnings: an image whose longer side is this many times smaller than the
# model's input, or whose sides differ by more than this ratio (chest X-rays
# are 1 to 1.25; padding wider ones leaves the lungs a smaller part).
SMALL_FACTOR = 2.0
ASPECT_LIMIT = 1.5


@dataclasses.dataclass(frozen=True)
class Input:
  """One input file: its path as found, and the unique name of its outputs."""
  file: str
  name: str  # the path below the PATH it was found in


@dataclasses.dataclass(frozen=True)
class Model:
  """What predictions need of a checkpoint."""
  config: models.ModelConfig
  params: dict
  source: str
  thresholds: dict[str, float]  # '<head>/<class>' or '<head>' -> threshold
  thresholds_source: str | None
  policy: platform_lib.Policy  # of the device the model runs on


@dataclasses.dataclass(frozen=True)
class Summary:
  """The rows written and how long it took."""
  rows: list[dict]
  seconds: float  # end to end, from loading the model to the last write
  model_seconds: float  # in the compiled model only

  @property
  def num_failed(self) -> int:
    return sum(1 for row in self.rows if row['error'])

  @property
  def num_predicted(self) -> int:
    return len(self.rows) - self.num_failed

  def line(self) -> str:
    model_rate = (f'{self.num_predicted / self.model_seconds:.1f}'
                  if self.model_seconds else '-')
    return (f'predict: {len(self.rows)} files, {self.num_predicted} predicted, '
            f'{self.num_failed} failed (reasons in the error column); '
            f'{len(self.rows) / self.seconds:.1f} files/s end to end, '
            f'{model_rate} images/s in the model')


# --- Inputs and outputs -----------------------------------------------------


def find_inputs(paths, exclude: str | None = None) -> list[Input]:
  """The files of `paths` (folders searched recursively), each once, with
  unique output names; files under `exclude` (the output folder) are skipped."""
  inputs, seen, used = [], set(), set()
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      found = [(file, os.path.relpath(file, path))
               for file in _folder_files(path, exclude)]
    else:
      found = [(path, os.path.basename(path))]
    for file, name in found:
      if os.path.abspath(file) in seen:
        continue
      seen.add(os.path.abspath(file))
      inputs.append(Input(file, _unique(name, used)))
  return inputs


def _folder_files(folder: str, exclude: str | None):
  excluded = os.path.abspath(exclude) if exclude else None
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.') and
                     os.path.abspath(os.path.join(root, d)) != excluded)
    for name in sorted(files):
      file = os.path.join(root, name)
      if not name.startswith('.') and (decode.is_image_file(name) or (
          '.' not in name and _has_dicom_magic(file))):
        yield file


def _has_dicom_magic(path: str) -> bool:
  try:
    with open(path, 'rb') as file:
      return file.read(132)[128:] == b'DICM'
  except OSError:
    return False


def _unique(name: str, used: set[str]) -> str:
  """`name`, or `name~2`, `name~3`, ... when another input has it."""
  unique, number = name, 1
  while unique.lower() in used:
    number += 1
    unique = f'{name}~{number}'
  used.add(unique.lower())
  return unique


def check_output_dir(out: str, overwrite: bool) -> None:
  """Refuses a folder with results unless `overwrite` (then removes them)."""
  results = [os.path.join(out, name) for name in
             (table.CSV_NAME, table.JSON_NAME, CORRECTED_DIR, EXPLAIN_DIR)
             if os.path.lexists(os.path.join(out, name))]
  if results and not overwrite:
    raise FileExistsError(f'{out} already holds results ({", ".join(results)})'
                          '; choose another --out or pass --overwrite')
  for path in results:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  os.makedirs(out, exist_ok=True)


def source_warning(path: str, image_size: int) -> str:
  """Why the decoded image may be a poor input (from the file's header)."""
  size = _source_size(path)
  if size is None:
    return ''
  height, width = size
  warnings = []
  if image_size / max(height, width) > SMALL_FACTOR:
    warnings.append(f'{width}x{height} px is far smaller than the model\'s '
                    f'{image_size} px (upscaled '
                    f'{image_size / max(height, width):.1f}x)')
  if max(height, width) / max(min(height, width), 1) > ASPECT_LIMIT:
    warnings.append(f'{width}x{height} px is strongly non-square (padded with '
                    'black to a square)')
  return '; '.join(warnings)


def _source_size(path: str) -> tuple[int, int] | None:
  """(height, width) from the header of a file that decoded."""
  try:
    with open(path, 'rb') as file:
      head = file.read(132)
    if head[128:] == b'DICM' or path.lower().endswith(('.dcm', '.dicom')):
      dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
      return int(dataset.Rows), int(dataset.Columns)
    with Image.open(path) as image:
      return image.height, image.width
  except Exception:  # pylint: disable=broad-except
    return None  # The size only informs a warning; the image decoded.


def decoded(inputs: list[Input], image_size: int, num_workers: int | None):
  """Yields (input, (S, S) uint8 image or None, error reason or '')."""
  files = [item.file for item in inputs]
  results = decode.prepare_files(files, image_size, num_workers)
  for item, (_, png, reason) in zip(inputs, results):
    if png is None:
      yield item, None, reason
    else:
      yield item, np.asarray(Image.open(io.BytesIO(png))), ''


# --- The model --------------------------------------------------------------


def load_model(*, workdir: str | None = None, step: int | None = None,
               weights: str | None = None, model_config: str | None = None,
               report: str | None = None) -> Model:
  """A checkpoint (`workdir`, `step`) or exported weights (`weights`), with
  the thresholds of `report` or else of the workdir's evaluation report."""
  if (workdir is None) == (weights is None):
    raise ValueError('give either --workdir or --weights')
  if weights is not None:
    if step is not None:
      raise ValueError('--step goes with --workdir, not --weights')
    config, params = torch_convert.load_safetensors(weights, model_config)
    source = weights
  else:
    if model_config is not None:
      raise ValueError('--model_config goes with --weights, not --workdir')
    config, params = checkpoints.load_params(workdir, step)
    source = checkpoints.checkpoint_dir(workdir)
  if report is None and workdir is not None:
    report = next((path for path in (
        os.path.join(workdir, 'report', split, 'report.json')
        for split in REPORT_SPLITS) if os.path.exists(path)), None)
  thresholds = table.load_thresholds(report) if report else {}
  policy = platform_lib.for_devices(jax.local_devices()[:1])
  config = dataclasses.replace(config, conv_impl=policy.conv_impl)
  return Model(config, jax.device_put(params), source, thresholds, report,
               policy)


def _jit(fn, policy: platform_lib.Policy):
  """jax.jit with the platform's compiler options (as the train and eval
  steps); the model functions chunk their batch on the CPU themselves."""
  return jax.jit(fn, compiler_options=policy.compiler_options or None)


def model_outputs(params: dict, images: jax.Array, *,
                  model_config: models.ModelConfig,
                  policy: platform_lib.Policy):
  """(B, S, S) reconstructions (None for a model without a decoder) and
  {head: scores} of (B, S, S) uint8 images, computed as the eval step does
  (z = mu; chunks on the CPU)."""
  model = models.bind(model_config, params)
  inputs = images[..., None].astype(jnp.float32) / 255.0
  reconstruction, head_outputs, _ = models.in_chunks(
      lambda x: model(x, train=False), inputs,
      policy.inference_chunk(inputs.shape))
  scores = {head.name: models.head_scores(head, head_outputs[head.name])
            for head in model_config.heads}
  if reconstruction is None:
    return None, scores
  return reconstruction[..., 0], scores


def _compile(model: Model, batch_size: int, explain: bool):
  """The compiled predict function (and the explain function, or None)."""
  size = model.config.image_size
  predict_fn = _jit(functools.partial(
      model_outputs, model_config=model.config, policy=model.policy),
                    model.policy).lower(
          model.params, jax.ShapeDtypeStruct((batch_size, size, size),
                                             jnp.uint8)).compile()
  finding_head = table.finding_head(model.config.heads)
  if not explain or finding_head is None:
    return predict_fn, None
  explain_fn = _jit(functools.partial(
      latent_lib.latent_shift, model_config=model.config, head=finding_head,
      policy=model.policy), model.policy)
  return predict_fn, explain_fn


# --- The run ----------------------------------------------------------------


def predict(paths, out: str, *, workdir: str | None = None,
            step: int | None = None, weights: str | None = None,
            model_config: str | None = None, report: str | None = None,
            batch_size: int = 32, explain: bool = False,
            overwrite: bool = False, num_workers: int | None = None) -> Summary:
  """Predicts every image file of `paths` and writes the results to `out`.

  Args:
    paths: files and folders (searched recursively).
    out: the output folder (see the module docstring).
    workdir, step: a training run's checkpoint (default: the latest step).
    weights, model_config: or exported safetensors weights and their JSON.
    report: an evaluation report whose thresholds give the calls (default:
      the workdir's, test split first).
    batch_size: images per model call.
    explain: also write latent-shift explanations of the top finding.
    overwrite: replace the results that `out` already holds.
    num_workers: decoding processes (None: one per CPU core; 0: none).

  Returns:
    The rows written and the timings.
  """
  start = time.perf_counter()
  if batch_size < 1:
    raise ValueError(f'--batch must be positive, got {batch_size}')
  inputs = find_inputs(paths, exclude=out)
  if not inputs:
    raise ValueError(f'no image files in {", ".join(map(str, paths))}')
  model = load_model(workdir=workdir, step=step, weights=weights,
                     model_config=model_config, report=report)
  if explain:
    models.require_pumamednet(
        model.config, workdir or weights, '--explain needs a latent code and '
        'a decoder (a PumaMedNet checkpoint)')
  reconstructs = models.has_decoder(model.config)
  if not reconstructs:
    logging.warning('predict: the model (%s) does not reconstruct its input; '
                    'no %s/ images', model.config.arch, CORRECTED_DIR)
  check_output_dir(out, overwrite)  # After loading: a bad model keeps them.
  batch_size = min(batch_size, len(inputs))
  size = model.config.image_size
  rows: dict[Input, dict] = {}
  model_seconds = 0.0
  with concurrent.futures.ThreadPoolExecutor(1) as executor:
    # Compiling overlaps the start of the decoding workers.
    compiled = executor.submit(_compile, model, batch_size, explain)
    pending = []

    def run_batch():
      nonlocal model_seconds
      predict_fn, explain_fn = compiled.result()
      images = np.zeros((batch_size, size, size), np.uint8)
      images[:len(pending)] = [image for _, image, _ in pending]
      begin = time.perf_counter()
      reconstructions, scores = jax.device_get(predict_fn(model.params, images))
      model_seconds += time.perf_counter() - begin
      for i, (item, image, warning) in enumerate(pending):
        mine = {name: values[i] for name, values in scores.items()}
        reconstruction = None if reconstructions is None else reconstructions[i]
        rows[item] = _write_outputs(out, item, image, reconstruction, mine,
                                    warning, model, explain_fn)
      pending.clear()

    for item, image, reason in decoded(inputs, size, num_workers):
      if image is None:
        rows[item] = {'file': item.file, 'error': reason, 'warning': ''}
        continue
      pending.append((item, image, source_warning(item.file, size)))
      if len(pending) == batch_size:
        run_batch()
    if pending:
      run_batch()
    compiled.result()  # Raises a compile error even when nothing decoded.
  ordered = [rows[item] for item in inputs]
  outputs = {'corrected': (
      f'input | reconstruction, under {CORRECTED_DIR}/' if reconstructs
      else f'empty: the model ({model.config.arch}) does not reconstruct its '
      'input')}
  if explain:
    outputs['explanation'] = (
        f'latent-shift frames of the top finding, under {EXPLAIN_DIR}/')
  table.write_tables(
      out, ordered, table.column_descriptions(
          model.config.heads, model.thresholds, model.thresholds_source,
          outputs),
      {'model': {'source': model.source, 'arch': model.config.arch,
                 'image_size': model.config.image_size,
                 'heads': [head.to_json() for head in model.config.heads]},
       'thresholds': model.thresholds_source})
  return Summary(ordered, time.perf_counter() - start, model_seconds)


def _write_outputs(out: str, item: Input, image: np.ndarray,
                   reconstruction: np.ndarray | None,
                   scores: dict[str, np.ndarray], warning: str, model: Model,
                   explain_fn) -> dict:
  """One image's row; writes its corrected image where the model
  reconstructs (and its explanation)."""
  if not all(np.all(np.isfinite(values)) for values in scores.values()):
    return {'file': item.file, 'warning': warning,
            'error': 'the model\'s output is not finite (NaN or inf)'}
  row = {'file': item.file, 'error': '', 'warning': warning}
  row.update(table.prediction_row(model.config.heads, model.thresholds,
                                  scores))
  if reconstruction is not None:
    corrected = np.clip(np.rint(reconstruction * 255.0), 0,
                        255).astype(np.uint8)
    row['corrected'] = _write_png(
        out, CORRECTED_DIR, item.name,
        np.concatenate([image, corrected], axis=1))
  if explain_fn is not None:
    head = table.finding_head(model.config.heads)
    index = head.names.index(row['top_finding'])
    frames, probabilities, probability = jax.device_get(explain_fn(
        model.params, image.astype(np.float32) / 255.0, np.int32(index)))
    path = os.path.join(out, EXPLAIN_DIR, item.name + '.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    latent_lib.write_strip(path, image / 255.0, frames, probabilities,
                            float(probability), row['top_finding'])
    row['explanation'] = os.path.relpath(path, out)
  return row


def _write_png(out: str, folder: str, name: str, image: np.ndarray) -> str:
  path = os.path.join(out, folder, name + '.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as file:
    file.write(decode.encode_png(image))
  return os.path.relpath(path, out)


# --- Command line -----------------------------------------------------------

def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string('workdir', None,
                      'Training directory whose checkpoint predicts.')
  flags.DEFINE_integer('step', None,
                       'Checkpoint step (default: the latest).')
  flags.DEFINE_string(
      'weights', None, 'Exported weights (model.safetensors), instead of '
      '--workdir.')
  flags.DEFINE_string(
      'model_config', None, 'Architecture JSON of --weights (default: beside '
      'them, model.json).')
  flags.DEFINE_string(
      'report', None, 'Evaluation report.json whose thresholds give the calls '
      '(default: W/report/test/report.json, else validation).')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_integer('batch', 32, 'Images per model call.')
  flags.DEFINE_bool(
      'explain', False, 'Also write latent-shift explanations of the top '
      'finding (PumaMedNet checkpoints only).')
  flags.DEFINE_bool(
      'overwrite', False, 'Replace the results that --out already holds.')
  flags.DEFINE_integer(
      'workers', None, 'Decoding processes (default: one per CPU core; 0: '
      'decode in this process).')
  flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give the image files or folders to predict')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step.
  try:
    summary = predict(
        argv[1:], flags.FLAGS.out, workdir=flags.FLAGS.workdir, step=flags.FLAGS.step,
        weights=flags.FLAGS.weights, model_config=flags.FLAGS.model_config,
        report=flags.FLAGS.report, batch_size=flags.FLAGS.batch,
        explain=flags.FLAGS.explain, overwrite=flags.FLAGS.overwrite,
        num_workers=flags.FLAGS.workers)
  except (ValueError, FileNotFoundError, FileExistsError) as error:
    print(f'predict: {error}', file=sys.stderr)
    return 1
  print(summary.line())
  return 2 if summary.num_failed else 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
