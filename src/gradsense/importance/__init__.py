"""gradsense.importance"""
