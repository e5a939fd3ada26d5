"""The bundled model's problem distribution: reproducible, right, held-out seeds kept apart, and reflection
examples whose slip stays out of the loss."""

import json
import random
import re

import pytest

from deploy.cli import main
from modelkit.arithmetic import (CHANGE_KINDS, CONCLUSION, DEFAULT_DISTRIBUTION, HELD_OUT_SEED_START,
                                 LONG_DIVISIONS, PRODUCTS, REMAINDERS, START, STEP_DELIMITER, Distribution, _change,
                                 first_wrong_step, long_form, make_problems, make_training_example, step_count)
from modelkit.train import DEV_SEED
from search.prompts import REFLECTION_PHRASE, extract_answer, split_response

STEP = re.compile(r", so (\d+) ([-+×÷]) (\d+) = (\d+)(?: remainder (\d+), which leaves (\d+))?\.$")


def _check_step(step: str, count: int) -> int:
    """The count after a worked change step, checking its arithmetic (and a bag product, when there is one)."""
    start, op, operand, result, remainder, left = STEP.search(step).groups()
    assert int(start) == count
    a, b, r = int(start), int(operand), int(result)
    if op == "÷":
        assert (r, int(remainder)) == divmod(a, b) and int(left) == r
    else:
        assert r == {"+": a + b, "-": a - b, "×": a * b}[op]
    bags = re.search(r"gains (\d+) × (\d+) = (\d+), so", step)
    if bags:
        assert int(bags[1]) * int(bags[2]) == int(bags[3]) == b
    return r


HARDER = Distribution(start=(10, 999), changes=(1, 6), max_count=9999, max_gain=999, max_bags=49, max_bag_size=49,
                      max_factor=9, max_piles=25)


def _harder_tokenizer(path):
    """A small tokenizer of the training corpus of HARDER, written to ``path`` (where the training reads it)."""
    from modelkit.make_model import train_tokenizer
    from modelkit.train import _tokenizer_corpus

    return train_tokenizer(path, _tokenizer_corpus(0, HARDER)[:300], vocab_size=300, split_digits=True)


@pytest.mark.parametrize("dist", [DEFAULT_DISTRIBUTION, HARDER], ids=["default", "harder"])
def test_problems_are_reproducible_and_solutions_are_right(dist):
    first, again = make_problems(300, 5, dist), make_problems(300, 5, dist)
    assert first == again
    assert first != make_problems(300, 6, dist)
    (fewest, most), kinds = dist.changes, set()
    for p in first:
        reasoning, answer = split_response(p.solution)
        assert answer == p.answer == extract_answer(p.solution)
        steps = reasoning.split("\n\n")
        assert len(steps) == p.changes + 2 and fewest <= p.changes <= most
        count = int(steps[0].split()[3])
        for step in steps[1:-1]:  # every worked step's arithmetic is right and starts where the last ended
            count = _check_step(step, count)
            assert 0 <= count <= dist.max_count
            kinds.add("bags" if " × " in step.split(", so")[0] else STEP.search(step)[2])
        assert str(count) == p.answer
    assert kinds == {"+", "-", "×", "÷", "bags"}, "every kind of change appears"
    assert sum(len(p.question.split(". ")) > p.changes + 2 for p in first) > 50, "distractor sentences appear"


def test_reflection_examples_slip_once_then_redo_right():
    rng = random.Random(3)
    problems = make_problems(200, seed=9)
    examples = [make_training_example(rng, p, reflection_rate=1.0) for p in problems]
    for p, ex in zip(problems, examples, strict=True):
        reasoning, answer = split_response(ex.response)
        assert answer == p.answer
        first, _, redo = reasoning.partition("\n\n" + REFLECTION_PHRASE + "\n\n")
        assert redo.split("\n\n") == list(p.steps), "the redo is the correct solution from scratch"
        (start, end), = ex.unscored
        slip = ex.response[start:end]
        assert slip in first.split("\n\n") and slip not in p.steps, "the unscored span is the wrong step"
        wrong = first.split("\n\n")
        assert len(wrong) == p.changes + 1  # the start and every change, no conclusion
    plain = [make_training_example(rng, p, reflection_rate=0.0) for p in problems]
    assert [ex.response for ex in plain] == [p.solution for p in problems]
    assert all(ex.unscored == () for ex in plain)


