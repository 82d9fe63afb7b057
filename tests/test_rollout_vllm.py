"""The vLLM generator: our mapping of vLLM's outputs (runs everywhere, on stand-in objects with vLLM's
attribute names), our glue around `vllm.LLM` (a stand-in module), and the real engine (CUDA + vLLM only)."""

import copy
import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout import GENERATORS, SamplingConfig
from alignkit.rollout.base import row_seed
from alignkit.rollout.vllm import (
    LAUNCHER_ENV,
    GroupEngine,
    VLLMGenerator,
    _to_completion,
    _torch_dtype,
    full_parameters,
    own_share,
    parallel_options,
    tensor_parallel_groups,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_engine = pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
EOS = 3


def request_output(token_ids, text="", finish_reason="stop", stop_reason=None, logprobs=None):
    """A stand-in for vllm.RequestOutput with one CompletionOutput (logprobs: one dict per token)."""
    if logprobs is None:
        logprobs = [{t: types.SimpleNamespace(logprob=-0.5 - i)} for i, t in enumerate(token_ids)]
    out = types.SimpleNamespace(index=0, text=text, token_ids=tuple(token_ids), logprobs=logprobs,
                                finish_reason=finish_reason, stop_reason=stop_reason, cumulative_logprob=None)
    return types.SimpleNamespace(request_id="0", prompt_token_ids=[1], outputs=[out], finished=True)


# --- mapping vLLM's outputs -------------------------------------------------------------------------

def test_eos_keeps_the_eos_token_and_maps_to_eos():
    c = _to_completion(request_output([10, 11, EOS], text="ab"), [5, 6], eos_ids=[EOS])
    assert (c.token_ids, c.text, c.finish_reason, c.prompt_ids) == ([10, 11, EOS], "ab", "eos", [5, 6])
    assert c.logprobs == [-0.5, -1.5, -2.5]


def test_a_stop_token_id_is_an_eos():
    # generation_config.json's extra EOS ids reach vLLM as stop_token_ids: stop_reason is the id
    c = _to_completion(request_output([10, 7], text="a", stop_reason=7), [5], eos_ids=[EOS, 7])
    assert c.finish_reason == "eos" and c.token_ids == [10, 7]


def test_a_stop_string_is_kept_in_the_text():
    # vLLM cuts its text before the stop string; alignkit's text ends with it
    c = _to_completion(request_output([10, 11, 12], text="ab", stop_reason="c\n"), [5], eos_ids=[EOS])
    assert (c.finish_reason, c.text, c.token_ids) == ("stop", "abc\n", [10, 11, 12])


def test_length():
    c = _to_completion(request_output([10, 11], text="ab", finish_reason="length"), [5], eos_ids=[EOS])
    assert (c.finish_reason, c.text) == ("length", "ab")


def test_an_eos_as_the_last_allowed_token_is_an_eos():
    # older vLLM checks the length limit before EOS
    c = _to_completion(request_output([10, EOS], text="a", finish_reason="length"), [5], eos_ids=[EOS])
    assert c.finish_reason == "eos"


def test_logprob_of_the_sampled_token_is_picked_from_the_returned_ones():
    # logprobs=0 returns the sampled token, plus any top tokens: only the sampled one is ours
    steps = [{10: types.SimpleNamespace(logprob=-0.25), 11: types.SimpleNamespace(logprob=-0.1)},
             {12: types.SimpleNamespace(logprob=-3.0), 10: types.SimpleNamespace(logprob=-0.01)}]
    c = _to_completion(request_output([10, 12], logprobs=steps, finish_reason="length"), [5])
    assert c.logprobs == [-0.25, -3.0] and len(c) == 2


def test_missing_logprobs_and_aborted_requests_raise():
    with pytest.raises(RuntimeError, match="log-prob"):
        _to_completion(request_output([10, 11], logprobs=[{10: types.SimpleNamespace(logprob=-1.0)}]), [5])
    no_logprobs = request_output([10], finish_reason="length")
    no_logprobs.outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="log-prob"):
        _to_completion(no_logprobs, [5])
    with pytest.raises(RuntimeError, match="abort"):
        _to_completion(request_output([10], finish_reason="abort"), [5])


def test_row_seeds_are_distinct_and_stable():
    seeds = [row_seed(7, row) for row in range(100)]
    assert len(set(seeds)) == 100 and seeds == [row_seed(7, row) for row in range(100)]
    assert row_seed(8, 0) != row_seed(7, 0) and all(0 <= s < 2**32 for s in seeds)
    assert row_seed(-1, 0) == row_seed(2**64 - 1, 0)


