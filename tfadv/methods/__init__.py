"""Training methods behind one interface (`tfadv.methods.base.Method`).

By where the perturbation lives:
- none: `Plain`;
- the token-embedding matrix: `EmbeddingFGM` (`fgm`), `EmbeddingGradientPenalty`
  (`gradient_penalty`), helpers in `embedding_matrix`;
- each example's embedding output: `EmbeddingOutputFGM`, `EmbeddingOutputPGD`
  (`embedding_output`), `FreeLB` (`freelb`), `EmbeddingOutputFree` (`free`),
  `R3F` (`r3f`: noise and a symmetric-KL term, no ascent);
- the input images: `PGDTraining`, `FGSMTraining` (`pgd`), `FreeTraining` (`free`),
  `ATTATraining` (`atta`, one remembered perturbation per training example).
"""
from tfadv.methods.atta import ATTATraining
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.char_at import CharSubstitutionTraining
from tfadv.methods.embedding_output import EmbeddingOutputFGM, EmbeddingOutputPGD
from tfadv.methods.fgm import EmbeddingFGM
from tfadv.methods.free import EmbeddingOutputFree, FreeTraining
from tfadv.methods.freelb import FreeLB
from tfadv.methods.gradient_penalty import EmbeddingGradientPenalty
from tfadv.methods.pgd import FGSMTraining, PGDTraining
from tfadv.methods.r3f import R3F
from tfadv.methods.plain import Plain
