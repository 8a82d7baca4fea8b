"""Brute-force, per-cell pure-Python reference of the six grid primitives of SPEC §2.

Written from the semantics table of SPEC §2 only (not from `so8lab.primitives`): every output cell is computed by
naming its source cell explicitly, on nested lists, with no tensor ops. Grids are square lists of lists of ints;
the functions accept any side length n (the library is fixed to n = 8) so that the formulas can be checked on
hand-worked 3x3 examples (see `tests/test_primitives.py::test_reference_formulas_on_hand_worked_3x3`).

Source-cell formulas (n = side length, row r counted from the top, column c from the left):

* ROT90 k=1 (one counter-clockwise quarter turn): out[r][c] = in[c][n-1-r]
* ROT90 k=2 (half turn):                          out[r][c] = in[n-1-r][n-1-c]
* ROT90 k=3 (three ccw turns = one clockwise):    out[r][c] = in[n-1-c][r]
* FLIP horizontal=True (reverse columns):         out[r][c] = in[r][n-1-c]
* FLIP horizontal=False (reverse rows):           out[r][c] = in[n-1-r][c]
* SHIFT (dx, dy): out[r][c] = in[r-dy][c-dx] if that cell is inside the grid, else 0 (vacated)
* COLOR_SWAP, DRAW_BORDER: per-cell recolouring
* FILL_COMPONENT: explicit BFS over all 4-connected components of the source colour; the largest wins, ties go
  to the component whose first cell in row-major order comes first; an absent colour leaves the grid unchanged.
"""
from collections import deque

# Primitive order and per-primitive parameter order as listed in SPEC §2's table; an encoded step is
# (primitive index, p1, p2) with p2 = 0 for one-parameter primitives and FLIP's bool stored as 0/1.
NAMES = ("ROT90", "FLIP", "COLOR_SWAP", "DRAW_BORDER", "SHIFT", "FILL_COMPONENT")
PARAMETERS = {"ROT90": ("k",), "FLIP": ("horizontal",), "COLOR_SWAP": ("source", "target"),
              "DRAW_BORDER": ("color",), "SHIFT": ("dx", "dy"), "FILL_COMPONENT": ("source_color", "fill_color")}


def to_lists(grid):
    "A torch tensor / numpy array [n, n] (or nested lists) as a fresh list of lists of Python ints."
    rows = grid.tolist() if hasattr(grid, "tolist") else grid
    return [[int(v) for v in row] for row in rows]


def _side(grid):
    n = len(grid)
    assert all(len(row) == n for row in grid), "reference grids must be square"
    return n


def rot90(grid, k):
    "k counter-clockwise quarter turns, one output cell at a time."
    n = _side(grid)
    if k == 1: return [[grid[c][n - 1 - r] for c in range(n)] for r in range(n)]
    if k == 2: return [[grid[n - 1 - r][n - 1 - c] for c in range(n)] for r in range(n)]
    if k == 3: return [[grid[n - 1 - c][r] for c in range(n)] for r in range(n)]
    raise ValueError(f"k must be 1, 2 or 3, got {k!r}")


def flip(grid, horizontal):
    "horizontal: reverse the columns (left<->right); otherwise reverse the rows (top<->bottom)."
    n = _side(grid)
    if horizontal: return [[grid[r][n - 1 - c] for c in range(n)] for r in range(n)]
    return [[grid[n - 1 - r][c] for c in range(n)] for r in range(n)]


def color_swap(grid, source, target):
    "Exchange the two colours cell by cell."
    def swap(v): return target if v == source else source if v == target else v
    return [[swap(v) for v in row] for row in grid]


def draw_border(grid, color):
    "Set row 0, row n-1, column 0 and column n-1 to `color`."
    n = _side(grid)
    return [[color if r in (0, n - 1) or c in (0, n - 1) else grid[r][c] for c in range(n)] for r in range(n)]


def shift(grid, dx, dy):
    "+dx moves content right, +dy moves it down; content leaving is lost, vacated cells become 0."
    n = _side(grid)
    out = [[0] * n for _ in range(n)]
    for r in range(n):
        for c in range(n):
            source_row, source_col = r - dy, c - dx
            if 0 <= source_row < n and 0 <= source_col < n: out[r][c] = grid[source_row][source_col]
    return out


