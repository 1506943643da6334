"""Mutation testing of the numerical core: `make mutation` runs this (mutmut 2.x).

Each file is mutated in a scratch copy of the repository, never in the
working tree, with only the tests that cover it as mutmut's runner, so one
mutant costs one short pytest process (about 10-20 s here, most of it
importing TensorFlow). Files run two at a time (`--jobs`). The report,
`docs/mutation.md`, gives per file the mutants killed, survived and timed
out, the kill rate, and each survivor's diff with the reason it was judged
equivalent (`EQUIVALENT`), or "not explained": a test to write.

    .venv/bin/python tests/mutation.py                    # the core files
    .venv/bin/python tests/mutation.py --files=perturbation --out=/tmp/m.md
"""

import argparse
import concurrent.futures
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file -> the tests that cover it (pytest arguments). Fast tests only, so that
# a run fits this machine; each list was checked to pass unmutated.
_ATTACK_TESTS = [
    "tests/test_attacks.py", "tests/test_vision.py", "tests/test_embedding_output.py",
    "-k", "(apgd or pgd or attack or worst or restarts or dlr or robust or iterate "
          "or fgsm or float16) and not xla and not replicas and not ordered"]
TARGETS = {  # tfadv/attacks.py until it became the package (one file per family)
    "attacks_base": ("tfadv/attacks/base.py", _ATTACK_TESTS),
    "attacks_pgd": ("tfadv/attacks/pgd.py", _ATTACK_TESTS),
    "attacks_apgd": ("tfadv/attacks/apgd.py", _ATTACK_TESTS),
    "attacks_embedding": ("tfadv/attacks/embedding.py", _ATTACK_TESTS),
    "perturbation": ("tfadv/perturbation.py", [
        "tests/test_embedding_output.py", "tests/test_vision.py", "tests/test_attacks.py",
        "-m", "not slow", "-k", "not per_replica and not idx and not fashion and not shapes "
                                "and not ordered and not xla and not replicas"]),
    "loss_scaling": ("tfadv/loss_scaling.py", [
        "tests/test_attacks.py", "tests/test_mixed_precision.py",
        "-k", "agrees or (float16 and (gp or skipped or overflow or free or fgsm or evaluation))"]),
}
_TEXT = ["tests/test_nlp_methods.py", "tests/test_embedding_output.py"]
# Configured, not run by default (`--files=...`): the methods and the
# model-selection code. Their tests train tiny models, so a file takes hours.
TARGETS.update({
    "fgm": ("tfadv/methods/fgm.py", _TEXT + ["-m", "not slow"]),
    "gradient_penalty": ("tfadv/methods/gradient_penalty.py", _TEXT + ["-m", "not slow"]),
    "embedding_matrix": ("tfadv/methods/embedding_matrix.py", _TEXT + ["-m", "not slow"]),
    "embedding_output": ("tfadv/methods/embedding_output.py", _TEXT + ["-m", "not slow"]),
    "freelb": ("tfadv/methods/freelb.py", _TEXT + ["-m", "not slow"]),
    "free": ("tfadv/methods/free.py", ["tests/test_vision.py", "tests/test_embedding_output.py",
                                       "-m", "not slow", "-k", "free or stuck"]),
    "pgd": ("tfadv/methods/pgd.py", ["tests/test_vision.py", "-m", "not slow"]),
    "atta": ("tfadv/methods/atta.py", ["tests/test_atta.py",
                                       "-k", "not over_the_limit and not sigterm and not xla"]),
    "controller": ("tfadv/controller.py", [
        "tests/test_contracts.py", "tests/test_training.py",
        "-k", "checkpoint_is_chosen or kill_and_resume or loss_falls"]),
    "experiment": ("tfadv/experiment.py", [
        "tests/test_contracts.py", "tests/test_training.py",
        "-k", "checkpoint_is_chosen or kill_and_resume or new_task"]),
    "char_substitution": ("tfadv/attacks/char_substitution.py", [
        "tests/test_char_substitution.py", "tests/test_char_at.py", "-m", "not slow",
        "-k", "not xla and not replicas"]),
})
CORE = ("attacks_base", "attacks_pgd", "attacks_apgd", "attacks_embedding", "perturbation",
        "loss_scaling", "atta")
# Not mutated: string and f-string literals (error messages and gin names; a
# string that selects behaviour, `norm == "linf"`, is still mutated through
# its operator) and decorators (`@gin.configurable`). Everything else is.
DISABLED = "string,fstring,decorator"

# (file, the mutated line as mutmut writes it, stripped) -> why no test can
# tell the mutant from the original.
_NO_TAPE_VARIABLES = ("the tape asks for the input's gradient only; watching the "
                      "model's variables as well costs memory, not a different gradient")
_GUARD = ("the guard against a zero denominator: its size or sign matters only when "
          "the three largest logits tie exactly (or a gradient is exactly zero)")
_ONES = "dividing by a tensor of ones where the original multiplies by it: the same values"
_COUNT = ("the floor guards an empty count: a count of real entries is at least the hidden "
          "size (> 2) as soon as there is one real token, and with none the result is 0 "
          "either way")
