"""Train a verifier: the policy fine-tuned to predict what a solution's equations claim (their results).

The policy writes "123 - 82 = 51" as readily as "123 - 82 = 41": its own probability of a written result tells a
slip from a right sum only in part (docs/value.md). A verifier is the same causal LM trained further on correct
solutions with its loss on the claimed digits alone (``search.checks.EQUATION``'s named groups), so it learns the
arithmetic and nothing else changes. A ValueWorker serves it by likelihood (``actors.value_input.LikelihoodInput``,
``value_likelihood`` in the config): a line's value is the verifier's lowest probability of a result the line wrote.

It learns from right solutions, of one of two sources:
- ``forest train-verifier --output DIR`` (``make verifier-model``, the bundled verifier): the solutions the problem
  generator writes, fresh problems of training seeds at every step, written as the policy was trained to write them
  (its ``training.json``: the ranges and the long forms);
- ``forest train-verifier --input OUT [OUT ...] --output DIR``: the distinct finished lines of builds whose answer is
  right (what a user without a generator has), split into train and dev by problem, cycled for the steps.

Seeded; every ``eval_every`` steps the dev loss (on the claimed digits of the dev solutions) and the dev claim
accuracy (the share of claims whose every digit is the verifier's first choice, the solution read so far given) are
measured, the weights with the lowest dev loss are kept, and ``verifier_training.json`` records every evaluation.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from modelkit.arithmetic import DEFAULT_DISTRIBUTION, Distribution, make_problems, make_training_example
from modelkit.fit import fit
from modelkit.train import IGNORE, padded_arrays, read_report, to_tensors, written_as
from modelkit.value import Example, split_by_problem
from search.checks import EQUATION, marked_spans
from search.prompts import TURN_END

log = logging.getLogger(__name__)

# the recipe of the bundled verifier; the command line's defaults
STEPS, BATCH_SIZE, LEARNING_RATE, EVAL_EVERY, PATIENCE, WARMUP_STEPS = 1000, 64, 1e-3, 200, 2, 50
TRAIN_SEED = 440_000  # the training problems' stream (a training seed: below the held-out ones)
DEV_SEED = 430_000  # the dev solutions' stream (a training-side seed too)
DEV_PROBLEMS = 400
DEV_SHARE = 0.1  # of a build's problems, when the verifier learns from builds
REPORT = "verifier_training.json"


def policy_writing(base: str | Path) -> dict:
    """How ``base`` was trained to write solutions, from its ``training.json`` (``modelkit.train``): the problem
    ranges, the share of hard steps written the long way and the long-division form; for a model trained elsewhere,
    the default ranges written the short way."""
    path = Path(base) / "training.json"
    if not path.is_file():
        return {"distribution": DEFAULT_DISTRIBUTION, **written_as({})}  # the short way, as a record without them
    report = read_report(path)
    if not isinstance(report.get("distribution"), dict):
        raise ValueError(f"{path}: no 'distribution' (the ranges the model was trained on) to write solutions from")
    ranges = {key: tuple(value) if isinstance(value, list) else value for key, value in report["distribution"].items()}
    return {"distribution": Distribution(**ranges), **written_as(report)}


def generator_solutions(n: int, seed: int, writing: dict) -> list[str]:
    """The problem generator's correct solutions of ``n`` problems of stream ``seed``, written as ``writing``
    (``policy_writing``) says, each as a line ends."""
    rng = random.Random(seed)
    return [make_training_example(rng, p, reflection_rate=0.0, long_form_rate=writing["long_form_rate"],
                                  long_division=writing["long_division"]).response + TURN_END
            for p in make_problems(n, seed, writing["distribution"])]


def right_lines(examples: Sequence[Example], tokenizer, *, seed: int, dev_share: float = DEV_SHARE
                ) -> tuple[list[str], list[str]]:
    """(train, dev): the distinct texts of the right finished lines of builds (``dataset.value_labels``, without
    their prompts), a seeded ``dev_share`` of the problems held out."""
    right = [e for e in examples if e.correct]
    if not right:
        raise ValueError("the builds have no right finished line to learn from")
    train, dev = split_by_problem(right, dev_share, seed)
    if not dev:
        raise ValueError("verifier training needs right lines of at least two problems (one for the dev split)")

    def texts(lines):  # a line that claims nothing has nothing to teach (and a batch of them no loss)
        decoded = dict.fromkeys(tokenizer.decode(e.token_ids[e.prompt_length:].tolist()) for e in lines)
        return [text for text in decoded if marked_spans(EQUATION, text)]

    train, dev = texts(train), texts(dev)
    if not train or not dev:
        raise ValueError(f"the right lines write no equation to learn from ({len(train)} train and {len(dev)} dev "
                         f"lines do)")
    return train, dev


def encode(tokenizer, solutions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Per solution (a line without its prompt, as the verifier is served): its token ids, and for each token the
    index of the claim (a marked span) it overlaps, or -1."""
    encoded = tokenizer(list(solutions), add_special_tokens=False, return_offsets_mapping=True)
    claims = []
    for offsets, text in zip(encoded["offset_mapping"], solutions, strict=True):
        spans = marked_spans(EQUATION, text)
        claims.append([next((k for k, (a, b) in enumerate(spans) if start < b and end > a), -1)
                       for start, end in offsets])
    return encoded["input_ids"], claims


