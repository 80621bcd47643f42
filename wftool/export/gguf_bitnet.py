"""A wft student as a GGUF file for llama.cpp's `bitnet` architecture.

Projections are written from `ternarize(W)` (never the latent weights): their codes as TQ1_0,
TQ2_0 (block d = 1) or F16/BF16 (codes are exact there), and the per-tensor delta as an F32
`blk.N.<proj>.scale` tensor that llama.cpp multiplies into the matmul output. Embeddings and
norms stay in floating point; the tokenizer and chat template go into the metadata.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wftool.errors import WftError
from wftool.export.ternary_packing import QK_K, pack_tq1_0, pack_tq2_0
from wftool.model.families import Family, bitnet_gguf_blockers
from wftool.quant.bitlinear import BitLinear
from wftool.quant.ternary import ternarize

EXPORT_TYPES = ("tq1_0", "tq2_0", "f16", "bf16")


@dataclass
class ExportedTensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "ternary" (with a .scale tensor) or "float"


def bitnet_export_problems(model, family: Family, sub_norm: str, quant_mix: float,
                           export_type: str) -> list[str]:
    """Everything that keeps this model from an exact `bitnet` GGUF of `export_type`."""
    problems = bitnet_gguf_blockers(family, model.config, sub_norm)
    if quant_mix < 1.0:
        problems.append(f"quantization warm-up is unfinished (mix {quant_mix:.3f} < 1): the "
                        "latent weights are not yet the ternary ones the model was trained as")
    if export_type in ("tq1_0", "tq2_0"):
        for name, module in model.named_modules():
            if isinstance(module, BitLinear) and module.in_features % QK_K:
                problems.append(f"{name}.weight {tuple(module.weight.shape)}: rows of "
                                f"{module.in_features} are not a multiple of {QK_K}")
                break
    return list(dict.fromkeys(problems))


def _float_array(tensor: torch.Tensor, export_type: str) -> tuple[np.ndarray, object]:
    from gguf import GGMLQuantizationType

    data = tensor.detach().float().cpu()
    if export_type == "bf16":
        raw = data.bfloat16().view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(*data.shape[:-1], -1), GGMLQuantizationType.BF16
    return data.numpy().astype(np.float16), None


def _ternary_array(codes: torch.Tensor, export_type: str):
    from gguf import GGMLQuantizationType

    codes_np = codes.cpu().numpy()
    if export_type == "tq2_0":
        return pack_tq2_0(codes_np), GGMLQuantizationType.TQ2_0
    if export_type == "tq1_0":
        return pack_tq1_0(codes_np), GGMLQuantizationType.TQ1_0
    return _float_array(codes.float(), export_type)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_tokenizer(writer, tokenizer) -> None:
    from gguf import TokenType

    vocab_size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    types = [
        TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
        else TokenType.NORMAL
        for i in range(vocab_size)
    ]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise WftError(f"tokenizer model {model.get('type')} is not byte-level BPE; "
                       "llama.cpp's gpt2 tokenizer needs BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_bitnet_gguf(model, tokenizer, family: Family, export_type: str, output: Path,
                      name: str = "wft-student") -> list[ExportedTensor]:
    """Write `model` to `output` atomically; returns what was written. Call
    bitnet_export_problems first: this function assumes the model fits."""
    import gguf

    if export_type not in EXPORT_TYPES:
        raise ValueError(f"export type must be one of {EXPORT_TYPES}")
    config = model.config
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    file_types = {"tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
                  "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer = gguf.GGUFWriter(tmp, "bitnet")
    written: list[ExportedTensor] = []
    try:
        writer.add_name(name)
        writer.add_file_type(file_types[export_type])
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        _add_tokenizer(writer, tokenizer)

        def add_float(gguf_name: str, tensor: torch.Tensor, keep_f32: bool = False):
            if keep_f32:
                writer.add_tensor(gguf_name, tensor.detach().float().cpu().numpy())
            else:
                array, raw_dtype = _float_array(tensor, export_type if export_type == "bf16"
                                                else "f16")
                writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
            written.append(ExportedTensor(gguf_name, tuple(tensor.shape), "float"))

        add_float("token_embd.weight", model.get_submodule(family.embeddings).weight)
        for index, layer in enumerate(model.get_submodule(family.layers)):
            for module_path, short in family.bitnet_layer_tensors:
                module = layer.get_submodule(module_path)
                gguf_name = f"blk.{index}.{short}"
                if isinstance(module, BitLinear):
                    codes, delta = ternarize(module.weight)
                    array, raw_dtype = _ternary_array(codes, export_type)
                    writer.add_tensor(f"{gguf_name}.weight", array, raw_dtype=raw_dtype)
                    writer.add_tensor(f"{gguf_name}.scale",
                                      np.array([delta.item()], dtype=np.float32))
                    written.append(ExportedTensor(f"{gguf_name}.weight",
                                                  tuple(module.weight.shape), "ternary"))
                else:  # norms stay F32, as llama.cpp's converter writes them
                    add_float(f"{gguf_name}.weight", module.weight, keep_f32=True)
        add_float("output_norm.weight", model.get_submodule(family.final_norm).weight,
                  keep_f32=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return written
