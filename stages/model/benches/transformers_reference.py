"""PyTorch + transformers reference for `emflow bench model` (stages/model/src/bench.rs).

Measures the same figures as our model bench, on the same shapes, with PyTorch (f32, CPU,
`torch.set_num_threads(--threads)`) and Hugging Face transformers (+ peft for LoRA), loading the
same GGUF file (transformers dequantises it to f32), and prints lines in the same format:

- prefill: one forward over 1 x 256 tokens into a fresh KV cache, logits of the last position
  only and its argmax (as our `time_decode` with 0 steps); after one warm-up pass.
  tok/s = 256 / seconds.
- decode at batch 1 (greedy), batch 16 (greedy) and batch 16 sampled (temperature 0.8,
  top_p 0.9 via transformers' TemperatureLogitsWarper + TopPLogitsWarper, then
  torch.multinomial): a 32-token prompt is prefilled (not timed), then exactly 64 decode steps
  are timed with a KV cache (`cache=`, a hand-written loop, so end-of-sequence never stops it;
  each step is a 1-token forward plus choosing the next token).
  tok/s = batch * 64 / (time of the 64 steps).
- train LoRA r=8 (alpha 16, dropout 0, on q,k,v,o,gate,up,down of every layer) and full
  fine-tuning: 4 x 128 tokens, one step = forward with the causal-LM loss over all positions
  (`labels=input_ids`), backward, `torch.optim.AdamW(lr=1e-4)` step. One warm-up step, then
  --train-steps steps (default 5); tok/s = 512 / median seconds per step, and the median
  forward / backward / AdamW times. (Our bench averages 3 steps; the median of 5 is steadier.)
- peak RSS of the process at the end (resource.getrusage ru_maxrss).

Token ids are the same deterministic pseudo-ids as our bench's `token_ids` (no tokenizer is
needed for timing). Eval parts run under torch.inference_mode().

Setup (once; PyPI only):
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.15.0 transformers==5.24.0 peft gguf numpy
Run:
    /tmp/refvenv/bin/python stages/model/benches/transformers_reference.py \
        --model target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2] \
        [--only prefill|decode|lora|full] [--decode-steps 64] [--train-steps 5]
"""

import argparse
import copy
import os
import resource
import statistics
import sys
import time


def token_ids(n, vocab, salt):
    """Our bench's deterministic pseudo-token ids below `vocab` (bench.rs `token_ids`)."""
    return [(i * 7919 + salt * 104_729 + 13) % (vocab - 100) + 100 for i in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["prefill", "decode", "lora", "full"])
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=5)
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessorList
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = lambda part: args.only is None or args.only == part

    path = os.path.abspath(args.model)
    print(f"model: {path}")
    print(
        f"device: CPU, {torch.get_num_threads()} threads (torch {torch.__version__}, "
        f"transformers {transformers.__version__}, f32)"
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model.eval()
    print(f"load: {time.perf_counter() - start:.2f} s")
    vocab = model.config.vocab_size

    def time_decode(prompts, steps, sample=None, seed=0):
        """(seconds of the prefill incl. the first token, seconds of `steps` decode steps)."""
        gen = torch.Generator().manual_seed(seed)
        warpers = (
            LogitsProcessorList(
                [TemperatureLogitsWarper(sample[0]), TopPLogitsWarper(sample[1])]
            )
            if sample
            else None
        )

        def pick(ids, logits):
            if warpers is None:
                return logits.argmax(-1, keepdim=True)
            scores = warpers(ids, logits)
            return torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)

        with torch.inference_mode():
            start = time.perf_counter()
            ids = torch.tensor(prompts, dtype=torch.long)
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            tokens = pick(ids, out.logits[:, -1, :])
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=tokens, cache=cache, use_cache=True)
                tokens = pick(tokens, out.logits[:, -1, :])
            return prefill, time.perf_counter() - start

    if runs("prefill"):
        prompt = [token_ids(256, vocab, 0)]
        time_decode(prompt, 0)
        prefill, _ = time_decode(prompt, 0)
        print(f"prefill: {256 / prefill:.0f} tok/s (1 x 256 tokens in {prefill:.3f} s)")

    if runs("decode"):
        time_decode([token_ids(8, vocab, 9)], 2)  # warm-up
        steps = args.decode_steps
        for batch, sample, label in [
            (1, None, "greedy"),
            (16, None, "greedy"),
            (16, (0.8, 0.9), "T=0.8 top_p=0.9"),
        ]:
            prompts = [token_ids(32, vocab, b) for b in range(batch)]
            _, decode = time_decode(prompts, steps, sample)
            print(
                f"decode batch {batch:>2} ({label}): {batch * steps / decode:.1f} tok/s "
                f"({steps} steps after a 32-token prompt, {1000 * decode / steps:.1f} ms/step)"
            )

    def time_train(m, batch=4, length=128):
        """Median seconds of (forward, backward, AdamW, whole step) after one warm-up step."""
        m.train()
        ids = torch.tensor(
            [token_ids(length, vocab, b + 1) for b in range(batch)], dtype=torch.long
        )
        mask = torch.ones_like(ids)
        params = [q for q in m.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        parts = []
        for step in range(args.train_steps + 1):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if step > 0:  # step 0 is a warm-up
                parts.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        med = [statistics.median(x[i] for x in parts) for i in range(4)]
        n_train = sum(q.numel() for q in params)
        return med, n_train

    def report(name, med, n_train):
        fwd, bwd, opt, total = med
        print(
            f"train {name}: {512 / total:.0f} tok/s (4 x 128 tokens, {total:.2f} s/step: "
            f"forward {fwd:.2f} s, backward {bwd:.2f} s, AdamW {opt:.2f} s; "
            f"median of {args.train_steps}, {n_train / 1e6:.2f}M trainable)"
        )

    if runs("lora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            ],
            task_type="CAUSAL_LM",
        )
        lora = get_peft_model(copy.deepcopy(model), cfg)
        report("LoRA r=8 (all linears)", *time_train(lora))
        del lora

    if runs("full"):
        for q in model.parameters():
            q.requires_grad_(True)
        report("full fine-tune", *time_train(model))

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS: {rss_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
