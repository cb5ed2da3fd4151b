"""Domains of labelled images, and the grain pipelines that feed them.

Two sources give the same thing, `Domains.splits[domain][split]`, a list of
records, each a dict with a `"label"` and either

- `{"pixels", "domain", "seed"}`: one of scikit-learn's 8x8 digits, rendered
  in a domain (clean, noisy, blurred, inverted, rotated, coloured) when it is
  read (`digits_domains`). The same digits appear in every domain, so a split
  by digit splits all domains at once; or
- `{"path"}`: an image file of a DomainNet-style folder,
  `DIR/<domain>/<class>/<image>` (`folder_domains`), decoded and resized on
  the host with PIL when it is read.

The grain pipelines shuffle records, batch them, and decode a batch at a
time: `{"image": (n, s, s, 3) uint8, "label": (n,) int32}`.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

Record = dict[str, Any]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


class DataError(ValueError):
  """Data that cannot be used; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Domains:
  """Labelled images in several domains, split by example.

  Attributes:
    class_names: the label names, index = label.
    splits: `{domain: {split: [record, ...]}}` with splits "pretrain" (may be
      empty), "finetune" and "test".
  """

  class_names: tuple[str, ...]
  splits: dict[str, dict[str, list[Record]]]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.splits)


def split_indices(n: int, fractions: Sequence[float], seed: int):
  """A seeded permutation of `range(n)`, cut by the `fractions` of its parts."""
  order = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions])
  return np.split(order, cuts)


# scikit-learn digits in several domains, rendered a batch at a time.

@functools.cache
def _resize_matrix(size_out: int, size_in: int) -> np.ndarray:
  """Bilinear resampling of one axis as a matrix `(size_out, size_in)`."""
  x = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5,
              0, size_in - 1)
  low = np.floor(x).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), low), high - x + (low == high))
  np.add.at(matrix, (np.arange(size_out), high), x - low)
  return matrix / matrix.sum(1, keepdims=True)


@functools.cache
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
  """A Gaussian blur of one axis as a matrix (renormalised at the borders)."""
  offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
  matrix = np.exp(-0.5 * (offsets / sigma) ** 2)
  return matrix / matrix.sum(1, keepdims=True)


def _gray(x, rngs):
  del rngs
  return np.repeat(x[..., None], 3, axis=-1)


def _noise(x, rngs):
  noise = np.stack([rng.normal(0.0, 0.35, x.shape[1:]) for rng in rngs])
  return _gray(np.clip(x + noise, 0, 1), rngs)


def _blur(x, rngs):
  blur = _blur_matrix(x.shape[-1], x.shape[-1] / 12)
  return _gray(np.einsum('ij,njk,lk->nil', blur, x, blur), rngs)


def _invert(x, rngs):
  return _gray(1.0 - x, rngs)


def _rotate(x, rngs):
  """Rotations by 60 to 120 degrees either way, bilinear, zero outside."""
  n, size = x.shape[0], x.shape[-1]
  angles = np.radians([rng.uniform(60, 120) * rng.choice([-1, 1])
                       for rng in rngs])
  grid = np.arange(size) - (size - 1) / 2
  cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
  rows = cos * grid[:, None] - sin * grid[None, :] + (size - 1) / 2
  cols = sin * grid[:, None] + cos * grid[None, :] + (size - 1) / 2
  row0, col0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
  out = np.zeros_like(x)
  batch = np.arange(n)[:, None, None]
  for dr in (0, 1):
    for dc in (0, 1):
      r, c = row0 + dr, col0 + dc
      weight = (1 - np.abs(rows - r)) * (1 - np.abs(cols - c))
      inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
      out += np.where(inside, weight * x[batch, np.clip(r, 0, size - 1),
                                         np.clip(c, 0, size - 1)], 0)
  return _gray(out, rngs)


def _color(x, rngs):
  """A random foreground and background colour, far enough apart."""
  colors = []
  for rng in rngs:
    foreground, background = rng.uniform(0, 1, (2, 3))
    while np.abs(foreground - background).sum() < 0.9:
      foreground, background = rng.uniform(0, 1, (2, 3))
    colors.append((foreground, background))
  foreground, background = (np.asarray(c)[:, None, None, :]
                            for c in zip(*colors))
  return x[..., None] * foreground + (1 - x[..., None]) * background


DIGIT_DOMAINS = {
    'clean': _gray,
    'noise': _noise,
    'blur': _blur,
    'invert': _invert,
    'rotate': _rotate,
    'color': _color,
}


