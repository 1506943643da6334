"""The character-substitution attack against a brute-force search, its candidates, its metrics."""

import itertools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from builders import CHAR_CJK as CJK, CHAR_H as H, CHAR_L as L, CHAR_N as N
from builders import CHAR_V as V, CHAR_VOCAB as VOCAB, FIRST_CJK
from builders import additive_model, char_texts as texts, per_example_ce, pooled_model, random_pinyin
from tfadv.attacks.char_substitution import CharSubstitutionAttack, attackable, pinyin_table
from tfadv.data.vocab import SPECIAL_TOKENS
from tfadv.experiment import build_trainer
from tfadv.data.pipeline import distributed_dataset

class Task:
  """The parts of the task contract the attack reads (`prepare`, `examples`)."""
  label_names = ["neg", "pos"]
  vocabulary = staticmethod(lambda: VOCAB)
  split_batch = staticmethod(lambda b: ({k: b[k] for k in ("token_ids", "padding_mask")},
                                        b["label"]))
  per_example_loss = staticmethod(per_example_ce)


def brute_force(model, inputs, labels, candidates, budget):
  """Fewest changes (≤ budget) that flip each clean-correct example, by trying
  every set of positions and every candidate at each; None when none does."""
  ids, mask = inputs["token_ids"], inputs["padding_mask"]
  clean = np.argmax(model(inputs).numpy(), -1)
  answers = []
  for n in range(len(ids)):
    if clean[n] != labels[n]:
      answers.append("skipped")
      continue
    positions = [i for i in range(L) if mask[n, i] and candidates[n][i]]
    found = None
    for size in range(1, budget + 1):
      trials = []
      for chosen in itertools.combinations(positions, size):
        for characters in itertools.product(*(candidates[n][i] for i in chosen)):
          text = ids[n].copy()
          text[list(chosen)] = characters
          trials.append(text)
      if not trials:
        break
      trials = np.stack(trials)
      logits = model({"token_ids": trials, "padding_mask": np.repeat(
          mask[n:n + 1], len(trials), 0)}).numpy()
      if np.any(np.argmax(logits, -1) != labels[n]):
        found = size
        break
    answers.append(found)
  return answers


def candidate_sets(model, inputs, pinyin, k):
  """Per position: same-sound ids plus the k nearest CJK ids by Euclidean
  distance in the embedding table (numpy)."""
  table = model.get_layer("token_embedding").embeddings.numpy()
  allowed = attackable(VOCAB)
  sets = []
  for row in inputs["token_ids"]:
    per_position = []
    for token in row:
      if not allowed[token]:
        per_position.append([])
        continue
      same = [c for c in pinyin[token] if c >= 0]
      distance = ((table - table[token]) ** 2).sum(-1)
      order = [c for c in np.argsort(distance, kind="stable") if allowed[c] and c != token]
      per_position.append(sorted(set(same) | set(order[:k])))
    sets.append(per_position)
  return sets


@pytest.mark.parametrize("budget", [1, 2])
def test_greedy_attack_equals_brute_force_on_an_additive_model(budget):
  model = additive_model()
  inputs = texts()
  clean = np.argmax(model(inputs).numpy(), -1)
  labels = clean.copy()
  labels[:4] = 1 - labels[:4]  # a few the model gets wrong: skipped
  pinyin = random_pinyin()
  attack = CharSubstitutionAttack(budget=budget, max_fraction=1.0, embedding_candidates=2,
                                  top_k=6)
  attack.set_vocabulary(VOCAB, pinyin=pinyin)
  logits, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                             per_example_ce)
  want = brute_force(model, inputs, labels, candidate_sets(model, inputs, pinyin, 2), budget)
  broken = np.argmax(logits.numpy(), -1) != labels
  changed = extra["changed"].numpy()
  for n, answer in enumerate(want):
    if answer == "skipped":
      assert changed[n] == 0 and extra["queries"].numpy()[n] == 1
    elif answer is None:
      assert not broken[n], n
    else:
      assert broken[n] and changed[n] == answer, (n, answer, changed[n])
  assert sum(a not in (None, "skipped") for a in want) >= 3  # the test has teeth
  assert sum(a is None for a in want) >= 1 or budget == 2
  # The logits are the attacked texts' own.
  np.testing.assert_allclose(
      logits.numpy(), model({**inputs, "token_ids": extra["token_ids"].numpy()}).numpy(), rtol=1e-5)


