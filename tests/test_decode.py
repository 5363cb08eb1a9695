"""Tests of input_pipeline.decode on real files written to tmp_path."""

import io
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageFile
from pydicom import data as pydicom_data
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
import pytest

from input_pipeline import decode

_MONOCHROME2 = '1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm'
_MONOCHROME1 = 'Fake_MONOHR1.dcm'


def _write_dicom(path, pixels: np.ndarray, *, bits_stored: int,
                 photometric: str = 'MONOCHROME2', **tags):
  """A single-frame uncompressed DICOM (Digital X-Ray) with `tags` set."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  dataset = Dataset()
  dataset.file_meta = meta
  dataset.SOPClassUID = meta.MediaStorageSOPClassUID
  dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  dataset.Modality = 'DX'
  dataset.Rows, dataset.Columns = pixels.shape
  dataset.SamplesPerPixel = 1
  dataset.PhotometricInterpretation = photometric
  dataset.BitsAllocated = pixels.dtype.itemsize * 8
  dataset.BitsStored = bits_stored
  dataset.HighBit = bits_stored - 1
  dataset.PixelRepresentation = 0
  for keyword, value in tags.items():
    setattr(dataset, keyword, value)
  if pixels.size:
    dataset.PixelData = pixels.tobytes()
  dataset.save_as(path, enforce_file_format=True)
  return path


def test_png_8bit_keeps_its_values(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (30, 30), np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  np.testing.assert_allclose(decode.decode_image(tmp_path / 'a.png'),
                             pixels / 255.0, atol=1e-6)
  # At its own size nothing is resampled: the exact pixels come back.
  np.testing.assert_array_equal(
      decode.load_grayscale(tmp_path / 'a.png', 30), pixels)


def test_png_16bit_is_min_max_windowed(tmp_path):
  # 12-bit data in a 16-bit PNG: its full range becomes [0, 1].
  pixels = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  assert Image.open(tmp_path / 'a.png').mode.startswith('I')
  image = decode.decode_image(tmp_path / 'a.png')
  np.testing.assert_allclose(image, (pixels - 1000.0) / 2000.0, atol=1e-6)
  gray = decode.load_grayscale(tmp_path / 'a.png', 64)
  assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255


def test_rgb_becomes_itu_r_601_luma(tmp_path):
  colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [90, 180, 30]]],
                     np.uint8)
  Image.fromarray(colours).save(tmp_path / 'rgb.png')
  Image.fromarray(np.dstack([colours, np.full((2, 2), 7, np.uint8)])).save(
      tmp_path / 'rgba.png')
  luma = colours @ np.array([0.299, 0.587, 0.114])
  for name in ('rgb.png', 'rgba.png'):  # Alpha is dropped.
    np.testing.assert_allclose(decode.decode_image(tmp_path / name) * 255,
                               luma, atol=0.51)


def test_jpeg_gray_and_rgb(tmp_path):
  gradient = np.tile(np.linspace(0, 255, 64), (64, 1)).astype(np.uint8)
  Image.fromarray(gradient).save(tmp_path / 'gray.jpg', quality=95)
  Image.fromarray(np.dstack([gradient] * 3)).save(tmp_path / 'rgb.jpg',
                                                  quality=95)
  for name in ('gray.jpg', 'rgb.jpg'):
    image = decode.decode_image(tmp_path / name)
    assert image.shape == (64, 64)
    np.testing.assert_allclose(image * 255, gradient, atol=4)


def test_pads_to_a_centred_black_square(tmp_path):
  wide = np.full((40, 80), 255, np.uint8)
  wide[:, :40] = 128
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  gray = decode.load_grayscale(tmp_path / 'wide.png', 80)
  assert gray.shape == (80, 80)
  np.testing.assert_array_equal(gray[:20], 0)
  np.testing.assert_array_equal(gray[60:], 0)
  np.testing.assert_array_equal(gray[20:60], wide)
  # Odd margin: the extra row is at the bottom.
  odd = np.full((3, 6), 255, np.uint8)
  odd[1] = 100
  Image.fromarray(odd).save(tmp_path / 'odd.png')
  np.testing.assert_array_equal(
      decode.load_grayscale(tmp_path / 'odd.png', 6)[:, 0],
      [0, 255, 100, 255, 0, 0])


def test_downscaling_is_antialiased(tmp_path):
  # A one-pixel checkerboard averages to mid-grey; a filter without
  # antialiasing (nearest, or bilinear without widening) gives 0s and 255s.
  checkerboard = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
  Image.fromarray(checkerboard).save(tmp_path / 'checker.png')
  gray = decode.load_grayscale(tmp_path / 'checker.png', 64)
  assert np.abs(gray[4:-4, 4:-4].astype(int) - 128).max() <= 2


def test_real_dicom_monochrome1_is_the_inverse_of_monochrome2(real_data_dir):
  folder = real_data_dir / 'real_cxr'
  monochrome2 = decode.load_grayscale(folder / _MONOCHROME2, 256)
  monochrome1 = decode.load_grayscale(folder / _MONOCHROME1, 256)
  assert monochrome2.shape == (256, 256) and monochrome2.dtype == np.uint8
  assert monochrome2.std() > 20  # A real radiograph, not a flat image.
  np.testing.assert_array_equal(monochrome1, 255 - monochrome2)
  # At full size too, as floats.
  np.testing.assert_allclose(decode.decode_image(folder / _MONOCHROME1),
                             1.0 - decode.decode_image(folder / _MONOCHROME2),
                             atol=1e-6)


def test_dicom_rescale_then_window(tmp_path):
  stored = np.array([[0, 1000], [1524, 4095]], np.uint16)
  # Modality values: 2 * stored - 1024 = [[-1024, 976], [2024, 7166]].
  path = _write_dicom(tmp_path / 'w.dcm', stored, bits_stored=12,
                      RescaleSlope=2, RescaleIntercept=-1024,
                      WindowCenter=1000, WindowWidth=2001)
  image = decode.decode_image(path)
  # LINEAR window: (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1].
  expected = np.clip((np.array([[-1024, 976], [2024, 7166]]) - 999.5) / 2000
                     + 0.5, 0, 1)
  np.testing.assert_allclose(image, expected, atol=1e-6)
  inverted = _write_dicom(tmp_path / 'w1.dcm', stored, bits_stored=12,
                          photometric='MONOCHROME1', RescaleSlope=2,
                          RescaleIntercept=-1024, WindowCenter=1000,
                          WindowWidth=2001)
  np.testing.assert_allclose(decode.decode_image(inverted), 1 - expected,
                             atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
  item = Dataset()
  # 4 entries, first input 100, 8 bits (US: the ambiguous VRs resolved).
  item.add_new('LUTDescriptor', 'US', [4, 100, 8])
  item.add_new('LUTData', 'US', [0, 50, 200, 250])
  stored = np.array([[50, 101], [102, 4000]], np.uint16)
  path = _write_dicom(tmp_path / 'lut.dcm', stored, bits_stored=12,
                      VOILUTSequence=Sequence([item]))
  # Inputs below 100 take the first entry, above 103 the last; the LUT's
  # output range [0, 250] maps to [0, 1].
  np.testing.assert_allclose(decode.decode_image(path),
                             [[0, 0.2], [0.8, 1.0]], atol=1e-6)


def test_dicom_without_window(tmp_path):
  # More than 8 bits: min-max. The bits above Bits Stored are not pixel
  # data (here set in 2100 | 0xF000) and are masked out.
  path12 = _write_dicom(tmp_path / 'a.dcm',
                        np.array([[100, 600], [1100, 2100 | 0xF000]],
                                 np.uint16),
                        bits_stored=12)
  np.testing.assert_allclose(decode.decode_image(path12),
                             [[0, 0.25], [0.5, 1.0]], atol=1e-6)
  # 8 bits: display values, scaled by the bit depth.
  path8 = _write_dicom(tmp_path / 'b.dcm',
                       np.array([[0, 51], [102, 204]], np.uint8), bits_stored=8)
  np.testing.assert_allclose(decode.decode_image(path8),
                             [[0, 0.2], [0.4, 0.8]], atol=1e-6)


@pytest.mark.parametrize('content, reason', [
    (b'', 'empty file'),
    (b'This is a text file, not an image.\n', 'not an image'),
])
def test_broken_bytes(tmp_path, content, reason):
  (tmp_path / 'broken.png').write_bytes(content)
  with pytest.raises(decode.DecodeError, match=reason) as error:
    decode.load_grayscale(tmp_path / 'broken.png', 32)
  assert error.value.path.endswith('broken.png')


@pytest.mark.parametrize('suffix, keep', [
    ('.png', 0.5), ('.png', 0.97), ('.jpg', 0.5), ('.jpg', 0.995)])
def test_truncated_files(tmp_path, suffix, keep):
  noise = np.random.default_rng(0).integers(0, 256, (128, 128), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noise).save(buffer, format='PNG' if suffix == '.png'
                              else 'JPEG')
  data = buffer.getvalue()
  path = tmp_path / f'cut{suffix}'
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(decode.DecodeError, match='truncated'):
    decode.load_grayscale(path, 32)


def test_png_with_a_bad_checksum(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noise).save(buffer, format='PNG')
  data = bytearray(buffer.getvalue())
  data[data.find(b'IDAT') + 100] ^= 0xFF  # One flipped byte of pixel data.
  (tmp_path / 'flipped.png').write_bytes(bytes(data))
  with pytest.raises(decode.DecodeError, match='checksum'):
    decode.decode_image(tmp_path / 'flipped.png')


def test_missing_file_and_dicom_without_pixels(tmp_path):
  with pytest.raises(decode.DecodeError, match='file not found'):
    decode.decode_image(tmp_path / 'absent.png')
  path = _write_dicom(tmp_path / 'empty.dcm', np.zeros((0, 0), np.uint16),
                      bits_stored=12)
  with pytest.raises(decode.DecodeError, match='DICOM without pixel data'):
    decode.decode_image(path)
  (tmp_path / 'text.dcm').write_text('Not a DICOM file.\n')
  with pytest.raises(decode.DecodeError, match='not a DICOM file'):
    decode.decode_image(tmp_path / 'text.dcm')


def _pydicom_test_files() -> list[str]:
  """The DICOM files of pydicom's own tests, installed with its wheel."""
  # The wheel's folder itself: pydicom_data.get_testdata_files also tries to
  # download pydicom-data's extra files, which needs the network.
  folder = pathlib.Path(pydicom_data.__file__).parent / 'test_files'
  return sorted(str(path) for path in folder.glob('*.dcm'))


