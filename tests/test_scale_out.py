"""Scale-out: two workers on loopback, SIGTERM/SIGKILL preemption, TPU launcher, bfloat16."""

import os
import shlex
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from builders import REPO, main_command as builders_main_command, write_tiny_fashion_idx
from builders import batch_arrays, split as text_split, tiny_bert
from builders import image_arrays, image_split, tiny_cnn
from tfadv.data.pipeline import distributed_dataset
from tfadv.methods import (EmbeddingFGM, EmbeddingGradientPenalty, FGSMTraining,
                           FreeTraining, PGDTraining, Plain)
from tfadv.experiment import build_trainer

sys.path.insert(0, os.path.join(REPO, "launch"))
import tpu_vm  # pylint: disable=g-import-not-at-top,wrong-import-position

PLAIN = os.path.join(REPO, "configs", "fashion_mnist_plain.gin")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return write_tiny_fashion_idx(tmp_path_factory.mktemp("idx"), num_train=256)


def main_command(model_dir, idx_dir, *extra):
  return builders_main_command(PLAIN, model_dir, idx_dir, *extra)


def model_weights(model_dir):
  """Weights and optimizer state in the newest checkpoint, by key, and the step.

  (The checkpoint reaches the model's variables first through the optimizer,
  so they are stored under `optimizer/_trainable_variables/`.)
  """
  reader = tf.train.load_checkpoint(str(model_dir))
  keys = sorted(k for k in reader.get_variable_to_shape_map()
                if k.startswith(("optimizer/_trainable_variables/", "optimizer/_variables/")))
  assert any(k.startswith("optimizer/_trainable_variables/") for k in keys), keys
  return {k: reader.get_tensor(k) for k in keys}, reader.get_tensor(
      "global_step/.ATTRIBUTES/VARIABLE_VALUE")


def run(command, **kwargs):
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False, **kwargs)


# --- multi-worker ---------------------------------------------------------

@pytest.mark.slow
def test_two_workers_on_loopback_match_one_worker(tmp_path, idx_dir):
  steps = ["Experiment.train_epochs = None", "Experiment.train_steps = 12",
           "Experiment.steps_per_loop = 4", "Experiment.checkpoint_every = 4"]
  single = run(main_command(tmp_path / "one", idx_dir, *steps))
  assert single.returncode == 0, single.stdout[-2000:]
  start = time.time()
  launched = run([sys.executable, os.path.join(REPO, "launch", "multi_worker.py"),
                  "--num_workers=2", "--quiet", f"--log_dir={tmp_path / 'logs'}", "--",
                  *main_command(tmp_path / "two", idx_dir, *steps)[3:]])
  print(f"2-worker run: {time.time() - start:.1f}s\n{launched.stdout}")
  assert launched.returncode == 0, launched.stdout + open(tmp_path / "logs" / "worker-0.log").read()[-3000:]
  assert "worker 0" in launched.stdout and "worker 1" in launched.stdout
  assert launched.stdout.count("exit 0 (ok)") == 2
  log = open(tmp_path / "logs" / "worker-0.log").read()
  assert "num_workers = 2" in log and "with 2 replicas" in log
  one, one_step = model_weights(tmp_path / "one")
  two, two_step = model_weights(tmp_path / "two")
  assert one_step == two_step == 12 and one.keys() == two.keys()
  print("max |2 workers - 1 worker| over the weights:",
        max(float(np.abs(two[k] - one[k]).max()) for k in one))
  for key in one:
    # Same global batch of 16: each worker computes 8 rows; the sum of two
    # half-batch gradients differs from the full-batch one by rounding only.
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # Only the chief wrote into the model dir: one event file per writer.
  assert len(os.listdir(tmp_path / "two" / "train")) == 1


# --- preemption -----------------------------------------------------------

LONG = ["Experiment.train_epochs = None", "Experiment.train_steps = 3000",
        "Experiment.steps_per_loop = 3000", "Experiment.checkpoint_every = 3000"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, idx_dir):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  result = run(main_command(model_dir, idx_dir, *LONG))
  assert result.returncode == 0, result.stdout[-2000:]
  return model_weights(model_dir)


def start_and_wait_for(command, text):
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return proc, lines
  proc.wait()
  raise AssertionError(f"never printed {text!r}:\n{''.join(lines)[-2000:]}")


