"""Profiles for planning without hardware: per-unit times of known device kinds, scaled to any catalog model.

Provenance of every number (also written into each profile's "provenance"):
- Jetson Orin NX 16 GB, Jetson AGX Orin 32 GB, RTX 3090 24 GB: per-unit decode times of Llama-2-7B in fp32 and
  usable memory from docs/data/llama2_7b_fp32_edge_profile.json (figures of the unofficial
  EdgeShard-remastered DP scripts, not the paper's tables), copied into EDGE_7B_FP32 below.
- H200: per-layer decode and prefill of Llama-2 7B/13B/70B in fp16/fp32 measured on one H200 (PyTorch 2.11,
  docs/data/h200_llama2_layer_costs.json), copied into H200 below; memory 139 GiB usable (device tool).
Scaling to other models and dtypes: decode is memory-bound, so a unit's decode time scales with its weight
bytes relative to Llama-2-7B fp32 (the same unit type). Prefill is compute-bound: per token it is the unit's
matmul FLOPs over PREFILL_EFFICIENCY x the vendor's peak FLOP rate (PEAK_TFLOPS), but never below the H200-like
floor of decode / 64 tokens.
"""

from __future__ import annotations

from edgeshard.config.catalog import ModelSpec, canonical_dtype, dtype_bytes, get
from edgeshard.config.errors import ConfigError
from edgeshard.config.profile import DeviceCosts, Profile
from edgeshard.config.testbed import GIB, Testbed

# ms per token, Llama-2-7B fp32 (llama2_7b_fp32_edge_profile.json): embedding, one decoder layer, norm + lm_head
EDGE_7B_FP32 = {
    "jetson-orin-nx-16gb": {"memory_gib": 14, "embedding_ms": 0.476, "layer_ms": 6.019, "head_ms": 0.594 + 4.888},
    "jetson-agx-orin-32gb": {"memory_gib": 29, "embedding_ms": 0.627, "layer_ms": 5.277, "head_ms": 0.885 + 3.597},
    "rtx-3090-24gb": {"memory_gib": 22, "embedding_ms": 0.077, "layer_ms": 0.792, "head_ms": 0.201 + 0.447},
}
# Vendor peak dense FP32 / FP16 TFLOP/s (NVIDIA datasheets: Orin NX 16GB 1024 CUDA cores at 918 MHz; AGX Orin
# 32GB 1792 cores at 930 MHz; RTX 3090 35.6 FP32, 71 FP16 tensor with FP32 accumulate).
PEAK_TFLOPS = {
    "jetson-orin-nx-16gb": {"float32": 1.88, "float16": 3.76},
    "jetson-agx-orin-32gb": {"float32": 3.33, "float16": 6.66},
    "rtx-3090-24gb": {"float32": 35.6, "float16": 71.0},
}
PREFILL_EFFICIENCY = 0.5  # assumed fraction of peak reached by eager prefill matmuls
# H200, seconds (h200_llama2_layer_costs.json): (model, dtype) -> layer decode, layer prefill per token
# (512-token prefill / 512), embedding decode, head decode.
H200 = {
    ("llama2-7b", "float16"): (0.0006689933013916016, 0.0007354879856109619 / 512, 1.966976046562195e-05, 0.00010682239532470703),
    ("llama2-7b", "float32"): (0.00070587646484375, 0.004502140808105469 / 512, 2.124608039855957e-05, 0.000154334716796875),
    ("llama2-13b", "float16"): (0.0009313664245605469, 0.0008792320251464844 / 512, 2.7888638973236082e-05, 0.00010742143630981445),
    ("llama2-13b", "float32"): (0.0009637344360351563, 0.0070297821044921875 / 512, 2.2010879516601565e-05, 0.00018580543518066406),
    ("llama2-70b", "float16"): (0.0006790528106689453, 0.0015245120048522948 / 512, 1.405311942100525e-05, 0.00015566271781921386),
    ("llama2-70b", "float32"): (0.0014575814819335936, 0.019852134704589845 / 512, 2.0817921161651613e-05, 0.000287391357421875),
}
H200_MEMORY_GIB = 139
KINDS = tuple(EDGE_7B_FP32) + ("h200",)
PREFILL_FLOOR_TOKENS = 64


