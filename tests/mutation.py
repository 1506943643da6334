"""Mutation testing: `make mutation` runs this (mutmut 2.x).

Each file is mutated in a scratch copy of the repository, never in the
working tree, with only the tests that cover it as mutmut's runner. Three
things make a mutant cheap, none of them changes its verdict:
- a line map (`tests/mutation_coverage.py`: the file's tests once, with
  coverage per test) gives each mutant first the tests that run its line,
  fastest first; a survivor then runs all of the file's tests (`--rerun-all`);
- each pytest run is a child forked from a server that imported TensorFlow
  once (`tests/mutation_server.py`), not a new interpreter;
- of a file with a scope (`SCOPES`) only the scope's mutants run.
Files run two at a time (`--jobs`).

Each file's result goes to `docs/mutation_runs.json` (committed: counts,
survivors' diffs, the source's git blob hash) as soon as its run ends, and
`docs/mutation.md` is written from all of them: per file the mutants killed,
survived and timed out, the kill rate, and each survivor's diff with the
reason it was judged equivalent (`EQUIVALENT`), or "not explained": a test to
write. A row whose source changed since it was measured says so. A run
resumes: the scratch copy and mutmut's cache live in `.mutation-cache/KEY/`,
so a killed run loses one mutant, and a rerun retests only what is not yet
killed (mutmut keys its cache by the mutated line).

    .venv/bin/python tests/mutation.py                    # every file in TARGETS
    .venv/bin/python tests/mutation.py --files=runs,records --jobs=1
    .venv/bin/python tests/mutation.py --report_only      # docs/mutation.md from the records
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

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
# Every method's name (what its runs' HParams show) and defaults: two tests.
_NAMES = "tests/test_contracts.py::test_each_method_names_itself_on_the_hparams_dashboard"
_DEFAULTS = "tests/test_contracts.py::test_each_methods_defaults_are_the_documented_ones"
_STATE = ("tests/test_contracts.py::test_a_methods_random_draws_are_checkpointed_state_"
          "seeded_by_its_own_seed_or_the_runs")
_FREE_STATE = ("tests/test_contracts.py::test_free_buffers_and_token_memory_are_checkpointed_"
               "untrained_state_none_before_build")
_UNTRAINED = "tests/test_r3f.py::test_the_methods_draw_counters_are_state_the_optimizer_never_trains"
_TEXT = ["tests/test_nlp_methods.py", "tests/test_embedding_output.py", _NAMES, _DEFAULTS, _STATE,
         _UNTRAINED]
# The methods and the outer loop: their tests train tiny models, so a file
# takes hours.
TARGETS.update({
    "fgm": ("tfadv/methods/fgm.py", _TEXT + ["-m", "not slow"]),
    # The text tests but their slow ones, and the penalty's float16 steps
    # (slow, but the only tests of its loss-scale division).
    "gradient_penalty": ("tfadv/methods/gradient_penalty.py", _TEXT + [
        "tests/test_mixed_precision.py::test_float16_step_equals_the_float32_step[gp]",
        "tests/test_mixed_precision.py::test_float16_step_equals_the_float32_step[gp_matrix]",
        "-k", "not (compile_with_xla or two_replicas_equal_one_device or "
              "resumes_between_replays or epsilon_ramp_trains)"]),
    "embedding_matrix": ("tfadv/methods/embedding_matrix.py", _TEXT + ["-m", "not slow"]),
    "embedding_output": ("tfadv/methods/embedding_output.py", _TEXT + ["-m", "not slow"]),
    "freelb": ("tfadv/methods/freelb.py", _TEXT + ["-m", "not slow"]),
    "free": ("tfadv/methods/free.py", ["tests/test_vision.py", "tests/test_embedding_output.py",
                                       _NAMES, _DEFAULTS, _FREE_STATE, "-m", "not slow", "-k",
                                       "free or stuck or names_itself or documented_ones"]),
    "pgd": ("tfadv/methods/pgd.py", ["tests/test_vision.py", _NAMES, _DEFAULTS, _STATE,
                                         "-m", "not slow"]),
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
# Issue 39's files: the methods not listed above, the trainer (its
# evaluation accounting), the record store and its readers, the selection.
_NOT_SLOW = ["-m", "not slow"]
TARGETS.update({
    "methods_base": ("tfadv/methods/base.py", _TEXT + [
        "tests/test_r3f.py",
        "tests/test_contracts.py::test_a_plain_step_is_one_training_pass_and_reports_no_metrics",
        "tests/test_contracts.py::test_adding_gradients_keeps_a_pass_that_left_a_variable_out"]
                     + _NOT_SLOW
                     + ["-k", "not xla and (not replicas or penalises_what)"]),
    "plain": ("tfadv/methods/plain.py", ["tests/test_keras_api.py", "tests/test_vision.py",
                                         _NAMES, "-m", "not slow", "-k",
                                         "plain or warm_up or names_itself"]),
    "r3f": ("tfadv/methods/r3f.py", ["tests/test_r3f.py", _NAMES, _DEFAULTS] + _NOT_SLOW),
    "random_direction": ("tfadv/methods/random_direction.py", _TEXT + [
        "tests/test_r3f.py", "-m", "not slow", "-k", "control or random or r3f or replicas "
        "or optimizer"]),
    "char_at": ("tfadv/methods/char_at.py", ["tests/test_char_at.py", _NAMES, _DEFAULTS]
                + _NOT_SLOW),
    "trainer": ("tfadv/trainer.py", [
        "tests/test_vision.py", "tests/test_attacks.py", "tests/test_char_substitution.py",
        "-m", "not slow", "-k", "robust or worst or evaluat or warm_up or validation or budget"]),
    "records": ("tfadv/data/records.py", ["tests/test_records.py", "-k",
                                          "not loopback and not sigkill and not memory_budget"]),
    "sources": ("tfadv/data/sources.py", ["tests/test_records.py", "tests/test_data.py",
                                          "tests/test_imagenet.py", "-m", "not slow"]),
    "pipeline": ("tfadv/data/pipeline.py", ["tests/test_data.py", "tests/test_records.py",
                                            "-m", "not slow"]),
    "runs": ("tfadv/tools/runs.py", ["tests/test_tools.py", "-k",
                                     "not cross_validates and not spec_file"]),
})
# Not mutated: string and f-string literals (error messages and gin names; a
# string that selects behaviour, `norm == "linf"`, is still mutated through
# its operator) and decorators (`@gin.configurable`). Everything else is.
DISABLED = "string,fstring,decorator"

# (file, the mutated line as mutmut writes it, stripped) -> why no test can
# tell the mutant from the original.
_NO_TAPE_VARIABLES = ("the tape asks for the input's gradient only; watching the "
                      "model's variables as well costs memory, not a different gradient")
_GUARD = ("the guard against a zero denominator: its size or sign matters only when "
          "the first and third largest logits tie to within 1e-12")
# Not equivalent in exact arithmetic: what no test should fix. (The guards'
# signs are tested: a norm below the guard keeps its direction.)
_GUARD_SIZE = ("the guard's size, not its sign: doubling it changes a result only where "
               "the norm itself is about 1e-12 or less, and there only the step's length "
               "(the penalty by under ε·1e-12), never its direction")
_RANDOM_NORM = ("the guard divides a random draw (Gaussian or uniform, over a row or an "
                "example) by its own norm or largest entry, which is below 1e-12 with "
                "probability about 0: neither its size nor its sign acts")
_ONES = "dividing by a tensor of ones where the original multiplies by it: the same values"
_COUNT = ("the floor guards an empty count: a count of real entries is at least the hidden "
          "size (> 2) as soon as there is one real token, and with none the result is 0 "
          "either way")
_FIRST_PART = ("the first piece of a split does not depend on how many further splits "
               "are made")
_ONCE = ("the piece after the first occurrence differs only where the marker occurs "
         "twice: `replace_section` writes each section's markers once, and a section "
         "holds one chosen-ε table")
_RANK2_ROWS = ("axis +1 is axis −1 for the embedding matrix's gradient and its rows "
               "(rank 2: rows × hidden), the only rank here")
_LOGITS_AXIS = "axis +1 is axis −1 for logits of rank 2 (batch × classes), the only rank here"
_IDS_RANK2 = "token ids have rank 2 (batch × length): their shape's first 3 entries are its first 2"
_BASE_DEFAULT = ("the base class's default is never used: each method built on it passes its "
                 "own ε (their defaults are tested)")
_STATEFUL_READ = ("a read of the same indices returns the same rows: marking it stateful only "
                  "keeps TensorFlow from folding or deduplicating the call, which changes no "
                  "batch")
_SET_IN_BUILD = "the initial value is never read: build() sets it before any step runs"
_SAME_ROWS = ("every column of a chunk has the chunk's rows: the first column's count "
              "is the second's")
_BLOCK_SIZING = ("performance only: how the fixed layout estimates its rows per block "
                 "from the first rows (how many rows it averages, the floors of the mean "
                 "and of the count) changes how many rows share a block file, not a row "
                 "read back (the reader takes rows_per_block from the metadata)")
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
    ("tfadv/trainer.py",
     "return tf.equal(tf.argmax(logits, +1, output_type=labels.dtype), labels)"):
        "axis +1 is axis −1 for logits of rank 2 (batch × classes), the only rank the "
        "attacks' accounting sees (a task's own count_correct handles other ranks)",
    ("tfadv/trainer.py", "if self._num_attacks >= 1:"):
        "with one attack the worst-case sum is computed but never reported: evaluate() "
        "reads it only when there are two or more (the same test, > 1, decides there)",
    ("tfadv/attacks/pgd.py",
     "broken = tf.not_equal(tf.argmax(logits, +1, output_type=labels.dtype), labels)"):
        _LOGITS_AXIS,
    ("tfadv/attacks/apgd.py",
     "correct = tf.equal(tf.argmax(logits, +1, output_type=tf.int32), tf.cast(labels, tf.int32))"):
        _LOGITS_AXIS,
    ("tfadv/attacks/apgd.py",
     "t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) - 1e-12)"): _RANDOM_NORM,
    ("tfadv/attacks/apgd.py",
     "t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) + 2e-12)"): _RANDOM_NORM,
    ("tfadv/attacks/apgd.py", "t = t / (per_example_norm(t) - 1e-12)"): _RANDOM_NORM,
    ("tfadv/attacks/apgd.py", "t = t / (per_example_norm(t) + 2e-12)"): _RANDOM_NORM,
    ("tfadv/attacks/apgd.py", "return -(true - other) / (top3[:, 0] - top3[:, 2] - 1e-12)"): _GUARD,
    ("tfadv/attacks/apgd.py", "return -(true - other) / (top3[:, 0] - top3[:, 2] + 2e-12)"): _GUARD,
    ("tfadv/perturbation.py", "TINY = 2e-12"): _GUARD_SIZE,
    ("tfadv/perturbation.py", "return tf.ones(tf.concat([tf.shape(ids)[:3], [1]], 0), tf.float32)"):
        _IDS_RANK2,
    ("tfadv/perturbation.py", "dims = tf.reduce_sum(tf.cast(mask, dtype) / tf.ones(shape, dtype),"):
        _ONES,
    ("tfadv/perturbation.py", "mask = tf.cast(mask, tf.float32) / tf.ones_like(zero)"): _ONES,
    ("tfadv/perturbation.py",
     "return epsilon * direction * tf.pow(u, 1.0 / tf.maximum(dims, 2.0))"): _COUNT,
    ("tfadv/perturbation.py",
     "return tf.reduce_sum(zero * mask) / tf.maximum(tf.reduce_sum(mask), 2.0)"): _COUNT,
    ("tfadv/attacks/apgd.py",
     "clean_wrong = tf.not_equal(tf.argmax(clean_logits, +1, output_type=tf.int32),"):
        _LOGITS_AXIS,
    ("tfadv/attacks/apgd.py",
     "window = tf.constant([float(checks.get(i, 2)) for i in range(self.num_steps)])"):
        "the window is read only at check iterations (`is_check`); the filler for the "
        "others is never used",
    ("tfadv/tools/runs.py", "stderr=subprocess.STDOUT, text=True, bufsize=2)"):
        "the pipe is read line by line either way: the buffer size of the reader does "
        "not change which lines arrive or when the loop sees them (each line is "
        "flushed by the run)",
    ("tfadv/tools/runs.py", 'self.cpus = ""  # CPU cores to pin the run to (taskset), or all'):
        "an empty string is falsy like None: no pinning either way",
    ("tfadv/methods/random_direction.py", "ALG = None"):
        "None is TensorFlow's 'auto_select', which is Philox on CPU (the tests' device); "
        "the name pins it where another device might select another generator",
    ("tfadv/tools/runs.py", "values = None"):
        "None and [] are both falsy: `not values` raises the same usage error",
    ("tfadv/tools/runs.py", "means = {value: round(mean_std(accs)[0], 13) for value, accs in "
                            "accuracies_by_value.items()}"):
        "rounding the means to 12 or 13 decimals (it only absorbs float noise in "
        "sums of accuracies) gives the same order and ties for accuracies of any "
        "split size",
    **{("tfadv/tools/runs.py", line): _FIRST_PART for line in (
        "return content.split(begin, 1)[1].split(end, 2)[0]",
        'if a.split("=", 2)[0] not in _PLACEMENT_FLAGS + ("--noreport",)]')},
    **{("tfadv/tools/runs.py", line): _ONCE for line in (
        "return content.split(begin, 2)[1].split(end, 1)[0]",
        "for line in text.split(CHOSEN_HEADER, 2)[1].splitlines()[2:]:")},
    ("tfadv/methods/fgm.py", "delta = ramped(self.epsilon) * gradient / (norm + 2e-12)"):
        _GUARD_SIZE,
    **{("tfadv/methods/fgm.py", line): _RANDOM_NORM for line in (
        "return row_norm * noise / (noise_norm - 1e-12)",
        "return row_norm * noise / (noise_norm + 2e-12)")},
    ("tfadv/methods/fgm.py", "return tf.abs(delta) / tf.sign(noise)"):
        "dividing by ±1 is multiplying by it; sign(noise) is 0 only where a Gaussian "
        "draw is exactly 0",
    **{("tfadv/methods/fgm.py", line): _RANK2_ROWS for line in (
        "row_norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=+1, keepdims=True))",
        "noise_norm = tf.sqrt(tf.reduce_sum(tf.square(noise), axis=+1, keepdims=True))")},
    **{(f"tfadv/methods/{name}.py", 'self._embedding = ""'): _SET_IN_BUILD
       for name in ("fgm", "gradient_penalty")},
    ("tfadv/methods/r3f.py", 'self._step = ""'): _SET_IN_BUILD,
    ("tfadv/methods/embedding_output.py", 'self.perturbation = ""'): _SET_IN_BUILD,
    ("tfadv/methods/embedding_output.py",
     "def __init__(self, epsilon: float = 2.0, init_magnitude: Optional[float] = None,"):
        _BASE_DEFAULT,
    ("tfadv/methods/embedding_output.py",
     "return ramped(self.init_magnitude) * uniform * mask / tf.sqrt(tf.maximum(dims, 2.0))"):
        _COUNT,
    ("tfadv/methods/embedding_output.py",
     "tf.zeros(tuple(input_shape[:3]) + (self.hook.output_dim,), tf.float32),"):
        _IDS_RANK2,
    **{("tfadv/methods/char_at.py", line): _LOGITS_AXIS for line in (
        "broken = tf.not_equal(tf.argmax(logits, +1, output_type=tf.int32),",
        "tf.argmax(logits, +1, output_type=tf.int32), tf.cast(labels, tf.int32)))")},
    **{("tfadv/methods/char_at.py", line): (
        "the tolerance for a share written as a float of k/m: the float of any k/m (m <= 64) "
        "is within 1e-16 of it, so only a share between 1e-9 and 2e-9 away from every k/m "
        "would be judged differently") for line in (
        "if abs(float(share) - self.attacked_share) >= 1e-9:",
        "if abs(float(share) - self.attacked_share) > 2e-09:")},
    **{(f"tfadv/methods/{name}.py", line): _SET_IN_BUILD for name, line in (
        ("pgd", 'self._rng: Optional[tf.random.Generator] = ""'),
        ("embedding_output", 'self._rng = ""'), ("embedding_output", 'self.hook = ""'))},
    ("tfadv/methods/embedding_output.py",
     'def __init__(self, epsilon: float = 2.0, layer_name: str = "token_embedding",'):
        _BASE_DEFAULT,
    **{("tfadv/methods/r3f.py", line): _LOGITS_AXIS for line in (
        "log_p = tf.nn.log_softmax(tf.cast(logits_p, tf.float32), axis=+1)",
        "log_q = tf.nn.log_softmax(tf.cast(logits_q, tf.float32), axis=+1)",
        "return tf.reduce_sum((tf.exp(log_p) - tf.exp(log_q)) * (log_p - log_q), axis=+1)")},
    ("tfadv/data/sources.py",
     "serialized = tf.numpy_function(py_read, [indices], tf.string, stateful=True)"):
        _STATEFUL_READ,
    **{(f"tfadv/methods/{name}.py", "buffer_name = None"): (
        "the buffer variable's name only labels it (None: TensorFlow names it); "
        "checkpoints key a method's variables by their position (Experiment's "
        "`_numbered`), not by name") for name in ("freelb", "free", "embedding_output")},
    ("tfadv/methods/freelb.py", "if ascent >= 0:  # the first pass's dropout masks again"):
        "before the first pass the seed states are the ones just saved: restoring them "
        "is the identity",
    ("tfadv/data/pipeline.py",
     "return tf.where(valid, position, 1), tf.cast(valid, tf.float32), position, replay"):
        "a padding row (past the split's end, evaluation only) reads some real row with "
        "weight 0: which row fills it counts nowhere",
    ("tfadv/data/sources.py",
     "columns = tf.numpy_function(py_read, [indices], out_types, stateful=True)"):
        _STATEFUL_READ,
    ("tfadv/data/sources.py", "name, split=split, data_dir=data_dir, download=True,"):
        "the builder is prepared by then (checked just above, or refused): TFDS's "
        "download=True has nothing left to do",
    ("tfadv/data/sources.py", "expand_animations=True), spec.shape),"):
        "the stores hold PNG and JPEG only (write_store's encodings): animations are GIF's",
    ("tfadv/attacks/base.py", "per_example_metrics = None"):
        "None is falsy like {}: the trainer reads the attribute only as `if getattr(attack, "
        "'per_example_metrics', None):`",
    ("tfadv/data/sources.py", "reads_in_python: bool = None"):
        "None is falsy like False: the one test of the flag (`if source.reads_in_python`) "
        "reads them alike",
    ("tfadv/methods/base.py", "keeps_input_perturbations = None"):
        "None is falsy like False: the one test of the flag (`if method.keeps_input_"
        "perturbations and ...`) reads them alike",
    ("tfadv/methods/base.py", "LossFn = None"):
        "a type alias, read only by annotations (Python never evaluates them at a call)",
    ("tfadv/methods/embedding_matrix.py", "order = tf.argsort(indices, stable=False)"):
        "the order among equal indices only orders the summands of one duplicated row: "
        "the same sum, up to float rounding the tests' tolerances allow",
    ("tfadv/methods/embedding_matrix.py", 'if combine != "sorted":'):
        "the two ways of combining duplicate rows give the same ‖g‖² (they differ in "
        "speed, not value): swapping them changes no result",
    ("tfadv/methods/gradient_penalty.py",
     "return ramped(self.epsilon) * tf.sqrt(squared_norm + 2e-24)"): _GUARD_SIZE,
    **{("tfadv/data/records.py", line): _SAME_ROWS for line in (
        "first = min(len(rows[order[1]]), 64)", "for j in range(len(rows[order[1]])):",
        "for i in range(len(rows[names[1]])):")},
    **{("tfadv/data/records.py", line): _BLOCK_SIZING for line in (
        "first = min(len(rows[order[0]]), 65)",
        "mean_row = max(2, sum(_nbytes(rows[k][:first]) for k in order) // max(1, first))",
        "mean_row = max(1, sum(_nbytes(rows[k][:first]) for k in order) // max(2, first))")},
    ("tfadv/data/records.py",
     'info = {"num_examples": n, "rows_per_block": rows_per_block or 2, "blocks": block}'):
        "rows_per_block is None only for a split of 0 rows (no chunk was read), where no "
        "index can address a block",
    ("tfadv/data/records.py", "return tf.io.encode_jpeg(value, quality=96).numpy()"):
        "another JPEG quality: a lossy encoding as close to the image, which the store "
        "then returns as written; no test of a lossy codec can tell 95 from 96",
    ("tfadv/loss_scaling.py",
     "if across_replicas and context is not None and context.num_replicas_in_sync >= 1:"):
        "on one replica the all-reduce of the overflow flag is the identity: the same "
        "flag, one no-op collective more",
    ("tfadv/attacks/char_substitution.py",
     "sounds = {s for s in sounds if s.isalpha() or s.isascii()}  # a reading, not the char"):
        "where pypinyin knows no reading it returns the character itself; kept as a "
        "'reading', it is shared by no other token (a token here is one character), so it "
        "adds no candidate; Style.NORMAL readings are ASCII letters, so no other string "
        "passes one test and not both",
    **{("tfadv/attacks/char_substitution.py", line): (
        "the tolerance that rounds a share which is an integer in exact arithmetic to that "
        "integer despite float32 error: 1e-6 and 2e-6 decide differently only for a share "
        "between 1e-6 and 2e-6 from an integer, which 0.1·n (float32) gives for no n up to "
        "512 characters") for line in (
        "return tf.floor(share + 2e-06)",
        "return tf.maximum(tf.math.ceil(share - 2e-06), tf.minimum(characters, 1.0))")},
    ("tfadv/attacks/char_substitution.py",
     "distance = (tf.reduce_sum(tf.square(table), +1)[None, None, :]"):
        "axis +1 is axis −1 for the token-embedding table (vocabulary × hidden), its only rank",
    ("tfadv/attacks/char_substitution.py",
     "active = tf.logical_and(tf.equal(tf.argmax(logits, +1, output_type=tf.int32), labels),"):
        _LOGITS_AXIS,
    **{("tfadv/attacks/char_substitution.py", line):
       "axis +1 is axis −1 for tensors of rank 2 (logits: batch × classes; the verified "
       "texts' losses and flags: batch × top_k), the only rank here" for line in (
           "best = tf.argmax(tried_loss, +1, output_type=tf.int32)",
           "queries += tf.where(running, tf.reduce_sum(tf.cast(tried, tf.float32), +1), 0.0)",
           "flipped = tf.not_equal(tf.argmax(logits, +1, output_type=tf.int32), labels)",
           "greedy_broken = tf.not_equal(tf.argmax(greedy_logits, +1, output_type=tf.int32), "
           "labels)",
           "flip = tf.reshape(tf.not_equal(tf.argmax(logits, +1, output_type=tf.int32),",
           "queries += tf.reduce_sum(tf.cast(tf.math.is_finite(loss), tf.float32), +1)",
           "flipping = tf.reduce_any(flip, +1) & ~broken",
           "text, _ = text_of(tf.argmax(tf.where(flip, loss, -np.inf), +1, output_type=tf.int32))",
           "clean = tf.argmax(model(inputs, training=False), +1).numpy()",
           "after = tf.argmax(logits, +1).numpy()")},
    **{("tfadv/attacks/char_substitution.py", line): (
        "performance only: the beam's map over positions or kept texts runs its "
        "iterations one at a time or two at a time, the same results") for line in (
        "loss, flip = tf.map_fn(at_or_after_the_last, tf.range(length), parallel_iterations=2,",
        "lambda j: text_of(top[:, j]), tf.range(keep), parallel_iterations=2,")},
    ("tfadv/attacks/char_substitution.py",
     "return tf.cond(i <= used, lambda: at_position(i), lambda: ("):
        "performance only: position `used` is past the last attackable one, where every "
        "candidate is invalid (−inf, not queried) whichever branch scores it",
    **{("tfadv/attacks/char_substitution.py", line): (
        "performance only: the beam is also refilled after its last round, and nothing reads "
        "it then") for line in ("if round_ - 1 < self.budget:", "if round_ + 1 <= self.budget:")},
    ("tfadv/attacks/char_substitution.py",
     "def examples(self, model, task, arrays, count: int, batch_size: int = 33):"):
        "the reader's batch size: each example's attack is its own (greedy per example, the "
        "beam per chunk, which changes nothing), so the rows are the same for any batching",
    ("tfadv/attacks/char_substitution.py",
     "gain = tf.einsum(\"blch,blh->blc\", tf.gather(table, tf.maximum(candidates, 1))"):
        "the row gathered for a missing candidate (−1) only fills its slot: its gain is "
        "replaced by −inf (`valid`) before anything reads it",
    **{("tfadv/attacks/char_substitution.py", line): (
        "a candidate is a CJK character of the vocabulary or −1; id 0 is [PAD] in a BERT "
        "vocabulary (keras-hub's and Hugging Face's), never a candidate, so > 0, >= 1 and "
        ">= 0 select the same slots") for line in (
        "valid = (tf.logical_and(candidates > 0, position_ok[..., None])",
        "valid = (tf.logical_and(candidates >= 1, position_ok[..., None])",
        "valid = (ok[:, :, None] & (options > 0)[:, None, :]",
        "valid = (ok[:, :, None] & (options >= 1)[:, None, :]")},
    ("tfadv/attacks/char_substitution.py",
     "order = tf.argsort(tf.cast(~need, tf.int32), stable=False)"):
        "either sort puts greedy's survivors first; which of them share a chunk changes no "
        "example's result (each example's beam is its own: the chunk test runs chunks of "
        "1, 3 and all)",
    ("tfadv/attacks/char_substitution.py",
     "use_beam = broken & ~(greedy_broken & (extra[\"changed\"] < found_changed))"):
        "the beam attacks only greedy's survivors, so where greedy broke an example the "
        "beam's `broken` is false and this comparison decides nothing",
    ("tfadv/attacks/char_substitution.py",
     "used = tf.reduce_max(tf.where(position_ok, tf.range(1, length + 1)[None, :], 1))"):
        "performance only: with no attackable position in the chunk the beam also scores "
        "position 0, whose candidates are all invalid there (−inf, not queried)",
    ("tfadv/attacks/char_substitution.py", "budget >= 0)"):
        "an example whose budget is 0 changes nothing either way: each search's round runs "
        "only below the example's budget (greedy's `running`, the beam's `ok`), so counted "
        "active it is neither queried nor changed (the beam gives it an idle slot)",
}


# (file, an original line, stripped) -> why any surviving mutant of it is
# equivalent: lines that only size files (performance) or format them.
_SHARD_SIZING = ("performance only: the array_record layout sizes its shards from the "
                 "first rows (the sample, the floors, the rounding); a different count "
                 "of rows per shard file, the same rows read back (the reader takes the "
                 "shards from the metadata)")
_JSON_FORMAT = ("formatting only: the file's indentation or escaping; json.load reads "
                "the same values")
EQUIVALENT_LINES = {
    **{("tfadv/data/records.py", line): _SHARD_SIZING for line in (
        "first = chunk(0, min(n, 64))",
        "row_bytes = max(1, sum(_nbytes(first[k]) for k in names) // max(1, min(n, 64)))",
        "rows_per_shard = max(1, shard_bytes // row_bytes)",
        "num_shards = max(1, -(-n // rows_per_shard))")},
    **{("tfadv/data/records.py", line): _BLOCK_SIZING for line in (
        "first = min(len(rows[order[0]]), 64)",
        "mean_row = max(1, sum(_nbytes(rows[k][:first]) for k in order) // max(1, first))",
        "rows_per_block = max(1, block_bytes // mean_row)")},
    **{("tfadv/data/records.py", line): _JSON_FORMAT for line in (
        'json.dump({"labels": list(labels)}, f, ensure_ascii=False, indent=1)',
        "json.dump(metadata, f, indent=1)")},
    **{("tfadv/data/records.py", line): (
        "a default size (shards, chunks, blocks): performance only; every test that "
        "depends on a size passes its own") for line in (
        "shard_bytes: int = 256 << 20, labels: Optional[List[str]] = None,",
        'chunk_rows: int = 4096, layout: str = "array_record",',
        "block_bytes: int = 64 << 10, signature: Optional[dict] = None) -> str:")},
}


# What a run keeps in its scratch copy besides the repository's files.
_RUN_STATE = (".mutmut-cache", ".mutation-lines.json", ".mutation-lines.json.raw",
              ".mutation-equivalent.json", ".mutation-timeouts", ".mutation-last.log",
              "mutmut_config.py")


def scratch_copy(path: str) -> None:
  """`path` as the repository's files (docs, benchmarks and launchers left out)
  and the run's state, nothing else: whatever a mutant wrote there (a mutated
  path can write a store into the working directory) would fail the next
  run's unmutated baseline."""
  files = [name for name in subprocess.run(
      ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
      text=True, check=True).stdout.split()
           if not name.startswith(("docs/", "benchmarks/", "launch/"))]
  for name in files:
    os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, name), os.path.join(path, name))
  wanted = set(files) | set(_RUN_STATE)
  for root, dirs, names in os.walk(path, topdown=False):
    for name in names:
      full = os.path.join(root, name)
      if os.path.relpath(full, path) not in wanted:
        os.remove(full)
    for name in dirs:
      full = os.path.join(root, name)
      if not os.path.islink(full) and not os.listdir(full):
        os.rmdir(full)


