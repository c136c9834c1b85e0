"""The Dagster project: definitions, jobs, sensors and automation for the asset graph in `assets/`."""
