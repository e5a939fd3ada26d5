"""The asynchronous MCTS driver and the baselines against the SIMULATED engine (no model)."""

import asyncio
import dataclasses
import itertools

import numpy as np
import pytest

from search import (STRATEGIES, Budget, ConfigError, EngineError, Granularity, MCTSParams, NodeKind,
                    ReflectionPolicy, StopReason, ValueKind, best_of_n, build_prompt, greedy, run_mcts,
                    self_consistency)
from search.baselines import best_of_n_prm
from search.simulated import ScoringSimulatedEngine, SimulatedEngine, SimulatedTokenizer
from search.values import reward_value
from search.tree import ROOT

TOK = SimulatedTokenizer()
PROMPT = TOK.encode(build_prompt("What is 6 times 7?"))
GOOD = set(TOK.word_ids[::2])  # a response whose first word is one of these is a good branch


def first_word(response):
    return int(response[1]) if len(response) > 1 else -1  # response[0] is <Thought>


def good_branch_quality(response):
    return 0.95 if first_word(response) in GOOD else 0.25


def search(engine=None, **overrides):
    params = MCTSParams(**{"budget": Budget(iterations=24), **overrides})
    return asyncio.run(run_mcts(engine or SimulatedEngine(TOK, seed=3), TOK, PROMPT, params))


def test_a_finished_search_holds_its_tree_without_spare_rows():
    tree = search(seed=2).tree
    assert len(tree.nodes["parent"]) == tree.num_nodes and len(tree.tokens["token_ids"]) == tree.num_tokens


def test_search_is_deterministic_for_a_seed():
    a = search(SimulatedEngine(TOK, seed=5), seed=11)
    b = search(SimulatedEngine(TOK, seed=5), seed=11)
    assert a.tree.num_nodes == b.tree.num_nodes
    assert np.array_equal(a.tree.columns()["visits"], b.tree.columns()["visits"])
    assert a.response == b.response and a.answer == "42"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_puts_most_root_visits_on_the_known_best_branch(seed):
    engine = SimulatedEngine(TOK, seed=seed, quality=good_branch_quality)
    result = search(engine, children=4, budget=Budget(iterations=48), early_stop=False)
    tree = result.tree
    root_children = tree.children(ROOT)
    good = [int(c) for c in root_children if int(tree.node_token_ids(c)[1]) in GOOD]
    assert 0 < len(good) < len(root_children), "the seed must give the root good and bad children"
    good_visits = tree.nodes["visits"][good].sum()
    assert good_visits > tree.nodes["visits"][ROOT] / 2
    assert first_word(result.response_token_ids) in GOOD


@pytest.mark.parametrize("iterations, parallel", [(1, 1), (7, 1), (7, 4), (30, 8)])
def test_iteration_budget_is_exact(iterations, parallel):
    engine = SimulatedEngine(TOK, seed=3, steps=50)  # deep enough never to be fully explored
    result = search(engine, budget=Budget(iterations=iterations), parallel=parallel, early_stop=False)
    assert result.stats.iterations == iterations
    assert result.tree.nodes["visits"][ROOT] == iterations
    assert result.stop_reason is StopReason.ITERATIONS
    assert not result.tree.nodes["virtual_loss"][: result.tree.num_nodes].any()


@pytest.mark.parametrize("tokens, granularity", list(itertools.product([1, 5, 17, 64, 200], ["step", "mini_step:4"])))
def test_token_budget_is_never_exceeded(tokens, granularity):
    path = 40
    result = search(budget=Budget(iterations=1000, tokens=tokens), granularity=Granularity.parse(granularity),
                    children=3, parallel=4, early_stop=False, max_path_tokens=path)
    stats = result.stats
    assert stats.generated_tokens <= tokens
    assert result.tree.generated_tokens + stats.duplicate_tokens == stats.generated_tokens
    if tokens >= 64:
        assert result.stop_reason is StopReason.TOKENS
        assert stats.generated_tokens > tokens - path  # it spends the budget, it does not stop early


