"""Routed fraction: per layer, the share of tokens that ran it in a Mixture-of-Depths model.

An `evaluate` module (load it with `evaluate.load("<path to this folder>")`). Each example is one sequence: how many of
its tokens ran each layer (`routed_tokens`, one count per layer, from the model's own router decisions) and how many
non-padding tokens it has (`tokens`). Unrouted layers run every token, so their count equals `tokens`. With
`routing_granularity="attention"` a skipped token still runs the layer's MLP: "ran" counts the attention (the K/V the
token wrote), so the mean over layers is the KV fraction.
"""

import datasets
import evaluate

_DESCRIPTION = """
Per-layer routed fraction (tokens that ran layer j / tokens) of a Mixture-of-Depths model. A dense model scores 1.0 in
every layer; a layer that skips half the tokens scores 0.5. Counts are summed over all sequences before dividing, so
long sequences weigh more.
"""

_KWARGS_DESCRIPTION = """
Args:
    routed_tokens (`list[list[int]]`): per sequence, the number of tokens that ran each layer.
    tokens (`list[int]`): per sequence, its number of non-padding tokens.
Returns:
    per_layer_routed_fraction (`list[float]`): the routed fraction of each layer, in [0, 1].
Examples:
    >>> metric = evaluate.load("evaluation/metrics/routed_fraction")
    >>> metric.compute(routed_tokens=[[4, 2], [2, 1]], tokens=[4, 2])
    {'per_layer_routed_fraction': [1.0, 0.5]}
"""

_CITATION = """
@inproceedings{zhang2025modification,
  title={MoDification: Mixture of Depths Made Easy},
  author={Zhang, Chen and others},
  booktitle={NAACL},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RoutedFraction(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"routed_tokens": datasets.List(datasets.Value("int64")), "tokens": datasets.Value("int64")}
            ),
        )

    def _compute(self, routed_tokens, tokens):
        if not tokens:
            raise ValueError("routed_fraction needs at least one sequence")
        num_layers = len(routed_tokens[0])
        if any(len(row) != num_layers for row in routed_tokens):
            raise ValueError("every sequence must give one routed-token count per layer, for the same layers")
        total = sum(int(t) for t in tokens)
        if total <= 0:
            raise ValueError("routed_fraction needs at least one non-padding token")
        for row, n in zip(routed_tokens, tokens):
            if any(not 0 <= int(c) <= int(n) for c in row):
                raise ValueError(f"routed-token counts must lie in [0, tokens={n}], got {list(row)}")
        return {"per_layer_routed_fraction": [sum(int(row[j]) for row in routed_tokens) / total
                                              for j in range(num_layers)]}
