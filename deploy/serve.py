"""The online endpoint: a Ray Serve deployment with a FastAPI ingress; one request = one search tree.

``forest serve --config ...`` or ``serve run deploy/configs/serve.yaml``. Routes: ``POST /v1/chat/completions``
(OpenAI-compatible, ``stream`` supported: progress chunks while the search runs, then the answer, then
``[DONE]``), ``POST /v1/search`` (the whole tree), ``GET /v1/models``, ``GET /healthz``, ``GET /trees`` and
``GET /trees/{request_id}`` (the viewer's index of recent requests and their tree pages). The replica searches
through the same ``TreeEngine``/``WorkerPool`` as the build's TreeManager, over GeneratorWorkers it starts (or
attaches to by name). A client that disconnects cancels its search, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import signal
import time
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.config import ForestConfig, load_config
from deploy import api_models as api

log = logging.getLogger(__name__)
fastapi_app = FastAPI(title="Forest", description="Marco-o1-style tree search as an OpenAI-compatible API")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict | None = None):
        if field and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"  # every 4xx names the field it is about
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def _error(status: int, message: str, *, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "authentication_error" if status == 401 else \
        "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": field}}, status_code=status,
                        headers=headers)


@fastapi_app.exception_handler(ApiError)
async def _api_error(_request, exc: ApiError):
    return _error(exc.status, exc.message, field=exc.field, headers=exc.headers)


def _validation_error(errors: list[dict], *, skip: int) -> ApiError:
    """The first error as a 400 (malformed JSON) or 422 (wrong field) naming the field."""
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ())[skip:]) or "body"
    status = 400 if first.get("type") == "json_invalid" else 422
    return ApiError(status, f"{field}: {first.get('msg')}", field=field)


@fastapi_app.exception_handler(RequestValidationError)
async def _request_validation_error(_request, exc: RequestValidationError):
    err = _validation_error(exc.errors(), skip=1)
    return _error(err.status, err.message, field=err.field)


async def _chat_request(request: Request) -> api.ChatRequest:
    """Parse the body only after authorization, so an unauthenticated caller learns nothing from validation."""
    from pydantic import ValidationError

    try:
        return api.ChatRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _validation_error(exc.errors(), skip=0) from None


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class ForestServer:
    def __init__(self, config: ForestConfig):
        from actors.pool import open_pool
        from cluster.metrics import ForestMetrics

        self._resources = contextlib.ExitStack()  # the pool lives as long as the replica (closed in __del__)
        pool = self._resources.enter_context(open_pool(config))
        self.config, self.limits = pool.config, pool.config.serve
        self.has_value_model = pool.config.value_model is not None  # serves best_of_n-prm and mcts-prm
        self.api_key = os.environ.get("FOREST_API_KEY") or config.serve.api_key
        self.workers, self.tokenizer = pool.workers, pool.tokenizer
        self.metrics = ForestMetrics()
        self.pool = pool.worker_pool(metrics=self.metrics)
        self.searches = 0
        self._count_search(0)
        self.recent: OrderedDict[str, dict] = OrderedDict()

    def __del__(self):
        """Serve calls this when the replica shuts down: stop the workers the replica started."""
        self._resources.close()

    # -- request handling -------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)")

    def _plan(self, body: api.ChatRequest):
        """(strategy, prompt ids, MCTSParams) for a request, with its settings capped by the server's limits."""
        from search.params import Budget
        from search.prompts import MIN_GENERATION_ROOM, build_chat_prompt

        strategy = api.strategy_for(body.model, value_model=self.has_value_model)
        if strategy is None:
            available = ", ".join(api.model_names(value_model=self.has_value_model))
            raise ApiError(400, f"unknown model {body.model!r}; available: {available}", field="model")
        problem = api.request_problem(body, strategy, max_choices=self.limits.max_choices)
        if problem is not None:
            raise ApiError(400, problem[1], field=problem[0])
        search, limits = self.config.search, self.limits
        prompt_text = build_chat_prompt([(api.prompt_role(m.role), m.text) for m in body.messages],
                                        system_prompt=search.system_prompt)
        prompt = self.tokenizer.encode(prompt_text)
        room = self.config.engine.max_model_len - len(prompt)
        if room < MIN_GENERATION_ROOM:
            raise ApiError(400, f"prompt has {len(prompt)} tokens; the model allows "
                                f"{self.config.engine.max_model_len} including the answer", field="messages")
        params = search.to_params(**strategy.preset)
        budget = Budget(min(body.iterations or params.budget.iterations, limits.max_iterations),
                        min(body.budget_tokens or params.budget.tokens or limits.max_budget_tokens,
                            limits.max_budget_tokens),
                        min(params.budget.seconds or limits.request_timeout_s, limits.request_timeout_s))
        params = dataclasses.replace(
            params, budget=budget, max_path_tokens=min(body.path_tokens or params.max_path_tokens,
                                                       limits.max_path_tokens, room),
            temperature=params.temperature if body.temperature is None else body.temperature,
            top_p=body.top_p or params.top_p, children=body.children or params.children,
            max_width=max(params.max_width, body.children or params.children),
            seed=body.seed if body.seed is not None else params.seed)
        return strategy, prompt, params

    def _admit(self) -> None:
        if self.searches >= self.limits.max_concurrent_searches:
            raise ApiError(429, f"{self.searches} searches running (limit {self.limits.max_concurrent_searches}); "
                                "retry later", headers={"Retry-After": str(self.limits.retry_after_s)})
        self._count_search(+1)

    def _count_search(self, delta: int) -> None:
        self.searches += delta
        self.metrics.set(self.metrics.serve_searches, self.searches)

    def _remember(self, request_id: str, body: api.ChatRequest, result) -> None:
        if self.limits.recent_trees:
            self.recent[request_id] = {"tree": api.tree_json(result.tree, self.tokenizer.decode, result.path),
                                       "meta": api.index_row(request_id, body, result)}
            while len(self.recent) > self.limits.recent_trees:
                self.recent.popitem(last=False)

    def _start(self, body: api.ChatRequest, request_id: str, on_progress=None):
        """Plan and admit a request (raising its 4xx now), then return the coroutine that searches."""
        strategy, prompt, params = self._plan(body)
        self._admit()

        async def run():
            from search.driver import SearchError
            from search.protocol import EngineError
            try:
                result = await self.pool.search(strategy, self.tokenizer, prompt, params,
                                                on_progress=on_progress)
            except (SearchError, EngineError) as exc:
                raise ApiError(503, f"the search failed: {exc}") from exc
            finally:
                self._count_search(-1)
            self._remember(request_id, body, result)
            return result
        return run()

    # -- routes -----------------------------------------------------------------------------------
    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await _chat_request(request)
        request_id, start = api.new_request_id(), time.monotonic()
        if body.stream:
            events: asyncio.Queue = asyncio.Queue()
            search = self._start(body, request_id, lambda stats, best: events.put_nowait(api.progress(stats, best)))
            return StreamingResponse(self._stream(body, request_id, search, events), media_type="text/event-stream")
        result = await self._start(body, request_id)
        self._observe("chat", start)
        return api.completion(result, body.model, request_id, api.choices(result, body, self.tokenizer.decode))

    def _observe(self, route: str, start: float) -> None:
        self.metrics.serve_latency.observe(time.monotonic() - start, tags={"route": route})

    async def _stream(self, body: api.ChatRequest, request_id: str, search, events: asyncio.Queue):
        task, start = asyncio.ensure_future(search), time.monotonic()
        try:
            yield api.sse(api.chunk(request_id, body.model, {"role": "assistant", "content": ""}))
            while not task.done():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield api.sse(api.chunk(request_id, body.model, {}, forest_progress=waiter.result()))
                else:
                    waiter.cancel()
            try:
                result = task.result()
            except ApiError as exc:
                yield api.sse({"error": {"message": exc.message, "type": "server_error"}})
                return
            for choice in api.choices(result, body, self.tokenizer.decode):
                delta = {"reasoning_content": choice.reasoning, "content": choice.content}
                yield api.sse(api.chunk(request_id, body.model, delta, index=choice.index, logprobs=choice.logprobs))
                yield api.sse(api.chunk(request_id, body.model, {}, choice.finish_reason, index=choice.index))
            if body.include_usage:
                yield api.sse(api.usage_chunk(request_id, body.model, result))
            yield "data: [DONE]\n\n"
            self._observe("chat_stream", start)
        finally:
            if not task.done():  # the client went away: stop the search and abort its engine requests
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    @fastapi_app.post("/v1/search")
    async def search(self, request: Request):
        self._authorize(request)
        body = await _chat_request(request)
        request_id, start = api.new_request_id(), time.monotonic()
        result = await self._start(body, request_id)
        self._observe("search", start)
        return {**api.completion(result, body.model, request_id, api.choices(result, body, self.tokenizer.decode)),
                "tree": self.recent[request_id]["tree"] if request_id in self.recent else
                api.tree_json(result.tree, self.tokenizer.decode, result.path)}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "forest"}
                                           for name in api.model_names(value_model=self.has_value_model)]}

    @fastapi_app.get("/trees")
    async def recent_trees(self, request: Request):
        """The index of recent trees: an HTML page for a browser, ``{"trees": [ids], "rows": [...]}`` otherwise."""
        from fastapi.responses import HTMLResponse

        from deploy.viewer import index_page

        self._authorize(request)
        rows = [entry["meta"] for entry in reversed(self.recent.values())]
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(index_page(rows, title=f"Forest: the last {len(rows)} searches"))
        return {"trees": [row["tree_id"] for row in rows], "rows": rows}

    @fastapi_app.get("/trees/{request_id}")
    async def view_tree(self, request_id: str, request: Request):
        """The tree viewer for a recent request (the ``id`` of its completion)."""
        from fastapi.responses import HTMLResponse

        from deploy.viewer import TREE_ID_RE, tree_page

        self._authorize(request)
        if not TREE_ID_RE.match(request_id):
            raise ApiError(400, f"{request_id!r} is not a valid request id", field="request_id")
        if request_id not in self.recent:
            raise ApiError(404, f"no recent request {request_id!r} (the server keeps the trees of the last "
                                f"{self.limits.recent_trees})", field="request_id")
        entry = self.recent[request_id]
        return HTMLResponse(tree_page(entry["tree"], title=f"tree of {request_id}",
                                      meta={**entry["meta"], "index": "../trees"}))

    @fastapi_app.get("/healthz")
    async def healthz(self):
        stats = await asyncio.gather(*(w.stats.remote() for w in self.workers), return_exceptions=True)
        workers = [{"alive": False} if isinstance(s, BaseException) else
                   {"alive": True, "requests_in_flight": s.requests_in_flight, "generated_tokens": s.generated_tokens}
                   for s in stats]
        healthy = any(w["alive"] for w in workers)
        return JSONResponse({"status": "ok" if healthy else "unavailable", "searches_in_progress": self.searches,
                             "workers": workers}, status_code=200 if healthy else 503)


