"""Training methods behind one interface (`tfadv.methods.base.Method`)."""
from tfadv.methods.base import Method, MethodOutput
from tfadv.methods.plain import Plain
