"""Multiple-choice accuracy on the eight commonsense test sets, by likelihood.

The test sets are LLM-Adapters' (`dataset/<task>/test.json`): records in the
instruction layout (`data.load_instructions`) whose "answer" is a label
("true", "solution2", "answer3", "ending1", "option2", ...) and whose
"output" is "the correct answer is <answer>". The model's choice for a
record is the label whose response, `output` with the answer replaced by
that label, has the highest summed log-likelihood after the record's prompt.

How this differs from LLM-Adapters' own evaluation (commonsense_evaluate.py
at commit 8166572): there the model *generates* up to 32 tokens (4-beam
search, temperature 0.1, top-p 0.75, top-k 40) after its evaluation prompt,
the text after "### Response:" is searched for the task's labels with a
regular expression (`extract_answer`, lines 265-296), the first match is the
prediction, and an output with no label counts as wrong. Here nothing is
generated: every record gets one of its own labels (a model that has not
learnt the answer format is not scored zero), a question with three
choices is not offered a fourth, the result is deterministic, and the prompt
is the training template (`data.prompt`, finetune.py's), not the evaluation
script's, which differs from it in whitespace (no trailing spaces after
"request.", empty lines instead of 16 spaces between sections). For a
model fine-tuned on commonsense_170k the two usually agree on most
records, but the numbers are not the paper's table's protocol.
"""

from collections.abc import Callable, Mapping, Sequence
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples.llm import data
from examples.llm.configs import DataError

# The tasks, as LLM-Adapters names their folders (commonsense_evaluate.py,
# line 169).
TASKS = ('boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande',
         'ARC-Challenge', 'ARC-Easy', 'openbookqa')

# Each task's labels: the alternatives of its regular expression in
# commonsense_evaluate.py's `extract_answer` (lines 265-296), cut to the
# number of choices its test set's "Answer format:" lines offer (social_i_qa
# 3, openbookqa 4, the ARC sets 3 to 5 per question, hellaswag 4).
LABELS = {
    'boolq': ('true', 'false'),
    'piqa': ('solution1', 'solution2'),
    'social_i_qa': ('answer1', 'answer2', 'answer3'),
    'hellaswag': ('ending1', 'ending2', 'ending3', 'ending4'),
    'winogrande': ('option1', 'option2'),
    'ARC-Challenge': ('answer1', 'answer2', 'answer3', 'answer4', 'answer5'),
    'ARC-Easy': ('answer1', 'answer2', 'answer3', 'answer4', 'answer5'),
    'openbookqa': ('answer1', 'answer2', 'answer3', 'answer4'),
}

# Every output of the eight test sets (and of commonsense_170k.json) is this
# prefix and the answer.
ANSWER_PREFIX = 'the correct answer is '

_ANSWER_FORMAT = re.compile(r'Answer format:\s*([\w/]+)')

LogprobFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_task(task: str):
  if task not in LABELS:
    raise DataError(f'unknown task {task!r}; the tasks are '
                    f'{", ".join(TASKS)}.')


def _choices(record: Mapping[str, Any], task: str, where: str) -> list[str]:
  found = _ANSWER_FORMAT.findall(record['instruction'])
  if not found:
    return list(LABELS[task])
  choices = found[-1].split('/')
  unknown = [c for c in choices if c not in LABELS[task]]
  if unknown:
    raise DataError(f'{where}: its answer format offers {unknown[0]!r}, not '
                    f'a {task} label ({"/".join(LABELS[task])}).')
  return choices


def answer_choices(record: Mapping[str, Any], task: str) -> list[str]:
  """The labels a record offers: its "Answer format:", else its task's.

  Args:
    record: a test record (`data.load_instructions`).
    task: one of `TASKS`.

  Returns:
    The labels, in the order the instruction lists them (the ARC sets list
    3, 4 or 5).
  """
  _check_task(task)
  return _choices(record, task, 'the record')


