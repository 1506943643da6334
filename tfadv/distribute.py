"""The strategy factory: one gin binding picks how a run is distributed."""

import json
import os
from typing import Optional

import gin
import tensorflow as tf
from absl import logging

from tfadv import checks

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def split_cpu(num_devices: int) -> list:
  """Splits the host CPU into `num_devices` logical devices (for tests).

  Must run before TensorFlow initialises its devices.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is None or len(current) != num_devices:
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as e:
      raise RuntimeError(
          f"Cannot split the CPU into {num_devices} logical devices: "
          "TensorFlow's devices are already initialised. Split it before any "
          "other TensorFlow work (tfadv.main does so first thing).") from e
  return [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]


@gin.configurable
def make_strategy(kind: str = "default", num_cpu_devices: int = 0,
                  tpu: Optional[str] = None) -> tf.distribute.Strategy:
  """Builds a `tf.distribute.Strategy`.

  Args:
    kind: "default" (one device), "mirrored" (all local GPUs, or
      `num_cpu_devices` logical CPUs), "multi_worker" (cluster from
      `TF_CONFIG`) or "tpu".
    num_cpu_devices: with "mirrored", split the CPU into this many logical
      devices and mirror over them (tests and debugging).
    tpu: with "tpu": the TPU name or `grpc://` address; "" or "local" for a
      TPU VM's own chips.

  Example:
  >>> strategy = make_strategy("mirrored", num_cpu_devices=2)
  >>> strategy.num_replicas_in_sync
  2
  """
  checks.check("make_strategy", kind=(kind, checks.one_of(STRATEGIES)),
               num_cpu_devices=(num_cpu_devices, checks.NON_NEGATIVE_INT))
  if kind == "default":
    return tf.distribute.get_strategy()
  if kind == "mirrored":
    devices = split_cpu(num_cpu_devices) if num_cpu_devices else None
    return tf.distribute.MirroredStrategy(devices=devices)
  if kind == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("make_strategy.kind='multi_worker' needs the TF_CONFIG "
                       "environment variable (cluster and task); launch/"
                       "multi_worker.py generates it.")
    cluster = json.loads(os.environ["TF_CONFIG"])
    logging.info("Multi-worker cluster: %s, task %s", cluster.get("cluster"),
                 cluster.get("task"))
    return tf.distribute.MultiWorkerMirroredStrategy()
  if tpu is None:
    raise ValueError("make_strategy.kind='tpu' needs a TPU: pass --tpu=NAME "
                     "(or --tpu=local on a TPU VM).")
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu="" if tpu == "local" else tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes checkpoints and summaries (TF's own answer:
  the chief, or worker 0 of a cluster without one)."""
  return bool(strategy.extended.should_checkpoint)


def input_runs_without_python(strategy: tf.distribute.Strategy) -> bool:
  """Whether the strategy's input pipelines run where Python cannot: on the
  TPU servers of the other hosts of a pod slice, under TensorFlow's
  single-client model (worker 0's process drives every host; the others
  run no Python, tensorflow/tensorflow#24099). A single TPU VM, GPUs, CPUs
  and multi-worker runs (a Python process per worker) run it in Python."""
  return (isinstance(strategy, tf.distribute.TPUStrategy)
          and int(getattr(strategy.extended, "num_hosts", 1)) > 1)