def render_digits(pixels: np.ndarray, domains: Sequence[str], image_size: int,
                  seeds: Sequence[int]) -> np.ndarray:
  """8x8 digits (values 0..16) as `image_size` RGB images of their domains.

  Each image's randomness (noise, angle, colours) comes from its own seed:
  the same digit, domain and seed always give the same image.

  Args:
    pixels: `(n, 8, 8)` digits.
    domains: `n` names from `DIGIT_DOMAINS`.
    image_size: the side of the images.
    seeds: `n` seeds.

  Returns:
    `(n, image_size, image_size, 3)` uint8 images.
  """
  resize = _resize_matrix(image_size, pixels.shape[-1])
  x = np.clip(np.einsum('ij,njk,lk->nil', resize, pixels / 16.0, resize), 0, 1)
  domains = np.asarray(domains)
  rngs = [np.random.default_rng(int(seed)) for seed in seeds]
  images = np.zeros(x.shape + (3,))
  for domain, render in DIGIT_DOMAINS.items():
    rows = np.flatnonzero(domains == domain)
    if rows.size:
      images[rows] = render(x[rows], [rngs[i] for i in rows])
  return np.uint8(np.clip(images, 0, 1) * 255 + 0.5)


def digits_domains(domains: Sequence[str] = tuple(DIGIT_DOMAINS),
                   fractions=(0.5, 0.2), seed: int = 0) -> Domains:
  """scikit-learn's digits in `domains`, split by digit.

  Args:
    domains: names from `DIGIT_DOMAINS`.
    fractions: the shares of digits for "pretrain" and "finetune"; the rest
      is "test". Every domain uses the same digits in each split.
    seed: the split's and the renderings' seed.

  Returns:
    The `Domains`; each record renders the same image every time it is read
    (`train_batches(..., augment=True)` draws new renderings).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  unknown = [d for d in domains if d not in DIGIT_DOMAINS]
  if unknown:
    raise DataError(f'unknown digits domain {unknown[0]!r}; '
                    f'known: {", ".join(DIGIT_DOMAINS)}.')
  parts = split_indices(len(digits.target), fractions, seed)
  splits = {}
  for d, domain in enumerate(domains):
    splits[domain] = {
        name: [{'pixels': digits.images[i], 'domain': domain,
                'seed': (seed * 7919 + d) * 100003 + int(i),
                'label': int(digits.target[i])} for i in part]
        for name, part in zip(('pretrain', 'finetune', 'test'), parts)}
  return Domains(tuple(str(c) for c in digits.target_names), splits)


# DomainNet-style folders.

def _listdir(path: str) -> list[str]:
  return sorted(n for n in os.listdir(path) if not n.startswith('.'))


def folder_domains(data_dir: str, fractions=(0.0, 0.7),
                   seed: int = 0) -> Domains:
  """Images in `data_dir/<domain>/<class>/<file>`, split per domain.

  Every domain must have the same class folders (a class may be empty in
  some domain, but not absent) and at least one image.

  Args:
    data_dir: the folder of domains.
    fractions: the shares of each domain's images for "pretrain" and
      "finetune"; the rest is "test".
    seed: the split's seed.

  Returns:
    The `Domains`, records naming files (decoded when read).

  Raises:
    DataError: a missing folder, no domains, a domain without images, or
      domains whose classes differ.
  """
  if not os.path.isdir(data_dir):
    raise DataError(f'data folder {data_dir} does not exist.')
  domains = [d for d in _listdir(data_dir)
             if os.path.isdir(os.path.join(data_dir, d))]
  if not domains:
    raise DataError(f'{data_dir} has no domain folders (expected '
                    'DIR/<domain>/<class>/<image>).')
  class_names = None
  splits = {}
  for domain in domains:
    root = os.path.join(data_dir, domain)
    classes = [c for c in _listdir(root)
               if os.path.isdir(os.path.join(root, c))]
    if class_names is None:
      class_names = classes
    elif classes != class_names:
      raise DataError(
          f'domain {domain!r} has classes {classes}, but {domains[0]!r} has '
          f'{class_names}: every domain needs the same class folders.')
    records = [
        {'path': os.path.join(root, c, f), 'label': label}
        for label, c in enumerate(classes)
        for f in _listdir(os.path.join(root, c))
        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not records:
      raise DataError(f'domain {domain!r} ({root}) has no images.')
    parts = split_indices(len(records), fractions, seed)
    splits[domain] = {name: [records[i] for i in part]
                      for name, part in zip(('pretrain', 'finetune', 'test'),
                                            parts)}
  return Domains(tuple(class_names), splits)


def few_shot(records: Sequence[Record], shots: int, seed: int) -> list[Record]:
  """At most `shots` records per label (all of them if `shots` is 0)."""
  if shots <= 0:
    return list(records)
  order = np.random.default_rng(seed).permutation(len(records))
  taken, count = [], {}
  for i in order:
    label = records[i]['label']
    if count.get(label, 0) < shots:
      count[label] = count.get(label, 0) + 1
      taken.append(records[i])
  return taken


# grain pipelines.

class DecodeBatch(grain.transforms.Map):
  """A batch of records -> `{"image": (n, s, s, 3) uint8, "label": int32}`."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if 'pixels' in batch:
      images = render_digits(batch['pixels'], batch['domain'], self.image_size,
                             batch['seed'])
    else:
      images = np.stack([self.load(str(path)) for path in batch['path']])
    return {'image': images, 'label': batch['label'].astype(np.int32)}

  def load(self, path: str) -> np.ndarray:
    try:
      with Image.open(path) as image:
        image = image.convert('RGB')
        if image.size != (self.image_size, self.image_size):
          image = image.resize((self.image_size, self.image_size),
                               Image.BILINEAR)
        return np.asarray(image, np.uint8)
    except OSError as error:
      raise DataError(f'cannot read image {path}: {error}') from None


