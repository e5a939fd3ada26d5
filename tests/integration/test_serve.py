"""The online endpoint over real HTTP: Ray Serve, the official openai client, real vLLM CPU engines."""

import asyncio
import json
import time

import httpx
import pytest

PORT = 8471
BASE = f"http://127.0.0.1:{PORT}"
KEY = "s3cret"


@pytest.fixture(scope="module")
def server(ray_cluster, engine_config):
    """One GeneratorWorker shared by two apps: an open one at / and a keyed, one-search-at-a-time one at /secure."""
    from ray import serve

    from actors.pool import start_generator_workers
    from cluster.config import load_config
    from deploy.serve import app_for

    (worker,) = start_generator_workers(engine_config, 1, name_prefix="serve-test")
    ray_cluster.get(worker.check_health.remote(), timeout=600)
    shared = {**{f"engine.{k}": v for k, v in engine_config.model_dump().items()},
              **{f"search.{k}": v for k, v in {"iterations": 4, "max_step_tokens": 16, "max_path_tokens": 48,
                                               "parallel": 4}.items()},
              "attach_workers": ["serve-test-worker-0"]}
    open_config = load_config(None, **shared)
    secure_config = load_config(None, **shared, **{"serve.api_key": KEY, "serve.max_concurrent_searches": 1})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(app_for(open_config), name="open", route_prefix="/")
    serve.run(app_for(secure_config), name="secure", route_prefix="/secure")
    yield worker
    serve.shutdown()
    ray_cluster.kill(worker)


def client(prefix="", key="unused"):
    from openai import OpenAI
    return OpenAI(base_url=f"{BASE}{prefix}/v1", api_key=key, max_retries=0, timeout=300)


QUESTION = [{"role": "user", "content": "Ann has 3 apples and buys 4 more. How many apples now?"}]


def test_openai_client_non_streamed(server):
    response = client().chat.completions.create(model="forest-mcts-step", messages=QUESTION)
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"
    extra = response.choices[0].message.model_extra
    assert isinstance(extra["reasoning_content"], str)
    assert response.usage.completion_tokens > 0
    assert response.usage.prompt_tokens > 10
    assert response.model_extra["forest"]["iterations"] >= 1


def test_openai_client_streamed_with_progress(server):
    chunks = list(client().chat.completions.create(model="forest-mcts-mini32", messages=QUESTION, stream=True,
                                                   extra_body={"iterations": 6}))
    progress = [c.model_extra["forest_progress"] for c in chunks if c.model_extra.get("forest_progress")]
    assert progress and progress[-1]["iterations"] >= 1
    assert [p["iterations"] for p in progress] == sorted(p["iterations"] for p in progress)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is None, "usage comes only with stream_options.include_usage"
    assert any("reasoning_content" in (c.choices[0].delta.model_extra or {}) for c in chunks)


def test_greedy_preset_models_and_health(server):
    response = client().chat.completions.create(model="forest-greedy", messages=QUESTION, max_tokens=8)
    assert response.usage.completion_tokens <= 8
    assert {m.id for m in client().models.list()} >= {"forest-mcts-step", "forest-mcts-mini64", "forest-greedy"}
    health = httpx.get(f"{BASE}/healthz").json()
    assert health["status"] == "ok" and health["workers"][0]["alive"]


def test_n_returns_distinct_lines_of_one_tree(server):
    response = client().chat.completions.create(model="forest-best_of_n", messages=QUESTION, n=3, max_tokens=12,
                                                temperature=1.0, extra_body={"budget_tokens": 48})
    assert [c.index for c in response.choices] == [0, 1, 2]
    lines = [c.message.model_extra["reasoning_content"] for c in response.choices]
    assert len(set(lines)) == 3, lines
    assert response.usage.completion_tokens <= 48


def test_streamed_choices_and_usage_on_request(server):
    chunks = list(client().chat.completions.create(
        model="forest-mcts-step", messages=QUESTION, stream=True, n=2, stream_options={"include_usage": True},
        extra_body={"iterations": 6}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason}
    assert 0 in finished and set(finished) <= {0, 1} and set(finished.values()) <= {"stop", "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_text_content_parts_and_max_completion_tokens(server):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
             {"role": "user", "content": [{"type": "text", "text": "Ann has 3 apples."},
                                          {"type": "text", "text": "How many apples?"}]}]
    response = client().chat.completions.create(model="forest-greedy", messages=parts, max_completion_tokens=5,
                                                user="analyst-7", metadata={"team": "a"})
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"7": 5}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 8}, "top_logprobs"),
    ({"n": 2, "model": "forest-greedy"}, "n"),
    ({"n": 50}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages.0.content.0.type"),
])
def test_fields_forest_cannot_honour_get_400_naming_them(server, fields, param):
    from openai import BadRequestError

    body = {"model": "forest-mcts-step", "messages": QUESTION, **fields}
    with pytest.raises(BadRequestError) as err:
        client().chat.completions.create(**body)
    error = err.value.body
    assert err.value.status_code == 400 and error["param"] == param and error["message"].startswith(f"{param}: ")


def test_search_returns_the_whole_tree(server):
    body = {"model": "forest-mcts-step", "messages": QUESTION, "iterations": 5}
    data = httpx.post(f"{BASE}/v1/search", json=body, timeout=300).json()
    nodes = data["tree"]["nodes"]
    assert len(nodes) == data["forest"]["nodes"] and nodes[0]["kind"] == "root"
    assert data["tree"]["best_path"][0] == 0 and nodes[0]["visits"] == data["forest"]["iterations"]
    wide = {**body, "children": 6, "iterations": 2}  # wider than the configured max_width: widened to fit
    assert httpx.post(f"{BASE}/v1/search", json=wide, timeout=300).status_code == 200