@pytest.mark.parametrize("nearest", [0, 1, 3, len(CJK)])
def test_candidates_are_the_same_sound_row_then_the_nearest_cjk_rows(nearest):
  """Every position's candidates, by hand: its same-pinyin row (−1 padded),
  then its `nearest` closest CJK rows of the embedding table by Euclidean
  distance, closest first, never itself, with −1 for one already among the
  same-sound ones or for a slot no CJK row is left for (`nearest` = all CJK)."""
  model = additive_model(3)
  table = model.get_layer("token_embedding").embeddings.numpy()
  ids = texts(3)["token_ids"][:4]
  pinyin = random_pinyin(3)
  attack = CharSubstitutionAttack(embedding_candidates=nearest)
  attack.set_vocabulary(VOCAB, pinyin=pinyin)
  got = attack.candidates(tf.constant(table), tf.constant(ids)).numpy()
  assert got.shape == ids.shape + (3 + nearest,)
  allowed = attackable(VOCAB)
  for n, row in enumerate(ids):
    for i, token in enumerate(row):
      distance = ((table - table[token]) ** 2).sum(-1)
      order = [c for c in np.argsort(distance, kind="stable") if allowed[c] and c != token]
      want = [-1 if c in pinyin[token] else c for c in order[:nearest]]
      want += [-1] * (nearest - len(want))
      assert got[n, i].tolist() == pinyin[token].tolist() + want, (n, i)
  if nearest:
    assert (got[..., 3:] >= 0).mean() > 0.5  # the neighbours are there


def test_substitutions_stay_on_cjk_characters_of_the_vocabulary():
  model = additive_model(1)
  inputs = texts(1)
  labels = np.argmax(model(inputs).numpy(), -1)
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(1))
  logits, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                             per_example_ce)
  before, after = inputs["token_ids"], extra["token_ids"].numpy()
  assert after.shape == before.shape  # length and padding unchanged
  moved = before != after
  assert moved.any() and not moved[~inputs["padding_mask"]].any()
  allowed = attackable(VOCAB)
  assert allowed[before[moved]].all() and allowed[after[moved]].all()
  np.testing.assert_array_equal(moved.sum(1), extra["changed"].numpy())
  held = np.argmax(logits.numpy(), -1) == labels
  assert held.any()  # an unbroken example keeps its label
  np.testing.assert_array_equal(
      np.argmax(model({**inputs, "token_ids": after}).numpy(), -1)[held], labels[held])


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_budget_is_at_most_a_tenth_of_the_characters(rule):
  model = additive_model(2)
  inputs = texts(2)  # 9 to 11 characters (special tokens excluded)
  labels = np.argmax(model(inputs).numpy(), -1)
  attack = CharSubstitutionAttack(budget=2, budget_rule=rule)  # max_fraction 0.1
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(2))
  _, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                        per_example_ce)
  characters = (inputs["padding_mask"] & (inputs["token_ids"] != 2)).sum(1)
  share = (np.floor(0.1 * characters) if rule == "floor"
           else np.maximum(np.ceil(0.1 * characters), 1))  # 0 or 1 / 1 or 2 changes
  allowed_changes = np.minimum(2, share)
  assert np.all(extra["changed"].numpy() <= allowed_changes)
  assert np.all(extra["changed"].numpy()[allowed_changes == 0] == 0)
  assert np.all(extra["queries"].numpy()[allowed_changes == 0] == 1)
  # One verified batch of top_k texts per change the budget allows, at most.
  assert np.all(extra["queries"].numpy() <= 1 + attack.top_k * allowed_changes)
  assert np.any(extra["queries"].numpy() > 1)


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_the_beam_keeps_to_each_sentences_budget(rule):
  """The beam search changes no more characters than the sentence's budget
  (min(B, its share)): a sentence of 9 characters gets none under "floor"."""
  model = pooled_model(lambda pooled: keras.layers.Dense(2)(
      keras.layers.Dense(16, activation="tanh")(pooled)), 2)
  inputs = texts(2)
  labels = np.argmax(model(inputs).numpy(), -1)
  attack = CharSubstitutionAttack(budget=2, budget_rule=rule, search="beam", max_fraction=0.1,
                                  embedding_candidates=4)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(2, width=6))
  logits, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                             per_example_ce)
  characters = (inputs["padding_mask"] & (inputs["token_ids"] != 2)).sum(1)
  share = (np.floor(0.1 * characters) if rule == "floor"
           else np.maximum(np.ceil(0.1 * characters), 1))
  allowed_changes = np.minimum(2, share)
  changed = (extra["token_ids"].numpy() != inputs["token_ids"]).sum(1)
  assert np.all(changed <= allowed_changes) and np.all(extra["changed"].numpy() == changed)
  broken = np.argmax(logits.numpy(), -1) != labels
  assert broken.any() and not broken[allowed_changes == 0].any()


