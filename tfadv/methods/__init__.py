"""Training methods behind one interface (`tfadv.methods.base.Method`)."""
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.embedding_output import (EmbeddingOutputFGM, EmbeddingOutputPGD,
                                            FreeLB)
from tfadv.methods.fgm import EmbeddingFGM
from tfadv.methods.free import FreeTraining
from tfadv.methods.gradient_penalty import EmbeddingGradientPenalty
from tfadv.methods.pgd import FGSMTraining, PGDTraining
from tfadv.methods.plain import Plain
