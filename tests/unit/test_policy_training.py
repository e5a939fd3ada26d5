"""Fine-tuning the policy (``modelkit.policy``, ``forest train-policy``) from a tiny random model, and its inputs."""

import json

import numpy as np
import pytest

from dataset.exports import PAIR_FIELDS, SftDataError, read_pairs, read_sft
from dataset.value_labels import ValueExample
from deploy.cli import main as forest
from modelkit.arithmetic import make_problems
from modelkit.make_model import make_tiny_random
from search.params import StepCheck
from modelkit.policy import (DPO_REPORT, REPORT, PolicyDataError, line_examples, outcome_pairs, pair_examples,
                             response_loss, sequence_logprobs, sft_examples, train_dpo, train_policy)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_random(tmp_path_factory.mktemp("policy") / "tiny", seed=0, hidden_size=64)


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base)


def sft_file(path, problems) -> str:
    path.write_text("".join(json.dumps({"instruction": p.question, "response": p.solution}) + "\n"
                            for p in problems))
    return str(path)


def line(problem, tokens, correct) -> ValueExample:
    """A finished line of ``problem``: the prompt [1, 2, 3], then ``tokens``."""
    ids = np.asarray([1, 2, 3, *tokens], dtype=np.int32)
    return ValueExample(problem, ids, np.asarray([len(ids) - 1]), np.asarray([1.0], np.float32), correct, 3)


def test_a_tiny_fine_tune_lowers_the_loss_on_its_rows(base, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    rows = read_sft(sft_file(tmp_path / "sft.jsonl", make_problems(24, 5)))
    examples = sft_examples(rows, tokenizer)
    assert all(e.response_ids[-1] == tokenizer.eos_token_id for e in examples)
    before = response_loss(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), examples,
                           tokenizer.pad_token_id, "cpu")
    report = train_policy(examples, base=base, output=tmp_path / "tuned", epochs=6, batch_size=8, lr=3e-3,
                          eval_every=3, patience=10, dev_share=0.25, progress=False)
    after = response_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", torch_dtype=torch.float32),
                          examples, tokenizer.pad_token_id, "cpu")
    assert after < 0.8 * before, (before, after)
    assert report["dev_loss"] < report["base_dev_loss"] and report["kept_step"] > 0
    assert report["dev_problems"] == 6 and report["train_problems"] == 18
    assert (tmp_path / "tuned" / "tokenizer.json").is_file() and (tmp_path / "tuned" / REPORT).is_file()
    assert json.loads((tmp_path / "tuned" / "generation_config.json").read_text())["eos_token_id"] == \
        tokenizer.eos_token_id


def test_right_lines_of_trees_become_distinct_examples(tokenizer):
    lines = [line("a", [7, 8], True), line("a", [7, 8], True), line("a", [9], False), line("b", [5], True)]
    examples = line_examples(lines, tokenizer)
    assert [(e.problem_id, e.prompt_ids.tolist(), e.response_ids.tolist()) for e in examples] == [
        ("a", [1, 2, 3], [7, 8, tokenizer.eos_token_id]), ("b", [1, 2, 3], [5, tokenizer.eos_token_id])]


def test_skip_solved_keeps_the_right_lines_of_problems_with_a_wrong_line(tokenizer):
    lines = [line("solved", [7], True), line("solved", [8], True), line("mixed", [9], False),
             line("mixed", [5], True), line("mixed", [6], True), line("failed", [4], False)]
    every = line_examples(lines, tokenizer, per_problem=None)
    assert [e.problem_id for e in every] == ["solved", "solved", "mixed", "mixed"]
    assert [(e.problem_id, e.response_ids[:-1].tolist()) for e in line_examples(iter(lines), tokenizer,
                                                                                   skip_solved=True,
                                                                                   per_problem=None)] == [
        ("mixed", [5]), ("mixed", [6])]