def response(record: Mapping[str, Any], choice: str) -> str:
  """The record's output with its answer replaced by `choice`."""
  output, answer = record['output'], record['answer']
  if answer and output.endswith(answer):
    return output[:len(output) - len(answer)] + choice
  return ANSWER_PREFIX + choice


@jax.jit
def _summed_logprob(logprobs: jax.Array, tokens: jax.Array,
                    targets: jax.Array) -> jax.Array:
  """Per row, the summed log-probability of the tokens `targets` marks."""
  picked = jnp.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None],
                               axis=-1)[..., 0]
  return jnp.sum(jnp.where(targets[:, 1:], picked, 0.0), axis=1)


def _padded_length(length: int, max_len: int) -> int:
  # A power of two (at least 16) or max_len: few shapes, so few compilations
  # of the caller's jitted logprob_fn, and short batches stay short.
  return min(max_len, max(16, 1 << (length - 1).bit_length()))


def sequence_logprobs(logprob_fn: LogprobFn,
                      sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, batch_size: int, max_len: int,
                      pad_id: int = 0) -> np.ndarray:
  """The summed log-likelihood of each continuation after its context.

  Sequences are sorted by length and batched, padded on the right to a
  power of two (or `max_len`); rows that fill the last batch are empty.

  Args:
    logprob_fn: `(tokens int32 [B, T], mask bool [B, T]) -> float32
      [B, T, V]` log-softmax of the next token at each position.
    sequences: `(context, continuation)` token lists, together at most
      `max_len` long.
    batch_size: rows per call of `logprob_fn`.
    max_len: the longest row.
    pad_id: the token of padded positions.

  Returns:
    float32 `[len(sequences)]`.
  """
  lengths = np.array([len(c) + len(r) for c, r in sequences])
  order = np.argsort(lengths, kind='stable')
  scores = np.zeros(len(sequences), np.float32)
  for first in range(0, len(order), batch_size):
    rows = order[first:first + batch_size]
    width = _padded_length(int(lengths[rows].max()), max_len)
    tokens = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), bool)
    targets = np.zeros((batch_size, width), bool)
    for row, i in enumerate(rows):
      context, continuation = sequences[i]
      tokens[row, :lengths[i]] = list(context) + list(continuation)
      mask[row, :lengths[i]] = True
      targets[row, len(context):lengths[i]] = True
    logprobs = logprob_fn(jnp.asarray(tokens), jnp.asarray(mask))
    summed = _summed_logprob(logprobs, jnp.asarray(tokens),
                             jnp.asarray(targets))
    scores[rows] = np.asarray(summed)[:len(rows)]
  return scores


