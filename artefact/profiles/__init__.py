"""The shipped profiles (``<name>.yaml``), package data so that an installed copy finds them
through ``importlib.resources``; ``sweeps/`` links to each of them in a checkout."""
