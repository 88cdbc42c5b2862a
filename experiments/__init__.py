"""Research scripts behind the README: `python -m experiments.NAME` from the repository root."""