def kind_memory_gib(kind: str) -> float:
    if kind == "h200":
        return H200_MEMORY_GIB
    return EDGE_7B_FP32[kind]["memory_gib"]


def unit_costs(kind: str, model: ModelSpec, dtype: str) -> tuple[list[float], list[float]]:
    """(decode_s, prefill_s_per_token) per unit of `model` in `dtype` on a device of `kind`."""
    dtype = canonical_dtype(dtype)
    ref = get("llama2-7b")
    ref_b = dtype_bytes("float32")
    b = dtype_bytes(dtype)
    n = model.n_units
    if kind == "h200":
        key = (model.name, dtype if dtype in ("float16", "float32") else "float16")
        if key in H200:
            layer, pre_layer, emb, head = H200[key]
            scale_l = scale_e = scale_h = 1.0
        else:  # scale the 7B measurement of the same dtype by weight bytes (decode) and FLOPs (prefill)
            layer, pre_layer, emb, head = H200[("llama2-7b", key[1])]
            scale_l = model.layer_params() / ref.layer_params()
            scale_e = model.hidden / ref.hidden
            scale_h = model.unit_params(n - 1) / ref.unit_params(ref.n_units - 1)
        decode = [emb * scale_e] + [layer * scale_l] * model.layers + [head * scale_h]
        prefill = [emb * scale_e / PREFILL_FLOOR_TOKENS] + [pre_layer * scale_l] * model.layers + \
                  [max(head * scale_h / PREFILL_FLOOR_TOKENS, pre_layer * scale_h)]
        return decode, prefill
    if kind not in EDGE_7B_FP32:
        raise ConfigError("kind", f"{kind!r} is not a known device kind", f"use one of {', '.join(KINDS)}")
    e = EDGE_7B_FP32[kind]
    byte_ratio = b / ref_b
    decode = [e["embedding_ms"] / 1000 * (model.hidden / ref.hidden) * byte_ratio]
    decode += [e["layer_ms"] / 1000 * model.layer_params() / ref.layer_params() * byte_ratio] * model.layers
    decode += [e["head_ms"] / 1000 * model.unit_params(n - 1) / ref.unit_params(ref.n_units - 1) * byte_ratio]
    peak = PEAK_TFLOPS[kind]["float32" if dtype == "float32" else "float16"] * 1e12 * PREFILL_EFFICIENCY
    prefill = [max(model.unit_flops_per_token(u) / peak, decode[u] / PREFILL_FLOOR_TOKENS) for u in range(n)]
    return decode, prefill


def synthetic_profile(testbed: Testbed, model: str, dtype: str = "float32") -> Profile:
    """A profile for every device of the testbed from its `kind`, with provenance."""
    spec = get(model)
    dtype = canonical_dtype(dtype)
    devices = {}
    for d in testbed.devices:
        if not d.kind:
            raise ConfigError(f"{testbed.path or testbed.name}: device {d.name!r}", "has no kind for a synthetic profile",
                              f"add kind = one of {', '.join(KINDS)}")
        if d.kind not in KINDS:
            raise ConfigError(f"{testbed.path or testbed.name}: device {d.name!r}", f"kind = {d.kind!r} is not known",
                              f"use one of {', '.join(KINDS)}")
        dec, pre = unit_costs(d.kind, spec, dtype)
        devices[d.name] = DeviceCosts(tuple(dec), tuple(pre), 512, int(kind_memory_gib(d.kind) * GIB))
    prov = {
        "method": "synthetic",
        "model_source": spec.source,
        "edge_kinds": "per-unit decode of Llama-2-7B fp32 from docs/data/llama2_7b_fp32_edge_profile.json "
                      "(EdgeShard-remastered DP scripts, not the paper), scaled by weight bytes",
        "h200": "docs/data/h200_llama2_layer_costs.json (one H200, PyTorch 2.11)",
        "prefill": f"unit FLOPs / ({PREFILL_EFFICIENCY} x vendor peak), at least decode / {PREFILL_FLOOR_TOKENS}",
        "kinds": {d.name: d.kind for d in testbed.devices},
    }
    return Profile(model, dtype, spec.units(dtype), devices, (), prov)
