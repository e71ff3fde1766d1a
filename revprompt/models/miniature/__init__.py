"""The embedded miniatures of the tiny preset: product renders, a text-to-image model, a warm-started captioner.

Their weights' paths are named in models/builtin.py; the modules here make and check them.
"""