@pytest.mark.parametrize("parallel", [1, 4])
def test_a_budget_of_one_path_still_finishes_a_line(parallel):
    """Until a line has ended, a rollout waits for the budget to cover a whole path; when nothing else is in flight
    it takes what is left instead, or a budget equal to the path limit would stop after the first expansion."""
    path = 120
    result = search(budget=Budget(iterations=1000, tokens=path), parallel=parallel, early_stop=False,
                    max_path_tokens=path)
    assert result.stats.generated_tokens <= path
    assert result.answer == "42" and result.tree.nodes["is_terminal"][: result.tree.num_nodes].any()


def test_wall_clock_budget_cancels_in_flight_requests():
    ticks = itertools.count()
    engine = SimulatedEngine(TOK, seed=1, latency_s=0.01, steps=10_000)  # never answers: the tree never ends
    params = MCTSParams(budget=Budget(iterations=10_000, seconds=40), parallel=4, early_stop=False,
                        max_path_tokens=64)
    result = asyncio.run(run_mcts(engine, TOK, PROMPT, params, clock=lambda: float(next(ticks))))
    assert result.stop_reason is StopReason.SECONDS
    assert result.stats.iterations < 10_000
    assert not result.tree.nodes["pending"][: result.tree.num_nodes].any()
    assert not result.tree.nodes["virtual_loss"][: result.tree.num_nodes].any()


def test_a_fully_explored_tree_stops_without_spending_the_iterations():
    result = search(SimulatedEngine(TOK, seed=1, steps=1), max_depth=2, budget=Budget(iterations=10_000),
                    early_stop=False)
    assert result.stop_reason is StopReason.EXHAUSTED
    assert result.stats.iterations < 100


def test_mini_step_chunks_have_exactly_n_tokens_unless_the_model_ends():
    result = search(granularity=Granularity.parse("mini_step:4"))
    tree = result.tree
    for node in range(1, tree.num_nodes):
        if tree.nodes["kind"][node] == NodeKind.CHUNK:
            length = len(tree.node_token_ids(node))
            assert length == 4 or tree.nodes["is_terminal"][node]


def test_step_chunks_end_at_the_delimiter():
    tree = search().tree
    delimiter = TOK.ids["\n\n"]
    for node in range(1, tree.num_nodes):
        if tree.nodes["kind"][node] == NodeKind.CHUNK and not tree.nodes["is_terminal"][node]:
            assert tree.node_token_ids(node)[-1] == delimiter


def test_depth_budget_makes_nodes_terminal():
    tree = search(max_depth=2, early_stop=False).tree
    depth = tree.nodes["depth"][: tree.num_nodes]
    chunk_nodes = tree.nodes["kind"][: tree.num_nodes] == NodeKind.CHUNK
    assert depth[chunk_nodes].max() <= 2
    assert tree.nodes["is_terminal"][: tree.num_nodes][chunk_nodes & (depth == 2)].all()


def test_depth_is_the_distance_from_the_root_for_every_node():
    tree = search(early_stop=False).tree
    parents = tree.nodes["parent"][1: tree.num_nodes]
    assert (tree.nodes["depth"][1: tree.num_nodes] == tree.nodes["depth"][parents] + 1).all()
    rollouts = tree.nodes["kind"][: tree.num_nodes] == NodeKind.ROLLOUT
    assert rollouts.any()  # rollouts included


def test_chunk_confidence_value_runs_no_rollouts():
    engine = SimulatedEngine(TOK, seed=2)
    result = search(engine, value=ValueKind.CHUNK_CONFIDENCE)
    assert not (result.tree.nodes["kind"][: result.tree.num_nodes] == NodeKind.ROLLOUT).any()
    assert all("\n\n" in r.stop for r in engine.requests)  # expansions only: a rollout has no step stop


