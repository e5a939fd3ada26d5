"""Train Forest's bundled reasoning model: a small Qwen2 that solves ``modelkit/arithmetic.py`` problems, often.

    python -m modelkit.train --output models/my-arith --plot out/my-arith-training   # the bundled model: ``make model``

Trained until the dev loss stops improving: every ``--eval-every`` steps the loss on a fixed dev set (a seed no
training stream uses; its solutions written as the training's are, long forms included, without slips) is
measured and dev problems are decoded greedily with transformers; the learning rate halves when the dev loss stops
improving (and, back at the best weights, when it spikes) and training ends at the next plateau (or at
``--max-steps``). The weights with the best dev loss are kept, and ``training.json`` beside them records every
evaluation (``--plot`` draws them).
The problems are meant to be hard for a converged model (products, remainders and carries computed in one step,
compounding over three to ten steps). A share of training solutions slip, write Marco-o1's reflection phrase and
redo the work (the slip itself is not trained on), so a forced reflection means something to the model.

Reproducible: the tokenizer, the initial weights and every step's batch come from ``--seed`` (on one device and
thread count; wall time and ``--workers`` only change how long it takes; ``--max-seconds`` where it stops). Digits
are single tokens, so carries are learnable, and mistakes happen on digits, where the model's token confidence drops.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from modelkit.arithmetic import (DEFAULT_DISTRIBUTION, HELD_OUT_SEED_START, LONG_DIVISIONS, REMAINDERS, Distribution,
                                 TrainingExample, make_problem, make_problems, make_training_example)
from modelkit.make_model import train_tokenizer
from search.prompts import DEFAULT_SYSTEM_PROMPT, REFLECTION_PHRASE, build_prompt, extract_answer

log = logging.getLogger(__name__)

DEV_SEED = HELD_OUT_SEED_START - 1  # never a training stream: those are seeded by strings (``_draw_batch``)
IGNORE = -100  # the label transformers' loss skips
WARMUP_STEPS = 100
MIN_IMPROVEMENT = 0.005  # a dev loss at least 0.5% below the best so far counts as better
DIVERGENCE = 2.0  # a dev loss this many times the best so far: the run diverged (docs/model.md: a loss spike)
DEV_GREEDY_PROBLEMS = 128
MAX_NEW_TOKENS = 512  # room for a slip, a reflection and a redo of the longest problems
PREFETCH_PER_WORKER = 4  # batches each data worker keeps ready
REPORT_TEMPERATURES = (0.3, 0.6, 1.0)  # the dev report's sampling temperatures (top-p 1)
REPORT_SAMPLES = 8  # samples per problem and temperature in the dev report: pass@8
# the recipe of the bundled model (docs/model.md); the command line's defaults
MAX_STEPS, BATCH_SIZE, LEARNING_RATE, EVAL_EVERY, PATIENCE, MAX_DECAYS = 20000, 32, 3e-3, 300, 3, 2
REFLECTION_RATE = 0.15  # share of training solutions that slip, reflect and redo
LONG_FORM_RATE = 0.0  # share of the hard steps written the long way: none in the recipe (make model-d sets it)
HIDDEN_SIZE, LAYERS = 128, 4
SPEED_SETTINGS = ("device", "threads", "bf16", "compiled", "micro_batches")  # change speed and rounding only


def _tokenizer_corpus(seed: int, dist: Distribution) -> list[str]:
    """The problem distribution and the prompts (digits are split into single tokens by the tokenizer)."""
    corpus = [build_prompt(p.question) + p.solution + "<|im_end|>\n"
              for p in make_problems(3000, seed + 7_777, dist)]  # any training-side seed
    return corpus + [DEFAULT_SYSTEM_PROMPT, REFLECTION_PHRASE] * 50


def _rows(tokenizer, examples: list[tuple[str, TrainingExample]]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompt + response per example, and labels that score only the response (and its end token),
    less its unscored spans (a deliberate slip before a reflection)."""
    prompts = tokenizer([build_prompt(q) for q, _ in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e.response + "<|im_end|>" for _, e in examples], add_special_tokens=False,
                          return_offsets_mapping=True)  # one call per batch: the tokenizer's per-call cost dominates
    rows, labels = [], []
    for prompt, response, offsets, (_, example) in zip(prompts, responses["input_ids"], responses["offset_mapping"],
                                                       examples, strict=True):
        label = [IGNORE if any(start < b and end > a for a, b in example.unscored) else token
                 for token, (start, end) in zip(response, offsets, strict=True)] if example.unscored else response
        rows.append(prompt + response)
        labels.append([IGNORE] * len(prompt) + label)
    return rows, labels