def test_lines_per_problem_draws_that_many_of_each_problem_s_right_lines(tokenizer):
    lines = [line("a", [n], True) for n in (4, 5, 6, 7)] + [line("a", [8], False), line("b", [9], True)]

    def responses(examples):
        return [(e.problem_id, int(e.response_ids[0])) for e in examples]

    one = responses(line_examples(lines, tokenizer))  # the default: one line per problem
    assert [p for p, _ in one] == ["a", "b"] and one[0][1] in (4, 5, 6, 7) and one[1] == ("b", 9)
    assert one == responses(line_examples(lines, tokenizer, per_problem=1))
    firsts = {responses(line_examples(lines, tokenizer, seed=seed))[0][1] for seed in range(20)}
    assert len(firsts) > 1  # the seed draws the line
    two = responses(line_examples(lines, tokenizer, per_problem=2, seed=3))
    assert two == responses(line_examples(lines, tokenizer, per_problem=2, seed=3))
    assert [p for p, _ in two] == ["a", "a", "b"] and len({r for _, r in two}) == 3
    assert len(line_examples(lines, tokenizer, per_problem=None)) == 5
    with pytest.raises(ValueError, match="per_problem=0"):
        line_examples(lines, tokenizer, per_problem=0)


def test_a_step_check_leaves_out_the_right_lines_that_reach_the_answer_through_a_false_step(tokenizer):
    def text_line(problem, text):
        return line(problem, tokenizer.encode(text, add_special_tokens=False), True)

    sound, lucky = "So 137 + 81 = 218.\n<Output>\n436\n</Output>", "So 137 + 81 = 228.\n<Output>\n436\n</Output>"
    other = "So 9 × 6 = 55.\n<Output>\n54\n</Output>"
    lines = [text_line("a", sound), text_line("a", lucky), text_line("b", other)]

    def texts(examples):
        return [(e.problem_id, tokenizer.decode(e.response_ids[:-1].tolist())) for e in examples]

    assert texts(line_examples(lines, tokenizer, per_problem=None)) == [("a", sound), ("a", lucky), ("b", other)]
    assert texts(line_examples(lines, tokenizer, per_problem=None, check=StepCheck.ARITHMETIC)) == [("a", sound)]
    assert texts(line_examples(lines, tokenizer, check=StepCheck.ARITHMETIC, seed=5)) == [("a", sound)]


def test_outcome_pairs_cut_a_wrong_line_and_its_closest_right_line_where_they_part(tokenizer):
    end = tokenizer.eos_token_id
    lines = [line("a", [7, 8, 9], True), line("a", [7, 5, 9], True), line("a", [7, 5, 6, 4], False),
             line("a", [7, 5, 6, 4], False), line("a", [6], False), line("b", [5], False), line("c", [4], True)]
    pairs = outcome_pairs(lines, tokenizer)
    # the repeated wrong line pairs once; "b" has no right line and "c" no wrong one
    assert [(p.problem_id, p.chosen.prompt_ids.tolist(), p.chosen.response_ids.tolist(),
             p.rejected.prompt_ids.tolist(), p.rejected.response_ids.tolist()) for p in pairs] == [
        ("a", [1, 2, 3, 7, 5], [9, end], [1, 2, 3, 7, 5], [6, 4, end]),  # the right line sharing [7, 5]
        ("a", [1, 2, 3], [7, 8, 9, end], [1, 2, 3], [6, end])]  # parted at the first step: the first right line


@pytest.mark.parametrize("text, message", [
    ("", "no rows"),
    ('{"instruction": "q", "response": "r"}\n{not json\n', "line 2: not JSON"),
    ('{"instruction": "q"}\n', "line 1: expected an object"),
    ('["q", "r"]\n', "line 1: expected an object"),
    ('{"instruction": "q", "response": ""}\n', "line 1: expected an object"),
])
def test_a_bad_sft_file_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(text)
    with pytest.raises(SftDataError, match=message):
        read_sft(str(path))


