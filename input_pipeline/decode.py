"""Decodes users' image files into square grayscale uint8 images, once.

Runs during data preparation (`python -m input_pipeline.prepare`), never at
training time: the prepared TFDS data sets hold PNG-encoded (S, S, 1) uint8
images, and tf.data only decodes those PNGs.

Formats: PNG (8 and 16 bit), JPEG (grayscale or colour), anything else Pillow
reads (BMP, TIFF), and DICOM through pydicom. The file's content decides
between DICOM and Pillow (the `DICM` magic at byte 128, or a .dcm/.dicom
name), not its extension alone.

Intensity policy (`decode_image`; 0 = black, 1 = white, as displayed):
* Images that hold display values, i.e. 8-bit ones (PNG, JPEG, BMP, and DICOM
  with Bits Stored <= 8 and no window), keep them: v / 255 (for DICOM, the
  stored range [0, 2**BitsStored - 1] through the modality LUT). Colour images
  become grayscale with Pillow's ITU-R 601-2 luma,
  L = 0.299 R + 0.587 G + 0.114 B; an alpha channel is dropped.
* DICOM with a VOI LUT or a window (Window Center / Width, index 0) is
  displayed through it, as a viewer does: Rescale Slope / Intercept (or the
  Modality LUT), then the VOI LUT (preferred when both are present) or the
  window (LINEAR, LINEAR_EXACT or SIGMOID), whose output range maps to [0, 1].
* Raw images without a display window (16-bit PNG or TIFF, float TIFF, DICOM
  with Bits Stored > 8 and no window) are min-max windowed: their darkest
  pixel is 0 and their brightest 1 (after Rescale Slope / Intercept for
  DICOM). This is the default window of DICOM viewers, and it treats 12-bit
  data stored in 16 bits like full 16-bit data instead of making it 16 times
  darker.
* MONOCHROME1 DICOM (high values are dark) is inverted after the steps above,
  so that it comes out as the MONOCHROME2 image of the same pixels would
  (255 - x in uint8, exactly). A Presentation LUT Shape is not applied again:
  the standard ties INVERSE to MONOCHROME1.
* An image whose pixels (after windowing) are all equal has no content; it is
  a broken file (`DecodeError`), never stored as a flat image.

Geometry (`load_grayscale`): the image is padded to a square, centred, with
black (0) (an odd margin puts the extra pixel at the bottom / right), then
resized in float32 to S x S with Pillow's Lanczos filter (antialiased when it
shrinks: the kernel widens with the scale), then rounded to uint8. Padding
keeps the aspect ratio and the whole field of view; nothing is cropped.

Broken files raise `DecodeError(path, reason)`: missing, empty, not an image,
truncated PNG / JPEG (Pillow's `LOAD_TRUNCATED_IMAGES` must stay False),
failed PNG checksums, DICOM without pixel data, with invalid element values
or that pydicom cannot decompress, multi-frame files, blank images.
"""

from collections.abc import Iterable, Iterator, Sequence
import functools
import io
import multiprocessing
import os

import numpy as np
from PIL import Image
from PIL import ImageFile
import pydicom
from pydicom.pixels import apply_color_lut
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import apply_voi_lut

# File names (lower-case suffixes) that data-set builders treat as images.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.dcm',
                    '.dicom')
_DICOM_EXTENSIONS = ('.dcm', '.dicom')
_PIXEL_DATA_KEYWORDS = ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')
# What using an invalid DICOM element value raises: a broken file. Other
# exceptions (bugs of this module) still escape.
_INVALID_DICOM_VALUE_ERRORS = (ValueError, TypeError, AttributeError, KeyError,
                               IndexError, NotImplementedError)


class DecodeError(Exception):
  """A file that cannot be turned into an image; it goes to quarantine."""

  def __init__(self, path, reason: str):
    super().__init__(os.fspath(path), reason)
    self.path = os.fspath(path)
    self.reason = reason

  def __str__(self) -> str:
    return f'{self.path}: {self.reason}'


