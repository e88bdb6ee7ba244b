"""Model catalog: architectures and exact unit sizes (weights, activation and KV bytes per token). Stdlib only.

Units: 0 = token embedding, 1..L = decoder layers, L+1 = final RMSNorm + lm_head.
Sizes count every parameter tensor of the unit; the lm_head is counted in the head unit even when tied to the
embedding (SmolLM2): when the head runs on another device it needs its own copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeshard.config.errors import ConfigError
from edgeshard.config.profile import Unit

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    source: str = ""  # where the architecture numbers come from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_units(self) -> int:
        return self.layers + 2

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * self.intermediate  # gate, up, down
        return attn + mlp + 2 * h  # + input and post-attention RMSNorm

    def unit_params(self, u: int) -> int:
        if u == 0:
            return self.vocab * self.hidden
        if u == self.layers + 1:
            return self.hidden + self.vocab * self.hidden
        return self.layer_params()

    def units(self, dtype: str = "float32") -> tuple[Unit, ...]:
        b = dtype_bytes(dtype)
        kv = 2 * self.kv_heads * self.head_dim * b  # K and V per token per layer
        out = [Unit("embedding", self.unit_params(0) * b, self.hidden * b, 0)]
        out += [Unit(f"layer{i}", self.layer_params() * b, self.hidden * b, kv) for i in range(self.layers)]
        out.append(Unit("head", self.unit_params(self.layers + 1) * b, self.vocab * b, 0))
        return tuple(out)

    def unit_flops_per_token(self, u: int) -> float:
        """Matmul FLOPs of one token through unit u (2 per multiply-add); the embedding is a lookup (0)."""
        return 0.0 if u == 0 else 2.0 * self.unit_params(u)


def dtype_bytes(dtype: str) -> int:
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise ConfigError("dtype", f"{dtype!r} is not supported", f"use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def canonical_dtype(dtype: str) -> str:
    dtype_bytes(dtype)
    return DTYPE_ALIASES.get(dtype, dtype)


_HF = "Hugging Face config.json of the model"
MODELS = {
    "llama2-7b": ModelSpec("llama2-7b", 4096, 32, 32, 32, 11008, 32000, source=f"{_HF} meta-llama/Llama-2-7b-hf"),
    "llama2-13b": ModelSpec("llama2-13b", 5120, 40, 40, 40, 13824, 32000, source=f"{_HF} meta-llama/Llama-2-13b-hf"),
    "llama2-70b": ModelSpec("llama2-70b", 8192, 80, 64, 8, 28672, 32000, source=f"{_HF} meta-llama/Llama-2-70b-hf"),
    "smollm2-135m": ModelSpec("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied_embeddings=True,
                              rope_theta=100000.0, max_position=8192,
                              source=f"{_HF} HuggingFaceTB/SmolLM2-135M-Instruct (GGUF metadata agrees)"),
    # A tiny random Llama for fast tests; vocab of SmolLM2 so it shares that tokenizer.
    "tiny-llama": ModelSpec("tiny-llama", 64, 4, 4, 2, 176, 49152, rope_theta=10000.0, max_position=2048,
                            source="edgeshard test config"),
}


def get(name: str) -> ModelSpec:
    """A catalog model only (synthetic profiles need one); spec() also takes a local Hugging Face folder."""
    if name not in MODELS:
        raise ConfigError("model", f"{name!r} is not in the catalog", f"use one of {', '.join(MODELS)}")
    return spec(name)


def spec(model: str) -> ModelSpec:
    """The one lookup of a model: a catalog name, or a local Hugging Face Llama folder (its config.json, read
    as plain JSON, so this stays stdlib-only). device/model.py spec_for and run/profiler.py call this."""
    if model in MODELS:
        return MODELS[model]
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ConfigError("model", f"{model!r} is neither a known model nor a folder with a config.json",
                          f"use one of {', '.join(MODELS)} or a local Hugging Face Llama folder")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(str(path), f"cannot read the model config: {e}", "give a Hugging Face config.json",
                          file=str(path)) from None
    return _from_hf_config(cfg, str(path), model)


def _from_hf_config(cfg: dict, where: str, name: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face Llama config.json (keys as transformers' LlamaConfig writes them;
    rope_theta either top level or, in newer files, under rope_parameters)."""
    if cfg.get("model_type") != "llama":
        raise ConfigError(where, f"model_type {cfg.get('model_type')!r} is not supported",
                          "only Llama-family checkpoints (model_type 'llama') can be sharded", file=where,
                          key="model_type")
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    out = ModelSpec(
        name=name, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads, intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=cfg.get("max_position_embeddings", 2048), source=where)
    if cfg.get("head_dim") not in (None, out.head_dim):
        raise ConfigError(where, f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads",
                          "the catalog's size model assumes head_dim = hidden / heads", file=where, key="head_dim")
    return out
