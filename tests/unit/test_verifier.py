"""A verifier served by likelihood: the spans it scores, the line in its tokens, the score, its config, and its
training recipe."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from actors.pool import likelihood
from actors.tokenizer import HFTokenizer
from actors.value_input import Likelihood, LikelihoodInput, VerifierLine
from cluster.config import ForestConfig, load_config
from search.checks import EQUATION, marked_spans
from search.prompts import prompt_token_ids
from search.protocol import EngineError, ScoreRequest

POLICY = "models/forest-arith"
STEPS = ["<Thought>\nAnn starts with 3 apples.", "Ann gains 14, so 3 + 14 = 17.",
         "Ann splits them into 5 bags: 17 ÷ 5 = 3 remainder 2.", "</Thought>\n<Output>\n3\n</Output>"]


def test_marked_spans_are_the_named_groups_of_each_match_or_the_whole_match():
    text = "3 + 14 = 17, then 17 ÷ 5 = 3 remainder 2 and 2 x 2 = 4"
    assert [text[a:b] for a, b in marked_spans(EQUATION, text)] == ["17", "3", "2", "4"]
    assert [text[a:b] for a, b in marked_spans(re.compile(r"\d+ remainder"), text)] == ["3 remainder"]
    assert marked_spans(EQUATION, "no sums here") == []


@pytest.fixture(scope="module")
def line():
    """(token ids of prompt + line, prompt length, the index of each step's last token)."""
    tokenizer = HFTokenizer(POLICY)
    ids = list(prompt_token_ids(tokenizer, "Ann has 3 apples and wins 14 more. She splits them into 5 bags."))
    prompt, ends = len(ids), []
    for i, step in enumerate(STEPS):
        ids += tokenizer.encode(step + ("\n\n" if i < len(STEPS) - 1 else ""))
        ends.append(len(ids) - 1)
    return np.asarray(ids, dtype=np.int32), prompt, ends


@pytest.fixture(scope="module")
def reader():
    return LikelihoodInput(Likelihood(POLICY, EQUATION.pattern), POLICY)


def test_the_line_is_read_without_its_prompt_and_its_claimed_results_are_marked(reader, line):
    ids, prompt, ends = line
    rendered = reader.render(ScoreRequest(ids, (ends[0], ends[1], ends[3]), prompt_tokens=prompt))
    text = "\n\n".join(STEPS)
    assert reader.verifier.decode(rendered.token_ids.tolist()) == text
    marked = "".join(reader.verifier.decode([t]) for t in rendered.token_ids[rendered.marked])
    assert marked == "17" + "3" + "2"  # the bundled tokenizer writes a digit a token
    written = [reader.verifier.decode(rendered.token_ids[:cut].tolist()) for cut in rendered.cuts]
    assert written == ["\n\n".join(STEPS[:1]) + "\n\n", "\n\n".join(STEPS[:2]) + "\n\n", text]


def test_the_score_at_a_position_is_the_lowest_probability_of_a_result_written_up_to_it():
    marked = np.asarray([True, False, True, False, True, False])
    logprobs = np.log(np.asarray([np.nan, 0.9, 0.6, 0.1, 0.8, 0.05], dtype=np.float32))
    got = VerifierLine(np.arange(6, dtype=np.int32), marked, (2, 3, 5, 6)).scores(logprobs)
    # the first token has no probability; unmarked tokens (0.1, 0.05) never count; no result yet: 1
    assert got.dtype == np.float32 and np.allclose(got, [1.0, 0.6, 0.6, 0.6])


def test_requests_a_verifier_cannot_read_are_refused_with_the_reason(reader, line):
    ids, prompt, ends = line
    for request, message in [
            (ScoreRequest(ids, (len(ids) - 1,)), "needs the prompt's length"),
            (ScoreRequest(ids, (prompt - 1,), prompt_tokens=prompt), "must lie in the line"),
            (ScoreRequest(ids, (len(ids),), prompt_tokens=prompt), "must lie in the line"),
            (ScoreRequest(ids, (), prompt_tokens=prompt), "must lie in the line")]:
        with pytest.raises(EngineError, match=message):
            reader.render(request)


def test_prompt_logprobs_are_read_from_vllms_flat_logprobs():
    from actors.vllm_engine import _prompt_logprobs

    # position 0 holds nothing; each later position starts with the prompt token's own logprob
    flat = SimpleNamespace(start_indices=[0, 0, 2, 3], end_indices=[0, 2, 3, 5],
                           token_ids=[7, 1, 8, 9, 2], logprobs=[-0.5, -0.1, -1.5, -2.0, -0.2])
    got = _prompt_logprobs(flat, 4)
    assert math.isnan(got[0]) and got[1:].tolist() == pytest.approx([-0.5, -1.5, -2.0])


def test_value_likelihood_is_configured_beside_a_value_model_and_reaches_the_workers():
    config = load_config(None, **{"value_model.model": POLICY, "value_likelihood": {}, "search.value": "reward_model"})
    assert likelihood(config) == Likelihood(config.engine.model, EQUATION.pattern)
    assert config.search_identity()["value_likelihood"] == {"spans": EQUATION.pattern}
    assert likelihood(ForestConfig()) is None and "value_likelihood" not in ForestConfig().search_identity()
    # a causal LM is a verifier without the block (the default spans); a reward model is not
    assert likelihood(load_config(None, **{"value_model.model": POLICY})) == likelihood(config)
    assert likelihood(load_config(None, **{"value_model.model": "models/forest-value"})) is None
    with pytest.raises(ValueError, match="value_input.*is a causal LM, read as a verifier"):
        likelihood(load_config(None, **{"value_model.model": POLICY, "value_input.step_separator": "<extra_0>"}))
    with pytest.raises(ValueError, match="value_likelihood.*set value_model.model"):
        load_config(None, **{"value_likelihood": {}})
    with pytest.raises(ValueError, match="value_input.*reads the line as it is"):
        load_config(None, **{"value_model.model": POLICY, "value_likelihood": {},
                             "value_input.step_separator": "<extra_0>"})
    gated = load_config(None, **{"value_model.model": POLICY, "search.min_step_score": 0.5})
    assert gated.search.to_params().min_step_score == 0.5 and gated.search_identity()["search"]["min_step_score"] == 0.5
    assert "min_step_score" not in config.search_identity()["search"]  # unset: older builds keep their hash
    with pytest.raises(ValueError, match="min_step_score"):
        load_config(None, **{"search.min_step_score": 2})
    with pytest.raises(ValidationError, match="not a regular expression"):
        load_config(None, **{"value_model.model": POLICY, "value_likelihood.spans": "= (\\d+"})


def test_verifier_training_learns_the_claimed_digits_and_keeps_its_best_weights(tmp_path):
    """A few steps from the bundled policy lower the dev loss on the claimed digits; the kept weights load."""
    import json

    from transformers import AutoModelForCausalLM

    from modelkit.verifier import REPORT, train_verifier

    report = train_verifier(base=POLICY, output=tmp_path, steps=12, batch_size=16, lr=1e-3, eval_every=6,
                            dev_problems=32, threads=2, progress=False)
    assert report["dev_loss"] < report["start"]["dev_loss"]
    assert json.loads((tmp_path / REPORT).read_text())["kept_step"] == report["kept_step"] in (6, 12)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.architectures == ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_verifier(base=POLICY, output=tmp_path, steps=0)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        train_verifier(base=tmp_path / "none", output=tmp_path)


def test_the_generator_writes_solutions_as_the_policy_was_trained_to(tmp_path):
    """The verifier learns solutions of its policy's ranges, long forms included: the easy model's are the short
    solutions of the easy ranges; the bundled model writes some hard steps the long way, on the default ranges."""
    import json
    import shutil

    from modelkit.arithmetic import DEFAULT_DISTRIBUTION, Distribution, make_problems
    from modelkit.verifier import generator_solutions, policy_writing
    from search.prompts import TURN_END

    easy = policy_writing("models/forest-arith-easy")
    assert easy["distribution"] == Distribution(start=(10, 199), changes=(1, 5), max_count=999, max_gain=99,
                                                max_bags=9, max_bag_size=12, max_factor=3, max_piles=9)
    assert easy["long_form_rate"] == 0.0
    short_easy = [p.solution + TURN_END for p in make_problems(20, 7, easy["distribution"])]
    assert generator_solutions(20, 7, easy) == short_easy
    bundled = policy_writing(POLICY)
    assert bundled["distribution"] == DEFAULT_DISTRIBUTION and bundled["long_form_rate"] > 0
    written = generator_solutions(40, 7, bundled)
    short = [p.solution + TURN_END for p in make_problems(40, 7)]
    assert written != short and sum(w == s for w, s in zip(written, short, strict=True)) > 0  # some steps long, not all
    assert policy_writing(tmp_path)["distribution"] == DEFAULT_DISTRIBUTION  # no training.json: trained elsewhere
    shutil.copy(f"{POLICY}/training.json", tmp_path / "training.json")
    record = json.loads((tmp_path / "training.json").read_text())
    del record["distribution"]
    (tmp_path / "training.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="no 'distribution'"):
        policy_writing(tmp_path)


def test_train_verifier_learns_from_the_right_lines_of_builds_and_refuses_what_it_cannot_use(tmp_path, capsys):
    import json

    from transformers import AutoTokenizer

    from deploy.cli import main as forest
    from deploy.flags import EXIT_USAGE
    from modelkit.verifier import REPORT
    from tests.unit.handmade_build import node, write_build

    tokenizer = AutoTokenizer.from_pretrained(POLICY)

    def tree(first: str):
        texts = [first, "</Thought>\n<Output>\n5\n</Output>", "<Thought>\nAnn has 5.\n\n", "</Thought>\n<Output>\n6\n"]
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return [node(0, -1, [], ""), node(1, 0, ids[0], texts[0]), node(2, 1, ids[1], texts[1], terminal=True),
                node(3, 0, ids[2], texts[2]), node(4, 3, ids[3], texts[3], terminal=True)]

    problems = [f"p{i}" for i in range(4)]
    build = write_build(tmp_path / "build", "5", problems=problems,
                        nodes={p: tree(f"<Thought>\n{i} + {5 - i} = 5\n\n") for i, p in enumerate(problems)})
    args = ["train-verifier", "--output", str(tmp_path / "v"), "--steps", "2", "--batch-size", "2", "--threads", "2"]
    assert forest([*args, "--input", build]) == 0
    report = json.loads((tmp_path / "v" / REPORT).read_text())
    # the right line of each problem; the one that writes no equation ("Ann has 5.", wrong anyway) is not a lesson
    assert report["source"] == "builds" and report["train_lines"] + report["dev_solutions"] == 4
    held_out = write_build(tmp_path / "held-out", "5", problems=("arith-1000000-0",),
                           nodes={"arith-1000000-0": tree("<Thought>\n2 + 3 = 5\n\n")})
    assert forest([*args, "--input", held_out]) == EXIT_USAGE
    assert "held-out seeds" in capsys.readouterr().err
    no_sums = write_build(tmp_path / "no-sums", "5", problems=problems,
                          nodes={p: tree("<Thought>\nAnn has 5.\n\n") for p in problems})
    assert forest([*args, "--input", no_sums]) == EXIT_USAGE
    assert "write no equation" in capsys.readouterr().err
