"""Train a value model: a process reward model (PRM) on step labels from Forest's own trees.

``forest train-value --input OUT [OUT ...] --output DIR`` reads the labels (``dataset.value_labels``) and calls
``train_value``. The model is a ``Qwen2ForTokenClassification`` with two labels (wrong, right), its backbone
initialised from the policy (``--base``), so it starts from the policy's reading of the problems. At each step end
it learns the share of correct finished lines below that step (a soft label); vLLM serves it with the
``token_classify`` pooling task, and the probability of "right" at a node's last token is the node's value.

Seeded; problems are split into train and dev, so no dev problem is trained on. Every ``eval_every`` steps (and at
the end) the dev loss and the dev AUROC of the finished lines (the score at a line's last token against its outcome)
are measured; the weights with the lowest dev loss are kept, training stops after ``patience`` evaluations without a
lower one, and ``value_training.json`` records every evaluation, with the dev ``tree_pick``: the share of dev
problems whose highest-scored finished line is right (what a search's final choice needs).

With ``pairwise_weight`` w > 0 a batch holds whole problems, and the loss adds w times a Bradley-Terry term over the
(right, wrong) pairs of finished lines of one problem (rStar-Math's preference model ranks the steps of one tree the
same way): the soft labels alone can be learned from how hard a problem looks, the pairs only from what differs
between its lines.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from modelkit.fit import fit
from search.metrics import auroc, pick_rate
from search.params import StepCheck

log = logging.getLogger(__name__)

# the recipe of the bundled value model; the command line's defaults
EPOCHS, BATCH_SIZE, LEARNING_RATE, DEV_SHARE, EVAL_EVERY, PATIENCE = 3, 16, 1e-3, 0.1, 200, 1
WARMUP_STEPS = 20
PAIRWISE_WEIGHT = 0.0  # the bundled value model learns the soft labels alone
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


def pairwise_loss(log_probs, examples: Sequence[Example]):
    """-log sigmoid(z_right - z_wrong) averaged over every (right, wrong) pair of finished lines of one problem in
    the batch, z the log-odds of "right" at a line's last step end; 0 when the batch holds no such pair."""
    import torch

    ends = torch.as_tensor(np.cumsum([len(e.positions) for e in examples]) - 1, device=log_probs.device)
    odds = log_probs[ends, RIGHT] - log_probs[ends, 1 - RIGHT]
    problems = [e.problem_id for e in examples]
    same = torch.tensor([[a == b for b in problems] for a in problems], device=log_probs.device)
    correct = torch.tensor([e.correct for e in examples], device=log_probs.device)
    pairs = same & correct[:, None] & ~correct[None, :]  # [i, j]: i right, j wrong, one problem
    if not pairs.any():
        return odds.sum() * 0.0
    return -torch.nn.functional.logsigmoid(odds[:, None] - odds[None, :])[pairs].mean()


def by_problem(examples: Sequence[Example]) -> list[list[Example]]:
    """The lines of each problem, problems in order of their first line."""
    units: dict[str, list[Example]] = {}
    for e in examples:
        units.setdefault(e.problem_id, []).append(e)
    return list(units.values())


def pick_bounds(examples: Sequence[Example]) -> dict[str, float]:
    """What ``tree_pick`` lies between: the expected share for a random finished line of each problem, and for an
    oracle that picks a right line whenever the problem has one."""
    units = by_problem(examples)
    return {"random_line": float(np.mean([np.mean([e.correct for e in unit]) for unit in units])),
            "best_line": float(np.mean([any(e.correct for e in unit) for unit in units]))}


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
    correct = [e.correct for e in examples]
    return {"dev_loss": total / max(count, 1), "line_auroc": auroc(line_scores, correct),
            "step_auroc": auroc(step_scores, step_labels),
            "tree_pick": pick_rate(line_scores, correct, [e.problem_id for e in examples])}


def train_value(examples: Sequence[Example], *, base: str | Path, output: str | Path, seed: int = 0,
                epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE,
                dev_share: float = DEV_SHARE, eval_every: int = EVAL_EVERY, patience: int = PATIENCE,
                pairwise_weight: float = PAIRWISE_WEIGHT, threads: int | None = None, device: str = "cpu",
                progress: bool = True, step_check: StepCheck = StepCheck.OFF) -> dict:
    """Train on ``examples`` from the policy ``base``; write the best model (by dev loss) and its tokenizer to
    ``output``; returns the report written to ``value_training.json``. ``pairwise_weight``: see the module;
    ``step_check``: the check the examples' labels were made with (``dataset.value_labels``), for the report."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    if not examples:
        raise ValueError("no labelled lines to train on (the builds have no finished lines)")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model directory (no config.json)")
    if pairwise_weight < 0:
        raise ValueError(f"pairwise_weight must be >= 0, got {pairwise_weight}")
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
    report = {"base": str(base), "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "train_lines": len(train), "dev_lines": len(dev),
              "train_problems": len({e.problem_id for e in train}), "dev_problems": len({e.problem_id for e in dev}),
              "right_share": float(np.mean([e.correct for e in examples])),
              "mean_label": float(np.mean(np.concatenate([e.labels for e in examples]))), "device": device,
              "pairwise_weight": pairwise_weight, "step_check": step_check.value,
              "dev_tree_pick_bounds": pick_bounds(dev), "history": []}
    units, unit_batch = train, batch_size
    if pairwise_weight:  # whole problems per batch, about batch_size lines
        units = by_problem(train)
        unit_batch = report["batch_problems"] = max(1, round(batch_size * len(units) / len(train)))

    def loss_of(batch_units):
        lines = [e for unit in batch_units for e in unit] if pairwise_weight else batch_units
        batch = _batch(lines, pad_id, device)
        log_probs = _step_log_probs(model, batch)
        loss = soft_label_loss(log_probs, batch[4])
        return loss + pairwise_weight * pairwise_loss(log_probs, lines) if pairwise_weight else loss

    def keep():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    fit(model, units, loss_of=loss_of, evaluate=lambda: evaluate(model, dev, pad_id, device, batch_size), keep=keep,
        report=report, report_path=out / REPORT, seed=seed, epochs=epochs, batch_size=unit_batch, lr=lr,
        warmup_steps=WARMUP_STEPS, eval_every=eval_every, patience=patience, progress=progress, name="value model")
    return report
