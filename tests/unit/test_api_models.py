"""The OpenAI request fields on a hand-made tree: n, stop, logprobs, content parts, refused fields (no Ray)."""

import numpy as np
import pytest
from pydantic import ValidationError

from deploy import api_models as api
from search.driver import SearchResult, StopReason
from search.final import ranked_leaves
from search.protocol import NO_TOKEN, TOP_K, Chunk, FinishReason
from search.simulated import SimulatedTokenizer
from search.strategies import STRATEGIES
from search.tree import ROOT, Tree

TOK = SimulatedTokenizer()
RIGHT = "<Thought>1+1=2</Thought><Output>2 apples</Output>"
WRONG = "<Thought>1+1=3</Thought><Output>3 apples</Output>"
CUT = "<Thought>1+1"


def chunk(text: str, finish: FinishReason) -> Chunk:
    ids = np.asarray(TOK.encode(text), dtype=np.int32)
    n = len(ids)
    top_ids = np.full((n, TOP_K), NO_TOKEN, dtype=np.int32)
    top_ids[:, 0], top_ids[:, 1] = ids, TOK.ids["x"]
    top_lps = np.full((n, TOP_K), -np.inf, dtype=np.float32)
    top_lps[:, 0], top_lps[:, 1] = -0.1, -2.5
    return Chunk(ids, np.full(n, -0.1, dtype=np.float32), top_ids, top_lps, finish)


def handmade_tree() -> Tree:
    """Root children: a right line (value 0.9), its token-identical twin (0.95), a wrong line (0.4), a cut line."""
    t = Tree(TOK.encode("<|im_start|>user\nq<|im_end|>\n"), max_children=8)
    for text, finish, value in ((RIGHT, FinishReason.STOP, 0.9), (RIGHT, FinishReason.STOP, 0.95),
                                (WRONG, FinishReason.STOP, 0.4), (CUT, FinishReason.LENGTH, 0.99)):
        node = t.add_chunk(ROOT, chunk(text, finish))
        t.nodes["is_terminal"][node] = True
        t.nodes["visits"][node], t.nodes["value_sum"][node] = 1, value
    return t


@pytest.fixture
def tree():
    return handmade_tree()


def result_for(tree: Tree, leaf: int) -> SearchResult:
    ids = tree.path_token_ids(leaf)
    response = TOK.decode(ids.tolist())
    return SearchResult(tree, tree.path(leaf), ids, response, None, tree.mean_value(leaf), StopReason.ITERATIONS)


def request(**fields) -> api.ChatRequest:
    return api.ChatRequest.model_validate({"model": "forest-mcts-step",
                                           "messages": [{"role": "user", "content": "q"}], **fields})


def test_alternatives_are_distinct_lines_finished_first_then_by_value(tree):
    assert ranked_leaves(tree, TOK.decode, 3, 8) == [3, 2, 4]  # 1 repeats 2's tokens; the cut line comes last
    assert ranked_leaves(tree, TOK.decode, 4, 2) == [4, 2]
    assert ranked_leaves(tree, TOK.decode, 2, 1) == [2]


def test_n_choices_with_finish_reasons_and_stop(tree):
    lines = api.choices(result_for(tree, 2), request(n=3, stop=" "), TOK.decode)
    assert [(c.index, c.content, c.finish_reason) for c in lines] == [(0, "2", "stop"), (1, "3", "stop"),
                                                                       (2, "", "length")]
    assert lines[0].reasoning == "1+1=2" and lines[0].logprobs is None
    uncut = api.choices(result_for(tree, 2), request(), TOK.decode)
    assert [(c.content, c.finish_reason) for c in uncut] == [("2 apples", "stop")]


def test_logprobs_split_the_answer_tokens_from_the_reasoning(tree):
    (line,) = api.choices(result_for(tree, 3), request(logprobs=True, top_logprobs=2, stop="apples"), TOK.decode)
    content, reasoning = line.logprobs["content"], line.logprobs["reasoning_content"]
    assert "".join(e["token"] for e in content) == "3 " == line.content
    assert "".join(e["token"] for e in reasoning) == "<Thought>1+1=3</Thought><Output>"
    first = content[0]
    assert first["logprob"] == pytest.approx(-0.1) and first["bytes"] == list(b"3")
    assert [t["token"] for t in first["top_logprobs"]] == ["3", "x"]
    (none,) = api.choices(result_for(tree, 3), request(logprobs=True), TOK.decode)
    assert none.logprobs["content"][0]["top_logprobs"] == []


def test_forced_tokens_have_null_logprobs(tree):
    forced = tree.add_forced(ROOT, TOK.encode("<Output>5</Output>"))
    tree.nodes["is_terminal"][forced] = True
    logprobs = api.line_logprobs(tree, forced, TOK.decode, "5", TOP_K)
    assert [e["logprob"] for e in logprobs["content"]] == [None]


def test_text_content_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = request(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}])
    assert [api.prompt_role(m.role) for m in body.messages] == ["system", "user"]
    assert body.messages[1].text == "a\nb"
    assert api.request_problem(body, STRATEGIES["mcts-step"], max_choices=8) is None


@pytest.mark.parametrize("fields, field", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"store": True}, "store"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"n": 9}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "tool", "content": "42"}, {"role": "user", "content": "q"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
])
def test_fields_forest_cannot_honour_are_named(fields, field):
    problem = api.request_problem(request(**fields), STRATEGIES["mcts-step"], max_choices=8)
    assert problem is not None and problem[0] == field and problem[1]


def test_neutral_values_and_bookkeeping_fields_pass():
    body = request(frequency_penalty=0, tool_choice="none", response_format={"type": "text"}, store=False,
                   modalities=["text"], user="u1", metadata={"k": "v"}, some_future_field=1, n=2,
                   max_tokens=7, max_completion_tokens=7, logprobs=True, top_logprobs=TOP_K)
    assert api.request_problem(body, STRATEGIES["mcts-step"], max_choices=8) is None
    assert body.path_tokens == 7
    assert api.request_problem(request(n=2), STRATEGIES["greedy"], max_choices=8)[0] == "n"


@pytest.mark.parametrize("fields, loc", [
    ({"messages": [{"role": "user", "content": 5}]}, ("messages", 0, "content")),
    ({"stop": ["a", "b", "c", "d", "e"]}, ("stop",)),
    ({"stop": [""]}, ("stop",)),
    ({"top_logprobs": 21}, ("top_logprobs",)),
    ({"n": 0}, ("n",)),
])
def test_malformed_fields_fail_validation_at_their_place(fields, loc):
    with pytest.raises(ValidationError) as err:
        request(**fields)
    assert err.value.errors()[0]["loc"] == loc


def test_stop_cuts_at_the_earliest_string():
    assert api.apply_stop("12 apples. Done", [".", " "]) == ("12", True)
    assert api.apply_stop("12", ["x"]) == ("12", False)


def test_the_readme_lists_every_refused_and_ignored_field():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in (*api.UNSUPPORTED_FIELDS, *api.IGNORED_FIELDS) if f"`{name}`" not in readme]
    assert not missing, missing
