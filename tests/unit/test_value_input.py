"""A line rendered in an off-the-shelf PRM's own format (``value_input``): chat template, step separators, and the
positions moved to them."""

import numpy as np
import pytest
from pydantic import ValidationError

from actors.pool import value_input
from actors.tokenizer import HFTokenizer
from actors.value_input import PRMInput, ValueInput
from cluster.config import ForestConfig, load_config
from search.prompts import build_chat_prompt, parse_chat_prompt, prompt_token_ids
from search.protocol import EngineError, ScoreRequest

POLICY = "models/forest-arith"
SEPARATOR = "<extra_0>"
PRM_SYSTEM = "Please reason step by step."
# Qwen2.5-Math-PRM's template in short: ChatML, a default system message when the conversation has none
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
QUESTION = "Ann has 3 apples. Then Ann wins 4 more. How many apples does Ann have now?"
STEPS = ["<Thought>\nAnn starts with 3 apples.", "Ann gains 4, so 3 + 4 = 7.",
         "So Ann has 7 apples.\n</Thought>\n<Output>\n7\n</Output>"]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """A tokenizer as a PRM's: the bundled one with the separator as a special token and its own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("models/forest-value")
    tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    tokenizer.chat_template = TEMPLATE
    out = tmp_path_factory.mktemp("prm")
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def line():
    """(token ids of prompt + line, prompt length, the index of each step's last token)."""
    tokenizer = HFTokenizer(POLICY)
    prompt = prompt_token_ids(tokenizer, QUESTION)
    ids, ends = list(prompt), []
    for i, step in enumerate(STEPS):
        ids += tokenizer.encode(step + ("\n\n" if i < len(STEPS) - 1 else ""))
        ends.append(len(ids) - 1)
    return np.asarray(ids, dtype=np.int32), len(prompt), ends


def renderer(prm_dir, system_prompt=PRM_SYSTEM):
    return PRMInput(ValueInput(POLICY, SEPARATOR, "\n\n", system_prompt), prm_dir)


def test_chat_prompts_parse_back_into_their_turns():
    turns = [("system", "Be brief."), ("user", "Hi\n\nthere"), ("assistant", "Hello"), ("user", "2 + 2?")]
    assert parse_chat_prompt(build_chat_prompt(turns)) == turns
    for text in ("Ann has 3 apples.", build_chat_prompt(turns) + "<Thought>", build_chat_prompt(turns)[20:]):
        with pytest.raises(ValueError, match="not a ChatML prompt"):
            parse_chat_prompt(text)


def test_a_line_is_rendered_in_the_prms_template_with_a_separator_after_each_step(prm_dir, line):
    from transformers import AutoTokenizer

    ids, prompt, ends = line
    request = ScoreRequest(ids, (ends[0], ends[1] - 3, len(ids) - 1), request_id="r1", prompt_tokens=prompt)
    rendered = renderer(prm_dir).render(request)
    prm = AutoTokenizer.from_pretrained(prm_dir)
    answer = "".join(step.strip() + SEPARATOR for step in STEPS)
    want = (f"<|im_start|>system\n{PRM_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")
    assert prm.decode(rendered.token_ids.tolist()) == want
    separators = np.flatnonzero(rendered.token_ids == prm.convert_tokens_to_ids(SEPARATOR)).tolist()
    assert len(separators) == len(STEPS)
    # the end of step 1; inside step 2 (scored where step 2 ends); the end of the line
    assert rendered.positions == (separators[0], separators[1], separators[2]) and rendered.request_id == "r1"


def test_the_line_is_cut_at_the_last_position_and_the_search_system_message_kept_without_one(prm_dir, line):
    from transformers import AutoTokenizer

    ids, prompt, ends = line
    rendered = renderer(prm_dir, system_prompt=None).render(ScoreRequest(ids, (ends[1],), prompt_tokens=prompt))
    text = AutoTokenizer.from_pretrained(prm_dir).decode(rendered.token_ids.tolist())
    assert text.startswith(build_chat_prompt([("user", QUESTION)]).split("<|im_start|>user")[0])
    assert text.endswith(f"{STEPS[1]}{SEPARATOR}<|im_end|>\n") and "So Ann has" not in text
    assert rendered.positions == (len(rendered.token_ids) - 3,)  # the separator, then <|im_end|> and "\n"


def test_requests_it_cannot_render_are_refused_with_the_reason(prm_dir, line):
    ids, prompt, ends = line
    prm = renderer(prm_dir)
    for request, message in [
            (ScoreRequest(ids, (len(ids) - 1,)), "needs the prompt's length"),
            (ScoreRequest(ids, (prompt - 1,), prompt_tokens=prompt), "before the line's first step"),
            (ScoreRequest(ids, (ends[0],), prompt_tokens=prompt + 2), "not a ChatML prompt")]:
        with pytest.raises(EngineError, match=message):
            prm.render(request)


def test_value_input_is_configured_beside_a_value_model_and_reaches_the_workers():
    config = load_config(None, **{"value_model.model": "models/forest-value", "value_input.step_separator": SEPARATOR,
                                  "value_input.system_prompt": PRM_SYSTEM, "search.value": "reward_model"})
    assert value_input(config) == ValueInput(config.engine.model, SEPARATOR, config.search.step_delimiter, PRM_SYSTEM)
    assert config.search_identity()["value_input"] == {"step_separator": SEPARATOR, "system_prompt": PRM_SYSTEM}
    assert value_input(ForestConfig()) is None and "value_input" not in ForestConfig().search_identity()
    with pytest.raises(ValueError, match="value_input.*set value_model.model"):
        load_config(None, **{"value_input.step_separator": SEPARATOR})
    with pytest.raises(ValidationError, match="step_separator"):
        load_config(None, **{"value_model.model": "models/forest-value", "value_input.step_separator": ""})


def test_scores_are_read_per_token_or_at_the_step_tags_of_a_step_pooled_prm():
    """vLLM pools a ``Qwen2ForProcessRewardModel`` at its step tag only: the rows are the tags, in order."""
    from actors.vllm_engine import score_rows

    tag = 9
    ids = np.asarray([1, 2, tag, 3, 4, tag, 5, tag])
    assert score_rows(ids, np.asarray([0, 6]), len(ids), None).tolist() == [0, 6]  # a row per token
    assert score_rows(ids, np.asarray([2, 7, 5]), 3, tag).tolist() == [0, 2, 1]
    with pytest.raises(EngineError, match=r"positions \[6\] are not one: set value_input.step_separator"):
        score_rows(ids, np.asarray([5, 6]), 3, tag)
    with pytest.raises(EngineError, match="returned 2 scores for 8 tokens"):
        score_rows(ids, np.asarray([2]), 2, tag)
    with pytest.raises(EngineError, match="returned 3 scores for 8 tokens"):
        score_rows(ids, np.asarray([2]), 3, None)
