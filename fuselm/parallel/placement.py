"""Balanced expert placement (MoETuner-style): which rank holds which expert, from recorded routing.

Under expert parallelism every MoE layer ends in one all-reduce, so a layer takes as long as its
most loaded rank: a step's expert time is the sum over MoE layers of the largest rank load, where a
rank's load is the token assignments its experts received (fuselm/runner/expert_stats.py). Round-
robin placement (expert e on rank e mod N, the engine's default) ignores that some experts are hot.

`solve_placement` finds, with scipy's MILP solver (HiGHS), an assignment of each layer's experts to N
ranks, E / N experts each (equal memory), that

1. minimises each layer's most loaded rank (a small MILP per layer: binary x[e, r], a bound M on
   every rank's load, minimise M; expert 0 pinned to rank 0, the ranks being interchangeable); then
2. among those, keeps as many consecutive-layer token pairs on one rank as it can (a joint MILP over
   all layers, every layer's load capped at its step-1 optimum: y[a, b, r] <= x_l[a, r], x_{l+1}[b, r],
   maximise the co-occurrence counts of the pairs that share a rank). That traffic is what an
   all-to-all dispatch would move between ranks; fuselm's all-reduce form does not move it, so it
   only breaks ties. The heaviest pairs are kept when there are too many for the solver
   (`max_pair_variables`); a time limit that leaves no better solution keeps step 1's.

A layer whose solution is not better than round-robin (a time limit hit) keeps round-robin, so the
result is never worse. `fuselm placement --stats stats.json --ranks N --out placement.json` runs it
and prints the max/mean rank load before and after; the engine reads the file (`expert_placement`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from fuselm.parallel.expert_parallel import ExpertPlacement


def round_robin(num_experts: int, ranks: int) -> list[int]:
    return [e % ranks for e in range(num_experts)]


def rank_loads(load, owners, ranks: int) -> np.ndarray:
    """The load of each rank: the sum of its experts' loads. [ranks]"""
    return np.bincount(np.asarray(owners), weights=np.asarray(load, dtype=float), minlength=ranks)


def step_cost(loads, placement: list[list[int]], ranks: int) -> float:
    """Sum over layers of the most loaded rank's load: the straggler's time, in token assignments."""
    return float(sum(rank_loads(load, owners, ranks).max() for load, owners in zip(loads, placement)))


def max_over_mean(loads, placement: list[list[int]], ranks: int) -> float:
    """The step's straggler time over a perfectly even one (1.0 = balanced)."""
    total = float(np.sum(loads))
    return step_cost(loads, placement, ranks) * ranks / total if total else 1.0


def cross_rank_pairs(co_occurrence, placement: list[list[int]]) -> float:
    """Consecutive-layer (slot, slot) pairs of a token whose experts sit on different ranks."""
    moved = 0.0
    for p, co in enumerate(co_occurrence):
        before, after = np.asarray(placement[p]), np.asarray(placement[p + 1])
        moved += float(np.asarray(co, dtype=float)[before[:, None] != after[None, :]].sum())
    return moved


