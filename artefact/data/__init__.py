"""Data: raw sources, the prepared cache, the split and the training Dataset."""