@pytest.mark.slow
def test_sigterm_saves_mid_loop_and_the_rerun_resumes_exactly(tmp_path, idx_dir, uninterrupted):
  command = main_command(tmp_path, idx_dir, *LONG)
  proc, lines = start_and_wait_for(command, "Training from step 0")
  time.sleep(3.0)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  output = "".join(lines) + out
  assert proc.returncode == 143, output[-2000:]
  _, step = model_weights(tmp_path)
  # Stopped inside the one 3000-step loop, at a step boundary, and saved there.
  assert 0 < step < 3000, output[-2000:]
  assert f"Preempted (SIGTERM) at step {step}" in output
  print(f"SIGTERM 3s into the 3000-step loop: saved at step {step}, exit 143")
  resumed = run(command)
  assert resumed.returncode == 0 and f"Restored" in resumed.stdout
  assert f"Training from step {step} to 3000" in resumed.stdout
  weights, final_step = model_weights(tmp_path)
  expected, expected_step = uninterrupted
  assert final_step == expected_step == 3000
  for key in expected:
    np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path, idx_dir, uninterrupted):
  every = ["Experiment.steps_per_loop = 100", "Experiment.checkpoint_every = 200"]
  command = main_command(tmp_path, idx_dir, *LONG, *every)
  proc, _ = start_and_wait_for(command, "step 500/3000")
  proc.kill()
  proc.wait()
  _, step = model_weights(tmp_path)
  print(f"SIGKILL after step 500 was printed: newest checkpoint at step {step}")
  assert 400 <= step <= 600  # at most one 200-step interval before step 500 is lost
  resumed = run(command)
  assert resumed.returncode == 0, resumed.stdout[-2000:]
  weights, final_step = model_weights(tmp_path)
  expected, _ = uninterrupted
  assert final_step == 3000
  for key in expected:
    np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)


# --- Cloud TPU launcher ---------------------------------------------------

@pytest.fixture
def preset(tmp_path):
  """A stand-in for `make pretrain`'s preset, which the CLUE configs read."""
  directory = tmp_path / "runs" / "pretrain_mlm_zh" / "preset"
  directory.mkdir(parents=True)
  (directory / "config.json").write_text("{}")
  return str(directory)


def dry_run(capsys, preset, *flags, exists=lambda path: True):
  assert tpu_vm.main(["--name=adv", "--zone=us-central2-b", "--dry_run",
                      "--gin_file=configs/iflytek_fgm.gin",
                      f"--gin_param=TextClassificationTask.preset = '{preset}'",
                      "--model_dir=gs://bucket/tfadv/runs/iflytek_fgm", *flags],
                     exists=exists) == 0
  return capsys.readouterr().out.strip().splitlines()


UPLOADED = "gs://bucket/tfadv/runs/iflytek_fgm/inputs/ClueDataset.data_dir/iflytek"


def test_tpu_dry_run_for_a_v4_8(capsys, preset, fewclue_dir):  # pylint: disable=unused-argument
  lines = dry_run(capsys, preset, "--accelerator_type=v4-8", "--spot", "--project=proj")
  assert lines[0] == "# v4-8: 1 host(s), runtime tpu-vm-tf-2.16.1-pjrt"
  # The config's local CLUE directory and preset go to the model dir's bucket first.
  data = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "fewclue", "iflytek"))
  assert lines[1] == (f"gcloud storage cp -r {data} "
                      "gs://bucket/tfadv/runs/iflytek_fgm/inputs/ClueDataset.data_dir/ "
                      "--project=proj")
  assert lines[2] == (f"gcloud storage cp -r {preset} gs://bucket/tfadv/runs/iflytek_fgm/"
                      "inputs/TextClassificationTask.preset/ --project=proj")
  lines = lines[:2] + lines[3:]
  assert lines[2] == ("gcloud compute tpus tpu-vm create adv --zone=us-central2-b "
                      "--project=proj --accelerator-type=v4-8 "
                      "--version=tpu-vm-tf-2.16.1-pjrt --spot")
  assert lines[3].startswith("gcloud compute tpus tpu-vm scp tfadv.tar.gz 'adv:~/tfadv.tar.gz'")
  assert "--worker=all" in lines[3] and "--worker=all" in lines[4]
  # The runtime's own packages, and the constraints `make test-lowest` tests under.
  assert ("pip install -q -c ~/tpu-constraints.txt "
          "-c ~/tfadv/launch/constraints-tf2.16.txt -e ~/tfadv") in lines[4]
  train = lines[5]
  assert "--worker=all" in train and "--tpu=local" in train
  assert "python3 -m tfadv.main --gin_file=configs/iflytek_fgm.gin" in train
  assert "--model_dir=gs://bucket/tfadv/runs/iflytek_fgm" in train
  # ...and the run reads the upload, not ../shared.
  remote = [w for w in shlex.split(train) if w.startswith("--command=")][0]
  assert f'--gin_param=ClueDataset.data_dir = "{UPLOADED}"' in shlex.split(remote)
  assert ('--gin_param=TextClassificationTask.preset = "gs://bucket/tfadv/runs/iflytek_fgm/'
          'inputs/TextClassificationTask.preset/preset"') in shlex.split(remote)
  assert lines[6].endswith("--worker=0 '--command=tail -n +1 -f ~/tfadv.log'")
  assert len(lines) == 7


