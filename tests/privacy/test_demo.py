"""The privacy sections of ``gradsense demo``: reconstructions and the trade-off reach the report and the run folder."""

from __future__ import annotations

import json

from gradsense.privacy.demo import demo_section, textured
from gradsense.results import RunFolder
from gradsense.viz.report import Report


def test_demo_section_adds_reconstructions_audit_and_tradeoff(tmp_path):
    run, report = RunFolder(tmp_path), Report("demo")
    demo_section(run, report, steps=3, dlg_steps=1, n_images=2, finetune_steps=1)
    html = report.render()
    for title in ("Privacy: what one shared gradient reveals", "Privacy: defences and what they cost",
                  "Privacy: accuracy cost and epsilon"):
        assert title in html
    assert html.count("<img") == 3  # the single-gradient grid, the audit's reconstructions, the trade-off
    for fig in ("privacy-single", "privacy-audit-reconstructions", "privacy-tradeoff"):
        assert (tmp_path / "figures" / f"{fig}.png").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["type"] for e in manifest["results"]] == ["AuditResult"]


def test_textured_picks_distinct_classes_by_texture():
    import torch

    x = torch.zeros(6, 1, 4, 4)
    x[1, 0, 0, 0] = 1.0
    x[2, 0, :2] = 1.0
    x[4, 0, :, :2] = 1.0
    x[4, 0, 0, 2] = 1.0  # 9 of 16 pixels on: a little less spread than 8 of 16
    y = torch.tensor([0, 1, 1, 2, 2, 0])
    assert textured(x, y, 2).tolist() == [2, 4]  # most textured first, one per class (1 is class 1 as well)