def test_training_labels_leave_the_slip_out(tmp_path):
    from modelkit.make_model import train_tokenizer
    from modelkit.train import IGNORE, _batch

    problem = make_problems(1, seed=4)[0]
    example = make_training_example(random.Random(0), problem, reflection_rate=1.0)
    tokenizer = train_tokenizer(tmp_path, [example.response] * 20, vocab_size=300, split_digits=True)
    ids, mask, target = _batch(tokenizer, [(problem.question, example)], "cpu")
    scored = tokenizer.decode([int(t) for t in target[0] if t != IGNORE])
    (start, end), = example.unscored
    slip = example.response[start:end]
    assert slip not in scored and scored.startswith("<Thought>") and REFLECTION_PHRASE in scored
    assert int(mask.sum()) == ids.shape[1]


def test_held_out_seeds_are_never_training_seeds():
    assert DEV_SEED < HELD_OUT_SEED_START
    assert {p.id for p in make_problems(50, HELD_OUT_SEED_START)}.isdisjoint(p.id for p in make_problems(50, 0))


def test_make_problems_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "held-out.jsonl"
    assert main(["make-problems", "--n", "7", "--seed", str(HELD_OUT_SEED_START), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and set(rows[0]) == {"id", "question", "answer", "changes"}
    assert main(["make-problems", "--n", "0", "--seed", "1", "--output", str(out)]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("total", [10, 11, 12, 499, 500, 981, 995, 996, 997, 998, 999])
@pytest.mark.parametrize("dist", [DEFAULT_DISTRIBUTION, HARDER, Distribution(start=(10, 24), max_count=24)],
                         ids=["default", "harder", "smallest"])
def test_every_change_keeps_the_count_in_range(total, dist):
    """Near the largest count only the changes that fit are drawn (no empty ranges, no count above it)."""
    rng = random.Random(total)
    total = min(total, dist.max_count)
    for _ in range(300):
        _, step, after, kind = _change(rng, "Ann", "pens", total, dist)
        assert kind in CHANGE_KINDS
        assert 0 <= after <= dist.max_count and _check_step(step, total) == after


def test_the_default_distribution_keeps_the_bundled_models_problems():
    """The demo's problems are the first of seed 1,000,001: the default ranges still draw them, word for word."""
    from pathlib import Path

    demo = Path(__file__).parents[2] / "deploy" / "demo_problems.jsonl"
    rows = [json.loads(line) for line in demo.read_text().splitlines()]
    assert [p.row() for p in make_problems(len(rows), HELD_OUT_SEED_START + 1)] == rows


def test_distribution_settings_parse_and_bad_ones_say_what_is_wrong(tmp_path, capsys):
    assert Distribution.parse(["max_bags=49", "start=10-999"]) == Distribution(max_bags=49, start=(10, 999))
    for settings, message in [(["bags=3"], "KEY one of start, changes"), (["start=5"], "start takes LOW-HIGH"),
                              (["max_piles=x"], "max_piles takes an integer"), (["max_factor=1"], "max_factor must"),
                              (["start=500-100"], "start must be a range"), (["max_count=20"], "max_count must")]:
        with pytest.raises(ValueError, match=message):
            Distribution.parse(settings)
    out = tmp_path / "p.jsonl"
    assert main(["make-problems", "--n", "40", "--seed", "3", "--output", str(out),
                 "--distribution", "max_count=9999", "max_bags=49", "max_bag_size=49"]) == 0
    assert max(int(json.loads(line)["answer"]) for line in out.read_text().splitlines()) > 999
    assert main(["make-problems", "--n", "4", "--seed", "3", "--output", str(out), "--distribution", "nope"]) == 2
    assert "--distribution: a distribution setting is KEY=VALUE" in capsys.readouterr().err


def test_training_keeps_the_best_weights_and_resumes(tmp_path):
    """A tiny run: every evaluation recorded, the best dev loss kept; a resumed run continues the history."""
    from modelkit.train import MAX_DECAYS, PATIENCE, train

    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1)
    first = train(tmp_path, max_steps=2, **settings)
    assert [h["step"] for h in first["history"]] == [1, 2] and first["stopped"] == "max_steps"
    assert (first["eval_every"], first["patience"], first["max_decays"]) == (1, PATIENCE, MAX_DECAYS)  # the recipe
    best = min(first["history"], key=lambda h: h["dev_loss"])
    assert (first["steps"], first["dev_loss"]) == (best["step"], best["dev_loss"])
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == first["steps"]
    assert first["segments"] == [{"from_step": 1, "device": "cpu", "threads": 1, "bf16": False, "compiled": False,
                                  "micro_batches": 1}]
    again = train(tmp_path, max_steps=3, resume=True, bf16=True, **settings)
    assert again["resumed"] == [first["steps"]]
    assert [h["step"] for h in again["history"]][-1] == 3
    assert [(s["from_step"], s["bf16"]) for s in again["segments"]] == [(1, False), (first["steps"] + 1, True)]
    assert again["bf16"] is True  # the top-level settings are the last piece's
    # --for-seconds limits this invocation alone (--max-seconds counts the earlier pieces too)
    briefly = train(tmp_path, max_steps=10, resume=True, max_seconds=1e6, for_seconds=0, **settings)
    assert briefly["stopped"] == "for_seconds" and briefly["history"][-1]["step"] == again["steps"] + 1
    assert briefly["schedule"] == {"rate": briefly["lr"], "decays": 0}
    # a run whose rate had halved twice resumes at that rate with no halving left: its next plateau ends it
    halved = {**briefly, "schedule": {"rate": briefly["lr"] / 4, "decays": MAX_DECAYS}}
    (tmp_path / "training.json").write_text(json.dumps(halved))
    resumed = train(tmp_path, max_steps=10, resume=True, for_seconds=0, **settings)
    assert resumed["history"][-1]["lr"] == briefly["lr"] / 4
    assert resumed["schedule"]["decays"] == MAX_DECAYS
    # a piece that never beats the kept dev loss keeps naming the kept weights, so the next piece can resume
    unbeaten = {**resumed, "dev_loss": 1e-9}
    (tmp_path / "training.json").write_text(json.dumps(unbeaten))
    piece = train(tmp_path, max_steps=unbeaten["steps"] + 1, resume=True, **settings)
    assert (piece["steps"], piece["dev_loss"]) == (unbeaten["steps"], 1e-9)
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == unbeaten["steps"]
    # a run that converged is done: resuming it trains no further and leaves its record as it was
    ended = {**json.loads((tmp_path / "training.json").read_text()), "stopped": "converged"}
    (tmp_path / "training.json").write_text(json.dumps(ended))
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert train(tmp_path, max_steps=unbeaten["steps"] + 5, resume=True, **settings) == ended
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "training.json").read_text()) == ended