def test_answer_check_value_rewards_the_reference():
    def answer(response):
        return "42" if first_word(response) in GOOD else "41"

    engine = SimulatedEngine(TOK, seed=0, answer=answer)
    params = MCTSParams(value=ValueKind.ANSWER_CHECK, budget=Budget(iterations=24), children=4, early_stop=False)
    result = asyncio.run(run_mcts(engine, TOK, PROMPT, params, reference="42"))
    tree = result.tree
    chunks = tree.nodes["kind"][: tree.num_nodes] == NodeKind.CHUNK
    visits, sums = tree.nodes["visits"][: tree.num_nodes][chunks], tree.nodes["value_sum"][: tree.num_nodes][chunks]
    assert np.array_equal(sums, np.round(sums)) and (sums <= visits).all()  # every value is 0 or 1
    assert result.answer == "42"


def reflections(tree):
    kinds = tree.nodes["kind"][: tree.num_nodes]
    return [int(i) for i in np.flatnonzero(kinds == NodeKind.REFLECTION)]


def reflection_search(policy, quality=lambda r: 0.9, answer="42", reference=None):
    engine = SimulatedEngine(TOK, seed=4, steps=1, quality=quality, answer=lambda r: answer)
    params = MCTSParams(reflection=ReflectionPolicy.parse(policy), budget=Budget(iterations=40), early_stop=False)
    return asyncio.run(run_mcts(engine, TOK, PROMPT, params, reference=reference)).tree


@pytest.mark.parametrize("policy, quality, answer, reference, expect", [
    ("off", 0.9, "42", None, False),
    ("always", 0.9, "42", None, True),
    ("below:0.5", 0.9, "42", None, False),
    ("below:0.5", 0.3, "42", None, True),
    ("wrong_answer", 0.9, "42", "42", False),
    ("wrong_answer", 0.9, "41", "42", True),
])
def test_reflection_goes_where_a_thought_ends_per_policy(policy, quality, answer, reference, expect):
    tree = reflection_search(policy, quality=lambda r: quality, answer=answer, reference=reference)
    found = reflections(tree)
    assert bool(found) is expect
    for node in found:
        parent = tree.nodes["parent"][node]
        assert parent != ROOT  # the root's children open the thought, they do not end it
        text = TOK.decode(tree.node_token_ids(node).tolist())
        assert text == "Wait! Maybe I made some mistakes! I need to rethink from scratch.\n\n"
        siblings = [int(s) for s in tree.children(parent) if s != node]
        assert any("</Thought>" in TOK.decode(tree.node_token_ids(s).tolist()) for s in siblings)
        assert len([s for s in tree.children(parent) if s in found]) == 1
        # the model continued thinking after the reflection, and reflected at most once per path
        assert all(tree.nodes["kind"][i] != NodeKind.REFLECTION for c in tree.children(node) for i in [c])


def test_a_failing_engine_request_is_retried_then_reported():
    class Flaky(SimulatedEngine):
        async def generate(self, request):
            if self.calls in (1, 3):
                self.calls += 1
                raise EngineError("transient")
            return await super().generate(request)

    result = search(Flaky(TOK, seed=1), budget=Budget(iterations=8), early_stop=False)
    assert result.stats.failed_requests == 2 and result.stats.iterations == 8


def test_baselines_share_the_budget_accounting():
    engine = SimulatedEngine(TOK, seed=9)
    g = asyncio.run(greedy(engine, TOK, PROMPT, MCTSParams(max_path_tokens=64)))
    sampling = MCTSParams(max_path_tokens=25, budget=Budget(tokens=100))  # N = 100 // 25 = 4
    b = asyncio.run(best_of_n(engine, TOK, PROMPT, sampling))
    s = asyncio.run(self_consistency(engine, TOK, PROMPT, sampling))
    assert g.answer == "42" and engine.requests[0].temperature == 0.0 and g.stats.requests == 1
    assert engine.requests[1].n == 4 and engine.requests[1].max_tokens == 25
    for result in (b, s):  # they keep sampling until the next sample would not fit
        assert 100 - 25 < result.stats.generated_tokens <= 100
        assert result.stats.requests > 1 and len(result.tree.children(ROOT)) > 4
    kids = b.tree.children(ROOT)
    assert b.path[-1] == kids[np.argmax(b.tree.nodes["confidence"][kids])]