def build_app(args: dict | None = None):
    """``serve run deploy.serve:build_app config=PATH`` (and ``deploy/configs/serve.yaml``)."""
    args = args or {}
    config = load_config(args.get("config"), **{k: v for k, v in args.items() if k != "config"})
    return app_for(config)


def app_for(config: ForestConfig):
    return ForestServer.options(max_ongoing_requests=config.serve.max_ongoing_requests).bind(config)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_forever(config: ForestConfig) -> None:
    """``forest serve``: start Serve on host:port and block until Ctrl-C or SIGTERM (how Kubernetes, Docker and
    systemd stop a process), then shut everything down. Both handlers are installed explicitly: a process started
    in the background by a non-interactive shell inherits an ignored SIGINT, and Ray's own SIGTERM handler aborts."""
    import time

    import ray

    from cluster.runtime import connect

    connect()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(app_for(config), name="forest", route_prefix="/")
    for stop in (signal.SIGINT, signal.SIGTERM):  # after Ray's start-up, which installs a SIGTERM handler of its own
        signal.signal(stop, _interrupt)
    log.info("Forest is serving on http://%s:%d (Ctrl-C stops it)", config.serve.host, config.serve.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:
        log.info("shutting down (%s)", stop or "SIGINT")
    finally:
        serve.shutdown()
        ray.shutdown()
