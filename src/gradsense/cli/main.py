"""The ``gradsense`` command. One sub-command per analysis, mapping one-to-one onto the Python API."""

from __future__ import annotations

import click

from gradsense import __version__
from gradsense.cli.attribute import attribute_cmd
from gradsense.cli.demo import demo_cmd
from gradsense.cli.doctor import doctor_cmd
from gradsense.cli.evaluate import evaluate_cmd
from gradsense.cli.hessian import hessian_cmd
from gradsense.cli.importance import importance_cmd
from gradsense.cli.landscape import landscape_cmd
from gradsense.cli.monitor import monitor_cmd

EPILOG = """\b
Examples:
  gradsense demo --out gradsense-demo          # HTML report on the bundled digits CNN
  gradsense doctor --model zoo:digits-cnn      # what the model is and which analyses apply
  gradsense doctor --model my_model.py:build --weights w.safetensors --batch-size 64
  gradsense attribute --model zoo:digits-cnn --dataset digits --method saliency --n 8 --out runs/sal
  gradsense evaluate --model zoo:block-digits-cnn --methods all --out runs/eval
  gradsense hessian --model zoo:digits-cnn --dataset digits --per layer --out runs/hessian
  gradsense importance --model zoo:digits-cnn --dataset digits --method taylor --sparsity 0.5 --out runs/imp
  gradsense landscape --model zoo:digits-cnn --dataset digits --steps 21 --out runs/landscape
  gradsense monitor runs/train                 # report of a monitored training run (also while it runs)
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gradsense")
def cli() -> None:
    """gradsense: what is your model sensitive to?

    Reads the answer from gradients and curvature and writes numbers, files and an HTML report.
    """


cli.add_command(doctor_cmd)
cli.add_command(demo_cmd)
cli.add_command(attribute_cmd)
cli.add_command(evaluate_cmd)
cli.add_command(hessian_cmd)
cli.add_command(importance_cmd)
cli.add_command(landscape_cmd)
cli.add_command(monitor_cmd)


def main() -> None:
    """Entry point of the console script."""
    cli()


if __name__ == "__main__":
    main()
