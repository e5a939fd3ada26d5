"""The asynchronous MCTS loop over the ``Engine`` protocol.

Up to ``params.parallel`` iterations of one tree are in flight at once: each selection adds virtual loss
so the next one goes elsewhere, and whichever engine call returns first is applied first. The loop:

1. start iterations while there is room: select a node (exhausted subtrees are never selected); a visited leaf,
   the root, or a node that may widen gets an expansion request; a new child gets a rollout request (or is valued
   at once when it is terminal or the value function needs no rollout; by a value-model request for
   ``value: reward_model``);
2. wait for the first engine result;
3. apply it: an expansion adds its distinct samples as children, then simulates from the most confident new one;
   a rollout's steps become children down to a terminal leaf, and the line is valued and backed up;
4. stop on the iteration, token or wall-clock budget, once nothing is left to expand, or (``most_visits``) once
   the root's choice is settled.

The token budget is never exceeded: every request's ``n * max_tokens`` is reserved before it is sent, and a
rollout starts only when the budget can take it as far as the longest line ended so far (to the path limit before
any line ended, unless nothing else is in flight).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from search import checks, final, mcts
from search.confidence import chunk_token_confidence, mean_confidence
from search.params import ConfigError, FinalChoice, MCTSParams, ReflectionMode, StepCheck
from search.prompts import OUTPUT_END, REFLECTION_PHRASE, answers_match, extract_answer
from search.protocol import (Chunk, Engine, EngineDeadError, EngineError, FinishReason, GenerationRequest,
                             ScoreRequest, Tokenizer)
from search.tree import ROOT, NodeKind, Tree
from search.values import SCORED_VALUES, VALUE_FUNCTIONS, Evaluation, reward_value

MAX_REQUEST_FAILURES = 3
CHECK_TAIL_TOKENS = 64  # how much of a parent's line a step check decodes to find where the current line began
SEED_STRIDE = 1_000_003
"""Request ``i`` of a search seeded with ``s`` uses seed ``s * SEED_STRIDE + i`` (a prime, so the requests of
searches with nearby seeds never share a seed)."""


class StopReason(enum.Enum):
    ITERATIONS = "iterations"
    TOKENS = "tokens"
    SECONDS = "seconds"
    SETTLED = "settled"  # no remaining iteration could change the answer
    EXHAUSTED = "exhausted"  # every path is terminal
    RIGHT = "right"  # stop_when_right: a finished line answered the reference


class SearchError(RuntimeError):
    """The search could not go on (too many failed engine requests)."""


@dataclass(slots=True)
class SearchStats:
    iterations: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens sent, once per request
    cached_prompt_tokens: int = 0  # of those, served from the engine's prefix cache
    requests: int = 0  # generation requests
    failed_requests: int = 0
    value_requests: int = 0  # value-model (Scorer) requests
    duplicate_tokens: int = 0  # of the generated tokens, those of samples merged into an identical sibling
    failed_checks: int = 0  # steps that failed ``step_check`` or ``min_step_score`` (the first of each line)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SearchResult:
    tree: Tree
    path: list[int]  # node ids root..leaf of the chosen line
    response_token_ids: np.ndarray  # int32, the chosen path's generated tokens
    response: str
    answer: str | None
    value: float  # the chosen line's value (NaN when never valued)
    stop_reason: StopReason
    stats: SearchStats = field(default_factory=SearchStats)
    rejected: frozenset[int] = frozenset()  # ends of lines set aside: a step failed step_check or min_step_score
    set_aside: tuple[final.Line, ...] = ()  # those min_step_score set aside that finished, valued by their scores


@dataclass(frozen=True, slots=True)
class _InFlight:
    node: int
    expansion: bool
    reserved_tokens: int
    score: bool = False  # a value-model request (no tokens generated) for the line ending at ``node``
    selected: int | None = None  # score: the node the iteration selected (its virtual loss), when not ``node``
    steps: tuple[int, ...] = ()  # score with min_step_score: the new steps, whose ends are the scored positions

    @property
    def owner(self) -> int:
        """The node whose iteration this request serves (undone when it fails)."""
        return self.node if self.selected is None else self.selected


ProgressCallback = Callable[["SearchStats", float], None]
"""Called after every backup with the running stats and the root's best mean child value (NaN before any)."""


