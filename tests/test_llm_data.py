"""The LLM example's data (examples/llm/data.py) and scorer (scoring.py)."""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.llm import data
from examples.llm import scoring
from examples.llm.configs import DataError

TOKENIZER = data.ByteTokenizer()


def one_line(error) -> str:
  message = str(error.value)
  assert '\n' not in message, message
  return message


# The two corpora.

def test_stdlib_documents_leave_out_tests_packages_tables_and_duplicates(
    tmp_path):
  files = {
      'a.py': 'print("a")\n', 'pkg/b.py': 'B = 2\n', 'pkg/copy_of_a.py':
      'print("a")\n', 'test/t.py': 'T', 'pkg/tests/t.py': 'T',
      'pkg/test_b.py': 'T', 'site-packages/x.py': 'X', 'encodings/e.py': 'E',
      'pydoc_data/topics.py': 'P', 'config-3.11-x/c.py': 'C',
      'idlelib/idle_test/i.py': 'I', 'notes.txt': 'N'}
  for name, text in files.items():
    os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
    (tmp_path / name).write_text(text)
  assert data.stdlib_source_documents(str(tmp_path)) == {
      'a.py': 'print("a")\n', 'pkg/b.py': 'B = 2\n'}


def test_stdlib_corpus_is_deterministic_bounded_and_split_by_file():
  budget = 1_000_000
  train, heldout = data.stdlib_source_text(budget, heldout_fraction=0.1)
  assert (train, heldout) == data.stdlib_source_text(budget,
                                                     heldout_fraction=0.1)
  assert 0.5 * 0.9 * budget < len(train.encode()) <= 0.9 * budget
  assert 0.5 * 0.1 * budget < len(heldout.encode()) <= 0.1 * budget
  documents = data.stdlib_source_documents()
  assert not any(name.startswith(('test/', 'encodings/', 'pydoc_data/'))
                 or 'site-packages' in name for name in documents)
  names = data.split_documents(documents, heldout_fraction=0.1,
                               max_bytes=budget, salt='stdlib',
                               groups=data.shared_text_groups(documents))
  assert not set(names[0]) & set(names[1])
  assert heldout == '\n'.join(documents[n] for n in names[1])
  assert not [n for n in names[1] if len(documents[n]) > 100
              and documents[n] in train]


def test_documents_that_share_lines_go_to_the_same_side():
  shared = ''.join(f'line {i} of a section that two documents of the corpus '
                   'hold whole\n' for i in range(20))
  documents = {'whole': 'intro\n' + shared, 'section': shared,
               'other': 'a line of a document that shares nothing at all\n'}
  groups = data.shared_text_groups(documents)
  assert groups == {'whole': 'section', 'section': 'section',
                    'other': 'other'}
  apart = 0
  for salt in map(str, range(20)):
    train, heldout = data.split_documents(documents, heldout_fraction=0.5,
                                          salt=salt, groups=groups)
    assert ('whole' in train) == ('section' in train)
    train, _ = data.split_documents(documents, heldout_fraction=0.5,
                                    salt=salt)
    apart += ('whole' in train) != ('section' in train)
  assert apart  # without the groups, some salts split them


def test_a_documents_side_does_not_depend_on_the_budget():
  documents = data.stdlib_source_documents()
  small = data.split_documents(documents, heldout_fraction=0.1,
                               max_bytes=300_000)
  large = data.split_documents(documents, heldout_fraction=0.1)
  assert set(small[0]) <= set(large[0]) and set(small[1]) <= set(large[1])
  assert len(large[0]) + len(large[1]) == len(documents)


def _grams(text: str, n: int) -> set[bytes]:
  raw = text.encode()
  return {raw[i:i + n] for i in range(len(raw) - n + 1)}


def _share_in(text: str, grams: set[bytes], n: int) -> float:
  raw = text.encode()
  starts = range(0, len(raw) - n + 1)
  return np.mean([raw[i:i + n] in grams for i in starts]) if starts else 0.0


