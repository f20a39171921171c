"""utils/rewards.py: the demo task's built-in rewards on plain and conversational completions, loading reward
functions by "module:function", scoring against TRL's own reward step and with reward functions taken from TRL's
documentation; and the demo arithmetic files: held-out facts, correct answers, replies the built-ins accept."""

import json
import math
import re
import sys
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import DEMO
from utils.errors import InputError
from utils.rewards import (completion_text, exact_answer, format_reward, load_reward_functions, partial_credit,
                           restated_operands, score_completions)

BUILT_INS = {"exact_answer": exact_answer, "partial_credit": partial_credit, "format_reward": format_reward}

# (reply, answer, exact_answer, partial_credit, format_reward)
CASES = [
    ("7 + 5 = 12", "12", 1.0, 1.0, 1.0),
    ("7 + 5 = 13", "12", 0.0, 0.5, 1.0),
    ("  20 - 9 = 11\n", 11, 1.0, 1.0, 1.0),  # surrounding whitespace is not part of the format
    ("-3 - -2 = -1", "-1", 1.0, 1.0, 1.0),
    ("7 + 5 = 12.", "12", 1.0, 1.0, 0.0),
    ("7+5=12", "12", 1.0, 1.0, 0.0),
    ("7 * 5 = 35", "35", 1.0, 1.0, 0.0),
    ("The answer is 12", "12", 1.0, 1.0, 0.0),
    ("7 + 5 = 10, no, 12", "12", 0.0, 1 / 3, 0.0),  # the number after "=" counts, not the last one
    ("7 - 5 is 2", "2", 1.0, 1.0, 0.0),  # the minus of "7 - 5" is not the sign of 5
    ("12 - 5", "7", 0.0, 1 / 3, 0.0),  # no "=": the last integer, 5
    ("twelve", "12", 0.0, 0.0, 0.0),
    ("", "0", 0.0, 0.0, 0.0),
    ("7 + 5 = " + "9" * 5000, "12", 0.0, 0.0, 1.0),  # longer than Python parses as an int
]


def conversational(text: str) -> list[dict]:
    """A completion as TRL's GRPOTrainer passes it for conversational prompts."""
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("as_messages", [False, True], ids=["strings", "conversational"])
@pytest.mark.parametrize("name", list(BUILT_INS))
def test_built_ins_score_plain_and_conversational_completions(name, as_messages):
    column = {"exact_answer": 2, "partial_credit": 3, "format_reward": 4}[name]
    completions = [conversational(case[0]) if as_messages else case[0] for case in CASES]
    rewards = BUILT_INS[name](prompts=["q"] * len(CASES), completions=completions, completion_ids=[[1]] * len(CASES),
                              answer=[case[1] for case in CASES])
    assert rewards == pytest.approx([case[column] for case in CASES])


@pytest.mark.parametrize("name", list(BUILT_INS))
def test_built_ins_abstain_where_the_answer_is_none(name):
    rewards = BUILT_INS[name](completions=[conversational("1 + 1 = 2")] * 3,
                              answer=["2", None, 2])
    assert rewards == [1.0, None, 1.0]


def test_format_reward_scores_every_row_without_an_answer_column():
    assert format_reward(completions=["1 + 1 = 2", "2"], prompts=["a", "b"]) == [1.0, 0.0]


def test_restated_operands_checks_the_questions_numbers_in_order():
    prompts = [[{"role": "user", "content": "What is 7 plus 5?"}]] * 4 + ["7 减 5 是多少？", "What is seven plus five?"]
    replies = ["7 + 5 = 13", "5 + 7 = 12", "7 + 15 = 22", "12", "7 - 5 = 2", "7 + 5 = 12"]
    completions = [conversational(reply) for reply in replies[:4]] + replies[4:]
    assert restated_operands(prompts, completions) == [1.0, 0.0, 0.0, 0.0, 1.0, None]


def test_an_answer_that_is_not_an_integer_is_one_line_naming_the_function():
    with pytest.raises(InputError, match=r"^exact_answer: answer 'twelve' is not an integer$"):
        exact_answer(completions=["12"], answer=["twelve"])


