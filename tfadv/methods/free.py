"""Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!"), on images and on text.

`FreeTraining` perturbs the input images (the paper's setting, ℓ∞);
`EmbeddingOutputFree` perturbs each example's token embeddings (ℓ2 per
example, padding masked), the same algorithm on text.

Each minibatch is replayed m times in a row (the input pipeline does that,
from `batch_replays`). Every replay is one forward/backward pass on the
perturbed batch whose gradients serve twice: the weight gradients are the
update, and the gradient with respect to δ moves the perturbation,
δ ← δ + ε·sign(∇_δ L), kept in [−ε, ε]. δ lives in a `tf.Variable` and is
carried over to the next minibatch, so the attack keeps improving across
batches. A replay costs one plain step; the run takes as many weight
updates as natural training and hence sees 1/m of its epochs ("epochs
divided by m": `Experiment.train_epochs` does the division).

On images, how δ meets the pixel range is `FreeTraining.clamp_rule`:

- `"project"` (default): at every replay δ is first projected onto the
  feasible box [max(−ε, lo − x), min(ε, hi − x)] of the *current* batch's
  x, the pass runs on x + δ (inside [lo, hi], so no clamp and no zeroed
  gradient), and δ ascends and is projected onto the box again. Later
  public implementations keep the stored δ feasible the same way:
  locuslab/fast_adversarial (`delta.data = clamp(delta, lower_limit - X,
  upper_limit - X)` in `CIFAR10/train_free.py`; on MNIST
  `delta = max(min(1 - X, delta), -X)`), tml-epfl/understanding-fast-adv-
  training (`δ ← clamp(X + δ, 0, 1) − X`). Unlike locuslab's code, the first
  replay of a new batch is projected too.
- `"reference"`: Shafahi et al.'s code (ashafahi/free_adv_train:
  `tf.gradients` of the loss with respect to the perturbation variable,
  through `tf.clip_by_value`): the pass runs on clip(x + δ, lo, hi) and ∇_δ
  passes through the clamp, so wherever x + δ lies outside [lo, hi] its
  gradient is zero, sign(0) = 0, and that entry of δ never moves again. On
  data with saturated pixels (Fashion-MNIST's black background) those
  entries are absorbing: robust accuracy 34.8% against PGD-7's 67.4%
  (docs/history.md, the one-seed vision table). The authors only ran CIFAR-10 and ImageNet.
- `"straight_through"`: the pass runs on clip(x + δ, lo, hi) and the gradient
  at the clamped image is passed to δ unchanged (tfadv's earlier rule,
  Free-8 67.8% on Fashion-MNIST).

The scalar `stuck` (TensorBoard, progress line) is the share of δ's entries
whose ascent gradient is exactly zero: the entries that cannot move.

Under a distribution strategy the buffer is a sync-on-read variable: every
replica holds its own δ for its own slice of the batch. A checkpoint stores
replica 0's δ and restores it to every replica (exact on one device).

Training batches are always full: the input pipeline is step-indexed and
wraps around epoch boundaries, so there is no last partial batch and the
buffer's shape (the per-replica batch) never changes.
"""

import gin
import tensorflow as tf

from tfadv import checks
from tfadv.errors import SettingError
from tfadv.loss_scaling import keep_if_finite, scaled_gradient
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.embedding_output import BufferedEmbeddingOutputMethod
from tfadv.perturbation import (feasible_box, normalize, per_example_norm, project,
                                ramped, stuck_share)


CLAMP_RULES = ("project", "reference", "straight_through")


