"""Command-line entry points: ``python -m helpers.cli.compute`` (compute and cache results), ``python -m
helpers.cli.bench`` (benchmarks), ``python -m helpers.cli.verdicts`` (a model's verdict table), ``python -m
helpers.cli.demo``."""