# A file of which only some functions are in question: its kill rate counts
# the mutants of those functions (the trainer's evaluation accounting).
SCOPES = {"trainer": ("_correct", "_weighted_count", "_replica_eval_step", "_reduce",
                      "_eval_loop_fn", "evaluate")}


def scope_lines(path: str, names) -> set:
  """The (1-based) lines of the functions and methods called `names` in `path`."""
  import ast  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    tree = ast.parse(f.read())
  return {line for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names
          for line in range(node.lineno, node.end_lineno + 1)}


RECORDS = os.path.join(REPO, "docs", "mutation_runs.json")
_LOCK = threading.Lock()


def blob_hash(path: str) -> str:
  """The file's git blob hash: a record says which source it measured."""
  return subprocess.run(["git", "hash-object", path], cwd=REPO, capture_output=True,
                        text=True, check=True).stdout.strip()


def load_records(path: str = RECORDS) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save_record(result: dict, path: str = RECORDS) -> None:
  """Adds one file's result to the records (read, update, atomic replace)."""
  with _LOCK:
    records = load_records(path)
    records[result["source"]] = {k: v for k, v in result.items() if k != "key"}
    with open(path + ".tmp", "w") as f:
      json.dump(records, f, indent=1, ensure_ascii=False, sort_keys=True)
      f.write("\n")
    os.replace(path + ".tmp", path)


