#!/usr/bin/env python3
"""Starts N tfadv workers on this machine, wired together by TF_CONFIG.

    python launch/multi_worker.py --num_workers=2 -- \\
        --gin_file=configs/demo.gin --model_dir=runs/demo_2workers

Every worker runs the same entry point, `python -m tfadv.main`, with the
arguments after `--` plus `make_strategy.kind = 'multi_worker'`; each gets a
TF_CONFIG naming all workers on 127.0.0.1 (free ports picked here) and its
own index. Worker 0 is the chief: it alone writes checkpoints and summaries to
the model dir (the others write to temporary dirs, removed at the end). Logs
go to `<log_dir>/worker-<i>.log`; the chief's is also streamed to stdout. The
launcher waits for all workers, prints each exit status, and exits with the
first non-zero one. SIGTERM or Ctrl-C is forwarded to every worker (which
then checkpoint and stop: see tfadv/preemption.py).

On several machines, run the same command line on each with TF_CONFIG set by
your cluster manager instead; this script is the one-machine special case.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PREEMPTED = 128 + signal.SIGTERM


def free_ports(n):
  sockets = []
  for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def tf_config(workers, index):
  return json.dumps({"cluster": {"worker": workers},
                     "task": {"type": "worker", "index": index}})


def describe(code):
  if code == 0:
    return "ok"
  if code == PREEMPTED:
    return "preempted: checkpoint saved, rerun to resume"
  if code < 0:
    return f"killed by signal {-code}"
  return "failed"


def _stream(path, stop):
  with open(path, "r", errors="replace") as f:
    while True:
      line = f.readline()
      if line:
        sys.stdout.write(f"[worker 0] {line}")
        sys.stdout.flush()
      elif stop.is_set():
        return
      else:
        time.sleep(0.2)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--log_dir", default=None, help="default: a new temp dir")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--quiet", action="store_true", help="do not stream worker 0")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="-- then the arguments of python -m tfadv.main")
  args = parser.parse_args(argv)
  main_args = args.args[1:] if args.args[:1] == ["--"] else args.args
  if args.num_workers < 1:
    parser.error("--num_workers must be >= 1")
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="tfadv_workers_")
  os.makedirs(log_dir, exist_ok=True)
  workers = [f"127.0.0.1:{port}" for port in free_ports(args.num_workers)]
  command = [args.python, "-m", "tfadv.main", *main_args,
             "--gin_param=make_strategy.kind = 'multi_worker'"]
  print(f"Starting {args.num_workers} workers {workers}; logs in {log_dir}", flush=True)
  procs, logs = [], []
  for index in range(args.num_workers):
    env = dict(os.environ, TF_CONFIG=tf_config(workers, index))
    path = os.path.join(log_dir, f"worker-{index}.log")
    logs.append(open(path, "w"))
    procs.append(subprocess.Popen(command, env=env, stdout=logs[-1],
                                  stderr=subprocess.STDOUT))

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  stop = threading.Event()
  streamer = None
  if not args.quiet:
    streamer = threading.Thread(target=_stream, args=(logs[0].name, stop), daemon=True)
    streamer.start()
  start = time.time()
  codes = [proc.wait() for proc in procs]
  stop.set()
  if streamer:
    streamer.join(timeout=5)
  for f in logs:
    f.close()
  print(f"All {len(procs)} workers exited after {time.time() - start:.1f}s:")
  for index, code in enumerate(codes):
    print(f"  worker {index} ({workers[index]}): exit {code} ({describe(code)}), "
          f"log {logs[index].name}")
  return next((c if c > 0 else 128 - c for c in codes if c != 0), 0)


if __name__ == "__main__":
  sys.exit(main())
