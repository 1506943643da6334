"""Pretrained checkpoints: a Hugging Face-format BERT loads and gives the logits its weights define."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import builders
from tfadv.errors import MissingInputError, SettingError
from tfadv.models.bert import check_checkpoint_dir, checkpoint_kind
from tfadv.tasks.text import TextClassificationTask

TEXTS = [("今天天气很好", "不错"), ("我要退款", "怎么退货"), ("明天下雨", "我饿了")]


def _layer_norm(x, gamma, beta, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return gamma * (x - mean) / np.sqrt(var + eps) + beta


def _gelu(x, exact):
  if exact:  # Hugging Face's "gelu": x·Φ(x)
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def hf_bert_pooled(t, token_ids, segment_ids, mask, heads, exact_gelu, p="bert."):
  """BERT's forward pass written from the Hugging Face definition, in numpy,
  on the checkpoint's own tensors ([out, in] Linear weights)."""
  linear = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  positions = np.arange(token_ids.shape[1])
  x = (t[p + "embeddings.word_embeddings.weight"][token_ids]
       + t[p + "embeddings.position_embeddings.weight"][positions][None]
       + t[p + "embeddings.token_type_embeddings.weight"][segment_ids])
  x = _layer_norm(x, t[p + "embeddings.LayerNorm.weight"], t[p + "embeddings.LayerNorm.bias"])
  batch, length, hidden = x.shape
  d = hidden // heads
  layer = 0
  while f"{p}encoder.layer.{layer}.attention.self.query.weight" in t:
    q = f"{p}encoder.layer.{layer}."
    split = lambda y: y.reshape(batch, length, heads, d).transpose(0, 2, 1, 3)
    qs, ks, vs = (split(linear(x, q + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = qs @ ks.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask, 0.0, -1e9)[:, None, None]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = (weights @ vs).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
    x = _layer_norm(x + linear(context, q + "attention.output.dense"),
                    t[q + "attention.output.LayerNorm.weight"],
                    t[q + "attention.output.LayerNorm.bias"])
    h = _gelu(linear(x, q + "intermediate.dense"), exact_gelu)
    x = _layer_norm(x + linear(h, q + "output.dense"), t[q + "output.LayerNorm.weight"],
                    t[q + "output.LayerNorm.bias"])
    layer += 1
  return np.tanh(linear(x[:, 0], p + "pooler.dense"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf") / "tiny-bert")
  return directory, builders.write_tiny_hf_bert(directory)


def test_a_hugging_face_bert_gives_the_logits_its_weights_define(hf_dir, tmp_path):
  directory, tensors = hf_dir
  dataset = builders.TinyPairs(TEXTS)
  task = TextClassificationTask(dataset, sequence_length=16, preset=directory)
  task.prepare(str(tmp_path / "run"))
  model = task.build_model()
  arrays = task.arrays("train")
  # The tokenizer is the checkpoint's: ids are rows of its vocab.txt.
  vocab = builders.HF_VOCAB
  first = [vocab.index(c) for c in "[CLS] 今 天 天 气 很 好 [SEP] 不 错 [SEP]".split()]
  np.testing.assert_array_equal(arrays["token_ids"][0][:len(first)], first)
  # The token-embedding table the methods perturb is the checkpoint's.
  np.testing.assert_array_equal(model.backbone.token_embedding.embeddings.numpy(),
                                tensors["bert.embeddings.word_embeddings.weight"])
  inputs, _ = task.split_batch(arrays)
  logits = model(inputs, training=False).numpy()
  head = model.get_layer("logits")
  kernel, bias = (v.numpy() for v in head.weights)
  for exact, tolerance in ((False, 1e-5), (True, 2e-2)):
    pooled = hf_bert_pooled(tensors, arrays["token_ids"], arrays["segment_ids"],
                            arrays["padding_mask"].astype(bool), heads=2, exact_gelu=exact)
    want = pooled @ kernel + bias
    np.testing.assert_allclose(logits, want, atol=tolerance, rtol=0)
  # keras-hub's BERT uses the tanh GELU (as Google's BERT code does), Hugging
  # Face's config says the erf GELU: the logits differ, slightly.
  exact_logits = hf_bert_pooled(tensors, arrays["token_ids"], arrays["segment_ids"],
                                arrays["padding_mask"].astype(bool), 2, True) @ kernel + bias
  assert 0 < np.abs(logits - exact_logits).max() < 2e-2


def test_checkpoint_kinds_and_the_one_line_refusals(tmp_path):
  assert checkpoint_kind("bert_base_zh") == "name"
  assert checkpoint_kind("hf://bert-base-chinese") == "name"
  assert checkpoint_kind("gs://bucket/presets/zh") == "dir"
  assert checkpoint_kind("runs/pretrain_mlm_zh/preset") == "dir"
  roberta = str(tmp_path / "roberta")
  builders.write_tiny_hf_bert(roberta, model_type="xlm-roberta")
  with pytest.raises(SettingError, match=r"model_type 'xlm-roberta' is not supported"):
    check_checkpoint_dir(roberta, 16)
  torch_only = str(tmp_path / "torch")
  builders.write_tiny_hf_bert(torch_only)
  os.rename(os.path.join(torch_only, "model.safetensors"),
            os.path.join(torch_only, "pytorch_model.bin"))
  with pytest.raises(MissingInputError, match=r"no model.safetensors \(only pytorch_model.bin\)"):
    check_checkpoint_dir(torch_only, 16)
  good = str(tmp_path / "good")
  builders.write_tiny_hf_bert(good, max_positions=32)
  assert check_checkpoint_dir(good, 32) == "transformers"
  with pytest.raises(SettingError, match=r"sequence_length = 64 is out of range: .* 32 positions"):
    check_checkpoint_dir(good, 64)
  os.remove(os.path.join(good, "tokenizer_config.json"))
  with pytest.raises(MissingInputError, match="no tokenizer_config.json"):
    check_checkpoint_dir(good, 16)
  for error in (SettingError, MissingInputError):
    assert "\n" not in str(error("x"))


@pytest.mark.slow
def test_a_pair_file_and_a_hugging_face_bert_train_with_fgm_in_one_command(tmp_path, hf_dir):
  directory, _ = hf_dir
  data = tmp_path / "task"
  data.mkdir()
  rows = [{"q": a, "c": b, "y": "same" if i % 2 else "other"} for i, (a, b) in
          enumerate(TEXTS * 4)]
  for name in ("train.jsonl", "test.jsonl"):
    (data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                             encoding="utf-8")
  model_dir = tmp_path / "run"
  (tmp_path / "my_task.gin").write_text("\n".join([
      f"TextFileDataset.data_dir = '{data}'", "TextFileDataset.train_file = 'train.jsonl'",
      "TextFileDataset.eval_file = 'test.jsonl'", "TextFileDataset.text_field = 'q'",
      "TextFileDataset.text_pair_field = 'c'", "TextFileDataset.label_field = 'y'",
      f"TextClassificationTask.preset = '{directory}'", "TextClassificationTask.sequence_length = 16",
      "Experiment.train_steps = 4", "Experiment.global_batch_size = 4"]) + "\n")
  command = [sys.executable, "-m", "tfadv.main", "--gin_file=configs/bustm_fgm.gin",
             f"--gin_file={tmp_path / 'my_task.gin'}", f"--model_dir={model_dir}"]
  proc = subprocess.run(command, cwd=builders.REPO, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "adv_loss" in proc.stdout and "final eval accuracy" in proc.stdout
  assert json.loads((model_dir / "eval_results_test.json").read_text())["step"] == 4
  export = subprocess.run(command + ["--mode=export"], cwd=builders.REPO, capture_output=True,
                          text=True, timeout=600, check=False)
  assert export.returncode == 0, export.stderr[-3000:]
  assert (model_dir / "export" / "model.keras").exists()
