"""Domains of labelled images, and the grain pipelines that feed them.

Two sources give the same thing, `{domain: [record, ...]}` with records
`{"image": HxWx3 uint8}` or `{"path": file}`, plus `"label"`:

- `digits_domains`: scikit-learn's 8x8 digits, upscaled and rendered in
  several domains (clean, noisy, blurred, inverted, rotated, coloured). The
  same digits appear in every domain, so a split by digit is a split of all
  domains at once.
- `folder_domains`: a DomainNet-style folder, `DIR/<domain>/<class>/<image>`.

Images are decoded and resized on the host with PIL inside a grain
`MapDataset`; batches are `{"image": (n, s, s, 3) uint8, "label": (n,) int32}`.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import os
from typing import Any

import grain
import numpy as np
from PIL import Image
from PIL import ImageFilter

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
  """A seeded permutation of `range(n)` cut by `fractions` (pretrain, finetune)."""
  order = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions])
  return np.split(order, cuts)


# scikit-learn digits in several domains.

def _render_clean(x, rng):
  del rng
  return np.repeat(x[..., None], 3, axis=-1)


def _render_noise(x, rng):
  x = x + rng.normal(0.0, 0.35, x.shape)
  return _render_clean(np.clip(x, 0, 1), rng)


def _render_blur(x, rng):
  radius = x.shape[0] / 12
  image = Image.fromarray(np.uint8(x * 255)).filter(
      ImageFilter.GaussianBlur(radius))
  return _render_clean(np.asarray(image) / 255.0, rng)


def _render_invert(x, rng):
  return _render_clean(1.0 - x, rng)


def _render_rotate(x, rng):
  angle = rng.uniform(60, 120) * rng.choice([-1, 1])
  image = Image.fromarray(np.uint8(x * 255)).rotate(
      angle, resample=Image.BILINEAR)
  return _render_clean(np.asarray(image) / 255.0, rng)


def _render_color(x, rng):
  foreground, background = rng.uniform(0, 1, (2, 3))
  while np.abs(foreground - background).sum() < 0.9:
    foreground, background = rng.uniform(0, 1, (2, 3))
  return x[..., None] * foreground + (1 - x[..., None]) * background


DIGIT_DOMAINS = {
    'clean': _render_clean,
    'noise': _render_noise,
    'blur': _render_blur,
    'invert': _render_invert,
    'rotate': _render_rotate,
    'color': _render_color,
}


def render_digit(pixels: np.ndarray, domain: str, image_size: int,
                 seed: int) -> np.ndarray:
  """One 8x8 digit (values 0..16) as an `image_size` RGB image of `domain`.

  Deterministic: the same digit, domain and seed give the same image.
  """
  image = Image.fromarray(np.uint8(pixels * (255 / 16)))
  x = np.asarray(image.resize((image_size, image_size), Image.BICUBIC)) / 255.0
  rgb = DIGIT_DOMAINS[domain](np.clip(x, 0, 1), np.random.default_rng(seed))
  return np.uint8(np.clip(rgb, 0, 1) * 255 + 0.5)


def digits_domains(image_size: int, domains: Sequence[str] = tuple(DIGIT_DOMAINS),
                   fractions=(0.5, 0.2), seed: int = 0) -> Domains:
  """scikit-learn's digits rendered in `domains`, split by digit.

  Args:
    image_size: the side of the rendered images.
    domains: names from `DIGIT_DOMAINS`.
    fractions: the shares of digits for "pretrain" and "finetune"; the rest
      is "test". Every domain uses the same digits in each split.
    seed: the split's and the renderings' seed.

  Returns:
    The `Domains`, images rendered in memory.
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
    def render(i, domain=domain, d=d):
      return {'image': render_digit(digits.images[i], domain, image_size,
                                    seed=(seed * 7919 + d) * 100003 + int(i)),
              'label': int(digits.target[i])}
    splits[domain] = {
        name: _materialize(grain.MapDataset.source(part.tolist()).map(render))
        for name, part in zip(('pretrain', 'finetune', 'test'), parts)}
  return Domains(tuple(str(c) for c in digits.target_names), splits)


def _materialize(dataset: grain.MapDataset) -> list[Any]:
  # Indexing reads in this thread: for in-memory work, reader threads only
  # contend for the GIL.
  return [dataset[i] for i in range(len(dataset))]


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
    classes = [c for c in _listdir(root) if os.path.isdir(os.path.join(root, c))]
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

class DecodeImage(grain.transforms.Map):
  """Record -> `{"image": s x s x 3 uint8, "label": int32}`, with PIL."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, record: Record) -> dict[str, np.ndarray]:
    if 'path' in record:
      with Image.open(record['path']) as image:
        image = image.convert('RGB')
    elif record['image'].shape[:2] == (self.image_size, self.image_size):
      return {'image': record['image'], 'label': np.int32(record['label'])}
    else:
      image = Image.fromarray(record['image'])
    if image.size != (self.image_size, self.image_size):
      image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
    return {'image': np.asarray(image, np.uint8),
            'label': np.int32(record['label'])}


def _read_options(records: Sequence[Record]) -> grain.ReadOptions:
  # Files are decoded in reader threads (PIL releases the GIL while decoding);
  # images already in memory are cheaper to batch in this thread.
  on_disk = any('path' in r for r in records[:1])
  return grain.ReadOptions(num_threads=4 if on_disk else 0,
                           prefetch_buffer_size=4)


def train_batches(records: Sequence[Record], image_size: int, batch_size: int,
                  seed: int) -> Iterator[dict[str, Any]]:
  """Endless shuffled batches (a new order each epoch, the same for a seed)."""
  dataset = (grain.MapDataset.source(list(records))
             .shuffle(seed=seed)
             .repeat()
             .map(DecodeImage(image_size))
             .batch(batch_size, drop_remainder=True))
  return iter(dataset.to_iter_dataset(_read_options(records)))


def eval_batches(records: Sequence[Record], image_size: int,
                 batch_size: int) -> Iterator[dict[str, Any]]:
  """One pass in order; the last batch padded, with `"valid"` marking real rows."""
  def pad(batch):
    n = len(batch['label'])
    batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:],
                                            v.dtype)])
             for k, v in batch.items()}
    batch['valid'] = np.arange(batch_size) < n
    return batch

  dataset = (grain.MapDataset.source(list(records))
             .map(DecodeImage(image_size))
             .batch(batch_size)
             .map(pad))
  return iter(dataset.to_iter_dataset(_read_options(records)))
