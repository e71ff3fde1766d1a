"""SDPA attention for BLIP: transformers 5 runs BLIP's attention only as matmul + softmax ("eager").

`use_sdpa` swaps the class of each BLIP attention module of a loaded model for a subclass whose forward
calls torch's fused `scaled_dot_product_attention`: the same weights, state_dict keys, `save_pretrained`
and `deepcopy`, the same numbers (tests/unit/test_blip_sdpa.py). The forwards below copy transformers
5.24's eager ones (modeling_blip.BlipAttention, modeling_blip_text.BlipTextSelfAttention) but for the
two lines that make and apply the probabilities.

Nothing that reads attention probabilities loses them: transformers asks for them through its
output-capturing hooks (`output_attentions`, by keyword or config, is resolved by `capture_outputs` into
a collector the hooks fill from each attention module's second output; the text decoder's modules never
see the keyword), so while a collector wants attentions the subclass runs the eager forward it replaces.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.nn import functional as F
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention
from transformers.utils.deprecation import deprecate_kwarg

try:
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # an older transformers: _check_copied_from refuses it before anything runs
    EncoderDecoderCache = _active_collector = None

__all__ = ["SdpaBlipAttention", "SdpaBlipTextSelfAttention", "use_sdpa", "is_sdpa"]

# the eager forwards' parameters the copies below were taken from (transformers 5.24); another signature means
# another forward, which a copy would silently disagree with
_COPIED_FROM = {BlipAttention: ("self", "hidden_states", "kwargs"),
                BlipTextSelfAttention: ("self", "hidden_states", "attention_mask", "encoder_hidden_states",
                                        "encoder_attention_mask", "cache", "kwargs")}


def _weights_wanted(kwargs: dict) -> bool:
    """Whether this call's attention probabilities are wanted (then only the eager forward has them)."""
    if kwargs.get("output_attentions"):
        return True
    collector = _active_collector.get()
    return bool(collector) and ("attentions" in collector or "cross_attentions" in collector)


def _sdpa_mask(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """The additive mask eager attention adds to its scores, as SDPA takes it: on the query's device and in its
    dtype (SDPA wants a float mask in the query's dtype). Clamped first: fp32's most negative value, cast to
    bf16 or fp16, would become -inf and turn a fully masked row into NaN where eager softmax gives a number."""
    if mask is None:
        return None
    mask = mask.to(query.device)
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    return mask


class SdpaBlipAttention(BlipAttention):
    """BLIP's vision self-attention through `scaled_dot_product_attention` (no mask: every patch sees every
    patch)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, None); (output, probabilities) by the eager forward when they are wanted."""
        if _weights_wanted(kwargs):
            return super().forward(hidden_states, **kwargs)
        bsz, tgt_len, embed_dim = hidden_states.size()
        mixed_qkv = (self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads)
                     .permute(2, 0, 3, 1, 4))
        query_states, key_states, value_states = mixed_qkv[0], mixed_qkv[1], mixed_qkv[2]
        context_layer = F.scaled_dot_product_attention(query_states, key_states, value_states,
                                                       dropout_p=self.dropout.p if self.training else 0.0,
                                                       scale=self.scale)
        context_layer = context_layer.permute(0, 2, 1, 3).reshape(bsz, tgt_len, self.embed_dim)
        return self.projection(context_layer), None


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """BLIP's text self- and cross-attention through `scaled_dot_product_attention`: the extended additive mask
    (causal part included) as eager adds it, the key/value cache as eager keeps it."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, cache=None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, None); (context, probabilities) by the eager forward when they are wanted."""
        if _weights_wanted(kwargs):
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query_layer = self.query(hidden_states).view(hidden_shape).transpose(1, 2)

        is_cross_attention = encoder_hidden_states is not None
        attention_mask = encoder_attention_mask if is_cross_attention else attention_mask

        # the cache, as the eager forward keeps it: cross-attention keys and values are computed once
        is_updated = False
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                is_updated = cache.is_updated.get(self.layer_idx)
                curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
            else:
                curr_cache = cache

        current_states = encoder_hidden_states if is_cross_attention else hidden_states
        if is_cross_attention and cache is not None and is_updated:
            key_layer = curr_cache.layers[self.layer_idx].keys
            value_layer = curr_cache.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
            key_layer = self.key(current_states).view(kv_shape).transpose(1, 2)
            value_layer = self.value(current_states).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key_layer, value_layer = curr_cache.update(key_layer, value_layer, self.layer_idx, kwargs=kwargs)
                if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        # is_causal stays off: the causal part is in the mask, as eager adds it
        context_layer = F.scaled_dot_product_attention(query_layer, key_layer, value_layer,
                                                       attn_mask=_sdpa_mask(attention_mask, query_layer),
                                                       dropout_p=self.dropout.p if self.training else 0.0,
                                                       scale=1.0 / math.sqrt(self.attention_head_size))
        context_layer = context_layer.permute(0, 2, 1, 3).reshape(*input_shape, self.all_head_size)
        return context_layer, None


_SDPA = {BlipAttention: SdpaBlipAttention, BlipTextSelfAttention: SdpaBlipTextSelfAttention}


def is_sdpa(module) -> bool:
    """Whether `module` is a BLIP attention module switched to SDPA."""
    return isinstance(module, (SdpaBlipAttention, SdpaBlipTextSelfAttention))


def _check_copied_from() -> None:
    """Refuse a transformers whose BLIP attention is not the one the SDPA forwards copy."""
    import transformers

    for eager in _SDPA:
        found = tuple(inspect.signature(inspect.unwrap(eager.forward)).parameters)
        if found != _COPIED_FROM[eager] or _active_collector is None:
            raise RuntimeError(f"transformers {transformers.__version__}: {eager.__name__}.forward{found} is not the "
                               "eager forward revprompt's SDPA copy was taken from (transformers 5.24); run BLIP with "
                               "attention = \"eager\" (train.attention, evaluate.attention)")


def use_sdpa(model) -> int:
    """Switch every BLIP attention module in `model` (peft-wrapped or not) to SDPA, in place; returns how many
    run SDPA now (those switched before included, so a second call changes nothing and says the same)."""
    _check_copied_from()
    count = 0
    for module in model.modules():
        sdpa = _SDPA.get(type(module))
        if sdpa is not None:
            module.__class__ = sdpa
        count += is_sdpa(module)
    return count