def test_pydoc_topics_that_share_text_are_held_out_together():
  documents = data.pydoc_topics_documents()
  groups = data.shared_text_groups(documents)
  # Sections of the reference that pydoc also lists whole.
  assert groups['if'] == groups['else']
  assert groups['while'] == groups['compound']
  assert groups['numeric-types'] == groups['specialnames']
  train_names, heldout_names = data.split_documents(
      documents, heldout_fraction=0.2, salt='pydoc', groups=groups)
  assert len(train_names) + len(heldout_names) == len(documents)
  train, heldout = data.pydoc_topics_text()
  assert heldout == '\n'.join(documents[n] for n in heldout_names)
  train_grams = _grams(train, 64)
  leaked = {n: _share_in(documents[n], train_grams, 64) for n in heldout_names}
  assert max(leaked.values()) < 0.05, leaked
  # Without the groups, whole held-out sections would be in train.
  _, naive = data.split_documents(documents, heldout_fraction=0.2,
                                  salt='pydoc')
  naive_train = _grams('\n'.join(documents[n] for n in documents
                                 if n not in naive), 64)
  assert max(_share_in(documents[n], naive_train, 64) for n in naive) > 0.5


def _byte_distance(a: str, b: str) -> float:
  """Total variation between the byte frequencies of two texts."""
  pa, pb = (np.bincount(np.frombuffer(t.encode(), np.uint8), minlength=256)
            / len(t.encode()) for t in (a, b))
  return 0.5 * np.abs(pa - pb).sum()


def test_the_two_domains_differ_more_than_their_splits():
  stdlib_train, stdlib_heldout = data.stdlib_source_text(1_000_000)
  pydoc_train, pydoc_heldout = data.pydoc_topics_text()
  across = _byte_distance(stdlib_train, pydoc_train)
  assert across > 2 * _byte_distance(stdlib_train, stdlib_heldout)
  assert across > 2 * _byte_distance(pydoc_train, pydoc_heldout)
  # Neither domain's held-out text is in the other's train text.
  longest_topic = max(data.pydoc_topics_documents().values(), key=len)
  assert longest_topic not in stdlib_train


def test_byte_tokenizer_round_trips_utf8_and_drops_special_tokens():
  text = 'déjà vu: λx → x\n'
  ids = TOKENIZER.encode(text)
  assert max(ids) < 256 and len(ids) == len(text.encode())
  assert TOKENIZER.decode([TOKENIZER.bos_id] + ids + [TOKENIZER.eos_id]) == text
  np.testing.assert_array_equal(data.token_array(text, TOKENIZER), ids)
  assert data.token_array(text, TOKENIZER).dtype == np.uint16


# Language-model batches.

def test_lm_batches_are_seeded_whole_windows_of_the_corpus():
  tokens = np.arange(1000, dtype=np.uint16)
  batches = data.lm_batches(tokens, batch_size=4, seq_len=32, seed=3)
  first = [next(batches) for _ in range(3)]
  again = data.lm_batches(tokens, batch_size=4, seq_len=32, seed=3)
  other = next(data.lm_batches(tokens, batch_size=4, seq_len=32, seed=4))
  for batch in first:
    chex.assert_shape((batch['tokens'], batch['mask']), (4, 32))
    assert batch['tokens'].dtype == np.int32 and batch['mask'].all()
    np.testing.assert_array_equal(
        batch['tokens'], batch['tokens'][:, :1] + np.arange(32))
    np.testing.assert_array_equal(batch['tokens'], next(again)['tokens'])
  assert not np.array_equal(first[0]['tokens'], other['tokens'])
  assert not np.array_equal(first[0]['tokens'], first[1]['tokens'])
  with pytest.raises(DataError) as error:
    next(data.lm_batches(tokens[:10], batch_size=2, seq_len=32, seed=0))
  assert 'fewer than one window' in one_line(error)


def test_lm_eval_batches_predict_every_token_once():
  tokens = np.arange(1, 97, dtype=np.uint16)  # 14 windows, the last ragged
  batches = list(data.lm_eval_batches(tokens, batch_size=3, seq_len=8,
                                      pad_id=0))
  predicted = []
  for batch in batches:
    chex.assert_shape((batch['tokens'], batch['mask']), (3, 8))
    scored = batch['mask'][:, :-1] & batch['mask'][:, 1:]
    predicted += list(batch['tokens'][:, 1:][scored])
    assert (batch['tokens'][~batch['mask']] == 0).all()
  np.testing.assert_array_equal(sorted(predicted), tokens[1:])
  assert len(batches) == 5  # 14 windows of 3
  last = batches[-1]
  assert not last['mask'][2].any()  # the row that fills the last batch
  assert last['mask'][1].sum() == 96 - 13 * 7  # the ragged window


