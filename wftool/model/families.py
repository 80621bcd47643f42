"""What wft knows about each supported model family, one table entry per family.

Module names, where SubLN goes, the GGUF tensor names, and what keeps a family from
llama.cpp's `bitnet` (paper SubLN) or `llama` (no sub-norms) graph all live here, so the rest
of the code never branches on a family name. Checks that hold for every family (tied
embeddings, SiLU, row lengths) are in wftool/export/gguf_target.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from wftool.errors import WftError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SubNormSlot:
    """An RMSNorm at ``parent.name`` that normalises the input of ``parent.projection``."""

    parent: str
    name: str
    projection: str


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values
    examples: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_projections: tuple[str, ...] = ATTENTION_PROJECTIONS
    mlp_projections: tuple[str, ...] = MLP_PROJECTIONS
    # The paper's placement: before the attention output and the FFN down projection,
    # at the names llama.cpp's `bitnet` architecture reads.
    sub_norms: tuple[SubNormSlot, ...] = (
        SubNormSlot("self_attn", "attn_sub_norm", "o_proj"),
        SubNormSlot("mlp", "ffn_sub_norm", "down_proj"),
    )
    # Why no upstream llama.cpp architecture with sub-norms can hold this family, if so.
    bitnet_gguf_blocker: str | None = None
    # Why llama.cpp's `llama` architecture (students without sub-norms) cannot, if so.
    llama_gguf_blocker: str | None = None
    # What to do instead when one of the two above applies.
    gguf_fix: str = "serve the student with `wft serve --backend torch`"
    # Per-layer module path -> llama.cpp `bitnet` tensor name (blk.N.<name>).
    bitnet_layer_tensors: tuple[tuple[str, str], ...] = (
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.attn_sub_norm", "attn_sub_norm"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.ffn_sub_norm", "ffn_sub_norm"),
        ("mlp.down_proj", "ffn_down"),
    )
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"

    def gguf_layer_tensors(self, arch: str) -> tuple[tuple[str, str], ...]:
        """Per-layer (module path, tensor name) of a GGUF architecture: `bitnet` has the
        sub-norms, `llama` is the same list without them."""
        if arch == "bitnet":
            return self.bitnet_layer_tensors
        if arch == "llama":
            sub_norms = {f"{slot.parent}.{slot.name}" for slot in self.sub_norms}
            return tuple(t for t in self.bitnet_layer_tensors if t[0] not in sub_norms)
        raise ValueError(f"no GGUF tensor table for architecture {arch!r}")

    def projections(self) -> tuple[tuple[str, str], ...]:
        """(block attribute, projection name) for every projection BitLinear replaces."""
        return tuple((self.attention, p) for p in self.attention_projections) + tuple(
            (self.mlp, p) for p in self.mlp_projections
        )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), "SmolLM2, Llama 3"),
        Family("mistral", ("mistral",), "Mistral 7B"),
        Family(
            "qwen2",
            ("qwen2",),
            "Qwen2, Qwen2.5",
            bitnet_gguf_blocker="Q/K/V projections have biases, which the bitnet graph lacks",
            llama_gguf_blocker=("Q/K/V projections have biases; llama.cpp runs Qwen2 as its "
                                "own `qwen2` architecture, which wft does not write"),
        ),
        Family(
            "qwen3",
            ("qwen3",),
            "Qwen3",
            bitnet_gguf_blocker="QK-norm (q_norm/k_norm) has no slot in the bitnet graph",
            llama_gguf_blocker="QK-norm (q_norm/k_norm) has no slot in the llama graph",
            gguf_fix=("serve Qwen3 students with `wft serve --backend torch` (ternary Qwen3 "
                      "GGUFs run only in Microsoft's patched BitNet fork)"),
        ),
    )
}


def supported_families_text() -> str:
    return ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES.values())


def family_for_model_type(model_type: str) -> Family:
    """The family whose table covers a Hugging Face `model_type`, or a clear error."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise WftError(
        f"model family '{model_type}' is not supported; supported: {supported_families_text()}"
    )


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise WftError(
            f"unknown family '{name}'; supported: {supported_families_text()}"
        ) from None


def head_dim(config) -> int:
    """Width of one attention head: `config.head_dim` where the family sets it (Qwen3),
    hidden_size / num_attention_heads otherwise."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