class _Rows:
    """The constraint rows of a MILP, built one row at a time: lo <= sum(val * x[col]) <= hi."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, float]] = []  # (row, column, value)
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, entries, lo: float, hi: float) -> None:
        index = len(self.lower)
        self.entries.extend((index, col, val) for col, val in entries)
        self.lower.append(lo)
        self.upper.append(hi)


def _milp(cost, integrality, rows: _Rows, bounds, time_limit: float):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    lower, upper = rows.lower, rows.upper
    r, c, v = (np.asarray(a) for a in zip(*rows.entries)) if rows.entries else ([], [], [])
    matrix = coo_matrix((v, (r, c)), shape=(len(lower), len(cost))).tocsr()
    result = milp(cost, integrality=integrality, bounds=Bounds(*bounds),
                  constraints=LinearConstraint(matrix, lower, upper), options={"time_limit": time_limit})
    return None if result.x is None else result.x


def solve_layer(load, ranks: int, time_limit: float = 10.0) -> list[int]:
    """One layer's experts on `ranks` ranks, E / ranks each, minimising the most loaded rank."""
    load = np.asarray(load, dtype=float)
    experts = len(load)
    share = experts // ranks
    n = experts * ranks + 1  # x[e, r] at e * ranks + r, then M
    rows = _Rows()
    row = rows.add

    for e in range(experts):
        row([(e * ranks + r, 1.0) for r in range(ranks)], 1, 1)
    for r in range(ranks):
        row([(e * ranks + r, 1.0) for e in range(experts)], share, share)
        row([(e * ranks + r, load[e]) for e in range(experts)] + [(n - 1, -1.0)], -np.inf, 0)
    cost = np.zeros(n)
    cost[-1] = 1.0
    low, high = np.zeros(n), np.ones(n)
    high[-1] = np.inf
    low[0] = 1.0  # expert 0 on rank 0: the ranks are interchangeable
    integrality = np.ones(n)
    integrality[-1] = 0
    x = _milp(cost, integrality, rows, (low, high), time_limit)
    if x is None:
        return round_robin(experts, ranks)
    owners = [int(np.argmax(x[e * ranks:(e + 1) * ranks])) for e in range(experts)]
    baseline = round_robin(experts, ranks)
    if not _fits(owners, ranks, share) or rank_loads(load, owners, ranks).max() > rank_loads(load, baseline, ranks).max():
        return baseline
    return owners


def _fits(owners: list[int], ranks: int, share: int) -> bool:
    return all(owners.count(r) == share for r in range(ranks))


