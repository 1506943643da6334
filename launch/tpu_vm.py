#!/usr/bin/env python3
"""Runs a tfadv experiment on a Cloud TPU VM (single host or pod slice) with gcloud.

    python launch/tpu_vm.py --name=tfadv-v4 --zone=us-central2-b \\
        --accelerator_type=v4-8 --spot \\
        --model_dir=gs://BUCKET/tfadv/runs/iflytek_fgm \\
        --gin_file=configs/iflytek_fgm.gin \\
        --gin_param="ClueDataset.data_dir = 'gs://BUCKET/data/clue/iflytek'" \\
        --action=all [--dry_run]

Actions (`--action`, repeatable; `all` = create, setup, train, logs):
  create  gcloud compute tpus tpu-vm create (type, zone, runtime, spot/preemptible)
  setup   copies this checkout to every worker and pip-installs it there,
          keeping the runtime's preinstalled TensorFlow (a constraints file
          from `pip freeze`), so the TPU build of TensorFlow is not replaced
  train   starts `python -m tfadv.main` in the background, logging to
          ~/tfadv.log: on a single host with --tpu=local (all its chips); on a
          pod slice on worker 0 with --tpu=<name>, TensorFlow's single-client
          model (worker 0 drives the other hosts' TPU servers)
  logs    streams worker 0's log (Ctrl-C stops streaming, not training)
  delete  deletes the TPU VM

`--dry_run` prints every command and runs none. The model dir must be a
`gs://` path: every worker and TensorBoard read it. TensorBoard from your
machine: `launch/tensorboard.sh gs://BUCKET/tfadv/runs`.

Inputs. Before anything is created, the launcher reads the run's gin config
and resolves every input it names (`INPUT_BINDINGS`: CLUE data directories,
a preset directory, image and pretraining data directories): a `gs://` path
must exist (`tf.io.gfile`); a local path (relative to the checkout, as the
configs write them) is uploaded beside the model dir,
`<model_dir>/inputs/<binding>/<name>`, with `gcloud storage cp -r` (an
`upload` step, shown in `--dry_run`), and the run is pointed at the upload by
an extra `--gin_param`. An input that is neither stops the launcher with a
one-line error naming the binding, before any TPU is created. A record store
(`Experiment.record_store`) must hold its metadata.json and a TFDS data dir
read by random access (`ImageDataset.source = 'tfds'`) the dataset's
directory. On a single host both may be read through ArrayRecord, which
reads local files, so setup mounts them read-only with gcsfuse (under
/tmp/tfadv_inputs/) and the run reads the mounts. On a pod slice the input
pipelines run on each host's TPU server without Python: TFDS random access
is refused before anything is created, and a store must have the "fixed"
layout, which TensorFlow reads from gs:// itself (the run checks).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile

DEFAULT_TF_VERSION = "2.16.1"
ACTIONS = ("create", "upload", "setup", "train", "logs", "delete")
REMOTE_DIR = "tfadv"
# Gin bindings that name something the run reads (a directory or a file).
INPUT_BINDINGS = ("ClueDataset.data_dir", "TextFileDataset.data_dir",
                  "TextClassificationTask.preset",
                  "ImageDataset.data_dir", "PretrainingCorpus.data_dir",
                  "Experiment.record_store")
# The raw data a record store replaces: a run with `Experiment.record_store`
# never reads them, so they are neither checked nor uploaded.
DATA_BINDINGS = ("ClueDataset.data_dir", "TextFileDataset.data_dir", "ImageDataset.data_dir",
                 "PretrainingCorpus.data_dir")
# A record store and a TFDS dir read by random access may be read through
# ArrayRecord, which reads local files only: on a single host they are
# gcsfuse mounts of their gs:// paths (`mount`, in setup); other inputs (CLUE
# files, IDX files, a preset) are read from gs:// by TensorFlow. On a pod
# slice the input pipelines run on each host's TPU server, without Python: a
# store must have the "fixed" layout (TensorFlow reads it from gs:// itself)
# and TFDS random access is refused.
MOUNT_DIR = "/tmp/tfadv_inputs"


class InputError(ValueError):
  """An input of the run that the TPU workers could not read."""


def _is_keras_hub_preset_name(value: str) -> bool:
  # "bert_base_zh" is a keras-hub preset the workers download themselves, as
  # they do a Hugging Face or Kaggle handle ("hf://bert-base-chinese").
  if value.startswith(("hf://", "kaggle://")):
    return True
  return "/" not in value and "://" not in value and not value.startswith(".")


def read_inputs(gin_files, gin_params):
  """{binding: value} of the `INPUT_BINDINGS` the config sets (not None); an
  `ImageDataset.data_dir` read through TFDS's random access is recorded as
  `(data_dir, dataset name)`, so its dataset, not only the dir, is checked.
  With a record store the raw data's bindings (`DATA_BINDINGS`) are left out."""
  import gin  # pylint: disable=g-import-not-at-top
  from tfadv.main import ConfigError, parse_config  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    parse_config(gin_files, gin_params)
  except ConfigError as e:
    raise InputError(str(e)) from e
  found = {}
  try:
    for binding in INPUT_BINDINGS:
      value = _query(gin, binding)
      if value is not None:  # bound, and not to None
        found[binding] = value
    if "Experiment.record_store" in found:  # the store holds the rows
      found = {k: v for k, v in found.items() if k not in DATA_BINDINGS}
    if "ImageDataset.data_dir" in found and _query(gin, "ImageDataset.source") == "tfds":
      found["ImageDataset.data_dir"] = (found["ImageDataset.data_dir"],
                                        _query(gin, "ImageDataset.name"))
  finally:
    gin.clear_config()
  return found