@gin.configurable
class FreeTraining(Method):
  """Free-m adversarial training with a persistent perturbation buffer.

  Args:
    epsilon: ℓ∞ radius; also the ascent step of δ, as in the paper.
    replays: m, the times each minibatch is replayed.
    clip_min, clip_max: pixel range of x + δ.
    clamp_rule: "project" (default), "reference" or "straight_through"
      (module docstring). `through_clamp` is gone: True was "reference",
      False "straight_through". The default was checked on a validation
      split of Fashion-MNIST (docs/results/vision-validation-selection.md, "the Free clamp rule chosen on
      validation"): "project" and "straight_through" tie there (67.18 vs
      67.22% worst-case robust, 3 seeds).

  Special case: with m = 1 and a zero buffer, the first step's update is
  plain training's, and the buffer after it is the FGSM perturbation
  ε·sign(∇ₓL(x)) (projected onto the box under "project").

  Example:
  >>> method = FreeTraining(epsilon=0.1, replays=8)
  >>> method.build(model, input_shape=(64, 28, 28, 1))  # per-replica batch
  >>> out = method.compute_gradients(model, loss_fn, images, labels, weights)
  """

  name = "free"

  def __init__(self, epsilon: float = 0.1, replays: int = 8,
               clip_min: float = 0.0, clip_max: float = 1.0,
               clamp_rule: str = "project", through_clamp=None):
    if through_clamp is not None:
      raise SettingError(
          f"FreeTraining.through_clamp was replaced by FreeTraining.clamp_rule: "
          f"bind clamp_rule = '{'reference' if through_clamp else 'straight_through'}' "
          "for this run's behaviour, or drop the binding for the default 'project'.")
    checks.check("FreeTraining", epsilon=(epsilon, checks.NON_NEGATIVE),
                 replays=(replays, checks.AT_LEAST_ONE),
                 clamp_rule=(clamp_rule, checks.one_of(CLAMP_RULES)))
    checks.check_interval("FreeTraining", "clip_min", clip_min, "clip_max", clip_max)
    self.epsilon = float(epsilon)
    self.batch_replays = int(replays)
    self.clip_min = clip_min
    self.clip_max = clip_max
    self.clamp_rule = clamp_rule
    self.perturbation = None

  def build(self, model, input_shape=None):
    del model
    if input_shape is None:
      raise ValueError("FreeTraining needs the per-replica input shape: its "
                       "perturbation buffer has the shape of one replica's batch.")
    self.perturbation = tf.Variable(
        tf.zeros(input_shape, tf.float32), trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        name="free_perturbation")

  @property
  def variables(self):
    return [self.perturbation] if self.perturbation is not None else []

  def compute_gradients(self, model, loss_fn, inputs, labels, weights):
    images = tf.convert_to_tensor(inputs)
    delta = tf.convert_to_tensor(self.perturbation)
    epsilon = ramped(self.epsilon)  # the ε in force this step
    if self.clamp_rule == "project":
      low, high = feasible_box(images, epsilon, self.clip_min, self.clip_max)
      delta = tf.clip_by_value(delta, low, high)  # feasible for this batch
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
      tape.watch(delta)
      moved = tf.cast(delta, images.dtype)
      if self.clamp_rule == "project":
        x_adv = images + moved  # inside [lo, hi] already: nothing clamped
      else:
        # The clamp is inside the tape: ∇_δ is zero where x + δ is clamped.
        x_adv = tf.clip_by_value(images + moved, self.clip_min, self.clip_max)
        if self.clamp_rule == "straight_through":  # the gradient at the clamped image
          x_adv = tf.stop_gradient(x_adv) + moved - tf.stop_gradient(moved)
      logits = model(x_adv, training=True)
      loss = loss_fn(labels, logits, weights)
    *gradients, delta_gradient = scaled_gradient(tape, loss, variables + [delta])
    delta_gradient = tf.cast(delta_gradient, tf.float32)
    # One backward pass, two uses: the weights' update above, δ's ascent here.
    moved = delta + epsilon * tf.sign(delta_gradient)
    if self.clamp_rule == "project":
      moved = tf.clip_by_value(moved, low, high)
    else:
      moved = tf.clip_by_value(moved, -epsilon, epsilon)
    self.perturbation.assign(keep_if_finite(moved, delta, gradients))
    return MethodOutput(loss=loss, logits=logits, gradients=gradients,
                        metrics={"stuck": stuck_share(delta_gradient)})

  def get_config(self):
    return {"epsilon": self.epsilon, "replays": self.batch_replays,
            "clip_min": self.clip_min, "clip_max": self.clip_max,
            "clamp_rule": self.clamp_rule}


CARRIES = ("reset", "token", "slot")


