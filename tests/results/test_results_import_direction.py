"""Regression: result types never import an analysis (arrows point down: results -> core -> torch).

``results/importance.py`` imported ``prune``/``allocate_bits`` from ``importance/api.py`` (and the measurement
from ``importance/measure.py``), which imports the results: a cycle. Now the importance analysis hands its verbs
to the result types when it is imported (:func:`gradsense.results.importance.attach_verbs`). The oracle reads
every module under ``gradsense/results`` (and ``viz``, which sits at the same level) as source, so that imports
inside functions count too.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import gradsense as gs
from gradsense.results import Result
from gradsense.results import importance as results_importance

ANALYSES = ("attribution", "curvature", "landscape", "importance", "evaluation", "monitor", "influence", "privacy",
            "cli", "zoo", "doctor")
PACKAGE = Path(gs.__file__).parent


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            if node.module == "gradsense":  # from gradsense import importance
                found += [f"gradsense.{a.name}" for a in node.names]
    return found


@pytest.mark.parametrize("folder", ["results", "viz"])
def test_results_and_viz_import_no_analysis(folder):
    bad = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        wrong = [m for m in _imports(path) if m.split(".")[:2][-1] in ANALYSES and m.startswith("gradsense.")]
        if wrong:
            bad[path.name] = wrong
    assert bad == {}


def test_the_importance_verbs_are_attached_by_the_analysis():
    verbs = results_importance._verbs("test")
    assert verbs.prune is gs.importance.prune and verbs.allocate_bits is gs.importance.allocate_bits
    assert verbs.measurer is gs.importance.Measurer


def test_without_the_analysis_the_result_methods_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(results_importance, "_VERBS", [])
    res = results_importance.ImportanceResult.build({"score/w": torch.ones(2)}, method="magnitude", keys=["w"])
    with pytest.raises(RuntimeError, match=r"ImportanceResult\.prune needs the importance analysis: import gradsense"):
        res.prune(0.5)


def test_a_loaded_result_prunes_and_allocates_bits_without_measuring_and_measures_when_given_the_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    held = (x[:16], y[:16])
    res = gs.importance(model, gs.losses.cross_entropy, (x, y), method="fisher", heldout=held)
    res.save(tmp_path / "scores")
    back = Result.load(tmp_path / "scores")
    assert back.context is None
    masks, live = back.prune(0.5), res.prune(0.5)
    assert masks.measured is None and live.measured is not None  # no model, no measurement, no error
    assert all(torch.equal(masks[k], live[k]) for k in live)  # the same masks from the saved scores
    assert back.allocate_bits(4).bits == res.allocate_bits(4).bits
    measured = masks.measure(model, gs.losses.cross_entropy, held, calibration=(x, y))
    assert measured.measured == pytest.approx(live.measured)
    assert dataclasses.replace(back, context=res.context).prune(0.5).measured == pytest.approx(live.measured)


def test_a_result_loaded_in_a_fresh_process_prunes_without_importing_the_analysis_first(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    res = gs.importance(model, gs.losses.cross_entropy, (x, y), method="magnitude")
    res.save(tmp_path / "scores")
    code = (
        "import sys, json\n"
        "from gradsense.results import Result\n"
        f"r = Result.load({str(tmp_path / 'scores')!r})\n"
        "assert 'gradsense.importance' not in sys.modules\n"
        "m = r.prune(0.5)\n"
        "print(json.dumps({k: m[k].flatten().tolist() for k in sorted(m.masks)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    live = res.prune(0.5)
    got = json.loads(out.stdout)
    assert got == {k: live[k].flatten().tolist() for k in sorted(live.masks)}