def _query(gin, binding):
  try:
    return gin.query_parameter(binding)
  except ValueError:  # not bound
    return None


def input_marker(binding: str, value) -> str:
  """The path whose existence shows the input is there: a record store's
  metadata.json, a TFDS dataset's directory, else the path itself."""
  if isinstance(value, tuple):
    return value[0].rstrip("/") + "/" + value[1]
  if binding == "Experiment.record_store":
    return value.rstrip("/") + "/metadata.json"
  return value


def mount_path(binding: str) -> str:
  return f"{MOUNT_DIR}/{binding}"


def resolve_inputs(inputs, model_dir: str, root: str, exists=None, pod: bool = False):
  """(uploads, gin_params) that make every input readable from `model_dir`'s bucket.

  Args:
    inputs: {binding: path} (`read_inputs`).
    model_dir: the run's gs:// model dir; uploads go under `<model_dir>/inputs/`.
    root: the checkout, against which relative local paths are read.
    exists: `path -> bool` for gs:// paths (default `tf.io.gfile.exists`).
    pod: a pod slice (input pipelines without Python; nothing is mounted).

  Returns:
    uploads: [(local path, gs:// destination)], one `gcloud storage cp -r` each.
    gin_params: bindings pointing the run at the uploads, and inputs read
      through ArrayRecord at their mounts (`mounts`).
    mounts: [(binding, gs:// path)] to mount on every worker.

  Raises:
    InputError: naming the binding of an input that is neither an existing
      gs:// path nor an existing local path.
  """
  if exists is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    exists = tf.io.gfile.exists
  uploads, params, mounts = [], [], []
  base = model_dir.rstrip("/") + "/inputs"
  for binding, value in inputs.items():
    marker_value = value
    # Read through ArrayRecord (local files only): mounted on a single host.
    mount = not pod and (binding == "Experiment.record_store" or isinstance(value, tuple))
    if isinstance(value, tuple):
      if pod:
        raise InputError(
            f"{binding} = {value[0]!r}: TFDS random access reads in Python, which a "
            "pod slice's input pipelines lack; use a single-host slice (v4-8), or a "
            "record store written with `write_records --layout=fixed`.")
      value = value[0]
    if not isinstance(value, str):
      raise InputError(f"{binding} = {value!r}: expected a path string.")
    if binding == "TextClassificationTask.preset" and value.startswith(("hf://", "kaggle://")):
      continue  # downloaded by the workers
    if value.startswith("gs://"):
      marker = input_marker(binding, marker_value)
      try:
        ok = exists(marker)
      except Exception as e:  # pylint: disable=broad-except
        raise InputError(f"{binding} = {value!r}: cannot check it ({e}).") from e
      if not ok:
        what = {"Experiment.record_store": "no record store (write one with "
                "`python -m tfadv.tools.write_records`)"}.get(
                    binding, "the TFDS dataset is not prepared there (`tfds build "
                    "--file_format=array_record`)" if marker != value else "")
        where = f" ({marker}: {what})" if what else ""
        raise InputError(f"{binding} = {value!r} does not exist{where}; upload it or "
                         f"bind {binding} to an existing path.")
      if mount:
        mounts.append((binding, value))
        params.append(f'{binding} = "{mount_path(binding)}"')
      continue
    if "://" in value:
      raise InputError(f"{binding} = {value!r}: TPU workers read gs:// paths; "
                       "copy it to a bucket and bind that.")
    local = value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))
    if not os.path.exists(local):
      if binding == "TextClassificationTask.preset" and _is_keras_hub_preset_name(value):
        continue
      raise InputError(f"{binding} = {value!r} not found (looked at {local}); "
                       f"bind {binding} to an existing local or gs:// path.")
    destination = f"{base}/{binding}/{os.path.basename(os.path.normpath(local))}"
    uploads.append((local, destination))
    if mount:
      mounts.append((binding, destination))
      params.append(f'{binding} = "{mount_path(binding)}"')
    else:
      params.append(f'{binding} = "{destination}"')
  return uploads, params, mounts


