"""A generated text corpus with shared structure and per-client styles (no download).

Sentences follow one grammar, ``the ADJ NOUN VERB the ADJ NOUN .``, over fixed word
lists. The "public" text picks every word uniformly: it teaches a model the words and
the grammar (pre-training). The clients' text is a domain of its own: words follow a
Zipf law over a permutation of each list that all clients share (the domain), mixed
with a per-client Dirichlet preference (the client's style). Pre-training lowers the
clients' loss; federated fine-tuning lowers it further by learning the domain's skew.
Same seed, same text.
"""
from __future__ import annotations

import numpy as np

ADJECTIVES = ("red", "old", "quiet", "brave", "small", "green", "wise", "cold", "dark", "kind",
              "tall", "slow")
NOUNS = ("king", "queen", "horse", "river", "sword", "castle", "ghost", "crown", "forest",
         "letter", "garden", "storm", "lamp", "bird", "ship", "tower")
VERBS = ("sees", "finds", "loves", "fears", "keeps", "follows", "calls", "hides")
_LISTS = (ADJECTIVES, NOUNS, VERBS, ADJECTIVES, NOUNS)   # the grammar's word slots


def _sentence(rng: np.random.Generator, probs) -> str:
  adj1, noun1, verb, adj2, noun2 = (lst[rng.choice(len(lst), p=p)] for lst, p in zip(_LISTS, probs))
  return f"the {adj1} {noun1} {verb} the {adj2} {noun2} ."


def public_texts(num_texts: int, seed: int = 0) -> list[str]:
  """``num_texts`` sentences with every word uniform (the pre-training text)."""
  if num_texts < 1:
    raise ValueError(f"num_texts must be >= 1, got {num_texts}")
  rng = np.random.default_rng([seed, 0])
  uniform = [np.full(len(lst), 1.0 / len(lst)) for lst in _LISTS]
  return [_sentence(rng, uniform) for _ in range(num_texts)]


def client_texts(num_clients: int, texts_per_client: int, seed: int = 0, zipf: float = 1.5,
                 style: float = 0.3, concentration: float = 0.5) -> list[list[str]]:
  """Each client's sentences: the domain's Zipf(``zipf``) words mixed with its own style.

  Client i's distribution over each word slot is ``(1 - style) * domain + style * d_i``
  with ``d_i ~ Dirichlet(concentration)``.
  """
  if num_clients < 1 or texts_per_client < 1:
    raise ValueError(f"num_clients and texts_per_client must be >= 1, got {num_clients}, "
                     f"{texts_per_client}")
  if not 0.0 <= style <= 1.0:
    raise ValueError(f"style must be in [0, 1], got {style}")
  rng = np.random.default_rng([seed, 1])
  domain = {}
  for lst in (ADJECTIVES, NOUNS, VERBS):
    weights = 1.0 / np.arange(1, len(lst) + 1) ** zipf
    domain[lst] = (weights / weights.sum())[rng.permutation(len(lst))]
  out = []
  for _ in range(num_clients):
    own = {lst: rng.dirichlet(np.full(len(lst), concentration)) for lst in domain}
    probs = [(1.0 - style) * domain[lst] + style * own[lst] for lst in _LISTS]
    out.append([_sentence(rng, probs) for _ in range(texts_per_client)])
  return out