EQUIVALENT = {
    ("tfadv/methods/atta.py",
     "return tf.reduce_max(tf.where(same, positions[None, :], -2), axis=1)"):
        "any negative fill: every id matches itself at a position >= 0, so the fill never wins",
    ("tfadv/methods/atta.py", "limit = available / 2 if available else None"):
        "needed is an integer: needed > a/2 and needed > a//2 agree for every integer a",
    ("tfadv/methods/atta.py",
     "return scale * tf.random.stateless_normal(shape, seed=[seed, 1915])"):
        "another fixed stream constant: the initial noise is as small and as seeded",
    ("tfadv/methods/atta.py", "initial, trainable=True, dtype=tf.float32,"):
        "no tape ever watches the memory (it is read before the passes' tapes and is "
        "not a model variable), so trainable=False only documents that",
    ("tfadv/methods/atta.py", "delta_gradient = None"):
        "the initial value is only returned when num_steps = 0, which the constructor refuses",
    **{(f"tfadv/attacks/{name}.py", "with tf.GradientTape(watch_accessed_variables=True) as tape:"):
       _NO_TAPE_VARIABLES for name in ("pgd", "apgd", "embedding", "char_substitution")},
    ("tfadv/attacks/pgd.py",
     "broken = tf.not_equal(tf.argmax(logits, +1, output_type=labels.dtype), labels)"):
        "axis +1 is axis −1 for logits of rank 2 (batch × classes), the only rank here",
    ("tfadv/attacks/apgd.py",
     "correct = tf.equal(tf.argmax(logits, +1, output_type=tf.int32), tf.cast(labels, tf.int32))"):
        "axis +1 is axis −1 for logits of rank 2 (batch × classes), the only rank here",
    ("tfadv/attacks/apgd.py",
     "t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) - 1e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py",
     "t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) + 2e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py", "t = t / (per_example_norm(t) - 1e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py", "t = t / (per_example_norm(t) + 2e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py", "return -(true - other) / (top3[:, 0] - top3[:, 2] - 1e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py", "return -(true - other) / (top3[:, 0] - top3[:, 2] + 2e-12)"): _GUARD,
    ("tfadv/perturbation.py", "TINY = 2e-12"): _GUARD,
    ("tfadv/perturbation.py", "return gradient / (per_example_norm(gradient) - TINY)"): _GUARD,
    ("tfadv/perturbation.py",
     "return delta * tf.minimum(1.0, epsilon / (per_example_norm(delta) - TINY))"): _GUARD,
    ("tfadv/perturbation.py", "return tf.ones(tf.concat([tf.shape(ids)[:3], [1]], 0), tf.float32)"):
        "token ids have rank 2 (batch × length): their shape's first 3 entries are its first 2",
    ("tfadv/perturbation.py", "dims = tf.reduce_sum(tf.cast(mask, dtype) / tf.ones(shape, dtype),"):
        _ONES,
    ("tfadv/perturbation.py", "mask = tf.cast(mask, tf.float32) / tf.ones_like(zero)"): _ONES,
    ("tfadv/perturbation.py",
     "return epsilon * direction * tf.pow(u, 1.0 / tf.maximum(dims, 2.0))"): _COUNT,
    ("tfadv/perturbation.py",
     "return tf.reduce_sum(zero * mask) / tf.maximum(tf.reduce_sum(mask), 2.0)"): _COUNT,
    ("tfadv/attacks/apgd.py",
     "clean_wrong = tf.not_equal(tf.argmax(clean_logits, +1, output_type=tf.int32),"):
        "axis +1 is axis −1 for logits of rank 2 (batch × classes), the only rank here",
    ("tfadv/attacks/apgd.py",
     "window = tf.constant([float(checks.get(i, 2)) for i in range(self.num_steps)])"):
        "the window is read only at check iterations (`is_check`); the filler for the "
        "others is never used",
    ("tfadv/loss_scaling.py",
     "if across_replicas and context is not None and context.num_replicas_in_sync >= 1:"):
        "on one replica the all-reduce of the overflow flag is the identity: the same "
        "flag, one no-op collective more",
}


def scratch_copy(path: str) -> None:
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
  for name in files:
    if name.startswith(("docs/", "benchmarks/", "launch/")):
      continue
    os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, name), os.path.join(path, name))


