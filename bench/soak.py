"""Soak run of the fault-injection suite (issue 6): every scenario of `tests/_f_scenarios.py` at the issue's sizes
(500 jobs with random worker kills, 10,000 submissions, 1,000 cancel races, ...), then ONE table:
scenario, jobs, faults injected, lost, orphans, leaked fds/threads, violations, time.

    python bench/soak.py                   # every scenario, soak sizes, a random seed (printed)
    python bench/soak.py --seed 123        # replay a run
    python bench/soak.py --only cancel_races worker_kills --scale 0.1   # a part, smaller

`tests/test_faults.py` runs the same code at the CI sizes. The process exits with status 1 if any invariant was
violated (the violations are printed under the table).
"""
import argparse, asyncio, logging, random, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))  # the scenarios and their plugins


def main():
    import _f_scenarios as S
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--seed', type=int, default=None, help="RNG seed (default: a random one, printed)")
    ap.add_argument('--only', nargs='*', default=None, choices=list(S.SCENARIOS), help="run only these scenarios")
    ap.add_argument('--scale', type=float, default=1.0, help="multiply the soak sizes (>= 1 each)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    logging.basicConfig(level=logging.CRITICAL)  # the faults are expected: their log lines are noise here
    print(f"soak: seed {seed} (replay with --seed {seed})", flush=True)
    outcomes, t0 = [], time.monotonic()
    for name, (fn, _ci, soak) in S.SCENARIOS.items():
        if args.only and name not in args.only: continue
        size = max(1, round(soak * args.scale)) if name != 'big_result' else soak
        print(f"  {name} (size {size}) ...", end=' ', flush=True)
        try:
            out = asyncio.run(fn(size, seed)) if asyncio.iscoroutinefunction(fn) else fn(size, seed)
        except Exception as e:  # a scenario that could not finish is itself a finding
            out = S.Outcome(name, seed=seed)
            out.fail(f"the scenario raised {type(e).__name__}: {e}")
        outcomes.append(out)
        print(f"{out.seconds:.1f} s, {len(out.violations)} violations", flush=True)
    print()
    print(S.table(outcomes))
    print(f"\nseed {seed}; {time.monotonic() - t0:.0f} s in all")
    bad = [(o.scenario, v) for o in outcomes for v in o.violations]
    for scenario, v in bad: print(f"VIOLATION [{scenario}]: {v}")
    for o in outcomes:
        if o.notes: print(f"note [{o.scenario}]: {o.notes}")
    sys.exit(1 if bad else 0)


if __name__ == '__main__':  # the guard matters: 'spawn' re-imports the main module in the workers
    main()
