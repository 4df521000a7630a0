"""Structured outputs in the engine: every finished constrained output satisfies its
schema, regex or grammar (checked with jsonschema, re and the independent `lark` parser),
a constrained row changes nothing for the rows beside it, and n, seeds, preemption,
chunked prefill and the prefix cache keep working under a grammar."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import lark
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.api import EngineRequest, JsonSchema, ResponseFormat, SamplingParams
from server.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarLimits,
    close_objects,
    constraint_key,
    token_bitmask,
)
from server.engine.sampler import apply_token_bitmask, sample, unpack_bitmask, unpack_bitmask_by_shifts
from tests.engine.conftest import collect

# Nested objects, arrays, enums, integers with ranges, required fields.
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]}},
     "required": ["name", "age", "role"]},
    {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 5},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 6},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
     "required": ["id", "address", "tags"]},
    {"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                   "maxItems": 2},
        "kind": {"anyOf": [{"type": "null"}, {"enum": ["x", "y"]}]}},
     "required": ["ok", "scores", "kind"]},
    {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 50},
        "y": {"type": "integer", "minimum": 0, "maximum": 50}}, "required": ["x", "y"]}},
     "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                                 "minItems": 1, "maxItems": 2},
                                      "label": {"const": "path"}},
     "required": ["points", "label"]},
]
REGEXES = [r"[A-Z][a-z]{1,5} (is|was) [0-9]{1,2}", r"(yes|no)", r"[0-9]{3}-[0-9]{4}", r"#[0-9a-f]{6}"]
ARITH = """
start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
"""
LIST = """
start: "[" item ("," item)* "]"
item: WORD | NUMBER
WORD: /[a-z]{1,4}/
NUMBER: /[0-9]{1,2}/
"""
GRAMMARS = [ARITH, LIST]


def json_format(schema: dict, strict: bool = True) -> ResponseFormat:
    return ResponseFormat("json_schema", JsonSchema("s", json.dumps(schema), strict))


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(tiny_tokenizer)


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> set[int]:
    bits = ((bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:vocab]
    return set(torch.nonzero(bits).flatten().tolist())


# --- compiling --------------------------------------------------------------------------------

def test_formats_compile_and_are_cached_by_constraint(compiler):
    for fmt in [ResponseFormat("json_object"), *(json_format(s) for s in SCHEMAS),
                *(ResponseFormat("regex", regex=r) for r in REGEXES),
                *(ResponseFormat("grammar", grammar=g) for g in GRAMMARS)]:
        assert compiler.compile(fmt) is not None
    assert compiler.compile(ResponseFormat("text")) is None and compiler.compile(None) is None
    # The same schema with its keys in another order is the same constraint.
    a = json_format({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    b = ResponseFormat("json_schema", JsonSchema("other", {"required": ["a"], "properties": {"a": {"type": "integer"}},
                                                        "type": "object"}, True))
    assert constraint_key(a) == constraint_key(b)
    hits = compiler.hits
    assert compiler.compile(a) is compiler.compile(b)
    assert compiler.hits >= hits + 1


def test_cache_is_bounded_lru_by_bytes(tiny_tokenizer):
    # Room for two of these small grammars (each charged about the entry floor), not three.
    small = GrammarCompiler.for_tokenizer(tiny_tokenizer, limits=GrammarLimits(cache_bytes=int(2.5 * (64 << 10))))
    fmts = [ResponseFormat("regex", regex=f"a{{{i}}}") for i in range(1, 4)]
    first = small.compile(fmts[0])
    small.compile(fmts[1])
    assert small.compile(fmts[0]) is first          # refreshed: fmts[1] is now the oldest
    small.compile(fmts[2])
    assert len(small) == 2 and small.cache_bytes <= small.limits.cache_bytes
    assert small.cache_bytes == sum(small.cached(f).nbytes for f in (fmts[0], fmts[2]))
    assert small.cached(fmts[0]) is first and small.cached(fmts[1]) is None


@pytest.mark.parametrize(("fmt", "words"), [
    (ResponseFormat("regex", regex="[a-z"), "unclosed character class"),
    (ResponseFormat("regex", regex="(?<=a)b"), "look-around"),
    (ResponseFormat("grammar", grammar='start: "a" missing'), 'unknown name: "missing"'),
    (ResponseFormat("grammar", grammar="root ::= \"a\""), "Expected"),
    (json_format({"type": "strng"}), "Invalid type: strng"),
    (json_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (json_format({"not": {"type": "string"}}), "not"),
    (json_format({"if": {"type": "string"}, "then": {"maxLength": 2}}), "if"),
    (json_format({"type": "integer", "minimum": 5, "maximum": 2}), "minimum"),
    (json_format({"type": "string", "pattern": "(["}), "unclosed"),
    (json_format({"properties": {"a": {"$ref": "#/$defs/nope"}}}), "nope"),
    # An "x-guidance" option cannot switch refusing into ignoring.
    (json_format({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}), "uniqueItems"),
])
def test_invalid_or_unsupported_constraints_are_refused_by_name(compiler, fmt, words):
    with pytest.raises(GrammarError) as err:
        compiler.compile(fmt)
    assert words in str(err.value)
    assert str(err.value).startswith(f"response_format {fmt.type}:")


def test_shape_problems_are_found_by_validate():
    cases = {
        "must be one of": ResponseFormat("yaml"),
        "needs a json_schema": ResponseFormat("json_schema"),
        "needs a non-empty regex": ResponseFormat("regex"),
        "takes no regex": ResponseFormat("json_object", regex="a"),
        "not valid JSON": ResponseFormat("json_schema", JsonSchema(schema="{nope")),
        "must be a JSON object": ResponseFormat("json_schema", JsonSchema(schema="[1]")),
        "json_schema.name": ResponseFormat("json_schema", JsonSchema(name="has space", schema="{}")),
        "characters long": ResponseFormat("regex", regex="a" * 70000),
    }
    for words, fmt in cases.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            SamplingParams(response_format=fmt).validate(512)
    SamplingParams(response_format=json_format(SCHEMAS[0])).validate(512)


def test_strict_closes_every_object_the_schema_leaves_open():
    closed = close_objects(SCHEMAS[3])
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["point"]["additionalProperties"] is False
    open_on_purpose = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert close_objects(open_on_purpose) == open_on_purpose
    assert "additionalProperties" not in SCHEMAS[3]          # the caller's schema is left alone


# --- the mask -----------------------------------------------------------------------------------

def test_stop_tokens_are_allowed_exactly_where_the_grammar_may_end(compiler, tiny_tokenizer):
    eos = tiny_tokenizer.eot_id
    vocab = compiler.vocab_size
    g = compiler.compile(ResponseFormat("regex", regex="[0-9]{1,2}"))
    m = g.matcher([eos])
    first = allowed_ids(token_bitmask([m], vocab)[0], vocab)
    assert eos not in first and first and all(tiny_tokenizer.decode([t]).isdigit() for t in first)
    assert not set(tiny_tokenizer.special_ids.values()) & first
    assert m.accept(tiny_tokenizer.encode("7")[0]) and m.is_accepting() and not m.is_stopped()
    second = allowed_ids(token_bitmask([m], vocab)[0], vocab)
    assert eos in second and all(t == eos or tiny_tokenizer.decode([t]).isdigit() for t in second)
    assert m.accept(tiny_tokenizer.encode("1")[0]) and m.is_stopped()


def test_bitmask_masks_only_its_rows_and_reads_bit_31():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0] = -(1 << 31)          # token 31 only
    bitmask[0, 2] = 1 << 5              # token 69
    out = apply_token_bitmask(logits, torch.tensor([1]), bitmask)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert set(torch.nonzero(out[1] > float("-inf")).flatten().tolist()) == {31, 69}
    drawn = sample(logits, [SamplingParams(temperature=1.0)] * 3, seeds=[1, 2, 3], steps=[0, 0, 0],
                   allowed=(torch.tensor([1]), bitmask)).token_ids
    assert int(drawn[1]) in (31, 69)
    # The accelerator's unpacking (tensor shifts) reads the same bits as the CPU's (numpy).
    random_words = torch.randint(-(1 << 31), (1 << 31) - 1, (5, 9), dtype=torch.int32)
    assert torch.equal(unpack_bitmask(random_words, 280, torch.device("cpu")),
                       unpack_bitmask_by_shifts(random_words, 280))


# --- generation ---------------------------------------------------------------------------------

def _check(fmt: ResponseFormat, text: str) -> None:
    if fmt.type == "json_schema":
        jsonschema.validate(json.loads(text), fmt.json_schema.schema_object())
    elif fmt.type == "json_object":
        assert isinstance(json.loads(text), dict)
    elif fmt.type == "regex":
        assert re.fullmatch(fmt.regex, text), (fmt.regex, text)
    else:
        lark.Lark(fmt.grammar, parser="earley").parse(text)


def test_200_constrained_requests_at_temperature_1_all_valid(model, tiny_tokenizer, make_engine, compiler):
    formats = ([json_format(s) for s in SCHEMAS] + [json_format(SCHEMAS[0], strict=False)]
               + [ResponseFormat("json_object")]
               + [ResponseFormat("regex", regex=r) for r in REGEXES]
               + [ResponseFormat("grammar", grammar=g) for g in GRAMMARS])
    rng = random.Random(0)
    prompts = ["Answer in JSON:", "Once upon a time", "x", "The quick brown fox", "Data:"]
    jobs = [(rng.choice(prompts), formats[i % len(formats)], i) for i in range(200)]
    engine = make_engine(model, max_num_seqs=64)
    waits = [_submit(engine, f"j{seed}", tiny_tokenizer.encode(p),
                     SamplingParams(temperature=1.0, max_tokens=96, seed=seed, response_format=fmt), compiler,
                     [tiny_tokenizer.eot_id]) for p, fmt, seed in jobs]
    outs = [wait() for wait in waits]
    finished = 0
    for (_, fmt, _), out in zip(jobs, outs, strict=True):
        choice = out.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            finished += 1
            _check(fmt, choice.text)
    # The bounded formats end well within 96 tokens: most requests must have finished.
    assert finished >= 150, finished
    engine.blocks.check_whole()


def test_a_trained_model_if_one_is_in_the_registry(tiny_tokenizer):
    """The same guarantee on a trained model, when this machine has one (SOL_HOME)."""
    from gpt.registry import Registry, default_registry_root

    try:
        registry = Registry(default_registry_root())
        ckpt = registry.load(next(iter(registry.models())) + ":sft")
    except Exception:  # noqa: BLE001 - any missing piece means there is no trained model here
        pytest.skip("no trained model in the registry")
    from gpt.chat import chat_prompt_ids, chat_stop_ids
    from server.engine.offline import build_engine, generate

    stops = chat_stop_ids(ckpt.tokenizer)
    engine = build_engine(ckpt.model, start=False)
    prompt = chat_prompt_ids(ckpt.tokenizer, [{"role": "user", "content": "What is 12 + 30?"}])
    params = [SamplingParams(temperature=1.0, max_tokens=48, seed=i, response_format=json_format(SCHEMAS[0]))
              for i in range(20)]
    outs = generate(engine, [prompt] * 20, params, stops,
                    grammars=GrammarCompiler.for_tokenizer(ckpt.tokenizer, ckpt.config.vocab_size))
    for out in outs:
        if out.choices[0].finish_reason == "stop":
            _check(json_format(SCHEMAS[0]), ckpt.tokenizer.decode([t for t in out.token_ids if t not in stops]))


def _submit(engine, rid, prompt, params, compiler, eos=()):
    from server.engine.output import OutputProcessor

    fmt = params.response_format
    request = EngineRequest(request_id=rid, prompt_ids=list(prompt), params=params, eos_token_ids=list(eos),
                            grammar=compiler.compile(fmt) if fmt is not None and fmt.constrained else None)
    stream = engine.submit(request)
    stream.processor = OutputProcessor(request, engine.test_texts, stream.abort_choice)
    return lambda: collect(stream, list(prompt), params.n)


def test_greedy_constrained_row_batched_equals_alone(model, prompts, make_engine, compiler, tiny_tokenizer):
    eos = [tiny_tokenizer.eot_id]
    constrained = SamplingParams(temperature=0.0, max_tokens=80, response_format=json_format(SCHEMAS[1]))
    free = SamplingParams(temperature=0.0, max_tokens=24)
    alone = make_engine(model, max_num_seqs=1)
    want_constrained = _submit(alone, "c", prompts[0], constrained, compiler, eos)().token_ids
    want_free = [_submit(alone, f"f{i}", p, free, compiler, eos)().token_ids for i, p in enumerate(prompts[1:])]
    batched = make_engine(model, max_num_seqs=16)
    waits = [_submit(batched, f"f{i}", p, free, compiler, eos) for i, p in enumerate(prompts[1:])]
    mine = _submit(batched, "c", prompts[0], constrained, compiler, eos)
    assert mine().token_ids == want_constrained
    assert [w().token_ids for w in waits] == want_free
    assert json.loads(tiny_tokenizer.decode(want_constrained)) is not None


def test_n_seeds_preemption_chunked_prefill_and_prefix_cache(model, prompts, make_engine, compiler,
                                                             tiny_tokenizer):
    eos = [tiny_tokenizer.eot_id]
    fmt = json_format(SCHEMAS[2])
    params = SamplingParams(temperature=1.0, max_tokens=48, n=3, seed=11, response_format=fmt)
    roomy = make_engine(model, block_size=4, num_blocks=512)
    expected = _submit(roomy, "r", prompts[3], params, compiler, eos)()
    # A small pool and 8-token steps: long prompts prefill in chunks, sequences are preempted
    # and recomputed, and choices 1..n-1 reuse choice 0's prompt blocks.
    tight = make_engine(model, block_size=4, num_blocks=40, max_num_batched_tokens=8)
    others = [_submit(tight, f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=40, seed=i,
                                                         response_format=fmt if i % 2 else None), compiler, eos)
              for i, p in enumerate(prompts)]
    got = _submit(tight, "r", prompts[3], params, compiler, eos)()
    for wait in others:
        wait()
    assert tight.stats().preemptions > 0
    assert [c.token_ids for c in got.choices] == [c.token_ids for c in expected.choices]
    assert len({tuple(c.token_ids) for c in got.choices}) > 1        # the choices differ
    for c in got.choices:
        if c.finish_reason == "stop":
            _check(fmt, c.text)
    tight.blocks.check_whole()


def test_a_cut_answer_ends_with_length_and_a_complete_one_needs_no_eos(model, make_engine, compiler,
                                                                       tiny_tokenizer):
    eos = [tiny_tokenizer.eot_id]
    engine = make_engine(model)
    fmt = json_format(SCHEMAS[1])
    cut = _submit(engine, "cut", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, response_format=fmt),
                  compiler, eos)()
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    # ignore_eos: nothing may end the choice but the grammar itself, and it does.
    done = _submit(engine, "done", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True,
                                                               response_format=fmt), compiler, eos)()
    assert done.choices[0].finish_reason == "stop" and done.text.endswith("}")
    jsonschema.validate(json.loads(done.text), SCHEMAS[1])


def test_engine_refuses_an_uncompiled_or_foreign_grammar(model, make_engine, tiny_tokenizer):
    engine = make_engine(model)
    params = SamplingParams(max_tokens=8, response_format=ResponseFormat("json_object"))
    with pytest.raises(ValueError, match="compiled first"):
        engine.submit(EngineRequest(request_id="x", prompt_ids=[5], params=params))
    other = GrammarCompiler.for_tokenizer(tiny_tokenizer, vocab_size=tiny_tokenizer.vocab_size + 32)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit(EngineRequest(request_id="y", prompt_ids=[5], params=params,
                                    grammar=other.compile(params.response_format)))


# --- fuzz ---------------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
                      st.sampled_from(["object", "string", "integer", "array", "#/$defs/x", "(["]))
SCHEMA_KEYS = st.sampled_from(["type", "properties", "items", "required", "enum", "minimum", "maximum", "$ref",
                               "anyOf", "pattern", "not", "format", "additionalProperties", "minItems", "const"])
FUZZ_SCHEMAS = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(SCHEMA_KEYS, st.text(max_size=4)), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=FUZZ_SCHEMAS)
def test_fuzzed_schemas_compile_or_are_refused_cleanly(compiler, schema):
    fmt = ResponseFormat("json_schema", JsonSchema(schema=json.dumps(schema)))
    problems = fmt.problems()
    if problems:
        assert all(isinstance(p, str) and p for p in problems)
        return
    try:
        compiled = compiler.compile(fmt)
    except GrammarError as err:
        assert str(err).startswith("response_format json_schema:") and len(str(err)) < 800
        return
    token_bitmask([compiled.matcher([0])], compiler.vocab_size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=40), st.text(alphabet='start:"ab|()*+?/[]{}0-9 \n%', max_size=40)),
       kind=st.sampled_from(["regex", "grammar"]))
def test_fuzzed_regexes_and_grammars_compile_or_are_refused_cleanly(compiler, text, kind):
    fmt = ResponseFormat(kind, **{kind: text})
    if fmt.problems():
        return
    try:
        compiled = compiler.compile(fmt)
    except GrammarError as err:
        assert str(err).startswith(f"response_format {kind}:")
        return
    token_bitmask([compiled.matcher([0])], compiler.vocab_size)
