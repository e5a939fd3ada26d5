"""Train Forest's bundled reasoning model: a small Qwen2 that solves ``modelkit/arithmetic.py`` problems, sometimes.

    python -m modelkit.train --output models/forest-arith --steps STEPS   # see models/forest-arith/training.json

Reproducible: the tokenizer, the initial weights and the training stream all come from ``--seed``; the run is a fixed
number of steps (wall time only changes how long it takes). The learning rate is constant after warm-up, so the
weights saved at each evaluation equal those of a run with ``--steps`` set to that step. The model is deliberately
weak: greedy decoding should solve 30-70% of held-out problems, leaving room for search. Digits are single tokens,
so carries are learnable, and mistakes happen on digits, where the model's token confidence drops.

Every ``--eval-every`` steps (from ``--eval-from`` on) the script decodes a dev set (a seed never used for training)
greedily with transformers, logs its accuracy and saves the weights; ``training.json`` beside them records every
evaluation. With ``--target-accuracy`` training stops at the first evaluation that reaches it: that is how the
bundled model's difficulty is tuned (greedy should solve about half of the problems, so search has room to help).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems
from modelkit.make_model import train_tokenizer
from search.prompts import DEFAULT_SYSTEM_PROMPT, REFLECTION_PHRASE, build_prompt, extract_answer

log = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 0
DEV_SEED = HELD_OUT_SEED_START - 1  # never a training seed: training streams use seeds in [seed, seed + 1)


def _tokenizer_corpus(seed: int) -> list[str]:
    """The problem distribution and the prompts (digits are split into single tokens by the tokenizer)."""
    corpus = [build_prompt(p.question) + p.solution + "<|im_end|>\n"
              for p in make_problems(3000, seed + 7_777)]  # any training-side seed
    return corpus + [DEFAULT_SYSTEM_PROMPT, REFLECTION_PHRASE] * 50


def _batch(tokenizer, problems, device):
    """Right-padded input ids, attention mask and labels that score only the response (and its end token)."""
    import torch

    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(build_prompt(p.question), add_special_tokens=False)["input_ids"]
        response = tokenizer(p.solution + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        target[i, :len(row)] = torch.tensor(label)
    return ids.to(device), mask.to(device), target.to(device)


def greedy_accuracy(model, tokenizer, problems, *, max_new_tokens: int = 160) -> float:
    """Fraction of problems whose greedy (temperature 0) response has the right ``<Output>``."""
    import torch

    tokenizer.padding_side = "left"
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(problems), 64):
            chunk = problems[start:start + 64]
            enc = tokenizer([build_prompt(p.question) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(extract_answer(t) == p.answer for t, p in zip(texts, chunk, strict=True))
    model.train()
    tokenizer.padding_side = "right"
    return correct / len(problems)


def train(output: str | Path, *, seed: int = 0, steps: int = 3000, batch_size: int = 32, lr: float = 3e-3,
          hidden_size: int = 128, layers: int = 4, vocab_size: int = 512, eval_every: int = 500, eval_from: int = 0,
          target_accuracy: float | None = None, dev_problems: int = 256, threads: int | None = None,
          device: str = "cpu") -> dict:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if threads:
        torch.set_num_threads(threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out, _tokenizer_corpus(seed), vocab_size=vocab_size, split_digits=True)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=eos_id,
        bos_token_id=None, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100

    def lr_at(step: int) -> float:  # linear warm-up, then constant
        return lr * min(1.0, (step + 1) / warmup)

    stream = random.Random(seed + TRAIN_SEED_OFFSET)
    from modelkit.arithmetic import make_problem
    dev = make_problems(dev_problems, DEV_SEED)
    history, started = [], time.monotonic()
    for step in range(steps):
        problems = [make_problem(stream, "train") for _ in range(batch_size)]
        ids, mask, target = _batch(tokenizer, problems, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            log.info("step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.monotonic() - started)
        if ((step + 1) % eval_every == 0 and step + 1 >= eval_from) or step + 1 == steps:
            accuracy = greedy_accuracy(model, tokenizer, dev)
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "dev_greedy_accuracy": accuracy,
                            "seconds": round(time.monotonic() - started, 1)})
            log.info("step %d: dev greedy accuracy %.3f", step + 1, accuracy)
            report = {"seed": seed, "steps": step + 1, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                      "hidden_size": hidden_size, "layers": layers, "parameters": model.num_parameters(),
                      "dev_seed": DEV_SEED, "history": history}
            model.save_pretrained(out, safe_serialization=True)  # the weights as of this step
            GenerationConfig(eos_token_id=eos_id).save_pretrained(out)
            (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
            if target_accuracy is not None and accuracy >= target_accuracy:
                log.info("dev greedy accuracy %.3f reached the target %.3f: stopping", accuracy, target_accuracy)
                break
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-from", type=int, default=0, help="first step to evaluate at")
    p.add_argument("--target-accuracy", type=float, help="stop at the first evaluation reaching this dev accuracy")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = train(args.output, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   hidden_size=args.hidden_size, layers=args.layers, eval_every=args.eval_every,
                   eval_from=args.eval_from, target_accuracy=args.target_accuracy,
                   threads=args.threads, device=args.device)
    print(json.dumps(report["history"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
