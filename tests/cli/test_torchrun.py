"""``torchrun --nproc-per-node 2 -m gradsense hessian ...`` on CPU (gloo): the same numbers and run folder as one
process, and only rank 0 prints.

torchrun is run as ``python -m torch.distributed.run`` (the module behind the ``torchrun`` script) with
``--standalone`` (a free port on localhost), and with ``--redirects 3 --log-dir`` so that each rank's stdout and
stderr land in their own files. Oracle: the same command in one process (this one); 9 examples
in batches of 2 are 5 batches, uneven over the two ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gradsense as gs
from gradsense.cli.main import cli

MODEL = """\
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
"""


def _env() -> dict[str, str]:
    src = str(Path(gs.__file__).resolve().parents[1])  # the gradsense under test, also in the child processes
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADSENSE_PROGRESS="1", COLUMNS="100")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_equal_one_process_and_only_rank_zero_prints(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", inputs=g.normal(size=(9, 4)), labels=g.integers(0, 3, size=9))
    args = [
        "hessian",
        "--model",
        f"{tmp_path / 'tiny.py'}:build",
        "--data",
        str(tmp_path / "data.npz"),
        "--batch-size",
        "2",
        "--k",
        "2",
        "--probes",
        "2",
        "--steps",
        "8",
        "--tol",
        "1e-8",
        "--n",
        "9",
        "--json",
    ]
    one = CliRunner().invoke(cli, args, catch_exceptions=False)  # one process, this one
    assert one.exit_code == 0, one.output
    logs = tmp_path / "logs"
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            str(logs),
            "--redirects",
            "3",
            "-m",
            "gradsense",
            "--",  # as the README says: else torchrun takes --n for its own --nnodes/--nproc-per-node
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=240,
    )
    assert two.returncode == 0, two.stderr

    def rank_file(rank: int, name: str) -> str:
        (path,) = logs.glob(f"*/attempt_0/{rank}/{name}")
        return path.read_text()

    assert rank_file(1, "stdout.log") == "" and rank_file(1, "stderr.log") == ""  # rank 1: silent
    assert "hessian: done" in rank_file(0, "stderr.log")  # rank 0: progress
    doc_two, doc_one = json.loads(rank_file(0, "stdout.log")), json.loads(one.stdout)
    assert (
        doc_two["results"].keys()
        == doc_one["results"].keys()
        == {"hessian-eigenvalues", "hessian-trace", "hessian-density"}
    )
    for name, res in doc_one["results"].items():
        for key, value in res["tensors"].items():
            np.testing.assert_allclose(
                np.asarray(doc_two["results"][name]["tensors"][key], dtype=float),
                np.asarray(value, dtype=float),
                rtol=1e-6,
                atol=1e-10,
                err_msg=f"{name}/{key}",
            )

    # the run folder rank 0 wrote: every result of the one-process run, and nothing half-written
    names = sorted(doc_one["results"])
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert sorted(e["name"] for e in manifest["results"]) == names
    files = {p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*") if p.is_file()}
    assert files == {
        "manifest.json",
        "report.html",
        "report.json",
        *(f"figures/{n}.png" for n in names),
        *(f"{n}/{f}" for n in names for f in ("result.json", "tensors.safetensors")),
    }
    for name in names:
        saved = gs.Result.load(tmp_path / "two" / name)
        for key, value in doc_one["results"][name]["tensors"].items():
            np.testing.assert_allclose(
                saved.tensors[key].double().numpy(),
                np.asarray(value, dtype=float),
                rtol=1e-6,
                atol=1e-10,
                err_msg=f"{name}/{key}",
            )