@pytest.mark.filterwarnings('ignore::UserWarning')  # pydicom on broken files.
def test_every_pydicom_test_file_decodes_or_is_quarantined():
  paths = _pydicom_test_files()
  assert len(paths) >= 70, 'pydicom installed without its test files'
  # As preparation runs them: no exception may escape for any file.
  results = list(decode.prepare_files(paths, 16, num_workers=0))
  assert [path for path, _, _ in results] == paths
  outcomes = {}
  for path, png, reason in results:
    name = pathlib.Path(path).name
    if png is None:
      assert isinstance(reason, str) and reason, name
      outcomes[name] = reason
    else:
      assert reason is None, name
      assert np.asarray(Image.open(io.BytesIO(png))).shape == (16, 16), name
      outcomes[name] = 'decoded'
  assert list(outcomes.values()).count('decoded') >= 40
  assert outcomes['CT_small.dcm'] == 'decoded'
  assert outcomes['MR_small.dcm'] == 'decoded'
  assert outcomes['badVR.dcm'].startswith('invalid DICOM element value')
  assert outcomes['rtdose.dcm'].startswith('multi-frame DICOM (15 frames)')
  assert outcomes['rtplan.dcm'] == 'DICOM without pixel data'
  assert outcomes['MR_truncated.dcm'].startswith(
      'cannot decode the DICOM pixel data')


