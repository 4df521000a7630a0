"""Hugging Face tokenizer directories as users' checkpoints hold them, built here: BPE
models trained with `tokenizers` on local text, saved by transformers'
`PreTrainedTokenizerFast(...).save_pretrained` with a chat template, plus a
generation_config.json. Nothing is downloaded.

- "qwen":   byte-level BPE, ChatML template (Qwen): <|im_start|>role\\n...<|im_end|>
- "llama3": the same vocabulary, Llama 3's header template and BOS post-processor
- "llama2": metaspace BPE with byte fallback, legacy normalizer (Llama 2 / TinyLlama),
            <s> </s>, an [INST] template with raise_exception, add_bos_token
- "mistral": the same model with Metaspace(prepend_scheme="first") (newer conversions)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Text with what tokenizers get wrong first: accents, CJK, emoji (incl. ZWJ sequences),
# combining marks, digits, code, odd whitespace.
SAMPLES = [
    "Hello world! The café served crème brûlée and jalapeño piñatas.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀 🎉 👩‍👩‍👧 🇫🇷 ❤️ 1️⃣ — done.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs",
    "Ünïcödé façade naïve coöperate Ångström Øresund ÆØÅ ß ğ ş ı",
    "  leading spaces and trailing   ",
    "Numbers 1234567890 and 3.14159, −42, ½ ¾",
    "Mixed: Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום עולם",
    "a\u0301 e\u0308 combining marks; zero\u200bwidth; nbsp\u00a0here",
]

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                       "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML with the assistant's part marked for training masks.
CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

INST = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def training_text(corpus_texts: list[str], limit: int = 300_000) -> list[str]:
    out, size = [], 0
    for text in corpus_texts:
        out.append(text[:20_000])
        size += len(out[-1])
        if size > limit:
            break
    return out + SAMPLES * 20


def byte_level_tokenizer(texts: list[str], vocab_size: int = 1200) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BYTE_LEVEL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tok


def metaspace_tokenizer(texts: list[str], prepend_first: bool, vocab_size: int = 900) -> Tokenizer:
    """SentencePiece-style BPE: "▁" for spaces, <0xNN> byte pieces at ids 3..258 as Llama's."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer_tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    spec = json.loads(trainer_tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if prepend_first:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                            split=False), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def save(tok: Tokenizer, directory: Path, template: str, generation: dict, **tokens) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()), **tokens)
    fast.chat_template = template
    fast.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return directory


def build_all(root: Path, corpus_texts: list[str]) -> dict[str, Path]:
    texts = training_text(corpus_texts)
    byte_level = byte_level_tokenizer(texts)
    ids = {t: byte_level.token_to_id(t) for t in BYTE_LEVEL_SPECIALS}
    dirs = {}
    qwen = Tokenizer.from_str(byte_level.to_str())
    dirs["qwen"] = save(qwen, root / "qwen", CHATML, {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]},
                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llama3 = Tokenizer.from_str(byte_level.to_str())
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    dirs["llama3"] = save(llama3, root / "llama3", LLAMA3,
                          {"bos_token_id": ids["<|begin_of_text|>"],
                           "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]},
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    for name, first in (("llama2", False), ("mistral", True)):
        dirs[name] = save(metaspace_tokenizer(texts, prepend_first=first), root / name, INST,
                          {"bos_token_id": 1, "eos_token_id": 2},
                          bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    return dirs