def test_an_evaluation_that_uses_up_the_time_left_ends_the_run(tmp_path, monkeypatch):
    """No step (and no second evaluation) after an evaluation past the time limit."""
    import modelkit.train as trainer

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock["now"])
    measure = trainer.dev_loss

    def slow_dev_loss(*args):  # the evaluation takes an hour of the clock
        clock["now"] += 3600
        return measure(*args)

    monkeypatch.setattr(trainer, "dev_loss", slow_dev_loss)
    report = trainer.train(tmp_path, max_steps=10, eval_every=2, for_seconds=60, hidden_size=64, layers=1,
                           batch_size=4, dev_problems=4, threads=1)
    assert [h["step"] for h in report["history"]] == [2] and report["stopped"] == "for_seconds"


def test_a_run_can_start_from_the_kept_weights_of_another(tmp_path):
    """``init_from``: the other run's weights (at learning rate 0 its dev loss is the other's), steps numbered on
    from its kept step, its tokenizer kept when the ranges change; a run of another size is refused by name."""
    from modelkit.train import train

    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1)
    first = train(tmp_path / "a", max_steps=2, **settings)
    warm = train(tmp_path / "b", max_steps=first["steps"] + 2, init_from=tmp_path / "a", lr=0.0, **settings)
    assert warm["initialized_from"] == {"path": str(tmp_path / "a"), "step": first["steps"]}
    assert [h["step"] for h in warm["history"]] == [first["steps"] + 1, first["steps"] + 2]
    assert warm["history"][0]["dev_loss"] == first["dev_loss"]
    assert warm["segments"][0]["from_step"] == first["steps"] + 1
    resumed = train(tmp_path / "b", max_steps=first["steps"] + 3, resume=True, **settings)
    assert resumed["initialized_from"] == warm["initialized_from"]
    long = train(tmp_path / "e", max_steps=first["steps"] + 1, init_from=tmp_path / "a", long_form_rate=0.5,
                 long_division=PRODUCTS, **settings)
    assert (first["long_division"], long["long_division"], long["long_form_rate"]) == (REMAINDERS, PRODUCTS, 0.5)
    with pytest.raises(ValueError, match="hidden size 64 and 1 layers; this run has 64 and 2"):
        train(tmp_path / "c", max_steps=1, init_from=tmp_path / "a", **{**settings, "layers": 2})
    # other ranges train on with the source's tokenizer (a new one would give its weights other token ids)
    harder = train(tmp_path / "d", max_steps=first["steps"] + 1, init_from=tmp_path / "a", dist=HARDER, lr=0.0,
                   **settings)
    assert (tmp_path / "d" / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    assert harder["distribution"]["max_bags"] == HARDER.max_bags
    again = train(tmp_path / "d", max_steps=first["steps"] + 2, resume=True, dist=HARDER, lr=0.0, **settings)
    assert again["history"][-1]["dev_loss"] == harder["history"][-1]["dev_loss"]  # resumed with the same tokens


def test_the_dev_loss_judges_the_long_forms_a_run_teaches(tmp_path):
    """The dev solutions are written as the run writes its training ones (long forms at its rate, no slip); a run
    recorded with a dev loss of short solutions only has its kept weights measured again when it resumes; a resumed
    run that would write its solutions otherwise is refused, naming the setting."""
    from modelkit.train import dev_curves, dev_examples, train

    problems = make_problems(30, 5, HARDER)
    assert [e.response for _, e in dev_examples(problems, 0.0, PRODUCTS)] == [p.solution for p in problems]
    written = [e.response for _, e in dev_examples(problems, 1.0, PRODUCTS)]
    assert written == [e.response for _, e in dev_examples(problems, 1.0, PRODUCTS)]  # one seeded draw each
    longs = [long for p in problems for step in p.steps if (long := long_form(step, PRODUCTS))]
    assert longs and all(any(long in response for response in written) for long in longs)
    assert not any(e.unscored for _, e in dev_examples(problems, 1.0, PRODUCTS))

    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1, lr=0.0,
                    long_form_rate=1.0, long_division=PRODUCTS, dist=HARDER)
    run = train(tmp_path, max_steps=2, **settings)
    assert run["dev_long_forms"] is True and "dev_remeasured" not in run
    older = {key: value for key, value in run.items() if key != "dev_long_forms"}  # as runs were recorded before
    (tmp_path / "training.json").write_text(json.dumps({**older, "dev_loss": 123.0}))
    resumed = train(tmp_path, max_steps=3, resume=True, **settings)
    assert resumed["dev_remeasured"] == {"step": run["steps"], "short_solutions": 123.0, "long_forms": run["dev_loss"]}
    assert (resumed["steps"], resumed["dev_loss"]) == (run["steps"], run["dev_loss"])  # lr 0: not beaten
    assert resumed["dev_long_forms"] is True
    again = train(tmp_path, max_steps=4, resume=True, **settings)
    assert again["dev_remeasured"] == resumed["dev_remeasured"]  # measured once, kept on
    short, (label, steps, losses) = dev_curves(again)  # the curves drawn: short solutions, then long forms
    assert short[0] == "dev (short solutions)" and short[1][-1] == run["steps"]
    assert label == "dev (long forms at the run's rate)" and steps == list(range(run["steps"], 5))
    assert losses[0] == run["dev_loss"] and len(dev_curves(run)) == 1
    with pytest.raises(ValueError, match=r"long_division 'remainders' \(the run has 'products'\)"):
        train(tmp_path, max_steps=5, resume=True, **{**settings, "long_division": REMAINDERS})
    with pytest.raises(ValueError, match=r"long_form_rate 0.3 \(the run has 1.0\)"):
        train(tmp_path, max_steps=5, resume=True, **{**settings, "long_form_rate": 0.3})


