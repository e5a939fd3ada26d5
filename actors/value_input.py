"""A line as an off-the-shelf process reward model reads it (``value_input`` in the config).

Forest's own value models read the policy's tokens as they are. A PRM trained elsewhere reads its own format:
Qwen2.5-Math-PRM, for one, takes the question in its chat template and the steps of the answer joined by
``<extra_0>``, one after every step, and scores each step at its separator. ``PRMInput`` turns a ``ScoreRequest`` over
the policy's tokens into one over the PRM's: the prompt's turns (a ``build_chat_prompt`` text) with the PRM's system
message, the line split into steps at the search's step delimiter, and each requested position moved to the
separator after the last step written up to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
