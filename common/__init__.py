"""Small helpers shared by the `tagging` and `training` libraries (no dagster, no torch)."""
