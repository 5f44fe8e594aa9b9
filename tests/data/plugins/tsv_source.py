"""A data source from outside the package, as a user writes one: examples from a
tab-separated file of `label<TAB>text` lines, the label set read from the file, with its own
config section `data.tsv_lines`. Loaded with --import tsv_source (its folder on PYTHONPATH)."""
from pathlib import Path

from fedalign_dist.config import ConfigSection
from fedalign_dist.data.registry import DataSource, register_source
from fedalign_dist.data.sources import Corpus


class TsvLinesConfig(ConfigSection):
    path: str = ""
    """The file: one example per line, `label<TAB>text`."""


@register_source("tsv_lines")
class TsvLines(DataSource):
    config_section = TsvLinesConfig
    natural_clients = False

    def load(self) -> Corpus:
        rows = [line.split("\t", 1) for line in Path(self.options.path).read_text().splitlines() if line]
        names = sorted({label for label, _ in rows})
        return Corpus([text for _, text in rows], [names.index(label) for label, _ in rows], names)
