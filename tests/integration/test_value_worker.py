"""ValueWorker: a value model served by a real vLLM engine (CPU build, pooling runner) and searched with."""

import asyncio

import numpy as np
import pytest
import torch

from actors.pool import RemoteEngine, WorkerPool, start_generator_workers
from actors.value_input import ValueInput
from actors.value_worker import ValueWorker
from search.params import Budget, Granularity, MCTSParams, ValueKind
from search.prompts import build_chat_prompt, build_prompt
from search.protocol import EngineError, ScoreRequest
from search.strategies import STRATEGIES
from tests.toy_value import toy_lines


@pytest.fixture(scope="module")
def value_model(tiny_model, tmp_path_factory):
    from modelkit.value import train_value

    out = tmp_path_factory.mktemp("value") / "tiny-value"
    report = train_value(toy_lines(160), base=tiny_model, output=out, epochs=8, lr=3e-3, dev_share=0.25,
                         eval_every=10, patience=8, progress=False)
    assert report["line_auroc"] >= 0.9
    return str(out)


@pytest.fixture(scope="module")
def value_worker(ray_cluster, engine_config, value_model):
    config = engine_config.model_copy(update={"model": value_model})
    (worker,) = start_generator_workers(config, 1, actor_class=ValueWorker)
    ray_cluster.get(worker.check_health.remote(), timeout=600)
    yield worker
    ray_cluster.kill(worker)


def score(worker, request):
    return asyncio.run(RemoteEngine(worker).score(request))


def test_scores_match_a_transformers_forward_pass_and_separate_the_toy_lines(value_worker, value_model, ray_cluster):
    from transformers import Qwen2ForTokenClassification

    model = Qwen2ForTokenClassification.from_pretrained(value_model).eval()
    lines = toy_lines(6)
    for line in lines:
        got = score(value_worker, ScoreRequest(line.token_ids, tuple(line.positions.tolist()), "toy"))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([line.token_ids.tolist()])).logits[0]
        want = torch.softmax(logits, -1)[line.positions, 1].numpy()
        assert got.shape == (3,) and np.allclose(got, want, atol=1e-4)
        assert (got[-1] > 0.5) == line.correct
    settings = ray_cluster.get(value_worker.engine_settings.remote())
    assert settings["runner"] == "pooling" and settings["dtype"] == "float32"


@pytest.mark.parametrize("ids, positions, message", [
    ([], (0,), "1 to"), ([5, 6, 7], (3,), "outside"), ([5, 6, 7], (), "outside")])
def test_bad_score_requests_fail_alone(value_worker, ids, positions, message):
    with pytest.raises(EngineError, match=message):
        score(value_worker, ScoreRequest(np.asarray(ids, dtype=np.int32), positions))
    assert score(value_worker, ScoreRequest(np.asarray([5, 6, 7], dtype=np.int32), (2,))).shape == (1,)


def test_a_search_values_its_nodes_with_the_value_worker(workers, value_worker, tokenizer):
    """MCTS valued by a real value model over a real generator: every new node is valued by its prefix's score
    (16-token actions, so that the tiny random model's gibberish makes nodes that are not terminal)."""
    prompt = tokenizer.encode(build_prompt("Ann has 3 apples and buys 4 more. How many apples now?"))
    params = MCTSParams(granularity=Granularity.parse("mini_step:16"), max_path_tokens=160, seed=1,
                        budget=Budget(iterations=12, tokens=384), value=ValueKind.REWARD_MODEL)

    async def go():
        pool = WorkerPool(workers[:1], max_in_flight=16, value_workers=[value_worker])
        result = await pool.search(STRATEGIES["mcts-prm"], tokenizer, prompt, params)
        n = result.tree.nodes
        scored = [i for i in range(1, result.tree.num_nodes)
                  if n["visits"][i] == 1 and not n["num_children"][i] and not n["is_terminal"][i]]
        checks = [await pool.score(ScoreRequest(ids := result.tree.prompt_for(i), (len(ids) - 1,))) for i in scored]
        return result, scored, checks

    result, scored, checks = asyncio.run(go())
    assert result.stats.value_requests >= len(scored) > 0
    for node, check in zip(scored, checks, strict=True):
        assert result.tree.mean_value(node) == pytest.approx(float(check[0]), abs=1e-5)


