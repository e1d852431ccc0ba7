"""Contender 3 of ``serving.py``: the original ChatStream 0.3.0 on uvicorn, as its README sets it up.

Runs with the Python of ``benchmarks/.venv-chatstream``, which ``serving.py`` makes when missing. Two settings
make it generate exactly ``--max-new-tokens`` tokens, as ``ignore_eos`` does for our contenders;
both go through the original's own configuration, no code of it is patched:

- ``stop_ids = []`` in its generation params: ``chat_core.process_chat`` stops on a token only
  when it is in ``params["stop_ids"]`` (default ``[tokenizer.eos_token_id]``);
- a chat prompt class with no stop strings (the presets stop on strings such as ``<human>:``);
  without stop strings ``process_chat`` also skips its TokFlow buffering.

Its queue holds ``max_queue_size - 1`` requests (ORIGINAL-FAULTS.md), so the driver passes a queue
large enough that a closed loop of N clients is never turned away.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uvicorn  # noqa: E402
from _bench_common import HELLO_PATH, INFO_PATH, SEED, load_model, runtime_info  # noqa: E402
from chatstream import AbstractChatPrompt, ChatStream  # noqa: E402
from fastapi import FastAPI  # noqa: E402


class SmolLM2ChatPrompt(AbstractChatPrompt):
    """SmolLM2's own chat template (ChatML), rendered by the tokenizer as for the other contenders; no stop strings.

    ChatStream asks for one ``chat_prompt_clazz`` per model family; its presets are for 2023 models, and
    the README's RedPajama format (``<human>: ...\\n<bot>:``) makes SmolLM2 babble, so this is the class a
    user of the original would write for this model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("user")
        self.set_responder("assistant")
        self.tokenizer: Any = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        super().set_tokenizer(tokenizer)
        self.tokenizer = tokenizer

    def get_stop_strs(self) -> None:
        return None

    def build_initial_prompt(self, chat_prompt: Any) -> None:
        pass

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        contents = self.get_contents(opts or {})
        messages = [{"role": c.get_role(), "content": c.get_message()} for c in contents if c.get_message()]
        open_turn = bool(contents) and not contents[-1].get_message()
        text: str = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        return text


def build_app(args: argparse.Namespace) -> FastAPI:
    model, tokenizer = load_model()
    chat_stream = ChatStream(
        num_of_concurrent_executions=args.concurrency,
        max_queue_size=args.max_queue_size,
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        chat_prompt_clazz=SmolLM2ChatPrompt,
        max_new_tokens=args.max_new_tokens,
        context_len=2048,
        temperature=0.0,  # below 1e-4 its sampler takes the argmax: greedy, as for the other contenders
        too_many_request_as_http_error=True,
        seed=SEED,
    )
    chat_stream.params["stop_ids"] = []  # never stop on EOS: fixed-length replies
    info = {**runtime_info(), "contender": "chatstream==0.3.0", "concurrency": args.concurrency}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await chat_stream.start_queue_worker()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get(HELLO_PATH)
    async def hello() -> dict[str, str]:
        return {"hello": "from the wrapped app"}

    @app.get(INFO_PATH)
    async def bench_info() -> dict[str, object]:
        return info

    chat_stream.append_apis(app, {"all": True})
    chat_stream.append_middlewares(app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--max-queue-size", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
