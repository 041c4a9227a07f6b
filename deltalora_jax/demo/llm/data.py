"""The LLM demo's task: questions about countries, with answers that can be checked.

The facts are the JSON files of the installed package ``countryinfo``
(MIT; ``countryinfo/data/*.json``, one per country), read at run time. Each
country with a capital and a UN M49 subregion gives two exchanges::

    user: What is the capital of Albania?
    assistant: The capital of Albania is Tirana.
    user: In which region of the world is Albania?
    assistant: Albania is in Southern Europe.

The countries (not the questions) are split once by a fixed seed, so the
held-out questions are about countries never seen in training. The exchanges
are written in the model's chat template (:class:`~deltalora_jax.demo.llm.weights.ChatTemplate`,
its default system prompt included); the loss is on the assistant's tokens
and the end-of-turn token only. A greedy answer is correct when it holds the
expected capital or subregion (:func:`correct`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from deltalora_jax.demo.llm import weights

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
END_OF_TURN = "<|im_end|>"  # SmolLM2's; a template's own is its ``end_of_turn``


@dataclasses.dataclass(frozen=True)
class Example:
  """One exchange: the user's question, the assistant's answer, the fact to find in it,
  the kind of question (``'capital'`` or ``'region'``) and the country asked about."""

  question: str
  answer: str
  fact: str
  kind: str
  country: str = ""


def data_dir() -> pathlib.Path:
  """``countryinfo/data`` of the installed package."""
  return weights.package_dir(weights.DATA_MODULE, weights.DATA_PACKAGE) / "data"


def examples(country: dict) -> list[Example]:
  """The exchanges of one country's JSON record; none without one capital and a subregion.

  Example:
    >>> [e.answer for e in examples({"name": "Peru", "capital": "Lima",
    ...                               "subregion": "Latin America and the Caribbean"})]
    ['The capital of Peru is Lima.', 'Peru is in Latin America and the Caribbean.']
  """
  name, capital, region = (country.get(k) for k in ("name", "capital", "subregion"))
  if isinstance(capital, list) and len(capital) == 1:  # Vatican City State: ['Vatican City']
    capital = capital[0]
  if not all(isinstance(v, str) and v for v in (name, capital, region)):
    return []
  return [
    Example(
      f"What is the capital of {name}?",
      f"The capital of {name} is {capital}.",
      capital,
      "capital",
      name,
    ),
    Example(
      f"In which region of the world is {name}?", f"{name} is in {region}.", region, "region", name
    ),
  ]


def load_countries(directory: pathlib.Path | None = None) -> list[dict]:
  """Every country record, sorted by file name."""
  directory = data_dir() if directory is None else directory
  files = sorted(directory.glob("*.json"))
  if not files:
    raise FileNotFoundError(
      f"no country files in {directory}; reinstall with {weights.install_line()}"
    )
  return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def split(countries: list[dict]) -> tuple[list[Example], list[Example]]:
  """``(train, held-out)`` exchanges; the held-out ones are about other countries.

  A country listed twice (``countryinfo`` has ``Curaçao.json`` and
  ``curaçao.json``) counts once, from its first file, so that no held-out
  country is also trained on.
  """
  usable, seen = [], set()
  for country in countries:
    if examples(country) and country["name"] not in seen:
      seen.add(country["name"])
      usable.append(country)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(usable))
  n_held = round(HELDOUT_FRACTION * len(usable))
  held = {int(i) for i in order[:n_held]}
  train = [e for i, c in enumerate(usable) if i not in held for e in examples(c)]
  heldout = [e for i, c in enumerate(usable) if i in held for e in examples(c)]
  return train, heldout


def correct(example: Example, completion: str) -> bool:
  """Whether a generated answer holds the expected fact (case-insensitive).

  Example:
    >>> correct(Example("?", "", "Lima", "capital"), "The capital of Peru is lima.")
    True
  """
  return example.fact.casefold() in completion.casefold()


@dataclasses.dataclass
class Encoded:
  """Token ids of exchanges, right-padded: ``ids``, ``valid`` (1 on tokens) and
  ``target`` (1 where a token is predicted and scored: the answer and the end of turn),
  all ``int32 [n, max_length]``; ``prompts``: each prompt's ids."""

  ids: np.ndarray
  valid: np.ndarray
  target: np.ndarray
  prompts: list[list[int]]


#: The system message of every exchange: shorter than the template's default one
#: (about 20 tokens), which keeps the sequences short.
SYSTEM = "Answer in one sentence."


def prompt_text(template: weights.ChatTemplate, question: str) -> str:
  """The chat-template text that asks ``question`` and opens the assistant's turn."""
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
  return template.render(messages, add_generation_prompt=True)


def encode(
  tokenizer, template: weights.ChatTemplate, items: list[Example], max_length: int
) -> Encoded:
  """Encodes exchanges as prompt tokens then answer tokens and the end-of-turn token.

  Raises:
    ValueError: when an exchange does not fit in ``max_length`` tokens.
  """
  n = len(items)
  ids = np.zeros((n, max_length), np.int32)
  valid, target = np.zeros_like(ids), np.zeros_like(ids)
  prompts = []
  for i, item in enumerate(items):
    prompt = tokenizer.encode(prompt_text(template, item.question)).ids
    answer = tokenizer.encode(item.answer + template.end_of_turn).ids
    tokens = prompt + answer
    if len(tokens) > max_length:
      raise ValueError(
        f"max_length={max_length} is too short for {item.question!r} ({len(tokens)} tokens)"
      )
    ids[i, : len(tokens)] = tokens
    valid[i, : len(tokens)] = 1
    target[i, len(prompt) : len(tokens)] = 1
    prompts.append(prompt)
  return Encoded(ids, valid, target, prompts)


def fitting(
  tokenizer, template: weights.ChatTemplate, items: list[Example], max_length: int
) -> tuple[list[Example], list[Example]]:
  """``(kept, left out)``: the exchanges that fit in ``max_length`` tokens, and the others."""
  kept, out = [], []
  for item in items:
    size = len(tokenizer.encode(prompt_text(template, item.question)).ids)
    size += len(tokenizer.encode(item.answer + template.end_of_turn).ids)
    (kept if size <= max_length else out).append(item)
  return kept, out


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, valid)`` of prompts left-padded to the longest, for generation.

  Example:
    >>> left_padded([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
  """
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :] = p
    valid[i, width - len(p) :] = 1
  return ids, valid