def padded_arrays(rows: list[list[int]], labels: list[list[int]], pad: int):
    """Right-padded input ids, attention mask and labels as numpy arrays (filled row by row: converting a nested
    list is several times slower)."""
    import numpy as np

    lengths = np.array([len(row) for row in rows])
    width = int(lengths.max())
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    target = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, :len(row)] = row
        target[i, :len(label)] = label
    mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
    return ids, mask, target


def _pieces(rows: list[list[int]], labels: list[list[int]], pad: int, parts: int) -> list[tuple]:
    """The batch as ``parts`` arrays of rows of similar length (sorted by length, then split), each padded only to
    its own longest row: the padding a batch of mixed lengths would compute on is mostly left out."""
    import numpy as np

    order = np.argsort([len(row) for row in rows], kind="stable")
    return [padded_arrays([rows[i] for i in part], [labels[i] for i in part], pad)
            for part in np.array_split(order, min(parts, len(rows)))]


def to_tensors(arrays, device):
    import torch

    return tuple(torch.from_numpy(a).to(device) for a in arrays)


def _batch(tokenizer, examples: list[tuple[str, TrainingExample]], device):
    """The model's inputs for ``examples``: ids, attention mask and labels (see ``_rows``)."""
    return to_tensors(padded_arrays(*_rows(tokenizer, examples), tokenizer.pad_token_id), device)


def _draw_batch(seed: int, step: int, batch_size: int, reflection_rate: float, dist: Distribution,
                long_form_rate: float, long_division: str = REMAINDERS) -> list[tuple[str, TrainingExample]]:
    """Training step ``step``'s batch: (question, example) pairs from a stream of its own, so batches can be
    drawn in any order, by any process, and a resumed run needs no replay."""
    stream = random.Random(f"train-{seed}-{step}")
    problems = [make_problem(stream, "train", dist) for _ in range(batch_size)]
    return [(p.question, make_training_example(stream, p, reflection_rate=reflection_rate,
                                               long_form_rate=long_form_rate, long_division=long_division))
            for p in problems]


_worker_tokenizer = None  # a data worker's own tokenizer, loaded once per process


def _load_worker_tokenizer(path: str) -> None:
    global _worker_tokenizer
    from transformers import PreTrainedTokenizerFast

    _worker_tokenizer = PreTrainedTokenizerFast.from_pretrained(path)


def _worker_pieces(args: tuple):
    *draw, parts = args
    return _pieces(*_rows(_worker_tokenizer, _draw_batch(*draw)), _worker_tokenizer.pad_token_id, parts)


def _batches(tokenizer, tokenizer_dir: Path, steps: range, workers: int, seed: int, draw: tuple, parts: int = 1):
    """Each step's pieces (``_pieces``) of ``_draw_batch(seed, step, *draw)``: made in this process, or ahead by
    ``workers`` processes (in step order either way: the same batches)."""
    if not workers:
        for step in steps:
            yield _pieces(*_rows(tokenizer, _draw_batch(seed, step, *draw)), tokenizer.pad_token_id, parts)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, _load_worker_tokenizer, (str(tokenizer_dir),)) as pool:
        ahead: deque = deque()
        for step in steps:  # keep PREFETCH_PER_WORKER batches per worker in flight
            ahead.append(pool.apply_async(_worker_pieces, ((seed, step, *draw, parts),)))
            if len(ahead) >= PREFETCH_PER_WORKER * workers:
                yield ahead.popleft().get()
        while ahead:
            yield ahead.popleft().get()


def dev_examples(problems, long_form_rate: float, long_division: str) -> list[tuple[str, TrainingExample]]:
    """The dev problems' right solutions written as the run writes its training ones, without a slip: each hard
    step the long way at the run's rate (one seeded draw per problem), so that the kept weights are judged on the
    long forms the run teaches too. At rate 0 these are the problems' solutions as they stand."""
    return [(p.question, make_training_example(random.Random(f"dev-{p.id}"), p, reflection_rate=0.0,
                                               long_form_rate=long_form_rate, long_division=long_division))
            for p in problems]


def written_as(report: dict) -> dict:
    """How a run wrote its training solutions, from its ``training.json``: the share of hard steps written the long
    way and the long-division form (runs recorded before these settings had none and the remainders form)."""
    return {"long_form_rate": report.get("long_form_rate", 0.0),
            "long_division": report.get("long_division", REMAINDERS)}