def test_bad_inputs_fail_with_a_clear_error(base, tokenizer, tmp_path, capsys):
    with pytest.raises(SftDataError, match="cannot read"):
        read_sft(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PolicyDataError, match="no right lines"):
        train_policy([], base=base, output=tmp_path / "p")
    one_problem = sft_examples([{"instruction": "q", "response": "r"}], tokenizer)
    with pytest.raises(PolicyDataError, match="at least two problems"):
        train_policy(one_problem, base=base, output=tmp_path / "p")
    good = sft_file(tmp_path / "sft.jsonl", make_problems(4, 5))
    assert forest(["train-policy", "--sft", good, "--base", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) \
        == 2
    assert "not a model directory" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert forest(["train-policy", "--sft", str(tmp_path / "empty.jsonl"), "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "no rows" in capsys.readouterr().err
    assert forest(["train-policy", "--input", str(tmp_path / "no-build"), "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "no committed trees" in capsys.readouterr().err


def test_the_data_loop_evaluates_without_the_builds_stop_when_right():
    """The loop's builds stop each tree at a right line; its greedy evaluations read the same config, and forest eval
    refuses that setting, so the evaluation config drops it."""
    from cluster.config import load_config
    from deploy.data_loop import eval_config

    config = load_config("deploy/configs/data-loop.cpu.yaml")
    assert config.search.stop_when_right
    evaluated = eval_config(config, "models/other")
    assert not evaluated.search.stop_when_right and evaluated.engine.model == "models/other"
    assert evaluated.search.step_check is config.search.step_check


def test_the_data_loop_plot_has_a_line_per_method(tmp_path):
    from deploy.data_loop import BASE, plot

    def row(method, tokens, accuracy, fraction=1.0, rounds=1):
        return {"method": method, "fraction": fraction, "rounds": rounds, "build_tokens": tokens,
                "accuracy": accuracy, "ci_low": accuracy - 0.04, "ci_high": accuracy + 0.04}

    rows = [row(BASE, 0, 0.52, 0.0, 0), row("mcts", 1e5, 0.53, 0.5), row("mcts", 2e5, 0.55),
            row("best_of_n", 2e5, 0.54), row("mcts", 2e5, 0.57, rounds=2)]
    paths = plot(rows, str(tmp_path / "loop"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]
    svg = (tmp_path / "loop.svg").read_text()
    assert "fine-tuned on mcts lines" in svg and "fine-tuned on best_of_n lines" in svg and "base model" in svg
    assert "mcts, second half built by the round-1 model" in svg and "best_of_n, second half" not in svg


def test_the_data_loop_pairs_each_model_with_the_base_and_the_methods_at_the_same_share():
    from deploy.data_loop import BASE, paired

    def row(method, right, fraction=1.0, rounds=1):
        return {"method": method, "fraction": fraction, "rounds": rounds, "build_tokens": 100 * len(method),
                "right": right}

    rows = [row(BASE, [1, 0, 0, 0], 0.0, 0), row("mcts", [1, 1, 0, 0], 0.5), row("mcts", [1, 1, 1, 0]),
            row("best_of_n", [1, 0, 1, 0]), row("mcts", [1, 1, 1, 1], rounds=2), row("best_of_n", [0, 0, 0, 0],
                                                                                   rounds=2)]
    got = {(d["first"], d["second"]): d for d in paired(rows)}
    assert set(got) == {("mcts 50%", BASE), ("mcts 100%", BASE), ("best_of_n 100%", BASE),
                        ("mcts 100%, 2 rounds", BASE), ("best_of_n 100%, 2 rounds", BASE),
                        ("mcts 100%", "best_of_n 100%"), ("mcts 100%, 2 rounds", "best_of_n 100%, 2 rounds")}
    one = got[("mcts 100%", "best_of_n 100%")]
    assert one["difference"] == 0.25 and (one["only_first"], one["only_second"]) == (1, 0)
    assert (one["first_tokens"], one["second_tokens"]) == (400, 900)
    assert got[("mcts 100%, 2 rounds", "best_of_n 100%, 2 rounds")]["difference"] == 1.0


def pairs_file(path, problems, columns=PAIR_FIELDS) -> str:
    """Pairs whose chosen continuation is the right solution and whose rejected one ends with a wrong answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem_id": p.id, "question": p.question, "prefix": "", "chosen": p.solution,
             "rejected": p.solution.replace(f"<Output>\n{p.answer}", f"<Output>\n{int(p.answer) + 7}")}
            for p in problems]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), path)
    return str(path)


def test_a_dpo_pass_moves_the_policy_towards_the_chosen_lines(base, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = pairs_file(tmp_path / "pairs.parquet", make_problems(24, 7))
    pairs = pair_examples(read_pairs(path), tokenizer)

    def margin(model_dir) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        with torch.no_grad():
            chosen = sequence_logprobs(model, [p.chosen for p in pairs], tokenizer.pad_token_id, "cpu")
            rejected = sequence_logprobs(model, [p.rejected for p in pairs], tokenizer.pad_token_id, "cpu")
        return float((chosen - rejected).mean())

    assert forest(["train-policy", "--pairs", path, "--base", str(base), "--output", str(tmp_path / "dpo"),
                   "--epochs", "8", "--batch-size", "8", "--lr", "3e-3", "--beta", "0.5"]) == 0
    report = json.loads((tmp_path / "dpo" / DPO_REPORT).read_text())
    assert report["kept_step"] > 0 and report["dev_loss"] < report["base_dev_loss"]
    assert margin(tmp_path / "dpo") > margin(base) + 1.0
    assert (tmp_path / "dpo" / "tokenizer.json").is_file()


def test_the_supervised_term_adds_the_chosen_continuations_mean_token_loss(base, tokenizer, tmp_path):
    """RPO's term: ``sft_weight`` times each chosen continuation's next-token loss per token, averaged over pairs."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from modelkit.policy import dpo_loss

    pairs = pair_examples(read_pairs(pairs_file(tmp_path / "pairs.parquet", make_problems(6, 7))), tokenizer)
    pairs = [dataclasses.replace(p, ref_chosen=-5.0, ref_rejected=-9.0) for p in pairs]
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        plain, accuracy = dpo_loss(model, pairs, 0.1, pad, "cpu")
        with_term, same_accuracy = dpo_loss(model, pairs, 0.1, pad, "cpu", sft_weight=0.5)
        chosen = sequence_logprobs(model, [p.chosen for p in pairs], pad, "cpu")
    per_token = (-chosen / torch.tensor([len(p.chosen.response_ids) for p in pairs])).mean()
    assert float(with_term - plain) == pytest.approx(0.5 * float(per_token), rel=1e-5)
    assert float(per_token) > 1.0 and accuracy == same_accuracy  # a random model: the term is not negligible
    with pytest.raises(PolicyDataError, match="weight must be >= 0"):
        train_dpo(pairs, base=base, output=tmp_path / "o", sft_weight=-1.0)


def test_bad_pairs_are_refused_with_a_clear_error(base, tmp_path, capsys):
    from dataset.exports import PairsDataError

    with pytest.raises(PairsDataError, match="cannot read"):
        read_pairs(str(tmp_path / "missing.parquet"))
    old = pairs_file(tmp_path / "old.parquet", make_problems(3, 7), columns=("problem_id", "chosen", "rejected"))
    with pytest.raises(PairsDataError, match="no column question, prefix"):
        read_pairs(old)
    with pytest.raises(PairsDataError, match="no pairs"):
        read_pairs(pairs_file(tmp_path / "empty.parquet", []))
    held_out = pairs_file(tmp_path / "held.parquet", make_problems(3, 1_000_003))
    assert forest(["train-policy", "--pairs", held_out, "--base", str(base), "--output", str(tmp_path / "o")]) == 2
    assert "held-out seeds" in capsys.readouterr().err
    assert forest(["train-policy", "--base", str(base), "--output", str(tmp_path / "o")]) == 2
    assert "give --sft, --input or --pairs" in capsys.readouterr().err
    assert forest(["train-policy", "--sft", held_out, "--outcome-pairs", "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "--outcome-pairs needs --input" in capsys.readouterr().err
    assert forest(["train-policy", "--sft", held_out, "--skip-solved", "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "--skip-solved needs --input" in capsys.readouterr().err
    assert forest(["train-policy", "--sft", held_out, "--lines-per-problem", "2", "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "--lines-per-problem needs --input" in capsys.readouterr().err
    assert forest(["train-policy", "--sft", held_out, "--step-check", "arithmetic", "--base", str(base),
                   "--output", str(tmp_path / "o")]) == 2
    assert "--step-check needs --input" in capsys.readouterr().err
    for flag in ("--sft-weight", "--beta"):
        assert forest(["train-policy", "--sft", held_out, flag, "1", "--base", str(base),
                       "--output", str(tmp_path / "o")]) == 2
        assert f"{flag} is a setting of the DPO pass" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        forest(["train-policy", "--sft", held_out, "--lines-per-problem", "0", "--output", str(tmp_path / "o")])
    assert "'0': a whole number of at least 1, or 'all'" in capsys.readouterr().err
    with pytest.raises(PolicyDataError, match="no preference pairs"):
        train_dpo([], base=base, output=tmp_path / "o")


@pytest.mark.parametrize("keep_last", [False, True])
def test_fit_keeps_the_best_weights_or_the_last(tmp_path, keep_last):
    """A dev loss that only rises: the best-keeping loop keeps nothing and stops early; the last-keeping one trains
    every epoch and keeps the final weights once."""
    import torch

    from modelkit.fit import fit

    model = torch.nn.Linear(2, 1)
    dev_losses, kept = iter(range(1, 100)), []
    report = {"history": []}
    fit(model, list(range(40)), loss_of=lambda batch: model(torch.ones(len(batch), 2)).pow(2).mean(),
        evaluate=lambda: {"dev_loss": float(next(dev_losses))}, keep=lambda: kept.append(len(report["history"])),
        report=report, report_path=tmp_path / "report.json", seed=0, epochs=2, batch_size=4, lr=1e-3,
        warmup_steps=1, eval_every=2, patience=3, progress=False, name="toy", best=0.5, keep_last=keep_last)
    if keep_last:
        assert kept == [10] and report["kept_step"] == 20 and report["dev_loss"] == 10 and report["stopped"] == "epochs"
    else:
        assert kept == [] and "kept_step" not in report and report["stopped"] == "plateau"
        assert len(report["history"]) == 3


def test_train_policy_on_a_build_output_with_outcome_pairs(base, tmp_path, capsys):
    """``forest train-policy --input OUT --outcome-pairs`` end to end on a hand-made build output: the supervised pass
    on the right lines, then DPO on the pairs judged by the answers, both reports written."""
    from tests.unit.handmade_build import write_build

    out = write_build(tmp_path / "build", "5", problems=("p1", "p2", "p3"))  # per problem: 1 right line, 2 wrong
    tuned = tmp_path / "tuned"
    assert forest(["train-policy", "--input", out, "--outcome-pairs", "--base", str(base), "--output",
                   str(tuned), "--epochs", "2", "--batch-size", "2", "--keep", "last", "--sft-weight", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "3 right lines of 3 problems" in printed and "6 preference pairs of 3 problems" in printed
    sft, dpo = json.loads((tuned / REPORT).read_text()), json.loads((tuned / DPO_REPORT).read_text())
    assert sft["train_problems"] + sft["dev_problems"] == 3 and sft["keep"] == "last" and sft["kept_step"] > 0
    assert dpo["train_pairs"] + dpo["dev_pairs"] == 6 and dpo["base"] == str(tuned) and dpo["sft_weight"] == 0.5


def test_a_build_output_s_lines_are_selected_by_skip_solved_and_lines_per_problem(base, tmp_path, capsys):
    """``forest train-policy --input OUT`` end to end: ``--skip-solved`` leaves out the right lines of problems whose
    finished lines were all right; ``--lines-per-problem`` caps each problem's right lines (default one)."""
    from tests.unit.handmade_build import NODES_OF_TREE, write_build

    # s1: root -> A -> A1, its one finished line right; m1, m2: 1 right line and 2 wrong each
    out = write_build(tmp_path / "build", "5", problems=("s1", "m1", "m2"), nodes={"s1": NODES_OF_TREE[:3]})
    two_right = write_build(tmp_path / "two", "6", problems=("t1", "t2"))  # A2 and B1 right, A1 wrong
    cases = [(out, [], 3, 3), (out, ["--skip-solved"], 2, 2), (two_right, [], 2, 2),
             (two_right, ["--lines-per-problem", "all"], 4, 2), (two_right, ["--lines-per-problem", "2"], 4, 2)]
    for run, (build, flags, lines, problems) in enumerate(cases):
        tuned = tmp_path / f"tuned{run}"
        assert forest(["train-policy", "--input", build, *flags, "--base", str(base), "--output",
                       str(tuned), "--epochs", "1", "--batch-size", "2", "--keep", "last"]) == 0
        assert f"{lines} right lines of {problems} problems" in capsys.readouterr().out
        report = json.loads((tuned / REPORT).read_text())
        assert report["train_lines"] + report["dev_lines"] == lines
