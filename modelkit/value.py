"""Train a value model: a process reward model (PRM) on step labels from Forest's own trees.

``forest train-value --input OUT [OUT ...] --output DIR`` reads the labels (``dataset.value_labels``) and calls
``train_value``. The model is a ``Qwen2ForTokenClassification`` with two labels (wrong, right), its backbone
initialised from the policy (``--base``), so it starts from the policy's reading of the problems. At each step end
it learns the share of correct finished lines below that step (a soft label); vLLM serves it with the
``token_classify`` pooling task, and the probability of "right" at a node's last token is the node's value.

Seeded; problems are split into train and dev, so no dev problem is trained on. Every ``eval_every`` steps (and at
the end) the dev loss and the dev AUROC of the finished lines (the score at a line's last token against its outcome)
are measured; the weights with the lowest dev loss are kept, training stops after ``patience`` evaluations without a
lower one, and ``value_training.json`` records every evaluation.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from search.metrics import auroc

log = logging.getLogger(__name__)

# the recipe of the bundled value model; the command line's defaults
EPOCHS, BATCH_SIZE, LEARNING_RATE, DEV_SHARE, EVAL_EVERY, PATIENCE = 3, 16, 1e-3, 0.1, 200, 1
WARMUP_STEPS = 20
LABELS = {0: "wrong", 1: "right"}
RIGHT = 1  # the label whose probability is the value
REPORT = "value_training.json"


class Example(Protocol):
    """A labelled line (``dataset.value_labels.ValueExample``)."""

    problem_id: str
    token_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    correct: bool


def split_by_problem(examples: Sequence[Example], dev_share: float, seed: int) -> tuple[list, list]:
    """(train, dev): a seeded ``dev_share`` of the problems, with all their lines, is held out."""
    problems = sorted({e.problem_id for e in examples})
    random.Random(seed).shuffle(problems)
    dev = set(problems[:max(1, round(dev_share * len(problems)))]) if len(problems) > 1 else set()
    return [e for e in examples if e.problem_id not in dev], [e for e in examples if e.problem_id in dev]


def _batch(examples: Sequence[Example], pad_id: int, device):
    """Right-padded ids and mask, and the (row, position, label) of every step end."""
    import torch

    width = max(len(e.token_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, positions, labels = [], [], []
    for i, e in enumerate(examples):
        ids[i, :len(e.token_ids)] = torch.as_tensor(e.token_ids, dtype=torch.long)
        mask[i, :len(e.token_ids)] = 1
        rows += [i] * len(e.positions)
        positions += list(map(int, e.positions))
        labels += list(map(float, e.labels))
    return (ids.to(device), mask.to(device), torch.tensor(rows, device=device),
            torch.tensor(positions, device=device), torch.tensor(labels, device=device))


def _step_log_probs(model, batch):
    """Log-probabilities (wrong, right) at the batch's step ends: [steps, 2]."""
    import torch

    ids, mask, rows, positions, _ = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.log_softmax(logits[rows, positions].float(), dim=-1)


def soft_label_loss(log_probs, labels):
    """Cross-entropy against soft labels q: -(q log p(right) + (1 - q) log p(wrong)), averaged over step ends."""
    return -(labels * log_probs[:, RIGHT] + (1 - labels) * log_probs[:, 1 - RIGHT]).mean()


def evaluate(model, examples: Sequence[Example], pad_id: int, device, batch_size: int) -> dict:
    """Dev loss, the AUROC of the finished lines (last step's score against the outcome), and of the step ends
    (score against whether most lines below were right)."""
    import torch

    model.eval()
    total, count, line_scores, step_scores, step_labels = 0.0, 0, [], [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = _batch(chunk, pad_id, device)
            log_probs = _step_log_probs(model, batch)
            labels = batch[4]
            total += float(soft_label_loss(log_probs, labels)) * len(labels)
            count += len(labels)
            scores = log_probs[:, RIGHT].exp().cpu().numpy()
            step_scores += scores.tolist()
            step_labels += (labels.cpu().numpy() > 0.5).tolist()
            ends = np.cumsum([len(e.positions) for e in chunk]) - 1
            line_scores += scores[ends].tolist()
    model.train()
    return {"dev_loss": total / max(count, 1), "line_auroc": auroc(line_scores, [e.correct for e in examples]),
            "step_auroc": auroc(step_scores, step_labels)}


def train_value(examples: Sequence[Example], *, base: str | Path, output: str | Path, seed: int = 0,
                epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE,
                dev_share: float = DEV_SHARE, eval_every: int = EVAL_EVERY, patience: int = PATIENCE,
                threads: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Train on ``examples`` from the policy ``base``; write the best model (by dev loss) and its tokenizer to
    ``output``; returns the report written to ``value_training.json``."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    if not examples:
        raise ValueError("no labelled lines to train on (the builds have no finished lines)")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model directory (no config.json)")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = split_by_problem(examples, dev_share, seed)
    if not dev:
        raise ValueError("value training needs lines of at least two problems (one for the dev split)")
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = Qwen2ForTokenClassification.from_pretrained(
        base, num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        torch_dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = random.Random(seed)
    report = {"base": str(base), "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "train_lines": len(train), "dev_lines": len(dev),
              "train_problems": len({e.problem_id for e in train}), "dev_problems": len({e.problem_id for e in dev}),
              "right_share": float(np.mean([e.correct for e in examples])), "device": device, "history": []}
    best, stale, step, losses, started = float("inf"), 0, 0, [], time.monotonic()
    total = epochs * -(-len(train) // batch_size)
    bar = tqdm(total=total, desc="value model", unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        shuffled = list(train)
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), batch_size):
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, step / WARMUP_STEPS)
            batch = _batch(shuffled[start:start + batch_size], pad_id, device)
            loss = soft_label_loss(_step_log_probs(model, batch), batch[4])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            if step % eval_every and step != total:
                continue
            metrics = evaluate(model, dev, pad_id, device, batch_size)
            entry = {"epoch": epoch, "step": step, "train_loss": round(float(np.mean(losses)), 4),
                     **{k: None if v is None else round(v, 4) for k, v in metrics.items()},
                     "seconds": round(time.monotonic() - started, 1)}
            losses = []
            report["history"].append(entry)
            bar.set_postfix(dev_loss=entry["dev_loss"], line_auroc=entry["line_auroc"])
            log.info("value step %d: train loss %.4f, dev loss %.4f, dev line AUROC %s, step AUROC %s", step,
                     entry["train_loss"], entry["dev_loss"], entry["line_auroc"], entry["step_auroc"])
            if metrics["dev_loss"] < best:
                best, stale = metrics["dev_loss"], 0
                report.update(kept_step=step, **{k: entry[k] for k in ("dev_loss", "line_auroc", "step_auroc")})
                model.save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
            else:
                stale += 1
            (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            if stale >= patience:
                break
        if stale >= patience:
            log.info("dev loss stopped improving (best %.4f at step %d): stopping", best, report["kept_step"])
            report["stopped"] = "plateau"
            break
    else:
        report["stopped"] = "epochs"
    bar.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