def _check_written_as_before(previous: dict, long_form_rate: float, long_division: str) -> None:
    """A resumed run draws its batches as its earlier pieces did: the same share of long forms, the same division."""
    recorded = written_as(previous)
    asked = {"long_form_rate": long_form_rate, "long_division": long_division}
    changed = [f"{key} {asked[key]!r} (the run has {recorded[key]!r})" for key in asked if asked[key] != recorded[key]]
    if changed:
        raise ValueError(f"a resumed run writes its solutions as before; asked for {', '.join(changed)}")


def dev_loss(model, tokenizer, batches) -> float:
    """Mean token loss of the model on fixed dev batches (correct solutions of dev problems)."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ids, mask, target in batches:
            tokens = int((target[:, 1:] != IGNORE).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=target).loss.item() * tokens
            count += tokens
    model.train()
    return total / count


def _responses(model, tokenizer, problems, *, temperature: float = 0.0, samples: int = 1,
               max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[str]]:
    """``samples`` responses per problem, decoded with transformers: greedy at temperature 0, else sampled (top-p
    1)."""
    import torch

    tokenizer.padding_side = "left"
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature else {
        "do_sample": False}
    texts = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(problems), DEV_GREEDY_PROBLEMS):
            chunk = problems[start:start + DEV_GREEDY_PROBLEMS]
            enc = tokenizer([build_prompt(p.question) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    tokenizer.padding_side = "right"
    return [texts[i * samples:(i + 1) * samples] for i in range(len(problems))]


def greedy_accuracy(model, tokenizer, problems, *, max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Fraction of problems whose greedy (temperature 0) response has the right ``<Output>``."""
    responses = _responses(model, tokenizer, problems, max_new_tokens=max_new_tokens)
    return sum(extract_answer(r) == p.answer for (r,), p in zip(responses, problems, strict=True)) / len(problems)


def dev_report(model, tokenizer, problems, *, temperatures=REPORT_TEMPERATURES, samples: int = REPORT_SAMPLES
               ) -> dict:
    """How the model behaves on dev problems, with transformers: greedy accuracy overall and by number of steps,
    and per sampling temperature the mean one-sample accuracy, pass@``samples`` and the share of samples that
    write the reflection phrase unprompted. Choosing a problem distribution or a temperature looks at these, never
    at held-out problems."""
    greedy = [extract_answer(r) == p.answer
              for (r,), p in zip(_responses(model, tokenizer, problems), problems, strict=True)]
    by_steps: dict[int, list[bool]] = {}
    for ok, p in zip(greedy, problems, strict=True):
        by_steps.setdefault(p.changes, []).append(ok)
    report = {"problems": len(problems), "greedy": sum(greedy) / len(greedy),
              "greedy_by_steps": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_steps.items())},
              "sampled": {}}
    drawn = len(problems) * samples
    for temperature in temperatures:
        responses = _responses(model, tokenizer, problems, temperature=temperature, samples=samples)
        right = [[extract_answer(r) == p.answer for r in rs] for rs, p in zip(responses, problems, strict=True)]
        report["sampled"][str(temperature)] = {
            "one_sample": round(sum(map(sum, right)) / drawn, 4),
            f"pass@{samples}": round(sum(map(any, right)) / len(problems), 4),
            "reflects": round(sum(REFLECTION_PHRASE in r for rs in responses for r in rs) / drawn, 4)}
    return report


class Verdict(enum.Enum):
    """What an evaluation's dev loss means for the run (``Schedule.observe``)."""

    BEST = "best"  # the lowest dev loss so far: keep these weights
    GO_ON = "go_on"
    ROLL_BACK = "roll_back"  # a divergence: go back to the kept weights, at the halved rate, with fresh moments
    CONVERGED = "converged"  # a plateau after the last halving: stop
    DIVERGED = "diverged"  # a divergence with no halving left: stop


ENDED = (Verdict.CONVERGED.value, Verdict.DIVERGED.value)  # the stops that a resume leaves as they are