def run_file(key: str, python: str, report_only: bool = False) -> dict:
  source, tests = TARGETS[key]
  work = tempfile.mkdtemp(prefix=f"tfadv-mutation-{key}-")
  scratch_copy(work)
  # mutmut's cache is kept between runs: a rerun after new tests retests the
  # survivors only (killed mutants stay killed while the source is unchanged).
  kept = os.path.join(REPO, ".mutation-cache", f"{key}.sqlite")
  if os.path.exists(kept):
    shutil.copy2(kept, os.path.join(work, ".mutmut-cache"))
  env = dict(os.environ, PYTHONPATH=work, TF_CPP_MIN_LOG_LEVEL="3")
  runner = " ".join([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
                    + [f"'{t}'" if " " in t else t for t in tests])
  start = time.time()
  # mutmut's progress goes to a log (never read the cache while it runs: a
  # second reader of it stalled mutmut's worker here).
  log_path = os.path.join(tempfile.gettempdir(), f"tfadv-mutation-{key}.log")
  print(f"{source}: mutating in {work}, progress in {log_path}", flush=True)
  with open(log_path, "w") as log:
    if report_only:
      log.write("--report_only: mutmut not run; the kept cache reported.\n")
    else:
      subprocess.run([python, "-m", "mutmut", "run", f"--paths-to-mutate={source}",
                      f"--runner={runner}", "--tests-dir=tests",
                      f"--disable-mutation-types={DISABLED}"],
                     cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
  seconds = time.time() - start
  rows = sqlite3.connect(os.path.join(work, ".mutmut-cache")).execute(
      "SELECT id, status FROM Mutant").fetchall()
  survivors = []
  for mutant, status in rows:
    if status in ("bad_survived", "bad_timeout", "ok_suspicious"):
      diff = subprocess.run([python, "-m", "mutmut", "show", str(mutant)], cwd=work, env=env,
                            capture_output=True, text=True, check=False).stdout
      survivors.append((mutant, status, diff))
  os.makedirs(os.path.dirname(kept), exist_ok=True)
  shutil.copy2(os.path.join(work, ".mutmut-cache"), kept)
  shutil.rmtree(work, ignore_errors=True)
  statuses = [status for _, status in rows]
  return {"key": key, "source": source, "tests": tests, "seconds": seconds,
          "total": len(rows) - statuses.count("untested"),
          "untested": statuses.count("untested"), "killed": statuses.count("ok_killed"),
          "survived": statuses.count("bad_survived"), "timeout": statuses.count("bad_timeout"),
          "suspicious": statuses.count("ok_suspicious"), "survivors": survivors}


def _mutated_line(diff: str) -> str:
  added = [line[1:].strip() for line in diff.splitlines()
           if line.startswith("+") and not line.startswith("+++")]
  return added[0] if added else ""


def _is_equivalent(source: str, diff: str) -> bool:
  return (source, _mutated_line(diff)) in EQUIVALENT


def report(results, out: str) -> None:
  lines = ["# Mutation testing of the numerical core", "",
           "Written by `make mutation` (`tests/mutation.py`, mutmut 2.5.1): each file mutated "
           "in a scratch copy, its covering tests as the runner. A mutant is *killed* when a "
           "test fails (or the run times out); a survivor is listed with its diff, and either "
           "the reason it is equivalent to the original or \"not explained\" (a test to write). "
           f"Mutation types off: {DISABLED} (messages and gin names, not behaviour).",
           "", "| file | mutants | killed | timed out | survived (explained equivalent) "
           "| kill rate | kill rate of the non-equivalent |", "|---|---|---|---|---|---|---|"]
  for r in results:
    killed = r["killed"] + r["timeout"]
    rate = 100.0 * killed / max(r["total"], 1)
    equivalent = sum(1 for _, status, diff in r["survivors"] if status != "bad_timeout"
                     and _is_equivalent(r["source"], diff))
    rate_real = 100.0 * killed / max(r["total"] - equivalent, 1)
    untested = f" (+{r['untested']} not run: stopped)" if r.get("untested") else ""
    lines.append(f"| `{r['source']}` | {r['total']}{untested} | {r['killed']} | {r['timeout']} | "
                 f"{r['survived'] + r['suspicious']} ({equivalent}) | {rate:.1f}% | "
                 f"{rate_real:.1f}% |")
  for r in results:
    lines += ["", f"## `{r['source']}`", "", "Tests: `pytest " + " ".join(
        f"'{t}'" if " " in t else t for t in r["tests"]) + "`", ""]
    survivors = [s for s in r["survivors"] if s[1] != "bad_timeout"]
    if not survivors:
      lines.append("No survivors.")
    for mutant, status, diff in survivors:
      why = EQUIVALENT.get((r["source"], _mutated_line(diff)), "not explained")
      lines += [f"- mutant {mutant} ({status}): {why}", "", "```diff",
                *[l for l in diff.splitlines() if l.startswith(("+", "-", "@"))
                  and not l.startswith(("+++", "---"))], "```", ""]
  with open(out, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--files", default=",".join(CORE),
                      help=f"comma-separated, from {sorted(TARGETS)}")
  parser.add_argument("--jobs", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "mutation.md"))
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from the kept caches (.mutation-cache/), run nothing")
  args = parser.parse_args(argv)
  keys = args.files.split(",")
  unknown = [k for k in keys if k not in TARGETS]
  if unknown:
    parser.error(f"--files: unknown {unknown}; known: {sorted(TARGETS)}")
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    results = list(pool.map(lambda k: run_file(k, sys.executable, args.report_only), keys))
  report(results, args.out)
  for r in results:
    print(f"{r['source']}: {r['killed'] + r['timeout']}/{r['total']} killed", flush=True)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