# --- weights for the engine --------------------------------------------------------------------------

def test_full_parameters_of_a_plain_model_are_its_state_dict():
    model = tiny_model()
    weights = dict(full_parameters(model))
    state = model.state_dict()
    assert list(weights) == list(state) and all(torch.equal(weights[k], state[k]) for k in state)
    cast = dict(full_parameters(model, torch.bfloat16))
    assert list(cast) == list(state) and all(torch.equal(cast[k], state[k].to(torch.bfloat16)) for k in state)


def test_full_parameters_is_lazy_and_yields_without_copying():
    model = tiny_model()
    weights = full_parameters(model)
    name, first = next(weights)
    assert name == "model.embed_tokens.weight" and first.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_engine_dtype_of_the_dtype_option():
    assert _torch_dtype("bfloat16") is torch.bfloat16 and _torch_dtype("half") is torch.float16
    assert _torch_dtype("float") is torch.float32 and _torch_dtype(torch.float16) is torch.float16
    assert _torch_dtype("auto") is None


def lora_model(**options):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_full_parameters_of_a_lora_model_are_the_merged_weights_and_leave_it_as_it_was():
    model = lora_model(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(full_parameters(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"],
                              model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_full_parameters_of_an_already_merged_lora_model_add_nothing_twice():
    model = lora_model()
    model.merge_adapter()
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    weights = dict(full_parameters(model))
    for name, value in merged.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)


def test_dora_is_refused_with_a_clear_error():
    model = lora_model(use_dora=True)
    with pytest.raises(ValueError, match="plain LoRA"):
        dict(full_parameters(model))


# --- registry and the missing-vLLM error --------------------------------------------------------------

def test_registered_without_importing_vllm():
    entry = GENERATORS.get("vllm")
    assert "vLLM" in entry.summary and entry.takes_any_keyword()
    params = inspect.signature(VLLMGenerator).parameters.values()
    assert entry.defaults() == {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    code = ("import sys, alignkit, alignkit.rollout as r; r.GENERATORS.get('vllm'); "
            "assert 'vllm' not in sys.modules and 'alignkit.rollout.vllm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_constructor_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")   # the constructor sets it; restore it afterwards
    for build in (lambda: VLLMGenerator("some/model", tiny_tokenizer()),
                  lambda: GENERATORS.call("vllm", "some/model", tiny_tokenizer(), dtype="float32")):
        with pytest.raises(RuntimeError) as err:
            build()
        assert 'pip install "alignkit[vllm]"' in str(err.value) and '"transformers" generator' in str(err.value)


# --- the glue around vllm.LLM, on a stand-in vllm module ---------------------------------------------

class FakeLLM:
    """Records what VLLMGenerator asks of vllm.LLM; runs collective_rpc callables on a stand-in worker."""

    def __init__(self, model, **options):
        self.model_path, self.options, self.loaded, self.requests, self.resets = model, options, {}, [], 0
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(options["tokenizer"])
        runner = types.SimpleNamespace(load_weights=lambda weights: self.loaded.update(weights))
        self.worker = types.SimpleNamespace(get_model=lambda: runner)

    def collective_rpc(self, method, args=()):
        return [method(self.worker, *args)]

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling_params, use_tqdm):
        self.requests.append((prompts, sampling_params))
        return [request_output([10, EOS], text="x") for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.TokensPrompt = FakeLLM, dict
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return module


def test_a_model_in_memory_starts_from_its_config_and_is_synced_in(fake_vllm):
    model, tok = tiny_model(), tiny_tokenizer()
    gen = VLLMGenerator(model, tok, enforce_eager=True)
    llm = gen.llm
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.options["load_format"] == "dummy" and llm.options["logprobs_mode"] == "processed_logprobs"
    assert llm.options["enforce_eager"] is True and llm.options["dtype"] == "bfloat16"
    assert "max_model_len" not in llm.options and "distributed_executor_backend" not in llm.options
    assert llm.options["tensor_parallel_size"] == 1 and gen.llm is llm   # one engine, not a GroupEngine
    config = json.loads(Path(llm.model_path, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 128
    assert llm.options["tokenizer"] == llm.model_path and gen.eos_ids == [EOS]
    state = model.state_dict()   # streamed in cast to the engine's dtype
    assert set(llm.loaded) == set(state) and all(torch.equal(llm.loaded[k], state[k].bfloat16()) for k in state)
    assert llm.resets == 1


def test_a_checkpoint_path_loads_its_own_weights(fake_vllm, tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    gen = VLLMGenerator(str(tmp_path), tok, max_model_len=64)
    assert gen.llm.model_path == str(tmp_path) and gen.llm.options["load_format"] == "auto"
    assert gen.llm.options["max_model_len"] == 64 and not gen.llm.loaded and gen.eos_ids == [EOS]


def test_sampling_params_per_row(fake_vllm):
    gen = VLLMGenerator(tiny_model(), tiny_tokenizer())
    prompts = [[4, 5], [6]]
    out = gen.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=0.7, stop=("\n",)), seed=3)
    assert [c.finish_reason for c in out] == ["eos", "eos"] and [c.prompt_ids for c in out] == prompts
    sent, params = gen.llm.requests[-1]
    assert sent == [{"prompt_token_ids": [4, 5]}, {"prompt_token_ids": [6]}]
    assert [p.seed for p in params] == [row_seed(3, 0), row_seed(3, 1)]
    gen.generate(prompts, SamplingConfig(temperature=0.7), seed=[11, 12])
    assert [p.seed for p in gen.llm.requests[-1][1]] == [11, 12]
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(prompts, SamplingConfig(), seed=[11])
    p = params[0]
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.logprobs) == (1, 0.7, 1.0, -1, 8, ["\n"], 0)
    gen.generate(prompts, SamplingConfig(temperature=0), seed=3)
    assert all(p.seed is None and p.stop is None for p in gen.llm.requests[-1][1])
    with pytest.warns(UserWarning, match="renormalised"):
        gen.generate(prompts, SamplingConfig(temperature=1.0, top_k=5), seed=3)
    assert gen.llm.requests[-1][1][0].top_k == 5
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], SamplingConfig(), seed=0)
    assert gen.generate([], SamplingConfig(), seed=0) == []


def test_options_it_owns_are_refused(fake_vllm):
    for bad in ({"logprobs_mode": "raw_logprobs"}, {"load_format": "auto"},
                {"distributed_executor_backend": "mp"}):
        with pytest.raises(ValueError, match="sets .* itself"):
            VLLMGenerator(tiny_model(), tiny_tokenizer(), **bad)


# --- tensor parallelism under torchrun: checks, the group's joint batch, and the engine options -------

@pytest.mark.parametrize(("options", "message"), [
    ({"tensor_parallel_size": 2}, "needs torch.distributed: launch one process per GPU with torchrun"),
    ({"tensor_parallel_size": 0}, "must be a positive int"),
    ({"tensor_parallel_size": 1.0}, "must be a positive int"),
    ({"pipeline_parallel_size": 2}, "tensor parallelism only: pipeline_parallel_size must be 1"),
    ({"data_parallel_size": 2}, "tensor parallelism only: data_parallel_size must be 1"),
])
def test_tensor_parallel_arguments_are_checked_before_vllm_is_needed(options, message):
    with pytest.raises(ValueError, match=message):   # vLLM is not importable here, or not used
        VLLMGenerator(tiny_model(), tiny_tokenizer(), **options)


def test_tensor_parallel_groups_are_consecutive_ranks():
    assert tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]] and tensor_parallel_groups(3, 1) == [[0], [1], [2]]
    assert tensor_parallel_groups(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="not a multiple"):
        tensor_parallel_groups(6, 4)


