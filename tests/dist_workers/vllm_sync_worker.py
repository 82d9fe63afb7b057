"""Two ranks under torchrun (gloo, CPU), started by tests/test_rollout_vllm.py: weight sync from an FSDP2
model and the request sharing of a tensor-parallel engine group, with a stand-in `vllm` module.

Every check raises on failure; each rank prints "rank R ok" at the end.
"""

import copy
import json
import sys
import types
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout import SamplingConfig
from alignkit.rollout.vllm import GroupEngine, VLLMGenerator, full_parameters

EOS = 3


class Stream:
    """A consumer of (name, tensor) pairs like vLLM's `load_weights`, but one that drops each tensor before
    asking for the next. Keeps copies, and the most yielded tensors (and their bytes) alive at one time:
    counted when a tensor arrives and whenever a DTensor is gathered (the next one being made)."""

    active = None   # the Stream being fed, for the probe on DTensor.full_tensor

    def __init__(self):
        self.names, self.copies, self.alive, self.most, self.most_bytes = [], {}, [], 0, 0

    def __call__(self, weights):
        Stream.active = self
        try:
            for name, tensor in weights:
                self.alive.append(weakref.ref(tensor))
                self.count()
                self.names.append(name)
                self.copies[name] = tensor.clone()
                del tensor
        finally:
            Stream.active = None
        return self

    def count(self, gathering: int = 0):
        """Record the yielded tensors still alive, plus `gathering` bytes about to be made (as one more)."""
        live = [ref() for ref in self.alive if ref() is not None]
        self.most = max(self.most, len(live) + (gathering > 0))
        self.most_bytes = max(self.most_bytes, sum(t.nbytes for t in live) + gathering)


def probe_gathers():
    """Make every DTensor.full_tensor() report to the Stream being fed before it gathers."""
    gather = DTensor.full_tensor

    def full_tensor(self, *args, **kwargs):
        if Stream.active is not None:
            Stream.active.count(gathering=self.numel() * self.element_size())
        return gather(self, *args, **kwargs)

    DTensor.full_tensor = full_tensor


def shard(model, layers):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    return model


def check_stream(stream, expected: dict, dtype=torch.float32, atol=0.0):
    largest = max(t.numel() for t in expected.values()) * dtype.itemsize
    assert sorted(stream.names) == sorted(expected), (stream.names, list(expected))
    for name, value in expected.items():
        assert stream.copies[name].dtype == dtype, name
        torch.testing.assert_close(stream.copies[name], value.to(dtype), rtol=0, atol=atol, msg=name)
    assert stream.most == 1 and stream.most_bytes <= largest, (stream.most, stream.most_bytes, largest)


def sharded_tiny_model():
    model = tiny_model()
    return shard(model, model.model.layers)


def check_full_parameters():
    reference = tiny_model().state_dict()
    model = sharded_tiny_model()
    stream = Stream()(full_parameters(model))
    assert stream.names == list(reference)   # the state dict's order, on every rank
    check_stream(stream, reference)
    check_stream(Stream()(full_parameters(model, torch.bfloat16)), reference, dtype=torch.bfloat16)


def check_lora():
    try:
        import peft
    except ImportError:
        return
    torch.manual_seed(0)   # LoRA's A matrices come from the global generator: the same on both ranks
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    shard(model, model.get_base_model().model.layers)
    check_stream(Stream()(full_parameters(model)), merged, atol=1e-6)


class FakeLLM:
    """A stand-in for vllm.LLM: records its options, streams weights in through `Stream`, echoes requests."""

    def __init__(self, model, **options):
        self.model_path, self.options, self.requests, self.streams = model, options, [], []
        runner = types.SimpleNamespace(load_weights=lambda weights: self.streams.append(Stream()(weights)))
        self.worker = types.SimpleNamespace(get_model=lambda: runner)

    def collective_rpc(self, method, args=()):
        return [method(self.worker, *args)]

    def get_tokenizer(self):
        return tiny_tokenizer()

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, sampling_params, use_tqdm):
        self.requests.append((prompts, sampling_params))
        return [request_output(prompt["prompt_token_ids"][0] + 10) for prompt in prompts]


def request_output(token):
    logprobs = [{token: types.SimpleNamespace(logprob=-1.0)}, {EOS: types.SimpleNamespace(logprob=-2.0)}]
    out = types.SimpleNamespace(text="x", token_ids=(token, EOS), logprobs=logprobs, finish_reason="stop",
                                stop_reason=None)
    return types.SimpleNamespace(outputs=[out])


def install_fake_vllm():
    module = types.ModuleType("vllm")
    module.LLM, module.TokensPrompt = FakeLLM, dict
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    sys.modules["vllm"] = module
    torch.cuda.is_available = lambda: True


def expect_error(build, match: str):
    try:
        build()
    except ValueError as err:
        assert match in str(err), str(err)
        return
    raise AssertionError(f"no ValueError matching {match!r}")


def check_tensor_parallel_generator(rank: int):
    reference = tiny_model().state_dict()
    model = sharded_tiny_model()
    gen = VLLMGenerator(model, tiny_tokenizer(), dtype="float32", tensor_parallel_size=2, seed=5)
    llm = gen.llm
    assert isinstance(llm, GroupEngine) and llm.index == rank
    options = llm.llm.options
    assert options["distributed_executor_backend"] == "external_launcher" and options["tensor_parallel_size"] == 2
    assert options["seed"] == 5 and options["load_format"] == "dummy"
    config = json.loads(Path(llm.llm.model_path, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"], config["architectures"]   # not FSDPLlamaForCausalLM
    (stream,) = llm.llm.streams
    check_stream(stream, reference)

    mine = [[4, 5], [6]] if rank == 0 else [[7]]
    out = gen.generate(mine, SamplingConfig(max_new_tokens=4, temperature=0.7), seed=rank)
    assert [c.prompt_ids for c in out] == mine and [c.token_ids for c in out] == [[p[0] + 10, EOS] for p in mine]
    prompts, params = llm.llm.requests[-1]
    assert prompts == [{"prompt_token_ids": p} for p in ([4, 5], [6], [7])]
    seeds = [None, None]
    dist.all_gather_object(seeds, [p.seed for p in params])
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 3, seeds   # one joint batch, each rank's own seeds

    # a rank with nothing to generate still takes part in its group's batch
    requests = [{"prompt_token_ids": [8]}] if rank == 0 else []
    alone = llm.generate(requests, [types.SimpleNamespace(seed=1)] * len(requests))
    assert len(alone) == (1 if rank == 0 else 0) and llm.llm.requests[-1][0] == [{"prompt_token_ids": [8]}]

    gen.sync_weights(model)
    check_stream(llm.llm.streams[-1], reference)

    expect_error(lambda: VLLMGenerator(model, tiny_tokenizer(), tensor_parallel_size=2, seed=rank), "one seed")
    expect_error(lambda: VLLMGenerator(model, tiny_tokenizer(), tensor_parallel_size=3), "not a multiple")


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    probe_gathers()
    check_full_parameters()
    check_lora()
    install_fake_vllm()
    check_tensor_parallel_generator(rank)
    dist.barrier()
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
