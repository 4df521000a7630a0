"""Verifiable synthetic chat tasks: arithmetic, comparisons, sorting, letter games.

Every problem has a user prompt, a canonical answer and a verifier, so each stage's gain
is measured rather than asserted. The train / held-out split is made by construction: a
problem is held out when a hash of its family and canonical operands falls in the
held-out bucket, so whatever the seed, no held-out problem can appear in training data.
Generation is deterministic by seed and every produced set carries a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

HELDOUT_BUCKETS = 8          # 1 problem in 8 (by hash) belongs to the held-out split
GENERATOR_VERSION = "tasks-v2"   # part of every fingerprint: change it when generators change


@dataclass(frozen=True)
class Problem:
    family: str
    key: str        # canonical identity of the problem (what the split hashes)
    prompt: str     # the user message
    answer: str     # the canonical answer

    @property
    def heldout(self) -> bool:
        return is_heldout(self.family, self.key)

    def check(self, response: str) -> bool:
        return FAMILIES[self.family].verify(self, response)

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def is_heldout(family: str, key: str) -> bool:
    digest = hashlib.sha256(f"{family}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


# --- verification ---------------------------------------------------------------------------

def _normalise(text: str) -> str:
    """Forgive what a grader would: case, surrounding space and a final full stop."""
    return re.sub(r"\s+", " ", text.strip().rstrip(".").strip()).lower()


def _exact(problem: Problem, response: str) -> bool:
    return _normalise(response) == _normalise(problem.answer)


def _same_json(problem: Problem, response: str) -> bool:
    """The reply is the answer's JSON object, whatever its layout (and, as elsewhere, a
    final full stop is forgiven); the number must be a JSON integer (not 75.0, not "75")."""
    try:
        got = json.loads(response.strip().rstrip(".").strip())
    except ValueError:
        return False
    return isinstance(got, dict) and got == json.loads(problem.answer) and type(got["answer"]) is int


def _numbers_equal(problem: Problem, response: str) -> bool:
    """Lists of numbers compare as numbers, whatever the separators."""
    got = re.findall(r"-?\d+", response)
    return bool(got) and got == re.findall(r"-?\d+", problem.answer) and not re.search(
        r"[a-z]", response.lower())


# --- generators ------------------------------------------------------------------------------

def _num(rng: random.Random, max_digits: int) -> int:
    # Uniform over the number of digits first, so short and long operands are equally common.
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _spaced(letters: str) -> str:
    # Letters are spaced out so that each one is its own token for the model.
    return " ".join(letters)


def gen_add(rng: random.Random) -> tuple[str, str, str]:
    a, b = _num(rng, 2), _num(rng, 2)
    return f"{a}+{b}", f"What is {a} + {b}?", str(a + b)


def gen_sub(rng: random.Random) -> tuple[str, str, str]:
    a, b = _num(rng, 2), _num(rng, 2)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}", f"What is {a} - {b}?", str(a - b)


def gen_json_add(rng: random.Random) -> tuple[str, str, str]:
    # Arithmetic answered as a JSON object, the shape structured outputs guarantee.
    a, b = _num(rng, 2), _num(rng, 2)
    return f"{a}+{b}", f"What is {a} + {b}? Reply in JSON.", json.dumps({"answer": a + b})


def gen_mul(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 9), _num(rng, 2)
    return f"{a}*{b}", f"What is {a} * {b}?", str(a * b)


def gen_compare(rng: random.Random) -> tuple[str, str, str]:
    a = _num(rng, 2)
    b = _num(rng, 2)
    while b == a:
        b = _num(rng, 2)
    return f"{a}?{b}", f"Which is larger, {a} or {b}?", str(max(a, b))


def gen_sort(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    listed = ", ".join(map(str, nums))
    return listed, f"Sort in ascending order: {listed}", ", ".join(map(str, sorted(nums)))


def gen_reverse(rng: random.Random) -> tuple[str, str, str]:
    letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    return letters, f"Reverse the letters: {_spaced(letters)}", _spaced(letters[::-1])


def gen_count(rng: random.Random) -> tuple[str, str, str]:
    # A small alphabet makes repeated letters (and non-trivial counts) common.
    letters = "".join(rng.choice("abcde") for _ in range(rng.randint(3, 7)))
    target = rng.choice(letters) if rng.random() < 0.85 else rng.choice("abcde")
    return (f"{target}:{letters}", f"How many times does the letter {target} appear in: {_spaced(letters)}?",
            str(letters.count(target)))


def gen_palindrome(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(3, 6)
    half = "".join(rng.choice(string.digits[1:]) for _ in range((n + 1) // 2))
    digits = half + half[: n // 2][::-1]
    if rng.random() < 0.5:
        # A near miss (one digit changed) is a harder "no" than a random string.
        i = rng.randrange(n // 2)
        digits = digits[:i] + rng.choice([d for d in string.digits[1:] if d != digits[i]]) + digits[i + 1:]
    answer = "yes" if digits == digits[::-1] else "no"
    return digits, f"Is {digits} a palindrome? Answer yes or no.", answer


@dataclass(frozen=True)
class Family:
    name: str
    generate: Callable[[random.Random], tuple[str, str, str]]
    verify: Callable[[Problem, str], bool] = _exact
    # A JSON Schema every right answer satisfies: what a response_format may enforce.
    answer_schema: dict | None = None


# The sum of two numbers below 100: the range also bounds the digits a model may write.
JSON_ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 198}},
                      "required": ["answer"], "additionalProperties": False}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("add", gen_add),
    Family("sub", gen_sub),
    Family("mul", gen_mul),
    Family("compare", gen_compare),
    Family("sort", gen_sort, _numbers_equal),
    Family("reverse", gen_reverse),
    Family("count", gen_count),
    Family("palindrome", gen_palindrome),
    Family("json_add", gen_json_add, _same_json, JSON_ANSWER_SCHEMA),
)}

# Families a preset must name to get: "all families" (families=None) leaves them out, so
# adding one changes no existing preset's data or results.
OPT_IN_FAMILIES = frozenset({"json_add"})
DEFAULT_FAMILIES = tuple(name for name in FAMILIES if name not in OPT_IN_FAMILIES)

# Families whose answer is "yes" or "no": a skewed prompt set teaches a model the skew.
YES_NO_FAMILIES = frozenset({"palindrome"})


# --- wrong answers -------------------------------------------------------------------------

def corrupt(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: one digit or letter changed, two swapped, one dropped or
    repeated, or the other yes/no. Always fails the verifier."""
    answer = problem.answer
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if problem.family == "compare":
        # The tempting mistake is the other operand.
        return min(problem.key.split("?"), key=int)
    for _ in range(50):
        tokens = list(answer)
        slots = [i for i, ch in enumerate(tokens) if ch.isalnum()]
        i = rng.choice(slots)
        kind = rng.randrange(4)
        if kind == 0:
            pool = string.digits if tokens[i].isdigit() else string.ascii_lowercase
            tokens[i] = rng.choice([c for c in pool if c != tokens[i]])
        elif kind == 1 and len(slots) > 1:
            j = rng.choice([s for s in slots if s != i])
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == 2 and len(slots) > 1:
            del tokens[i]
        else:
            tokens.insert(i, tokens[i])
        wrong = "".join(tokens).strip(" ,")
        if wrong and not problem.check(wrong):
            return wrong
    return answer + " 1"   # unreachable in practice; still wrong for every family