def test_a_killed_value_engine_restarts_and_the_request_waits_for_it(workers, value_worker, ray_cluster):
    """Kill the ValueWorker's engine: Ray restarts the worker with a fresh engine, and a score request sent through
    the pool meanwhile is answered once it is back (as generations wait for a GeneratorWorker)."""
    import os
    import signal

    pid, engine_pids = ray_cluster.get(value_worker.process_ids.remote())
    assert engine_pids and pid not in engine_pids
    for engine_pid in engine_pids:
        os.kill(engine_pid, signal.SIGKILL)
    request = ScoreRequest(np.asarray([5, 6, 7], dtype=np.int32), (1, 2))

    async def through_the_pool():
        return await WorkerPool(workers[:1], max_in_flight=4, value_workers=[value_worker]).score(request)

    assert asyncio.run(through_the_pool()).shape == (2,)
    assert ray_cluster.get(value_worker.process_ids.remote())[0] != pid, "the worker was restarted"


def test_a_value_input_scores_the_line_in_the_prms_own_format(ray_cluster, engine_config, value_model, tokenizer):
    """With ``value_input`` the worker renders the policy's tokens as an off-the-shelf PRM reads them (its chat
    template, its system message, a separator after each step) and scores at the separator after the last step:
    the score equals a transformers forward pass over that text."""
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    question, system, separator = "Ann has 3 apples and buys 4 more. How many apples now?", "Check each step.", " #"
    steps = ["<Thought>\nAnn starts with 3 apples.", "Ann gains 4, so 3 + 4 = 7.", "</Thought>\n<Output>\n7\n</Output>"]
    spec = ValueInput(engine_config.model, separator, "\n\n", system)
    (worker,) = start_generator_workers(engine_config.model_copy(update={"model": value_model}), 1,
                                        actor_class=ValueWorker, value_input=spec)
    try:
        ray_cluster.get(worker.check_health.remote(), timeout=600)
        prompt = tokenizer.encode(build_prompt(question))
        ids = np.asarray(prompt + tokenizer.encode("\n\n".join(steps)), dtype=np.int32)
        got = score(worker, ScoreRequest(ids, (len(ids) - 1,), prompt_tokens=len(prompt)))
        with pytest.raises(EngineError, match="needs the prompt's length"):
            score(worker, ScoreRequest(ids, (len(ids) - 1,)))
    finally:
        ray_cluster.kill(worker)
    text = build_chat_prompt([("system", system), ("user", question)]) + "".join(s + separator for s in steps)
    prm = AutoTokenizer.from_pretrained(value_model)
    rendered = prm.encode(text + "<|im_end|>\n", add_special_tokens=False)
    at = len(prm.encode(text, add_special_tokens=False)) - 1  # the last separator's last token
    model = Qwen2ForTokenClassification.from_pretrained(value_model).eval()
    with torch.no_grad():
        want = torch.softmax(model(input_ids=torch.tensor([rendered])).logits[0, at], -1)[1].item()
    assert got.shape == (1,) and got[0] == pytest.approx(want, abs=1e-4)


def test_an_outcome_model_is_served_too_its_score_at_a_prefix_end_is_the_prefix_score(
        ray_cluster, engine_config, value_model, tmp_path):
    """An outcome reward model (``*ForSequenceClassification``: one score per sequence) runs on the same pooling
    task: its score at a position equals transformers' sequence score of the sequence cut there."""
    from transformers import AutoTokenizer, Qwen2ForSequenceClassification

    model = Qwen2ForSequenceClassification.from_pretrained(value_model, num_labels=2).eval()
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(value_model).save_pretrained(tmp_path)
    (worker,) = start_generator_workers(engine_config.model_copy(update={"model": str(tmp_path)}), 1,
                                        actor_class=ValueWorker)
    try:
        ray_cluster.get(worker.check_health.remote(), timeout=600)
        line = toy_lines(1)[0]
        positions = tuple(line.positions.tolist())
        got = score(worker, ScoreRequest(line.token_ids, positions))
        assert ray_cluster.get(worker.engine_settings.remote())["runner"] == "pooling"
    finally:
        ray_cluster.kill(worker)
    with torch.no_grad():
        want = [torch.softmax(model(input_ids=torch.tensor([line.token_ids[:p + 1].tolist()])).logits[0], -1)[1]
                for p in positions]
    assert np.allclose(got, np.asarray(want), atol=1e-4)


