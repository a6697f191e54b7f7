"""The sweep service (driver side): search-space declarations, the Ray Tune sweep, the MLflow record."""