def solve_traffic(loads, co_occurrence, first: list[list[int]], ranks: int, time_limit: float = 60.0,
                  max_pair_variables: int = 200_000) -> list[list[int]]:
    """Step 2: the placement with each layer's most loaded rank no worse than in `first`, keeping the
    most consecutive-layer pairs on one rank; `first` when the solver finds nothing better in time."""
    loads = np.asarray(loads, dtype=float)
    layers, experts = loads.shape
    share = experts // ranks
    caps = [rank_loads(load, owners, ranks).max() for load, owners in zip(loads, first)]
    pairs = [(p, a, b, float(c)) for p, co in enumerate(co_occurrence) for (a, b), c in np.ndenumerate(np.asarray(co))
             if c > 0]
    pairs.sort(key=lambda t: -t[3])
    pairs = pairs[:max_pair_variables // ranks]  # the heaviest, when there are too many
    if not pairs:
        return first
    nx = layers * experts * ranks
    x = lambda layer, e, r: (layer * experts + e) * ranks + r  # noqa: E731
    n = nx + len(pairs) * ranks
    rows = _Rows()
    row = rows.add

    for layer in range(layers):
        for e in range(experts):
            row([(x(layer, e, r), 1.0) for r in range(ranks)], 1, 1)
        for r in range(ranks):
            row([(x(layer, e, r), 1.0) for e in range(experts)], share, share)
            row([(x(layer, e, r), loads[layer, e]) for e in range(experts)], -np.inf, caps[layer] * (1 + 1e-9) + 1e-9)
    cost = np.zeros(n)
    for i, (p, a, b, count) in enumerate(pairs):
        for r in range(ranks):
            y = nx + i * ranks + r
            cost[y] = -count
            row([(y, 1.0), (x(p, a, r), -1.0)], -np.inf, 0)
            row([(y, 1.0), (x(p + 1, b, r), -1.0)], -np.inf, 0)
    low, high = np.zeros(n), np.ones(n)
    low[x(0, 0, 0)] = 1.0  # relabelling every layer's ranks alike changes nothing
    solution = _milp(cost, np.ones(n), rows, (low, high), time_limit)
    if solution is None:
        return first
    placement = [[int(np.argmax(solution[x(layer, e, 0):x(layer, e, 0) + ranks])) for e in range(experts)]
                 for layer in range(layers)]
    ok = all(_fits(owners, ranks, share) and rank_loads(load, owners, ranks).max() <= cap
             for load, owners, cap in zip(loads, placement, caps))
    if not ok or cross_rank_pairs(co_occurrence, placement) > cross_rank_pairs(co_occurrence, first):
        return first
    return placement


@dataclass
class PlacementReport:
    placement: ExpertPlacement
    before: float  # max/mean, round-robin
    after: float
    traffic_before: float  # cross-rank consecutive-layer pairs
    traffic_after: float
    per_layer: list[tuple[int, float, float]]  # (layer, max/mean before, after)


def solve_placement(stats: dict, ranks: int, time_limit: float = 10.0, traffic: bool = True,
                    traffic_time_limit: float = 30.0) -> PlacementReport:
    """A placement for `stats` (ExpertStats.to_json) over `ranks` ranks, with the before/after figures."""
    loads = np.asarray(stats["load"], dtype=float)
    layers, experts = loads.shape
    if ranks < 1 or experts % ranks:
        raise ValueError(f"{experts} experts per layer do not split evenly over {ranks} ranks")
    co = stats.get("co_occurrence") or []
    baseline = [round_robin(experts, ranks)] * layers
    chosen = [solve_layer(load, ranks, time_limit) for load in loads]
    if traffic and co and layers > 1:
        chosen = solve_traffic(loads, co, chosen, ranks, traffic_time_limit)

    def ratio(load, owners) -> float:
        mean = load.sum() / ranks
        return float(rank_loads(load, owners, ranks).max() / mean) if mean else 1.0

    per_layer = [(int(i), ratio(load, b), ratio(load, a))
                 for i, load, b, a in zip(stats["layers"], loads, baseline, chosen)]
    placement = ExpertPlacement(ranks, experts, {int(i): owners for i, owners in zip(stats["layers"], chosen)})
    return PlacementReport(placement, max_over_mean(loads, baseline, ranks), max_over_mean(loads, chosen, ranks),
                           cross_rank_pairs(co, baseline), cross_rank_pairs(co, chosen), per_layer)


def cmd_placement(args: argparse.Namespace) -> int:
    with open(args.stats) as f:
        stats = json.load(f)
    report = solve_placement(stats, args.ranks, args.time_limit, not args.no_traffic, args.traffic_time_limit)
    print(f"{'layer':>5}  {'round-robin':>11}  {'placed':>8}   (max/mean rank load)")
    for layer, before, after in report.per_layer:
        print(f"{layer:>5}  {before:>11.3f}  {after:>8.3f}")
    print(f"step (sum over layers of the most loaded rank / even share): round-robin {report.before:.3f}, "
          f"placed {report.after:.3f}")
    print(f"token pairs crossing ranks between consecutive MoE layers: round-robin {report.traffic_before:.0f}, "
          f"placed {report.traffic_after:.0f}")
    if args.out:
        data = report.placement.to_json()
        data["report"] = {"max_over_mean_round_robin": report.before, "max_over_mean": report.after,
                          "cross_rank_pairs_round_robin": report.traffic_before,
                          "cross_rank_pairs": report.traffic_after, "stats": args.stats}
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.out}: pass it as expert_placement (--expert-placement) with "
              f"--tensor-parallel-size {args.ranks} --enable-expert-parallel", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("placement", help="place MoE experts over expert-parallel ranks from routing statistics",
                       description="Balance expert parallelism: from the routing statistics an engine recorded "
                                   "(LLM.dump_expert_stats or the server's /expert_stats), place each MoE layer's "
                                   "experts on the ranks so the most loaded rank is as light as possible (scipy's "
                                   "MILP, HiGHS), then keep consecutive layers' experts together; prints the "
                                   "max/mean rank load of round-robin and of the placement.")
    p.add_argument("--stats", required=True, help="routing statistics JSON")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks (tensor_parallel_size)")
    p.add_argument("--out", default=None, help="write the placement JSON here (the engine's expert_placement)")
    p.add_argument("--time-limit", type=float, default=10.0, help="solver seconds per layer (default: 10)")
    p.add_argument("--traffic-time-limit", type=float, default=30.0,
                   help="solver seconds for the consecutive-layer step, all layers together (default: 30)")
    p.add_argument("--no-traffic", action="store_true", help="balance load only, skip the consecutive-layer step")
    p.set_defaults(func=cmd_placement)
