"""gradsense.viz"""