def test_an_example_with_fewer_candidates_than_top_k_verifies_only_those():
  """One attackable character with 3 same-sound candidates, top_k 8: the
  round verifies those 3 (4 queries with the clean one) and keeps the one of
  highest loss if it raises the loss (by hand), nothing else."""
  model = additive_model(4)
  pinyin = random_pinyin(4)
  ids = np.zeros((len(CJK), L), np.int32)
  ids[:, :5] = [VOCAB.index("[CLS]"), 0, VOCAB.index("，"), VOCAB.index("a"), VOCAB.index("1")]
  ids[:, 1] = np.arange(FIRST_CJK, V)  # every CJK character once
  mask = np.zeros((len(CJK), L), bool)
  mask[:, :5] = True
  inputs = {"token_ids": ids, "padding_mask": mask}
  labels = np.argmax(model(inputs).numpy(), -1)
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, embedding_candidates=0, top_k=8)
  attack.set_vocabulary(VOCAB, pinyin=pinyin)
  _, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                        per_example_ce)
  np.testing.assert_array_equal(extra["queries"].numpy(), 1 + 3)
  loss = lambda text: per_example_ce(labels, model({**inputs, "token_ids": text})).numpy()
  clean = loss(ids)
  tried = []
  for slot in range(3):
    text = ids.copy()
    text[:, 1] = pinyin[ids[:, 1], slot]
    tried.append((loss(text), text))
  best = np.argmax(np.stack([t[0] for t in tried]), 0)
  for n in range(len(ids)):
    raised = tried[best[n]][0][n] > clean[n]
    want = tried[best[n]][1][n] if raised else ids[n]
    np.testing.assert_array_equal(extra["token_ids"].numpy()[n], want)
    assert extra["changed"].numpy()[n] == int(raised)
  assert extra["changed"].numpy().sum() > 0


def test_a_substitution_that_lowers_the_loss_is_not_kept():
  """Every text holds the character that is worst for its (true) class, so any
  substitution lowers the loss: nothing changes, the candidates were queried."""
  model = additive_model()
  table = np.zeros((V, H), np.float32)
  table[FIRST_CJK:, 0] = np.arange(V - FIRST_CJK) + 1.0  # 中 is the lowest CJK value
  model.get_layer("token_embedding").embeddings.assign(table)
  dense = model.layers[-1]
  kernel = np.zeros((H, 2), np.float32)
  kernel[0] = [-1.0, 1.0]  # logit 1 − logit 0 = 2·Σ values: class 1 everywhere
  dense.set_weights([kernel, np.zeros(2, np.float32)])
  inputs = texts()
  inputs["token_ids"] = np.where(attackable(VOCAB)[inputs["token_ids"]], FIRST_CJK,
                                 inputs["token_ids"]).astype(np.int32)
  labels = np.ones(N, np.int32)
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, top_k=4)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin())
  _, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                        per_example_ce)
  np.testing.assert_array_equal(extra["token_ids"].numpy(), inputs["token_ids"])
  assert np.all(extra["changed"].numpy() == 0)
  assert np.all(extra["queries"].numpy() == 1 + 4)  # one round tried, then stopped


def test_pinyin_table_groups_homophones_and_leaves_other_tokens_out():
  table = pinyin_table(VOCAB, max_candidates=4)
  index = VOCAB.index
  assert set(table[index("中")]) - {-1} == {index("钟"), index("忠")}
  # 行 reads xing and hang: 星 and 航; 的 reads de, di (and others): 得, 地, 第.
  assert {index("星"), index("航")} <= set(table[index("行")])
  assert {index("得"), index("地")} <= set(table[index("的")])
  for token in list(SPECIAL_TOKENS) + ["a", "1", "，"]:
    assert np.all(table[index(token)] == -1)
  assert attackable(VOCAB).sum() == len(CJK)


def test_attack_defaults_are_the_documented_ones():
  """What a config that binds nothing gets (the class docstring): B = 2, at
  most 10% of the characters rounded up, 8 + 8 candidates, 8 verified per
  round, greedy; a beam of 10 over 4 examples at a time; keras-hub's names."""
  assert CharSubstitutionAttack().get_config() == {
      "budget": 2, "max_fraction": 0.1, "budget_rule": "ceil", "search": "greedy",
      "beam_width": 10, "beam_examples": 4, "pinyin_candidates": 8,
      "embedding_candidates": 8, "top_k": 8, "token_ids_key": "token_ids",
      "padding_mask_key": "padding_mask", "layer_name": "token_embedding"}


def test_one_kind_of_candidate_is_enough_and_none_is_refused():
  from tfadv.errors import SettingError  # pylint: disable=g-import-not-at-top
  for pinyin, nearest in ((1, 0), (0, 1)):
    attack = CharSubstitutionAttack(pinyin_candidates=pinyin, embedding_candidates=nearest)
    assert (attack.pinyin_candidates, attack.embedding_candidates) == (pinyin, nearest)
  with pytest.raises(SettingError, match="pinyin_candidates = 0 and embedding_candidates = 0: "
                                         "expected at least one candidate"):
    CharSubstitutionAttack(pinyin_candidates=0, embedding_candidates=0)