def test_sampling_baselines_draw_more_samples_than_a_tree_first_holds():
    """Short samples under a large budget: more children than the tree's initial capacity (its arrays grow)."""
    params = MCTSParams(max_path_tokens=64, budget=Budget(tokens=64 * 64))
    result = asyncio.run(best_of_n(SimulatedEngine(TOK, seed=2, steps=1), TOK, PROMPT, params))
    assert len(result.tree.children(ROOT)) > 64 and result.tree.nodes["is_terminal"][1:result.tree.num_nodes].all()


def test_self_consistency_takes_the_majority_answer():
    answers = ["7", "9", "7", "8"]

    class Voting(SimulatedEngine):
        """Sample i answers answers[i]."""

        def _sample(self, *args, **kwargs):
            answer = answers[len(self.sampled) % len(answers)]
            self.sampled.append(answer)
            self.answer = lambda response: answer
            return super()._sample(*args, **kwargs)

    engine = Voting(TOK, seed=1, steps=1)
    engine.sampled = []
    params = MCTSParams(max_path_tokens=64, budget=Budget(tokens=4 * 64))
    result = asyncio.run(self_consistency(engine, TOK, PROMPT, params))
    assert engine.sampled[:4] == answers and result.answer == "7"


def test_sampling_baselines_need_a_token_budget_to_size_n():
    with pytest.raises(ConfigError, match="budget_tokens"):
        asyncio.run(best_of_n(SimulatedEngine(TOK), TOK, PROMPT, MCTSParams()))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_answers_through_one_signature(name):
    """The registry's one signature and one result type (eval, serve, build and bench rely on both)."""
    engine = ScoringSimulatedEngine(TOK, seed=6)
    params = MCTSParams(max_path_tokens=64, budget=Budget(iterations=8, tokens=256), seed=1)
    seen = []
    result = asyncio.run(STRATEGIES[name](engine, TOK, PROMPT, params, request_prefix="t-",
                                          on_progress=lambda stats, best: seen.append(stats.generated_tokens)))
    assert result.answer == "42" and 0 < result.stats.generated_tokens <= 256
    assert seen and seen[-1] == result.stats.generated_tokens
    assert all(r.request_id.startswith("t-") for r in engine.requests + engine.score_requests)


def test_progress_is_reported_after_every_iteration():
    seen = []
    params = MCTSParams(budget=Budget(iterations=9), early_stop=False)
    engine = SimulatedEngine(TOK, seed=3, steps=50)
    asyncio.run(run_mcts(engine, TOK, PROMPT, params, on_progress=lambda s, v: seen.append((s.iterations, v))))
    assert [i for i, _ in seen] == list(range(1, 10))
    assert all(0 < v <= 1 for _, v in seen)


def test_a_line_the_budget_cannot_finish_is_not_started_and_unanswered_lines_are_worth_zero():
    """Before any line ended, a rollout starts only when the budget can take it to the path limit; after, when it
    can run as long as the longest ended line. A line cut by a limit is worth ``unanswered_value``."""
    engine = SimulatedEngine(TOK, seed=2, steps=4)
    result = search(engine, budget=Budget(iterations=100, tokens=150), max_path_tokens=120, early_stop=False)
    rollouts = [r for r in engine.requests if r.n == 1 and "\n\n" not in r.stop]
    assert rollouts[0].max_tokens == 120 - (len(rollouts[0].prompt_token_ids) - len(PROMPT))
    tree = result.tree
    ended = tree.nodes["is_terminal"][: tree.num_nodes] & (tree.nodes["visits"][: tree.num_nodes] > 0)
    longest = int(tree.nodes["path_tokens"][: tree.num_nodes][ended].max())
    assert longest < 120 // 2  # lines end well before the path limit ...
    assert any(r.max_tokens < 120 - (len(r.prompt_token_ids) - len(PROMPT)) for r in rollouts)  # ... so later
    assert 150 - longest < result.stats.generated_tokens <= 150  # rollouts start with less: the budget is spent
    never = search(SimulatedEngine(TOK, seed=2, steps=50), budget=Budget(iterations=12), max_path_tokens=30,
                   early_stop=False)  # 50 steps never fit in 30 tokens: no line is finished
    tree = never.tree
    assert never.answer is None and tree.nodes["visits"][0] > 0
    assert tree.nodes["value_sum"][: tree.num_nodes].max() == 0.0


