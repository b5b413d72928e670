"""Name → factory registries for optimizers and learning-rate schedules."""
