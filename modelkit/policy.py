"""Fine-tuning the policy on what a build found (``forest train-policy``): supervised, on right finished lines,
and optionally a DPO pass on the build's preference pairs.

Examples come from a build's ``sft.jsonl`` (the chosen line of each tree whose answer was right) or from its trees
(distinct finished lines whose answer matches the reference, what rejection sampling keeps: by default one of each
problem, ``LINES_PER_PROBLEM``). The loss is the next-token loss on the response and its end token only; a seeded
share of the problems is held out as a dev set and the dev loss is measured every ``eval_every`` steps. The weights
after the last epoch are kept (``keep="last"``) or those with the best dev loss, with an early stop
(``keep="best"``). The output is a model directory like the base (weights, tokenizer, generation config) that vLLM
loads.

The DPO pass (``train_dpo``, Rafailov et al. 2023) reads ``pairs.parquet``: at a node of the chosen path, the
chosen continuation against its lowest-valued visited sibling's. Its loss is ``-log sigmoid(beta * ((log pi(c) -
log ref(c)) - (log pi(r) - log ref(r))))`` over the continuations' tokens, with the starting model as the frozen
reference; the dev loss starts at log 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from modelkit.fit import fit
from modelkit.train import IGNORE
from modelkit.value import split_by_problem
from search.checks import passes
from search.params import StepCheck
from search.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt

log = logging.getLogger(__name__)

REPORT = "policy_training.json"
EPOCHS, BATCH_SIZE, LEARNING_RATE, EVAL_EVERY, PATIENCE, DEV_SHARE = 3, 16, 1e-4, 25, 3, 0.1
WARMUP_STEPS = 10
# Right lines of a problem that the supervised pass keeps (None: every distinct one). A build's distinct right lines
# of one problem are mostly the same worked steps in other words, and easy problems have the most of them, so every
# line puts the weight on what the model already solves; on development seeds, one line per problem gave a better
# fine-tune than all of them (docs/data-loop.md).
LINES_PER_PROBLEM: int | None = 1
# Which weights the supervised pass keeps: "best", the lowest dev loss, with an early stop; or "last", those after the
# last epoch. On the bundled model's own right lines, measured on development seeds (docs/data-loop.md), "last" answered
# more problems after 1,600 problems' lines and fewer after 400 or 800 problems' lines.
KEEPS = ("best", "last")
KEEP = "best"
REPORT_EVERY = 100  # steps between dev losses when they are only reported (keep="last")
DPO_REPORT = "dpo_training.json"
DPO_BETA = 0.1  # the DPO paper's default: how far the policy may move from the reference per unit of margin
# weight of a supervised term on the chosen continuations beside the DPO loss (0: plain DPO; RPO, the iterative
# reasoning-preference recipe, adds it with weight 1 so that the right continuation's probability is not pushed down
# with the wrong one's; on the bundled model it did not keep the DPO pass from lowering accuracy: docs/data-loop.md)
DPO_SFT_WEIGHT = 0.0


class PolicyDataError(ValueError):
    """Inputs that give nothing to train on; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PolicyExample:
    """One line to imitate: the prompt's token ids and the response's (its end token included)."""

    problem_id: str  # the dev split holds whole problems out
    prompt_ids: np.ndarray
    response_ids: np.ndarray


