"""Mean pooling for BERT-family classifiers, built from stock transformers parts.

``BertForSequenceClassification`` classifies the [CLS] token's final state
(through the pooler). Sentence-embedding models such as all-MiniLM-L6-v2 were
trained to be read by *mean pooling* over all tokens instead, and on them the
difference is large (on WordNet supersenses, measured centrally in
``experiments/privacy/RESULTS.md``, mean pooling is worth about 14 points).

A custom head class would need ``trust_remote_code`` (or fedsite itself) to
load the export. Instead this appends one more transformer block, built from the
model's own block class and frozen, whose weights make every position's output
the LayerNorm of the masked mean of the block's input:

* query and key projections are zero, so every attention score is 0 and the
  softmax over the unmasked keys is uniform: each head returns the mean of its
  values over the real tokens (padding is masked as usual);
* the value projection is the identity, so the heads together return the mean
  hidden state ``m``;
* the attention output projection is ``SCALE * I``: its LayerNorm sees
  ``SCALE * m + h`` (``h`` is the residual, the token's own state), which is
  ``m`` to within ``h / SCALE`` because LayerNorm ignores scale;
* the feed-forward weights are zero, so the block's last LayerNorm returns
  its input (already normalised).

The [CLS] output is then LayerNorm(mean of the last encoder layer), which the
stock pooler and classifier read. The pooler is set to the identity
(``tanh(x)``, nearly linear where LayerNorm puts most values) so the
classifier starts from the mean-pooled features. The model is still a plain
``BertForSequenceClassification`` with ``num_hidden_layers + 1`` blocks: the
export loads with ``transformers`` alone, and peft adapters load on it. The
block is never trained and LoRA never wraps it (:func:`pooling_block_index`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PreTrainedModel

from emulator.architectures import num_blocks, set_num_blocks, spec_for, transformer_blocks

POOLINGS = ("cls", "mean")
SCALE = 1e4  # the residual's weight relative to the mean is 1/SCALE
# The pooler hands the classifier tanh(POOLER_SCALE * LayerNorm(mean)). The scale reparametrises the head
# and sets its share of each example's gradient norm under DP-SGD's clipping; 1.0 (the features as MiniLM
# gives them) is what the recipe was tuned with (experiments/privacy/run_recipe.py --pooler-scale varies it).
POOLER_SCALE = 1.0
CONFIG_KEY = "fedsite_mean_pooling_block"  # config.json: index of the pooling block


class PoolingError(ValueError):
    """Mean pooling asked of a model it cannot be built into."""


def pooling_block_index(config: object) -> int | None:
    """Index of the mean-pooling block in the model's blocks, or None (no such block)."""
    index = getattr(config, CONFIG_KEY, None)
    return int(index) if isinstance(index, int) else None


def trainable_block_indices(config: object) -> list[int] | None:
    """Blocks LoRA may wrap: all but the pooling block (None = all blocks, nothing to exclude)."""
    index = pooling_block_index(config)
    if index is None:
        return None
    return [i for i in range(num_blocks(config)) if i != index]  # type: ignore[arg-type]


@torch.no_grad()
def add_mean_pooling_block(model: PreTrainedModel) -> None:
    """Append the frozen mean-pooling block to a BERT-family sequence classifier (in place)."""
    spec = spec_for(model)
    if spec.family != "bert":
        raise PoolingError(
            f"model.pooling = 'mean' is for BERT-family encoders; a {spec.family} model pools its last token"
        )
    if pooling_block_index(model.config) is not None:
        return  # already there (a package's model reloaded)
    pooler = getattr(model.base_model, "pooler", None)
    if not isinstance(pooler, nn.Module) or not isinstance(getattr(pooler, "dense", None), nn.Linear):
        raise PoolingError("model.pooling = 'mean' needs a model with its pooler (add_pooling_layer)")
    blocks = transformer_blocks(model)
    template = blocks[-1]
    block = type(template)(model.config, layer_idx=len(blocks)) if _takes_layer_idx(template) \
        else type(template)(model.config)
    block.to(dtype=next(template.parameters()).dtype)
    hidden = model.config.hidden_size
    eye = torch.eye(hidden)
    for name, param in block.named_parameters():
        param.zero_()
        if name.endswith("LayerNorm.weight"):
            param.fill_(1.0)
    _linear(block, "attention.self.value").weight.copy_(eye)
    _linear(block, "attention.output.dense").weight.copy_(SCALE * eye)
    dense = _linear(pooler, "dense")
    dense.weight.copy_(POOLER_SCALE * eye)
    dense.bias.zero_()
    block.requires_grad_(False)
    blocks.append(block)
    index = len(blocks) - 1
    set_num_blocks(model.config, index + 1)
    setattr(model.config, CONFIG_KEY, index)


def _linear(module: nn.Module, path: str) -> nn.Linear:
    found = module.get_submodule(path)
    if not isinstance(found, nn.Linear):
        raise PoolingError(f"expected a Linear layer at {path}, found {type(found).__name__}")
    return found


def _takes_layer_idx(block: nn.Module) -> bool:
    return "layer_idx" in inspect.signature(type(block).__init__).parameters
