"""Every configurable refuses an out-of-range argument in one line naming it (fuzz-style).

The table below is written by hand from what each parameter means (an ε is
a radius: never negative; a step count is at least one; a rate is a
fraction), independently of `tfadv.checks`. Every gin configurable of tfadv
must appear in it, so a new one cannot ship unchecked.
"""

import os
import subprocess
import sys

import pytest

from tfadv import compat, configurables  # pylint: disable=unused-import
from tfadv.errors import SettingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEG, ZERO = -1.0, 0
# {configurable: (required arguments, {parameter: [values out of range]})}.
BAD = {
    "tfadv.methods.fgm.EmbeddingFGM": ({}, {
        "epsilon": [NEG, float("nan")], "norm": ["l1"], "form": ["both"],
        "adversarial_weight": [NEG], "direction": ["sideways"], "combine": ["sum"]}),
    "tfadv.methods.embedding_output.EmbeddingOutputFGM": ({}, {
        "epsilon": [NEG, float("inf")], "form": ["x"], "adversarial_weight": [NEG],
        "direction": ["x"]}),
    "tfadv.methods.embedding_output.EmbeddingOutputPGD": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "num_steps": [ZERO, 1.5], "form": ["x"],
        "adversarial_weight": [NEG]}),
    "tfadv.methods.free.EmbeddingOutputFree": ({}, {
        "epsilon": [NEG], "replays": [ZERO, -3], "step_size": [NEG], "carry": ["keep"],
        "init_magnitude": [NEG]}),
    "tfadv.methods.free.FreeTraining": ({}, {
        "epsilon": [NEG], "replays": [ZERO], "clamp_rule": ["clip"], "clip_max": [-1.0]}),
    "tfadv.methods.freelb.FreeLB": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "ascent_steps": [ZERO], "init_magnitude": [NEG]}),
    "tfadv.methods.gradient_penalty.EmbeddingGradientPenalty": ({}, {
        "epsilon": [NEG], "variant": ["cubed"], "form": ["x"], "combine": ["x"]}),
    "tfadv.methods.pgd.PGDTraining": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "num_steps": [ZERO], "norm": ["l0"],
        "clip_min": [2.0]}),
    "tfadv.methods.pgd.FGSMTraining": ({}, {"epsilon": [NEG], "step_size": [NEG],
                                            "clip_max": [NEG]}),
    "tfadv.methods.r3f.R3F": ({}, {"epsilon": [NEG], "r3f_lambda": [NEG],
                                   "noise_type": ["cauchy"]}),
    "tfadv.methods.atta.ATTATraining": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "num_steps": [ZERO], "init_scale": [NEG],
        "max_memory_bytes": [ZERO], "clip_min": [5.0]}),
    "tfadv.methods.plain.Plain": ({}, {}),  # no arguments
    "tfadv.methods.char_at.CharSubstitutionTraining": ({}, {
        "attacked_share": [1.5, NEG], "adversarial_weight": [NEG]}),
    "tfadv.attacks.pgd.InputAttack": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "num_steps": [ZERO], "norm": ["l1"],
        "restarts": [ZERO], "clip_max": [NEG]}),
    "tfadv.attacks.apgd.APGD": ({}, {
        "epsilon": [NEG], "num_steps": [ZERO], "loss": ["hinge"], "norm": ["l1"],
        "restarts": [ZERO], "rho": [1.5, 0.0], "clip_min": [1.0]}),
    "tfadv.attacks.embedding.EmbeddingOutputAttack": ({}, {
        "epsilon": [NEG], "step_size": [NEG], "num_steps": [ZERO]}),
    "tfadv.attacks.char_substitution.CharSubstitutionAttack": ({}, {
        "budget": [ZERO, 1.5], "max_fraction": [NEG, 1.5], "pinyin_candidates": [-1],
        "embedding_candidates": [-1], "top_k": [ZERO], "budget_rule": ["round"]}),
    "tfadv.smoothing.SubstitutionSmoothing": ({}, {
        "probability": [0.0, 1.0, NEG], "num_samples": [ZERO], "num_selection": [ZERO],
        "confidence": [1.0, 0.0], "radii": [(1, 0)]}),
    "tfadv.experiment.Experiment": ({"task": None}, {
        "train_steps": [ZERO], "global_batch_size": [ZERO, -32], "eval_batch_size": [-1],
        "adversarial_start_step": [-1], "epsilon_ramp_steps": [-1], "steps_per_loop": [ZERO],
        "checkpoint_every": [-1], "eval_every": [-1], "max_checkpoints": [ZERO],
        "train_epochs": [ZERO, NEG], "mixed_precision": ["float16"],
        "attack_examples": [-1], "eval_tag": ["a b/c"]}),
    "tfadv.optimization.adamw": ({"total_steps": 10}, {
        "total_steps": [ZERO], "learning_rate": [NEG, 0.0], "warmup_fraction": [1.5, NEG],
        "weight_decay": [NEG], "beta_1": [1.0], "beta_2": [NEG], "epsilon": [0.0],
        "clipnorm": [NEG]}),
    "tfadv.optimization.sgd_momentum": ({"total_steps": 10}, {
        "total_steps": [ZERO], "learning_rate": [NEG], "momentum": [1.5],
        "weight_decay": [NEG], "boundaries": [(0.5, 2.0)], "decay": [NEG],
        "weight_decay_mode": ["coupled"]}),
    "tfadv.distribute.make_strategy": ({}, {"kind": ["gpu"], "num_cpu_devices": [-2]}),
    "tfadv.data.clue.ClueDataset": ({"data_dir": "unused"}, {
        "malformed": ["ignore"], "validation_fraction": [1.0, NEG], "num_folds": [1, -2],
        "validation_fold": [-1], "num_eval": [ZERO]}),
    "tfadv.data.text_files.TextFileDataset": ({"data_dir": "unused"}, {
        "malformed": ["fix"], "format": ["xml"], "validation_fraction": [1.0],
        "text_field": [""], "label_field": [3], "text_pair_field": [""], "num_folds": [1],
        "num_eval": [-3]}),
    "tfadv.data.corpus.PretrainingCorpus": ({"data_dir": "unused"}, {"num_eval": [ZERO]}),
    "tfadv.data.images.ImageDataset": ({}, {
        "source": ["web"], "num_train": [ZERO], "num_eval": [ZERO],
        "validation_fraction": [1.0, NEG]}),
    "tfadv.data.reviews.ProductReviews": ({}, {
        "num_train": [ZERO], "num_eval": [ZERO], "num_validation": [-1, 8000],
        "max_chars": [ZERO]}),
    "tfadv.tasks.text.TextClassificationTask": ({"dataset": None}, {
        "sequence_length": [1, ZERO], "vocabulary_size": [ZERO],
        "vocabulary_min_count": [ZERO]}),
    "tfadv.tasks.masked_lm.MaskedLMTask": ({"corpus": None}, {
        "sequence_length": [1], "vocabulary_size": [ZERO], "vocabulary_min_count": [ZERO],
        "mask_selection_rate": [1.5, NEG], "mask_selection_length": [ZERO],
        "masks_per_sentence": [ZERO], "pack_characters": [-1]}),
    "tfadv.tasks.image.ImageClassificationTask": ({"dataset": None}, {
        "crop": ["center"], "image_size": [ZERO], "resize_size": [ZERO]}),
    "tfadv.models.bert.bert_classifier": (
        {"num_classes": 2, "vocabulary_size": 10, "sequence_length": 8}, {
            "num_layers": [ZERO], "num_heads": [ZERO, 3], "hidden_dim": [ZERO],
            "intermediate_dim": [ZERO], "dropout": [1.0, NEG], "classifier_dropout": [1.0]}),
    "tfadv.models.bert.bert_masked_lm": ({"vocabulary_size": 10, "sequence_length": 8}, {
        "num_layers": [ZERO], "num_heads": [ZERO], "hidden_dim": [ZERO],
        "intermediate_dim": [ZERO], "dropout": [1.0]}),
    "tfadv.models.vision.wide_resnet": ({"input_shape": (8, 8, 3), "num_classes": 2}, {
        "depth": [ZERO, 27], "width": [ZERO], "dropout": [1.0, NEG]}),
    # Architectures whose arguments are layer widths: Keras refuses a bad one itself.
    "tfadv.models.vision.small_cnn": ({}, {}),
    "tfadv.models.vision.preact_resnet18": ({}, {}),
    "tfadv.models.vision.resnet50": ({}, {}),
}
CASES = [(name, param, value) for name, (_, params) in BAD.items()
         for param, values in params.items() for value in values]


