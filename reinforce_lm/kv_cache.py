"""What the native sampler does with a model's own transformers cache: repeat a prefilled prompt's rows
K times, drop finished rows, write each new key and value in place, and whether decode steps take the
attention mask. Used for every model; the lean decode step (`decoder.py`) reads the prefilled cache
through the same `grown` buffers.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def _in_place_layer():
    """The layer class, made on first use so that importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A `DynamicLayer` whose keys/values are growing views of buffers allocated once per rollout.

        transformers' own layer appends each token with `torch.cat`, copying the whole cache every step
        (quadratic in the completion length); this one writes the new token in place.
        """

        def __init__(self, layer: DynamicLayer, extra: int):
            super().__init__()
            self.device, self.is_initialized = layer.keys.device, True
            self._n = layer.keys.shape[-2]
            self._k = grown(layer.keys, extra)
            self._v = grown(layer.values, extra)
            self._views()

        def _views(self):
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            n = self._n + key_states.shape[-2]
            if n > self._k.shape[-2]:  # beyond the reservation: grow (not reached by the sampler)
                self._k, self._v = grown(self.keys, n - self._n), grown(self.values, n - self._n)
            self._k[..., self._n : n, :] = key_states
            self._v[..., self._n : n, :] = value_states
            self._n = n
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

        def batch_repeat_interleave(self, repeats: int):
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._views()

        def crop(self, tokens_to_remove: int):
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative count of tokens to remove")
            self._n = max(0, self._n + tokens_to_remove)
            self._views()

    return InPlaceLayer


def grown(x: torch.Tensor, extra: int, zeros: bool = False) -> torch.Tensor:
    """[..., L, D] -> a buffer [..., L+extra, D] whose first L positions are `x` (the rest: uninitialised,
    or `zeros`)."""
    buf = (x.new_zeros if zeros else x.new_empty)(*x.shape[:-2], x.shape[-2] + extra, x.shape[-1])
    buf[..., : x.shape[-2], :] = x
    return buf


def preallocate(cache, extra: int) -> None:
    """Swap each plain `DynamicLayer` of `cache` for an `InPlaceLayer` with room for `extra` tokens: the
    decode steps of models without a lean step then write the KV cache in place too."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = _in_place_layer()(layer, extra)


# -- what the sampler may do with a model's cache ------------------------------------------------
def _plain_kv(cache) -> bool:
    """A `DynamicCache` of plain key/value layers only: the caches whose rows transformers repeats and
    selects completely. Other layers may keep more per row than keys and values (Falcon-H1's convolution
    states, DeepSeek-V4's compressor buffers, MiniMax's linear-attention states) that those methods miss."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    kinds = (DynamicLayer, DynamicSlidingWindowLayer, _in_place_layer())
    layers = getattr(cache, "layers", None)
    return type(cache) is DynamicCache and bool(layers) and all(type(x) in kinds for x in layers)


def repeat_cache(cache, k: int) -> bool:
    """Repeat every row of `cache` k times in place; False where that is not known to work (then the
    caller prefills every sample): only a `DynamicCache` of plain key/value layers is repeated."""
    if not _plain_kv(cache):
        return False
    try:
        cache.batch_repeat_interleave(k)
    except Exception:  # a fresh prefill of every sample follows, with a new cache
        return False
    return True


def attends(cache) -> bool:
    """Whether decode steps take the attention mask: False only for a cache made of state-space layers
    alone (Mamba's), which hold no keys to mask. transformers' Mamba multiplies the step's one position
    by a mask as long as the sequence: wrong log-probs for every row of a padded batch. Any other cache
    (attention, hybrid, custom) gets the mask, as `generate` would give it."""
    try:
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin
    except ImportError:  # a transformers without state-space cache layers
        return True
    layers = getattr(cache, "layers", None)
    return not layers or not all(
        isinstance(x, LinearAttentionCacheLayerMixin) and not isinstance(x, CacheLayerMixin) for x in layers
    )


def can_select(cache) -> bool:
    """Whether finished rows can be dropped from `cache`: only from a `DynamicCache` of plain key/value
    layers (see `_plain_kv`); any other cache decodes finished rows on, as padding."""
    return _plain_kv(cache)