# --- sets ------------------------------------------------------------------------------------

@dataclass
class TaskSet:
    problems: list[Problem]
    fingerprint: str

    def by_family(self) -> dict[str, list[Problem]]:
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.family, []).append(p)
        return out


def fingerprint(problems: Iterable[Problem]) -> str:
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    for p in problems:
        digest.update(f"{p.family}\0{p.key}\0{p.prompt}\0{p.answer}\n".encode())
    return digest.hexdigest()[:16]


def sample_problems(n_per_family: int, split: str, seed: int, families: Iterable[str] | None = None,
                    unique: bool = False, exclude: Collection[tuple[str, str]] = frozenset()) -> TaskSet:
    """`n_per_family` problems of each family from `split` ("train" or "heldout"),
    interleaved family by family. `unique` drops repeats (used for evaluation sets);
    `exclude` skips the problems whose (family, key) it holds."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = list(families or DEFAULT_FAMILIES)
    per_family: list[list[Problem]] = []
    for name in names:
        family = FAMILIES[name]
        # A per-family stream (seeded by name) keeps one family's problems unchanged when
        # another family is added or removed.
        rng = random.Random(f"{seed}:{split}:{name}")
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n_per_family:
            attempts += 1
            if attempts > 200 * n_per_family + 1000:
                raise ValueError(f"family {name!r} has too few distinct {split} problems for {n_per_family}")
            key, prompt, answer = family.generate(rng)
            if (is_heldout(name, key) != (split == "heldout") or (unique and key in seen)
                    or (name, key) in exclude):
                continue
            seen.add(key)
            out.append(Problem(name, key, prompt, answer))
        per_family.append(out)
    problems = [p for group in zip(*per_family, strict=True) for p in group]
    return TaskSet(problems, fingerprint(problems))


# --- renderings ------------------------------------------------------------------------------

def plain_text(problem: Problem) -> str:
    """The text form used in pretraining documents and in the base model's few-shot prompt."""
    return f"Question: {problem.prompt}\nAnswer: {problem.answer}\n"