def test_a_resumed_report_keeps_the_settings_of_the_pieces_up_to_its_kept_step():
    from modelkit.train import _kept_segments

    speed = {"device": "cpu", "threads": 2, "bf16": False, "compiled": False, "micro_batches": 8}
    segments = [{"from_step": 1, **speed, "bf16": True}, {"from_step": 2934, **speed}, {"from_step": 3601, **speed}]
    assert _kept_segments({"steps": 3500, "segments": segments}) == segments[:2]  # steps after 3,500 were dropped
    older = {"steps": 3500, "resumed": [2933, 3000], **speed}  # written before segments were recorded
    assert _kept_segments(older) == [{"from_step": 3001, **speed}]
    assert _kept_segments({"steps": 300, **speed}) == [{"from_step": 1, **speed}]


def test_bf16_autocast_and_compiled_training_learn_like_the_plain_run(tmp_path):
    """The speed settings of a GPU run, on CPU: same batches and starting weights, so the same dev losses up to
    rounding, and recorded in training.json."""
    from modelkit.train import train

    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1, max_steps=2)
    plain = train(tmp_path / "plain", **settings)
    fast = train(tmp_path / "fast", bf16=True, compile_model=True, **settings)
    assert (fast["bf16"], fast["compiled"], plain["bf16"], plain["compiled"]) == (True, True, False, False)
    assert [h["dev_loss"] for h in fast["history"]] == pytest.approx([h["dev_loss"] for h in plain["history"]],
                                                                      rel=1e-2)
    assert json.loads((tmp_path / "fast" / "training.json").read_text())["compiled"] is True


