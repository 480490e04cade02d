"""gradsense.cli"""
