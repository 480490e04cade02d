"""gradsense: what is your model sensitive to?"""

__version__ = "0.1.0"
