"""Result types and their persistence (safetensors + JSON, atomic, no pickle)."""

from gradsense.results.base import (
    Result,
    ResultFileError,
    Stopwatch,
    atomic_write_bytes,
    atomic_write_text,
    versions,
)

__all__ = ["Result", "ResultFileError", "Stopwatch", "atomic_write_bytes", "atomic_write_text", "versions"]

from gradsense.results.attribution import AttributionResult, DatasetAttribution

__all__ += ["AttributionResult", "DatasetAttribution"]

from gradsense.results.run import RunFolder  # noqa: E402

__all__ += ["RunFolder"]

from gradsense.results.curvature import DensityResult, EigenResult, TraceResult  # noqa: E402
from gradsense.results.landscape import InterpolationResult, SharpnessResult, SurfaceResult  # noqa: E402

__all__ += ["DensityResult", "EigenResult", "InterpolationResult", "SharpnessResult", "SurfaceResult", "TraceResult"]

from gradsense.results.evaluation import (  # noqa: E402
    CurveResult,
    GlobalSensitivityResult,
    MethodTable,
    MetricResult,
    RandomizationResult,
    TaylorResult,
)
from gradsense.results.importance import BitsResult, ImportanceResult, PruneResult, SweepResult  # noqa: E402

__all__ += ["BitsResult", "CurveResult", "GlobalSensitivityResult", "ImportanceResult", "MethodTable", "MetricResult",
            "PruneResult", "RandomizationResult", "SweepResult", "TaylorResult"]

from gradsense.results.privacy import AuditResult, ReconstructionResult  # noqa: E402

__all__ += ["AuditResult", "ReconstructionResult"]
from gradsense.results.monitor import Alarm, MonitorResult  # noqa: E402

__all__ += ["Alarm", "MonitorResult"]