def test_each_rank_keeps_its_share_of_the_joint_batch():
    outputs = ["a0", "a1", "c0", "c1", "c2"]   # ranks a, b (nothing to generate), c, in rank order
    counts = [2, 0, 3]
    assert [own_share(outputs, counts, i) for i in range(3)] == [["a0", "a1"], [], ["c0", "c1", "c2"]]
    assert own_share([], [0, 0], 1) == []
    with pytest.raises(RuntimeError, match="4 outputs for a joint batch of 5"):
        own_share(outputs[:4], counts, 0)


@pytest.fixture
def one_rank_world(tmp_path, monkeypatch):
    """torch.distributed initialised as a torchrun world of one (gloo), torn down afterwards."""
    for name, value in zip(LAUNCHER_ENV, ("0", "0", "127.0.0.1", str(free_port())), strict=True):
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_under_torchrun_the_engine_uses_the_external_launcher(fake_vllm, one_rank_world):
    gen = VLLMGenerator(tiny_model(), tiny_tokenizer(), dtype="float32", seed=4)
    options = gen.llm.options
    assert options["distributed_executor_backend"] == "external_launcher" and options["tensor_parallel_size"] == 1
    assert options["seed"] == 4 and not isinstance(gen.llm, GroupEngine)   # a group of one gathers nothing
    with pytest.raises(ValueError, match="world size 1 is not a multiple of tensor_parallel_size=2"):
        VLLMGenerator(tiny_model(), tiny_tokenizer(), tensor_parallel_size=2)