# Instruction records.

RECORDS = [
    {'instruction': 'Say yes.', 'input': '', 'output': 'yes',
     'answer': 'yes'},
    {'instruction': 'Add them.', 'input': '2 3', 'output': 'the sum is 5',
     'answer': '5'},
    {'instruction': 'No input field at all.', 'output': 'ok', 'answer': 'ok'},
]


def test_prompt_is_llm_adapters_training_template():
  # finetune.py's generate_prompt (commit 8166572), its f-strings' text.
  assert data.prompt(RECORDS[0]) + RECORDS[0]['output'] == (
      'Below is an instruction that describes a task. Write a response that '
      'appropriately completes the request.  \n\n'
      '                ### Instruction:\n'
      '                Say yes.\n'
      '                \n'
      '                ### Response:\n'
      '                yes')
  assert data.prompt(RECORDS[1]) + RECORDS[1]['output'] == (
      'Below is an instruction that describes a task, paired with an input '
      'that provides further context. Write a response that appropriately '
      'completes the request. \n\n'
      '                ### Instruction:\n'
      '                Add them.\n'
      '                \n'
      '                ### Input:\n'
      '                2 3\n'
      '                \n'
      '                ### Response:\n'
      '                the sum is 5')
  assert data.prompt(RECORDS[2]) == data.prompt(dict(RECORDS[2], input=None))


def test_sft_loss_mask_covers_exactly_the_response_and_eos():
  examples = data.sft_examples(RECORDS, TOKENIZER, max_len=400)
  chex.assert_shape(list(examples.values()), (3, 400))
  for i, record in enumerate(RECORDS):
    tokens, mask, loss = (examples[k][i]
                          for k in ('tokens', 'mask', 'loss_mask'))
    assert list(tokens[loss]) == (TOKENIZER.encode(record['output'])
                                  + [TOKENIZER.eos_id])
    prompt_tokens = TOKENIZER.encode(data.prompt(record))
    assert list(tokens[mask & ~loss]) == [TOKENIZER.bos_id] + prompt_tokens
    assert mask[:mask.sum()].all() and not (loss & ~mask).any()
    assert (tokens[~mask] == TOKENIZER.pad_id).all()


def test_sft_refuses_a_record_longer_than_the_context_unless_truncating():
  records = RECORDS + [dict(RECORDS[0], output='word ' * 100)]
  with pytest.raises(DataError) as error:
    data.sft_examples(records, TOKENIZER, max_len=400)
  assert one_line(error).startswith('record 3 is ')
  examples = data.sft_examples(records, TOKENIZER, max_len=400, truncate=True)
  assert examples['mask'][3].all() and examples['loss_mask'][3, -1]
  assert TOKENIZER.eos_id not in examples['tokens'][3]


def test_sft_batches_are_seeded_epochs_of_the_rows():
  examples = data.sft_examples(RECORDS, TOKENIZER, max_len=400)
  batches = data.sft_batches(examples, batch_size=2, seed=0)
  rows = np.concatenate([next(batches)['tokens'] for _ in range(3)])
  again = data.sft_batches(examples, batch_size=2, seed=0)
  np.testing.assert_array_equal(
      rows, np.concatenate([next(again)['tokens'] for _ in range(3)]))
  for epoch in (rows[:3], rows[3:]):  # every row once per epoch
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, examples['tokens']))


def _write(path, content):
  with open(path, 'w') as f:
    f.write(content if isinstance(content, str) else json.dumps(content))
  return str(path)


def test_load_instructions_reads_the_layout(tmp_path):
  path = _write(tmp_path / 'ok.json', RECORDS)
  assert data.load_instructions(path) == RECORDS


@pytest.mark.parametrize('content, expected', [
    (None, 'does not exist'),
    ('[{"instruction": ', 'is not JSON'),
    ({'instruction': 'x'}, 'holds a JSON dict, not a list'),
    ([], 'has no records'),
    (RECORDS[:1] + [['not', 'an', 'object']], 'record 1 is a JSON list'),
    (RECORDS[:2] + [{'instruction': 'x', 'output': 'y'}],
     'record 2 has no "answer"'),
    ([{'input': '', 'output': 'y', 'answer': 'y'}],
     'record 0 has no "instruction"'),
    ([dict(RECORDS[0], output=3)], 'record 0 has a non-string "output"'),
])
def test_bad_instruction_files_stop_with_one_line(tmp_path, content, expected):
  path = str(tmp_path / 'data.json')
  if content is not None:
    _write(path, content)
  with pytest.raises(DataError) as error:
    data.load_instructions(path)
  message = one_line(error)
  assert expected in message and path in message
  if 'has no "' in expected:
    assert '"input" may be empty or absent' in message