def test_tpu_dry_run_for_a_v5e_pod_slice(capsys, preset, fewclue_dir):  # pylint: disable=unused-argument
  lines = dry_run(capsys, preset, "--accelerator_type=v5litepod-16", "--preemptible",
                  "--action=create", "--action=train", "--action=delete")
  assert lines[0] == "# v5litepod-16: 4 host(s), runtime tpu-vm-tf-2.16.1-pod-pjrt"
  assert lines[1].startswith("gcloud storage cp -r ")  # inserted before create
  assert lines.pop(2).startswith(f"gcloud storage cp -r {preset} ")
  assert lines[2].endswith("--accelerator-type=v5litepod-16 "
                           "--version=tpu-vm-tf-2.16.1-pod-pjrt --preemptible")
  # One TensorFlow client on worker 0 drives the slice by the TPU's name.
  assert "--worker=0" in lines[3] and "--tpu=adv" in lines[3]
  assert "TPU_LOAD_LIBRARY=0 nohup python3 -m tfadv.main" in lines[3]
  assert lines[4] == "gcloud compute tpus tpu-vm delete adv --zone=us-central2-b --quiet"


def test_tpu_inputs_resolve_against_a_fake_bucket(tmp_path):
  preset = tmp_path / "preset"
  preset.mkdir()
  seen = []
  bucket = {"gs://data/clue/tnews"}

  def exists(path):
    seen.append(path)
    return path in bucket

  inputs = {"ClueDataset.data_dir": "gs://data/clue/tnews",
            "TextClassificationTask.preset": str(preset)}
  uploads, params, mounts = tpu_vm.resolve_inputs(inputs, "gs://b/run/", REPO, exists=exists)
  assert mounts == []
  assert seen == ["gs://data/clue/tnews"]  # checked, kept as it is
  assert uploads == [(str(preset), "gs://b/run/inputs/TextClassificationTask.preset/preset")]
  assert params == ['TextClassificationTask.preset = '
                    '"gs://b/run/inputs/TextClassificationTask.preset/preset"']
  # A keras-hub preset name is downloaded by the workers themselves.
  assert tpu_vm.resolve_inputs({"TextClassificationTask.preset": "bert_base_zh"},
                               "gs://b/run", REPO, exists=exists) == ([], [], [])
  # Relative local paths are read against the checkout, as the configs write them.
  uploads, _, _ = tpu_vm.resolve_inputs({"ClueDataset.data_dir": "configs"}, "gs://b/run",
                                        REPO, exists=exists)
  assert uploads == [(os.path.join(REPO, "configs"), "gs://b/run/inputs/ClueDataset.data_dir/configs")]
  bad = [({"ClueDataset.data_dir": "gs://data/clue/iflytek"}, "does not exist"),
         ({"ClueDataset.data_dir": str(tmp_path / "absent")}, "not found"),
         ({"TextClassificationTask.preset": "runs/pretrain_mlm_zh/nowhere"}, "not found"),
         ({"ImageDataset.data_dir": "s3://x/y"}, "gs://")]
  for inputs, message in bad:
    with pytest.raises(tpu_vm.InputError, match=message) as info:
      tpu_vm.resolve_inputs(inputs, "gs://b/run", REPO, exists=exists)
    assert str(info.value).startswith(next(iter(inputs)))  # names the binding


