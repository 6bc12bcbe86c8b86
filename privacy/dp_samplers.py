"""Per-sample gradients for Hugging Face layers Opacus has no sampler for, and a batch-first patch for blocks
that flatten (batch, seq); registered with Opacus when this module is imported (privacy.local_dp does).

The explicit samplers are checked against one backward pass per sample in tests/privacy/test_local_dp.py.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertLMPredictionHead
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from transformers.pytorch_utils import Conv1D

# ---------------------------------------------------------------------------------------
# Per-sample gradient samplers for modules Opacus does not ship one for.


@register_grad_sampler(Conv1D)
def _conv1d_grad_sample(
    layer: Conv1D, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """GPT-2's Conv1D is ``y = x @ W + b`` with W of shape (nx, nf) (a transposed Linear)."""
    x = activations[0]  # (B, ..., nx)
    ret: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", x, backprops)  # (B, nx, nf)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)  # (B, nf)
    return ret


def _hf_rms_norm_grad_sample(
    layer: nn.Module, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Llama-style RMSNorm: ``y = w * (x / sqrt(mean(x²) + eps))`` with the normalisation
    in float32 and cast back to the input dtype, exactly as the module's forward does."""
    x = activations[0]
    weight = layer.weight
    eps = float(layer.variance_epsilon)  # type: ignore[arg-type]
    assert isinstance(weight, nn.Parameter)
    ret: dict[nn.Parameter, Tensor] = {}
    if weight.requires_grad:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ret[weight] = sum_over_all_but_batch_and_last_n(
            normed.to(x.dtype) * backprops, weight.dim()
        )
    return ret


def _hf_rms_norm_classes() -> list[type[nn.Module]]:
    """The RMSNorm classes of the families in emulator/architectures.py that exist here."""
    found: list[type[nn.Module]] = []
    for module_name, class_name in (
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
        ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
        ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
    ):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return found


register_grad_sampler(_hf_rms_norm_classes())(_hf_rms_norm_grad_sample)


def _lm_prediction_head_grad_sample(
    layer: nn.Module, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """BERT's LM head owns a ``bias`` next to its children. Registering a sampler for the
    head makes Opacus recurse into the children (each has its own sampler) instead of
    running functorch on the whole head, which breaks on the tied ``decoder.bias``.
    The tied bias gets its per-sample gradient from the ``decoder`` Linear. An untied
    bias is not used by the forward (``decoder(x)``): its per-sample gradient is zero.
    """
    bias = layer.bias
    decoder_bias = getattr(layer.decoder, "bias", None)
    if not isinstance(bias, nn.Parameter) or bias is decoder_bias or not bias.requires_grad:
        return {}
    return {bias: torch.zeros((backprops.shape[0], *bias.shape), dtype=bias.dtype)}


def _lm_prediction_head_classes() -> list[type[nn.Module]]:
    return [BertLMPredictionHead]


register_grad_sampler(_lm_prediction_head_classes())(_lm_prediction_head_grad_sample)


# ---------------------------------------------------------------------------------------
# Models that flatten (batch, seq) into one dimension inside a block.
#
# Opacus takes dimension 0 of a layer's input as the batch. OPT's decoder layer runs its
# MLP (final_layer_norm, fc1, fc2) on ``hidden_states.reshape(-1, hidden)``, so those
# layers see batch*seq rows: their "per-sample" gradients would be per token, and
# clipping per token does not bound one sample's influence. The fix keeps the
# (batch, seq, hidden) shape (the MLP is token-wise, so the result is identical); the
# guard below refuses any other model that does the same.

_FLATTEN_LINE = "hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))"


def _batch_first_forward(cls: type[nn.Module]) -> Callable[..., Any] | None:
    """``cls.forward`` with the flattening line removed (None if it has no such line)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    if source.count(_FLATTEN_LINE) != 1:
        return None
    source = source.replace(_FLATTEN_LINE, "pass  # fedsite: keep (batch, seq, hidden)")
    namespace: dict[str, Any] = {}
    module_globals = vars(sys.modules[cls.__module__])
    exec(compile(source, inspect.getfile(cls), "exec"), module_globals, namespace)
    forward: Callable[..., Any] = namespace["forward"]
    return forward


def _flattening_block_classes() -> list[type[nn.Module]]:
    return [OPTDecoderLayer]


def patch_flattening_blocks(model: nn.Module) -> list[nn.Module]:
    """Give each flattening block a batch-first forward (instance attribute, so the
    class and the state dict are untouched). Returns the patched modules."""
    classes = tuple(_flattening_block_classes())
    patched: list[nn.Module] = []
    cache: dict[type[nn.Module], Callable[..., Any] | None] = {}
    for module in model.modules():
        if isinstance(module, classes) and any(p.requires_grad for p in module.parameters()):
            cls = type(module)
            if cls not in cache:
                cache[cls] = _batch_first_forward(cls)
            forward = cache[cls]
            if forward is None:
                continue  # the guard will refuse it if it still flattens
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    return patched
