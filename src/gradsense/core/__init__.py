"""gradsense.core"""
