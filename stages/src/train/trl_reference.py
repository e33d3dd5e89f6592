"""TRL reference for `emflow bench rl` (stages/src/train/bench.rs): seconds per GRPO step.

The same step shape as our bench, with TRL's GRPOTrainer on PyTorch (CPU,
`torch.set_num_threads(--threads)`; f32 like ours, without gradient checkpointing, unless
--trl-defaults keeps TRL's own defaults, which on a CPU with bf16 support mean bf16 autocast
and gradient checkpointing): SmolLM2-135M-Instruct loaded from the same GGUF file
(transformers dequantises it to f32), LoRA r=8 alpha 16 on q,k,v,o,gate,up,down, 4 prompts x 4
generations per optimizer step (per_device_train_batch_size 4, gradient_accumulation_steps 4,
so one generation batch of 16 completions per step, split into 4 micro-batches of 4 as ours),
at most 64 completion tokens, temperature 0.8, top_p 0.9, beta 0 (no reference model),
learning rate 1e-5, and our bench's keyword reward (1 when the completion mentions "blue").
The four prompts are our bench's, rendered with the model's chat template by TRL.

Prints, per optimizer step, its seconds and the part spent generating and scoring the
completions (TRL's `_generate_and_score_completions`, timed by wrapping it); the first step
carries one-time set-up and is reported but not counted in the summary.

Setup (once; PyPI only):
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.15.0 transformers==5.24.0 peft gguf "trl==1.16.*"
Run:
    /tmp/refvenv/bin/python stages/src/train/trl_reference.py \
        --model target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2] [--steps 3] \
        [--trl-defaults]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

QUESTIONS = [
    "What is your favourite colour and why?",
    "Describe a good breakfast.",
    "What makes a city pleasant to live in?",
    "Give me advice for learning to paint.",
]


def keyword_reward(completions, **_):
    """1.0 when the completion mentions "blue" (any case), else 0.0; as our keyword reward."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if "blue" in t.lower() else 0.0 for t in texts]


# The step `emflow bench rl` times (stages/src/train/bench.rs: the rl kind's defaults for sampling,
# beta and seed), as GRPOConfig settings; change
# both together. 4 prompts x 4 generations per optimizer step: one generation batch of 16
# completions, trained in 4 micro-batches of 4.
BENCH_STEP = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "num_generations": 4,
    "max_completion_length": 64,
    "temperature": 0.8,
    "top_p": 0.9,
    "beta": 0.0,
    "learning_rate": 1e-5,
    "seed": 3407,
    "shuffle_dataset": False,
}
# f32 without gradient checkpointing, as our bench runs (unless --trl-defaults).
OUR_PRECISION = {"bf16": False, "fp16": False, "gradient_checkpointing": False}
# Nothing logged, saved or reported: the step times are the output.
QUIET = {"logging_strategy": "no", "disable_tqdm": True, "save_strategy": "no", "report_to": "none"}
LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "task_type": "CAUSAL_LM",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps after the first")
    p.add_argument(
        "--trl-defaults",
        action="store_true",
        help="keep TRL's precision and gradient-checkpointing defaults instead of f32 without",
    )
    return p.parse_args()


def load_model(gguf_path):
    """The GGUF model dequantised to f32, as a plain transformers model, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.abspath(gguf_path)
    folder, name = os.path.dirname(path), os.path.basename(path)
    # Trainer refuses a model that still carries its GGUF quantisation config (and such a
    # model cannot be saved), so the dequantised weights move into a plain model of its config.
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def time_generation(trainer, generating):
    """Wraps the trainer's generation and scoring so that `generating[0]` adds up its seconds."""
    inner = trainer._generate_and_score_completions

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        generating[0] += time.perf_counter() - t0
        lengths = out["completion_mask"].sum(1).tolist()
        print(f"  generated {len(lengths)} completions, {int(sum(lengths))} tokens", flush=True)
        return out

    trainer._generate_and_score_completions = timed


def main():
    args = parse_args()

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    steps = args.steps + 1
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS] * steps
    config = GRPOConfig(
        **({} if args.trl_defaults else OUR_PRECISION),
        **BENCH_STEP,
        **QUIET,
        output_dir=tempfile.mkdtemp(prefix="trl-reference-"),
        use_cpu=True,
        max_steps=steps,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=keyword_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    generating = [0.0]
    time_generation(trainer, generating)
    totals = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            generating[0] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, _args, state, *__, **___):
            total = time.perf_counter() - self.t0
            gen = generating[0]
            print(
                f"step {state.global_step - 1}: {total:.1f}s (generation and reward {gen:.1f}s, "
                f"training {total - gen:.1f}s)",
                flush=True,
            )
            totals.append((total, gen))

    trainer.add_callback(StepTimes())
    print(
        f"TRL {trl.__version__}, torch {torch.__version__}, CPU, {torch.get_num_threads()} threads "
        f"| bf16 {config.bf16}, gradient checkpointing {config.gradient_checkpointing} "
        f"| LoRA r=8 | 4 prompts x 4 generations x 64 tokens | {steps} steps"
    )
    trainer.train()
    later = totals[1:]
    if later:
        print(
            f"median of steps 1..{len(later)}: {statistics.median(t for t, _ in later):.1f} s/step "
            f"(generation and reward {statistics.median(g for _, g in later):.1f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
