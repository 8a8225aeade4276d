"""`fuselm placement` against brute force: on small random load matrices the MILP placement is never
worse than round-robin, its step cost (sum over layers of the most loaded rank) equals the best of
every balanced assignment, and among those optimal ones its cross-rank traffic between consecutive
layers is the smallest. The command writes a file the engine's ExpertPlacement reads."""

from __future__ import annotations

import itertools
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.cli import main
from fuselm.parallel.expert_parallel import ExpertPlacement
from fuselm.parallel.placement import solve_placement


def balanced_assignments(experts: int, ranks: int):
    """Every owner list giving each rank experts / ranks experts."""
    share = experts // ranks
    for owners in itertools.product(range(ranks), repeat=experts):
        if all(owners.count(r) == share for r in range(ranks)):
            yield owners


def layer_max(load, owners, ranks: int) -> int:
    return max(sum(x for x, o in zip(load, owners) if o == r) for r in range(ranks))


def traffic(co, placement) -> int:
    return sum(co[p][a][b] for p in range(len(co)) for a, oa in enumerate(placement[p])
               for b, ob in enumerate(placement[p + 1]) if oa != ob)


def brute_force(load, co, ranks: int) -> tuple[int, int]:
    """(best step cost, least traffic among placements with that cost), by enumeration."""
    options = list(balanced_assignments(len(load[0]), ranks))
    best_cost, best_traffic = None, None
    for placement in itertools.product(options, repeat=len(load)):
        cost = sum(layer_max(row, owners, ranks) for row, owners in zip(load, placement))
        moved = traffic(co, placement)
        if best_cost is None or (cost, moved) < (best_cost, best_traffic):
            best_cost, best_traffic = cost, moved
    return best_cost, best_traffic


@st.composite
def routing(draw):
    ranks, experts = draw(st.sampled_from([(2, 2), (2, 4), (2, 6), (3, 3), (3, 6), (4, 4)]))
    layers = draw(st.integers(1, 3 if experts <= 4 else 2))
    skew = draw(st.sampled_from([1, 10, 100]))
    load = [[draw(st.integers(0, skew)) * draw(st.integers(0, 9)) for _ in range(experts)] for _ in range(layers)]
    co = [[[draw(st.integers(0, 6)) for _ in range(experts)] for _ in range(experts)] for _ in range(layers - 1)]
    return ranks, load, co


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing())
def test_placement_is_optimal_and_never_worse_than_round_robin(case):
    ranks, load, co = case
    report = solve_placement({"layers": list(range(len(load))), "load": load, "co_occurrence": co}, ranks)
    owners = [report.placement.owners[i] for i in range(len(load))]
    share = len(load[0]) // ranks
    assert all(o.count(r) == share for o in owners for r in range(ranks))
    cost = sum(layer_max(row, o, ranks) for row, o in zip(load, owners))
    round_robin = [[e % ranks for e in range(len(row))] for row in load]
    assert cost <= sum(layer_max(row, o, ranks) for row, o in zip(load, round_robin))
    assert report.after <= report.before + 1e-12
    best_cost, best_traffic = brute_force(load, co, ranks)
    assert cost == best_cost
    assert traffic(co, owners) == best_traffic
    assert report.traffic_after == best_traffic


def test_placement_command_writes_a_file_the_engine_reads(tmp_path, capsys):
    rng = np.random.default_rng(1)
    load = (rng.zipf(1.6, size=(3, 8)) * 7).tolist()  # skewed: a few hot experts
    co = rng.integers(0, 20, size=(2, 8, 8)).tolist()
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"format": "fuselm-expert-stats", "layers": [0, 2, 3], "num_experts": 8,
                                 "load": load, "co_occurrence": co}))
    out = tmp_path / "placement.json"
    assert main(["placement", "--stats", str(stats), "--ranks", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    placement = ExpertPlacement.load(out)
    placement.check([0, 2, 3], 8, 2)
    report = json.loads(out.read_text())["report"]
    assert report["max_over_mean"] <= report["max_over_mean_round_robin"]
    assert f"round-robin {report['max_over_mean_round_robin']:.3f}, placed {report['max_over_mean']:.3f}" in printed
    assert main(["placement", "--stats", str(stats), "--ranks", "3"]) == 2  # 8 experts do not split over 3