def test_a_verifier_served_by_likelihood_scores_the_lowest_probability_of_a_claimed_result(
        ray_cluster, engine_config, workers, tokenizer):
    """With ``value_likelihood`` the worker runs a causal LM on vLLM's generate runner and reads the log-probability
    of every token of the line (``prompt_logprobs``): the score at a position equals a transformers forward pass's
    lowest probability of a result digit written up to there; a search's values are those scores."""
    from transformers import AutoModelForCausalLM

    from actors.value_input import Likelihood
    from search.checks import EQUATION

    verifier = engine_config.model  # any causal LM serves; the tiny random policy here
    steps = ["<Thought>\nAnn starts with 3 apples.", "Ann gains 14, so 3 + 14 = 17.", "17 - 5 = 12.",
             "</Thought>\n<Output>\n12\n</Output>"]
    prompt = tokenizer.encode(build_prompt("Ann has 3 apples, wins 14 and loses 5. How many apples now?"))
    ids, ends = list(prompt), []
    for step in steps:
        ids += tokenizer.encode(step + "\n\n")
        ends.append(len(ids) - 1)
    ids = np.asarray(ids, dtype=np.int32)
    (worker,) = start_generator_workers(engine_config, 1, actor_class=ValueWorker,
                                        likelihood=Likelihood(engine_config.model, EQUATION.pattern))
    try:
        ray_cluster.get(worker.check_health.remote(), timeout=600)
        assert ray_cluster.get(worker.engine_settings.remote())["runner"] == "generate"
        got = score(worker, ScoreRequest(ids, (ends[0], ends[1], ends[3]), prompt_tokens=len(prompt)))
        with pytest.raises(EngineError, match="needs the prompt's length"):
            score(worker, ScoreRequest(ids, (len(ids) - 1,)))

        async def search():
            pool = WorkerPool(workers[:1], max_in_flight=16, value_workers=[worker])
            params = MCTSParams(granularity=Granularity.parse("mini_step:16"), max_path_tokens=96, seed=1,
                                budget=Budget(iterations=6, tokens=192), value=ValueKind.REWARD_MODEL)
            result = await pool.search(STRATEGIES["mcts-prm"], tokenizer, prompt, params)
            n = result.tree.nodes
            lines = [k for k in range(1, result.tree.num_nodes)
                     if n["visits"][k] == 1 and not n["num_children"][k] and not n["is_terminal"][k]]
            checks = [await pool.score(ScoreRequest(line := result.tree.prompt_for(k), (len(line) - 1,),
                                                    prompt_tokens=len(prompt))) for k in lines]
            return result, lines, checks

        result, lines, checks = asyncio.run(search())
    finally:
        ray_cluster.kill(worker)
    # the oracle: the line's text in the verifier's tokens, each result digit's probability given the line before it
    text = "".join(step + "\n\n" for step in steps)
    encoded = tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    model = AutoModelForCausalLM.from_pretrained(verifier).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0]
    probabilities = torch.softmax(logits[:-1], -1)[torch.arange(len(encoded["input_ids"]) - 1),
                                                   torch.tensor(encoded["input_ids"][1:])].numpy()
    results = [(text.index(claim), text.index(claim) + len(claim)) for claim in ("= 17", "= 12")]
    digit_of = [next((k for k, (a, b) in enumerate(results) if s < b and e > a + 2), None)
                for s, e in encoded["offset_mapping"][1:]]
    lowest = [min(p for p, k in zip(probabilities, digit_of, strict=True) if k is not None and k < upto)
              for upto in (1, 2)]
    assert got.shape == (3,) and got[0] == 1.0  # no result written yet
    assert got[1:] == pytest.approx(lowest, abs=1e-4)
    assert lines and len(checks) == len(lines)
    for node, check in zip(lines, checks, strict=True):
        assert result.tree.mean_value(node) == pytest.approx(float(check[0]), abs=1e-5)