def test_32_concurrent_requests_all_succeed(server):
    async def one(http, i):
        body = {"model": "forest-mcts-step", "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                "iterations": 3}
        return await http.post(f"{BASE}/v1/chat/completions", json=body, timeout=600)

    async def all_of_them():
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)))

    responses = asyncio.run(all_of_them())
    assert [r.status_code for r in responses] == [200] * 32
    assert httpx.get(f"{BASE}/healthz").json()["status"] == "ok"


def wait_idle(worker, timeout=60):
    import ray
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{BASE}/healthz").json()
        if ray.get(worker.stats.remote()).requests_in_flight == 0 and health["searches_in_progress"] == 0:
            return True
        time.sleep(0.3)
    return False


def test_a_client_that_disconnects_stops_its_search(server):
    body = {"model": "forest-mcts-step", "messages": QUESTION, "stream": True, "iterations": 64,
            "max_tokens": 48}
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if "forest_progress" in line:
                break
        import ray
        assert ray.get(server.stats.remote()).requests_in_flight + 1 > 0
    assert wait_idle(server), "the engine still has requests of a disconnected client"


def test_api_key(server):
    from openai import AuthenticationError
    with pytest.raises(AuthenticationError):
        client("/secure", key="wrong").chat.completions.create(model="forest-greedy", messages=QUESTION)
    assert httpx.post(f"{BASE}/secure/v1/chat/completions", json={}).status_code == 401
    ok = client("/secure", key=KEY).chat.completions.create(model="forest-greedy", messages=QUESTION, max_tokens=4)
    assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 4


def test_a_full_server_answers_429_with_retry_after(server):
    slow = {"model": "forest-mcts-step", "messages": QUESTION, "iterations": 64, "max_tokens": 48}
    headers = {"Authorization": f"Bearer {KEY}"}

    async def scenario():
        async with httpx.AsyncClient(headers=headers, timeout=300) as http:
            first = asyncio.ensure_future(http.post(f"{BASE}/secure/v1/chat/completions", json=slow))
            for _ in range(100):
                await asyncio.sleep(0.1)
                second = await http.post(f"{BASE}/secure/v1/chat/completions", json=slow)
                if second.status_code == 429:
                    break
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            return second

    second = asyncio.run(scenario())
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert "limit 1" in second.json()["error"]["message"]
    assert wait_idle(server)


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "messages": QUESTION}, 400, "model"),
    ({"model": "forest-mcts-step", "messages": []}, 422, "messages"),
    ({"model": "forest-mcts-step", "messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content"),
    ({"model": "forest-mcts-step", "messages": QUESTION, "iterations": "many"}, 422, "iterations"),
    ({"model": "forest-mcts-step", "messages": QUESTION, "temperature": -1}, 422, "temperature"),
    ({"model": "forest-mcts-step", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"model": "forest-mcts-step", "messages": [{"role": "user", "content": "apples " * 3000}]}, 400, "messages"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{BASE}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if field:
        assert error["param"] == field and field.split(".")[0] in error["message"]


def test_tree_viewer_pages_for_recent_trees(server, tmp_path):
    from tests.integration.conftest import run_chromium

    data = httpx.post(f"{BASE}/v1/search", json={"model": "forest-mcts-step", "messages": QUESTION,
                                                 "iterations": 6}, timeout=300).json()
    listed = httpx.get(f"{BASE}/trees").json()
    assert data["id"] in listed["trees"] and listed["rows"][0]["nodes"] == len(data["tree"]["nodes"])
    index, console, _ = run_chromium(f"{BASE}/trees", tmp_path)
    assert f'href="trees/{data["id"]}"' in index and 'data-visible-rows="' in index
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    dom, console, shot = run_chromium(f"{BASE}/trees/{data['id']}", tmp_path)
    assert f'data-drawn-nodes="{len(data["tree"]["nodes"])}"' in dom
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    assert shot.stat().st_size > 5_000
    assert httpx.get(f"{BASE}/trees/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert httpx.get(f"{BASE}/trees/bad$id").status_code == 400
    assert httpx.get(f"{BASE}/trees/chatcmpl-unknown").status_code == 404
    assert httpx.get(f"{BASE}/secure/trees").status_code == 401


def test_every_metric_the_grafana_dashboard_queries_is_exported(server, tmp_path, tiny_model):
    """A request and a small build (attached to the same worker) feed the metrics; Ray's Prometheus port is
    scraped while the build runs (a manager's gauges go when the manager does) and after it."""
    import re
    import threading
    from pathlib import Path

    from cluster.config import load_config
    from deploy.build import run_build
    from tests.integration.conftest import METRICS_PORT, write_build_config

    client().chat.completions.create(model="forest-greedy", messages=QUESTION, max_tokens=4)
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join(json.dumps({"id": f"m{i}", "question": f"{i}+1?", "answer": str(i + 1)})
                                  for i in range(6)) + "\n")
    config = load_config(write_build_config(tmp_path / "b.yaml", tiny_model),
                         **{"build.input": str(problems), "build.output": str(tmp_path / "out"),
                            "attach_workers": ["serve-test-worker-0"], "search.iterations": 12})
    build = threading.Thread(target=run_build, args=(config,))
    build.start()
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/forest.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_forest_\w+", e)}
    assert len(wanted) >= 12
    seen: set[str] = set()
    deadline = time.monotonic() + 180
    while not wanted <= seen and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        seen |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"^(ray_forest_\w+)", text, re.M)}
        time.sleep(1)
    build.join(timeout=600)
    assert not wanted - seen, f"queried by the dashboard but never exported: {sorted(wanted - seen)}"