def test_tpu_launcher_checks_a_store_and_a_tfds_dataset_and_mounts_them(capsys, tmp_path):
  bucket = {"gs://b/stores/tnews/metadata.json", "gs://b/tfds/imagenet2012", "gs://b/idx"}
  seen = []

  def exists(path):
    seen.append(path)
    return path in bucket

  inputs = {"Experiment.record_store": "gs://b/stores/tnews",
            "ImageDataset.data_dir": ("gs://b/tfds", "imagenet2012")}
  uploads, params, mounts = tpu_vm.resolve_inputs(inputs, "gs://b/run", REPO, exists=exists)
  assert seen == ["gs://b/stores/tnews/metadata.json", "gs://b/tfds/imagenet2012"]
  assert uploads == [] and mounts == [("Experiment.record_store", "gs://b/stores/tnews"),
                                      ("ImageDataset.data_dir", "gs://b/tfds")]
  assert params == ['Experiment.record_store = "/tmp/tfadv_inputs/Experiment.record_store"',
                    'ImageDataset.data_dir = "/tmp/tfadv_inputs/ImageDataset.data_dir"']
  # A pod slice's input pipelines run without Python: a store is read from
  # gs:// by TensorFlow itself (the "fixed" layout; the run checks), TFDS
  # random access is refused.
  _, params, mounts = tpu_vm.resolve_inputs(
      {"Experiment.record_store": "gs://b/stores/tnews"}, "gs://b/run", REPO, exists=exists,
      pod=True)
  assert mounts == [] and params == []
  with pytest.raises(tpu_vm.InputError, match="single-host slice"):
    tpu_vm.resolve_inputs({"ImageDataset.data_dir": ("gs://b/tfds", "imagenet2012")},
                          "gs://b/run", REPO, exists=exists, pod=True)
  # IDX files on gs:// (not TFDS random access) are read by TensorFlow itself:
  # checked, not mounted.
  _, params, mounts = tpu_vm.resolve_inputs({"ImageDataset.data_dir": "gs://b/idx"},
                                            "gs://b/run", REPO, exists=exists)
  assert mounts == [] and params == []
  # A run on a record store never reads the raw data: its dir is no input.
  raw = tpu_vm.read_inputs(["configs/tnews_fgm.gin"], [])
  stored = tpu_vm.read_inputs(["configs/tnews_fgm.gin"],
                              ["Experiment.record_store = 'gs://b/stores/tnews'"])
  assert "ClueDataset.data_dir" in raw and "ClueDataset.data_dir" not in stored
  assert set(stored) == {"Experiment.record_store", "TextClassificationTask.preset"}
  for inputs, message in [
      ({"Experiment.record_store": "gs://b/stores/absent"}, "write_records"),
      ({"ImageDataset.data_dir": ("gs://b/tfds", "cifar10")}, "tfds build")]:
    with pytest.raises(tpu_vm.InputError, match=message):
      tpu_vm.resolve_inputs(inputs, "gs://b/run", REPO, exists=exists)
  # The ImageNet config: its TFDS dir checked before anything is created, then
  # mounted by setup.
  code = tpu_vm.main(["--name=adv", "--zone=z", "--dry_run", "--accelerator_type=v4-8",
                      "--gin_file=configs/imagenet_free4_resnet50.gin",
                      "--gin_param=ImageDataset.data_dir = 'gs://b/tfds'",
                      "--model_dir=gs://b/runs/free4"], exists=exists)
  lines = capsys.readouterr().out.splitlines()
  assert code == 0
  setup = [line for line in lines if "gcsfuse -o ro" in line]
  assert len(setup) == 1 and "--worker=all" in setup[0] and "--only-dir=tfds" in setup[0]
  train = next(line for line in lines if "tfadv.main" in line)
  assert '--gin_param=ImageDataset.data_dir = "/tmp/tfadv_inputs/ImageDataset.data_dir"' \
      in shlex.split([w for w in shlex.split(train) if w.startswith("--command=")][0])
  assert "imagenet_free4_resnet50.gin" in train
  missing = tpu_vm.main(["--name=adv", "--zone=z", "--dry_run",
                         "--gin_file=configs/imagenet_free4_resnet50.gin",
                         "--gin_param=ImageDataset.data_dir = 'gs://b/elsewhere'",
                         "--model_dir=gs://b/runs/free4"], exists=exists)
  assert missing == 2
  assert "tfds build" in capsys.readouterr().err


def test_tpu_launcher_stops_before_creating_anything(capsys):
  code = tpu_vm.main(["--name=adv", "--zone=z", "--dry_run", "--gin_file=configs/iflytek_fgm.gin",
                      "--gin_param=ClueDataset.data_dir = 'gs://bucket/missing'",
                      "--model_dir=gs://bucket/run"], exists=lambda path: False)
  captured = capsys.readouterr()
  assert code == 2 and captured.out == ""
  assert captured.err.strip() == ("tpu_vm: ClueDataset.data_dir = 'gs://bucket/missing' does not "
                                  "exist; upload it or bind ClueDataset.data_dir to an existing path.")


def test_tpu_launcher_refuses_a_local_model_dir():
  with pytest.raises(SystemExit):
    tpu_vm.main(["--name=adv", "--zone=z", "--dry_run", "--gin_file=configs/demo.gin",
                 "--model_dir=runs/demo"])
  with pytest.raises(ValueError, match="v4-8"):
    tpu_vm.num_hosts("tpu-8")