def is_image_file(path) -> bool:
  """Whether a file name has one of the image suffixes builders collect."""
  return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def decode_image(path) -> np.ndarray:
  """Decodes an image file at its original size.

  Args:
    path: a PNG, JPEG, other Pillow-readable or DICOM file.

  Returns:
    A 2-D float32 array in [0, 1] (0 = black), following the intensity policy
    of the module docstring (MONOCHROME1 already inverted).

  Raises:
    DecodeError: the file is missing or broken (see the module docstring).
  """
  image, inverted = _decode(path)
  return 1.0 - image if inverted else image


def load_grayscale(path, image_size: int) -> np.ndarray:
  """Decodes a file into a (image_size, image_size) uint8 grayscale image.

  Decodes as `decode_image`, pads to a centred square with black, resizes
  with Lanczos and rounds to uint8 (see the module docstring).

  Raises:
    DecodeError: the file is missing or broken.
  """
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}')
  image, inverted = _decode(path)
  # A MONOCHROME1 image is padded with its own "black" (1 before inversion)
  # and inverted last, in uint8, so that it is exactly 255 - (the image that
  # the same pixels give as MONOCHROME2).
  square = _pad_to_square(image, fill=1.0 if inverted else 0.0)
  if square.shape[0] != image_size:
    square = np.asarray(
        Image.fromarray(square).resize(
            (image_size, image_size), Image.Resampling.LANCZOS))
  quantized = np.clip(np.rint(square * 255.0), 0, 255).astype(np.uint8)
  return 255 - quantized if inverted else quantized


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a 2-D uint8 image (what tfds.features.Image stores)."""
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f'expected a 2-D uint8 image, got {image.dtype} '
                     f'{image.shape}')
  buffer = io.BytesIO()
  # zlib level 3: on noisy radiographs, 4x faster to write than the default
  # 6 for files about 15% larger; reading them is as fast.
  Image.fromarray(image).save(buffer, format='PNG', compress_level=3)
  return buffer.getvalue()


def prepare_file(path, image_size: int) -> tuple[bytes | None, str | None]:
  """(PNG bytes, None) for a good file, (None, reason) for a broken one.

  The unit of work of `prepare_files`; a module-level function so that
  worker processes can run it.
  """
  try:
    return encode_png(load_grayscale(path, image_size)), None
  except DecodeError as error:
    return None, error.reason


def prepare_files(
    paths: Sequence[str], image_size: int, num_workers: int | None = None
) -> Iterator[tuple[str, bytes | None, str | None]]:
  """Yields (path, PNG bytes or None, reason or None) for `paths`, in order.

  Args:
    paths: image files.
    image_size: side S of the square images.
    num_workers: worker processes; None = one per CPU core; 0 or 1 = decode
      in this process (no start-up cost: small sets and tests).
  """
  if num_workers is None:
    num_workers = (len(os.sched_getaffinity(0))
                   if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)
  work = functools.partial(prepare_file, image_size=image_size)
  if num_workers <= 1 or len(paths) < 2 * num_workers:
    results: Iterable[tuple[bytes | None, str | None]] = map(work, paths)
    for path, (png, reason) in zip(paths, results):
      yield path, png, reason
    return
  # Spawned (not forked) workers: the parent runs TensorFlow's threads, and a
  # fork of a multi-threaded process may deadlock. Workers run only this
  # module's code (they re-import the parent's main module once, as spawned
  # processes do: seconds per split).
  context = multiprocessing.get_context('spawn')
  with context.Pool(num_workers) as pool:
    results = pool.imap(work, paths, chunksize=16)
    for path, (png, reason) in zip(paths, results):
      yield path, png, reason


def _decode(path) -> tuple[np.ndarray, bool]:
  """(float32 image in [0, 1], whether it must be inverted for display)."""
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
        'PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library '
        'in this process): truncated images would be silently completed with '
        'grey. Set it back to False before preparing data.')
  path = os.fspath(path)
  try:
    with open(path, 'rb') as file:
      data = file.read()
  except FileNotFoundError:
    raise DecodeError(path, 'file not found') from None
  except IsADirectoryError:
    raise DecodeError(path, 'is a directory, not a file') from None
  except OSError as error:
    raise DecodeError(path, f'cannot read the file: {error}') from None
  if not data:
    raise DecodeError(path, 'empty file (0 bytes)')
  if data[128:132] == b'DICM' or path.lower().endswith(_DICOM_EXTENSIONS):
    image, inverted = _decode_dicom(path, data)
  else:
    image, inverted = _decode_pillow(path, data), False
  if not np.all(np.isfinite(image)):
    raise DecodeError(path, 'pixel values are not finite (NaN or inf)')
  low, high = float(image.min()), float(image.max())
  if low == high:
    raise DecodeError(
        path, f'blank image: every pixel has the same value ({low:.3f} of 1)')
  return np.clip(image, 0.0, 1.0).astype(np.float32), inverted


def _decode_pillow(path: str, data: bytes) -> np.ndarray:
  """A Pillow-readable file as float32 in [0, 1] (see the module policy)."""
  try:
    # verify() checks PNG chunk checksums and structure; it leaves the image
    # unusable, hence the second open. load() forces the full decode, which
    # is where a truncated file fails.
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      num_frames = getattr(image, 'n_frames', 1)
      if num_frames > 1:
        raise DecodeError(
            path, f'{num_frames} frames ({image.format}); expected one image')
      return _pillow_to_gray(image)
  except DecodeError:
    raise
  except Image.UnidentifiedImageError:
    raise DecodeError(path,
                      'not an image (Pillow cannot identify it)') from None
  except Exception as error:  # pylint: disable=broad-except
    # Pillow reports damaged files with many exception types (OSError,
    # SyntaxError, ValueError, EOFError, zlib.error, struct.error, ...).
    raise DecodeError(path, _damage_reason(error)) from None


def _damage_reason(error: Exception) -> str:
  message = str(error) or type(error).__name__
  if 'truncated' in message.lower() or isinstance(error, EOFError):
    return f'truncated image ({message})'
  return f'damaged image ({type(error).__name__}: {message})'


def _pillow_to_gray(image: Image.Image) -> np.ndarray:
  if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    # More than 8 bits: raw values without a display window.
    return _min_max(np.asarray(image, dtype=np.float64))
  # 8-bit modes (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...): display values.
  gray = image if image.mode == 'L' else image.convert('L')
  return np.asarray(gray, dtype=np.float32) / 255.0


def _min_max(values: np.ndarray) -> np.ndarray:
  low, high = values.min(), values.max()
  if high == low:
    return np.zeros(values.shape, np.float32)  # _decode reports it as blank.
  return ((values - low) / (high - low)).astype(np.float32)


def _decode_dicom(path: str, data: bytes) -> tuple[np.ndarray, bool]:
  """A DICOM file as (float32 in [0, 1], MONOCHROME1)."""
  try:
    dataset = pydicom.dcmread(io.BytesIO(data), force=True)
  except Exception as error:  # pylint: disable=broad-except
    raise DecodeError(path, f'not a readable DICOM file ({error})') from None
  try:
    return _decode_dicom_dataset(path, data, dataset)
  except _INVALID_DICOM_VALUE_ERRORS as error:
    # pydicom parses element values when they are read, and only warns about
    # invalid ones (e.g. Number of Frames '1A'); using them then fails.
    raise DecodeError(path, f'invalid DICOM element value ('
                      f'{type(error).__name__}: {error})') from None


def _decode_dicom_dataset(path: str, data: bytes,
                          dataset) -> tuple[np.ndarray, bool]:
  """`_decode_dicom` once the file has been parsed."""
  if not any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS):
    if data[128:132] != b'DICM':
      raise DecodeError(path, 'not a DICOM file (no DICM preamble, no pixel '
                        'data)')
    raise DecodeError(path, 'DICOM without pixel data')
  num_frames = int(dataset.get('NumberOfFrames', 1) or 1)
  if num_frames > 1:
    raise DecodeError(path, f'multi-frame DICOM ({num_frames} frames); '
                      'expected one image')
  try:
    pixels = dataset.pixel_array
  except Exception as error:  # pylint: disable=broad-except
    syntax = getattr(getattr(dataset, 'file_meta', None),
                     'TransferSyntaxUID', None)
    syntax_name = getattr(syntax, 'name', syntax) or 'unknown transfer syntax'
    raise DecodeError(
        path, f'cannot decode the DICOM pixel data ({syntax_name}): {error}. '
        'Compressed DICOM may need pylibjpeg or python-gdcm.') from None
  photometric = str(dataset.get('PhotometricInterpretation',
                                'MONOCHROME2')).strip().upper()
  if photometric in ('MONOCHROME1', 'MONOCHROME2'):
    if pixels.ndim != 2:
      raise DecodeError(path, f'{photometric} pixel data of shape '
                        f'{pixels.shape}; expected one 2-D image')
    try:
      image = _display_monochrome(pixels, dataset)
    except (ValueError, NotImplementedError, AttributeError,
            TypeError) as error:
      raise DecodeError(
          path, f'invalid DICOM grayscale transform: {error}') from None
    return image, photometric == 'MONOCHROME1'
  # Colour is rare in chest X-rays; it becomes luma. pydicom returns RGB for
  # RGB and YBR_* data; PALETTE COLOR goes through its colour LUT.
  bits = int(dataset.get('BitsStored', 8))
  if photometric == 'PALETTE COLOR' and pixels.ndim == 2:
    pixels = apply_color_lut(pixels, dataset)
    bits = 8 * pixels.dtype.itemsize
  if pixels.ndim == 3 and pixels.shape[-1] == 3:
    luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return (luma / (2**bits - 1)).astype(np.float32), False
  raise DecodeError(path, f'unsupported Photometric Interpretation '
                    f'{photometric!r} with pixel data of shape {pixels.shape}')


def _display_monochrome(pixels: np.ndarray, dataset) -> np.ndarray:
  """Modality LUT, then VOI LUT / window or the module's default scaling."""
  values = apply_modality_lut(pixels, dataset)
  if _has_voi_lut(dataset):
    # A VOI LUT indexes integers; the modality output of a rescale is float.
    if not np.issubdtype(values.dtype, np.integer):
      values = np.rint(values).astype(np.int64)
    displayed = apply_voi_lut(values, dataset, prefer_lut=True)
    low, high = _voi_lut_output_range(dataset)
  elif _has_window(dataset):
    displayed = apply_voi_lut(values, dataset, prefer_lut=True)
    with np.errstate(over='ignore'):
      extremes = apply_voi_lut(np.array([-1e300, 1e300]), dataset)
    low, high = float(extremes.min()), float(extremes.max())
  elif int(dataset.get('BitsStored', 16)) <= 8:
    displayed = values
    low, high = _stored_range_through_modality(dataset)
  else:
    displayed = values.astype(np.float64)
    low, high = float(displayed.min()), float(displayed.max())
  if high == low:
    return np.zeros(pixels.shape, np.float32)  # _decode reports it as blank.
  image = (displayed.astype(np.float64) - low) / (high - low)
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def _has_voi_lut(dataset) -> bool:
  sequence = dataset.get('VOILUTSequence')
  return bool(sequence) and None not in (sequence[0].get('LUTDescriptor'),
                                         sequence[0].get('LUTData'))


