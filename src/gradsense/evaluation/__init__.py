"""gradsense.evaluation"""
