"""``python -m gradsense``: the same as the ``gradsense`` command (also under ``torchrun -m gradsense``)."""

from gradsense.cli.main import main

if __name__ == "__main__":
    main()
