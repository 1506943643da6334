"""A fork server for tests/mutation.py: pytest runs without re-importing TensorFlow.

One mutant costs one pytest run; importing TensorFlow and Keras is a third of
a short one. The server imports them once (and nothing of tfadv), then forks
a child per request that runs `pytest.main` in the scratch copy, so the
child imports the mutated file fresh from disk. This is the design of
mutmut 3's runner. mutmut 2 runs a shell command per mutant: that command is
this file's client, which starts in milliseconds (no TensorFlow) and exits
with the child's status. A client killed by mutmut's timeout takes its child
(and the child's processes) with it.

    python tests/mutation_server.py serve SOCKET LOG     # in the scratch copy
    python tests/mutation_server.py run SOCKET [--limit=S --mutant=ID] -- PYTEST_ARGS...

With --limit, a run longer than S seconds (a mutant that makes a test hang)
is ended by the server, and the client notes the mutant in `.mutation-timeouts`
and exits 1, so mutmut counts it killed and tests/mutation.py reports it as
timed out. mutmut's own timeout (ten times the unmutated run of all the
file's tests) would hold a core for that long.
"""

TIMED_OUT = 124

import json
import os
import select
import signal
import socket
import sys
import time


def serve(path: str, log: str) -> None:
  sys.dont_write_bytecode = True  # a mutant must never be read from a stale .pyc
  import numpy  # pylint: disable=g-import-not-at-top,unused-import
  import pytest  # pylint: disable=g-import-not-at-top
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  import keras  # pylint: disable=g-import-not-at-top,unused-import
  import keras_hub  # pylint: disable=g-import-not-at-top,unused-import
  if os.path.exists(path):
    os.remove(path)
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  server.bind(path)
  server.listen(1)
  server.settimeout(5.0)
  parent = os.getppid()
  while True:
    try:
      connection, _ = server.accept()
    except socket.timeout:
      if os.getppid() != parent:  # tests/mutation.py is gone: so is its server
        return
      continue
    connection.settimeout(None)
    with connection:
      request = json.loads(connection.makefile().readline())
      if request.get("stop"):
        return
      pid = os.fork()
      if pid == 0:  # the child: a fresh pytest in a copy of the pristine parent
        server.close()
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(request["cwd"])
        code = 3
        try:
          code = int(pytest.main(request["args"]))
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          os._exit(code)  # pylint: disable=protected-access
      code = _wait(pid, connection, request.get("limit"))
      if code is not None:
        try:
          connection.sendall(f"{code}\n".encode())
        except OSError:
          pass


def _wait(pid: int, connection, limit=None) -> "int | None":
  """The child's exit status; None (and the child's group killed) when the
  client hung up first (mutmut's timeout killed it); TIMED_OUT (and the
  group killed) after `limit` seconds."""
  start = time.time()
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    readable, _, _ = select.select([connection], [], [], 0.05)
    hung_up = readable and not connection.recv(1)
    if hung_up or (limit is not None and time.time() - start > limit):
      os.killpg(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      return None if hung_up else TIMED_OUT


def request(path: str, message: dict, attempts: int = 600) -> "int | None":
  for _ in range(attempts):  # the server may still be importing TensorFlow
    try:
      client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      client.connect(path)
      break
    except (FileNotFoundError, ConnectionRefusedError):
      client.close()
      time.sleep(0.1)
  else:
    raise SystemExit(f"mutation_server: no server at {path}")
  with client:
    client.sendall((json.dumps(message) + "\n").encode())
    answer = client.makefile().readline()
  return int(answer) if answer.strip() else None


def main(argv) -> int:
  if argv[1] == "serve":
    serve(argv[2], argv[3])
    return 0
  if argv[1] == "stop":
    request(argv[2], {"stop": True})
    return 0
  assert argv[1] == "run" and "--" in argv, argv
  split = argv.index("--")
  options = dict(a[2:].split("=", 1) for a in argv[3:split])
  limit = float(options["limit"]) if "limit" in options else None
  code = request(argv[2], {"cwd": os.getcwd(), "args": argv[split + 1:], "limit": limit})
  if code == TIMED_OUT:
    with open(".mutation-timeouts", "a") as f:
      f.write(options.get("mutant", "?") + "\n")
    return 1
  if code in (2, 4):
    # pytest's "interrupted" (errors while collecting a test module) and "usage
    # error" (a conftest that fails to import): here, a mutant that does not
    # import (a SyntaxError). The unmutated run collected these very tests
    # (the line map is remade whenever they change), so the mutant broke
    # them: killed, as mutmut 3 counts it (mutmut 2 reads any status but 1 as
    # survived).
    return 1
  return 3 if code is None else code


if __name__ == "__main__":
  sys.exit(main(sys.argv))
