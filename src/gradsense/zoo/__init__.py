"""gradsense.zoo"""