def test_the_pinyin_table_is_cached_in_the_model_dir_per_vocabulary_and_width(tmp_path,
                                                                            monkeypatch):
  """Built once per (vocabulary, width) and kept in the model dir as
  `char_substitution_pinyin.npz`; another vocabulary or width rebuilds it (and
  replaces the file); without a model dir nothing is written."""
  from tfadv.attacks import char_substitution  # pylint: disable=g-import-not-at-top
  built = []
  real = char_substitution.pinyin_table
  monkeypatch.setattr(char_substitution, "pinyin_table",
                      lambda vocabulary, width: built.append((len(vocabulary), width))
                      or real(vocabulary, width))
  cached = lambda vocabulary, width, where=str(tmp_path): char_substitution.cached_pinyin_table(
      vocabulary, width, where)
  first = cached(VOCAB, 4)
  np.testing.assert_array_equal(first, real(VOCAB, 4))
  assert os.listdir(tmp_path) == ["char_substitution_pinyin.npz"] and built == [(V, 4)]
  np.testing.assert_array_equal(cached(VOCAB, 4), first)  # read back, not rebuilt
  assert built == [(V, 4)]
  np.testing.assert_array_equal(cached(VOCAB, 3), real(VOCAB, 3))  # another width
  shorter = VOCAB[:-1]  # another vocabulary
  np.testing.assert_array_equal(cached(shorter, 3), real(shorter, 3))
  assert built == [(V, 4), (V, 3), (V - 1, 3)]
  np.testing.assert_array_equal(cached(shorter, 3), real(shorter, 3))
  assert len(built) == 3  # the file now holds the last one
  np.testing.assert_array_equal(cached(VOCAB, 4, None), first)
  assert len(built) == 4 and os.listdir(tmp_path) == ["char_substitution_pinyin.npz"]


def test_the_vocabulary_gives_the_attack_pypinyins_table_of_its_width(tmp_path):
  """`prepare`/`set_vocabulary` without a table of the test's: pypinyin's
  same-sound table, `pinyin_candidates` wide, cached in the model dir; before
  it, attacking says what to call."""
  model = additive_model()
  inputs = texts()
  attack = CharSubstitutionAttack(pinyin_candidates=3, embedding_candidates=0)
  with pytest.raises(ValueError, match=r"no vocabulary: .*prepare\(task, model_dir\).*"
                                       r"set_vocabulary\(tokens\)"):
    attack.adversarial_outputs(model, inputs, tf.zeros([N], tf.int32), None, per_example_ce)

  attack.prepare(Task, str(tmp_path))
  table = model.get_layer("token_embedding").embeddings
  got = attack.candidates(table, tf.constant(inputs["token_ids"])).numpy()
  np.testing.assert_array_equal(got, pinyin_table(VOCAB, 3)[inputs["token_ids"]])
  assert os.listdir(tmp_path) == ["char_substitution_pinyin.npz"]


def test_a_reader_sees_wordpieces_joined_and_special_tokens_dropped():
  from tfadv.attacks.char_substitution import _detokenize  # pylint: disable=g-import-not-at-top
  vocabulary = ["[PAD]", "[CLS]", "[SEP]", "中", "##国", "ab", "##cd", "1"]
  assert _detokenize([1, 3, 4, 5, 6, 7, 2, 0], vocabulary) == "中国abcd1"


def test_the_attack_queries_the_model_in_inference_mode():
  """With a heavy dropout between the pooled embeddings and the head, the
  attack (inference mode) finds what it finds on the same model without it;
  `adversarial_logits` are the logits of the texts it returns."""
  make = lambda dropout: pooled_model(lambda pooled: keras.layers.Dense(2)(
      keras.layers.Dropout(0.9, seed=1)(pooled) if dropout else pooled))
  inputs = texts()
  plain, with_dropout = make(False), make(True)
  labels = tf.constant(np.argmax(plain(inputs).numpy(), -1).astype(np.int32))
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin())
  want, extra = attack.adversarial_outputs(plain, inputs, labels, None, per_example_ce)
  assert extra["changed"].numpy().sum() > 0
  got = attack.adversarial_logits(with_dropout, inputs, labels, None, per_example_ce)
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      got.numpy(), plain({**inputs, "token_ids": extra["token_ids"].numpy()}).numpy(), rtol=1e-5,
      atol=1e-6)

  rows = attack.examples(with_dropout, Task, {**inputs, "label": labels.numpy()}, count=N)
  assert [row["prediction"] for row in rows] == [
      Task.label_names[p] for p in np.argmax(plain(inputs).numpy(), -1)]
  assert [row["prediction_after"] for row in rows] == [
      Task.label_names[p] for p in np.argmax(want.numpy(), -1)]


