"""Data: real corpora shipped in packages, non-IID partitioners, tokenisation, the LM task."""
# Importing the modules registers the built-in data sources and task types (as the strategies
# package does for strategies), so the registry itself never imports them.
from fedalign_dist.data import classification, files, instruction, sources  # noqa: E402,F401
