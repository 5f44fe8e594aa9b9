"""Data: real corpora shipped in packages, non-IID partitioners, tokenisation, the LM task."""