def few_shot_prompt(shots: list[Problem], problem: Problem) -> str:
    return "".join(plain_text(s) + "\n" for s in shots) + f"Question: {problem.prompt}\nAnswer:"


def pretraining_documents(n_docs: int, per_doc: int, seed: int, families: Iterable[str] | None = None) -> list[str]:
    """Documents of `per_doc` question/answer blocks from the training split."""
    names = list(families or DEFAULT_FAMILIES)
    problems = sample_problems(n_docs * per_doc // len(names) + 1, "train", seed + 1_000_003, names).problems
    random.Random(seed).shuffle(problems)
    return ["\n".join(plain_text(p) for p in problems[i * per_doc:(i + 1) * per_doc]) for i in range(n_docs)]


@dataclass
class PreferencePair:
    problem: Problem
    chosen: str
    rejected: str
    source: str = "corrupt"     # "corrupt" or "model" (a policy sample that failed the verifier)


@dataclass
class PreferenceSet:
    pairs: list[PreferencePair] = field(default_factory=list)
    fingerprint: str = ""


def preference_pairs(problems: list[Problem], seed: int,
                     model_wrong: dict[tuple[str, str], list[str]] | None = None,
                     model_pairs_per_problem: int = 1) -> PreferenceSet:
    """The canonical answer preferred over a wrong one, per problem. Where the policy
    produced wrong answers for the problem (`model_wrong[(family, key)]`), up to
    `model_pairs_per_problem` distinct ones are rejected answers, one pair each;
    otherwise one corruption of the canonical answer is."""
    rng = random.Random(f"pairs:{seed}")
    model_wrong = model_wrong or {}
    pairs = []
    for p in problems:
        wrong = [w for w in model_wrong.get((p.family, p.key), []) if w.strip() and not p.check(w)]
        if wrong:
            # Drawn with the samples' multiplicity, so the policy's common mistakes come first.
            for _ in range(model_pairs_per_problem):
                if not wrong:
                    break
                rejected = rng.choice(wrong)
                pairs.append(PreferencePair(p, p.answer, rejected, "model"))
                wrong = [w for w in wrong if w != rejected]
        else:
            pairs.append(PreferencePair(p, p.answer, corrupt(p, rng), "corrupt"))
    digest = hashlib.sha256(fingerprint(problems).encode())
    for pair in pairs:
        digest.update(f"{pair.rejected}\0".encode())
    return PreferenceSet(pairs, digest.hexdigest()[:16])
