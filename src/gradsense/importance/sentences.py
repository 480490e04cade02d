"""A small bundled STS-style set of sentence pairs, and a sentence encoder as a model of pairs.

For importance on a sentence encoder (``gs.zoo.load("minilm")``) the loss is a sentence-similarity loss: the
mean squared error between the cosine similarity of the two embeddings and a similarity label in ``[0, 1]``
(STS-B's 0-5 scale divided by 5), and the metric is the Spearman correlation of the similarities with the labels
(the STS benchmark's measure). :data:`PAIRS` are 48 hand-written pairs with labels in the STS-B spirit (written
for gradsense, no download); :func:`pair_data` tokenises them into one tensor so that the pairs go through the
engine like any ``(inputs, labels)`` data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MINILM_PARAMS", "PAIRS", "SentencePairModel", "pair_data", "similarity_loss", "spearman"]

MINILM_PARAMS = r"encoder\.layer\.\d+\..*(query|key|value|dense)\.weight$"
"""The Linear weights of the transformer blocks (the pooler, which sentence embeddings do not use, is left out)."""

PAIRS: list[tuple[str, str, float]] = [
    ("A man is playing a guitar.", "A person plays an acoustic guitar.", 0.92),
    ("A woman is slicing an onion.", "Someone is cutting an onion with a knife.", 0.88),
    ("Two dogs run across a field.", "A pair of dogs are running through the grass.", 0.9),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch.", 0.93),
    ("A child is riding a bicycle.", "A kid rides a bike down the street.", 0.86),
    ("The stock market fell sharply today.", "Shares dropped steeply on the exchange today.", 0.9),
    ("He is cooking pasta in the kitchen.", "A man prepares spaghetti at the stove.", 0.8),
    ("The train arrived late at the station.", "The train was delayed getting into the station.", 0.87),
    ("A woman is playing the violin.", "A man is playing the piano.", 0.45),
    ("The boy kicks a football.", "A girl throws a basketball.", 0.35),
    ("It is raining heavily in the city.", "The city is sunny and warm.", 0.2),
    ("A plane takes off from the runway.", "An aircraft departs from the airport.", 0.85),
    ("The chef is chopping vegetables.", "A cook cuts carrots on a board.", 0.78),
    ("She is reading a book in the park.", "A woman reads a novel on a bench outdoors.", 0.82),
    ("The computer crashed during the update.", "The laptop failed while installing updates.", 0.84),
    ("A man is swimming in the ocean.", "A man is climbing a mountain.", 0.22),
    ("Birds are singing in the trees.", "The birds chirp among the branches.", 0.9),
    ("The meeting was postponed until Friday.", "The meeting has been moved to Friday.", 0.88),
    ("A dog is barking at the mailman.", "A cat is chasing a mouse.", 0.25),
    ("The students are taking an exam.", "Pupils write a test in the classroom.", 0.83),
    ("A horse gallops along the beach.", "A horse is running on the sand by the sea.", 0.9),
    ("The baby is crying loudly.", "An infant is wailing.", 0.86),
    ("He drinks coffee every morning.", "She drinks tea in the evening.", 0.4),
    ("The river flooded the village.", "Water from the river covered the town.", 0.8),
    ("A man is painting a wall.", "Someone is painting a picture of a wall.", 0.5),
    ("The team won the championship.", "The team lost the final game.", 0.35),
    ("A woman is dancing on stage.", "A dancer performs in front of an audience.", 0.8),
    ("The phone battery is almost empty.", "My phone needs charging soon.", 0.75),
    ("A group of people are hiking.", "Several people walk up a mountain trail.", 0.82),
    ("The soup is too salty.", "The weather is too cold.", 0.08),
    ("A man is fixing a car engine.", "A mechanic repairs a vehicle.", 0.84),
    ("Children are building a sandcastle.", "Kids make a castle out of sand on the beach.", 0.92),
    ("The museum opens at nine.", "The museum's doors open at 9 am.", 0.9),
    ("A woman is jogging in the park.", "A woman is running through the park.", 0.9),
    ("The man is playing the drums.", "A man is playing a flute.", 0.48),
    ("Snow covers the mountains.", "The mountains are covered in snow.", 0.97),
    ("A boy is eating an apple.", "A boy is eating a banana.", 0.6),
    ("The car is parked outside the house.", "A vehicle sits in front of the home.", 0.85),
    ("The doctor examines the patient.", "A physician checks a sick person.", 0.86),
    ("A cat climbs the tree.", "The stock price climbed today.", 0.05),
    ("People are waiting for the bus.", "A crowd waits at the bus stop.", 0.85),
    ("The lecture was very boring.", "The talk was extremely dull.", 0.88),
    ("A man is cutting the grass.", "A man is mowing the lawn.", 0.93),
    ("She bought a new dress.", "She sold her old car.", 0.15),
    ("The sun sets over the lake.", "Sunset over the water.", 0.8),
    ("A chef tastes the sauce.", "A musician tunes a guitar.", 0.05),
    ("The kids are playing video games.", "Children play games on a console.", 0.87),
    ("The bridge was closed for repairs.", "Workers are repairing the closed bridge.", 0.75),
]


class SentencePairModel(nn.Module):
    """The cosine similarity of two sentences' embeddings: ``forward(x) -> (N,)``.

    ``x`` is ``(N, 2, 2, T)`` token ids: ``x[:, i, 0]`` the ids and ``x[:, i, 1]`` the attention mask of sentence
    ``i`` of each pair (see :func:`pair_data`).

    Args:
        encoder: A :class:`gradsense.zoo.SentenceEncoder` (its parameters are this model's, prefixed ``encoder.``).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        a = self.encoder(input_ids=x[:, 0, 0], attention_mask=x[:, 0, 1])
        b = self.encoder(input_ids=x[:, 1, 0], attention_mask=x[:, 1, 1])
        return F.cosine_similarity(a, b, dim=-1)


def pair_data(encoder: nn.Module, pairs: list[tuple[str, str, float]] | None = None,
              split: str = "all") -> tuple[Tensor, Tensor]:
    """Tokenised pairs as ``(x, labels)``: ``x`` ``(N, 2, 2, T)`` long, labels ``(N,)`` similarities in [0, 1].

    Args:
        encoder: The sentence encoder (for its tokenizer).
        pairs: ``(sentence, sentence, label)`` triples (default :data:`PAIRS`).
        split: ``"calibration"`` (the first 32 of :data:`PAIRS`), ``"heldout"`` (the other 16) or ``"all"``.

    Raises:
        ValueError: An unknown split.
    """
    if split not in ("all", "calibration", "heldout"):
        raise ValueError(f"split must be 'all', 'calibration' or 'heldout', got {split!r}.")
    pairs = list(PAIRS if pairs is None else pairs)
    if split == "calibration":
        pairs = pairs[:32]
    elif split == "heldout":
        pairs = pairs[32:]
    texts = [s for a, b, _ in pairs for s in (a, b)]
    tok = encoder.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ids = tok["input_ids"].reshape(len(pairs), 2, -1)
    mask = tok["attention_mask"].reshape(len(pairs), 2, -1)
    x = torch.stack([ids, mask], dim=2)  # (N, 2, 2, T)
    y = torch.tensor([s for _, _, s in pairs], dtype=torch.float32)
    return x, y


def similarity_loss(out: Tensor, labels: Tensor) -> Tensor:
    """Mean squared error between predicted cosine similarities and labels."""
    return ((out - labels.to(out.dtype)) ** 2).mean()


def _ranks(v: Tensor) -> Tensor:
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = torch.arange(v.numel(), dtype=torch.float64)
    # average ranks of ties
    for value in torch.unique(v):
        idx = v == value
        if int(idx.sum()) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(outputs: Tensor, labels: Tensor) -> float:
    """Spearman rank correlation of predicted similarities with the labels (ties get average ranks)."""
    a, b = _ranks(outputs.reshape(-1).double()), _ranks(labels.reshape(-1).double())
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))