# The multiple-choice scorer.

def _question(task, labels, answer, text='Which one?'):
  return {'instruction': f'{text}\n\nAnswer format: {"/".join(labels)}',
          'input': '', 'output': f'the correct answer is {answer}',
          'answer': answer}


# A fake model: the same next-byte distribution at every position, with the
# digit 3 over 1 over 2 over 4 over 5, and "t" over every other letter. The
# labels' shared prefix scores the same for each label, so the prediction
# is the label whose own bytes are most likely: known by construction.
_PREFERENCE = np.zeros(TOKENIZER.vocab_size, np.float32)
for _byte, _weight in zip(b'31245t', (5.0, 4.0, 3.0, 2.0, 1.0, 6.0)):
  _PREFERENCE[_byte] = _weight


def fake_logprob_fn(tokens, mask):
  del mask
  logprobs = jax.nn.log_softmax(jnp.asarray(_PREFERENCE))
  return jnp.broadcast_to(logprobs, tokens.shape + logprobs.shape)


def _expected(record, task):
  logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(_PREFERENCE)))
  return max(scoring.answer_choices(record, task),
             key=lambda label: sum(logprobs[b] for b in label.encode()))


ARC = [
    _question('ARC-Easy', ['answer1', 'answer2', 'answer3', 'answer4'],
              'answer3'),
    _question('ARC-Easy', ['answer1', 'answer2', 'answer3', 'answer4'],
              'answer2'),
    _question('ARC-Easy', ['answer1', 'answer2'], 'answer1'),
    _question('ARC-Easy', ['answer1', 'answer2', 'answer3', 'answer4',
                           'answer5'], 'answer5'),
]
BOOLQ = [_question('boolq', ['true', 'false'], answer)
         for answer in ('true', 'false', 'true')]
WINOGRANDE = [_question('winogrande', ['option1', 'option2'], 'option2')]


def test_scorer_accuracy_is_known_by_construction():
  result = scoring.score_multiple_choice(fake_logprob_fn, TOKENIZER, ARC,
                                         'ARC-Easy', batch_size=3, max_len=512)
  assert result['predictions'] == ['answer3', 'answer3', 'answer1', 'answer3']
  assert result['predictions'] == [_expected(r, 'ARC-Easy') for r in ARC]
  assert result['accuracy'] == 0.5 and result['n'] == 4
  assert [len(s) for s in result['scores']] == [4, 4, 2, 5]
  boolq = scoring.score_multiple_choice(fake_logprob_fn, TOKENIZER, BOOLQ,
                                        'boolq', batch_size=4, max_len=512)
  assert boolq['predictions'] == ['true'] * 3
  assert boolq['predictions'] == [_expected(r, 'boolq') for r in BOOLQ]
  assert boolq['accuracy'] == pytest.approx(2 / 3)


def test_evaluate_tasks_averages_the_tasks_present(tmp_path):
  for task, records in (('ARC-Easy', ARC), ('boolq', BOOLQ),
                        ('winogrande', WINOGRANDE)):
    os.makedirs(tmp_path / task)
    _write(tmp_path / task / 'test.json', records)
  results = scoring.evaluate_tasks(fake_logprob_fn, TOKENIZER, str(tmp_path),
                                   batch_size=4, max_len=512)
  assert results == pytest.approx({'boolq': 2 / 3, 'winogrande': 0.0,
                                   'ARC-Easy': 0.5,
                                   'average': (2 / 3 + 0.0 + 0.5) / 3})
  first = scoring.evaluate_tasks(fake_logprob_fn, TOKENIZER, str(tmp_path),
                                 ['ARC-Easy'], max_records=1, max_len=512)
  assert first == {'ARC-Easy': 1.0, 'average': 1.0}


