"""Peak memory of sequence log-probs: alignkit's chunked head against full float32 logits.

Each method runs in a fresh subprocess (forward + backward on a ~4M-parameter Llama-style model
with a 32k vocabulary) and reports the process's peak resident memory above its baseline.

    python benchmarks/logprobs_memory.py [--batch 8] [--length 256] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(method: str, batch: int, length: int, vocab: int) -> dict:
    import torch

    from alignkit.models import naive_token_logprobs, tiny_model, token_logprobs

    torch.manual_seed(0)
    model = tiny_model(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_layers=2)
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    score = torch.zeros_like(ids)
    score[:, length // 4:] = 1
    fn = {"chunked": token_logprobs, "naive": naive_token_logprobs}[method]
    fn(model, ids[:1, :8], mask[:1, :8], score[:1, :8]).sum().backward()  # warm up allocator
    model.zero_grad()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(model, ids, mask, score).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "peak_rss_mib": peak / 1024, "above_baseline_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.length, args.vocab)))
        return
    full_logits_mib = args.batch * args.length * args.vocab * 4 / 2**20
    print(f"batch {args.batch} x {args.length} tokens, vocab {args.vocab}: "
          f"one float32 logits tensor is {full_logits_mib:.0f} MiB")
    for method in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--batch", str(args.batch),
                              "--length", str(args.length), "--vocab", str(args.vocab)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['method']:>8}: peak RSS {row['peak_rss_mib']:7.0f} MiB, "
              f"{row['above_baseline_mib']:7.0f} MiB above the model's baseline")


if __name__ == "__main__":
    main()
