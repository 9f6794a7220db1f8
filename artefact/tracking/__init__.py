"""MLflow: one experiment per sweep, a parent run per sweep, a child run per trial.

This is the only package that imports mlflow (as ``tune`` is the only one that imports
Ray). It talks through ``MlflowClient`` with explicit run ids, so trial processes never
depend on a global active run, and finds runs by tags (never by timestamps), so a
restarted trial or a resumed sweep reattaches to its own run instead of creating a
duplicate. ``vocabulary`` holds the tags and the outage policy and imports no mlflow.
"""