def tests_hash(tests: list) -> str:
  """A hash of the test files `tests` names and their shared helpers: a line
  map made for other tests is made again."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  names = {t.split("::")[0] for t in tests if t.startswith("tests/")}
  for name in sorted(names | {"tests/conftest.py", "tests/builders.py"}):
    with open(os.path.join(REPO, name), "rb") as f:
      digest.update(name.encode() + f.read())
  return digest.hexdigest()


def line_map(key: str, source: str, tests: list, work: str, python: str, env: dict,
             log) -> dict:
  """Which of the file's tests run each of its lines (tests/mutation_coverage.py),
  kept in the scratch copy for the file's source and tests. Empty when the tests,
  run alone in reverse order, fail unmutated: then no mutant's tests are narrowed,
  since a test that needs an earlier one would kill every mutant it ran for."""
  path = os.path.join(work, ".mutation-lines.json")
  stamp = {"source": blob_hash(source), "tests": tests, "tests_hash": tests_hash(tests)}
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if kept.get("stamp") == stamp:
      return kept
  raw = path + ".raw"
  cov_env = dict(env, PYTHONPATH=work + os.pathsep + os.path.join(work, "tests"),
                 TFADV_MUTATION_SOURCE=source, TFADV_MUTATION_LINES=raw)
  log.write(f"line map: {source} under its tests, eagerly, with coverage\n")
  log.flush()
  subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                  "mutation_coverage", *tests], cwd=work, env=cov_env, stdout=log,
                 stderr=subprocess.STDOUT, check=False)
  with open(raw) as f:
    found = json.load(f)
  used = sorted({t for ids in found["lines"].values() for t in ids})
  check = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *reversed(used)], cwd=work, env=env, stdout=log,
                         stderr=subprocess.STDOUT, check=False)
  if check.returncode != 0:
    log.write(f"line map: the mapped tests fail alone in reverse order (exit "
              f"{check.returncode}): {key}'s mutants run all of its tests\n")
    found["lines"] = {}
  result = {"stamp": stamp, **found}
  with open(path, "w") as f:
    json.dump(result, f)
  return result


_MUTMUT_CONFIG = '''"""Written by tests/mutation.py: each mutant runs first the tests that execute
its line (fastest first), ended as timed out after 60 s + 10x their time in
the line map; a survivor is run against all of them (--rerun-all)."""
import json, shlex
with open(".mutation-lines.json") as _f:
  _MAP = json.load(_f)
_RUN = {run!r}
_PYTEST = {pytest!r}
_SCOPE = {scope!r}
_EQUIVALENT = set({equivalent!r})  # "line:index" of survivors explained as equivalent


def pre_mutation(context):
  line = context.current_line_index + 1  # mutmut counts from 0
  mutant = f"{{context.mutation_id.line_number}}:{{context.mutation_id.index}}"
  if _SCOPE is not None and line not in _SCOPE:
    context.skip = True
    return
  if mutant in _EQUIVALENT:
    context.skip = True  # survived every test before; reported as such
    return
  tests = _MAP["lines"].get(str(line))
  if tests:
    tests = sorted(tests, key=lambda t: _MAP["seconds"].get(t, 0.0))
    limit = 60 + 10 * sum(_MAP["seconds"].get(t, 0.0) for t in tests)
    context.config.test_command = " ".join(
        [_RUN, f"--limit={{limit:.0f}}", f"--mutant={{mutant}}", _PYTEST]
        + [shlex.quote(t) for t in tests])
'''


EQUIVALENT_FILE = ".mutation-equivalent.json"  # a JSON list of "line:index"
TIMEOUTS_FILE = ".mutation-timeouts"  # one "line:index" a line (tests/mutation_server.py)


def _noted(work: str, name: str) -> set:
  """The "line:index" mutants listed in `work`'s file `name` (either kind)."""
  path = os.path.join(work, name)
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    text = f.read()
  return set(json.loads(text)) if name.endswith(".json") else set(text.split())