def components(grid, color):
    "All 4-connected components of `color`, each a list of (row, col), found by BFS in row-major order of their first cell."
    n = _side(grid)
    seen, found = set(), []
    for r in range(n):
        for c in range(n):
            if grid[r][c] != color or (r, c) in seen: continue
            queue, cells = deque([(r, c)]), []
            seen.add((r, c))
            while queue:
                y, x = queue.popleft()
                cells.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < n and 0 <= nx < n and (ny, nx) not in seen and grid[ny][nx] == color:
                        seen.add((ny, nx)); queue.append((ny, nx))
            found.append(cells)   # discovered from its first cell in row-major order
    return found


def fill_component(grid, source_color, fill_color):
    "Recolour the largest 4-connected `source_color` component (ties: first in row-major order) with `fill_color`."
    out = [list(row) for row in grid]
    found = components(grid, source_color)
    if not found: return out
    best = found[0]
    for cells in found[1:]:          # strictly larger only: on a tie the earlier (row-major first) one stays
        if len(cells) > len(best): best = cells
    for r, c in best: out[r][c] = fill_color
    return out


def apply(grid, name, **params):
    "Apply the named primitive with its keyword parameters (the public parameter names of SPEC §2)."
    grid = to_lists(grid)
    if name == "ROT90": return rot90(grid, params["k"])
    if name == "FLIP": return flip(grid, params["horizontal"])
    if name == "COLOR_SWAP": return color_swap(grid, params["source"], params["target"])
    if name == "DRAW_BORDER": return draw_border(grid, params["color"])
    if name == "SHIFT": return shift(grid, params["dx"], params["dy"])
    if name == "FILL_COMPONENT": return fill_component(grid, params["source_color"], params["fill_color"])
    raise ValueError(f"unknown primitive {name!r}")


def decode_step(primitive, p1, p2):
    "(name, params) of an encoded step (primitive index, p1, p2); None for padding (index < 0)."
    if primitive < 0: return None
    name = NAMES[primitive]
    values = (bool(p1),) if name == "FLIP" else (p1, p2)
    return name, dict(zip(PARAMETERS[name], values))


def apply_program(grid, steps):
    "Apply (name, params) steps (or objects with .name/.params) left to right."
    grid = to_lists(grid)
    for step in steps:
        name, params = (step.name, step.params) if hasattr(step, "name") else step
        grid = apply(grid, name, **params)
    return grid


def apply_encoded(grid, primitive, parameters):
    "Apply an encoded program: primitive ids [L] (-1 = padding) and parameters [L][2]."
    steps = [decode_step(int(p), int(a), int(b)) for p, (a, b) in zip(to_flat(primitive), to_lists(parameters))]
    return apply_program(grid, [s for s in steps if s is not None])


def to_flat(values):
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def valid_parameters(name, params, num_colors):
    "True when `params` lie in the domain SPEC §2 gives for primitive `name`."
    if set(params) != set(PARAMETERS[name]): return False
    colours = range(num_colors)
    if name == "ROT90": return params["k"] in (1, 2, 3)
    if name == "FLIP": return isinstance(params["horizontal"], bool)
    if name == "COLOR_SWAP": return params["source"] in colours and params["target"] in colours and params["source"] != params["target"]
    if name == "DRAW_BORDER": return params["color"] in colours
    if name == "SHIFT": return -2 <= params["dx"] <= 2 and -2 <= params["dy"] <= 2 and (params["dx"], params["dy"]) != (0, 0)
    if name == "FILL_COMPONENT":
        return (params["source_color"] in colours and params["fill_color"] in colours
                and params["source_color"] != params["fill_color"])
    return False


def hsic_unbiased_textbook(K, L):
    "Unbiased HSIC_1 (Song et al. 2012, eq. 5) with explicit matrices (numpy float64)."
    import numpy as np
    n, one = len(K), np.ones(len(K))
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))
