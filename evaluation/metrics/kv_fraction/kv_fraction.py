"""KV fraction: bytes of key/value cache a Mixture-of-Depths model holds over what its dense base holds, same inputs.

An `evaluate` module (load it with `evaluate.load("<path to this folder>")`). Each example is one cached prefix (a
sequence or a batch): the bytes held by the MoD model's `MoDCache` and by the base model's cache (measured, or the
dense size computed from the config) after running it.
"""

import datasets
import evaluate

_DESCRIPTION = """
Key/value cache bytes, MoD over base, summed over all examples before dividing: the memory budget of a
Mixture-of-Depths model. A token that skips a layer's attention writes no K/V there, so with equal K/V sizes in every
layer this is the mean over layers of the share of tokens that ran attention (`RoutingPlan.kv_fraction`).
"""

_KWARGS_DESCRIPTION = """
Args:
    mod_kv_bytes (`list[int]`): per example, bytes held by the MoD model's cache.
    base_kv_bytes (`list[int]`): per example, bytes held by the base (dense) model's cache.
Returns:
    kv_fraction (`float`): sum(mod_kv_bytes) / sum(base_kv_bytes).
Examples:
    >>> metric = evaluate.load("evaluation/metrics/kv_fraction")
    >>> metric.compute(mod_kv_bytes=[300, 150], base_kv_bytes=[400, 200])
    {'kv_fraction': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KVFraction(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"mod_kv_bytes": datasets.Value("int64"), "base_kv_bytes": datasets.Value("int64")}
            ),
        )

    def _compute(self, mod_kv_bytes, base_kv_bytes):
        base_total = sum(int(b) for b in base_kv_bytes)
        if base_total <= 0:
            raise ValueError("kv_fraction needs base_kv_bytes > 0")
        return {"kv_fraction": sum(int(m) for m in mod_kv_bytes) / base_total}