def test_micro_batches_give_the_gradient_of_the_whole_batch_with_less_padding(tmp_path):
    from modelkit.train import _batches, train

    tokenizer = _harder_tokenizer(tmp_path)
    (whole,), = _batches(tokenizer, tmp_path, range(1, 2), 0, 0, (16, 0.5, HARDER, 0.0))
    pieces, = _batches(tokenizer, tmp_path, range(1, 2), 0, 0, (16, 0.5, HARDER, 0.0), 4)
    assert len(pieces) == 4 and sum(len(ids) for ids, _, _ in pieces) == len(whole[0])
    assert sorted(int(row.sum()) for _, mask, _ in pieces for row in mask) == sorted(int(r.sum()) for r in whole[1])
    assert sum(ids.size for ids, _, _ in pieces) < whole[0].size  # less padding
    settings = dict(hidden_size=64, layers=1, batch_size=8, eval_every=1, dev_problems=4, threads=1, max_steps=3,
                    lr=1.0)  # 0.01-0.03 in the warm-up: steps large enough for a wrong gradient to show
    one, four = train(tmp_path / "one", **settings), train(tmp_path / "four", micro_batches=4, **settings)
    assert one["history"][-1]["dev_loss"] < 0.9 * one["history"][0]["dev_loss"]
    assert [h["dev_loss"] for h in four["history"]] == pytest.approx([h["dev_loss"] for h in one["history"]],
                                                                      rel=1e-3)
    assert [h["train_loss"] for h in four["history"]] == pytest.approx([h["train_loss"] for h in one["history"]],
                                                                        rel=1e-3)
    assert four["micro_batches"] == 4


def test_a_step_in_pieces_computes_the_gradient_of_the_whole_batch(tmp_path):
    """The gradient itself, before the optimizer moves anything: a wrong weight per piece would show here."""
    import torch
    from transformers import Qwen2ForCausalLM

    from modelkit.train import _batches, _model_config, _train_step

    tokenizer = _harder_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_model_config(tokenizer, 64, 1))
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights as they are

    def gradient(parts: int):
        pieces, = _batches(tokenizer, tmp_path, range(1, 2), 0, 0, (16, 0.5, HARDER, 0.0), parts)
        loss = _train_step(model, model, frozen, pieces, "cpu", bf16=False)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    (whole_loss, whole), (pieces_loss, pieces) = gradient(1), gradient(4)
    assert pieces_loss == pytest.approx(whole_loss, rel=1e-6)
    assert float((pieces - whole).norm() / whole.norm()) < 1e-5


def test_data_workers_draw_the_same_batches_in_the_same_order(tmp_path):
    """Each step's batch comes from its own stream, so worker processes change nothing but the speed."""
    from modelkit.train import _batches

    tokenizer = _harder_tokenizer(tmp_path)
    draw = (3, 0.5, HARDER, 0.3)  # long forms too: the workers draw them from the same streams

    def lists(batches):  # each step's pieces of (ids, mask, labels) arrays as plain lists, comparable with ==
        return [[[a.tolist() for a in arrays] for arrays in pieces] for pieces in batches]

    here = lists(_batches(tokenizer, tmp_path, range(4, 14), 0, 0, draw))
    assert lists(_batches(tokenizer, tmp_path, range(4, 14), 2, 0, draw)) == here
    assert here[0] != here[1] and lists(_batches(tokenizer, tmp_path, range(5, 6), 0, 0, draw)) == here[1:2]


