"""Writing tiny GGUF files the way llama.cpp's converter does, for tests that cannot wait for SmolLM2.

A random Llama (2 blocks unless asked) (hidden 32) with a byte-level BPE tokenizer of 259 tokens (the 256 bytes, two
merges, an end-of-text token), written with the
``gguf`` package's own writer under llama.cpp's tensor names, Q and K permuted as llama.cpp stores
them (transformers permutes them back on load). F32 tensors by default; ``quantize=True`` stores the
2-D weights as Q8_0 blocks, so the dequantizing path of transformers' loader runs too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2
VOCAB, EOS = 259, 258


def tiny_llama(seed: int = 0, layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=EOS, eos_token_id=EOS,
                         pad_token_id=EOS)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a lost norm weight would show in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotary halves interleaved per head."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]) \
        .swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    layers = model.config.num_hidden_layers
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(layers):
        for hf, gg in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                weight = _permute(weight, HEADS)
            elif gg == "attn_k":
                weight = _permute(weight, KV_HEADS)
            out[f"blk.{i}.{gg}.weight"] = weight
    return out


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, *, architecture: str = "llama",
                    quantize: bool = False) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("fedsite tiny llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    tokens = [*bytes_to_unicode().values(), "\u0120t", "he", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (VOCAB - 1) + [3])
    writer.add_token_merges(["\u0120 t", "h e"])
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(EOS)
    for name, weights in gguf_tensors(model).items():
        if quantize and weights.ndim == 2 and weights.shape[-1] % 32 == 0:
            blocks = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
