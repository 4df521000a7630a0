"""A Hugging Face checkpoint in the shape users run, built here from random weights: a
Llama-architecture model saved by `transformers` (LlamaConfig + LlamaForCausalLM,
`save_pretrained`, safetensors) and a byte-level BPE tokenizer trained with `tokenizers`
on local text (SmolLM2's kind: no BOS added, ChatML specials and template). Nothing is
downloaded. `sol bench vs-vllm --model smollm2` imports it into sol (`gpt.hf.import_hf`,
as `sol import-hf` does) while vLLM and CTranslate2 read the directory itself."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The pre-tokenizer split of GPT-2-style byte-level BPEs (SmolLM2's tokenizer is one).
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture checkpoint (transformers' LlamaConfig names)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


# HuggingFaceTB/SmolLM2-135M's config.json, but a 2048-token context (what the bench
# needs; it changes no weight's shape).
SMOLLM2_135M = LlamaShape(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                          rope_theta=100000.0)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE of at most `vocab_size` tokens (fewer when the text runs out of
    pairs to merge) with SmolLM2's special tokens at ids 0..2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def lively_init(model, seed: int) -> None:
    """Re-draw the weights as a trained model's are scaled (embeddings std 0.5, matrices
    std 1/sqrt(fan_in)): transformers' init (std 0.02) gives near-uniform logits whose
    greedy argmax repeats one token, which would make the engines' agreement check pass
    for anything. Throughput does not depend on the values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.5 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_checkpoint(out: Path, shape: LlamaShape, texts: list[str], seed: int = 0,
                     dtype: str = "float32") -> Path:
    """Write a random-weight Llama checkpoint of `shape` with its own tokenizer to `out`
    (config.json, model.safetensors, tokenizer files, generation_config.json)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    out = Path(out)
    tok = train_tokenizer(texts, shape.vocab_size)
    if tok.get_vocab_size() > shape.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size {shape.vocab_size}")
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    config = transformers.LlamaConfig(**asdict(shape), bos_token_id=bos, eos_token_id=eos, pad_token_id=bos)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    lively_init(model, seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()),
                                                bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.model_max_length = shape.max_position_embeddings
    fast.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, bos]}),
                                                encoding="utf-8")
    return out


def weight_bytes(directory: Path) -> int:
    """Bytes of the weights a safetensors checkpoint holds (each tensor once)."""
    from gpt.hf import weight_files
    from gpt.tensor_io import read_header

    return sum(entry.nbytes for path in weight_files(Path(directory)) for entry in read_header(path).values())