def _cache_rows(work: str) -> list:
  """(id, status, line, index) of every mutant in `work`'s mutmut cache
  (mutmut's line numbers count from 0)."""
  return sqlite3.connect(os.path.join(work, ".mutmut-cache")).execute(
      "SELECT Mutant.id, Mutant.status, Line.line_number, Mutant.\"index\" FROM Mutant "
      "JOIN Line ON Mutant.line = Line.id").fetchall()


def _not_run(work: str) -> list:
  """The ids of the mutants mutmut's cache in `work` has not run."""
  return sorted(mutant for mutant, status, _, _ in _cache_rows(work) if status == "untested")


def _show(mutant: int, work: str, python: str, env: dict) -> str:
  """The mutant's diff, as `mutmut show` prints it."""
  return subprocess.run([python, "-m", "mutmut", "show", str(mutant)], cwd=work, env=env,
                        capture_output=True, text=True, check=False).stdout


def explained_survivors(source: str, work: str, python: str, env: dict) -> set:
  """"line:index" of the mutants that survived the last run and are explained
  as equivalent (`EQUIVALENT`, `EQUIVALENT_LINES`), kept in
  `.mutation-equivalent.json`. mutmut retests every survivor when any test
  changes; these are not rerun (no test can tell them from the original) and
  keep their status: survived."""
  previous, found = _noted(work, EQUIVALENT_FILE), set()
  if os.path.exists(os.path.join(work, ".mutmut-cache")):
    for mutant, status, number, index in _cache_rows(work):
      name = f"{number}:{index}"
      if status == "bad_survived" or (status == "skipped" and name in previous):
        # (another skipped mutant is outside the scope)
        if _why(source, _show(mutant, work, python, env)):  # a reason taken back reruns it
          found.add(name)
  with open(os.path.join(work, EQUIVALENT_FILE), "w") as f:
    json.dump(sorted(found), f)
  return found


