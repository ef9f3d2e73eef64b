"""The long soak: many seeded fault schedules, then one line `runs=N lost=0 dup=0 mismatched=0`.

python -m tests.soak --runs 100            # half to a local folder, half to S3 (moto)
python -m tests.soak --runs 20 --seed 500 --local-only
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.faultsuite import Schedule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--local-only", action="store_true")
    args = parser.parse_args(argv)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    moto_url = None
    server = None
    if not args.local_only:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        moto_url = f"http://127.0.0.1:{port}"
    totals: Counter[str] = Counter()
    source_faults: Counter[str] = Counter()
    s3_faults: Counter[str] = Counter()
    failures = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                seed = args.seed + i
                use_s3 = moto_url if (moto_url and i % 2) else None
                out = Schedule(seed, Path(tmp), use_s3).run()
                totals.update(
                    lost=out.lost,
                    dup=out.duplicated,
                    mismatched=out.mismatched,
                    rows=out.rows_checked,
                    kills=out.kills,
                    invocations=out.invocations,
                    leaks=len(out.token_leaks),
                )
                source_faults.update(out.source_faults)
                s3_faults.update(out.s3_faults)
                failures += len(out.failures)
                print(
                    f"seed={seed} dest={out.destination} exact={out.exact} "
                    f"rows={out.rows_checked} kills={out.kills} lost={out.lost} "
                    f"dup={out.duplicated} mismatched={out.mismatched} "
                    f"failures={out.failures} {out.seconds:.1f}s "
                    f"source_faults={dict(out.source_faults)} s3_faults={dict(out.s3_faults)}",
                    flush=True,
                )
    finally:
        if server:
            server.stop()
    print(f"source faults: {dict(sorted(source_faults.items()))}")
    print(f"s3 faults: {dict(sorted(s3_faults.items()))}")
    print(
        f"kills={totals['kills']} invocations={totals['invocations']} "
        f"rows_checked={totals['rows']} unexpected_failures={failures} "
        f"token_leaks={totals['leaks']}"
    )
    print(
        f"runs={args.runs} lost={totals['lost']} dup={totals['dup']} "
        f"mismatched={totals['mismatched']}"
    )
    return (
        0 if not (totals["lost"] or totals["dup"] or totals["mismatched"] or totals["leaks"]) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
