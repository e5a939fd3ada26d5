"""A line as a value model that reads its own input sees it: an off-the-shelf process reward model
(``value_input`` in the config, ``PRMInput``) or a verifier served by likelihood (``value_likelihood``,
``LikelihoodInput``).

Forest's own value models read the policy's tokens as they are. A PRM trained elsewhere reads its own format:
Qwen2.5-Math-PRM, for one, takes the question in its chat template and the steps of the answer joined by
``<extra_0>``, one after every step, and scores each step at its separator. ``PRMInput`` turns a ``ScoreRequest`` over
the policy's tokens into one over the PRM's: the prompt's turns (a ``build_chat_prompt`` text) with the PRM's system
message, the line split into steps at the search's step delimiter, and each requested position moved to the
separator after the last step written up to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from search.checks import marked_spans
from search.prompts import TURN_END, build_chat_prompt, parse_chat_prompt
from search.protocol import EngineError, ScoreRequest


@dataclass(frozen=True, slots=True)
class ValueInput:
    """What a ValueWorker needs to render its PRM's input (sent to the worker; the tokenizers load there)."""

    policy_model: str  # whose tokens the search sends
    step_separator: str
    step_delimiter: str
    system_prompt: str | None = None


class PRMInput:
    """Renders score requests for one PRM (``value_model``: its directory, for its tokenizer and chat template)."""

    def __init__(self, spec: ValueInput, value_model: str):
        from transformers import AutoTokenizer

        self.spec = spec
        self.policy = AutoTokenizer.from_pretrained(spec.policy_model)
        self.prm = AutoTokenizer.from_pretrained(value_model)
        if not self.prm.is_fast:
            raise ValueError(f"value_input needs a fast tokenizer (character offsets); {value_model} has none")

    def steps(self, response_ids) -> list[str]:
        """The non-empty steps of a response, split at the step delimiter, each stripped."""
        text = self.policy.decode(list(response_ids), skip_special_tokens=True)
        return [s.strip() for s in text.split(self.spec.step_delimiter) if s.strip()]

    def chat(self, turns: list[tuple[str, str]], answer: str) -> str:
        """The PRM's text: the conversation and the answer in its chat template (ChatML when it has none)."""
        if self.spec.system_prompt is not None:
            turns = [("system", self.spec.system_prompt), *turns[1:]]
        if self.prm.chat_template is None:
            return build_chat_prompt(turns) + answer + TURN_END
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.prm.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False,
                                            add_generation_prompt=False)

    def render(self, request: ScoreRequest) -> ScoreRequest:
        """The request in the PRM's format; ``EngineError`` when it cannot be (no prompt length, a position in the
        prompt or before the line's first step, a prompt that is not ChatML)."""
        ids, start = np.asarray(request.token_ids), request.prompt_tokens
        if start <= 0 or start > len(ids):
            raise EngineError(f"bad score request: value_input needs the prompt's length, got {start} of {len(ids)}")
        try:
            turns = parse_chat_prompt(self.policy.decode(ids[:start].tolist(), skip_special_tokens=False))
        except ValueError as exc:
            raise EngineError(f"bad score request: {exc}") from exc
        # the line up to the last position, and the steps written up to each position: a position is scored at the
        # separator after the last of them (a position inside a step, at the end of that step)
        last = max(request.positions, default=-1)
        steps = self.steps(ids[start:last + 1])
        closed = []
        for position in request.positions:
            if not start <= position < len(ids):
                count = 0
            elif position == last:  # the usual request: one position, the line's end, split above already
                count = len(steps)
            else:
                count = len(self.steps(ids[start:position + 1]))
            if count == 0:
                raise EngineError(f"bad score request: position {position} is before the line's first step "
                                  f"(the prompt has {start} tokens)")
            closed.append(count)
        separator = self.spec.step_separator
        answer = "".join(step + separator for step in steps)
        text = self.chat(turns, answer)
        at = text.rfind(answer)
        if at < 0:
            raise EngineError("the value model's chat template changed the answer's text; value_input cannot find "
                              "its step separators")
        ends = np.cumsum([len(step) + len(separator) for step in steps]) + at - 1  # each separator's last character
        encoded = self.prm(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([a for a, _ in encoded["offset_mapping"]])
        token_at = np.searchsorted(starts, ends, side="right") - 1  # the token that holds each separator's end
        return ScoreRequest(np.asarray(encoded["input_ids"], dtype=np.int32),
                            tuple(int(token_at[count - 1]) for count in closed), request_id=request.request_id)


@dataclass(frozen=True, slots=True)
class Likelihood:
    """What a ValueWorker needs to serve a verifier by likelihood (sent to the worker; the tokenizers load there)."""

    policy_model: str  # whose tokens the search sends
    spans: str  # a regular expression: the text of a line the verifier scores (``search.checks.marked_spans``)


@dataclass(frozen=True, slots=True)
class VerifierLine:
    """A score request in a verifier's tokens: the line (without its prompt), which of its tokens are scored, and
    for each requested position how many of its tokens were written up to there."""

    token_ids: np.ndarray  # int32 [T]
    marked: np.ndarray  # bool [T]: the token overlaps a marked span
    cuts: tuple[int, ...]  # per requested position

    def scores(self, logprobs: np.ndarray) -> np.ndarray:
        """Per position: the lowest probability the verifier gives a marked token written up to it (1 where none
        is; the first token, which has no log-probability, is never scored)."""
        scored = self.marked & ~np.isnan(logprobs)
        lowest = [logprobs[:cut][scored[:cut]] for cut in self.cuts]
        return np.asarray([np.exp(lp.min()) if len(lp) else 1.0 for lp in lowest], dtype=np.float32)


class LikelihoodInput:
    """Renders score requests for one verifier (``verifier_model``: its directory, for its tokenizer): the line's
    text, decoded from the policy's tokens, in the verifier's tokens, with the tokens of the marked spans."""

    def __init__(self, spec: Likelihood, verifier_model: str):
        from transformers import AutoTokenizer

        self.pattern = re.compile(spec.spans)
        self.policy = AutoTokenizer.from_pretrained(spec.policy_model)
        self.verifier = AutoTokenizer.from_pretrained(verifier_model)
        if not self.verifier.is_fast:
            raise ValueError(f"value_likelihood needs a fast tokenizer (character offsets); {verifier_model} has none")

    def text(self, response_ids) -> str:
        return self.policy.decode(list(response_ids), skip_special_tokens=False)

    def render(self, request: ScoreRequest) -> VerifierLine:
        """The request's line in the verifier's tokens; ``EngineError`` when it cannot be (no prompt length, a
        position in the prompt or past the end, an empty line)."""
        ids, start = np.asarray(request.token_ids), request.prompt_tokens
        if start <= 0 or start >= len(ids):
            raise EngineError(f"bad score request: a verifier reads the line after the prompt and needs the prompt's "
                              f"length, got {start} of {len(ids)} tokens")
        outside = [p for p in request.positions if not start <= p < len(ids)]
        if outside or not request.positions:
            raise EngineError(f"bad score request: positions {list(request.positions)} must lie in the line, "
                              f"{start}..{len(ids) - 1}")
        last = max(request.positions)
        text = self.text(ids[start:last + 1].tolist())
        encoded = self.verifier(text, add_special_tokens=False, return_offsets_mapping=True)
        if not encoded["input_ids"]:
            raise EngineError("bad score request: the line is empty in the verifier's tokens")
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        marked = np.zeros(len(offsets), dtype=bool)
        for a, b in marked_spans(self.pattern, text):
            marked |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        ends = [len(text) if p == last else len(self.text(ids[start:p + 1].tolist())) for p in request.positions]
        cuts = tuple(int(n) for n in np.searchsorted(offsets[:, 0], ends, side="left"))
        return VerifierLine(np.asarray(encoded["input_ids"], dtype=np.int32), marked, cuts)
