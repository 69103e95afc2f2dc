"""Captions of synthetic-world clips, written from the simulated events ("a red ball falls and bounces twice")."""
from __future__ import annotations

from collections import Counter

from .world_physics import Event

_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_TIMES = {1: "once", 2: "twice"}


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def times(k: int) -> str:
    return _TIMES.get(k, f"{_NUMBER.get(k, k)} times")


def _plural(shape: str, k: int) -> str:
    word = "ball" if shape == "ball" else "square"
    return word if k == 1 else word + "s"


def scene_phrase(shapes: list[str]) -> str:
    """'a ball', 'two squares', 'two balls and a square'."""
    counts = Counter(shapes)
    parts = [("a" if k == 1 else _NUMBER.get(k, str(k))) + " " + _plural(s, k)
             for s in ("ball", "square") for k in [counts.get(s, 0)] if k]
    return " and ".join(parts)


def _motion(vx: float, vy: float, slow: float, on_floor: bool) -> str:
    if abs(vx) < slow and abs(vy) < slow:
        return "lies on the floor" if on_floor else "falls"
    if vy < -abs(vx):
        return "is thrown upwards"
    if abs(vx) >= abs(vy):
        return "moves to the " + ("right" if vx > 0 else "left")
    return "drops"


def visible_events(events: list[Event], min_speed: float, min_gap_frames: int) -> list[Event]:
    """Events a viewer would count: fast enough to see, and not part of the rapid chatter of a stack settling
    (a repeat of the same kind for the same objects within min_gap_frames is merged into the first)."""
    last: dict = {}
    kept = []
    for e in events:
        if e.speed < min_speed:
            continue
        key = (e.kind, e.objects)
        if key in last and e.frame - last[key] < min_gap_frames:
            continue
        last[key] = e.frame
        kept.append(e)
    return kept


def caption(names: list[str], shapes: list[str], initial_vel: list[tuple[float, float]], events: list[Event],
            resting: list[bool], background: str, slow_speed: float, start_on_floor: list[bool]) -> str:
    """One sentence per object plus the collisions, e.g.
    'a red ball and a blue square on a navy background. the red ball falls and bounces twice. ...'.
    events: those worth mentioning (see visible_events)."""
    n = len(names)
    floor = Counter(e.objects[0] for e in events if e.kind == "floor")
    walls = {i: [e.kind for e in events if e.kind in ("wall_left", "wall_right", "ceiling") and e.objects[0] == i]
             for i in range(n)}
    pairs = Counter(e.objects for e in events if e.kind == "collision")

    if n == 1:
        subject = [with_article(names[0])]
    else:
        subject = [f"the {name}" for name in names]
    sentences = []
    if n > 1:
        listing = ", ".join(with_article(x) for x in names[:-1]) + " and " + with_article(names[-1])
        sentences.append(f"{scene_phrase(shapes)} on {with_article(background)} background: {listing}")
    for i in range(n):
        verbs = [_motion(*initial_vel[i], slow_speed, start_on_floor[i])]
        hit = list(dict.fromkeys(walls[i]))   # each wall once, in the order first hit
        verbs += [{"wall_left": "hits the left wall", "wall_right": "hits the right wall",
                   "ceiling": "hits the ceiling"}[k] for k in hit]
        if floor[i]:
            verbs.append(f"bounces {times(floor[i])}")
        if resting[i] and floor[i]:
            verbs.append("comes to rest")
        text = ", ".join(verbs[:-1]) + (" and " if len(verbs) > 1 else "") + verbs[-1]
        sentences.append(f"{subject[i]} {text}")
    if n == 1:
        sentences[0] += f" on {with_article(background)} background"
    for (i, j), k in sorted(pairs.items()):
        if shapes[i] == shapes[j] and n == 2:
            head = f"the two {_plural(shapes[i], 2)} collide"
        else:
            head = f"the {names[i]} and the {names[j]} collide"
        sentences.append(head + ("" if k == 1 else " " + times(k)))
    return ". ".join(sentences) + "."
