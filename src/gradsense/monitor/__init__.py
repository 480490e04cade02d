"""gradsense.monitor"""