def test_completion_text_takes_both_forms():
    assert completion_text("7 + 5 = 12") == "7 + 5 = 12"
    assert completion_text(conversational("7 + 5 = 12")) == "7 + 5 = 12"


# ---------------------------------------------------------------- loading


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """Write a module into a folder on sys.path; it is dropped from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name

    return write


def test_loads_project_and_user_functions_by_path(user_module):
    user_module("user_rewards_ok", "def always_one(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    loaded = load_reward_functions(["utils.rewards:exact_answer", "user_rewards_ok:always_one"])
    assert [name for name, _ in loaded] == ["exact_answer", "always_one"]
    assert loaded[0][1] is exact_answer
    assert loaded[1][1](completions=["a", "b"]) == [1.0, 1.0]


@pytest.mark.parametrize("path, detail", [
    ("utils.rewards", "is not of the form 'module:function'"),
    ("utils.rewards:exact_answer:x", "is not of the form 'module:function'"),
    (":exact_answer", "is not of the form 'module:function'"),
    ("utils.rewards:", "is not of the form 'module:function'"),
    ("no_such_reward_module:f", "cannot import no_such_reward_module: No module named 'no_such_reward_module'"),
    ("user_rewards_broken:f", "cannot import user_rewards_broken: the reward module is broken"),
    ("user_rewards_missing_dependency:f", "No module named 'no_such_dependency'"),
    ("utils.rewards:no_such_function", "module utils.rewards has no attribute no_such_function"),
    ("utils.rewards:MAX_DIGITS", "MAX_DIGITS is not callable (a int)"),
])
def test_each_load_error_is_one_line_naming_the_path(user_module, path, detail):
    user_module("user_rewards_broken", "raise RuntimeError('the reward module is broken\\nsecond line')\n")
    user_module("user_rewards_missing_dependency", "import no_such_dependency\n")
    with pytest.raises(InputError) as caught:
        load_reward_functions(["utils.rewards:format_reward", path])
    message = str(caught.value)
    assert message.startswith("rlhf.reward_functions: ") and "\n" not in message
    assert path in message and detail in message


def test_two_functions_of_one_name_are_refused(user_module):
    user_module("user_rewards_same_name", "def exact_answer(completions, **kwargs):\n    return [0.0]\n")
    with pytest.raises(InputError, match=r"^rlhf.reward_functions: utils.rewards:exact_answer and "
                                         r"user_rewards_same_name:exact_answer share the name exact_answer;[^\n]*$"):
        load_reward_functions(["utils.rewards:exact_answer", "user_rewards_same_name:exact_answer"])


def test_an_empty_list_is_refused():
    with pytest.raises(InputError, match=r"^rlhf.reward_functions: empty[^\n]*$"):
        load_reward_functions([])


# ---------------------------------------------------------------- scoring


def constant(name: str, rewards: object) -> tuple[str, Callable]:
    return name, lambda **kwargs: rewards


def test_total_is_the_weighted_sum_without_abstentions_and_per_function_keeps_nan():
    functions = [constant("a", [1.0, None, 2.0, None]), constant("b", [0.5, 3, None, None]),
                 constant("c", [True, False, np.float32(0.25), None])]
    total, per_function = score_completions(functions, [2.0, -1.0, 4.0], ["q"] * 4, ["r"] * 4, [[1]] * 4, {})
    assert total.dtype == per_function.dtype == torch.float32 and per_function.shape == (4, 3)
    nan = math.nan
    torch.testing.assert_close(per_function, torch.tensor([[1.0, 0.5, 1.0], [nan, 3.0, 0.0], [2.0, nan, 0.25],
                                                           [nan, nan, nan]]), equal_nan=True)
    # Row 3: every function abstained, so nothing is summed.
    torch.testing.assert_close(total, torch.tensor([2.0 - 0.5 + 4.0, -3.0, 4.0 + 1.0, 0.0]))


def test_functions_get_prompts_completions_ids_and_the_columns_by_keyword():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, task, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, task=task,
                    extra=kwargs)
        return [0.0] * len(completions)

    score_completions([("spy", spy)], [1.0], ["p1", "p2"], ["c1", "c2"], [[5], [6, 7]],
                      {"answer": ["1", "2"], "task": ["x", "y"]})
    assert seen == dict(prompts=["p1", "p2"], completions=["c1", "c2"], completion_ids=[[5], [6, 7]],
                        answer=["1", "2"], task=["x", "y"], extra={})


@pytest.mark.parametrize("rewards, detail", [
    ([1.0, 2.0], "returned 2 rewards for 3 completions"),
    ([1.0] * 4, "returned 4 rewards for 3 completions"),
    (1.0, "returned a float for 3 completions"),
    ((r for r in [1.0, 1.0, 1.0]), "returned a generator for 3 completions"),
    ([1.0, "1.0", 0.0], "returned '1.0' for completion 1; expected a number or None"),
    ([1.0, 0.0, [1.0]], "returned [1.0] for completion 2; expected a number or None"),
    ([math.nan, 0.0, 0.0], "returned nan for completion 0; rewards must be finite"),
    ([0.0, -math.inf, 0.0], "returned -inf for completion 1; rewards must be finite"),
    ([0.0, 0.0, np.float64("inf")], "returned inf for completion 2; rewards must be finite"),
])
def test_bad_rewards_are_one_line_naming_the_function(rewards, detail):
    with pytest.raises(InputError) as caught:
        score_completions([constant("fine", [0.0] * 3), constant("my_reward", rewards)], [1.0, 1.0], ["q"] * 3,
                          ["r"] * 3, [[1]] * 3, {})
    message = str(caught.value)
    assert message.startswith("reward function my_reward ") and detail in message and "\n" not in message


def test_weights_must_match_the_functions():
    with pytest.raises(InputError, match=r"^1 reward weights for 2 reward functions$"):
        score_completions([constant("a", [0.0]), constant("b", [0.0])], [1.0], ["q"], ["r"], [[1]], {})


# Copied verbatim from TRL's GRPOTrainer documentation (quick start, and "Using a custom reward function").
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def test_reward_functions_from_trl_documentation_run_unchanged():
    completions = [" The solution is \\boxed{2}.", " The solution is \\boxed{6}.", "a" * 20]
    total, per_function = score_completions([("reward_len", reward_len), ("reward_func", reward_func)], [1.0, 2.0],
                                             ["Problem: 2x + 3 = 7", "Problem: 3x - 5 = 10", "Say 20 a's"],
                                             completions, [[1], [2], [3]], {"ground_truth": ["2", "5", "a" * 20]})
    torch.testing.assert_close(per_function, torch.tensor([[-7.0, 1.0], [-7.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(total, torch.tensor([-5.0, -7.0, 0.0]))

    from trl.rewards import think_format_reward

    prompts = [[{"role": "user", "content": "What is the result of (1 + 2) * 4?"}]] * 2
    completions = [conversational("<think>The sum of 1 and 2 is 3, times 4 is 12.</think><answer>12</answer>"),
                   conversational("(1 + 2) * 4 = 12")]
    total, per_function = score_completions([("format_reward_func", format_reward_func),
                                             ("think_format_reward", think_format_reward)], [1.0, 1.0], prompts,
                                            completions, [[1], [2]], {})
    torch.testing.assert_close(per_function, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(total, torch.tensor([2.0, 0.0]))


def test_per_function_rewards_match_trl_grpo_trainer():
    from transformers import TrainerState
    from trl import GRPOTrainer

    completions = [conversational(text) for text in ["7 + 5 = 12", "7 + 5 = 11", "twelve", "3 - 1 = 2", "2"]]
    prompts = [[{"role": "user", "content": "What is 7 + 5?"}]] * 3 + [[{"role": "user", "content": "3 - 1?"}]] * 2
    answers = ["12", "12", None, "2", "2"]
    functions = [("exact_answer", exact_answer), ("partial_credit", partial_credit), ("format_reward", format_reward),
                 ("format_reward_func", format_reward_func)]
    weights = [1.0, 0.5, 0.25, 2.0]
    total, per_function = score_completions(functions, weights, prompts, completions, [[1]] * 5, {"answer": answers})

    # TRL's own reward step, on a stand-in holding the trainer attributes it reads.
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), state=TrainerState(),
        args=SimpleNamespace(report_to=[]), reward_funcs=[function for _, function in functions],
        reward_func_names=[name for name, _ in functions], reward_processing_classes=[None] * len(functions),
        _log_completion_extra=None, _log_metric=None, environments=None)
    inputs = [{"prompt": prompt, "answer": answer} for prompt, answer in zip(prompts, answers)]
    trl_per_function = GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, [[1]] * 5)
    torch.testing.assert_close(per_function, trl_per_function, equal_nan=True)
    torch.testing.assert_close(total, (trl_per_function * torch.tensor(weights)).nansum(dim=1))


# ---------------------------------------------------------------- the demo arithmetic files

QUESTION = re.compile(r"(\d+) (\+|-|plus|minus|加|减) (\d+)")
OPERATORS = {"+": "+", "plus": "+", "加": "+", "-": "-", "minus": "-", "减": "-"}


def read_records(name: str) -> list[dict]:
    with open(DEMO / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def fact_of(question: str) -> tuple[int, str, int]:
    [(a, word, b)] = QUESTION.findall(question)
    return int(a), OPERATORS[word], int(b)


def value(fact: tuple[int, str, int]) -> int:
    a, op, b = fact
    return a + b if op == "+" else a - b


@pytest.fixture(scope="module")
def arithmetic():
    """Per file: (fact, user question, answer or reply) for every row."""
    files = {}
    for name in ("arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        files[name] = [(fact_of(r["prompt"][0]["content"]), r["prompt"][0]["content"], r["answer"])
                       for r in read_records(name)]
    for name in ("arithmetic_sft_train.jsonl", "arithmetic_sft_val.jsonl"):
        files[name] = [(fact_of(user["content"]), user["content"], reply["content"])
                       for user, reply in (r["conversations"] for r in read_records(name))]
    return files


def test_demo_val_facts_are_never_trained_on(arithmetic):
    facts = {name: {fact for fact, _, _ in rows} for name, rows in arithmetic.items()}
    train = facts["arithmetic_train.jsonl"] | facts["arithmetic_sft_train.jsonl"]
    val = facts["arithmetic_val.jsonl"] | facts["arithmetic_sft_val.jsonl"]
    assert not train & val
    everything = {(a, op, b) for a in range(21) for b in range(21) for op in "+-" if op == "+" or a >= b}
    assert train | val == everything and len(val) == round(0.15 * len(everything))
    assert {len(rows) for rows in arithmetic.values()} == {2000, 200, 100}


def test_demo_answers_are_right_and_the_prompts_bilingual(arithmetic):
    for name in ("arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        assert all(answer == str(value(fact)) for fact, _, answer in arithmetic[name])
    for name in ("arithmetic_sft_train.jsonl", "arithmetic_sft_val.jsonl"):
        assert all(reply == f"{fact[0]} {fact[1]} {fact[2]} = {value(fact)}" for fact, _, reply in arithmetic[name])
    for rows in arithmetic.values():
        chinese = sum(bool(re.search("[\u4e00-\u9fff]", question)) for _, question, _ in rows)
        assert 0.4 < chinese / len(rows) < 0.6


@pytest.mark.parametrize("name", ["arithmetic_sft_train.jsonl", "arithmetic_sft_val.jsonl"])
def test_demo_sft_replies_score_full_marks(arithmetic, name):
    completions = [conversational(reply) for _, _, reply in arithmetic[name]]
    answers = [str(value(fact)) for fact, _, _ in arithmetic[name]]
    functions = list(BUILT_INS.items())
    total, per_function = score_completions(functions, [1.0] * 3, [[]] * len(completions), completions,
                                            [[]] * len(completions), {"answer": answers})
    assert bool((per_function == 1.0).all()) and bool((total == 3.0).all())
