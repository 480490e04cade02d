"""gradsense.influence"""