def test_finished_leaves_get_one_visit_and_a_small_tree_ends_exhausted():
    """A terminal leaf is valued once and never selected again (before: dozens of free visits while other leaves
    waited on the engine, and a SETTLED stop)."""
    result = search(SimulatedEngine(TOK, seed=1, steps=1), budget=Budget(iterations=500), parallel=4,
                    early_stop=False, max_depth=3)
    tree = result.tree
    terminal = tree.nodes["is_terminal"][: tree.num_nodes]
    assert (tree.nodes["visits"][: tree.num_nodes][terminal] <= 1).all()
    assert result.stop_reason is StopReason.EXHAUSTED and result.stats.iterations < 500


def test_identical_samples_merge_into_one_child_with_a_weight():
    class Echo(SimulatedEngine):
        """Every sample of a request is the same (as temperature 0 would make them)."""

        async def generate(self, request):
            chunks = await super().generate(dataclasses.replace(request, n=1))
            return chunks * request.n

    result = search(Echo(TOK, seed=3, steps=2), children=3, budget=Budget(iterations=6), early_stop=False)
    tree = result.tree
    first = int(tree.children(ROOT)[0])
    assert tree.nodes["weight"][first] >= 3  # the first expansion's three samples are one child
    assert result.stats.duplicate_tokens >= 2 * len(tree.node_token_ids(first))
    assert tree.nodes["visits"][ROOT] == result.stats.iterations  # a repeated sample is no free iteration
    for node in range(tree.num_nodes):
        texts = [tree.node_token_ids(int(k)).tobytes() for k in tree.children(node)]
        assert len(texts) == len(set(texts))  # no two siblings are the same sample


def test_a_rollouts_steps_are_nodes_that_later_iterations_branch_from():
    result = search(SimulatedEngine(TOK, seed=5, steps=4), budget=Budget(iterations=30), early_stop=False)
    tree = result.tree
    kinds = tree.nodes["kind"][: tree.num_nodes]
    rollout_steps = np.flatnonzero(kinds == NodeKind.ROLLOUT)
    assert len(rollout_steps) > 0
    parents_of_steps = set(tree.nodes["parent"][rollout_steps].tolist())
    assert any(tree.nodes["kind"][p] == NodeKind.ROLLOUT for p in parents_of_steps)  # chains of steps
    branched = [int(n) for n in rollout_steps if (kinds[tree.children(int(n))] == NodeKind.CHUNK).any()]
    assert branched, "no later iteration expanded a rollout's step"
    for node in np.flatnonzero(tree.nodes["is_terminal"][: tree.num_nodes]):
        assert tree.nodes["num_children"][node] == 0


def test_line_confidence_values_a_line_by_all_its_tokens():
    """The rollout's mean alone is noisy for a short rollout deep in the tree; the line's mean is comparable
    between lines that branch at different depths."""
    result = search(SimulatedEngine(TOK, seed=8, steps=3), value=ValueKind.LINE_CONFIDENCE,
                    budget=Budget(iterations=16), early_stop=False)
    tree = result.tree
    leaves = [n for n in range(1, tree.num_nodes) if tree.nodes["is_terminal"][n] and tree.nodes["visits"][n]]
    assert leaves
    for leaf in leaves:
        tokens = np.concatenate([tree.token_confidences(i) for i in tree.path(leaf)])
        assert tree.mean_value(leaf) == pytest.approx(tokens.mean())