def _new_rendering(record: Record, rng: np.random.Generator) -> Record:
  if 'pixels' not in record:
    return record
  return dict(record, seed=int(rng.integers(2**31)))


def _read_options(records: Sequence[Record]) -> grain.ReadOptions:
  # Files are decoded in several reader threads (PIL releases the GIL while
  # decoding); digits need one, to render the next batch during a step.
  on_disk = bool(records) and 'path' in records[0]
  threads = 4 if on_disk else 1
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(2, threads))


def host_rows(batch_size: int, process_index: int,
              process_count: int) -> slice:
  """The rows of a global batch that host `process_index` of `process_count`
  reads: consecutive equal slices, in process order (as `jax.devices()` lists
  the devices, and `jax.make_array_from_process_local_data` expects)."""
  if batch_size % process_count:
    raise DataError(f'the batch size {batch_size} is not a multiple of the '
                    f'{process_count} processes.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process index {process_index} is not in '
                    f'[0, {process_count}).')
  rows = batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


class _HostRows(grain.transforms.Map):
  """Keeps this host's rows of a (not yet decoded) batch."""

  def __init__(self, rows: slice):
    self.rows = rows

  def map(self, batch):
    return {k: v[self.rows] for k, v in batch.items()}


def train_batches(records: Sequence[Record], image_size: int, batch_size: int,
                  seed: int, augment: bool = False, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, Any]]:
  """Endless shuffled batches (a new order each epoch, the same for a seed).

  Args:
    records: the examples.
    image_size: the side images are resized to.
    batch_size: examples per batch.
    seed: the seed of the order (and of the augmentation).
    augment: digits are rendered anew (new noise, colours, angles) each time
      they are read; other records are unchanged.
    process_index: this host (`jax.process_index()`).
    process_count: the hosts (`jax.process_count()`): each one decodes only
      its `host_rows` of every global batch of `batch_size`; together they
      read the single-host order.

  Returns:
    An iterator of `{"image": uint8, "label": int32}` batches (this host's
    rows); it has grain's `get_state` and `set_state` (the data position).
  """
  dataset = (grain.MapDataset.source(list(records))
             .shuffle(seed=seed)
             .repeat())
  if augment:
    dataset = dataset.random_map(_new_rendering, seed=seed)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  if process_count > 1:
    dataset = dataset.map(
        _HostRows(host_rows(batch_size, process_index, process_count)))
  dataset = dataset.map(DecodeBatch(image_size))
  return iter(dataset.to_iter_dataset(_read_options(records)))


def eval_batches(records: Sequence[Record], image_size: int,
                 batch_size: int) -> Iterator[dict[str, Any]]:
  """One pass in order; the last batch padded, `"valid"` marking real rows."""
  def pad(batch):
    n = len(batch['label'])
    batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:],
                                            v.dtype)])
             for k, v in batch.items()}
    batch['valid'] = np.arange(batch_size) < n
    return batch

  dataset = (grain.MapDataset.source(list(records))
             .batch(batch_size)
             .map(DecodeBatch(image_size))
             .map(pad))
  return iter(dataset.to_iter_dataset(_read_options(records)))
