"""2D rigid-body physics of the synthetic world: balls and axis-aligned squares under gravity.

Coordinates are pixels with the origin at the top-left corner of the frame and y pointing down; pixel (row i,
column j) covers [j, j+1) x [i, i+1). Bodies bounce off the four walls and off each other (no rotation, no
friction), with a restitution coefficient. Collisions are resolved exactly enough that bodies never overlap by
more than a small fraction of a pixel, so every body stays fully visible in the rendered frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("ball", "square")


@dataclass
class Body:
    shape: str           # "ball" or "square"
    size: float          # ball: radius; square: half the side length (pixels)
    pos: np.ndarray      # centre (x, y), float64
    vel: np.ndarray      # velocity (x, y) in pixels per second

    @property
    def mass(self) -> float:
        return np.pi * self.size ** 2 if self.shape == "ball" else 4.0 * self.size ** 2


@dataclass(frozen=True)
class Event:
    frame: int                 # first frame at which the event is visible
    kind: str                  # floor | ceiling | wall_left | wall_right | collision
    objects: tuple[int, ...]   # body indices (two for a collision)
    speed: float               # impact speed along the contact normal, pixels per second


@dataclass
class PhysicsParams:
    width: float
    height: float
    gravity: float             # pixels / s^2, downwards
    restitution: float         # fraction of normal speed kept at every bounce
    event_speed: float         # impacts slower than this (pixels / s) are resting contact, not events
    substeps: int = 16


@dataclass
class _State:
    touching: set = field(default_factory=set)   # pairs in contact in the previous substep


def overlap(a: Body, b: Body) -> tuple[np.ndarray, float] | None:
    """Contact normal (unit, from a towards b) and penetration depth, or None when a and b are apart."""
    if a.shape == "square" and b.shape == "ball":
        hit = overlap(b, a)
        return None if hit is None else (-hit[0], hit[1])
    d = b.pos - a.pos
    if a.shape == "ball" and b.shape == "ball":
        dist = float(np.hypot(*d))
        depth = a.size + b.size - dist
        if depth <= 0:
            return None
        return (d / dist if dist > 1e-9 else np.array([0.0, 1.0])), depth
    if a.shape == "ball" and b.shape == "square":
        closest = np.clip(a.pos, b.pos - b.size, b.pos + b.size)
        gap = a.pos - closest
        dist = float(np.hypot(*gap))
        if dist > 1e-9:
            depth = a.size - dist
            return (-gap / dist, depth) if depth > 0 else None
    # square-square, or a ball whose centre is inside a square: axis-aligned boxes, least-penetration axis.
    ox = a.size + b.size - abs(d[0])
    oy = a.size + b.size - abs(d[1])
    if ox <= 0 or oy <= 0:
        return None
    if ox < oy:
        return np.array([1.0 if d[0] >= 0 else -1.0, 0.0]), ox
    return np.array([0.0, 1.0 if d[1] >= 0 else -1.0]), oy


def _walls(bodies: list[Body], p: PhysicsParams, frame: int, events: list[Event]) -> None:
    for i, b in enumerate(bodies):
        for axis, low_kind, high_kind, limit in ((0, "wall_left", "wall_right", p.width),
                                                  (1, "ceiling", "floor", p.height)):
            lo, hi = b.size, limit - b.size
            if b.pos[axis] < lo:
                b.pos[axis] = lo
                if b.vel[axis] < 0:
                    _bounce(b, axis, -b.vel[axis], low_kind, i, p, frame, events)
            elif b.pos[axis] > hi:
                b.pos[axis] = hi
                if b.vel[axis] > 0:
                    _bounce(b, axis, b.vel[axis], high_kind, i, p, frame, events)


def _bounce(b: Body, axis: int, speed: float, kind: str, i: int, p: PhysicsParams, frame: int,
            events: list[Event]) -> None:
    if speed > p.event_speed:
        events.append(Event(frame, kind, (i,), float(speed)))
        b.vel[axis] = -b.vel[axis] * p.restitution
    else:
        b.vel[axis] = 0.0   # resting contact: no micro-bounces


def _collide(bodies: list[Body], p: PhysicsParams, frame: int, events: list[Event], st: _State) -> set:
    """Resolve every overlapping pair; return the pairs found in contact."""
    now = set()
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            a, b = bodies[i], bodies[j]
            hit = overlap(a, b)
            if hit is None:
                continue
            normal, depth = hit
            now.add((i, j))
            inv_a, inv_b = 1.0 / a.mass, 1.0 / b.mass
            share = depth / (inv_a + inv_b)
            a.pos -= normal * share * inv_a
            b.pos += normal * share * inv_b
            approach = -float(np.dot(b.vel - a.vel, normal))
            if approach > 0:
                impulse = (1.0 + p.restitution) * approach / (inv_a + inv_b)
                a.vel -= normal * impulse * inv_a
                b.vel += normal * impulse * inv_b
                if approach > p.event_speed and (i, j) not in st.touching:
                    events.append(Event(frame, "collision", (i, j), approach))
    return now


def simulate(bodies: list[Body], p: PhysicsParams, num_frames: int, fps: float) -> tuple[np.ndarray, list[Event]]:
    """Advance the bodies in place; return centres [num_frames, n, 2] (frame 0 = initial state) and events."""
    centres = np.zeros((num_frames, len(bodies), 2))
    events: list[Event] = []
    st = _State()
    dt = 1.0 / (fps * p.substeps)
    for frame in range(num_frames):
        if frame > 0:
            for _ in range(p.substeps):
                for b in bodies:
                    b.vel[1] += p.gravity * dt
                    b.pos += b.vel * dt
                contacts = set()
                for _ in range(3):   # a few passes settle stacks and bodies pressed against walls
                    _walls(bodies, p, frame, events)
                    contacts |= _collide(bodies, p, frame, events, st)
                _walls(bodies, p, frame, events)
                st.touching = contacts   # a pair still in contact makes no new collision event
        centres[frame] = [b.pos for b in bodies]
    return centres, events
