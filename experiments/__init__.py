"""Research scripts behind docs/ (results and quality): `python -m experiments.NAME` from the
repository root."""