def _claim_tensors(rows: list[list[int]], claims: list[list[int]], pad: int, device):
    """Right-padded ids, attention mask, labels (the claimed tokens; IGNORE elsewhere) and claim indices (negative
    where there is none), padded as the policy's batches are (``modelkit.train``)."""
    ids, mask, claim = padded_arrays(rows, claims, pad)
    return to_tensors((ids, mask, np.where(claim >= 0, ids, IGNORE), claim), device)


def evaluate(model, batches: list[tuple]) -> dict:
    """Dev loss over the claimed tokens, and the share of claims whose every token is the model's first choice."""
    import torch

    model.eval()
    losses, right, claims = [], 0, 0
    with torch.no_grad():
        for ids, mask, labels, claim in batches:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            losses.append(out.loss.item())
            hit = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).cpu().numpy()
            claim = claim[:, 1:].cpu().numpy()
            for row_hit, row_claim in zip(hit, claim, strict=True):
                for k in np.unique(row_claim[row_claim >= 0]):
                    claims += 1
                    right += bool(row_hit[row_claim == k].all())
    model.train()
    return {"dev_loss": float(np.mean(losses)), "claim_accuracy": right / claims if claims else None}


def train_verifier(*, base: str | Path, output: str | Path, examples: Sequence[Example] | None = None,
                   seed: int = 0, steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE,
                   eval_every: int = EVAL_EVERY, patience: int = PATIENCE, dev_problems: int = DEV_PROBLEMS,
                   threads: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Fine-tune the causal LM ``base`` for ``steps`` batches on the generator's solutions, or with ``examples``
    (a build's finished lines) on its right lines; write the weights with the lowest dev loss and the tokenizer to
    ``output``; returns the report written to ``verifier_training.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model directory (no config.json)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("dev_problems", dev_problems)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if examples is None:
        writing = policy_writing(base)
        source = {"source": "generator", "train_seed": TRAIN_SEED + seed, "dev_seed": DEV_SEED,
                  **writing, "distribution": asdict(writing["distribution"])}
        train = generator_solutions(steps * batch_size, TRAIN_SEED + seed, writing)
        dev = generator_solutions(dev_problems, DEV_SEED, writing)
    else:
        train, dev = right_lines(examples, tokenizer, seed=seed)
        source = {"source": "builds", "train_lines": len(train)}
        train = [train[i % len(train)] for i in range(steps * batch_size)]  # cycled: fit shuffles them
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).to(device)
    model.train()
    dev_batches = [_claim_tensors(*encode(tokenizer, dev[i:i + batch_size]), pad, device)
                   for i in range(0, len(dev), batch_size)]
    report = {"base": str(base), "seed": seed, **source, "steps": steps, "batch_size": batch_size, "lr": lr,
              "dev_solutions": len(dev), "device": device, "start": evaluate(model, dev_batches), "history": []}
    log.info("verifier before training: %s", report["start"])

    def loss_of(solutions):
        ids, mask, labels, _ = _claim_tensors(*encode(tokenizer, solutions), pad, device)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def keep():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    fit(model, train, loss_of=loss_of, evaluate=lambda: evaluate(model, dev_batches), keep=keep, report=report,
        report_path=out / REPORT, seed=seed, epochs=1, batch_size=batch_size, lr=lr, warmup_steps=WARMUP_STEPS,
        eval_every=eval_every, patience=patience, progress=progress, name="verifier", cosine=True)
    return report