def _answer_by_first_word(response):
    return "42" if first_word(response) in GOOD else "7"


def _judge_good_branch(response):
    """A value model that knows which branches lead to 42 (confidence cannot tell: every token has q = 0.6)."""
    return 0.9 if first_word(response) in GOOD else 0.1


def test_reward_model_value_scores_each_new_node_without_rollouts():
    engine = ScoringSimulatedEngine(TOK, seed=4, steps=1, quality=lambda r: 0.6, answer=_answer_by_first_word,
                                    judge=_judge_good_branch)
    result = search(engine, value=ValueKind.REWARD_MODEL, budget=Budget(iterations=40))
    assert result.answer == "42" and result.stats.value_requests == len(engine.score_requests) > 0
    assert all("\n\n" in r.stop for r in engine.requests)  # expansions (which stop at a step) only: no rollout
    for request in engine.score_requests:  # the node's prefix, scored at its last token
        assert request.positions == (len(request.token_ids) - 1,)
        assert list(request.token_ids[:len(PROMPT)]) == PROMPT and request.prompt_tokens == len(PROMPT)
    n = result.tree.nodes
    leaves = [i for i in range(1, result.tree.num_nodes) if n["visits"][i] and not n["num_children"][i]]
    assert {round(result.tree.mean_value(i), 6) for i in leaves} <= {0.9, 0.1, 0.0}  # 0: cut without an answer


def test_reward_value_mixes_the_score_with_the_confidence():
    assert reward_value(0.8, 0.4, 1.0) == pytest.approx(0.8)
    assert reward_value(0.8, 0.4, 0.25) == pytest.approx(0.25 * 0.8 + 0.75 * 0.4)
    assert reward_value(0.8, float("nan"), 0.5) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="reward_weight"):
        MCTSParams(reward_weight=1.5)


def test_reward_model_value_needs_an_engine_that_scores():
    with pytest.raises(ConfigError, match="value='reward_model'.*value model"):
        search(SimulatedEngine(TOK), value=ValueKind.REWARD_MODEL)
    with pytest.raises(ConfigError, match="best_of_n-prm"):
        asyncio.run(best_of_n_prm(SimulatedEngine(TOK), TOK, PROMPT, MCTSParams(budget=Budget(tokens=256))))


def test_reward_weighted_best_of_n_follows_the_value_model_against_the_majority():
    """Few samples answer 42 and they are the least confident; the value model prefers them, and wins."""
    rare = set(TOK.word_ids[:3])  # 3 of the 16 first words

    def answer(response):
        return "42" if first_word(response) in rare else "7"

    engine = ScoringSimulatedEngine(TOK, seed=5, steps=1, answer=answer,
                                    quality=lambda r: 0.3 if first_word(r) in rare else 0.9,
                                    judge=lambda r: 0.9 if first_word(r) in rare else 0.1)
    params = MCTSParams(max_path_tokens=32, temperature=1.0, budget=Budget(tokens=32 * 12), seed=2)
    weighted = asyncio.run(best_of_n_prm(engine, TOK, PROMPT, params))
    kids = weighted.tree.children(ROOT)
    answers = [answer(weighted.tree.path_token_ids(k)) for k in kids]
    assert 0 < answers.count("42") < answers.count("7")  # the majority and the confidence say 7
    assert weighted.answer == "42" and weighted.value == pytest.approx(0.9)
    assert weighted.stats.value_requests == len(kids)
    assert [r.prompt_tokens for r in engine.score_requests] == [len(PROMPT)] * len(kids)
    assert weighted.tree.nodes["visits"][kids].sum() == len(kids)  # each sample carries its score as its value


