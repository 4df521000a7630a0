"""Tokenizers of models sol serves and trains.

    base.py       the interface every tokenizer kind offers (`Tokenizer`) and its error
    hf_files.py   a Hugging Face checkpoint's tokenizer settings (bos/eos, add_bos_token,
                  chat template) read from tokenizer_config.json & co.
    hf.py         `HFTokenizer`: a model's own tokenizer.json through `tokenizers`

sol's own byte-level BPE (tiktoken) lives in gpt/tokenizer.py, which also holds
`load_tokenizer(directory)`, the one loader that picks the kind.
"""
