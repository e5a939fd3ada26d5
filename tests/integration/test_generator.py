"""GeneratorWorker on a real local Ray cluster with real vLLM CPU engines and the tiny random model."""

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import torch

from actors.pool import RemoteEngine
from search.protocol import TOP_K, EngineDeadError, EngineError, FinishReason, GenerationRequest
from search.prompts import build_prompt


def request(prompt, **kw):
    base = dict(max_tokens=12, n=1, temperature=1.0, logprobs=TOP_K)
    return GenerationRequest(np.asarray(prompt, dtype=np.int32), **{**base, **kw})


def generate(worker, req):
    return asyncio.run(RemoteEngine(worker).generate(req))


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.encode(build_prompt("Ann has 3 apples and buys 4 more. How many apples now?"))


def test_chunks_have_fixed_shapes_and_n_samples(workers, prompt):
    chunks = generate(workers[0], request(prompt, n=3, max_tokens=10, seed=7))
    assert len(chunks) == 3
    for c in chunks:
        t = len(c.token_ids)
        assert 1 <= t <= 10
        assert c.token_ids.dtype == np.int32 and c.logprobs.shape == (t,)
        assert c.top_ids.shape == (t, TOP_K) and c.top_logprobs.shape == (t, TOP_K)
        assert np.all(c.logprobs <= 0) and np.all(np.diff(c.top_logprobs, axis=1) <= 1e-6)  # ranked
        assert (c.top_ids >= 0).all()
        if c.finish_reason is FinishReason.LENGTH:
            assert t == 10
    assert len({tuple(c.token_ids) for c in chunks}) > 1  # n samples differ


def test_greedy_is_top1_and_token_ids_round_trip(workers, prompt, tokenizer):
    (c,) = generate(workers[0], request(prompt, temperature=0.0, max_tokens=16))
    assert (c.token_ids == c.top_ids[:, 0]).all()
    assert np.allclose(c.logprobs, c.top_logprobs[:, 0], atol=1e-5)
    # continuing from the generated ids gives the same continuation (canonical token ids, no re-tokenising)
    half = len(c.token_ids) // 2
    (rest,) = generate(workers[0], request(np.concatenate([prompt, c.token_ids[:half]]), temperature=0.0,
                                           max_tokens=len(c.token_ids) - half))
    assert rest.token_ids.tolist() == c.token_ids[half:].tolist()


