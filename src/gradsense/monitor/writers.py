"""TensorBoard output of the monitor (the run folder's log is :class:`gradsense.results.monitor.MonitorLog`).

Each recorded step becomes one TensorBoard event holding all its scalars (``tensorboard.compat.proto``
``Summary`` with one value per scalar), written by ``torch.utils.tensorboard.SummaryWriter``'s file writer: one
event per step rather than one per scalar keeps the cost per step low with hundreds of per-layer scalars.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["TensorBoardWriter"]


class TensorBoardWriter:
    """Writes monitor scalars as TensorBoard events.

    Args:
        directory: Event file folder (created if needed).
        flush_secs: How often the writer flushes to disk.
    """

    def __init__(self, directory: str | os.PathLike[str], flush_secs: int = 10) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory), flush_secs=flush_secs)

    def write(self, step: int, columns: Sequence[str], values: np.ndarray) -> None:
        """One event with every finite value of the step (tags are the scalar names)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=name, simple_value=float(v))
                                 for name, v in zip(columns, values.tolist()) if math.isfinite(v)])
        self.writer._get_file_writer().add_summary(summary, int(step))

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.flush()
        self.writer.close()
