"""Ray Tune and Ray Train: the only package that imports Ray.

``ray_env`` imports no Ray (it prepares the environment Ray reads when first imported), and
neither does this file: a module here is imported only where Ray is wanted.
"""