def test_every_configurable_is_in_the_table():
  assert set(compat.gin_configurables("tfadv")) == set(BAD)


@pytest.mark.parametrize("name,param,value", CASES,
                         ids=[f"{n.rsplit('.', 1)[1]}.{p}={v!r}" for n, p, v in CASES])
def test_an_out_of_range_argument_is_one_line_naming_it(name, param, value):
  configurable = compat.gin_configurables("tfadv")[name]
  required, _ = BAD[name]
  with pytest.raises(SettingError) as caught:
    configurable(**{**required, param: value})
  first = str(caught.value).splitlines()[0]
  owner = name.rsplit(".", 1)[1]
  assert f"{owner}.{param}" in first, first
  if not isinstance(value, str) or param == "eval_tag":
    assert repr(value) in first or repr(value)[:-1] in first, first


def test_in_range_edges_are_accepted():
  from tfadv.methods import EmbeddingFGM, FreeLB  # pylint: disable=g-import-not-at-top
  from tfadv.attacks.char_substitution import CharSubstitutionAttack  # pylint: disable=g-import-not-at-top
  EmbeddingFGM(epsilon=0.0)
  FreeLB(ascent_steps=1, step_size=0.0)
  CharSubstitutionAttack(budget=1, max_fraction=1.0, pinyin_candidates=0)


@pytest.mark.slow
def test_a_negative_epsilon_stops_main_in_one_line_before_training(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "tfadv.main", "--gin_file=configs/demo.gin",
       "--gin_param=Experiment.method = @EmbeddingOutputFGM()",
       "--gin_param=EmbeddingOutputFGM.epsilon = -1.0", f"--model_dir={tmp_path}/run"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "tfadv: EmbeddingOutputFGM.epsilon = -1.0 is out of range: expected a number >= 0.")
  assert "Traceback" not in proc.stderr and "Training from" not in proc.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoint")
