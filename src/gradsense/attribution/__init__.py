"""gradsense.attribution"""
