"""artefact: damage segmentation on ARTeFACT, with Ray sweeps and MLflow tracking.

Importing the package has no side effects: Ray workers import it.
"""

__version__ = "0.1.0"