def score_multiple_choice(logprob_fn: LogprobFn, tokenizer,
                          records: Sequence[Mapping[str, Any]], task: str, *,
                          batch_size: int = 16, max_len: int = 512,
                          truncate: bool = False,
                          source: str = 'records') -> dict[str, Any]:
  """Accuracy of picking, per record, the most likely of its labels.

  Each (record, label) pair is one row: `[bos] prompt(record)` as context,
  `response(record, label)` as the scored continuation (tokenized apart, as
  `data.sft_examples` does, without eos). The labels' shared prefix ("the
  correct answer is") adds the same to every label's score.

  Args:
    logprob_fn: `(tokens int32 [B, T], mask bool [B, T]) -> float32
      [B, T, V]` log-softmax; jit it (it is called with a few shapes only).
    tokenizer: `data.ByteTokenizer` or a checkpoint's tokenizer.
    records: the task's records (`data.load_instructions`).
    task: one of `TASKS`.
    batch_size: rows per call of `logprob_fn`.
    max_len: the longest row.
    truncate: drop the start of a prompt that would make a row longer than
      `max_len`; otherwise such a record is refused.
    source: what the records are, for messages (a file name).

  Returns:
    `{"accuracy": float, "n": int, "predictions": [label, ...],
    "scores": [[summed log-likelihood per label], ...]}`; ties go to the
    first label.

  Raises:
    DataError: an unknown task, a record whose answer is not one of its
      labels, or a row longer than `max_len` (naming the record).
  """
  _check_task(task)
  if not records:
    raise DataError(f'{source} has no {task} records to score.')
  sequences, owners, choices = [], [], []
  for i, record in enumerate(records):
    where = f'{source}: record {i}'
    labels = _choices(record, task, where)
    if record['answer'] not in labels:
      raise DataError(f'{where} has answer {record["answer"]!r}, not one of '
                      f'its labels {"/".join(labels)}.')
    choices.append(labels)
    for label in labels:
      context, continuation = data.encode_prompt_response(
          tokenizer, data.prompt(record), response(record, label), eos=False)
      length = len(context) + len(continuation)
      if length > max_len:
        # bos (if any) stays; at least one prompt token stays before the
        # scored tokens.
        keep = int(tokenizer.bos_id is not None)
        if not truncate or len(continuation) + keep + 1 > max_len:
          raise DataError(f'{where} is {length} tokens long with label '
                          f'{label!r}, more than the {max_len} of the context '
                          '(raise the maximum length or truncate).')
        context = context[:keep] + context[keep + length - max_len:]
      sequences.append((context, continuation))
      owners.append(i)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  flat = sequence_logprobs(logprob_fn, sequences, batch_size=batch_size,
                           max_len=max_len, pad_id=pad)
  owners = np.asarray(owners)
  scores = [flat[owners == i].tolist() for i in range(len(records))]
  predictions = [labels[int(np.argmax(s))]
                 for labels, s in zip(choices, scores)]
  correct = [p == r['answer'] for p, r in zip(predictions, records)]
  return {'accuracy': float(np.mean(correct)), 'n': len(records),
          'predictions': predictions, 'scores': scores}


def evaluate_tasks(logprob_fn: LogprobFn, tokenizer, folder: str,
                   tasks: Sequence[str] = TASKS, *, batch_size: int = 16,
                   max_len: int = 512, max_records: int | None = None,
                   truncate: bool = False) -> dict[str, float]:
  """Accuracy on each test set found in `folder`, and their average.

  Args:
    logprob_fn: as for `score_multiple_choice`.
    tokenizer: `data.ByteTokenizer` or a checkpoint's tokenizer.
    folder: LLM-Adapters' `dataset` folder, or any folder holding
      `<task>/test.json` for some of the tasks.
    tasks: the tasks to look for; those without a file are skipped.
    batch_size: rows per call of `logprob_fn`.
    max_len: the longest row.
    max_records: score only each file's first records (for a quick look).
    truncate: as for `score_multiple_choice`.

  Returns:
    `{task: accuracy}` for the tasks found, and `"average"`, their
    unweighted mean (as the paper's table averages the eight).

  Raises:
    DataError: no such folder, an unknown task, none of the tasks' files
      present, or a bad file (`data.load_instructions`,
      `score_multiple_choice`).
  """
  if not os.path.isdir(folder):
    raise DataError(f'evaluation folder {folder} does not exist.')
  for task in tasks:
    _check_task(task)
  found = [t for t in tasks
           if os.path.isfile(os.path.join(folder, t, 'test.json'))]
  if not found:
    raise DataError(f'{folder} has none of {", ".join(tasks)} '
                    '(expected <folder>/<task>/test.json, as in '
                    "LLM-Adapters' dataset folder).")
  results = {}
  for task in found:
    path = os.path.join(folder, task, 'test.json')
    records = data.load_instructions(path)[:max_records]
    results[task] = score_multiple_choice(
        logprob_fn, tokenizer, records, task, batch_size=batch_size,
        max_len=max_len, truncate=truncate, source=path)['accuracy']
  results['average'] = float(np.mean([results[t] for t in found]))
  return results