def test_trainer_reports_textattack_metrics(mirrored):
  inputs = texts(3)
  model_start = additive_model(3)
  labels = np.argmax(model_start(inputs).numpy(), -1).astype(np.int32)
  labels[:3] = 1 - labels[:3]
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(3))
  logits, extra = attack.adversarial_outputs(model_start, inputs, tf.constant(labels), None,
                                             per_example_ce)
  clean = np.argmax(model_start(inputs).numpy(), -1) == labels
  held = clean & (np.argmax(logits.numpy(), -1) == labels)
  broken = clean & ~held
  weights = model_start.get_weights()

  def build():
    model = additive_model(3)
    model.set_weights(weights)
    return model

  for strategy in (tf.distribute.get_strategy(), mirrored):
    trainer = build_trainer(build, None, global_batch_size=N, strategy=strategy,
                            split_batch=lambda b: ({k: b[k] for k in ("token_ids",
                                                                      "padding_mask")},
                                                   b["label"]),
                            eval_attacks={"sub": attack})
    arrays = {**inputs, "label": labels}
    metrics = trainer.evaluate(iter(distributed_dataset(trainer.strategy, arrays, N,
                                                        shuffle=False)), 1)
    assert metrics["accuracy"] == pytest.approx(clean.mean())
    assert metrics["accuracy_sub"] == pytest.approx(held.mean())  # failed / total
    assert metrics["success_rate_sub"] == pytest.approx(broken.sum() / clean.sum())
    assert metrics["sub_changed"] == pytest.approx(extra["changed"].numpy()[broken].mean())
    assert metrics["sub_queries"] == pytest.approx(extra["queries"].numpy()[clean].mean())


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_attack_compiles_with_xla_to_the_same_substitutions(search):
  model = additive_model(4)
  inputs = {k: tf.constant(v) for k, v in texts(4).items()}
  labels = tf.constant(np.argmax(model(inputs).numpy(), -1).astype(np.int32))
  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, search=search, beam_examples=3)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin(4))
  eager = attack.adversarial_outputs(model, inputs, labels, None, per_example_ce)[1]
  compiled = tf.function(lambda i, y: attack.adversarial_outputs(model, i, y, None,
                                                                 per_example_ce)[1],
                         jit_compile=True)
  got = compiled(inputs, labels)
  assert "HloModule" in compiled.experimental_get_compiler_ir(inputs, labels)(stage="hlo")
  # XLA's float sums can order near-tied candidates differently: the same
  # examples break with the same number of changes and queries, and the texts
  # agree except where two candidates tie.
  for key in ("changed", "queries"):
    np.testing.assert_array_equal(got[key].numpy(), eager[key].numpy())
  same = np.all(got["token_ids"].numpy() == eager["token_ids"].numpy(), axis=1)
  assert same.mean() >= 0.9
  predict = lambda ids: np.argmax(model({**inputs, "token_ids": ids}).numpy(), -1)
  np.testing.assert_array_equal(predict(got["token_ids"]), predict(eager["token_ids"]))
  assert eager["changed"].numpy().sum() > 0


def test_examples_for_a_reader_show_each_substitution():
  model = additive_model()
  inputs = texts()
  labels = np.argmax(model(inputs).numpy(), -1).astype(np.int32)
  labels[0] = 1 - labels[0]  # wrong already: skipped

  attack = CharSubstitutionAttack(budget=2, max_fraction=1.0)
  attack.set_vocabulary(VOCAB, pinyin=random_pinyin())
  rows = attack.examples(model, Task, {**inputs, "label": labels}, count=10, batch_size=4)
  _, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                        per_example_ce)
  assert len(rows) == 10 and rows[0]["result"] == "skipped"
  first = inputs["token_ids"][1][inputs["padding_mask"][1]]
  assert rows[1]["text"] == "".join(VOCAB[i] for i in first[1:])  # [CLS] dropped
  for n, row in enumerate(rows):
    assert row["changed"] == int(extra["changed"].numpy()[n])
    differ = sum(a != b for a, b in zip(row["text"], row["adversarial"]))
    assert differ == row["changed"] and len(row["text"]) == len(row["adversarial"])
    assert row["label"] == Task.label_names[labels[n]]
    assert (row["result"] == "successful") == (row["prediction_after"] != row["label"]
                                               and row["result"] != "skipped")
  assert any(row["result"] == "successful" for row in rows)


