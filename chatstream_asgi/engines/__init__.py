"""Engines: what turns chat messages into a stream of text, off the event loop.

``base.py`` (the ``Engine`` protocol), ``transformers.py`` (the batching engine and its private ``_*`` modules:
scheduler, cache, sampling, prefix cache), ``detokenizer.py``, ``prompts.py`` (chat templating and truncation),
``process.py`` (the engine in its own process), ``replicas.py``, ``mock.py``, ``openai_upstream.py`` (its
failures in ``_upstream_errors.py``), ``host.py`` (the host's free memory), ``gc_heap.py`` (the startup heap
frozen out of the garbage collector's reach), ``fair_wakes.py`` (chat tasks start a few per loop
iteration, so the host app's requests get in between), ``torch_threads.py`` (the model's CPU threads:
every core but one, set in the model's own thread).

May import ``errors`` only: engines know nothing of HTTP, sessions, OpenAI routes, operations or compat.
Nothing here imports torch at package import; ``transformers.py`` and its helpers do when first used.
"""
