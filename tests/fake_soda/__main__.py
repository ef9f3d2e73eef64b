"""`python -m tests.fake_soda`: run a fake SODA server in the foreground until SIGTERM/SIGINT.

Prints one line `READY http://127.0.0.1:PORT` on stdout once it listens.
Example: python -m tests.fake_soda --port 0 --scale 0.01 --latency --token good-token
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import FakeSoda, Latency


def _sizes(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        dataset_id, _, n = item.partition("=")
        out[dataset_id.strip()] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.fake_soda",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--scale", type=float, help="fraction of the real dataset sizes")
    p.add_argument("--sizes", type=_sizes, help="h9gi-nx95=1000,f55k-p6yu=2600,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token", action="append", help="a valid app token (repeatable)")
    p.add_argument("--require-token", action="store_true", help="no token -> 429")
    p.add_argument("--no-gzip", action="store_true")
    p.add_argument("--cache", help="folder to keep generated data in across runs")
    p.add_argument("--latency", action="store_true", help="turn the latency model on")
    p.add_argument(
        "--hostile-text",
        action="store_true",
        help="newlines, quotes, emoji, multi-KB values... in the text columns",
    )
    defaults = Latency()
    p.add_argument("--base", type=float, help=f"seconds per rows request ({defaults.base})")
    p.add_argument("--per-row", type=float, help=f"seconds per row ({defaults.per_row})")
    p.add_argument(
        "--per-skipped",
        type=float,
        help=f"seconds per row skipped by $offset ({defaults.per_skipped})",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        help=f"rows requests served at once ({defaults.max_concurrent})",
    )
    args = p.parse_args(argv)

    knobs = {
        "base": args.base,
        "per_row": args.per_row,
        "per_skipped": args.per_skipped,
        "max_concurrent": args.max_concurrent,
    }
    given = {k: v for k, v in knobs.items() if v is not None}
    latency = Latency(**given) if args.latency or given else None
    srv = FakeSoda(
        sizes=args.sizes,
        scale=args.scale,
        seed=args.seed,
        tokens=tuple(args.token or ("good-token",)),
        require_token=args.require_token,
        latency=latency,
        gzip=not args.no_gzip,
        cache_dir=args.cache,
        host=args.host,
        port=args.port,
        hostile_text=args.hostile_text,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with srv:
        sys.stdout.write(f"READY {srv.url}\n")
        sys.stdout.flush()
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
