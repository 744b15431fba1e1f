"""Label fidelity: which synthetic rows still show their class, by CLIP zero-shot scores (numpy only).

The actor (`actors/fidelity_filter.py`) computes the scores and `judge` applies the configured rules;
`engine.recipes.filter.filter_stage` appends the stage after any recipe's last stage. Rules, in the order they are checked (the
first that fires is recorded):
- `negative`: a negative prompt ("a photo", "an image", ...) scores above every class prompt (ALIA's semantic
  filter: the subject is gone);
- `other_class`: another class's prompt scores highest (optional);
- `min_prob`: the row's class has zero-shot probability, softmax over the class prompts, at or below
  `min_prob` (He et al. keep rows above 1/num_classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import FilterConfig, check_class_keys

FIDELITY_PROB = "fidelity_prob"  # the row's class probability (softmax over the class prompts)
FIDELITY_TOP = "fidelity_top"  # the prompt that scored highest: a class name, or the negative prompt
RULES = ("negative", "other_class", "min_prob")


@dataclass(frozen=True)
class Verdict:
    prob: np.ndarray  # (N,) float: the row's class probability
    top: np.ndarray  # (N,) int: index of the best prompt (classes first, then negative prompts)
    rule: np.ndarray  # (N,) object: "" kept, else the rule that dropped the row


def class_prompts(config: FilterConfig, class_names: list[str]) -> list[str]:
    """One prompt per class, in label order; a `class_prompts` key that is no class is a config error."""
    check_class_keys(config.class_prompts, class_names, "filter.class_prompts")
    return [
        config.class_prompts.get(name, config.class_prompt.format(class_name=name)) for name in class_names
    ]


def judge(logits: np.ndarray, labels: np.ndarray, num_classes: int, config: FilterConfig) -> Verdict:
    """`logits`: (N, num_classes + num_negative) image-text similarities, class prompts first."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    class_logits = logits[:, :num_classes]
    shifted = np.exp(class_logits - class_logits.max(axis=1, keepdims=True))
    prob = (shifted / shifted.sum(axis=1, keepdims=True))[np.arange(len(labels)), labels]
    top = logits.argmax(axis=1)
    min_prob = 1.0 / num_classes if config.min_prob is None else config.min_prob
    rule = np.full(len(labels), "", dtype=object)
    fired = [
        ("min_prob", (prob <= min_prob) if min_prob > 0 else np.zeros(len(labels), dtype=bool)),
        ("other_class", config.drop_other_class & (class_logits.argmax(axis=1) != labels)),
        ("negative", config.drop_negative & (top >= num_classes)),
    ]
    for name, mask in fired:  # reversed priority: the last assignment wins, so `negative` is recorded first
        rule[mask] = name
    return Verdict(prob=prob.astype(np.float32), top=top, rule=rule)
