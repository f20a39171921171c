"""Reward functions for online RL (GRPO): loading them by name, scoring completions, and the demo task's built-ins.

A reward function has the signature of TRL's GRPOTrainer, so that one written for TRL works here unchanged:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

`columns` are the dataset's other columns, one list each (e.g. `answer=[...]`). With conversational prompts (lists of
{"role", "content"} messages) each completion is a list holding one message, `[{"role": "assistant", "content":
text}]`; with plain-text prompts it is a string. A reward of None means the function abstains for that row.

The built-ins score the demo arithmetic task of datasets/demo/arithmetic_*.jsonl, whose replies read `7 + 5 = 12`
and whose `answer` column holds the result.
"""

import importlib
import math
import numbers
import re
import reprlib
from collections.abc import Callable, Sequence

import torch

from utils.errors import InputError, error_summary

RewardFunction = Callable[..., list[float | None]]

INTEGER = re.compile(r"(?<![0-9])-?[0-9]+")
AFTER_EQUALS = re.compile(r"=\s*(-?[0-9]+)")
DEMO_FORMAT = re.compile(r"-?[0-9]+ [+-] -?[0-9]+ = -?[0-9]+")
DEMO_OPERANDS = re.compile(r"(-?[0-9]+) [+-] (-?[0-9]+) =")
# Python refuses to parse integers longer than 4300 digits; no answer of the task comes near.
MAX_DIGITS = 100


def completion_text(completion: str | list[dict]) -> str:
    """The reply's text, from a plain-text completion or a conversational one (its last message)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _integer(digits: str) -> int | None:
    return int(digits) if len(digits) <= MAX_DIGITS else None


def final_number(text: str) -> int | None:
    """The number after the last `=`, else the last integer in the text; None if it holds no integer."""
    found = AFTER_EQUALS.findall(text) or INTEGER.findall(text)
    return _integer(found[-1]) if found else None


def _expected(answer: str | int, function: str) -> int:
    try:
        return int(answer)
    except (TypeError, ValueError):
        raise InputError(f"{function}: answer {answer!r} is not an integer") from None


def exact_answer(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the reply's final number equals the answer, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        rewards.append(float(final_number(completion_text(completion)) == _expected(expected, "exact_answer")))
    return rewards


def partial_credit(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1 / (1 + |predicted - answer|): some signal for a near miss, where exact_answer gives none; 0.0 without a
    number."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        predicted = final_number(completion_text(completion))
        distance = None if predicted is None else abs(predicted - _expected(expected, "partial_credit"))
        rewards.append(0.0 if distance is None else 1.0 / (1.0 + distance))
    return rewards


def format_reward(completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """1.0 when the whole reply reads `<int> <op> <int> = <int>` as in the demo data, else 0.0. Rows whose answer is
    None abstain; without an answer column every row is scored."""
    rewards = [float(DEMO_FORMAT.fullmatch(completion_text(completion).strip()) is not None)
               for completion in completions]
    if answer is None:
        return rewards
    return [None if expected is None else reward for reward, expected in zip(rewards, answer, strict=True)]


def restated_operands(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """1.0 when the reply's two operands are the first two integers of the question, in order (`7 + 5` for "What is
    7 plus 5?"), else 0.0: the exact answer alone would let a policy that copies the question wrongly drift
    further. A question without two integers abstains."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        question = INTEGER.findall(completion_text(prompt) if isinstance(prompt, list) else prompt)
        if len(question) < 2:
            rewards.append(None)
            continue
        restated = DEMO_OPERANDS.match(completion_text(completion).strip())
        rewards.append(float(restated is not None and list(restated.groups()) == question[:2]))
    return rewards


def load_reward_functions(paths: list[str]) -> list[tuple[str, RewardFunction]]:
    """Import each "module:function" path; returns (function name, function) pairs. Names must be unique, since
    the metrics are reported under them."""
    if not paths:
        raise InputError("rlhf.reward_functions: empty; name at least one, e.g. utils.rewards:exact_answer")
    functions: dict[str, tuple[str, RewardFunction]] = {}
    for path in paths:
        module_name, _, name = path.partition(":")
        if path.count(":") != 1 or not module_name or not name:
            raise InputError(f"rlhf.reward_functions: {path!r} is not of the form 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise InputError(f"rlhf.reward_functions: {path}: cannot import {module_name}: "
                             f"{error_summary(error)}") from None
        if not hasattr(module, name):
            raise InputError(f"rlhf.reward_functions: {path}: module {module_name} has no attribute {name}")
        function = getattr(module, name)
        if not callable(function):
            raise InputError(f"rlhf.reward_functions: {path}: {name} is not callable (a {type(function).__name__})")
        if name in functions:
            raise InputError(f"rlhf.reward_functions: {functions[name][0]} and {path} share the name {name}; "
                             f"metrics are reported by name, so rename one")
        functions[name] = (path, function)
    return [(name, function) for name, (_, function) in functions.items()]


def _checked_rewards(name: str, rewards: object, count: int) -> list[float]:
    """The rewards as floats (None as NaN), or an InputError naming the function and what is wrong."""
    if not isinstance(rewards, (list, tuple)) or len(rewards) != count:
        got = f"{len(rewards)} rewards" if isinstance(rewards, (list, tuple)) else f"a {type(rewards).__name__}"
        raise InputError(f"reward function {name} returned {got} for {count} completions; expected a list of "
                         f"{count} numbers or None")
    values = []
    for index, reward in enumerate(rewards):
        # numbers.Real takes bool and numpy scalars, as TRL does, and refuses strings.
        if reward is not None and not isinstance(reward, numbers.Real):
            raise InputError(f"reward function {name} returned {reprlib.repr(reward)} for completion {index}; "
                             f"expected a number or None")
        if reward is not None and not math.isfinite(reward):
            raise InputError(f"reward function {name} returned {reward} for completion {index}; rewards must be "
                             f"finite (None abstains)")
        values.append(math.nan if reward is None else float(reward))
    return values


def score_completions(functions: Sequence[tuple[str, RewardFunction]], weights: Sequence[float], prompts: list,
                      completions: list, completion_ids: list[list[int]],
                      columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function on N completions; returns (total [N], per_function [N, F]), both float32.

    per_function holds NaN where a function abstained; total is the weighted sum over the functions that did not
    (TRL's nansum), so a row every function abstained on totals 0.
    """
    if len(weights) != len(functions):
        raise InputError(f"{len(weights)} reward weights for {len(functions)} reward functions")
    rows = []
    for name, function in functions:
        rewards = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        rows.append(_checked_rewards(name, rewards, len(completions)))
    per_function = torch.tensor(rows, dtype=torch.float32).reshape(len(functions), len(completions)).T.contiguous()
    total = (per_function * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    return total, per_function
