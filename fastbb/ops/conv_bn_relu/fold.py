"""The eval BatchNorm folded into the conv (weight * scale per output channel, the shift as the conv's bias),
and the inference cache that keeps folded weights, with the packed forms the CPU convs make of them, until
one of their sources changes."""
import weakref

import torch

from fastbb.ops._common import compute_dtype


def fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, compute=None):
    """The eval BN folded into the conv: (weight * scale per output channel, shift), in weight's dtype.

    compute: the dtype of the folding (default float32, float64 for float64 weights). The inference
    cache folds once in float64, so each folded weight carries a single rounding: as close to the unfused
    conv -> BN as folding comes (a float32 scale adds its own few ulps to every weight).
    """
    compute = compute or compute_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute) * scale if bias is None else (bias.to(compute) - running_mean.to(compute)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(compute)
    return (weight.to(compute) * scale[:, None, None, None]).to(weight.dtype), shift.to(weight.dtype)


class FoldCache:
    """Folded (weight, shift) pairs, and the packed forms the CPU convs make of each folded weight (oneDNN's
    blocked layout, the Winograd transform), reused across inference calls until one of their sources
    changes.

    Folding reads and writes every conv weight: at batch 1 that is a third of a CPU ResNet-50 forward,
    for a result that only changes when the parameters or BN statistics do. An entry is keyed by the
    identity (a weak reference, so a replaced tensor never matches), the in-place version counter and the
    storage of each source tensor, plus eps: load_state_dict, an optimizer step or a running-statistics
    update bump a version, and module.to() / .double() swap the storage. Only calls that need no
    autograd graph use it, outside torch.compile (which traces the folding into its own graph). The
    folded weights live as long as the conv weight they came from.
    """

    def __init__(self):
        # id(weight) -> (source references, versions, eps, folded weight, shift, packed weights)
        self._entries = {}

    @staticmethod
    def usable(sources):
        if torch.compiler.is_compiling():
            return False
        present = [t for t in sources if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in present):
            return False
        return not any(t.is_inference() for t in present)  # inference tensors keep no version counter

    def get(self, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
        """(folded weight, shift, packed weights): the dict where the CPU convs keep their packed forms of
        this folded weight, which go with it."""
        sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
        # The storage pointer too: module.to() / .half() swap a parameter's .data without a version bump.
        versions = tuple(None if t is None else (t._version, t.data_ptr()) for t in sources)
        entry = self._entries.get(id(weight))
        if entry is not None:
            refs, cached_versions, cached_eps, folded, shift, packed_weights = entry
            if (cached_versions == versions and cached_eps == eps
                    and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, sources))):
                return folded, shift, packed_weights
        # Normal tensors even under torch.inference_mode: a later call whose x needs a gradient saves the
        # folded weight for backward, which autograd refuses for inference tensors. inference_mode(False)
        # turns grad mode back on, so no_grad as well: a graph on the folded weight would hold the source
        # weight, and the entry (which goes when its weight does) would then keep it alive for ever.
        with torch.inference_mode(False), torch.no_grad():
            folded, shift = fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, torch.float64)
        key = id(weight)
        # The entry goes when its weight does (the callback runs before that id can be reused).
        refs = tuple(None if t is None else weakref.ref(t) for t in sources[1:])
        refs = (weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None)),) + refs
        packed_weights = {}
        self._entries[key] = (refs, versions, eps, folded, shift, packed_weights)
        return folded, shift, packed_weights


fold_cache = FoldCache()


def folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """(folded weight, shift, packed weights) for one eval call: from the cache where it serves (packed
    weights a dict kept with the folded weight), else folded afresh, differentiably (packed weights None:
    nothing is packed for a weight that is not kept)."""
    sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
    if FoldCache.usable(sources):
        return fold_cache.get(*sources, eps)
    return (*fold(*sources, eps), None)