@dataclass
class Schedule:
    """The learning rate's halvings and the end of training, decided from each evaluation's dev loss.

    The rate halves when ``patience`` evaluations in a row fail to beat the last mark by ``MIN_IMPROVEMENT``; after
    ``max_decays`` halvings, the next such plateau ends training. A dev loss ``DIVERGENCE`` times the best one (or
    not a number) is a divergence: a run at the edge of stability can spike and take hundreds of steps to recover,
    so it goes back to the kept weights at half the rate (one of the halvings; with none left, training ends)."""

    rate: float
    patience: int
    max_decays: int
    best: float = math.inf
    mark: float = math.inf  # the dev loss that the next one must beat by MIN_IMPROVEMENT to count as progress
    stale: int = 0
    decays: int = 0

    def observe(self, loss: float) -> Verdict:
        if math.isfinite(self.best) and not loss <= self.best * DIVERGENCE:
            return Verdict.ROLL_BACK if self._halve() else Verdict.DIVERGED
        verdict = Verdict.BEST if loss < self.best else Verdict.GO_ON
        self.best = min(self.best, loss)
        if loss < self.mark * (1 - MIN_IMPROVEMENT):
            self.mark, self.stale = loss, 0
        else:
            self.stale += 1
        if self.stale >= self.patience and not self._halve():
            return Verdict.CONVERGED
        return verdict

    def _halve(self) -> bool:
        """Halve the rate when a halving is left; False when none is."""
        if self.decays == self.max_decays:
            return False
        self.decays, self.stale, self.rate = self.decays + 1, 0, self.rate / 2
        return True


def _model_config(tokenizer, hidden_size: int, layers: int):
    """The bundled model's architecture at a given size: a Qwen2 with heads of 64 dimensions and tied embeddings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")


def _train_step(model, forward, optimizer, pieces, device: str, bf16: bool) -> float:
    """One optimizer step on a batch's pieces (``_pieces``), each piece's mean token loss weighted by its share of
    the batch's scored tokens (so the gradient is the whole batch's); returns the batch's mean token loss.
    ``forward`` is ``model`` or its compiled form."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    scored = [int((target[:, 1:] != IGNORE).sum()) for _, _, target in pieces]  # the tokens each loss averages
    total, step_loss = sum(scored), 0.0
    for arrays, count in zip(pieces, scored, strict=True):
        if not count:  # nothing scored in this piece: its mean loss would be 0/0
            continue
        ids, mask, target = to_tensors(arrays, device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=ids, attention_mask=mask, labels=target).loss * (count / total)
        loss.backward()
        step_loss = step_loss + loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(step_loss)


def _forward(model, compiled: bool):
    """What a training step calls: ``model``, or its ``torch.compile`` form (sharing its weights; dynamic shapes:
    every batch has its own length)."""
    import torch

    return torch.compile(model, dynamic=True) if compiled else model


def _kept_segments(previous: dict) -> list[dict]:
    """The speed settings of the pieces of a run up to its kept step (``training.json``'s ``segments``: one per
    invocation, from the step it started at). A report written before segments were recorded only tells the
    settings of its last piece, which started after its last resume."""
    if "segments" not in previous:
        start = previous["resumed"][-1] + 1 if previous.get("resumed") else 1
        return [{"from_step": start, **{key: previous[key] for key in SPEED_SETTINGS}}]
    return [s for s in previous["segments"] if s["from_step"] <= previous["steps"]]


