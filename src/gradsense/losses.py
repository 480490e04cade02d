"""Public alias of :mod:`gradsense.core.losses` (``gs.losses.cross_entropy``)."""

from gradsense.core.losses import *  # noqa: F403
from gradsense.core.losses import __all__  # noqa: F401