def test_reward_model_rollout_value_scores_each_finished_line_once():
    engine = ScoringSimulatedEngine(TOK, seed=4, steps=2, quality=lambda r: 0.6, answer=_answer_by_first_word,
                                    judge=_judge_good_branch)
    result = search(engine, value=ValueKind.REWARD_MODEL_ROLLOUT, budget=Budget(iterations=12))
    assert result.answer == "42"
    assert any("\n\n" not in r.stop for r in engine.requests)  # rollouts ran
    for request in engine.score_requests:  # only whole lines are scored, at their last token
        assert TOK.decode(request.token_ids[-2:]).endswith("</Output><|im_end|>") or \
            TOK.decode(request.token_ids).endswith("</Output>")
    assert result.stats.value_requests == len(engine.score_requests) <= result.stats.iterations


def test_a_step_scored_below_min_step_score_fails_like_a_step_check_failure():
    """The value model as a learned check: each new line is scored at every new step's end; a line whose step
    scores below the floor answers nothing (worth unanswered_value, 0, not the judge's 0.1), that step is never
    widened, and its parent samples again at the retry temperature."""
    engine = ScoringSimulatedEngine(TOK, seed=4, steps=2, quality=lambda r: 0.6, answer=_answer_by_first_word,
                                    judge=_judge_good_branch)
    result = search(engine, value=ValueKind.REWARD_MODEL_ROLLOUT, budget=Budget(iterations=16), min_step_score=0.5,
                    temperature=0.3, retry_temperature=1.0, seed=1)  # retries told apart by their temperature
    tree, n = result.tree, result.tree.nodes
    delimiter = TOK.ids["\n\n"]
    assert any(len(r.positions) > 1 for r in engine.score_requests)  # a rollout: one position per new step
    for request in engine.score_requests:
        assert all(request.token_ids[p] == delimiter for p in request.positions[:-1])  # step ends
        assert request.positions[-1] == len(request.token_ids) - 1
    starts = tree.children(ROOT)
    bad = [k for k in starts if first_word(tree.path_token_ids(k)) not in GOOD]
    assert bad and result.stats.failed_checks >= len(bad)
    for k in bad:  # a failed step is never widened: only its rollout hangs below it; its lines are set aside
        assert n["num_children"][k] <= 1 and tree.mean_value(k) == 0.0
        assert {leaf for leaf in range(tree.num_nodes) if n["is_terminal"][leaf] and k in tree.path(leaf)} \
            <= result.rejected
    assert all(first_word(tree.path_token_ids(leaf)) not in GOOD for leaf in result.rejected)
    assert result.answer == "42" and result.value == pytest.approx(0.9)
    retried = [r for r in engine.requests if r.temperature == 1.0]
    assert retried and all(list(r.prompt_token_ids) == PROMPT for r in retried)  # the root sampled again
    # without rollouts each new step is scored on its own, and one that fails ends its line there
    engine = ScoringSimulatedEngine(TOK, seed=4, steps=1, quality=lambda r: 0.6, answer=_answer_by_first_word,
                                    judge=_judge_good_branch)
    result = search(engine, value=ValueKind.REWARD_MODEL, budget=Budget(iterations=24), min_step_score=0.5, seed=1)
    bad = [k for k in result.tree.children(ROOT) if first_word(result.tree.path_token_ids(k)) not in GOOD]
    assert bad and set(bad) <= result.rejected and all(result.tree.nodes["is_terminal"][bad])
    assert result.answer == "42"
    with pytest.raises(ConfigError, match="min_step_score"):
        MCTSParams(min_step_score=1.5)


def test_when_min_step_score_sets_every_line_aside_the_best_scored_one_answers():
    """No line passes the floor: the final rule chooses among the finished lines set aside, by their scores (the
    rare branches that lead to 42 score 0.4, the others 0.1), not by visits, which the scores no longer steer."""
    rare = set(TOK.word_ids[:3])  # 3 of the 16 first words

    def answer(response):
        return "42" if first_word(response) in rare else "7"

    engine = ScoringSimulatedEngine(TOK, seed=5, steps=1, quality=lambda r: 0.6, answer=answer,
                                    judge=lambda r: 0.4 if first_word(r) in rare else 0.1)
    result = search(engine, value=ValueKind.REWARD_MODEL_ROLLOUT, budget=Budget(iterations=24), min_step_score=0.5,
                    retry_temperature=1.0, temperature=1.0, seed=3)
    aside = {line.leaf: line for line in result.set_aside}
    assert aside and set(aside) <= result.rejected
    assert {line.key for line in aside.values()} == {"42", "7"}
    assert all(line.value == pytest.approx(0.4 if line.key == "42" else 0.1) for line in aside.values())
    assert result.answer == "42" and result.value == pytest.approx(0.4) and result.path[-1] in aside


