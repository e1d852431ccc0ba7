"""A tiny random Llama with an offline-trained byte-level BPE tokenizer, for tests.

Nothing is downloaded: the tokenizer is trained on the small corpus below (English, Japanese and
emoji, so multi-byte characters get split across tokens) and the model weights are random but
seeded, so every run builds the same model.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 600
PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Streaming replies token by token keeps the user interface responsive.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Large language models predict the next token from the previous ones.",
    "東京は日本の首都です。今日はいい天気ですね。",
    "こんにちは、世界！ありがとうございます。",
    "猫が好きです。犬も好きです。寿司を食べましょう。",
    "Emoji test: 😀 🎉 🚀 👍🏽 ❤️ 🇯🇵 and text mixed 日本語 with English.",
    "Numbers 0123456789, punctuation !?.,;:'\"()[]{} and symbols @#$%^&*.",
]


def train_tokenizer() -> object:
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(path: str | Path) -> Path:
    """Write a tiny random Llama and its tokenizer to ``path``; return ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Larger than the default 0.02 so logits are far apart: greedy choices are then robust to
        # the last-bit differences between batched and solo matmuls.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path
