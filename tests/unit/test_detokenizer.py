from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from chatstream_asgi.engines.detokenizer import (
    REPLACEMENT_CHAR,
    DecoderSpec,
    IncrementalDetokenizer,
    ReplyText,
    StopMatcher,
)
from tests.tiny_model import CORPUS

MIXED = " Hello 東京は日本の首都です。 😀🎉 👍🏽 and 🇯🇵 done"


def stream_text(tokenizer: Any, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    return deltas, "".join(deltas) + detok.flush()


def byte_fallback_tokenizer() -> Any:
    """A Llama-style tokenizer: Metaspace, BPE with <0xNN> byte fallback, Strip decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer, base.pre_tokenizer = normalizer, pre
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    base.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(base.to_str())["model"]
    vocab = model["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_level(tiny_engine_parts: tuple[Any, Any]) -> Any:
    return tiny_engine_parts[1]


@pytest.fixture(scope="module")
def byte_fallback() -> Any:
    return byte_fallback_tokenizer()


@pytest.fixture(params=["byte_level", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def test_japanese_and_emoji_stream_equals_decode_without_replacement_chars(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    deltas, text = stream_text(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == MIXED
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "" in deltas  # some characters span several tokens and were held back


def test_random_ids_stream_equals_decode(tokenizer: Any) -> None:
    rng = random.Random(7)
    for _ in range(400):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 16))]
        assert stream_text(tokenizer, ids)[1] == tokenizer.decode(ids, skip_special_tokens=True), ids


def runs_text(tokenizer: Any, ids: list[int], cuts: list[int]) -> tuple[list[str], str]:
    """``push_many`` over ``ids`` cut at ``cuts`` (as an engine process's frames cut a stream)."""
    detok = IncrementalDetokenizer(tokenizer)
    bounds = [0, *sorted(cuts), len(ids)]
    deltas = [detok.push_many(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return deltas, "".join(deltas) + detok.flush()


def test_runs_of_ids_give_the_same_text_as_one_by_one(tokenizer: Any) -> None:
    rng = random.Random(11)
    texts = [MIXED, *CORPUS[:4]]
    for _ in range(300):
        if rng.random() < 0.5:
            ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        else:
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 24))]
        cuts = [rng.randrange(len(ids) + 1) for _ in range(rng.randrange(0, 6))]
        deltas, text = runs_text(tokenizer, ids, cuts)
        assert text == stream_text(tokenizer, ids)[1] == tokenizer.decode(ids, skip_special_tokens=True), (ids, cuts)
        if ids and ids[-1] not in tokenizer.all_special_ids and tokenizer.decode(ids) == MIXED:
            assert not any(REPLACEMENT_CHAR in d for d in deltas)  # a run that ends inside a character waits


def test_a_run_ending_inside_a_character_holds_it_back(byte_level: Any) -> None:
    ids = byte_level.encode("👍🏽", add_special_tokens=False)
    assert len(ids) > 2  # the emoji and its skin tone take several byte-level tokens
    detok = IncrementalDetokenizer(byte_level)
    assert detok.push_many(ids[:2]) == ""
    assert detok.push_many(ids[2:]) == "👍🏽"
    assert detok.push_many([]) == "" and detok.flush() == ""


def test_random_model_output_stream_equals_decode(tiny_engine_parts: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_engine_parts
    torch.manual_seed(3)
    prompt = torch.tensor([tokenizer.encode("東京 😀", add_special_tokens=False)])
    out = model.generate(prompt, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=80, min_new_tokens=80)
    for row in out[:, prompt.shape[1] :].tolist():
        assert stream_text(tokenizer, row)[1] == tokenizer.decode(row, skip_special_tokens=True)


def test_leading_space_of_first_token_is_kept_like_decode(byte_fallback: Any) -> None:
    ids = byte_fallback.encode("  two leading spaces", add_special_tokens=False)
    assert stream_text(byte_fallback, ids)[1] == byte_fallback.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(byte_level: Any) -> None:
    ids = [*byte_level.encode("hi", add_special_tokens=False), byte_level.eos_token_id]
    ids += byte_level.encode(" there", add_special_tokens=False)
    assert stream_text(byte_level, ids)[1] == "hi there"


def test_incomplete_utf8_at_the_end_is_flushed_like_decode(byte_level: Any) -> None:
    ids = byte_level.encode("ok🚀", add_special_tokens=False)
    truncated = byte_level.decode(ids[:-1])
    assert truncated.endswith(REPLACEMENT_CHAR)  # the rocket's bytes span the last two tokens
    detok = IncrementalDetokenizer(byte_level)
    text = "".join(detok.push(i) for i in ids[:-1])
    assert text == "ok"
    assert text + detok.flush() == truncated


def test_decode_window_stays_small(byte_level: Any) -> None:
    spec = DecoderSpec(byte_level)
    windows: list[int] = []
    decode = spec.decode
    spec.decode = lambda ids: (windows.append(len(ids)), decode(ids))[1]
    ids = byte_level.encode(MIXED * 20, add_special_tokens=False)
    stream_text(spec, ids)
    assert len(ids) > 300
    assert max(windows) <= 8  # O(1) per token: never re-decodes the reply


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello wor", "ld STOP", " more"], ["STOP"], "Hello world ", True),
        (["ab", "ab", "c!"], ["abc"], "ab", True),
        (["S", "T", "O", "P"], ["STOP"], "", True),
        (["x ST", "ART y"], ["STOP"], "x START y", False),
        (["one END two"], ["two", "END"], "one ", True),
        (["no stop here, just S"], ["STOP"], "no stop here, just S", False),
        (["plain"], [], "plain", False),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == (emitted, stopped)


def test_stop_matcher_holds_back_a_possible_stop_start() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("result </ans") == "result "
    assert matcher.feed("wer> tail") == ""
    assert matcher.stopped


def test_reply_text_cuts_before_stop_spanning_tokens(byte_level: Any) -> None:
    ids = byte_level.encode("東京は日本の首都です。今日は", add_special_tokens=False)
    reply = ReplyText(DecoderSpec(byte_level), ["首都"])
    out = ""
    for token in ids:
        out += reply.push(token)
        if reply.stopped:
            break
    assert out == "東京は日本の"
