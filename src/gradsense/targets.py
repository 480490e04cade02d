"""Public alias of :mod:`gradsense.core.targets` (``gs.targets.ClassLogit(...)`` etc.)."""

from gradsense.core.targets import *  # noqa: F403
from gradsense.core.targets import __all__  # noqa: F401