def num_hosts(accelerator_type: str) -> int:
  """Hosts of a slice: v2/v3/v4/v5p are named by TensorCores (8 per host),
  v5e (v5litepod-N) and v6e by chips (one host up to 8 chips, 4 per host above)."""
  match = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ValueError(f"--accelerator_type={accelerator_type!r}: expected e.g. v4-8, "
                     "v5litepod-16, v6e-8.")
  family, size = match.group(1), int(match.group(2))
  if family in ("v5litepod", "v6e"):
    return 1 if size <= 8 else size // 4
  return max(1, size // 8)


def runtime_version(accelerator_type: str, tf_version: str) -> str:
  """tpu-vm-tf-X.Y.Z[-pod]-pjrt (Cloud TPU's naming for TensorFlow runtimes)."""
  pod = "-pod" if num_hosts(accelerator_type) > 1 else ""
  return f"tpu-vm-tf-{tf_version}{pod}-pjrt"


def gcloud(args, *words):
  command = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command


def mount_command(mounts) -> str:
  """Shell commands that gcsfuse-mount each (binding, gs://bucket/dir) read-only."""
  steps = ["(command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s)"
           " && echo \"deb https://packages.cloud.google.com/apt $GCSFUSE_REPO main\" | "
           "sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s "
           "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
           "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))"]
  for binding, path in mounts:
    bucket, _, prefix = path[len("gs://"):].partition("/")
    only = f"--only-dir={shlex.quote(prefix.rstrip('/'))} " if prefix.strip("/") else ""
    steps.append(f"mkdir -p {mount_path(binding)} && (mountpoint -q {mount_path(binding)} || "
                 f"gcsfuse -o ro --implicit-dirs {only}{shlex.quote(bucket)} "
                 f"{mount_path(binding)})")
  return " && ".join(steps)


def commands(args, tarball: str, uploads=(), input_params=(), mounts=()):
  """{action: [command, ...]} for the requested actions."""
  version = args.version or runtime_version(args.accelerator_type, args.tf_version)
  create = gcloud(args, "create", args.name) + [
      f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
  if args.spot:
    create.append("--spot")
  elif args.preemptible:
    create.append("--preemptible")
  # On the default runtime, also the constraints `make test-lowest` tests under.
  lowest = (f" -c ~/{REMOTE_DIR}/launch/constraints-tf2.16.txt"
            if version.startswith("tpu-vm-tf-2.16.") else "")
  install = (f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/tfadv.tar.gz -C ~/{REMOTE_DIR} && "
             f"pip freeze > ~/tpu-constraints.txt && "
             f"pip install -q -c ~/tpu-constraints.txt{lowest} -e ~/{REMOTE_DIR}")
  main_args = [f"--gin_file={f}" for f in args.gin_file]
  main_args += [f"--gin_param={p}" for p in list(args.gin_param) + list(input_params)]
  pod = num_hosts(args.accelerator_type) > 1
  # TensorFlow drives a pod slice from one client (worker 0) that reaches the
  # other hosts' TPU servers by the TPU's name; a single host uses its own chips.
  main_args += [f"--model_dir={args.model_dir}",
                f"--tpu={args.name if pod else 'local'}", f"--mode={args.mode}"]
  env = "TPU_LOAD_LIBRARY=0 " if pod else ""
  train = (f"cd ~/{REMOTE_DIR} && {env}nohup python3 -m tfadv.main "
           + " ".join(shlex.quote(a) for a in main_args) + " > ~/tfadv.log 2>&1 &")
  return {
      "create": [create],
      "upload": [["gcloud", "storage", "cp", "-r", local, destination.rsplit("/", 1)[0] + "/"]
                 + ([f"--project={args.project}"] if args.project else [])
                 for local, destination in uploads],
      "setup": [gcloud(args, "scp", tarball, f"{args.name}:~/tfadv.tar.gz") + ["--worker=all"],
                gcloud(args, "ssh", args.name) + ["--worker=all", f"--command={install}"]]
               + ([gcloud(args, "ssh", args.name) + [
                   "--worker=all", f"--command={mount_command(mounts)}"]] if mounts else []),
      "train": [gcloud(args, "ssh", args.name) + [f"--worker={0 if pod else 'all'}",
                                                  f"--command={train}"]],
      "logs": [gcloud(args, "ssh", args.name) + ["--worker=0",
                                                 "--command=tail -n +1 -f ~/tfadv.log"]],
      "delete": [gcloud(args, "delete", args.name) + ["--quiet"]],
  }


def pack_checkout(root: str) -> str:
  """A tarball of the checkout (code and configs; no runs, venvs or data)."""
  path = os.path.join(tempfile.mkdtemp(prefix="tfadv_tpu_"), "tfadv.tar.gz")
  skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
  with tarfile.open(path, "w:gz") as tar:
    for entry in sorted(os.listdir(root)):
      if entry not in skip:
        tar.add(os.path.join(root, entry), arcname=entry,
                filter=lambda info: None if "__pycache__" in info.name else info)
  return path


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--accelerator_type", default="v4-8", help="v4-8, v5litepod-16, ...")
  parser.add_argument("--tf_version", default=DEFAULT_TF_VERSION)
  parser.add_argument("--version", default=None,
                      help="runtime version (default tpu-vm-tf-<tf_version>[-pod]-pjrt)")
  capacity = parser.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true")
  capacity.add_argument("--preemptible", action="store_true")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--model_dir", default=None, help="gs://BUCKET/...")
  parser.add_argument("--mode", default="train_and_evaluate")
  parser.add_argument("--action", action="append", choices=ACTIONS + ("all",))
  parser.add_argument("--dry_run", action="store_true", help="print, do not run")
  args = parser.parse_args(argv)
  args.action = args.action or ["all"]
  if "all" in args.action:
    args.action = ["upload", "create", "setup", "train", "logs"]
  if "train" in args.action and "upload" not in args.action:
    # Inputs are resolved and uploaded before anything is created.
    args.action.insert(0, "upload")
  num_hosts(args.accelerator_type)  # validates the name
  if "train" in args.action:
    if not args.gin_file:
      parser.error("train needs --gin_file")
    if not (args.model_dir or "").startswith("gs://"):
      parser.error(f"--model_dir={args.model_dir!r}: TPU workers need a gs:// model dir.")
  return args


def main(argv=None, exists=None):
  """Runs (or with --dry_run prints) the actions; `exists` checks gs:// inputs."""
  args = parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tarball = "tfadv.tar.gz" if args.dry_run else (
      pack_checkout(root) if "setup" in args.action else "")
  uploads, input_params, mounts = [], [], []
  if "train" in args.action:
    try:
      uploads, input_params, mounts = resolve_inputs(
          read_inputs(args.gin_file, args.gin_param), args.model_dir, root,
          exists=exists, pod=num_hosts(args.accelerator_type) > 1)
    except InputError as e:
      print(f"tpu_vm: {e}", file=sys.stderr)
      return 2
  plan = commands(args, tarball, uploads, input_params, mounts)
  print(f"# {args.accelerator_type}: {num_hosts(args.accelerator_type)} host(s), runtime "
        f"{args.version or runtime_version(args.accelerator_type, args.tf_version)}")
  for action in args.action:
    for command in plan[action]:
      print(shlex.join(command), flush=True)
      if not args.dry_run:
        code = subprocess.call(command)
        if code != 0 and action != "logs":
          print(f"{action} failed with exit {code}.", file=sys.stderr)
          return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
