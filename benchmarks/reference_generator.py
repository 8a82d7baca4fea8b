"""A straightforward per-sample task generator, the peer that `bench_tasks.py` measures `so8lab.tasks` against.

It follows the design of the public reference implementation: one grid at a time in Python with numpy, one
`np.random.Generator` per call, random rectangles on background 0, a random program per sample (length 1–2 for
`train`, three distinct primitives for `heldout`), and each primitive applied to one grid with numpy
(`np.rot90`, `np.flip`, slicing for SHIFT, a `collections.deque` BFS for FILL_COMPONENT). Semantics are those of
SPEC §2, and the distribution matches `so8lab.tasks.sample_tasks` (compositions uniform over the split, the same
rectangle and parameter distributions, up to 4 draws to avoid identity samples), so both do the same work.

Written independently of so8lab on purpose (no import of it): `bench_tasks.py` cross-checks the two.
It is meant to be a fair, ordinary implementation, not a slow one: the BFS runs on Python lists rather than
numpy scalars, and nothing is recomputed needlessly.
"""
from collections import deque
from itertools import product

import numpy as np

GRID_SIZE = 8
PRIMITIVES = ("ROT90", "FLIP", "COLOR_SWAP", "DRAW_BORDER", "SHIFT", "FILL_COMPONENT")
ROT90, FLIP, COLOR_SWAP, DRAW_BORDER, SHIFT, FILL_COMPONENT = range(len(PRIMITIVES))
MAX_PROGRAM_LENGTH = 3
TRAIN_COMPOSITIONS = [(a,) for a in range(6)] + list(product(range(6), repeat=2))  # 6 singles + 36 ordered pairs
SHIFT_OFFSETS = [(dx, dy) for dy in range(-2, 3) for dx in range(-2, 3) if (dx, dy) != (0, 0)]


def base_grid(rng, num_colors=4, min_objects=3, max_objects=6, max_side=3):
    "Paint `min_objects..max_objects` random rectangles (sides 1..max_side) on background 0."
    grid = np.zeros((GRID_SIZE, GRID_SIZE), dtype=np.uint8)
    count = rng.integers(min_objects, max_objects + 1)
    offset = rng.integers(num_colors - 1)
    for j in range(count):
        h, w = rng.integers(1, max_side + 1, size=2)
        top, left = rng.integers(GRID_SIZE - h + 1), rng.integers(GRID_SIZE - w + 1)
        grid[top:top + h, left:left + w] = 1 + (offset + j) % (num_colors - 1)
    return grid


def sample_parameters(rng, primitive, num_colors=4):
    "Parameters (p1, p2) of one step, drawn uniformly from the primitive's domain."
    if primitive == ROT90: return int(rng.integers(1, 4)), 0
    if primitive == FLIP: return int(rng.integers(2)), 0
    if primitive == COLOR_SWAP:
        source, target = rng.choice(num_colors, size=2, replace=False)
        return int(min(source, target)), int(max(source, target))
    if primitive == DRAW_BORDER: return int(rng.integers(1, num_colors)), 0
    if primitive == SHIFT: return SHIFT_OFFSETS[rng.integers(len(SHIFT_OFFSETS))]
    source = int(rng.integers(1, num_colors))                       # FILL_COMPONENT: object colour -> other colour
    return source, (source + 1 + int(rng.integers(num_colors - 1))) % num_colors


def shift(grid, dx, dy):
    "Translate by (dx, dy) (+dx right, +dy down); content leaving is lost, vacated cells become 0."
    out = np.zeros_like(grid)
    n = GRID_SIZE
    out[max(dy, 0):n + min(dy, 0), max(dx, 0):n + min(dx, 0)] = grid[max(-dy, 0):n - max(dy, 0), max(-dx, 0):n - max(dx, 0)]
    return out


def fill_component(grid, source, fill):
    "Recolour the largest 4-connected `source` component (first in row-major order on ties) with `fill`."
    mask = (grid == source).tolist()
    seen = [[False] * GRID_SIZE for _ in range(GRID_SIZE)]
    best = []
    for y in range(GRID_SIZE):
        for x in range(GRID_SIZE):
            if not mask[y][x] or seen[y][x]: continue
            seen[y][x] = True
            queue, cells = deque([(y, x)]), []
            while queue:
                cy, cx = queue.popleft()
                cells.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < GRID_SIZE and 0 <= nx < GRID_SIZE and mask[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            if len(cells) > len(best): best = cells                    # strict: the earlier component wins ties
    out = grid.copy()
    if best:
        rows, cols = zip(*best)
        out[list(rows), list(cols)] = fill
    return out


def apply_step(grid, primitive, p1, p2):
    "Apply one primitive with parameters (p1, p2) to one [8, 8] grid."
    if primitive == ROT90: return np.rot90(grid, p1)              # counter-clockwise, like torch.rot90(dims=(0, 1))
    if primitive == FLIP: return np.flip(grid, axis=1 if p1 else 0)
    if primitive == COLOR_SWAP:
        out = grid.copy()
        out[grid == p1] = p2
        out[grid == p2] = p1
        return out
    if primitive == DRAW_BORDER:
        out = grid.copy()
        out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = p1
        return out
    if primitive == SHIFT: return shift(grid, p1, p2)
    if primitive == FILL_COMPONENT: return fill_component(grid, p1, p2)
    raise ValueError(f"unknown primitive id {primitive}")


def apply_program(grid, primitives, parameters):
    "Apply the steps of one encoded program (primitive id -1 = padding) to one grid."
    for primitive, (p1, p2) in zip(primitives, parameters):
        if primitive >= 0: grid = apply_step(grid, int(primitive), int(p1), int(p2))
    return np.ascontiguousarray(grid)


def sample_program(rng, split):
    "Primitive ids of one program: a uniform train composition, or three distinct primitives for heldout."
    if split == "train": return TRAIN_COMPOSITIONS[rng.integers(len(TRAIN_COMPOSITIONS))]
    if split == "heldout": return tuple(int(p) for p in rng.choice(len(PRIMITIVES), size=3, replace=False))
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def reference_sample_tasks(n, split="train", seed=0, num_colors=4, max_attempts=4):
    "Generate `n` samples one at a time: (inputs, outputs [n, 8, 8] uint8, primitive [n, 3], parameters [n, 3, 2], multi_hot [n, 6])."
    if n <= 0: raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    inputs = np.zeros((n, GRID_SIZE, GRID_SIZE), np.uint8)
    outputs = np.zeros_like(inputs)
    primitive = np.full((n, MAX_PROGRAM_LENGTH), -1, np.int64)
    parameters = np.zeros((n, MAX_PROGRAM_LENGTH, 2), np.int64)
    multi_hot = np.zeros((n, len(PRIMITIVES)), np.float32)
    for i in range(n):
        program = sample_program(rng, split)
        for _ in range(max_attempts):                              # redraw grid and parameters if nothing changes
            grid = base_grid(rng, num_colors)
            steps = [sample_parameters(rng, p, num_colors) for p in program]
            out = apply_program(grid, program, steps)
            if not np.array_equal(out, grid): break
        inputs[i], outputs[i] = grid, out
        primitive[i, :len(program)] = program
        parameters[i, :len(program)] = steps
        multi_hot[i, list(program)] = 1.0
    return inputs, outputs, primitive, parameters, multi_hot