def _has_window(dataset) -> bool:
  return None not in (dataset.get('WindowCenter'), dataset.get('WindowWidth'))


def _voi_lut_output_range(dataset) -> tuple[float, float]:
  """The values the VOI LUT can output (its table's range)."""
  num_entries, first_mapped, _ = dataset.VOILUTSequence[0].LUTDescriptor
  inputs = np.arange(first_mapped, first_mapped + (num_entries or 2**16))
  table = apply_voi_lut(inputs, dataset, prefer_lut=True)
  return float(table.min()), float(table.max())


def _stored_range_through_modality(dataset) -> tuple[float, float]:
  """[0, 2**BitsStored - 1] (or its signed range) after the modality LUT."""
  bits = int(dataset.get('BitsStored', 8))
  if int(dataset.get('PixelRepresentation', 0)) == 1:
    stored = np.array([-(2**(bits - 1)), 2**(bits - 1) - 1])
  else:
    stored = np.array([0, 2**bits - 1])
  mapped = apply_modality_lut(stored, dataset)
  return float(mapped.min()), float(mapped.max())


def _pad_to_square(image: np.ndarray, fill: float) -> np.ndarray:
  height, width = image.shape
  side = max(height, width)
  if height == width:
    return image
  square = np.full((side, side), fill, dtype=np.float32)
  top, left = (side - height) // 2, (side - width) // 2
  square[top:top + height, left:left + width] = image
  return square
