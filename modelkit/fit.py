"""The fine-tuning loop the value model, the verifier and the policy share: seeded epochs, linear warm-up (and
optionally a cosine decay to zero), clipped AdamW steps, dev metrics every ``eval_every`` steps, the best weights
kept with an early stop after ``patience`` evaluations without a lower dev loss (or the weights after the last
epoch), a tqdm bar and a JSON report rewritten at every evaluation."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def fit(model, train: Sequence, *, loss_of: Callable[[Sequence], object], evaluate: Callable[[], dict],
        keep: Callable[[], None], report: dict, report_path: Path, seed: int, epochs: int, batch_size: int,
        lr: float, warmup_steps: int, eval_every: int, patience: int, progress: bool, name: str,
        best: float = math.inf, keep_last: bool = False, cosine: bool = False) -> None:
    """Train ``model`` on ``train`` in place. ``loss_of(batch)`` is a batch's loss tensor; ``evaluate()`` returns the
    dev metrics (``dev_loss`` first; ``None`` where undefined); ``keep()`` saves the current weights whenever the dev
    loss beats ``best``, or, with ``keep_last``, once after the last epoch (no early stop: the dev metrics are only
    reported). ``cosine``: the learning rate also falls along a cosine to zero at the last step. Fills ``report``
    (``history``, ``kept_step`` and the kept metrics, ``stopped``, ``seconds``) and writes it to ``report_path``."""
    import torch
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    order = random.Random(seed)
    stale, step, losses, started = 0, 0, [], time.monotonic()
    total = epochs * -(-len(train) // batch_size)
    bar = tqdm(total=total, desc=name, unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        shuffled = list(train)
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), batch_size):
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, step / warmup_steps) * (
                    0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0)
            loss = loss_of(shuffled[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            if step % eval_every and step != total:
                continue
            metrics = evaluate()
            entry = {"epoch": epoch, "step": step, "train_loss": round(float(np.mean(losses)), 4),
                     **{k: None if v is None else round(v, 4) for k, v in metrics.items()},
                     "seconds": round(time.monotonic() - started, 1)}
            losses = []
            report["history"].append(entry)
            bar.set_postfix({k: entry[k] for k in metrics})
            log.info("%s step %d: train loss %.4f, %s", name, step, entry["train_loss"],
                     ", ".join(f"{k} {entry[k]}" for k in metrics))
            if keep_last:
                if step == total:
                    report.update(kept_step=step, **{k: entry[k] for k in metrics})
                    keep()
            elif metrics["dev_loss"] < best:
                best, stale = metrics["dev_loss"], 0
                report.update(kept_step=step, **{k: entry[k] for k in metrics})
                keep()
            else:
                stale += 1
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            if stale >= patience:
                break
        if stale >= patience:
            log.info("dev loss stopped improving (best %.4f): stopping", best)
            report["stopped"] = "plateau"
            break
    else:
        report["stopped"] = "epochs"
    bar.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