# --- bfloat16 -------------------------------------------------------------

@pytest.fixture
def bfloat16_policy():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  yield
  keras.mixed_precision.set_global_policy("float32")


CASES = {
    "plain": (Plain, "text"), "fgm": (lambda: EmbeddingFGM(epsilon=0.5), "text"),
    "gp": (lambda: EmbeddingGradientPenalty(epsilon=0.5), "text"),
    "pgd": (lambda: PGDTraining(epsilon=0.1, num_steps=2), "image"),
    "fgsm": (lambda: FGSMTraining(epsilon=0.1), "image"),
    "free": (lambda: FreeTraining(epsilon=0.1, replays=2), "image"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_method_trains_in_mixed_bfloat16_with_float32_state(name, bfloat16_policy):
  method_fn, kind = CASES[name]
  losses = {}
  for policy in ("float32", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    method = method_fn()
    arrays = batch_arrays(8) if kind == "text" else image_arrays(8)
    trainer = build_trainer(
        tiny_bert if kind == "text" else tiny_cnn, method, global_batch_size=8,
        optimizer_fn=lambda: keras.optimizers.SGD(0.01),
        split_batch=text_split if kind == "text" else image_split,
        input_shape=(8, 12, 12, 1) if kind == "image" else None)
    model = trainer.model
    ds = distributed_dataset(trainer.strategy, arrays, 8, shuffle=True,
                             repeats_per_batch=method.batch_replays)
    losses[policy] = trainer.train(iter(ds), 2)["loss"]
    if policy == "mixed_bfloat16":
      assert model.compute_dtype == "bfloat16"
      assert {v.dtype for v in model.trainable_variables} == {"float32"}
      for v in method.variables:
        if isinstance(v, tf.Variable):
          assert v.dtype == tf.float32
  assert np.isfinite(losses["mixed_bfloat16"])
  # bfloat16 keeps 8 bits of mantissa: the loss agrees to about 1%.
  assert losses["mixed_bfloat16"] == pytest.approx(losses["float32"], rel=0.03)


@pytest.mark.parametrize("task", ["tnews", "iflytek"])
def test_bert_base_reference_configs_bind_the_references_and_dry_run_on_a_tpu(capsys, task):
  """The reference setting's configs carry the cited hyperparameters (CLUE's
  baseline scripts, bert4keras's IFLYTEK examples), bfloat16, and launch on a
  TPU VM (dry run): the preset is a keras-hub name the workers fetch."""
  import gin  # pylint: disable=g-import-not-at-top
  from tfadv.config import parse_config  # pylint: disable=g-import-not-at-top
  want_batch, want_lr, want_epochs = {"tnews": (16, 3e-5, 2), "iflytek": (32, 2e-5, 3)}[task]
  for method, binding, value in (("plain", None, None), ("fgm", "EmbeddingFGM.epsilon", 0.5),
                                 ("gp", "EmbeddingGradientPenalty.epsilon", 1.0),
                                 ("freelb", "FreeLB.epsilon", 0.1)):
    path = f"configs/bert_base_{task}_{method}.gin"
    gin.clear_config()
    parse_config([os.path.join(REPO, path)], [])
    query = gin.query_parameter
    assert query("TextClassificationTask.preset") == "bert_base_zh", path
    assert query("TextClassificationTask.sequence_length") == 128, path
    assert (query("Experiment.global_batch_size"), query("adamw.learning_rate"),
            query("Experiment.train_epochs")) == (want_batch, want_lr, want_epochs), path
    assert query("Experiment.mixed_precision") == "mixed_bfloat16", path
    assert query("ClueDataset.validation_fraction") == 0.05, path
    if binding:
      assert query(binding) == value, path
    with open(os.path.join(REPO, path)) as f:
      header = f.read().split("include")[0]
    assert f"--gin_file={path}" in header and "# Expected: " in header, path
  gin.clear_config()
  code = tpu_vm.main(["--name=adv", "--zone=us-central2-b", "--dry_run",
                      f"--gin_file=configs/bert_base_{task}_fgm.gin",
                      f"--gin_param=ClueDataset.data_dir = 'gs://bucket/clue/{task}'",
                      "--model_dir=gs://bucket/runs/bert_base", "--accelerator_type=v4-8"],
                     exists=lambda path: True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert code == 0
  assert not any("gcloud storage cp" in line for line in lines)  # nothing local to upload
  train = [line for line in lines if "tfadv.main" in line][0]
  assert f"--gin_file=configs/bert_base_{task}_fgm.gin" in train