def test_the_tasks_label_sets_are_llm_adapters():
  assert scoring.TASKS == tuple(scoring.LABELS)
  assert scoring.LABELS['boolq'] == ('true', 'false')
  assert scoring.LABELS['ARC-Challenge'][-1] == 'answer5'
  record = {'instruction': 'Pick.', 'output': '', 'answer': 'ending2'}
  assert scoring.answer_choices(record, 'hellaswag') == [
      'ending1', 'ending2', 'ending3', 'ending4']  # no "Answer format:"


def test_bad_scorer_inputs_stop_with_one_line(tmp_path):
  cases = [
      ([_question('boolq', ['true', 'false'], 'yes')], 'boolq',
       "record 0 has answer 'yes', not one of its labels true/false"),
      ([_question('piqa', ['solution1', 'answer2'], 'solution1')], 'piqa',
       "record 0: its answer format offers 'answer2', not a piqa label"),
      (BOOLQ, 'squad', "unknown task 'squad'"),
      (BOOLQ[:1] + [_question('boolq', ['true', 'false'], 'true', 'Q' * 600)],
       'boolq', 'record 1 is '),
  ]
  for records, task, expected in cases:
    with pytest.raises(DataError) as error:
      scoring.score_multiple_choice(fake_logprob_fn, TOKENIZER, records, task,
                                    max_len=512)
    assert expected in one_line(error)
  long = BOOLQ[:1] + [_question('boolq', ['true', 'false'], 'true', 'Q' * 600)]
  truncated = scoring.score_multiple_choice(
      fake_logprob_fn, TOKENIZER, long, 'boolq', max_len=512, truncate=True)
  assert truncated['n'] == 2
  with pytest.raises(DataError) as error:
    scoring.evaluate_tasks(fake_logprob_fn, TOKENIZER, str(tmp_path))
  assert 'has none of boolq, piqa' in one_line(error)
  with pytest.raises(DataError) as error:
    scoring.evaluate_tasks(fake_logprob_fn, TOKENIZER, str(tmp_path / 'no'))
  assert 'does not exist' in one_line(error)


def test_batched_scorer_equals_one_unpadded_sequence_at_a_time_on_llama3():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tunix.models.llama3 import model as llama3
  config = llama3.ModelConfig(
      num_layers=2, vocab_size=TOKENIZER.vocab_size, embed_dim=32,
      hidden_dim=64, num_heads=2, head_dim=16, num_kv_heads=1,
      rope_theta=10_000, norm_eps=1e-5, weight_tying=True)
  # One compilation for the whole random init, not one per parameter.
  graphdef, state = nnx.split(
      nnx.jit(lambda: llama3.Llama3(config, rngs=nnx.Rngs(0)))())

  def logprobs(state, tokens, mask):
    causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = nnx.merge(graphdef, state)(
        tokens, positions, None, causal & mask[:, None, :])
    return jax.nn.log_softmax(logits.astype(jnp.float32))

  # Rows of 360 to 410 tokens: one padded shape (512), one compilation.
  records = [dict(r, instruction='A longer question, ' * 5 + r['instruction'])
             for r in ARC[:3]]
  records.append(_question('ARC-Easy', ['answer1', 'answer2'], 'answer2',
                           'The longest question, ' * 7))
  logprob_fn = jax.jit(functools.partial(logprobs, state))
  batched = scoring.score_multiple_choice(
      logprob_fn, TOKENIZER, records, 'ARC-Easy', batch_size=3, max_len=512)
  # The reference: each row on its own, no padding mask, followed by random
  # tokens (attention is causal, so they cannot change the row's own
  # log-probabilities), beside two rows of random tokens: the shape of the
  # scorer's longer batches, so no new compilation.
  junk = np.random.default_rng(0).integers(0, 256, (3, 512))
  for record, scores in zip(records, batched['scores']):
    for label, score in zip(scoring.answer_choices(record, 'ARC-Easy'),
                            scores):
      context, continuation = data.encode_prompt_response(
          TOKENIZER, data.prompt(record), scoring.response(record, label),
          eos=False)
      row = context + continuation
      tokens = junk.copy()
      tokens[1, :len(row)] = row
      alone = np.asarray(logprob_fn(jnp.asarray(tokens),
                                    jnp.ones(tokens.shape, bool))[1])
      expected = sum(alone[len(context) + k - 1, token]
                     for k, token in enumerate(continuation))
      np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-4)
  assert len({round(s, 3) for s in batched['scores'][0]}) > 1