def _mutmut(key: str, source: str, tests: list, work: str, python: str, env: dict,
            log) -> None:
  """mutmut over `source`: each mutant's tests run in a child of a fork server
  that imported TensorFlow once (tests/mutation_server.py), narrowed to the
  tests that run the mutated line, and all of them for a survivor."""
  line_map(key, source, tests, work, python, env, log)
  sock = os.path.join(tempfile.gettempdir(), f"tfadv-mutation-{key}.sock")
  run = " ".join([python, "tests/mutation_server.py", "run", sock])
  pytest_args = "-- -x -q -p no:cacheprovider"
  scope = sorted(scope_lines(os.path.join(work, source), SCOPES[key])) if key in SCOPES else None
  equivalent = explained_survivors(source, work, python, env)
  with open(os.path.join(work, "mutmut_config.py"), "w") as f:
    f.write(_MUTMUT_CONFIG.format(run=run, pytest=pytest_args, scope=scope,
                                  equivalent=sorted(equivalent)))
  runner = " ".join([run, pytest_args] + [f"'{t}'" if " " in t else t for t in tests])
  server = subprocess.Popen([python, "tests/mutation_server.py", "serve", sock,
                             os.path.join(work, ".mutation-last.log")],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
  options = [f"--paths-to-mutate={source}", f"--runner={runner}", "--tests-dir=tests",
             "--rerun-all", f"--disable-mutation-types={DISABLED}",
             # generous: a loaded machine must not turn a survivor into a
             # "timed out" (counted as killed)
             "--test-time-multiplier=3", "--test-time-base=30"]
  try:
    subprocess.run([python, "-m", "mutmut", "run"] + options,
                   cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    # mutmut 2 looks a mutant's cached status up by its line's text: a mutant
    # of the second of two identical lines takes the first one's status and
    # is never run. Run alone (by id), it is looked up by its own row.
    for mutant in _not_run(work):
      subprocess.run([python, "-m", "mutmut", "run", str(mutant)] + options,
                     cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
  finally:
    server.terminate()
    server.wait()


def _stop_leftovers(work: str) -> None:
  """Ends the processes a killed run left working in `work` (mutmut's
  workers, the fork server and its children): two mutmuts on one cache and
  one scratch copy would test each other's mutants."""
  import signal  # pylint: disable=g-import-not-at-top
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
      continue
    if cwd == work or cwd.startswith(work + os.sep):
      try:
        os.kill(int(pid), signal.SIGKILL)
      except OSError:
        pass


def run_file(key: str, python: str, report_only: bool = False) -> dict:
  source, tests = TARGETS[key]
  # The scratch copy and mutmut's cache persist: a rerun (after a kill, or
  # after new tests) retests only the mutants not yet killed.
  work = os.path.join(REPO, ".mutation-cache", key)
  if report_only and not os.path.exists(os.path.join(work, ".mutmut-cache")):
    raise SystemExit(f"--collect: no kept run of {key} in {work}; run it without --collect")
  os.makedirs(work, exist_ok=True)
  _stop_leftovers(work)
  # A killed mutmut leaves the mutated file and its `.bak` (the original)
  # behind, and the next run's baseline would test the mutant: restore the
  # originals first (scratch_copy rewrites every tracked file).
  for root, _, names in os.walk(work):
    for name in names:
      if name.endswith(".py.bak"):
        os.remove(os.path.join(root, name))
  scratch_copy(work)
  env = dict(os.environ, PYTHONPATH=work, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
  start = time.time()
  # mutmut's progress goes to a log (never read the cache while it runs: a
  # second reader of it stalled mutmut's worker here).
  log_path = os.path.join(tempfile.gettempdir(), f"tfadv-mutation-{key}.log")
  print(f"{source}: mutating in {work}, progress in {log_path}", flush=True)
  with open(log_path, "w") as log:
    if report_only:
      log.write("--collect: mutmut not run; the kept cache recorded.\n")
    else:
      _mutmut(key, source, tests, work, python, env, log)
  seconds = time.time() - start
  earlier = load_records().get(source, {})
  if earlier.get("untested") and earlier.get("source_hash") == blob_hash(source):
    seconds += earlier.get("seconds", 0)  # a resumed run: the time of all its invocations
  rows = verdicts(_cache_rows(work), work)
  outside = 0
  if key in SCOPES:  # only the named functions' mutants count
    lines = scope_lines(os.path.join(work, source), SCOPES[key])
    outside = sum(1 for _, _, number in rows if number + 1 not in lines)
    rows = [row for row in rows if row[2] + 1 in lines]  # mutmut's numbers are 0-based
  rows = [(mutant, status) for mutant, status, _ in rows]
  survivors = []
  for mutant, status in rows:
    if status in ("bad_survived", "bad_timeout", "ok_suspicious"):
      survivors.append((mutant, status, _show(mutant, work, python, env)))
  statuses = [status for _, status in rows]
  if not rows:
    raise SystemExit(f"{source}: mutmut recorded no mutants (did the tests fail unmutated? "
                     f"{log_path})")
  result = {"key": key, "source": source, "tests": tests, "seconds": round(seconds),
            "source_hash": blob_hash(source),
            "total": len(rows) - statuses.count("untested"),
            "untested": statuses.count("untested"), "killed": statuses.count("ok_killed"),
            "survived": statuses.count("bad_survived"), "timeout": statuses.count("bad_timeout"),
            "suspicious": statuses.count("ok_suspicious"),
            "survivors": [list(s) for s in survivors]}
  if key in SCOPES:
    result.update(scope=list(SCOPES[key]), outside_scope=outside)
  return result


def verdicts(rows: list, work: str) -> list:
  """(id, status, line) of each (id, status, line, index) from mutmut's cache,
  with what mutmut cannot know: a mutant the fork server ended at its limit
  (TIMEOUTS_FILE) is "bad_timeout", not the kill mutmut read; an explained
  survivor the hook skipped (EQUIVALENT_FILE) keeps its verdict, "bad_survived"."""
  timeouts, equivalent = _noted(work, TIMEOUTS_FILE), _noted(work, EQUIVALENT_FILE)

  def verdict(status, name):
    if status == "ok_killed" and name in timeouts:
      return "bad_timeout"
    if status == "skipped" and name in equivalent:
      return "bad_survived"
    return status
  return [(mutant, verdict(status, f"{number}:{index}"), number)
          for mutant, status, number, index in rows]


def _mutated_line(diff: str) -> str:
  added = [line[1:].strip() for line in diff.splitlines()
           if line.startswith("+") and not line.startswith("+++")]
  return added[0] if added else ""


def _original_line(diff: str) -> str:
  removed = [line[1:].strip() for line in diff.splitlines()
             if line.startswith("-") and not line.startswith("---")]
  return removed[0] if removed else ""


def _why(source: str, diff: str) -> Optional[str]:
  """The reason a survivor is equivalent, or None."""
  line = _mutated_line(diff)
  if (source, line) in EQUIVALENT:
    return EQUIVALENT[(source, line)]
  if (source, _original_line(diff)) in EQUIVALENT_LINES:
    return EQUIVALENT_LINES[(source, _original_line(diff))]
  return None


def _is_equivalent(source: str, diff: str) -> bool:
  return _why(source, diff) is not None


def report(records: dict, out: str) -> None:
  """Writes docs/mutation.md from the records, one row and section per file."""
  lines = ["# Mutation testing", "",
           "Written by `make mutation` (`tests/mutation.py`, mutmut 2.5.1) from the records in "
           "`docs/mutation_runs.json`: each file mutated in a scratch copy, its covering tests "
           "as the runner. Each mutant first runs the tests that execute its line (a coverage "
           "map of the file's tests, `tests/mutation_coverage.py`), and a mutant that survives "
           "them runs all of the file's tests (mutmut's `--rerun-all`), so a survivor survived "
           "every test listed for its file. A mutant is *killed* when a test fails (or the run "
           "times out, or fails slowly: mutmut's 'suspicious'); a survivor is listed with its diff, and either the reason it is equivalent to the "
           "original or \"not explained\" (a test to write). "
           f"Mutation types off: {DISABLED} (messages and gin names, not behaviour). "
           "A file marked † changed (or was removed) after it was measured.", "",
           "| file | mutants | killed | timed out | survived (explained equivalent) "
           "| kill rate | kill rate of the non-equivalent |", "|---|---|---|---|---|---|---|"]
  results = [records[k] for k in sorted(records)]
  for r in results:
    # "suspicious" is mutmut's killed-but-slow (a test failed; the run took
    # longer than the baseline allows, as when the machine is loaded).
    killed = r["killed"] + r["timeout"] + r["suspicious"]
    rate = 100.0 * killed / max(r["total"], 1)
    equivalent = sum(1 for _, status, diff in r["survivors"] if status == "bad_survived"
                     and _is_equivalent(r["source"], diff))
    rate_real = 100.0 * killed / max(r["total"] - equivalent, 1)
    untested = f" (+{r['untested']} not run yet)" if r.get("untested") else ""
    if (not os.path.exists(os.path.join(REPO, r["source"]))
        or r.get("source_hash") != blob_hash(r["source"])):
      mark = " †"
    else:
      mark = ""
    lines.append(f"| `{r['source']}`{mark} | {r['total']}{untested} | {r['killed'] + r['suspicious']} | "
                 f"{r['timeout']} | {r['survived']} ({equivalent}) | "
                 f"{rate:.1f}% | {rate_real:.1f}% |")
  for r in results:
    lines += ["", f"## `{r['source']}`", ""]
    if r.get("scope"):
      lines += ["Scope: the mutants of " + ", ".join(f"`{n}`" for n in r["scope"])
                + f" (the evaluation accounting); {r['outside_scope']} mutants elsewhere in "
                "the file are not counted.", ""]
    lines += ["Tests: `pytest " + " ".join(
        f"'{t}'" if " " in t else t for t in r["tests"]) + "`", ""]
    survivors = [s for s in r["survivors"] if s[1] == "bad_survived"]
    if not survivors:
      lines.append("No survivors.")
    for mutant, status, diff in survivors:
      why = _why(r["source"], diff) or "not explained"
      lines += [f"- mutant {mutant} ({status}): {why}", "", "```diff",
                *[l for l in diff.splitlines() if l.startswith(("+", "-", "@"))
                  and not l.startswith(("+++", "---"))], "```", ""]
  with open(out, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--files", default=",".join(TARGETS),
                      help=f"comma-separated, from {sorted(TARGETS)}")
  parser.add_argument("--jobs", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "mutation.md"))
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from docs/mutation_runs.json, run nothing")
  parser.add_argument("--collect", action="store_true",
                      help="record the files' progress from their kept caches, run nothing")
  args = parser.parse_args(argv)
  keys = args.files.split(",")
  unknown = [k for k in keys if k not in TARGETS]
  if unknown:
    parser.error(f"--files: unknown {unknown}; known: {sorted(TARGETS)}")
  if not args.report_only:
    def one(key):
      try:
        result = run_file(key, sys.executable, args.collect)
      except SystemExit as error:  # this file's tests fail unmutated: go on with the others
        print(error, flush=True)
        return
      save_record(result)
      print(f"{result['source']}: {result['killed'] + result['timeout']}/{result['total']} "
            f"killed, {result['untested']} not run yet", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      list(pool.map(one, keys))
  report(load_records(), args.out)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