def test_running_path_totals_match_a_walk_of_the_path():
    """Tree.path_length and Tree.path_confidence (running totals kept per node) against walking the path, with
    forced reflection tokens on some paths."""
    result = search(SimulatedEngine(TOK, seed=6, steps=4), reflection=ReflectionPolicy.parse("always"),
                    budget=Budget(iterations=20), early_stop=False)
    tree = result.tree
    assert (tree.nodes["kind"][:tree.num_nodes] == NodeKind.REFLECTION).any()
    for node in range(tree.num_nodes):
        path = tree.path(node)
        assert tree.path_length(node) == sum(len(tree.node_token_ids(i)) for i in path)
        confidences = np.concatenate([tree.token_confidences(i) for i in path])
        generated = confidences[~np.isnan(confidences)]
        if generated.size:
            assert tree.path_confidence(node) == pytest.approx(generated.mean(), rel=1e-12)
        else:
            assert np.isnan(tree.path_confidence(node))


def test_a_tree_with_tokens_left_raises_its_width_cap_instead_of_stopping():
    """Identical samples (temperature 0) fill every node's width with one merged child, so the tree is fully
    explored long before its token budget is spent. Without refill_width it stops EXHAUSTED there; with it, every
    node may take one more sample each time, and the search goes on until the budget (or iterations) stop it."""
    settings = dict(budget=Budget(iterations=2_000, tokens=3_000), temperature=0.0, max_width=2, early_stop=False)
    engine = SimulatedEngine(TOK, seed=1, steps=3)
    stopped = search(engine, refill_width=False, **settings)
    assert stopped.stop_reason is StopReason.EXHAUSTED and stopped.stats.generated_tokens < 3_000 // 2
    refilled = search(SimulatedEngine(TOK, seed=1, steps=3), **settings)
    assert refilled.stop_reason in (StopReason.TOKENS, StopReason.ITERATIONS)
    assert refilled.stats.generated_tokens > 2 * stopped.stats.generated_tokens
    assert refilled.stats.generated_tokens <= 3_000
    tree = refilled.tree
    weights = [sum(int(tree.nodes["weight"][k]) for k in tree.children(node))
               for node in range(tree.num_nodes)]
    assert max(weights) > 2, "some node took more samples than max_width allowed at first"
    assert search(SimulatedEngine(TOK, seed=1, steps=3), max_width=2, temperature=0.0, early_stop=False,
                  budget=Budget(iterations=2_000)).stop_reason is StopReason.EXHAUSTED  # no token budget: no refill


def test_sampling_baselines_keep_drawing_while_the_longest_sample_fits():
    """Samples much shorter than max_path_tokens: after the first round, rounds are sized by the longest sample so
    far, so best-of-N stops with fewer tokens left than that sample (before: up to max_path_tokens - 1 unspent)."""
    engine = SimulatedEngine(TOK, seed=4, steps=2)
    params = MCTSParams(max_path_tokens=256, budget=Budget(tokens=1000))
    result = asyncio.run(best_of_n(engine, TOK, PROMPT, params))
    tree = result.tree
    lengths = [int(tree.nodes["token_end"][k] - tree.nodes["token_start"][k]) for k in tree.children(ROOT)]
    assert max(lengths) < 100 and result.stats.generated_tokens <= 1000
    assert 1000 - result.stats.generated_tokens < max(lengths)
    assert engine.requests[0].n == 1000 // 256 and engine.requests[0].max_tokens == 256  # the first round: worst case
