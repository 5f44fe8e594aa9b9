"""What a data source returns: every example of a data set (the registry's and the sources'
common type, so neither imports the other for it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Corpus:
    """Every example of a data set, as parallel lists (one entry per example)."""
    texts: list[str]
    """The input text (classification: the document; instruction tasks: the prompt)."""
    labels: list[int] | None = None
    """Class index of each example (into label_names), or None for unlabelled data."""
    label_names: list[str] | None = None
    groups: list[int] | None = None
    """Natural client of each example (news_outlets: the outlet), or None."""
    group_names: list[str] | None = None
    responses: list[str] | None = None
    """The target text of each example (instruction tasks), or None."""

    def __post_init__(self):
        for field in ("labels", "groups", "responses"):
            values = getattr(self, field)
            if values is not None and len(values) != len(self.texts):
                raise ValueError(f"Corpus.{field} has {len(values)} entries for {len(self.texts)} texts")
        if self.labels is not None:
            if self.label_names is None:
                raise ValueError("Corpus.labels needs label_names (the name of each class index)")
            bad = [v for v in self.labels if not 0 <= int(v) < len(self.label_names)]
            if bad:
                raise ValueError(f"Corpus.labels holds {bad[0]!r}, outside 0..{len(self.label_names) - 1} "
                                 f"(label_names has {len(self.label_names)} entries)")