def _set_up_torch(device: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the GPU's steps are compute-bound at large batches


def _new_optimizer(model, lr: float):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def _run_tokenizer(out: Path, seed: int, dist: Distribution, vocab_size: int, *, resume: bool,
                   init_from: str | Path | None):
    """The run's tokenizer, saved in ``out``: the one it was trained with when resuming, the source run's with
    ``init_from`` (its weights are trained on that one's token ids, whatever ranges this run draws), else a new one
    trained on the ranges' corpus."""
    from transformers import PreTrainedTokenizerFast

    if resume:
        return PreTrainedTokenizerFast.from_pretrained(out)
    if init_from:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(init_from)
        tokenizer.save_pretrained(out)
        return tokenizer
    return train_tokenizer(out, _tokenizer_corpus(seed, dist), vocab_size=vocab_size, split_digits=True)


def _initial_model(init_from: str | Path, hidden_size: int, layers: int):
    """The kept weights of the run in ``init_from``, which must have this run's size."""
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(init_from, torch_dtype=torch.float32)
    if (model.config.hidden_size, model.config.num_hidden_layers) != (hidden_size, layers):
        raise ValueError(f"--init-from {init_from} has hidden size {model.config.hidden_size} and "
                         f"{model.config.num_hidden_layers} layers; this run has {hidden_size} and {layers}")
    return model


def _source_run(init_from: str | Path) -> dict:
    """Where a run's initial weights came from: the run and its kept step (None for weights without a run)."""
    source = Path(init_from) / "training.json"
    return {"path": str(init_from), "step": json.loads(source.read_text())["steps"] if source.exists() else None}


def train(output: str | Path, *, seed: int = 0, max_steps: int = MAX_STEPS, batch_size: int = BATCH_SIZE,
          lr: float = LEARNING_RATE, hidden_size: int = HIDDEN_SIZE, layers: int = LAYERS, vocab_size: int = 512,
          reflection_rate: float = REFLECTION_RATE, eval_every: int = EVAL_EVERY, patience: int = PATIENCE,
          max_decays: int = MAX_DECAYS, dev_problems: int = 256, dist: Distribution = DEFAULT_DISTRIBUTION,
          max_seconds: float | None = None, for_seconds: float | None = None, report_problems: int = 0,
          workers: int = 0, threads: int | None = None, device: str = "cpu", resume: bool = False, bf16: bool = False,
          compile_model: bool = False, micro_batches: int = 1, long_form_rate: float = LONG_FORM_RATE,
          init_from: str | Path | None = None, long_division: str = REMAINDERS) -> dict:
    """Train until the dev loss stops improving; returns the report written to ``training.json``.

    ``resume`` continues a run in ``output`` from its kept weights and their step, with the batches that follow
    it; the optimizer's moments start afresh (they are not saved) with a new warm-up, the learning rate continues
    at the rate and number of halvings the schedule had reached (so that a run trained in pieces can still
    converge), and ``training.json`` records where the run resumed. ``workers`` processes draw and tokenize
    batches ahead of the training loop (the same batches as without them).

    The learning rate is constant after warm-up and halves as ``Schedule`` decides (on plateaus, and on a
    divergence, after going back to the kept weights with a new warm-up); training ends at the plateau after
    ``max_decays`` halvings (or ``max_steps`` does, or ``max_seconds`` of training in all, the pieces a resumed run
    was trained in before included, or ``for_seconds`` of this invocation's). The weights with the best dev
    loss are the ones kept; with ``report_problems``, ``dev_report`` then measures them on that many dev problems.

    ``bf16`` runs the training forward pass under bfloat16 autocast (the weights, the dev loss and the saved model
    stay float32); ``compile_model`` trains through ``torch.compile`` (dynamic shapes: every batch has its own
    length). ``micro_batches`` splits each batch into that many pieces of similar length, accumulating their
    token-weighted gradients: the gradient of the whole batch, with less padding computed. All three only change
    speed and rounding; they are recorded in ``training.json``.

    ``long_form_rate`` writes that share of the hard steps the long way (``make_training_example``), long divisions
    as ``long_division`` says (``long_form``).
    ``init_from`` starts a new run from another run's kept weights and tokenizer instead of random ones (the same
    size; its ranges may differ), with a fresh schedule; its steps number on from the kept step of that run, so
    its batches are ones that run has not seen."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    _set_up_torch(device, threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "training.json").read_text()) if resume else None
    if previous and previous.get("stopped") in ENDED:  # a run that ended is done: resuming would train it on
        log.info("%s ended (%s at step %d): nothing to resume", out, previous["stopped"], previous["steps"])
        return previous
    if previous:  # refused before any weights are loaded
        _check_written_as_before(previous, long_form_rate, long_division)
    tokenizer = _run_tokenizer(out, seed, dist, vocab_size, resume=resume, init_from=init_from)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_model_config(tokenizer, hidden_size, layers)).to(device)

    def kept_model():  # the weights with the best dev loss so far, as saved in ``out``
        return Qwen2ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).to(device)

    if previous:
        model = kept_model()
    elif init_from:
        model = _initial_model(init_from, hidden_size, layers).to(device)
    forward = _forward(model, compile_model)

    optimizer = _new_optimizer(model, lr)
    dev = make_problems(max(dev_problems, report_problems), DEV_SEED, dist)
    dev_written = dev_examples(dev[:dev_problems], long_form_rate, long_division)
    dev_batches = [_batch(tokenizer, dev_written[i:i + batch_size], device) for i in range(0, dev_problems, batch_size)]
    speed = dict(zip(SPEED_SETTINGS, (device, torch.get_num_threads(), bf16, compile_model, micro_batches),
                     strict=True))  # what this invocation runs with; the pieces of a resumed run may differ
    report = {"seed": seed, "batch_size": batch_size, "lr": lr, "warmup": WARMUP_STEPS, "hidden_size": hidden_size,
              "layers": layers, "parameters": model.num_parameters(), "reflection_rate": reflection_rate,
              "long_form_rate": long_form_rate, "long_division": long_division,
              "distribution": asdict(dist), "dev_seed": DEV_SEED, "dev_problems": dev_problems, **speed,
              "eval_every": eval_every, "patience": patience, "max_decays": max_decays, "history": [],
              "segments": [{"from_step": 1, **speed}], "dev_long_forms": True}
    schedule, first = Schedule(lr, patience, max_decays), 1
    train_losses, started = [], time.monotonic()
    invoked = started  # ``started`` moves back by a resumed run's earlier seconds
    if previous:
        first = previous["steps"] + 1
        # the kept weights stay those of the earlier piece until this one beats them
        report.update({key: previous[key] for key in ("steps", "dev_loss", "dev_greedy_accuracy")})
        for key in ("initialized_from", "dev_remeasured"):  # kept across the resumed pieces
            if key in previous:
                report[key] = previous[key]
        if long_form_rate and not previous.get("dev_long_forms"):  # its dev loss was of short solutions only
            remeasured = round(dev_loss(model, tokenizer, dev_batches), 4)
            log.info("dev loss of the kept weights (step %d) with long forms: %.4f (short solutions only: %.4f)",
                     previous["steps"], remeasured, previous["dev_loss"])
            report["dev_remeasured"] = {"step": previous["steps"], "short_solutions": previous["dev_loss"],
                                        "long_forms": remeasured}
            report["dev_loss"] = remeasured
        report["history"] = [h for h in previous["history"] if h["step"] <= previous["steps"]]
        report["resumed"] = [*previous.get("resumed", []), previous["steps"]]
        report["segments"] = [*_kept_segments(previous), {"from_step": first, **speed}]
        if previous.get("rolled_back"):
            report["rolled_back"] = [s for s in previous["rolled_back"] if s <= previous["steps"]]
        schedule.best = schedule.mark = report["dev_loss"]
        if "schedule" in previous:  # absent from runs written before the schedule was saved: none had halved
            schedule.rate, schedule.decays = previous["schedule"]["rate"], previous["schedule"]["decays"]
        started -= previous.get("seconds", report["history"][-1]["seconds"])
    elif init_from:
        report["initialized_from"] = _source_run(init_from)
        first = (report["initialized_from"]["step"] or 0) + 1
        report["segments"] = [{"from_step": first, **speed}]
    warm_from = first  # the warm-up restarts here after a resume or a roll-back (the moments start afresh)

    def time_out() -> str | None:  # which time limit has passed, if any
        now = time.monotonic()
        return ("max_seconds" if max_seconds is not None and now - started >= max_seconds else
                "for_seconds" if for_seconds is not None and now - invoked >= for_seconds else None)

    draw = (batch_size, reflection_rate, dist, long_form_rate, long_division)
    batches = _batches(tokenizer, out, range(first, max_steps + 1), workers, seed, draw, micro_batches)
    for step, pieces in zip(range(first, max_steps + 1), batches, strict=False):
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate * min(1.0, (step - warm_from + 1) / WARMUP_STEPS)
        train_losses.append(_train_step(model, forward, optimizer, pieces, device, bf16))
        out_of_time = time_out()
        if step % eval_every and step != max_steps and not out_of_time:
            continue
        loss_now = dev_loss(model, tokenizer, dev_batches)
        accuracy = greedy_accuracy(model, tokenizer, dev[:DEV_GREEDY_PROBLEMS])
        report["history"].append({
            "step": step, "train_loss": round(sum(train_losses) / len(train_losses), 4), "dev_loss": round(loss_now, 4),
            "dev_greedy_accuracy": accuracy, "lr": schedule.rate, "seconds": round(time.monotonic() - started, 1)})
        train_losses = []
        log.info("step %d: train loss %.4f, dev loss %.4f, dev greedy accuracy %.3f, lr %.2g (%.0f s)", step,
                 report["history"][-1]["train_loss"], loss_now, accuracy, schedule.rate, time.monotonic() - started)
        verdict = schedule.observe(loss_now)
        if verdict is Verdict.BEST:
            report.update(steps=step, dev_loss=round(loss_now, 4), dev_greedy_accuracy=accuracy)
            model.save_pretrained(out, safe_serialization=True)  # the best weights so far
            GenerationConfig(eos_token_id=model.config.eos_token_id).save_pretrained(out)
        elif verdict is Verdict.ROLL_BACK:
            log.info("dev loss %.4f is over %g times the best (%.4f at step %d): back to those weights, lr %.2g",
                     loss_now, DIVERGENCE, schedule.best, report["steps"], schedule.rate)
            model.load_state_dict(kept_model().state_dict())
            optimizer, warm_from = _new_optimizer(model, lr), step + 1  # the diverged moments are dropped
            report["rolled_back"] = [*report.get("rolled_back", []), step]
        report["schedule"] = {"rate": schedule.rate, "decays": schedule.decays}  # where a resumed run continues
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        if verdict in (Verdict.CONVERGED, Verdict.DIVERGED):
            log.info("dev loss %s (best %.4f at step %d): stopping", verdict.value, schedule.best, report["steps"])
            report["stopped"] = verdict.value
            break
        out_of_time = out_of_time or time_out()  # an evaluation that used up the time left ends the run too
        if out_of_time:
            log.info("stopping at the time limit (%s)", out_of_time)
            report["stopped"] = out_of_time
            break
    else:
        report["stopped"] = "max_steps"
    batches.close()  # ends the data workers
    report["seconds"] = round(time.monotonic() - started, 1)
    if report_problems:
        best_model = kept_model()
        report["dev_report"] = dev_report(best_model, tokenizer, dev[:report_problems])
        log.info("dev report of the kept weights: %s", json.dumps(report["dev_report"]))
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def step_seconds(tokenizer, settings: dict[str, tuple[bool, int, bool]], *, batch_size: int = BATCH_SIZE,
                 dist: Distribution = DEFAULT_DISTRIBUTION, steps: int, device: str = "cpu",
                 hidden_size: int = HIDDEN_SIZE, layers: int = LAYERS, seed: int = 0) -> dict[str, float]:
    """Mean seconds of one training step under each setting (name: (bf16, micro_batches, compiled)): the same
    initial weights and the same batches of the training stream for every setting, each step taken by every setting
    in turn so that a noisy machine slows them alike. Step 0, the first of each setting, is not timed (allocations,
    kernel choice, and a compiled setting's compilation)."""
    import torch
    from transformers import Qwen2ForCausalLM

    _set_up_torch(device, None)
    runs = {}
    for name in settings:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(_model_config(tokenizer, hidden_size, layers)).to(device)
        forward = _forward(model, settings[name][2])
        runs[name] = (model, forward, _new_optimizer(model, LEARNING_RATE))
    elapsed = dict.fromkeys(settings, 0.0)
    for step in range(steps + 1):
        rows = _rows(tokenizer, _draw_batch(seed, step, batch_size, REFLECTION_RATE, dist, LONG_FORM_RATE))
        for name, (bf16, parts, _) in settings.items():
            pieces = _pieces(*rows, tokenizer.pad_token_id, parts)
            model, forward, optimizer = runs[name]
            started = time.perf_counter()
            _train_step(model, forward, optimizer, pieces, device, bf16)  # returns a float: the step has ended
            elapsed[name] += (time.perf_counter() - started) if step else 0.0
    return {name: seconds / steps for name, seconds in elapsed.items()}


def dev_curves(report: dict) -> list[tuple[str, list[int], list[float]]]:
    """The dev loss against steps as (label, steps, losses): one curve, or two for a run whose dev solutions took
    its long forms part-way (``dev_remeasured``: the second starts at the kept weights measured again)."""
    history, changed = report["history"], report.get("dev_remeasured")
    if not changed:
        return [("dev", [h["step"] for h in history], [h["dev_loss"] for h in history])]
    before = [h for h in history if h["step"] <= changed["step"]]
    after = [h for h in history if h["step"] > changed["step"]]
    return [("dev (short solutions)", [h["step"] for h in before], [h["dev_loss"] for h in before]),
            ("dev (long forms at the run's rate)", [changed["step"], *(h["step"] for h in after)],
             [changed["long_forms"], *(h["dev_loss"] for h in after)])]


def plot_history(report: dict, path: str | Path) -> list[Path]:
    """Loss (train and dev) and dev greedy accuracy against steps, as ``path``.png and .svg."""
    history = report["history"]
    steps = [h["step"] for h in history]
    fig, (loss_ax, acc_ax) = _loss_and_accuracy_axes()
    loss_ax.plot(steps, [h["train_loss"] for h in history], label="train (mean since last point)")
    for label, dev_steps, losses in dev_curves(report):
        loss_ax.plot(dev_steps, losses, label=label)
    loss_ax.axvline(report["steps"], color="grey", linestyle=":", label=f"kept (step {report['steps']})")
    loss_ax.set(xlabel="step", ylabel="token loss", yscale="log", title="Loss")
    loss_ax.legend()
    acc_ax.plot(steps, [h["dev_greedy_accuracy"] for h in history], marker="o", color="C2")
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1),
               title=f"Greedy accuracy, {DEV_GREEDY_PROBLEMS} dev problems")
    return _save_figure(fig, path)