def test_the_external_launcher_needs_torchruns_environment(one_rank_world, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match="missing: LOCAL_RANK"):
        parallel_options(1, {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = Path(__file__).parent / "dist_workers" / "vllm_sync_worker.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_ranks_stream_fsdp2_weights_one_tensor_at_a_time_and_share_a_tensor_parallel_engine():
    """tests/dist_workers/vllm_sync_worker.py under torchrun, 2 ranks (gloo, CPU), a stand-in vLLM: full
    tensors of a tiny model sharded per decoder layer equal the unsharded ones on both ranks (LoRA merged
    too), at most one gathered tensor alive at a time; and a tensor-parallel pair of ranks builds its
    engine with the external launcher, submits one joint batch and keeps its own share."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), str(WORKER)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    log = f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    assert run.returncode == 0, log
    assert "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout, log


# --- the real engine ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model().cuda().eval(), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    gen = VLLMGenerator(str(path), tok, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True,
                        max_model_len=256)
    yield gen, model, tok
    del gen.llm
    torch.cuda.empty_cache()


PROMPTS = ["Hello, world", "2 + 2 =", "The quick brown fox", "a"]


def hf_greedy(model, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=0, eos_token_id=EOS)
    return out[0, len(prompt_ids):].tolist()


def forward_logprobs(model, prompt_ids, token_ids, temperature=1.0):
    ids = torch.tensor([prompt_ids + token_ids], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(token_ids, device="cuda")[:, None])[:, 0].tolist()


@needs_engine
def test_greedy_matches_transformers_and_logprobs_match_a_forward_pass(engine):
    gen, model, tok = engine
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    out = gen.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0), seed=0)
    for prompt, c in zip(prompts, out, strict=True):
        assert c.token_ids == hf_greedy(model, prompt, 16)
        assert c.finish_reason == ("eos" if c.token_ids[-1] == EOS else "length")
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        torch.testing.assert_close(c.logprobs, forward_logprobs(model, prompt, c.token_ids), rtol=0, atol=1e-3)


@needs_engine
def test_sampled_logprobs_are_temperature_scaled_and_seeds_reproduce(engine):
    gen, model, tok = engine
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.7)
    out = gen.generate(prompts, sampling, seed=1)
    for prompt, c in zip(prompts, out, strict=True):
        expected = forward_logprobs(model, prompt, c.token_ids, temperature=0.7)
        torch.testing.assert_close(c.logprobs, expected, rtol=0, atol=1e-3)
    assert [c.token_ids for c in gen.generate(prompts, sampling, seed=1)] == [c.token_ids for c in out]
    assert [c.token_ids for c in gen.generate(prompts, sampling, seed=2)] != [c.token_ids for c in out]


@needs_engine
def test_stop_strings_end_the_completion(engine):
    gen, model, tok = engine
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    free = gen.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0), seed=0)
    row = next(i for i, c in enumerate(free) if len(c.text) >= 6)
    stop = free[row].text[3:5]   # two characters that completion produces
    out = gen.generate([prompts[row]], SamplingConfig(max_new_tokens=16, temperature=0, stop=(stop,)), seed=0)[0]
    assert out.finish_reason == "stop" and out.text.endswith(stop) and stop not in out.text[:-len(stop)]
    assert free[row].token_ids[:len(out.token_ids)] == out.token_ids


@needs_engine
def test_sync_weights_changes_the_outputs(engine):
    gen, model, tok = engine
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0)
    before = gen.generate(prompts, greedy, seed=0)
    perturbed = copy.deepcopy(model)
    noise = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=noise, device="cuda") * 0.5)
    try:
        gen.sync_weights(perturbed)
        after = gen.generate(prompts, greedy, seed=0)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        for prompt, c in zip(prompts, after, strict=True):
            assert c.token_ids == hf_greedy(perturbed, prompt, 16)
            torch.testing.assert_close(c.logprobs, forward_logprobs(perturbed, prompt, c.token_ids), rtol=0, atol=1e-3)
    finally:
        gen.sync_weights(model)
    assert [c.token_ids for c in gen.generate(prompts, greedy, seed=0)] == [c.token_ids for c in before]
