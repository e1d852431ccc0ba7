"""Deterministic user messages for ``multiturn.py``: plain English sentences drawn from a seed.

Each (user, turn) gets its own text, so no two chats share tokens beyond the chat template, and the
cold probe draws from another stream of the same generator, so nothing it sends was sent before.
"""

from __future__ import annotations

import random

SUBJECTS = (
    "the old bridge, a quiet farmer, our new library, the river valley, a small bakery, the city council, "
    "an early train, the mountain road, a curious student, the harbor crane, a wooden boat, the north wind, "
    "a patient doctor, the village school, an orange lantern, the night market, a busy kitchen, the museum"
).split(", ")
VERBS = (
    "watches, repairs, follows, describes, remembers, carries, measures, paints, visits, builds, explains, "
    "collects, protects, questions, counts, crosses, cleans, shares"
).split(", ")
OBJECTS = (
    "the broken fence, a list of names, the winter harvest, several letters, the last ferry, a green map, "
    "the stone tower, a basket of apples, the evening news, three tired horses, the copper kettle, "
    "a row of lamps, the spring festival, an unfinished song, the garden wall, a box of tools"
).split(", ")
ENDINGS = (
    "before the sun rises, after the long rain, near the railway station, during the busy season, "
    "while the children sleep, on the first day of autumn, without asking for help, with great care, "
    "under a grey sky, beside the narrow canal, for the whole week, as the bells ring"
).split(", ")
ASK = "Please summarize these notes in two sentences."


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."


def paragraph(rng: random.Random, words: int, label: str) -> str:
    """About ``words`` words: a label that makes the text's first tokens unique, sentences, then a request."""
    parts = [f"Notes {label}:"]
    count = 2 + len(ASK.split())
    while count < words:
        parts.append(sentence(rng))
        count += len(parts[-1].split())
    return " ".join([*parts, ASK])


def user_message(seed: int, user: int, turn: int, words: int) -> str:
    """The message user ``user`` sends at turn ``turn`` (both from 1)."""
    return paragraph(random.Random(f"{seed}/user{user}/turn{turn}"), words, f"{user}.{turn}")


def fresh_message(seed: int, index: int, words: int) -> str:
    """Text for the cold probe: never sent by a user, so the server has none of it cached."""
    return paragraph(random.Random(f"{seed}/cold{index}"), words, f"cold-{index}")