def read_report(path: str | Path) -> dict:
    """A run's ``training.json``, given it or the model directory holding it; ValueError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "training.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (a model directory with training.json, or the file)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(report, dict) or not report.get("history"):
        raise ValueError(f"{path}: no evaluations under 'history' (not a modelkit.train report?)")
    return report


def plot_runs(runs: dict[str, dict], path: str | Path) -> list[Path]:
    """Several runs' dev loss and dev greedy accuracy against steps on shared axes (``runs``: label -> report), as
    ``path``.png and .svg; a run's resumed steps are marked."""
    fig, (loss_ax, acc_ax) = _loss_and_accuracy_axes()
    for index, (label, report) in enumerate(runs.items()):
        color = f"C{index}"
        steps = [h["step"] for h in report["history"]]
        loss_ax.plot(steps, [h["dev_loss"] for h in report["history"]], marker=".", color=color, label=label)
        acc_ax.plot(steps, [h["dev_greedy_accuracy"] for h in report["history"]], marker=".", color=color)
        for step in report.get("resumed", []):
            loss_ax.axvline(step, color=color, linestyle=":", linewidth=1)
    loss_ax.set(xlabel="step", ylabel="dev token loss", yscale="log", title="Dev loss (dotted: resumed)")
    loss_ax.legend(fontsize="small")
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="Dev greedy accuracy")
    return _save_figure(fig, path)


