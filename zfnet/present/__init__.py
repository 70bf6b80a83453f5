"""Pictures and pages from arrays and saved results: PNG figures (`render`) and the static HTML site of the
atlas (`site`, templates as package data). Never runs a model.

May import zfnet.core and zfnet.inspect (for unit names), so every experiment can draw its own figures.
"""