def sft_examples(rows: Iterable[dict], tokenizer, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[PolicyExample]:
    """``sft.jsonl`` rows (instruction, response) as examples, prompted as a search prompts."""
    rows = list(rows)
    prompts = tokenizer([build_prompt(r["instruction"], system_prompt=system_prompt) for r in rows],
                        add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    return [PolicyExample(r["instruction"], np.asarray(p, dtype=np.int64), _with_end(np.asarray(t), tokenizer))
            for r, p, t in zip(rows, prompts, responses, strict=True)]


def line_examples(lines: Iterable, tokenizer, *, skip_solved: bool = False,
                  per_problem: int | None = LINES_PER_PROBLEM, seed: int = 0,
                  check: StepCheck = StepCheck.OFF) -> list[PolicyExample]:
    """The right lines among labelled finished lines (``dataset.value_labels.ValueExample``), each distinct line
    once, at most ``per_problem`` of a problem (a seeded draw among its distinct right lines; ``None``: all). With
    ``skip_solved``, the lines of problems whose finished lines are all right are left out, as the model already
    solves those (DAPO's dynamic sampling drops prompts whose samples are all right on the same ground); on the
    bundled model that gave about the same fine-tune from a third of the lines or fewer (docs/data-loop.md). A right
    line that fails ``check`` (``search.checks``: reached the answer through a false step) is left out."""
    if per_problem is not None and per_problem < 1:
        raise ValueError(f"per_problem={per_problem}: at least 1 line per problem, or None for all")
    if skip_solved:
        lines = list(lines)
        failed = {line.problem_id for line in lines if not line.correct}
        lines = [line for line in lines if line.problem_id in failed]
    seen, out = set(), []
    for line in lines:
        if not line.correct:
            continue
        key = line.token_ids.tobytes()
        if key in seen:
            continue
        seen.add(key)
        response = line.token_ids[line.prompt_length:]
        if check is not StepCheck.OFF and not passes(check, tokenizer.decode(response.tolist()), complete=True):
            continue
        out.append(PolicyExample(line.problem_id, line.token_ids[:line.prompt_length].astype(np.int64),
                                 _with_end(response, tokenizer)))
    if per_problem is None:
        return out
    by_problem: dict[str, list[PolicyExample]] = {}
    for example in out:
        by_problem.setdefault(example.problem_id, []).append(example)
    draw = random.Random(seed)
    return [e for group in by_problem.values() for e in draw.sample(group, min(per_problem, len(group)))]


@dataclass(frozen=True, slots=True)
class PairExample:
    """A preference pair: the same prompt (chat prompt + the path's prefix) with the chosen and the rejected
    continuation, and their log-probabilities under the reference model (set by ``train_dpo``)."""

    problem_id: str
    chosen: PolicyExample
    rejected: PolicyExample
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan


def pair_examples(rows: Iterable[dict], tokenizer, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT
                  ) -> list[PairExample]:
    """``pairs.parquet`` rows (``dataset.exports.read_pairs``) as examples, prompted as the search prompted."""
    rows = list(rows)
    prompts = tokenizer([build_prompt(r["question"], system_prompt=system_prompt) + r["prefix"] for r in rows],
                        add_special_tokens=False)["input_ids"]
    chosen = tokenizer([r["chosen"] for r in rows], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([r["rejected"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for row, prompt, good, bad in zip(rows, prompts, chosen, rejected, strict=True):
        ids = np.asarray(prompt, dtype=np.int64)
        out.append(PairExample(row["problem_id"], PolicyExample(row["problem_id"], ids, np.asarray(good, np.int64)),
                               PolicyExample(row["problem_id"], ids, np.asarray(bad, np.int64))))
    return out


def outcome_pairs(lines: Iterable, tokenizer) -> list[PairExample]:
    """Preference pairs from the outcomes of labelled finished lines (``dataset.value_labels.ValueExample``): each
    distinct wrong line against the right line of the same problem that shares the longest prefix with it, both
    cut where they part (the prompt is the shared prefix, the chosen and rejected continuations the rest). The pair
    is where the wrong line went wrong, as judged by the answers rather than by a value; a problem without both a
    right and a wrong line gives none."""
    by_problem: dict[str, list] = {}
    for line in lines:
        by_problem.setdefault(line.problem_id, []).append(line)
    seen, out = set(), []
    for problem_id, group in by_problem.items():
        right = [line for line in group if line.correct]
        for wrong in (line for line in group if not line.correct):
            best, shared = None, -1
            for good in right:
                common = _common_prefix(good.token_ids, wrong.token_ids)
                if common > shared:
                    best, shared = good, common
            if best is None or shared < wrong.prompt_length:
                continue
            key = (wrong.token_ids.tobytes(), shared)
            if key in seen:
                continue
            seen.add(key)
            prompt = wrong.token_ids[:shared].astype(np.int64)
            out.append(PairExample(problem_id,
                                   PolicyExample(problem_id, prompt, _with_end(best.token_ids[shared:], tokenizer)),
                                   PolicyExample(problem_id, prompt, _with_end(wrong.token_ids[shared:], tokenizer))))
    return out


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def sequence_logprobs(model, examples: Sequence[PolicyExample], pad_id: int, device):
    """Each example's summed log-probability of its response tokens (a tensor, with the model's gradient)."""
    import torch

    ids, mask, labels = _batch(examples, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def dpo_loss(model, pairs: Sequence[PairExample], beta: float, pad_id: int, device, sft_weight: float = 0.0):
    """(mean DPO loss, share of pairs whose margin is positive) of ``pairs``; the loss carries the gradient. With
    ``sft_weight``, plus that weight times the chosen continuations' mean next-token loss per token (RPO's term)."""
    import torch
    import torch.nn.functional as F

    logprobs = sequence_logprobs(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    chosen, rejected = logprobs[:len(pairs)], logprobs[len(pairs):]
    ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=chosen.dtype, device=chosen.device)
    margin = beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))
    loss = -F.logsigmoid(margin).mean()
    if sft_weight:
        lengths = torch.tensor([len(p.chosen.response_ids) for p in pairs], dtype=chosen.dtype, device=chosen.device)
        loss = loss + sft_weight * (-chosen / lengths).mean()
    return loss, float((margin > 0).float().mean())


def _dpo_dev(model, dev: Sequence[PairExample], beta: float, pad_id: int, device, batch_size: int) -> dict:
    import torch

    model.eval()
    losses, right = [], []
    with torch.no_grad():
        for start in range(0, len(dev), batch_size):
            batch = dev[start:start + batch_size]
            loss, accuracy = dpo_loss(model, batch, beta, pad_id, device)
            losses.append(float(loss) * len(batch))
            right.append(accuracy * len(batch))
    model.train()
    return {"dev_loss": sum(losses) / len(dev), "dev_pair_accuracy": sum(right) / len(dev)}


def train_dpo(pairs: Sequence[PairExample], *, base: str | Path, output: str | Path, seed: int = 0,
              epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE, beta: float = DPO_BETA,
              sft_weight: float = DPO_SFT_WEIGHT, dev_share: float = DEV_SHARE, eval_every: int = EVAL_EVERY,
              patience: int = PATIENCE, threads: int | None = None, device: str = "cpu",
              progress: bool = True) -> dict:
    """A DPO pass from ``base`` (also the frozen reference) on ``pairs``; writes the best model (by dev DPO loss,
    without the ``sft_weight`` term) to ``output`` and returns the report written to ``dpo_training.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not pairs:
        raise PolicyDataError("no preference pairs to train on")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model directory (no config.json)")
    if not beta > 0:
        raise PolicyDataError(f"beta must be > 0, got {beta}")
    if not sft_weight >= 0:
        raise PolicyDataError(f"the supervised term's weight must be >= 0, got {sft_weight}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).to(device)
    model.eval()
    scored = []
    with torch.no_grad():  # the reference: the starting weights, frozen
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            logprobs = sequence_logprobs(model, [p.chosen for p in batch] + [p.rejected for p in batch], pad_id,
                                         device).tolist()
            scored += [dataclasses.replace(p, ref_chosen=c, ref_rejected=r)
                       for p, c, r in zip(batch, logprobs[:len(batch)], logprobs[len(batch):], strict=True)]
    model.train()
    train, dev = split_by_problem(scored, dev_share, seed)
    if not dev:
        raise PolicyDataError("a DPO pass needs pairs of at least two problems (one for the dev split)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"base": str(base), "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "beta": beta,
              "sft_weight": sft_weight, "train_pairs": len(train), "dev_pairs": len(dev),
              "base_dev_loss": round(math.log(2), 4), "device": device, "history": []}
    fit(model, train, loss_of=lambda batch: dpo_loss(model, batch, beta, pad_id, device, sft_weight)[0],
        evaluate=lambda: _dpo_dev(model, dev, beta, pad_id, device, batch_size),
        keep=lambda: _save(model, tokenizer, out), report=report, report_path=out / DPO_REPORT, seed=seed,
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=WARMUP_STEPS, eval_every=eval_every,
        patience=patience, progress=progress, name="dpo", best=math.log(2))
    if "kept_step" not in report:  # no step beat the reference on the dev pairs: the starting model is kept
        report.update(kept_step=0, dev_loss=round(math.log(2), 4))
        _save(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), tokenizer, out)
        (out / DPO_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _with_end(response: np.ndarray, tokenizer) -> np.ndarray:
    """The response ending with the end-of-turn token, as the model must learn to stop."""
    end = tokenizer.eos_token_id
    response = response.astype(np.int64)
    return response if len(response) and response[-1] == end else np.append(response, end)


def _batch(examples: Sequence[PolicyExample], pad_id: int, device):
    """Right-padded ids, mask and labels that score only the responses."""
    import torch

    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        prompt, response = len(e.prompt_ids), len(e.response_ids)
        ids[row, :prompt + response] = torch.from_numpy(np.concatenate([e.prompt_ids, e.response_ids]))
        mask[row, :prompt + response] = 1
        labels[row, prompt:prompt + response] = torch.from_numpy(e.response_ids)
    return ids.to(device), mask.to(device), labels.to(device)


def response_loss(model, examples: Sequence[PolicyExample], pad_id: int, device, batch_size: int = BATCH_SIZE) -> float:
    """Mean next-token loss over the response tokens of ``examples``."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = _batch(examples[start:start + batch_size], pad_id, device)
            tokens = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * tokens
            count += tokens
    model.train()
    return total / max(count, 1)


def _save(model, tokenizer, out: Path) -> None:
    """A model directory vLLM loads like the base: weights, tokenizer, and the end token in the generation config."""
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(out)


def train_policy(examples: Sequence[PolicyExample], *, base: str | Path, output: str | Path, seed: int = 0,
                 epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE,
                 dev_share: float = DEV_SHARE, eval_every: int | None = None, patience: int = PATIENCE,
                 keep: str = KEEP, threads: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Fine-tune ``base`` on ``examples``; write the kept model (``keep``: the last weights, or the best by dev
    loss) to ``output``; returns the report written to ``policy_training.json``. ``eval_every`` defaults to
    ``EVAL_EVERY`` when the dev loss chooses the weights and to ``REPORT_EVERY`` when it is only reported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if keep not in KEEPS:
        raise ValueError(f"keep={keep!r}: one of {', '.join(KEEPS)}")
    if not examples:
        raise PolicyDataError("no right lines to train on")
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a model directory (no config.json)")
    train, dev = split_by_problem(examples, dev_share, seed)
    if not dev:
        raise PolicyDataError("fine-tuning needs lines of at least two problems (one for the dev split)")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).to(device)
    base_dev_loss = response_loss(model, dev, pad_id, device, batch_size)
    report = {"base": str(base), "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "train_lines": len(train), "dev_lines": len(dev), "train_problems": len({e.problem_id for e in train}),
              "dev_problems": len({e.problem_id for e in dev}), "base_dev_loss": round(base_dev_loss, 4),
              "keep": keep, "device": device, "history": []}

    def loss_of(lines):
        ids, mask, labels = _batch(lines, pad_id, device)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    fit(model, train, loss_of=loss_of, evaluate=lambda: {"dev_loss": response_loss(model, dev, pad_id, device,
                                                                                   batch_size)},
        keep=lambda: _save(model, tokenizer, out), report=report, report_path=out / REPORT, seed=seed,
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=WARMUP_STEPS,
        eval_every=eval_every or (REPORT_EVERY if keep == "last" else EVAL_EVERY), patience=patience,
        progress=progress, name="policy", best=base_dev_loss, keep_last=keep == "last")
    if "kept_step" not in report:  # no step beat the base on the dev set: the base is kept, and said to be
        report.update(kept_step=0, dev_loss=round(base_dev_loss, 4))
        _save(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), tokenizer, out)
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