def _loss_and_accuracy_axes():
    """A figure of two panels side by side (loss, accuracy) on the display-less Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(10, 3.8))


def _save_figure(fig, path: str | Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    written = []
    for suffix in (".png", ".svg"):
        target = Path(str(path) + suffix)
        fig.savefig(target, dpi=120)
        written.append(target)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="stop here even if the dev loss still improves")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--hidden-size", type=int, default=HIDDEN_SIZE)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--reflection-rate", type=float, default=REFLECTION_RATE,
                   help="share of training solutions that slip, reflect and redo the work")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--patience", type=int, default=PATIENCE, help="evaluations without a better dev loss before "
                                                                  "the learning rate halves")
    p.add_argument("--max-decays", type=int, default=MAX_DECAYS, help="halvings before a plateau stops training")
    p.add_argument("--distribution", nargs="+", default=[], metavar="KEY=VALUE",
                   help="train on other ranges than the bundled model's (forest make-problems --distribution)")
    p.add_argument("--max-seconds", type=float, help="stop after this much training in all (a resumed run's earlier "
                   "pieces included), keeping the best weights")
    p.add_argument("--for-seconds", type=float, help="stop after this much training in this invocation")
    p.add_argument("--report-problems", type=int, default=0, help="measure the kept weights on this many dev "
                   "problems: greedy by steps; one-sample accuracy, pass@8 and reflections per temperature")
    p.add_argument("--workers", type=int, default=0, help="processes that prepare batches ahead (0: none)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its kept weights and learning rate")
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (weights stay float32)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--micro-batches", type=int, default=1, help="split each batch into this many pieces of similar "
                   "length (less padding, the same gradient)")
    p.add_argument("--long-form-rate", type=float, default=LONG_FORM_RATE,
                   help="share of the hard steps written the long way (tens and units, digit by digit)")
    p.add_argument("--long-division", choices=LONG_DIVISIONS, default=REMAINDERS,
                   help="how a long division writes each digit's part: its remainder in one go, or the digit's "
                   "product and a subtraction")
    p.add_argument("--init-from", metavar="DIR", help="start from the kept weights and the tokenizer of the "
                   "run in DIR (the same size; other ranges may be drawn) instead of random ones")
    p.add_argument("--plot", metavar="PREFIX", help="also draw the training curves to PREFIX.png and PREFIX.svg")
    args = p.parse_args(argv)
    if args.micro_batches < 1:
        p.error(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if not 0 <= args.long_form_rate <= 1:
        p.error(f"--long-form-rate is a share, from 0 to 1; got {args.long_form_rate}")
    try:
        dist = Distribution.parse(args.distribution)
    except ValueError as e:
        p.error(f"--distribution: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = train(args.output, seed=args.seed, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                   hidden_size=args.hidden_size, layers=args.layers, reflection_rate=args.reflection_rate,
                   eval_every=args.eval_every, patience=args.patience, max_decays=args.max_decays,
                   dist=dist, max_seconds=args.max_seconds, for_seconds=args.for_seconds,
                   report_problems=args.report_problems, workers=args.workers,
                   threads=args.threads, device=args.device, resume=args.resume, bf16=args.bf16,
                   compile_model=args.compile, micro_batches=args.micro_batches,
                   long_form_rate=args.long_form_rate, init_from=args.init_from, long_division=args.long_division)
    if args.plot:
        print(*plot_history(report, args.plot))
    print(json.dumps(report["history"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
