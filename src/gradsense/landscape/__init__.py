"""gradsense.landscape"""