@gin.configurable
class EmbeddingOutputFree(BufferedEmbeddingOutputMethod):
  """Free-m on the embedding outputs: Shafahi et al.'s algorithm for text.

  Each minibatch is replayed m times (`replays`; the input pipeline delivers
  it m times in a row). Every replay is one forward/backward pass on e + δ
  (δ masked at padding) whose gradients serve twice: the weight gradients
  are this replay's update, and g = ∂L/∂δ moves the perturbation,
  δ ← Π_ε(δ + α·g_i/‖g_i‖₂) per example (the ℓ2 form of the paper's
  δ ← clip(δ + ε·sign(g)); α = `step_size`, default ε as in the paper).
  Within a batch's replays δ lives in a per-replica `tf.Variable` buffer
  (batch × length × hidden). A replay costs one plain step, and a run of n
  optimizer steps sees n/m batches: `Experiment.train_epochs` divides the
  epochs by m.

  Where a new batch's δ starts is `carry`:

  - `"reset"` (default): δ anew at each new batch, kept across its
    replays: FreeLB's port of Free to text (zhuchen03/FreeLB,
    `freeat_train_step` / `freeat_adv_train_step` in `fairseq-RoBERTa`:
    δ₀ = U(−a, a)/√N_δ on the real tokens, N_δ = tokens × hidden, a =
    `init_magnitude`, default ε, as `FreeLB`'s start).
  - `"token"`: a vocabulary × hidden memory keyed by token id, after
    TA-VAT (Li & Qiu, AAAI 2021; LinyangLee/Token-Aware-VAT, `token_vat.py`):
    at a new batch δ = memory[token ids] (masked, projected onto each
    example's ball), and after every replay each token of the global batch
    writes its δ back (the mean over its occurrences in the global batch,
    all-gathered, so every replica's copy is the same). The memory starts
    as TA-VAT's, U(−a, a)/√hidden per entry, drawn from `seed`, and is
    checkpointed. Deviations from TA-VAT: there the memory adds δ to its
    row (`index_put_(..., accumulate=True)`) and is renormalised over the
    whole batch when read, on top of a FreeLB δ; here a row is replaced by
    the mean δ of its occurrences and read back inside the ε-ball, on
    Free's replays. Writing after every replay equals writing after the
    last (rows are read only at a new batch).
  - `"slot"`: the previous batch's final δ, by batch position (tfadv's rule
    before 2026-11-30, which the validated text table measured): one
    sentence's perturbation lands on another sentence's tokens, and no
    reference does this.

  A new batch is known from the pipeline's `replay_index` (0 at a new
  batch), so a run resumed between replays continues the same batch's δ.

  Deviation from the paper: there δ is an ℓ∞ perturbation of pixels; text
  has no pixel range, and tfadv's other embedding-output methods use
  per-example ℓ2 balls, so this one does too (same ε scale as `FreeLB`).

  Example:
  >>> method = EmbeddingOutputFree(epsilon=1.0, replays=3, carry="reset")
  >>> method.build(classifier, input_shape=(32, 128))  # per-replica batch × length
  """

  buffer_name = "free_output_perturbation"
  name = "free_output"
  uses_replay_index = True

  def __init__(self, epsilon: float = 1.0, replays: int = 3,
               step_size: float = None, carry: str = "reset",
               token_ids_key: str = "token_ids", **kwargs):
    super().__init__(epsilon=epsilon, **kwargs)
    checks.check("EmbeddingOutputFree", replays=(replays, checks.AT_LEAST_ONE),
                 step_size=(step_size, checks.NON_NEGATIVE),
                 carry=(carry, checks.one_of(CARRIES)))
    self.batch_replays = int(replays)
    self.step_size = float(epsilon if step_size is None else step_size)
    self.carry = carry
    self.token_ids_key = token_ids_key
    self.memory = None

  def build(self, model, input_shape=None):
    super().build(model, input_shape)
    if self.carry == "token":
      vocabulary, hidden = int(self.hook.layer.input_dim), self.hook.output_dim
      seed = tf.constant([self.draw_seed, 1], tf.int64)
      self.memory = tf.Variable(
          lambda: self.init_magnitude / hidden ** 0.5 * tf.random.stateless_uniform(
              (vocabulary, hidden), seed, -1.0, 1.0, alg="philox"),
          trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
          name="free_output_token_memory")

  @property
  def variables(self):
    return super().variables + ([self.memory] if self.memory is not None else [])

  def _new_batch_start(self, inputs, mask):
    if self.carry == "reset":
      return self.initial_delta(mask)
    if self.carry == "token":
      return tf.gather(tf.convert_to_tensor(self.memory), inputs[self.token_ids_key])
    return tf.convert_to_tensor(self.perturbation)

  def _write_tokens(self, token_ids, delta, mask):
    """memory[t] ← the mean δ over token t's real occurrences in the global batch."""
    context = tf.distribute.get_replica_context()
    hidden = self.hook.output_dim
    ids = context.all_gather(tf.reshape(token_ids, [-1]), axis=0)
    rows = context.all_gather(tf.reshape(delta, [-1, hidden]), axis=0)
    real = context.all_gather(tf.reshape(mask, [-1, 1]), axis=0)
    vocabulary = tf.shape(self.memory)[0]
    sums = tf.math.unsorted_segment_sum(rows * real, ids, vocabulary)
    counts = tf.math.unsorted_segment_sum(real, ids, vocabulary)
    self.memory.assign(tf.where(counts > 0, sums / tf.maximum(counts, 1.0),
                                tf.convert_to_tensor(self.memory)))

  def compute_gradients(self, model, loss_fn, inputs, labels, weights, replay_index):
    mask = self._mask(inputs)
    start = tf.cond(tf.equal(replay_index, 0),
                    lambda: self._new_batch_start(inputs, mask),
                    lambda: tf.convert_to_tensor(self.perturbation))
    # On this batch's real tokens, inside the ball.
    epsilon = ramped(self.epsilon)  # the ε in force this step
    delta = project(start * mask, epsilon)
    loss, logits, gradients, g = self._full_pass(model, loss_fn, inputs, labels,
                                                 weights, delta, mask)
    # One backward pass, two uses: the weights' update above, δ's ascent here.
    moved = project(delta + ramped(self.step_size) * normalize(g * mask), epsilon) * mask
    kept = keep_if_finite(tf.stop_gradient(moved), delta, gradients)
    self.perturbation.assign(kept)
    if self.carry == "token":
      self._write_tokens(inputs[self.token_ids_key], kept, mask)
    return MethodOutput(loss=loss, logits=logits, gradients=gradients, metrics={
        "delta_norm": tf.reduce_mean(per_example_norm(delta)),
        "stuck": stuck_share(g, mask)})

  def get_config(self):
    return {**super().get_config(), "replays": self.batch_replays,
            "step_size": self.step_size, "carry": self.carry,
            "init_magnitude": self.init_magnitude, "token_ids_key": self.token_ids_key}
