"""The ``gradsense`` command. One sub-command per analysis, mapping one-to-one onto the Python API."""

from __future__ import annotations

import os

import click

from gradsense import __version__
from gradsense.cli.attribute import attribute_cmd
from gradsense.cli.audit import audit_cmd
from gradsense.cli.common import Group
from gradsense.cli.demo import demo_cmd
from gradsense.cli.doctor import doctor_cmd
from gradsense.cli.evaluate import evaluate_cmd
from gradsense.cli.hessian import hessian_cmd
from gradsense.cli.importance import importance_cmd
from gradsense.cli.influence import influence_cmd
from gradsense.cli.landscape import landscape_cmd
from gradsense.cli.monitor import monitor_cmd

EPILOG = """\b
Examples:
  gradsense demo --out gradsense-demo     # HTML report on the bundled models
  gradsense doctor --model zoo:digits-cnn # what it is, which analyses apply
  gradsense doctor --model my.py:build --weights w.pt --input-shape 3,32,32
  gradsense attribute --model zoo:digits-cnn --data zoo:digits --n 8 \\
      --method integrated_gradients --out runs/ig
  gradsense evaluate --model zoo:block-digits-cnn --out runs/eval
  gradsense hessian --model zoo:digits-cnn --data zoo:digits --per layer
  gradsense importance --model zoo:digits-cnn --data zoo:digits \\
      --method taylor --sparsity 0.5 --out runs/imp
  gradsense landscape --model my.py:build --weights ckpt.pt --data val.npz
  gradsense influence --model zoo:digits-cnn --train digits:train \\
      --query "digits:test[:4]" --method ekfac
  gradsense audit --model zoo:photos-lenet --data photos --out runs/audit
  gradsense monitor runs/train            # report of a monitored training run
\b
Models: zoo:NAME, path/file.py:factory, package.module:factory, hf:DIR.
Data: zoo:NAME, .npy/.npz/.safetensors/.pt, .csv, image folders, .txt/.jsonl.
"""


@click.group(cls=Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gradsense")
def cli() -> None:
    """gradsense: what is your model sensitive to?

    Reads the answer from gradients and curvature and writes numbers, files and an HTML report.
    Every analysis command takes the same options for the model (--model, --weights), the data (--data and
    how to read it), the loss, device, batch size, memory budget and seed, and --out DIR / --json.
    """


cli.add_command(doctor_cmd)
cli.add_command(demo_cmd)
cli.add_command(attribute_cmd)
cli.add_command(evaluate_cmd)
cli.add_command(hessian_cmd)
cli.add_command(importance_cmd)
cli.add_command(influence_cmd)
cli.add_command(landscape_cmd)
cli.add_command(audit_cmd)
cli.add_command(monitor_cmd)


def main() -> None:
    """Entry point of the console script (and of ``python -m gradsense``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank joins the process group first (gloo
    for CPU tensors, NCCL for CUDA ones) and leaves it at exit; the analyses share the data over the ranks
    and only rank 0 prints and writes.
    """
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):  # one process: torch is not even imported for --help
        cli(prog_name="gradsense")
        return
    from gradsense.core.distributed import process_group

    with process_group():
        cli(prog_name="gradsense")


if __name__ == "__main__":
    main()
