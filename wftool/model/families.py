"""What wft knows about each supported model family, one table entry per family.

Module names, where SubLN goes, and whether a converted model of that family can be written
to llama.cpp's `bitnet` (paper SubLN) or `llama` (no sub-norms) GGUF architecture all live
here, so the rest of the code never branches on a family name.
"""

from __future__ import annotations

from dataclasses import dataclass

from wftool.errors import WftError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GGUF_BLOCK = 256  # TQ1_0 / TQ2_0 row lengths must be multiples of this
# The sub-norm placement each llama.cpp architecture computes: `bitnet` applies the paper's
# two SubLN norms, `llama` none. Per-projection norms (`all`) fit neither.
GGUF_ARCH_SUB_NORM = {"bitnet": "paper", "llama": "none"}


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
            bitnet_gguf_blocker=(
                "QK-norm (q_norm/k_norm) has no slot in the bitnet graph; "
                "serve Qwen3 students with `wft serve --backend torch`"
            ),
            llama_gguf_blocker=(
                "QK-norm (q_norm/k_norm) has no slot in the llama graph; "
                "serve Qwen3 students with `wft serve --backend torch`"
            ),
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


def gguf_structure_blockers(family: Family, config, sub_norm: str, arch: str) -> list[str]:
    """Reasons the model's structure (not its widths) differs from llama.cpp's `arch` graph."""
    reasons = []
    blocker = family.bitnet_gguf_blocker if arch == "bitnet" else family.llama_gguf_blocker
    if blocker:
        reasons.append(blocker)
    if sub_norm != GGUF_ARCH_SUB_NORM[arch]:
        reasons.append(f"sub_norm placement '{sub_norm}' ({arch} needs "
                       f"'{GGUF_ARCH_SUB_NORM[arch]}')")
    if arch == "bitnet" and not getattr(config, "tie_word_embeddings", False):
        reasons.append("lm_head is not tied to the embeddings (bitnet has no output tensor)")
    if getattr(config, "hidden_act", "silu") != "silu":
        reasons.append(f"activation '{config.hidden_act}' ({arch} hard-codes SiLU)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        reasons.append("n_heads * head_dim != hidden_size")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        reasons.append(f"RoPE scaling '{rope_type}' is not written to the GGUF yet")
    return reasons


def gguf_arch_for(sub_norm: str) -> str:
    """The llama.cpp architecture a student converted with `sub_norm` exports to (`bitnet`
    for placements that fit none, so its reasons are the ones reported)."""
    return next((arch for arch, s in GGUF_ARCH_SUB_NORM.items() if s == sub_norm), "bitnet")


def bitnet_gguf_blockers(family: Family, config, sub_norm: str,
                         arch: str = "bitnet") -> list[str]:
    """Reasons a converted model cannot be written exactly to llama.cpp's `arch` (default
    `bitnet`) as TQ1_0/TQ2_0 (the structure, plus widths that are not whole TQ blocks)."""
    reasons = gguf_structure_blockers(family, config, sub_norm, arch)
    for name, width in (
        ("hidden_size", config.hidden_size),
        ("intermediate_size", config.intermediate_size),
    ):
        if width % GGUF_BLOCK:
            reasons.append(f"{name} {width} is not a multiple of {GGUF_BLOCK} (TQ1_0/TQ2_0 rows)")
    return reasons