async def run_mcts(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                   reference: str | None = None, request_prefix: str = "",
                   clock: Callable[[], float] = time.monotonic,
                   on_progress: ProgressCallback | None = None) -> SearchResult:
    """Search one problem; ``prompt_token_ids`` is the full prompt (system + question + assistant header).

    ``value: reward_model`` needs an ``engine`` that is also a ``search.protocol.Scorer``."""
    search = _Search(engine, tokenizer, prompt_token_ids, params, reference, request_prefix, clock)
    search.on_progress = on_progress
    return await search.run()


class _Search:
    """The state of one run of ``run_mcts`` (created per call, never reused)."""

    def __init__(self, engine, tokenizer, prompt_token_ids, params: MCTSParams, reference, request_prefix, clock):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.reference, self.request_prefix, self.clock = reference, request_prefix, clock
        self.tree = Tree(prompt_token_ids, max_children=params.max_width + 1)  # + a reflection child
        self.scored = params.value in SCORED_VALUES
        if self.scored and not callable(getattr(engine, "score", None)):
            raise ConfigError("value", params.value.value, "needs a value model, and this engine has no scorer "
                                                           "(set value_model in the config)")
        self.value_fn, self.needs_rollout = (None, SCORED_VALUES[params.value]) if self.scored else \
            VALUE_FUNCTIONS[params.value]
        self.stats = SearchStats()
        self.inflight: dict[asyncio.Task, _InFlight] = {}
        self.started = 0  # iterations begun (completed + in flight)
        self.reserved_tokens = 0
        self.token_blocked = False
        self.longest_line: int | None = None  # tokens on the longest path to a terminal node valued so far
        self.extra_width = 0  # how often the width cap rose because nothing was left to expand (refill_width)
        self.bounds: mcts.Bounds | None = None  # lowest and highest value backed up so far
        self.settles = params.early_stop and params.final is FinalChoice.MOST_VISITS  # may stop SETTLED
        self.on_progress: ProgressCallback | None = None
        self.reflection_ids = (None if params.reflection.mode is ReflectionMode.OFF
                               else tokenizer.encode(REFLECTION_PHRASE + params.granularity.delimiter))
        self._token_text: dict[int, str] = {}  # one token's text: splitting rollouts, and TagTokens
        self._tags = mcts.TagTokens(self._token_texts)  # chunks whose text need not be decoded for tags
        self._answers: dict[int, str | None] = {}  # final.line_answer of each terminal node valued so far
        self._answer_tags: set[int] = set()  # generated nodes whose text (with its overlap) holds an answer tag
        self._failed: set[int] = set()  # nodes at or below a step that failed ``step_check``
        self._retry: set[int] = set()  # parents of a failed step: their next samples use ``retry_temperature``
        self._set_aside: list[final.Line] = []  # SearchResult.set_aside: the answers when no other line finishes
        self.right: int | None = None  # stop_when_right: the end of the first finished line that answered the reference
        self.stops_when_right = params.stop_when_right and reference is not None

    async def run(self) -> SearchResult:
        start = self.clock()
        deadline = math.inf if self.params.budget.seconds is None else start + self.params.budget.seconds
        try:
            reason = await self._loop(deadline)
        finally:
            await self._cancel_all()
        self.stats.seconds = self.clock() - start
        self.tree.shrink_to_fit()
        return self._result(reason)

    async def _loop(self, deadline: float) -> StopReason:
        budget, tree = self.params.budget, self.tree
        while True:
            while (len(self.inflight) < self.params.parallel and self.started < budget.iterations
                   and not self.token_blocked and self.right is None and self._try_start()):
                pass
            if self.right is not None and not self.inflight:  # the requests in flight were let finish (paid for)
                return StopReason.RIGHT
            if tree.nodes["exhausted"][ROOT] and self.right is None:
                if self._refill():
                    continue
                return StopReason.EXHAUSTED
            if self.stats.iterations >= budget.iterations:
                return StopReason.ITERATIONS
            if self.settles and mcts.root_settled(tree, budget.iterations - self.stats.iterations):
                return StopReason.SETTLED
            if not self.inflight:
                return StopReason.TOKENS if self.token_blocked else StopReason.EXHAUSTED
            timeout = deadline - self.clock()
            done = set()
            if timeout > 0:
                done, _ = await asyncio.wait(self.inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return StopReason.SECONDS
            self.token_blocked = False  # finished requests free their reservations
            for task in [t for t in self.inflight if t in done]:  # launch order, so runs are reproducible
                self._apply(task, self.inflight.pop(task))

    # -- 1. starting iterations -------------------------------------------------------------------
    def _widen_by(self, node: int) -> int:
        """How many more samples ``node`` may get now (progressive widening, rollout steps); 0 when none."""
        p, n = self.params, self.tree.nodes
        if (n["is_terminal"][node] or n["visits"][node] == 0 or n["depth"][node] + 1 >= p.max_depth
                or node in self._failed):
            return 0
        return mcts.widen_room(self.tree, node, children=p.children, widening=p.widening,
                               max_width=p.max_width + self.extra_width)

    def _can_widen(self, node: int) -> bool:
        return self._widen_by(node) > 0

    def _refill(self) -> bool:
        """With ``refill_width`` and a token budget, raise every node's width cap by one when nothing is left to
        expand and tokens remain (as best-of-N keeps sampling while samples fit); whether something can be expanded
        now. A search budgeted by iterations alone still stops when its tree is fully explored."""
        p, tokens = self.params, self.params.budget.tokens
        if not p.refill_width or tokens is None or self.stats.generated_tokens >= tokens:
            return False
        self.extra_width += 1
        self.tree.widen_children(p.max_width + self.extra_width + 1)  # + a reflection child
        mcts.refresh_all_exhausted(self.tree, self._can_widen)
        return not self.tree.nodes["exhausted"][ROOT]

    def _try_start(self) -> bool:
        tree, p = self.tree, self.params
        node = mcts.select(tree, p.exploration, bounds=self.bounds if p.normalize_values else None,
                           can_widen=self._can_widen)
        if node is None:
            return False
        self.started += 1
        n = tree.nodes
        if n["is_terminal"][node]:  # a terminal node nobody valued yet (a forced child, say)
            return self._value(node)
        elif n["num_children"][node] > 0:  # widening
            return self._request(node, n=self._widen_by(node), expansion=True)
        elif node == ROOT or n["visits"][node] > 0 or (n["kind"][node] == NodeKind.REFLECTION
                                                      and not self.needs_rollout):
            return self._request(node, n=p.children, expansion=True)
        else:
            return self._evaluate_new(node)
        return True

    def _evaluate_new(self, node: int) -> bool:
        """Value a new child: without a rollout when terminal or none is needed, else by a rollout request."""
        if self.tree.nodes["is_terminal"][node] or not self.needs_rollout:
            return self._value(node)
        return self._request(node, n=1, expansion=False)

    def _value(self, node: int) -> bool:
        """Value ``node`` itself (no rollout): at once, or by a value-model request."""
        if not self.scored:
            self._complete(node, self._evaluate(node, None), selected=node)
            return True
        self._score(node, selected=node)
        return True

    def _score(self, end: int, *, selected: int) -> None:
        """Ask the value model for the value of the prefix ending at ``end`` (a line that ends unanswered is worth
        ``unanswered_value`` at once); the result is backed up from ``end`` through ``selected``."""
        if self.tree.nodes["is_terminal"][end] and self._finished_line(end) is None:
            self._complete(end, self.params.unanswered_value, selected=selected)
            return
        tree = self.tree
        ids, prompt = tree.prompt_for(end), len(tree.prompt_token_ids)
        steps = ()
        if self.params.min_step_score is not None:  # every step the iteration added, checked at its end
            path = tree.path(end)
            steps = tuple(path[path.index(selected):])
        positions = tuple(prompt + tree.path_length(step) - 1 for step in steps) or (len(ids) - 1,)
        request = ScoreRequest(ids, positions, request_id=f"{self.request_prefix}v{self.stats.value_requests}",
                               prompt_tokens=prompt)
        self.stats.value_requests += 1
        tree.nodes["pending"][end] = True
        task = asyncio.ensure_future(self.engine.score(request))
        self.inflight[task] = _InFlight(end, expansion=False, reserved_tokens=0, score=True,
                                        selected=None if selected == end else selected, steps=steps)

    def _request(self, node: int, *, n: int, expansion: bool) -> bool:
        """Send an expansion (n samples) or rollout (n=1) request; False, undoing the iteration, if unaffordable.

        A rollout starts only when the budget lets it run as long as the longest line the tree has ended so far (the
        path limit before any line ended, unless nothing else is in flight: ``_rollout_need``): a line cut by the
        budget has no answer. Best-of-N's rounds follow the same rule."""
        p = self.params
        room = p.max_path_tokens - self.tree.path_length(node)
        wanted = min(p.granularity.tokens, room) if expansion else room
        max_tokens = self._affordable(n, wanted)
        if max_tokens < (1 if expansion else self._rollout_need(node, room)):
            self.token_blocked = True
            self._abandon(node)
            return False
        stop = (OUTPUT_END,) + ((p.granularity.delimiter,) if expansion and p.granularity.kind == "step" else ())
        seed = None if p.seed is None else p.seed * SEED_STRIDE + self.stats.requests
        retry = expansion and node in self._retry and p.retry_temperature is not None
        request = GenerationRequest(
            prompt_token_ids=self.tree.prompt_for(node), max_tokens=max_tokens, n=n,
            temperature=p.retry_temperature if retry else p.temperature,
            top_p=p.top_p, seed=seed, stop=stop, request_id=f"{self.request_prefix}{self.stats.requests}")
        self.stats.requests += 1
        self.stats.prompt_tokens += len(request.prompt_token_ids)
        self.reserved_tokens += n * max_tokens
        self.tree.nodes["pending"][node] = True
        task = asyncio.ensure_future(self.engine.generate(request))
        self.inflight[task] = _InFlight(node, expansion, n * max_tokens)
        return True

    def _rollout_need(self, node: int, room: int) -> int:
        """Tokens a rollout from ``node`` must be allowed: what the longest ended line had beyond ``node``'s
        depth in tokens, at most ``room``. Before any line ended, all of ``room``, unless nothing else is in
        flight: then the search would stop with no line at all (a budget near the path limit, spent in part on
        the first expansion), so the rollout takes what the budget leaves, at the risk of being cut."""
        if self.longest_line is None:
            return room if self.inflight else 1
        return max(1, min(room, self.longest_line - self.tree.path_length(node)))

    def _affordable(self, n: int, wanted: int) -> int:
        if self.params.budget.tokens is None:
            return wanted
        available = self.params.budget.tokens - self.stats.generated_tokens - self.reserved_tokens
        return min(wanted, available // n)

    # -- 3. applying results ----------------------------------------------------------------------
    def _apply(self, task: asyncio.Task, job: _InFlight) -> None:
        self.reserved_tokens -= job.reserved_tokens
        self.tree.nodes["pending"][job.node] = False
        try:
            result = task.result()
        except EngineDeadError:
            raise
        except EngineError as exc:
            self.stats.failed_requests += 1
            self._abandon(job.owner)
            if self.stats.failed_requests >= MAX_REQUEST_FAILURES:
                raise SearchError(f"{self.stats.failed_requests} engine requests failed; last: {exc}") from exc
            return
        if job.score:
            scores = np.asarray(result, dtype=np.float64)
            failed = next((step for step, score in zip(job.steps, scores, strict=True)
                           if score < self.params.min_step_score), None) if job.steps else None
            if failed is not None:
                answer = self._answers.get(job.node)
                if answer is not None:
                    self._set_aside.append(final.Line.of(job.node, answer, float(scores[-1])))
                self._fail_steps(failed, job.node)
                value = self.params.unanswered_value
            else:
                value = reward_value(float(scores[-1]), self._path_confidence(job.node), self.params.reward_weight)
            self._complete(job.node, value, selected=job.owner)
            return
        chunks = result
        self.stats.generated_tokens += sum(len(c) for c in chunks)
        self.stats.cached_prompt_tokens += chunks[0].num_cached_tokens if chunks else 0
        first_new = self.tree.num_nodes
        if job.expansion:
            self._apply_expansion(job.node, chunks)
        else:
            self._apply_rollout(job.node, chunks[0])
        if self.stops_when_right and self.right is None:
            self.right = self._right_line(range(first_new, self.tree.num_nodes))

    def _right_line(self, nodes: range) -> int | None:
        """The first of ``nodes`` that ends a finished line answering the reference (a line that failed the step
        check answers nothing: ``_add_child`` recorded no answer for it)."""
        terminal = self.tree.nodes["is_terminal"]
        return next((node for node in nodes if terminal[node]
                     and answers_match(self._line_answer(node), self.reference)), None)

    def _apply_expansion(self, node: int, chunks: list[Chunk]) -> None:
        tree = self.tree
        samples, new = [], []  # (child, whether it ends the thought) per sample; the children added
        for chunk in chunks:
            twin = mcts.find_sibling(tree, node, chunk.token_ids) if self.params.dedup else None
            if twin is None:
                samples.append(self._add_child(node, chunk))
                new.append(samples[-1][0])
            else:
                tree.nodes["weight"][twin] += 1
                self.stats.duplicate_tokens += len(chunk)
                samples.append((twin, self._chunk_ends(node, chunk)[1]))
        self._maybe_reflect(node, samples)
        if not new:  # every sample repeated a sibling: the tokens are spent, nothing new to value; the samples'
            self._abandon(node)  # weights used up the node's width, so this cannot repeat for ever
            mcts.refresh_exhausted(tree, node, self._can_widen)
            return
        passed = [c for c in new if c not in self._failed]
        child = mcts.most_confident(tree, passed or new)
        tree.nodes["virtual_loss"][child] += 1  # the iteration now runs through the child
        if not self._evaluate_new(child):
            mcts.refresh_exhausted(tree, node, self._can_widen)

    def _add_child(self, parent: int, chunk: Chunk, kind: NodeKind = NodeKind.CHUNK,
                   confidences: np.ndarray | None = None) -> tuple[int, bool]:
        """Add a generated child and mark it terminal; returns (child, whether it ends the thought)."""
        tree, p = self.tree, self.params
        finished, thought_ends, tagged = self._chunk_ends(parent, chunk)
        child = tree.add_chunk(parent, chunk, kind=kind, confidences=confidences)
        if tagged:
            self._answer_tags.add(child)
        tree.nodes["is_terminal"][child] = (finished or tree.nodes["depth"][child] >= p.max_depth
                                            or tree.path_length(child) >= p.max_path_tokens)
        below_failed = parent in self._failed
        if below_failed or not self._passes_check(child):
            self._failed.add(child)  # never widened; a line ending here has no answer (worth unanswered_value)
            if not below_failed:
                self._retry.add(parent)
            self._answers[child] = None
            self.stats.failed_checks += not below_failed
            if kind is not NodeKind.ROLLOUT:  # an expansion's step ends its line; a rollout, paid for, is kept
                tree.nodes["is_terminal"][child] = True
                return child, False
        return child, thought_ends

    def _fail_steps(self, step: int, end: int) -> None:
        """``step`` scored below ``min_step_score``: it fails as a step that fails ``step_check`` does (never
        widened, its parent samples again at ``retry_temperature``), and so does the rest of the line down to
        ``end``, which answers nothing."""
        path = self.tree.path(end)
        self._failed.update(path[path.index(step):])
        self._retry.add(int(self.tree.nodes["parent"][step]))
        self.tree.nodes["is_terminal"][end] = True  # a step scored on its own (no rollout) ends its line, as a check
        self._answers[end] = None
        self.stats.failed_checks += 1
        if self.right == end:  # stop_when_right saw the line answer before its score came back
            self.right = None

    def _passes_check(self, node: int) -> bool:
        """Whether the line ending at ``node`` passes ``step_check`` (its parent's line did)."""
        check = self.params.step_check
        if check is StepCheck.OFF:
            return True
        tree = self.tree
        complete = bool(tree.nodes["is_terminal"][node])
        tail = tree.path_tail_ids(int(tree.nodes["parent"][node]), CHECK_TAIL_TOKENS)
        start = 0  # a tail shorter than that is the whole path: read all of it
        if len(tail) == CHECK_TAIL_TOKENS:
            # every line the parent finished passed, so the text after the tail's first newline holds every
            # equation the new chunk can complete
            before = self.tokenizer.decode(tail.tolist())
            if "\n" not in before:  # the line began further back: read the whole path
                return checks.passes(check, self.tokenizer.decode(tree.path_token_ids(node).tolist()),
                                     complete=complete)
            start = before.find("\n") + 1
        text = self.tokenizer.decode(np.concatenate([tail, tree.node_token_ids(node)]).tolist())
        return checks.passes(check, text[start:], complete=complete)

    def _chunk_ends(self, parent: int, chunk: Chunk) -> tuple[bool, bool, bool]:
        """(whether the model finished its answer in ``chunk``, whether the chunk ends the thought, whether its
        text holds an answer tag)."""
        text = mcts.chunk_text(self.tree, parent, chunk.token_ids, self.tokenizer.decode, self._tags)
        finished = mcts.ends_by_model(chunk, text, self.tokenizer.eos_token_id)
        return finished, mcts.ends_thought(text, finished), mcts.holds_answer_tag(text)

    def _apply_rollout(self, node: int, chunk: Chunk) -> None:
        """The rollout's steps become a chain of children below ``node``, down to a terminal leaf; the line is
        valued by the value function and backed up from the leaf."""
        tree = self.tree
        confidences = chunk_token_confidence(chunk)  # once for the whole rollout; its steps take slices
        confidence = mean_confidence(confidences)
        room = self.params.max_depth - int(tree.nodes["depth"][node])  # steps deeper than that stay in the last
        cuts = mcts.split_points(chunk.token_ids, self.params.granularity, self._token_texts)[:max(room - 1, 0)]
        bounds = [0, *cuts, len(chunk)]
        leaf = node
        for start, end in zip(bounds, bounds[1:], strict=False):
            last = end == len(chunk)
            piece = mcts.slice_chunk(chunk, start, end, chunk.finish_reason if last else FinishReason.STOP)
            parent = leaf
            leaf, thought_ends = self._add_child(parent, piece, NodeKind.ROLLOUT, confidences[start:end])
            self._maybe_reflect(parent, [(leaf, thought_ends)])
            if tree.nodes["is_terminal"][leaf] and not last:  # a limit reached early: the rest is one piece
                break
        tree.nodes["is_terminal"][leaf] = True
        if self.scored:
            self._score(leaf, selected=node)
        else:
            self._complete(leaf, self._evaluate(node, leaf, rollout_confidence=confidence), selected=node)

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (decoded once per token id and search)."""
        cache = self._token_text
        for token in set(token_ids).difference(cache):
            cache[token] = self.tokenizer.decode([token])
        return list(map(cache.__getitem__, token_ids))

    def _maybe_reflect(self, parent: int, added: list[tuple[int, bool]]) -> None:
        """Add one reflection sibling where a new child ends the thought and the policy asks for it."""
        tree, p = self.tree, self.params
        if p.reflection.mode is ReflectionMode.OFF or not any(ends for _, ends in added):
            return
        if (mcts.has_reflection_child(tree, parent) or mcts.reflections_on_path(tree, parent) >= p.max_reflections
                or tree.nodes["depth"][parent] + 1 >= p.max_depth):
            return
        for child, thought_ends in added:
            if not thought_ends:
                continue
            answer = None
            if self.reference is not None:
                answer = extract_answer(self.tokenizer.decode(tree.path_token_ids(child).tolist()))
            if mcts.wants_reflection(p.reflection, confidence=float(tree.nodes["confidence"][child]),
                                     answer=answer, reference=self.reference):
                tree.add_forced(parent, self.reflection_ids, kind=NodeKind.REFLECTION)
                return

    # -- 2/4. valuing and backing up --------------------------------------------------------------
    def _evaluate(self, node: int, leaf: int | None, *, rollout_confidence: float | None = None) -> float:
        """The value of ``node``: of the line ending at ``leaf`` (its rollout's) or of ``node`` itself.

        A line (a rollout, or a terminal node) that ends without an answer the model finished is worth
        ``unanswered_value``.
        """
        tree = self.tree
        answer = line = None
        if leaf is not None or tree.nodes["is_terminal"][node]:
            end = node if leaf is None else leaf
            finished = self._finished_line(end)
            if finished is None:
                return self.params.unanswered_value
            answer, line = finished
        return self.value_fn(Evaluation(float(tree.nodes["confidence"][node]), rollout_confidence, answer,
                                        self.reference, line))

    def _finished_line(self, end: int) -> tuple[str, float] | None:
        """(answer, mean token confidence) of the line ending at ``end``; None when the model did not finish it
        with an answer."""
        answer = self._line_answer(end)
        return None if answer is None else (answer, self._path_confidence(end))

    def _line_answer(self, end: int) -> str | None:
        """The answer of the line ending at ``end`` (None when the model did not finish it with one), read once."""
        if end not in self._answers:
            self._answers[end] = final.line_answer(self.tree, end, self._answer_text(end))
        return self._answers[end]

    def _answer_text(self, end: int) -> str:
        """What ``final.line_answer`` reads of the line ending at ``end``: its text from a few tokens before the
        first node that holds an answer tag (every tag of the line lies after that point), so a long line is not
        decoded whole; empty when no node holds one (then the line has no answer)."""
        tree, path = self.tree, self.tree.path(end)
        first = next((i for i, node in enumerate(path) if node in self._answer_tags), None)
        if first is None:
            return ""
        parts = [tree.path_tail_ids(path[first - 1], mcts.TEXT_OVERLAP_TOKENS)]  # path[0] is the root: no tags
        parts += [tree.node_token_ids(node) for node in path[first:]]
        return self.tokenizer.decode(np.concatenate(parts).tolist())

    def _path_confidence(self, end: int) -> float:
        """Mean token confidence along the path, root to ``end`` (forced reflection tokens carry none)."""
        return self.tree.path_confidence(end)

    def _complete(self, leaf: int, value: float, *, selected: int) -> None:
        mcts.backup(self.tree, leaf, value, selected=selected)
        if self.tree.nodes["is_terminal"][leaf]:  # a line ended (terminal nodes are only ever backed up as leaves)
            self.longest_line = max(self.longest_line or 0, self.tree.path_length(leaf))
        low, high = self.bounds or (value, value)
        self.bounds = (min(low, value), max(high, value))
        self.stats.iterations += 1
        mcts.refresh_exhausted(self.tree, leaf, self._can_widen)
        if self.on_progress is not None:
            self.on_progress(self.stats, mcts.best_root_value(self.tree))

    def _abandon(self, node: int) -> None:
        mcts.add_virtual_loss(self.tree, node, -1)
        self.started -= 1

    async def _cancel_all(self) -> None:
        """Cancel in-flight requests (the engine aborts them) and undo their iterations."""
        for task in self.inflight:
            task.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)
        for job in self.inflight.values():
            self.reserved_tokens -= job.reserved_tokens
            self.tree.nodes["pending"][job.node] = False
            self._abandon(job.owner)
        self.inflight.clear()

    def _result(self, reason: StopReason) -> SearchResult:
        tree = self.tree
        if self.right is not None:  # stop_when_right: the right line is the response
            return self._line_result(self.right, reason, self._answers[self.right], tree.mean_value(self.right))
        line = final.choose(tree, final.finished_lines(tree, self.tokenizer.decode, self._answers),
                            self.params.final, self._set_aside)
        if line is None:  # no finished line: the most-visited one, whatever it holds
            leaf = mcts.most_visited_path(tree)[-1]
            return self._line_result(leaf, reason, None, tree.mean_value(leaf))
        return self._line_result(line.leaf, reason, line.answer, line.value)

    def _line_result(self, leaf: int, reason: StopReason, answer: str | None, value: float) -> SearchResult:
        """The result answering through the line that ends at ``leaf`` (``answer`` None: read from its text)."""
        ids = self.tree.path_token_ids(leaf)
        response = self.tokenizer.decode(ids.tolist())
        terminal = self.tree.nodes["is_terminal"]
        return SearchResult(self.tree, self.tree.path(leaf), ids, response,
                            extract_answer(response) if answer is None else answer, value, reason, self.stats,
                            frozenset(node for node in self._failed if terminal[node]), tuple(self._set_aside))
