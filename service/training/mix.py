"""What fine-tuning draws, and how often: a `Mix` of objectives, VQA sources and families,
and hard-negative kinds.

The default mix is uniform everywhere: objectives in plain round robin, every VQA question
equally likely, every hard-negative kind allowed by a caption equally likely. A recipe
shifts the training signal toward weak spots without changing the data, e.g.

    {"objectives": {"vqa": 2, "match": 2, "grounding": 1},
     "vqa_sources": {"shapes": 4, "easy-vqa": 1},
     "vqa_families": {"count": 3, "relation": 3},
     "vqa_answers": {"4": 2, "5": 3},
     "hard_kinds": {"relation": 3, "color": 2, "size": 2},
     "align_rank": 1.0, "hard_share": 0.75}

Objective weights are whole numbers of steps per cycle; the other weights are relative
(names left out weigh 1). Besides the task's own objectives, "pretrain" (the backbone's
pretraining losses, `finetune.PretrainObjective`) joins any task when weighed above 0.
`align_rank` weighs a ranking loss that sets each true caption against its one-change
twin when that is the false caption paired with it (0: off);
`word_check` a per-token loss on the same pairs, the twin's changed words false and every
word of a true caption not (0: off; needs a model whose config has `word_check`).
`complete_share` (of true captions, the complete one rather than a partial one) and
`hard_share` (of false captions, a one-change twin rather than another image's caption)
override the alignment objectives' defaults (finetune.ALIGN_MIX); `sentence_share` (of
true captions, one sentence of the complete caption alone, as `/v1/match` checks a text by
sentence; its twins are of that sentence) defaults to 0. `vqa_turned` (of the yes/no
relation questions drawn, those joined in the same batch by their turned twin, "left of"
<-> "right of" and "above" <-> "below", with its own answer: a minimal pair that only the
relation word tells apart) defaults to 0. Every mix is recorded in the entry's manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WEIGHT_FIELDS = ("objectives", "vqa_sources", "vqa_families", "vqa_answers", "hard_kinds")
SHARE_FIELDS = ("complete_share", "hard_share", "sentence_share", "vqa_turned")
LOSS_WEIGHTS = ("align_rank", "word_check")
MIX_FIELDS = (*WEIGHT_FIELDS, *LOSS_WEIGHTS, *SHARE_FIELDS)


@dataclass(frozen=True)
class Mix:
    objectives: dict[str, int] = field(default_factory=dict)
    vqa_sources: dict[str, float] = field(default_factory=dict)
    vqa_families: dict[str, float] = field(default_factory=dict)
    vqa_answers: dict[str, float] = field(default_factory=dict)  # by gold answer, e.g. "5"
    hard_kinds: dict[str, float] = field(default_factory=dict)
    align_rank: float = 0.0
    word_check: float = 0.0
    complete_share: float | None = None  # None: the objective's default
    hard_share: float | None = None
    sentence_share: float = 0.0
    vqa_turned: float = 0.0

    def __post_init__(self):
        for name in SHARE_FIELDS:
            share = getattr(self, name)
            if share is not None and (not isinstance(share, int | float) or not 0 <= share <= 1):
                raise ValueError(f"mix {name} must be a fraction in [0, 1], not {share!r}")
        for name in LOSS_WEIGHTS:
            w = getattr(self, name)
            if not isinstance(w, int | float) or w < 0:
                raise ValueError(f"mix {name} must be a weight >= 0, not {w!r}")
        for name in WEIGHT_FIELDS:
            for key, w in getattr(self, name).items():
                if not isinstance(w, int | float) or w < 0:
                    raise ValueError(f"mix {name}[{key!r}] must be a weight >= 0, not {w!r}")
        for key, w in self.objectives.items():
            if w != int(w):
                raise ValueError(f"mix objectives[{key!r}] must be a whole number, not {w}")

    @classmethod
    def parse(cls, spec: str | dict | None) -> Mix:
        """A Mix from a dict, a JSON string or the path of a JSON file (None: uniform)."""
        if spec is None or isinstance(spec, Mix):
            return spec or cls()
        if isinstance(spec, str):
            text = Path(spec).read_text() if not spec.lstrip().startswith("{") else spec
            spec = json.loads(text)
        if unknown := set(spec) - set(MIX_FIELDS):
            raise ValueError(f"unknown mix fields {sorted(unknown)}; known: {MIX_FIELDS}")
        return cls(**spec)

    def to_dict(self) -> dict:
        return asdict(self)

    def drawn_families(self, families: Sequence[str]) -> list[str]:
        """The VQA families of `families` this mix draws (weight above 0)."""
        return [f for f in families if self.vqa_families.get(f, 1) > 0]

    def cycle(self, names: Sequence[str]) -> list[str]:
        """The objectives of one round-robin cycle, interleaved: weights {a: 2, b: 1, c: 2}
        give [a, b, c, a, c]."""
        if unknown := {k for k, w in self.objectives.items() if w > 0} - set(names):
            raise ValueError(f"mix names objectives {sorted(unknown)} not trained here")
        weights = {n: int(self.objectives.get(n, 1)) for n in names}
        out = [n for r in range(max(weights.values(), default=0)) for n in names if weights[n] > r]
        if not out:
            raise ValueError("mix gives every objective weight 0")
        return out


def weighted_choice(
    weights: np.ndarray | None, rng: np.random.Generator, n: int, size: int
) -> np.ndarray:
    """n indices into `size` items, uniformly (weights None) or by the weights."""
    if weights is None:
        return rng.integers(size, size=n)
    return rng.choice(size, size=n, p=weights / weights.sum())


def item_weights(
    labels: Sequence[tuple[str, str, str]],
    by_group: dict[str, float],
    by_family: dict[str, float],
    by_answer: dict[str, float] | None = None,
) -> np.ndarray | None:
    """Per-item sampling weights for items labelled (group, family, answer).

    Groups are the records' sources ("shapes", "easy-vqa"). With `by_group`, a group's
    total weight is its weight (default 1) spread over its items, so {"shapes": 4,
    "easy-vqa": 1} means four of five draws from shapes whatever the sizes; without it,
    groups weigh as many as their items. `by_family` and `by_answer` scale each family's
    and each gold answer's items (rare answers, e.g. counts above 3, can be drawn more).
    None when all are empty: uniform over items, the plain draw.
    """
    by_answer = by_answer or {}
    if not by_group and not by_family and not by_answer:
        return None
    groups = np.array([g for g, _, _ in labels])
    w = np.array(
        [by_family.get(f, 1.0) * by_answer.get(a, 1.0) for _, f, a in labels], dtype=np.float64
    )
    for g in set(groups.tolist()) if by_group else ():
        sel = groups == g
        total = w[sel].sum()
        if total > 0:
            w[sel] *= by_group.get(g, 1.0) / total
    if w.sum() <= 0:
        raise ValueError("mix gives every VQA question weight 0")
    return w
