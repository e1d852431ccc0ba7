"""The fast-model regime on a CPU: a model whose decode step costs about what a small model's step costs on a GPU.

A random Llama with 1 layer (hidden 64, intermediate 128) and a 512-token byte-level BPE vocabulary
trained offline on a few sentences. Its EOS is ``<|im_end|>``, which the random weights may emit at any
step; the benchmark asks ``ignore_eos`` of the engine (and ``min_new_tokens`` of ``generate``), so every
reply is exactly ``max_new_tokens`` long whatever the model says. At batch 32 a decode step takes about
a millisecond on a quiet 2-core machine, so the serving path, not the model, sets the pace: the regime
a GPU puts every server in. Built into a folder through ``save_pretrained`` and loaded back through
``from_pretrained`` like any model; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Streaming replies token by token keeps the user interface responsive under load.",
    "Large language models predict the next token from the previous ones, one step at a time.",
    "A server that batches requests shares each forward pass between many conversations.",
    "Numbers 0123456789 and punctuation !?.,;:'\"()[] appear in ordinary text too.",
]
PROMPTS = [
    "Tell me about the quick brown fox.",
    "How do language models predict the next token?",
    "Why does batching help a server under load?",
    "Write something about streaming replies.",
]


def build_fast_model(path: str | Path, *, layers: int = 1, seed: int = 1234) -> Path:
    """Write the fast random Llama and its tokenizer to ``path`` (idempotent); return ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_fast_model(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 on the CPU, through ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(path)