@pytest.mark.slow
def test_a_text_run_reports_the_attack_and_writes_examples(fewclue_dir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import builders  # pylint: disable=g-import-not-at-top
  bindings = builders.tnews_bindings(fewclue_dir, train_steps=20, attack_examples=6)
  bindings += ["Experiment.eval_attacks = {'sub2': @CharSubstitutionAttack()}"]
  results = builders.run("train_and_evaluate", tmp_path, tf.distribute.get_strategy(),
                         bindings)
  record = json.load(open(tmp_path / "eval_results_dev.json"))
  for key in ("accuracy_sub2", "success_rate_sub2", "sub2_changed", "sub2_queries"):
    assert record[key] == pytest.approx(results["eval"][key])
  assert record["accuracy_sub2"] <= record["accuracy"] and record["sub2_queries"] >= 1
  cache = tmp_path / "char_substitution_pinyin.npz"
  assert cache.exists()
  rows = [json.loads(line) for line in open(tmp_path / "attack_examples_dev_sub2.jsonl",
                                             encoding="utf-8")]
  assert len(rows) == 6 and all(row["text"] for row in rows)
  # Spread over dev (which lists its records grouped by label), not its first 6.
  task = results["experiment"].task
  labels = task.source("eval").rows(np.arange(task.source("eval").num_examples))["label"]
  spaced = np.linspace(0, len(labels) - 1, 6).round().astype(int)
  assert [row["label"] for row in rows] == [task.label_names[labels[i]] for i in spaced]
  assert len({row["label"] for row in rows}) > 1 and len(set(labels[:6])) == 1
  # Evaluating again reads the cached table (the file is not rewritten); with
  # an eval_tag (the methods table's attack pass, its bindings) the evaluation
  # has its own records and the training's are untouched.
  before = os.stat(cache).st_mtime_ns
  training = (tmp_path / "eval_results_dev.json").read_text()
  tagged = builders.tnews_bindings(fewclue_dir, train_steps=20, attack_examples=3) + [
      "Experiment.eval_attacks = {'sub1': @sub1/CharSubstitutionAttack(), "
      "'sub2': @sub2/CharSubstitutionAttack()}",
      "sub1/CharSubstitutionAttack.budget = 1", "sub2/CharSubstitutionAttack.budget = 2",
      "Experiment.eval_tag = 'attacks'"]
  again = builders.run("evaluate", tmp_path, tf.distribute.get_strategy(), tagged)
  assert os.stat(cache).st_mtime_ns == before
  assert (tmp_path / "eval_results_dev.json").read_text() == training
  # The training's operative config stays; the evaluation's is its own.
  assert "eval_tag = 'attacks'" not in (tmp_path / "operative_config.gin").read_text()
  assert "eval_tag = 'attacks'" in (
      tmp_path / "operative_config_evaluate_dev_attacks.gin").read_text()
  record = json.load(open(tmp_path / "eval_results_dev_attacks.json"))
  assert record["tag"] == "attacks" and record["split"] == "dev"
  assert record["accuracy"] == pytest.approx(json.loads(training)["accuracy"])
  assert record["accuracy_sub2"] <= record["accuracy_sub1"] <= record["accuracy"]
  for key in ("accuracy_sub1", "accuracy_sub2", "sub1_queries", "sub2_changed"):
    assert record[key] == pytest.approx(again["eval"][key])
  for name in ("sub1", "sub2"):
    rows = (tmp_path / f"attack_examples_dev_attacks_{name}.jsonl").read_text().splitlines()
    assert len(rows) == 3


@pytest.mark.parametrize("rule,want", [
    # TextAttack's MaxWordsPerturbed: max(ceil(10% of n), 1); n = 0 has nothing to change.
    ("ceil", [0, 1, 1, 1, 1, 2, 2, 2, 3]),
    ("floor", [0, 0, 0, 0, 1, 1, 1, 2, 2]),
])
def test_sentence_budget_follows_its_rule(rule, want):
  characters = [0, 1, 5, 9, 10, 11, 19, 20, 25]
  attack = CharSubstitutionAttack(budget=2, max_fraction=0.1, budget_rule=rule)
  got = attack.sentence_budget(tf.constant(characters, tf.float32)).numpy()
  assert got.tolist() == want


def interaction_model():
  """logits = [0, −1 + 10·p₀·p₁], p = Σ_i mask_i E[x_i]: no single character
  moves p₀·p₁ far, two of the right ones do. Greedy is provably not optimal
  here (test below): its best first step is a dead end."""
  model = pooled_model(keras.layers.Lambda(lambda p: tf.stack(
      [tf.zeros_like(p[:, 0]), -1.0 + 10.0 * p[:, 0] * p[:, 1]], -1)))
  table = np.zeros((V, H), np.float32)
  a, b, c = (VOCAB.index(ch) for ch in "钟忠国")
  table[a, 0] = 1.0            # alone: p₀·p₁ = 0
  table[b, 1] = 1.0            # alone: 0; with a: 1 (flips)
  table[c, :2] = 0.05          # alone: the highest loss; with anything: no flip
  model.get_layer("token_embedding").embeddings.assign(table)
  return model, (a, b, c)


def test_beam_search_breaks_what_brute_force_breaks_where_greedy_provably_cannot():
  model, (a, b, c) = interaction_model()
  ids = np.full((2, L), VOCAB.index("中"), np.int32)
  ids[:, 0] = VOCAB.index("[CLS]")
  mask = np.ones((2, L), bool)
  mask[:, 5:] = False
  ids[~mask] = 0
  inputs = {"token_ids": ids, "padding_mask": mask}
  labels = np.zeros(2, np.int32)
  assert np.all(np.argmax(model(inputs).numpy(), -1) == labels)
  pinyin = np.full((V, 3), -1, np.int32)
  pinyin[VOCAB.index("中")] = [a, b, c]
  candidates = [[([a, b, c] if mask[n, i] and i > 0 else []) for i in range(L)]
                for n in range(2)]
  assert brute_force(model, inputs, labels, candidates, 2) == [2, 2]
  results = {}
  for search in ("greedy", "beam", "beam, one example at a time"):
    # top_k = every (position, character): greedy verifies every single
    # substitution, takes the best (c), and no second one then flips.
    attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, embedding_candidates=0,
                                    pinyin_candidates=3, top_k=4 * 3, search=search.split(",")[0],
                                    beam_examples=1 if "one" in search else 4)
    attack.set_vocabulary(VOCAB, pinyin=pinyin)
    logits, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                               per_example_ce)
    results[search] = (np.argmax(logits.numpy(), -1), extra)
  assert np.all(results["greedy"][0] == labels)   # greedy: nothing broken
  assert np.all(results["beam"][0] != labels)     # beam: both, as brute force
  np.testing.assert_array_equal(results["beam, one example at a time"][1]["token_ids"],
                                results["beam"][1]["token_ids"])
  beam_ids = results["beam"][1]["token_ids"].numpy()
  assert results["beam"][1]["changed"].numpy().tolist() == [2.0, 2.0]
  for row in beam_ids:
    assert sorted(row[1:5][row[1:5] != VOCAB.index("中")].tolist()) == sorted([a, b])
  # Every single substitution verified (4 positions × 3), then each of the
  # 10 kept texts' further ones (3 positions × 3), plus greedy's queries (the
  # clean text, 12 single substitutions, then 9 on top of c).
  np.testing.assert_array_equal(results["greedy"][1]["queries"].numpy(), 1 + 12 + 9)
  np.testing.assert_array_equal(results["beam"][1]["queries"].numpy(), 1 + 12 + 9 + 12 + 10 * 9)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_wide_beam_is_brute_force_and_beam_never_trails_greedy(seed):
  """Random tanh-MLP models: with every single substitution kept, two rounds
  are an exhaustive search (brute force's fewest changes, example by
  example); with the default width, every example greedy breaks is broken."""
  model = pooled_model(lambda pooled: keras.layers.Dense(2)(
      keras.layers.Dense(16, activation="tanh")(pooled)), seed)
  inputs = texts(seed)
  labels = np.argmax(model(inputs).numpy(), -1)
  labels[::4] = 1 - labels[::4]  # some examples wrong before the attack: skipped
  pinyin = random_pinyin(seed)
  want = brute_force(model, inputs, labels, candidate_sets(model, inputs, pinyin, 2), 2)

  def attacked(search, width):
    attack = CharSubstitutionAttack(budget=2, max_fraction=1.0, embedding_candidates=2,
                                    top_k=2, search=search, beam_width=width)
    attack.set_vocabulary(VOCAB, pinyin=pinyin)
    logits, extra = attack.adversarial_outputs(model, inputs, tf.constant(labels), None,
                                               per_example_ce)
    broken = np.argmax(logits.numpy(), -1) != labels
    changed = extra["changed"].numpy()
    return ["skipped" if w == "skipped" else (int(changed[n]) if broken[n] else None)
            for n, w in enumerate(want)]

  assert attacked("beam", 10_000) == want
  greedy, beam = attacked("greedy", 10), attacked("beam", 10)
  assert all(b is not None for g, b in zip(greedy, beam) if g not in (None, "skipped"))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_beam_attacks_greedys_survivors_alone_in_chunks_that_change_nothing(seed,
                                                                                 monkeypatch):
  """The beam search sees only the examples right before the attack that the
  greedy search left standing, `beam_examples` at a time; chunks of 1, 3 (the
  last one padded) or all at once give the same texts, counts and queries,
  and an example counts as broken when greedy or the beam breaks it (a
  reference: greedy's result, and the beam run on each survivor alone)."""
  model = pooled_model(lambda pooled: keras.layers.Dense(2)(
      keras.layers.Dense(16, activation="tanh")(pooled)), seed)
  inputs = texts(seed)
  labels = np.argmax(model(inputs).numpy(), -1)
  labels[::4] = 1 - labels[::4]  # wrong before the attack: never attacked
  pinyin = random_pinyin(seed)

  def attack(search, **kwargs):
    # top_k 1 at B = 1: greedy verifies one substitution, so it leaves some
    # examples standing (the beam breaks what greedy cannot in the test above).
    a = CharSubstitutionAttack(budget=1, max_fraction=1.0, embedding_candidates=2, top_k=1,
                               search=search, **kwargs)
    a.set_vocabulary(VOCAB, pinyin=pinyin)
    return a

  seen = []
  original = CharSubstitutionAttack._beam_examples

  def spy(self, model, inputs, labels, loss_fn, ids, candidates, position_ok, budget, active):
    seen.append(active.numpy().tolist())
    return original(self, model, inputs, labels, loss_fn, ids, candidates, position_ok,
                    budget, active)
  monkeypatch.setattr(CharSubstitutionAttack, "_beam_examples", spy)
  greedy_logits, greedy_extra = attack("greedy").adversarial_outputs(
      model, inputs, tf.constant(labels), None, per_example_ce)
  standing = ((np.argmax(model(inputs).numpy(), -1) == labels)
              & (np.argmax(greedy_logits.numpy(), -1) == labels))
  results = []
  for chunk in (1, 3, 1000):
    seen.clear()
    logits, extra = attack("beam", beam_examples=chunk).adversarial_outputs(
        model, inputs, tf.constant(labels), None, per_example_ce)
    results.append((np.argmax(logits.numpy(), -1), {k: v.numpy() for k, v in extra.items()}))
    # Every chunk is `chunk` examples (or the batch's), and together they
    # attack each survivor once.
    assert sum(sum(active) for active in seen) == standing.sum() > 0
    assert len(seen) == -(-standing.sum() // min(chunk, len(labels)))
  for prediction, extra in results[1:]:
    np.testing.assert_array_equal(prediction, results[0][0])
    for key in extra:
      np.testing.assert_array_equal(extra[key], results[0][1][key])
  beam_broken = results[0][0] != labels
  greedy_broken = np.argmax(greedy_logits.numpy(), -1) != labels
  assert np.all(beam_broken[greedy_broken]) and greedy_broken.sum() > 0
  # Where the beam broke nothing greedy had not, the text and count are greedy's.
  kept = ~(beam_broken & ~greedy_broken)
  for key in ("token_ids", "changed"):
    np.testing.assert_array_equal(results[0][1][key][kept], greedy_extra[key].numpy()[kept])
  assert greedy_extra["changed"].numpy()[kept & ~greedy_broken].any()  # kept, not undone
  # Each survivor alone: the beam breaks it exactly when it did in the batch.
  for n in np.flatnonzero(standing):
    alone = {k: v[n:n + 1] for k, v in inputs.items()}
    logits, _ = attack("beam").adversarial_outputs(model, alone, tf.constant(labels[n:n + 1]),
                                                   None, per_example_ce)
    assert (np.argmax(logits.numpy(), -1)[0] != labels[n]) == beam_broken[n]


def test_the_attack_gradient_is_loss_scaled_in_float16():
  """A confident float16 model's embedding gradient (≈ 1e-8) underflows to
  zero unless the loss is scaled, as every other evaluation attack scales it
  (`loss_scaling_by`, opened by the trainer's evaluation); with a zero
  gradient the greedy search verifies the wrong candidate (top_k = 1) and
  misses the one substitution that flips the prediction."""
  from tfadv.loss_scaling import loss_scaling_by  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    head = keras.layers.Dense(2)
    model = pooled_model(head)
    embedding = model.get_layer("token_embedding")
    table = np.zeros((V, H), np.float32)
    big = VOCAB.index("国")
    table[big, 0] = 2000.0  # 0.01 · 2000 = 20 > the margin of 14: flips
    embedding.embeddings.assign(table)
    head.kernel.assign(np.array([[0.0, 0.01]] + [[0.0, 0.0]] * (H - 1), np.float32))
    head.bias.assign(np.array([14.0, 0.0], np.float32))  # class 0, p(1) ≈ 8e-7
    ids = np.full((1, L), VOCAB.index("中"), np.int32)
    ids[0, 0] = VOCAB.index("[CLS]")
    mask = np.ones((1, L), bool)
    pinyin = np.full((V, 2), -1, np.int32)
    pinyin[VOCAB.index("中")] = [VOCAB.index("钟"), big]  # the flip is the second slot
    attack = CharSubstitutionAttack(budget=1, max_fraction=1.0, embedding_candidates=0,
                                    pinyin_candidates=2, top_k=1)
    attack.set_vocabulary(VOCAB, pinyin=pinyin)
    labels = tf.constant([0])
    with loss_scaling_by(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())):
      logits, extra = attack.adversarial_outputs(
          model, {"token_ids": ids, "padding_mask": mask}, labels, None, per_example_ce)
    assert int(np.argmax(logits.numpy(), -1)[0]) == 1, extra
    assert big in extra["token_ids"].numpy()[0]
  finally:
    keras.mixed_precision.set_global_policy("float32")
