"""gradsense.privacy"""
