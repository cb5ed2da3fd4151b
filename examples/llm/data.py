"""Text for the LLM example: two corpora that ship with Python, and
instruction data in LLM-Adapters' layout.

- The pre-training domain, `stdlib_source_text`: the running interpreter's
  standard-library `.py` sources (no test suites, no site-packages, and not
  `pydoc_data`, which is the other domain), split by file.
- The fine-tuning domain, `pydoc_topics_text`: the documentation topics of
  `pydoc_data.topics` (what `help('with')` prints), split by topic.
- Instruction data (`load_instructions`, `prompt`, `sft_examples`): a JSON
  list of `{"instruction", "input", "output", "answer"}` records, as
  LLM-Adapters keeps `ft-training_set/commonsense_170k.json` and
  `dataset/<task>/test.json`, in the prompt template of its `finetune.py`.

Tokens are NumPy arrays (`token_array`); `lm_batches` draws random windows
for training, `lm_eval_batches` covers a held-out text once. Nothing here
caches or touches the network: the corpora are rebuilt from the interpreter's
files in a fraction of a second.
"""

from collections.abc import Iterator, Mapping, Sequence
import hashlib
import json
import os
import sysconfig
from typing import Any

import numpy as np

from examples.llm.configs import DataError

Record = dict[str, Any]


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, and three special tokens after them.

  The interface `checkpoints.load`'s tokenizers share: `encode` (no special
  tokens added), `decode`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`.
  """

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as a uint16 array, without a Python list in between."""
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.uint16)

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the byte tokens (special tokens are dropped)."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(
        'utf-8', errors='replace')


def token_array(text: str, tokenizer) -> np.ndarray:
  """`tokenizer.encode(text)` as uint16 (vocabularies up to 65536) or int32."""
  if hasattr(tokenizer, 'encode_array'):
    return tokenizer.encode_array(text)
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  return np.asarray(tokenizer.encode(text), dtype)


# The two corpora.

# Folders of the standard library that are not its source: test suites,
# installed packages, compiled files, the build configuration.
_NOT_SOURCE = frozenset({'test', 'tests', 'idle_test', 'site-packages',
                         'dist-packages', '__pycache__', 'lib-dynload',
                         'pydoc_data'})


def stdlib_source_documents(root: str | None = None) -> dict[str, str]:
  """The standard library's `.py` files, `{relative path: source}`, sorted.

  Left out: test suites (folders `test`, `tests`, `idle_test`, files
  `test_*.py`), `site-packages`, `lib-dynload`, `config-*`, `pydoc_data`
  (the fine-tuning domain) and `encodings` (1.4 MB, mostly decoding tables
  that `gencodec.py` wrote, near copies of one another). A file whose bytes
  equal an earlier one's (in path order) is kept once.

  Args:
    root: the library folder; by default the running interpreter's
      (`sysconfig.get_paths()['stdlib']`).

  Returns:
    The sources by path relative to `root` (with `/`), in path order.
  """
  root = root or sysconfig.get_paths()['stdlib']
  if not os.path.isdir(root):
    raise DataError(f'the standard library folder {root} does not exist.')
  paths = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = [d for d in subfolders
                     if d not in _NOT_SOURCE and not d.startswith('config-')
                     and not (folder == root and d == 'encodings')]
    paths += [os.path.join(folder, f) for f in files
              if f.endswith('.py') and not f.startswith('test_')]
  documents, seen = {}, set()
  for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
    with open(path, 'rb') as f:
      source = f.read()
    digest = hashlib.sha256(source).digest()
    if digest not in seen:
      seen.add(digest)
      name = os.path.relpath(path, root).replace(os.sep, '/')
      documents[name] = source.decode('utf-8', errors='replace')
  if not documents:
    raise DataError(f'the standard library folder {root} has no .py files.')
  return documents


def pydoc_topics_documents() -> dict[str, str]:
  """`pydoc_data.topics.topics`, `{topic: text}`, in topic order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return {name: topics.topics[name] for name in sorted(topics.topics)}


def shared_text_groups(documents: Mapping[str, str], *, min_line: int = 60,
                       min_share: float = 0.3) -> dict[str, str]:
  """Documents that share text, in one group: `{name: group}`.

  pydoc's topics are sections of the language reference, and some contain
  others whole ("compound" holds "if", "while", "try", ...; "specialnames"
  holds "customization", "numeric-types", ...; "if" and "else" are the same
  text): a split by topic alone would put held-out text in train. The
  standard library has such sets too (pure-Python twins, generated
  modules). Two
  documents are linked when more than `min_share` of one's distinct lines
  of at least `min_line` characters appear in the other; a group is a
  connected set of links, named by its first document.

  Args:
    documents: `{name: text}`.
    min_line: the length (after stripping) from which a line counts.
    min_share: the share of a document's lines that links it.

  Returns:
    The group of every document.
  """
  lines = {name: {line.strip() for line in text.splitlines()
                  if len(line.strip()) >= min_line}
           for name, text in documents.items()}
  holders = {}
  for name in sorted(documents):
    for line in lines[name]:
      holders.setdefault(line, []).append(name)
  group = {name: name for name in documents}

  def root(name):
    while group[name] != name:
      name = group[name]
    return name

  for name in sorted(documents):
    counts = {}
    for line in lines[name]:
      for other in holders[line]:
        if other != name:
          counts[other] = counts.get(other, 0) + 1
    for other, count in counts.items():
      if count > min_share * len(lines[name]):
        first, second = sorted((root(name), root(other)))
        group[second] = first
  return {name: root(name) for name in documents}


def _unit_hash(key: str, salt: str) -> tuple[float, float]:
  """Two numbers in [0, 1) fixed by `key`: its side, and its place."""
  digest = hashlib.sha256(f'{salt}:{key}'.encode('utf-8')).digest()
  return (int.from_bytes(digest[:8], 'big') / 2**64,
          int.from_bytes(digest[8:16], 'big') / 2**64)


def split_documents(documents: Mapping[str, str], *,
                    heldout_fraction: float, max_bytes: int | None = None,
                    salt: str = 'split',
                    groups: Mapping[str, str] | None = None
                    ) -> tuple[list[str], list[str]]:
  """Documents split whole into train and held-out, within a byte budget.

  A document is held out when a hash of its name (of its group's name, if
  `groups` is given) falls below `heldout_fraction`, so its side depends on
  that name alone (not on the budget, nor on which other documents exist).
  Within the budget, documents are taken in a second hash order (a spread
  over the names, not the alphabetically first ones) while they fit whole:
  the train side gets at most `(1 - heldout_fraction) * max_bytes` UTF-8
  bytes, the held-out side at most `heldout_fraction * max_bytes`, counting
  the newline that joins each document to the next.

  Args:
    documents: `{name: text}`.
    heldout_fraction: the share of documents (and of the budget) held out,
      in (0, 1).
    max_bytes: the budget of both sides together; None takes every document.
    salt: the hash's salt (another salt, another split).
    groups: `{name: group}`: documents of a group go to the same side.

  Returns:
    `(train_names, heldout_names)`, each in name order.
  """
  if not 0 < heldout_fraction < 1:
    raise ValueError(f'heldout_fraction must be in (0, 1), got '
                     f'{heldout_fraction}.')
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f'max_bytes must be positive, got {max_bytes}.')
  groups = groups or {}
  hashes = {name: (_unit_hash(groups.get(name, name), salt)[0],
                   _unit_hash(name, salt)[1]) for name in documents}
  budget = [float('inf')] * 2
  if max_bytes is not None:
    budget = [(1 - heldout_fraction) * max_bytes, heldout_fraction * max_bytes]
  taken, used = ([], []), [0, 0]
  for name in sorted(documents, key=lambda n: hashes[n][1]):
    side = int(hashes[name][0] < heldout_fraction)
    size = len(documents[name].encode('utf-8')) + 1  # and a newline
    if used[side] + size <= budget[side]:
      taken[side].append(name)
      used[side] += size
  return sorted(taken[0]), sorted(taken[1])


def _join(documents: Mapping[str, str], names: Sequence[str]) -> str:
  return '\n'.join(documents[name] for name in names)


def stdlib_source_text(max_bytes: int | None = 4_000_000,
                       heldout_fraction: float = 0.1,
                       root: str | None = None) -> tuple[str, str]:
  """The pre-training domain: standard-library source, split by file.

  Args:
    max_bytes: the budget of both texts together (UTF-8 bytes); None takes
      the whole library (about 10 MB for CPython 3.11).
    heldout_fraction: the share of files (and of the budget) held out.
    root: the library folder; by default the running interpreter's.

  Returns:
    `(train_text, heldout_text)`: whole files joined by newlines; no file is
    in both, nor are two files that share text (`shared_text_groups`).
  """
  documents = stdlib_source_documents(root)
  train, heldout = split_documents(documents, heldout_fraction=heldout_fraction,
                                   max_bytes=max_bytes, salt='stdlib',
                                   groups=shared_text_groups(documents))
  return _join(documents, train), _join(documents, heldout)


def pydoc_topics_text(max_bytes: int | None = None,
                      heldout_fraction: float = 0.2) -> tuple[str, str]:
  """The fine-tuning domain: `pydoc_data`'s documentation topics, by topic.

  Args:
    max_bytes: the budget of both texts together (UTF-8 bytes); None takes
      every topic (about 0.47 MB for CPython 3.11).
    heldout_fraction: the share of topics (and of the budget) held out.

  Returns:
    `(train_text, heldout_text)`: whole topics joined by newlines; no topic
    is in both, nor are two topics that share text
    (`shared_text_groups`).
  """
  documents = pydoc_topics_documents()
  train, heldout = split_documents(documents, heldout_fraction=heldout_fraction,
                                   max_bytes=max_bytes, salt='pydoc',
                                   groups=shared_text_groups(documents))
  return _join(documents, train), _join(documents, heldout)


# Language-model batches.

def _check_windows(tokens: np.ndarray, seq_len: int, batch_size: int):
  if tokens.ndim != 1:
    raise DataError(f'the tokens must be one sequence (1-D), got shape '
                    f'{tokens.shape}.')
  if seq_len < 2:
    raise DataError(f'the sequence length must be at least 2, got {seq_len}.')
  if batch_size < 1:
    raise DataError(f'the batch size must be at least 1, got {batch_size}.')


def lm_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
               seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of random windows of a token sequence.

  Every window is whole (`seq_len` real tokens); its start is uniform over
  the sequence. The same seed gives the same batches.

  Args:
    tokens: the corpus, 1-D.
    batch_size: windows per batch.
    seq_len: tokens per window; the next-token loss has `seq_len - 1` terms.
    seed: the seed of the starts.

  Returns:
    An iterator of `{"tokens": int32 [B, T], "mask": bool [B, T]}` (the mask
    is all True: no padding).
  """
  _check_windows(tokens, seq_len, batch_size)
  if len(tokens) < seq_len:
    raise DataError(f'the corpus has {len(tokens)} tokens, fewer than one '
                    f'window of {seq_len}.')
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len)
  mask = np.ones((batch_size, seq_len), bool)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len + 1, batch_size)
    yield {'tokens': tokens[starts[:, None] + offsets].astype(np.int32),
           'mask': mask}


def lm_eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                    pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a token sequence in fixed windows, each token scored once.

  Window `k` holds tokens `[k (T - 1), k (T - 1) + T)`: consecutive windows
  share one token (the last of one is the first, the context, of the
  next), so the next-token predictions of all windows are those of the
  whole sequence, `len(tokens) - 1` of them, none twice. The last window is
  ragged (its tail is `pad_id`, masked out); the last batch is filled with
  empty rows (mask all False).

  Args:
    tokens: the held-out text's tokens, 1-D, at least 2.
    batch_size: windows per batch.
    seq_len: tokens per window (T).
    pad_id: the token of padded positions.

  Returns:
    An iterator of `{"tokens": int32 [B, T], "mask": bool [B, T]}`; a
    prediction of token t counts when `mask[:, t - 1] & mask[:, t]`.
  """
  _check_windows(tokens, seq_len, batch_size)
  if len(tokens) < 2:
    raise DataError(f'the held-out text has {len(tokens)} tokens; the loss '
                    'needs at least 2.')
  stride = seq_len - 1
  windows = -(-(len(tokens) - 1) // stride)
  starts = np.arange(windows) * stride
  positions = starts[:, None] + np.arange(seq_len)
  mask = positions < len(tokens)
  window_tokens = np.where(mask, tokens[np.minimum(positions, len(tokens) - 1)],
                           pad_id).astype(np.int32)
  for first in range(0, windows, batch_size):
    batch_tokens = window_tokens[first:first + batch_size]
    batch_mask = mask[first:first + batch_size]
    empty = batch_size - len(batch_tokens)
    if empty:
      batch_tokens = np.concatenate(
          [batch_tokens, np.full((empty, seq_len), pad_id, np.int32)])
      batch_mask = np.concatenate([batch_mask,
                                   np.zeros((empty, seq_len), bool)])
    yield {'tokens': batch_tokens, 'mask': batch_mask}


# Instruction data in LLM-Adapters' layout.

REQUIRED_FIELDS = ('instruction', 'output', 'answer')
OPTIONAL_FIELDS = ('input',)

# LLM-Adapters' finetune.py `generate_prompt` (lines 323-343 at commit
# 8166572), byte for byte: the indentation of its triple-quoted f-strings
# and the trailing spaces after "request." are part of the text the models
# were trained on. The response (`output`) follows the prompt directly.
PROMPT_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that '
    'provides further context. Write a response that appropriately completes '
    'the request. \n\n'
    '                ### Instruction:\n'
    '                {instruction}\n'
    '                \n'
    '                ### Input:\n'
    '                {input}\n'
    '                \n'
    '                ### Response:\n'
    '                ')
PROMPT_WITHOUT_INPUT = (
    'Below is an instruction that describes a task. Write a response that '
    'appropriately completes the request.  \n\n'
    '                ### Instruction:\n'
    '                {instruction}\n'
    '                \n'
    '                ### Response:\n'
    '                ')


def load_instructions(path: str) -> list[Record]:
  """A JSON list of instruction records, checked.

  Every record is an object with string fields "instruction", "output" (the
  response) and "answer" (the label that "output" states, as in
  commonsense_170k.json and the test sets); "input" is optional (absent,
  null or empty selects the prompt without an input).

  Args:
    path: the JSON file.

  Returns:
    The records, as read.

  Raises:
    DataError: a missing file, not JSON, not a non-empty list, or a record
      that is not an object or lacks a required string field (named, with
      the record's index).
  """
  if not os.path.isfile(path):
    raise DataError(f'instruction file {path} does not exist.')
  try:
    with open(path, encoding='utf-8') as f:
      records = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    message = str(error).splitlines()[0]
    raise DataError(f'{path} is not JSON: {message}.') from None
  if not isinstance(records, list):
    raise DataError(f'{path} holds a JSON {type(records).__name__}, not a '
                    'list of records.')
  if not records:
    raise DataError(f'{path} has no records.')
  needs = ('each record needs string "instruction", "output" and "answer"; '
           '"input" may be empty or absent')
  for i, record in enumerate(records):
    if not isinstance(record, dict):
      raise DataError(f'{path}: record {i} is a JSON '
                      f'{type(record).__name__}, not an object ({needs}).')
    for field in REQUIRED_FIELDS:
      if field not in record:
        raise DataError(f'{path}: record {i} has no "{field}" ({needs}).')
      if not isinstance(record[field], str):
        raise DataError(f'{path}: record {i} has a non-string "{field}" '
                        f'({needs}).')
    if not isinstance(record.get('input') or '', str):
      raise DataError(f'{path}: record {i} has a non-string "input" ({needs}).')
  return records


def prompt(record: Mapping[str, Any]) -> str:
  """The text before the response, in LLM-Adapters' training template.

  `prompt(record) + record["output"]` is finetune.py's
  `generate_prompt(record)`; `prompt(record)` alone is its
  `generate_prompt({**record, "output": ""})`, the part it keeps out of the
  loss when `train_on_inputs=False`.
  """
  if record.get('input'):
    return PROMPT_WITH_INPUT.format(instruction=record['instruction'],
                                    input=record['input'])
  return PROMPT_WITHOUT_INPUT.format(instruction=record['instruction'])


def encode_prompt_response(tokenizer, prompt_text: str,
                           response_text: str, eos: bool = True
                           ) -> tuple[list[int], list[int]]:
  """`([bos] + prompt tokens, response tokens [+ eos])`, encoded apart.

  The two parts are tokenized separately so the loss (or the score) covers
  exactly the response's tokens, whatever the tokenizer would merge across
  the boundary.
  """
  context = ([] if tokenizer.bos_id is None else [tokenizer.bos_id])
  context += list(tokenizer.encode(prompt_text))
  response = list(tokenizer.encode(response_text))
  if eos and tokenizer.eos_id is not None:
    response.append(tokenizer.eos_id)
  return context, response


def sft_examples(records: Sequence[Mapping[str, Any]], tokenizer, *,
                 max_len: int, truncate: bool = False) -> dict[str, np.ndarray]:
  """Instruction records as padded token rows, the loss on the response only.

  A row is `[bos] prompt output [eos]` (bos where the tokenizer has one),
  padded on the right with `pad_id` to `max_len`. LLM-Adapters' finetune.py
  tokenizes the same text; its default `train_on_inputs=True` puts the
  prompt in the loss too, here the loss is on `output` and eos only (its
  `train_on_inputs=False`).

  Args:
    records: records with "instruction", "output" and optionally "input"
      (`load_instructions`).
    tokenizer: `ByteTokenizer` or a checkpoint's tokenizer.
    max_len: tokens per row.
    truncate: cut rows longer than `max_len` at `max_len` (finetune.py's
      `cutoff_len` does the same); otherwise they are refused.

  Returns:
    `{"tokens": int32 [N, max_len], "mask": bool (real tokens),
    "loss_mask": bool}`: `loss_mask[:, t]` marks the response tokens (and
    eos), the targets whose prediction from `tokens[:, :t]` is in the loss
    (pair `loss_mask[:, 1:]` with `logits[:, :-1]`).

  Raises:
    DataError: a row longer than `max_len` (naming the record) when
      `truncate` is False.
  """
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  n = len(records)
  tokens = np.full((n, max_len), pad, np.int32)
  mask = np.zeros((n, max_len), bool)
  loss_mask = np.zeros((n, max_len), bool)
  for i, record in enumerate(records):
    context, response = encode_prompt_response(tokenizer, prompt(record),
                                               record['output'])
    row = context + response
    if len(row) > max_len and not truncate:
      raise DataError(f'record {i} is {len(row)} tokens long, more than '
                      f'the {max_len} of the context (raise the maximum '
                      'length or truncate).')
    row = row[:max_len]
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
    loss_mask[i, len(context):len(row)] = True
  return {'tokens': tokens, 'mask': mask, 'loss_mask': loss_mask}


def sft_batches(examples: Mapping[str, np.ndarray], *, batch_size: int,
                seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of `sft_examples` rows, a new seeded order each epoch.

  Batches run on across epochs (any number of rows serves any batch size);
  the same seed gives the same batches.
  """
  n = len(next(iter(examples.values())))
  if n == 0:
    raise DataError('there are no examples to batch.')
  rng = np.random.default_rng(seed)
  order = np.zeros(0, int)
  while True:
    while len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    rows, order = order[:batch_size], order[batch_size:]
    yield {k: v[rows] for k, v in examples.items()}
