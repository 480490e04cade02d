"""gradsense.curvature"""
