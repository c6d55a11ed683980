"""Build-time scripts, run from the project root as `python -m tools.<name>`: they write files the
project commits (the evaluation set), and no code under steps/ imports them. Not installed with
the package (pyproject.toml installs steps/ alone)."""
