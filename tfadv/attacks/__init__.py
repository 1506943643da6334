"""Attacks, one file per family; every name is also importable from here.

- `base`: the `Attack` contract, projection and random starts.
- `pgd`: FGSM and PGD on the inputs (`InputAttack`), ℓ∞ and ℓ2.
- `apgd`: Auto-PGD (`APGD`) with the cross-entropy and DLR losses.
- `embedding`: PGD on a text model's embedding outputs (`EmbeddingOutputAttack`).
- `char_substitution`: the character-substitution attack on Chinese text
  (`CharSubstitutionAttack`), greedy or tight (beam) search.

Example:
>>> from tfadv.attacks import InputAttack, CharSubstitutionAttack
>>> pgd20 = InputAttack(epsilon=0.1, step_size=0.01, num_steps=20, random_start=True)
"""

from tfadv.attacks.apgd import APGD, APGD_LOSSES, apgd_checkpoints, dlr_loss
from tfadv.attacks.base import (NORMS, Attack, ascent_direction, attack_outputs,
                                cross_entropy, project, random_start)
from tfadv.attacks.char_substitution import CharSubstitutionAttack
from tfadv.attacks.embedding import EmbeddingOutputAttack
from tfadv.attacks.pgd import InputAttack