def test_stop_strings_and_stop_token_ids(workers, prompt, tokenizer):
    (free,) = generate(workers[0], request(prompt, temperature=0.0, max_tokens=24))
    stop_token = int(free.token_ids[5])
    (c,) = generate(workers[0], request(prompt, temperature=0.0, max_tokens=24, stop_token_ids=(stop_token,)))
    assert c.finish_reason is FinishReason.STOP
    assert c.token_ids.tolist() == free.token_ids[: free.token_ids.tolist().index(stop_token) + 1].tolist()
    text = tokenizer.decode(free.token_ids.tolist())
    stop = text[len(text) // 2: len(text) // 2 + 2]
    (s,) = generate(workers[0], request(prompt, temperature=0.0, max_tokens=24, stop=(stop,)))
    assert s.finish_reason is FinishReason.STOP and len(s.token_ids) < len(free.token_ids)


def test_logprobs_match_a_transformers_forward_pass(workers, prompt, tiny_model):
    from transformers import AutoModelForCausalLM

    chunks = generate(workers[0], request(prompt, n=2, max_tokens=12, seed=3))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for c in chunks:
        ids = torch.tensor([list(prompt) + c.token_ids.tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1: -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        sampled = logprobs.gather(1, torch.tensor(c.token_ids, dtype=torch.long)[:, None])[:, 0].numpy()
        top_lp, top_ids = logprobs.topk(TOP_K, dim=-1)
        np.testing.assert_allclose(c.logprobs, sampled, atol=2e-3)
        np.testing.assert_allclose(c.top_logprobs, top_lp.numpy(), atol=2e-3)
        # ids may swap only where two logprobs tie within tolerance
        same = c.top_ids == top_ids.numpy()
        assert same.mean() > 0.95


def test_children_of_a_long_path_hit_the_prefix_cache(workers, prompt):
    long_path = np.concatenate([prompt] * 3)  # > one 128-token CPU block
    assert len(long_path) > 256
    generate(workers[0], request(long_path, n=2, max_tokens=4))
    chunks = generate(workers[0], request(long_path, n=2, max_tokens=4))
    assert chunks[0].num_cached_tokens >= 128 * (len(long_path) // 128 - 1)
    import ray
    stats = ray.get(workers[0].stats.remote())
    assert stats.cached_prompt_tokens > 0 and stats.prompt_tokens >= 2 * len(long_path)


def test_two_workers_have_different_seeds_and_serve_concurrently(workers, prompt):
    import ray

    seeds = [s.seed for s in ray.get([w.stats.remote() for w in workers])]
    assert seeds[0] != seeds[1]

    async def both():
        reqs = [request(prompt, n=2, max_tokens=16) for _ in range(8)]
        engines = [RemoteEngine(w) for w in workers]
        return await asyncio.gather(*(engines[i % 2].generate(r) for i, r in enumerate(reqs)))

    results = asyncio.run(both())
    assert len(results) == 8 and all(len(r) == 2 for r in results)
    a = {tuple(c.token_ids) for r in results[0::2] for c in r}
    b = {tuple(c.token_ids) for r in results[1::2] for c in r}
    assert a != b  # unseeded requests on different worker seeds sample differently


def test_many_requests_in_flight_and_cancel_aborts(workers, prompt):
    import ray

    async def scenario():
        engine = RemoteEngine(workers[1])
        tasks = [asyncio.ensure_future(engine.generate(request(prompt, max_tokens=900))) for _ in range(16)]
        peak, deadline = 0, time.monotonic() + 10
        while peak < 8 and time.monotonic() < deadline:  # the most in flight at once, read until 8 are seen
            peak = max(peak, (await workers[1].stats.remote()).requests_in_flight)
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(50):
            if (await workers[1].stats.remote()).requests_in_flight == 0:
                break
            await asyncio.sleep(0.2)
        return peak, (await workers[1].stats.remote()).requests_in_flight

    peak, after = asyncio.run(scenario())
    assert peak >= 8
    assert after == 0
    del ray


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=list(range(3, 1100))), "at most"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_requests_fail_alone(workers, prompt, bad, message):
    req = request(bad.pop("prompt", prompt), **bad)
    with pytest.raises(EngineError, match=message) as err:
        generate(workers[0], req)
    assert not isinstance(err.value, EngineDeadError)
    assert len(generate(workers[0], request(prompt, max_tokens=2))) == 1  # still healthy


def test_a_killed_engine_is_reported_and_the_worker_restarts(workers, prompt):
    import ray

    worker = workers[1]
    stats = ray.get(worker.stats.remote())
    assert stats.engine_pids and stats.pid not in stats.engine_pids
    for pid in stats.engine_pids:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError):
        for _ in range(20):  # the engine notices its dead core within a moment
            generate(worker, request(prompt, max_tokens=2))
            time.sleep(0.5)
    deadline = time.monotonic() + 300
    while True:
        try:
            chunks = generate(worker, request(prompt, max_tokens=3))
            break
        except EngineDeadError:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(2)
    assert len(chunks) == 1 and len(chunks[0].token_ids) >= 1


def test_many_seeded_requests_with_long_prompts_keep_the_engine_alive(workers, prompt):
    """vLLM 0.32's CPU build died on seeded requests whose prefill got chunked (more prompt tokens at once than
    one step takes); Forest's CPU engines prefill whole prompts. 48 prompts of ~600 tokens arrive together."""
    rng = np.random.default_rng(3)
    prompts = [list(prompt) + rng.integers(10, 400, 600 - len(prompt)).tolist() for _ in range(48)]

    async def burst():
        engine = RemoteEngine(workers[1])
        return await asyncio.gather(*(engine.generate(request(p, n=2, max_tokens=4, seed=i))
                                      for i, p in enumerate(prompts)))

    results = asyncio.run(burst())
    assert all(len(chunks) == 2 and all(len(c) >= 1 for c in chunks) for chunks in results)
    assert asyncio.run(RemoteEngine(workers[1]).generate(request(prompt, seed=5)))  # still serving
