"""Sampling throughput: TransformersGenerator against a plain `model.generate` loop.

Both sample at temperature 1 (no top-k / top-p) from a ~4M-parameter Llama-style model with a 32k
vocabulary, on the same prompts (random character strings of 8 to 64 tokens) in chunks of `--batch`,
and both return per-token sampling log-probs (`model.generate` through `output_logits`, then one
log_softmax over the stacked logits). Tokens/s counts generated tokens, up to and including EOS.
Each side runs once to warm up, then `--repeats` times; the best time is reported. `--tiny` uses the
0.1M-parameter test model (vocab 128) instead.

    python benchmarks/generation.py [--batch 32] [--prompts 64] [--max-new-tokens 64] [--threads 1] [--tiny]
"""

from __future__ import annotations

import argparse
import random
import string
import time

import torch


def naive_generate(model, prompts, eos_ids, pad_id, batch: int, max_new_tokens: int) -> list[list[float]]:
    from alignkit.rollout.tokens import left_pad

    logprobs = []
    for start in range(0, len(prompts), batch):
        ids, attention = left_pad(prompts[start:start + batch], pad_id, "cpu")
        out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                             output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        picked = torch.stack(out.logits, 1).float().log_softmax(-1).gather(2, new[:, :, None]).squeeze(2)
        for row, tokens in enumerate(new.tolist()):
            length = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
            logprobs.append(picked[row, :length].tolist())
    return logprobs


def best_time(fn, repeats: int) -> tuple[float, int]:
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = sum(len(x) for x in fn())
        times.append(time.perf_counter() - started)
    return min(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the 0.1M-parameter test model (vocab 128) instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from alignkit.models import tiny_model, tiny_tokenizer
    from alignkit.rollout import SamplingConfig, TransformersGenerator

    vocab = 128 if args.tiny else 32000
    model = (tiny_model() if args.tiny else tiny_model(vocab_size=vocab, hidden_size=64, intermediate_size=256)).eval()
    tokenizer = tiny_tokenizer(vocab)
    rng = random.Random(0)
    prompts = [tokenizer.encode("".join(rng.choices(string.ascii_letters, k=rng.randint(8, 64))))
               for _ in range(args.prompts)]
    generator = TransformersGenerator(model, tokenizer, batch_size=args.batch)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{params:.1f}M parameters, vocab {vocab}; {args.prompts} prompts, batch {args.batch}, "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s)")
    with torch.inference_mode():
        naive_s, naive_tokens = best_time(lambda: naive_generate(
            model, prompts, generator.eos_ids, generator.pad_id, args.batch, args.max_new_tokens), args.repeats)
    ours_s, ours_tokens = best_time(lambda: [c.logprobs for c in generator.generate(prompts, sampling, seed=0)],
                                    args.repeats)
    print(f"model.generate loop:   {naive_tokens / naive_s:8.0f} tokens/s ({naive_tokens} tokens, {naive_s:.2f} s)")
    print(f"TransformersGenerator: {ours_tokens / ours_s:8.0f} tokens/s ({ours_tokens} tokens, {ours_s:.2f} s)")
    print(f"speed-up: {(ours_tokens / ours_s) / (naive_tokens / naive_s):.2f}x")


if __name__ == "__main__":
    main()