def test_blank_image_is_broken_not_black(tmp_path):
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'black.png')
  with pytest.raises(decode.DecodeError, match='blank image'):
    decode.load_grayscale(tmp_path / 'black.png', 16)


def test_refuses_to_run_with_load_truncated_images(tmp_path, monkeypatch):
  Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / 'a.png')
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
  with pytest.raises(RuntimeError, match='LOAD_TRUNCATED_IMAGES'):
    decode.load_grayscale(tmp_path / 'a.png', 8)


def test_prepare_files_in_worker_processes(tmp_path, real_data_dir):
  paths = [str(real_data_dir / 'real_cxr' / '00000001_000.png')]
  rng = np.random.default_rng(1)
  for index in range(6):
    path = tmp_path / f'{index}.png'
    Image.fromarray(rng.integers(0, 256, (20, 30), np.uint8)).save(path)
    paths.append(str(path))
  (tmp_path / '3.png').write_bytes(b'')
  in_process = list(decode.prepare_files(paths, 24, num_workers=0))
  in_workers = list(decode.prepare_files(paths, 24, num_workers=2))
  assert in_workers == in_process
  assert [path for path, _, _ in in_workers] == paths
  assert in_workers[4][1] is None and 'empty' in in_workers[4][2]
  png = in_workers[0][1]
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(png))),
      decode.load_grayscale(paths[0], 24))