def test_dev_report_measures_greedy_by_steps_and_sampling(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from modelkit.make_model import train_tokenizer
    from modelkit.train import _tokenizer_corpus, dev_report

    tokenizer = train_tokenizer(tmp_path, _tokenizer_corpus(0, DEFAULT_DISTRIBUTION)[:200], vocab_size=300,
                                split_digits=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                         head_dim=64, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    problems = make_problems(3, 8)
    report = dev_report(model, tokenizer, problems, temperatures=(1.0,), samples=2)
    assert report["problems"] == 3 and report["greedy"] == 0.0  # random weights answer nothing right
    assert set(report["greedy_by_steps"]) == {str(p.changes) for p in problems}
    assert set(report["sampled"]["1.0"]) == {"one_sample", "pass@2", "reflects"}


def test_the_schedule_halves_on_plateaus_and_rolls_back_a_spike():
    from modelkit.train import Schedule, Verdict

    schedule = Schedule(rate=1.0, patience=2, max_decays=2)
    verdicts = [schedule.observe(loss) for loss in (1.0, 0.5, 0.499, 0.498)]
    assert verdicts == [Verdict.BEST, Verdict.BEST, Verdict.BEST, Verdict.BEST]
    assert (schedule.rate, schedule.decays) == (0.5, 1)  # two evaluations less than 0.5% better: a plateau
    assert schedule.observe(1.5) is Verdict.ROLL_BACK and (schedule.rate, schedule.decays) == (0.25, 2)
    assert schedule.best == 0.498  # the spike does not count as the run's dev loss
    assert schedule.observe(0.4) is Verdict.BEST and schedule.observe(0.41) is Verdict.GO_ON
    assert schedule.observe(0.42) is Verdict.CONVERGED  # a plateau after the last halving
    assert Schedule(1.0, 2, 0, best=0.1).observe(float("nan")) is Verdict.DIVERGED  # no halving left


def test_a_diverging_run_goes_back_to_its_best_weights_at_half_the_rate(tmp_path, monkeypatch):
    """A dev loss over DIVERGENCE times the best (faked here) rolls the model back to the kept weights, with fresh
    optimizer moments and a new warm-up, and training.json says where."""
    import torch

    import modelkit.train as training

    losses, weights = iter([1.0, 0.5, 5.0, 0.6, 0.45, 0.44]), []

    def fake_dev_loss(model, tokenizer, batches):
        weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return next(losses)

    monkeypatch.setattr(training, "dev_loss", fake_dev_loss)
    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1, lr=1.0)
    report = training.train(tmp_path, max_steps=5, **settings)
    assert report["rolled_back"] == [3] and [h["lr"] for h in report["history"]] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert (report["steps"], report["dev_loss"]) == (5, 0.45) and report["stopped"] == "max_steps"
    step_2, step_3, step_4 = weights[1:4]
    # step 4 is one warm-up step (lr 0.5/100) from step 2's weights, step 3 one step of lr 3/100 away
    assert (step_4 - step_2).abs().max() < (step_3 - step_2).abs().max() / 2
    assert training.train(tmp_path, max_steps=6, resume=True, **settings)["rolled_back"] == [3]


def test_training_curves_draws_runs_side_by_side_and_names_bad_input(tmp_path, capsys):
    """``forest training-curves``: runs read from a model directory or a training.json, drawn as PNG and SVG;
    a spec without a label, a repeated label, a missing report and a file that is not a report exit 2 saying so."""
    def report(losses, resumed=()):
        return {"history": [{"step": 100 * (i + 1), "dev_loss": loss, "dev_greedy_accuracy": 0.1 * i}
                            for i, loss in enumerate(losses)], "resumed": list(resumed)}

    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "training.json").write_text(json.dumps(report([0.4, 0.2, 0.1])))
    (tmp_path / "cpu.json").write_text(json.dumps(report([0.5, 0.3], resumed=[100])))
    prefix = tmp_path / "curves"
    assert main(["training-curves", f"gpu={tmp_path / 'gpu'}", f"cpu={tmp_path / 'cpu.json'}",
                 "--plot", str(prefix)]) == 0
    assert f"{prefix}.png" in capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "curves.svg").stat().st_size > 0

    (tmp_path / "other.json").write_text(json.dumps({"seed": 0}))
    for args, message in [([str(tmp_path / "cpu.json")], "expected LABEL=PATH"),
                          ([f"a={tmp_path / 'cpu.json'}", f"a={tmp_path / 'gpu'}"], "the label 'a' is given twice"),
                          ([f"a={tmp_path / 'missing'}"], "missing: no such file"),
                          ([f"a={tmp_path / 'other.json'}"], "no evaluations under 'history'")]:
        assert main(["training-curves", *args, "--plot", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_each_worked_step_is_named_by_its_kind():
    """``kinds`` lines up with ``steps``; the solution itself has no wrong step, a changed one is found."""
    operators = {"gain": {"+"}, "loss": {"-"}, "bags": {"×", "+"}, "multiply": {"×"}, "split": {"÷"}}
    for problem in make_problems(200, seed=9, dist=HARDER):
        assert len(problem.kinds) == len(problem.steps) == problem.changes + 2
        assert (problem.kinds[0], problem.kinds[-1]) == (START, CONCLUSION)
        for kind, step in zip(problem.kinds[1:-1], problem.steps[1:-1], strict=True):
            assert set(re.findall(r" ([-+×÷]) ", step)) == operators[kind], (kind, step)
        assert first_wrong_step(problem, problem.solution) is None
        wrong = problem.solution.replace(problem.steps[-2], problem.steps[-2] + "0")
        assert first_wrong_step(problem, wrong) == (len(problem.steps) - 2, problem.steps[-2] + "0")
        assert first_wrong_step(problem, problem.solution.split(STEP_DELIMITER)[0]) == (1, "")
        assert step_count(problem.steps[-2]) == step_count(problem.steps[-1]) == problem.answer
    assert {k for p in make_problems(200, seed=9, dist=HARDER) for k in p.kinds[1:-1]} == set(operators)
    assert set(operators) == set(CHANGE_KINDS)
    assert step_count("Ann loses 79, so 49 - 79 = -30.") == "-30"  # a slip carried forward, not a right 30


def _check_long_form(step: str, long: str, division: str = REMAINDERS) -> None:
    """``long`` works ``step``'s product or division in parts, each part right, and leaves the same count."""
    assert step_count(long) == step_count(step)
    assert long.startswith(step.split(" = ")[0].split(", so ")[0]) and long.endswith(step.split(", so ")[-1])
    if " × " in step:
        parts = re.search(r"(\d+) × (\d+) = \d+ × (\d+) \+ \d+ × (\d+)", long)
        bags, size, tens, units = (int(n) for n in parts.groups())
        assert tens + units == size and tens % 10 == 0 and 0 < units < 10
        assert f"= {bags * tens} + {bags * units} = {bags * size}, so " in long
        return
    split = re.search(r"so (\d+) ÷ (\d+) = (\d+) remainder (\d+)", step)
    total, piles, quotient, left = (int(n) for n in split.groups())
    if division == REMAINDERS:  # the last match is the whole division
        parts = [tuple(map(int, m)) for m in re.findall(r"(\d+) ÷ (\d+) = (\d+) remainder (\d+)", long)][:-1]
    else:  # each digit times the divisor, then the subtraction that leaves its remainder
        products = re.findall(r"(\d+) ÷ (\d+) = (\d+), (\d+) × (\d+) = (\d+), (\d+) - (\d+) = (\d+)", long)
        assert " remainder " not in long.split(f" ÷ {piles}: ")[1].split(", so ")[0]
        parts = []
        for part, divisor, q, q_again, divisor_again, product, part_again, product_again, r in (
                tuple(map(int, m)) for m in products):
            assert (q_again, divisor_again, part_again, product_again) == (q, divisor, part, product)
            assert product == q * divisor and r == part - product
            parts.append((part, divisor, q, r))
    digits, rest = "", None
    for part, divisor, q, r in parts:  # each part is the last remainder with the next digit brought down
        assert divisor == piles and (q, r) == divmod(part, piles) and q < 10
        assert rest is None or part % 10 == part - rest * 10 and part // 10 == rest
        digits, rest = digits + str(q), r
    assert (int(digits), rest) == (quotient, left) and str(total).endswith(str(parts[-1][0] % 10))


@pytest.mark.parametrize("division", LONG_DIVISIONS)
def test_long_forms_work_the_hard_steps_in_parts_and_leave_the_same_count(division):
    forms = {"bags": 0, "split": 0}
    for problem in make_problems(300, seed=11, dist=HARDER):
        for kind, step in zip(problem.kinds, problem.steps, strict=True):
            long = long_form(step, division)
            if kind not in forms:
                assert long is None, step
                continue
            numbers = [int(n) for n in re.findall(r"\d+", step)]
            short = numbers[1] % 10 == 0 or numbers[1] < 10 if kind == "bags" else numbers[3] < 10
            assert (long is None) == short, step  # a one-digit or a round factor, a one-digit quotient: no parts
            if long:
                _check_long_form(step, long, division)
                other = long_form(step, next(d for d in LONG_DIVISIONS if d != division))
                assert (long == other) == (kind == "bags")  # only divisions differ by form
                forms[kind] += 1
    assert min(forms.values()) > 20, forms


def test_the_long_division_forms_read_as_written():
    step = "Ann keeps one of 12 piles, so 1204 ÷ 12 = 100 remainder 4, which leaves 100."
    assert long_form(step) == long_form(step, REMAINDERS) == (
        "Ann keeps one of 12 piles, so 1204 ÷ 12: 12 ÷ 12 = 1 remainder 0, 0 ÷ 12 = 0 remainder 0, "
        "4 ÷ 12 = 0 remainder 4, so 1204 ÷ 12 = 100 remainder 4, which leaves 100.")
    assert long_form(step, PRODUCTS) == (
        "Ann keeps one of 12 piles, so 1204 ÷ 12: 12 ÷ 12 = 1, 1 × 12 = 12, 12 - 12 = 0, 0 ÷ 12 = 0, 0 × 12 = 0, "
        "0 - 0 = 0, 4 ÷ 12 = 0, 0 × 12 = 0, 4 - 0 = 4, so 1204 ÷ 12 = 100 remainder 4, which leaves 100.")
    with pytest.raises(ValueError, match="division must be one of remainders, products; got 'digits'"):
        long_form(step, "digits")


def test_training_examples_write_hard_steps_the_long_way_at_their_rate():
    problems = make_problems(300, seed=12, dist=HARDER)
    hard = sum(long_form(step) is not None for p in problems for step in p.steps)
    assert hard > 100
    # rate 0 draws nothing more: the examples (and the stream after them) are those of a run without long forms
    plain, without = random.Random(4), random.Random(4)
    assert [make_training_example(plain, p, reflection_rate=0.15, long_form_rate=0.0) for p in problems] == [
        make_training_example(without, p, reflection_rate=0.15) for p in problems]
    assert plain.random() == without.random()
    for rate, low, high in [(1.0, hard, hard), (0.3, 0.2 * hard, 0.4 * hard)]:
        rng, written = random.Random(5), 0
        for p in problems:
            example = make_training_example(rng, p, reflection_rate=0.15, long_form_rate=rate)
            assert extract_answer(example.response) == p.answer
            redo = split_response(example.response)[0].split(REFLECTION_PHRASE)[-1].strip().split(STEP_DELIMITER)
            assert [step_count(s) for s in redo] == [step_count(s) for s in p.steps]
            written += sum(s not in p.steps for s in redo)
            assert first_wrong_step(p, _response_of(redo, p.answer)) is None, "a long form is a right step"
        assert low <= written <= high, (rate, written, hard)
    # the products form: drawn as often (the same draws), and right steps too
    remainders, products = random.Random(6), random.Random(6)
    for p in problems:
        example = make_training_example(products, p, reflection_rate=0.15, long_form_rate=1.0, long_division=PRODUCTS)
        assert example.unscored == make_training_example(remainders, p, reflection_rate=0.15,
                                                         long_form_rate=1.0).unscored
        redo = split_response(example.response)[0].split(REFLECTION_PHRASE)[-1].strip().split(STEP_DELIMITER)
        assert redo == [long_form(s, PRODUCTS) or s for s in p.steps]
        assert first_wrong_step(p, _response_of(redo, p.answer)) is None


def test_a_long_form_rate_outside_zero_to_one_is_refused(tmp_path, capsys):
    from modelkit.train import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--output", str(tmp_path), "--long-form-rate", "1.5"])
    assert exit_info.value.code == 2
    assert "--long-form-rate is a share, from 0 to 1; got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--output", str(tmp_path), "--long-division", "digits"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # Python versions differ in how they quote the choices
    assert "--long-division: invalid choice: 'digits'" in err and "remainders" in err and "products" in err
    assert not (tmp_path / "training.json").exists()


def _response_of(steps: list[str], answer: str) -> str:
    return "<Thought>\n" + STEP_DELIMITER.join(steps) + f"\n</Thought>\n<Output>\n{answer}\n</Output>"


@pytest.mark.parametrize("division", LONG_DIVISIONS)
def test_a_wrong_part_of_a_long_form_is_a_wrong_step(division):
    problem = next(p for p in make_problems(100, seed=13, dist=HARDER)
                   if any(long_form(s) and " ÷ " in s for s in p.steps))
    at = next(i for i, s in enumerate(problem.steps) if long_form(s) and " ÷ " in s)
    long = long_form(problem.steps[at], division)
    wrong = re.sub(r"( remainder | - \d+ = )", r"\g<1>1", long, count=1)  # a part's remainder gains a digit
    assert wrong != long
    steps = [*problem.steps[:at], wrong, *problem.steps[at + 1:]]
    assert first_wrong_step(problem, _response_of(steps, problem.answer)) == (at, wrong)
