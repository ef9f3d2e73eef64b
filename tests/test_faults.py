"""Survives faults: nothing lost or duplicated under throttling, errors, dropped connections, kills,
full disks, a second run at once and a source that changes meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nyc_collisions.socrata.concurrency import ConcurrencyLimit
from tests.conftest import GOOD_TOKEN
from tests.disk import small_disk
from tests.fake_soda import FakeSoda, Latency
from tests.faultsuite import Schedule
from tests.helpers import Result, cli, exact, paced_crashes
from tests.s3_proxy import S3FaultProxy


# Two schedules here; `python -m tests.soak` runs many more (README, "Tests").
@pytest.mark.parametrize(("seed", "where"), [(102, "s3"), (103, "local")])
def test_seeded_fault_schedule_ends_exact(
    seed: int, where: str, tmp_path: Path, s3_server: str
) -> None:
    """Source faults, S3 faults, SIGKILLs and a changing source; then the state is exact."""
    outcome = Schedule(seed, tmp_path, s3_server if where == "s3" else None).run()
    assert outcome.rows_checked > 0
    assert outcome.failures == []
    assert outcome.token_leaks == []
    assert (outcome.lost, outcome.duplicated, outcome.mismatched) == (0, 0, 0)
    assert sum(outcome.source_faults.values()) > 0


def test_a_stalled_response_is_retried_after_the_read_timeout(
    soda: FakeSoda, tmp_path: Path
) -> None:
    soda.add_fault("stall", times=2, match="$order", seconds=3)
    dest = str(tmp_path / "land")
    started = time.monotonic()
    res = cli("backfill", "crashes", "--timeout", "0.5", "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text
    assert time.monotonic() - started < 30
    assert soda.stats()["faults"]["stall"] == 2
    exact(soda, dest, "crashes", tmp_path)


def test_s3_slowdown_and_errors_are_retried(
    soda_ro: FakeSoda, bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with S3FaultProxy(s3_server, probability=0.25, seed=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        dest = f"s3://{bucket}/raw"
        res = cli(
            "backfill",
            "crashes",
            "persons",
            "--file-rows",
            "700",
            "--source",
            soda_ro.url,
            "--dest",
            dest,
        )
        assert res.code == 0, res.text
        assert sum(proxy.faults.values()) >= 5
        proxy.probability = 0
        exact(soda_ro, dest, "crashes", tmp_path)
        exact(soda_ro, dest, "persons", tmp_path)


def test_a_second_run_on_the_same_destination_is_refused(tmp_path: Path) -> None:
    sizes = {"h9gi-nx95": 2000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.1, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=2, latency=latency) as srv:
        dest = tmp_path / "land"
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nyc_collisions.cli",
                "backfill",
                "crashes",
                "--source",
                srv.url,
                "--dest",
                str(dest),
                "--page-size",
                "100",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not (dest / "crashes/lock.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = cli("backfill", "crashes", "--source", srv.url, "--dest", str(dest))
        assert second.code == 1
        assert "another run holds the lease" in second.err
        assert len(second.err.strip().splitlines()) == 1
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, out + err
        exact(srv, str(dest), "crashes", tmp_path)


def test_a_full_disk_commits_nothing_and_says_so(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_disk(tmp_path, 600 << 10, monkeypatch) as disk:
        # the check before downloading wants 64 MiB free: it refuses at once
        res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", str(disk.path / "d"))
        assert res.code == 1, (disk.kind, res.text)
        assert "free" in res.err
        assert not list(disk.path.rglob("manifest.json"))


def test_disk_filling_up_mid_run_commits_nothing(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nyc_collisions.sink import local

    monkeypatch.setattr(local, "MIN_FREE_BYTES", 0)
    with small_disk(tmp_path, 300 << 10, monkeypatch) as disk:
        res = cli("backfill", "persons", "--source", soda_ro.url, "--dest", str(disk.path / "d"))
        assert res.code == 1, (disk.kind, res.text)
        assert "no space left on device" in res.err
        assert len(res.err.strip().splitlines()) == 1
        assert not list(disk.path.rglob("manifest.json"))


def test_throttling_halves_the_shared_limit_and_it_recovers_slowly() -> None:
    limit = ConcurrencyLimit(8)  # fixed (--workers 8): only throttling moves it

    def one_throttled_request() -> None:
        with limit.request() as ticket:
            limit.throttled(ticket.epoch)

    def one_success() -> None:
        with limit.request() as ticket:
            ticket.done(100)

    one_throttled_request()
    assert limit.limit == 4
    for _ in range(3):
        one_throttled_request()
    assert limit.limit == 1
    # one more in flight after `GROW_AFTER * limit` successes in a row, as the docstring says
    for size in range(1, 8):
        for _ in range(ConcurrencyLimit.GROW_AFTER * size - 1):
            one_success()
        assert limit.limit == size
        one_success()
        assert limit.limit == size + 1
    for _ in range(100):
        one_success()
    assert limit.limit == 8


def test_one_throttling_event_seen_by_every_request_in_flight_halves_the_limit_once() -> None:
    limit = ConcurrencyLimit(4)
    in_flight = threading.Barrier(4)

    def request() -> None:
        with limit.request() as ticket:
            in_flight.wait(timeout=10)  # all four were sent before any answer came
            limit.throttled(ticket.epoch)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limit.limit == 2
    with limit.request() as ticket:  # a request sent after the decrease that is throttled
        limit.throttled(ticket.epoch)
    assert limit.limit == 1


def test_limit_bounds_requests_in_flight() -> None:
    limit = ConcurrencyLimit(2)
    peak = 0
    now = 0
    lock = threading.Lock()
    entered = threading.Semaphore(0)
    release = threading.Event()

    def work() -> None:
        nonlocal peak, now
        with limit.request():
            with lock:
                now += 1
                peak = max(peak, now)
            entered.release()
            release.wait(timeout=30)  # in flight until the test has looked
            with lock:
                now -= 1

    threads = [threading.Thread(target=work, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    # two are let in at once; a third is not while they are in flight (a slow machine could
    # only let a broken limit pass here, never fail a sound one)
    try:
        assert entered.acquire(timeout=10)
        assert entered.acquire(timeout=10)
        assert not entered.acquire(timeout=0.3)
    finally:
        release.set()
    for t in threads:
        t.join()
    assert peak == 2


def test_throttled_parallel_backfill_backs_off(
    soda: FakeSoda, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    soda.add_fault("429", times=6, match="$order")
    dest = str(tmp_path / "land")
    res = cli(
        "backfill",
        "persons",
        "-v",
        "--workers",
        "4",
        "--page-size",
        "500",
        "--source",
        soda.url,
        "--dest",
        dest,
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN},
    )
    assert res.code == 0, res.text
    assert "source throttles: concurrency 4 -> 2" in caplog.text
    assert GOOD_TOKEN not in res.text + caplog.text
    exact(soda, dest, "persons", tmp_path)


def test_one_throttling_event_seen_by_four_workers_halves_concurrency_once(
    soda: FakeSoda, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first page of each of the four partitions is answered 429 at once."""
    soda.add_fault("429", times=4, match="$limit=500", together=4)
    dest = str(tmp_path / "land")
    res = cli(
        "backfill",
        "persons",
        "--workers",
        "4",
        "--page-size",
        "500",
        "--source",
        soda.url,
        "--dest",
        dest,
    )
    assert res.code == 0, res.text
    assert soda.stats()["faults"] == {"429": 4}
    throttles = [r.getMessage() for r in caplog.records if "throttles" in r.getMessage()]
    assert throttles == ["source throttles: concurrency 4 -> 2"]
    exact(soda, dest, "persons", tmp_path)


def test_rows_changing_during_the_backfill_are_caught_by_the_next_update(
    tmp_path: Path,
) -> None:
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.03, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=21, latency=latency) as srv:
        dest = str(tmp_path / "land")
        # a page after the first of a partition is held, so the backfill is surely running
        # (past its start, before its end) while the source changes
        srv.add_fault("slow", times=1, match=":id >", seconds=5)
        args = ["backfill", "crashes", "--page-size", "100", "--workers", "3"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyc_collisions", *args, "--source", srv.url, "--dest", dest],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not srv.stats()["faults"].get("slow"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for _ in range(5):
            srv.insert("h9gi-nx95", 7)
            srv.edit("h9gi-nx95", 9)
            srv.delete("h9gi-nx95", 3)
        assert proc.poll() is None, "the backfill ended before the source changed"
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        res = cli("update", "crashes", "--reconcile", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        assert "updated 0 rows" not in res.out, res.out
        exact(srv, dest, "crashes", tmp_path)


def test_leftovers_of_a_killed_run_are_never_read_and_are_cleaned_up(
    soda_ro: FakeSoda, bucket: str, tmp_path: Path
) -> None:
    """An unfinished multipart upload and an orphan data file, as a SIGKILL leaves them."""
    import boto3

    s3 = boto3.client("s3")
    prefix = "raw/crashes/data/20260101T000000Z-backfill-dead00"
    s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/part-0000-000001.csv")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/part-0000-000000.csv", Body=b"not,committed\n")
    dest = f"s3://{bucket}/raw"
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest)
    assert res.code == 0, res.text
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if "dead00" in k]
    exact(soda_ro, dest, "crashes", tmp_path)


@pytest.mark.parametrize(
    ("command", "match"),
    [
        ("backfill", "$select=*"),  # its pages
        ("update", ":updated_at,:id"),  # its pages of changes
        ("reconcile", ":id,collision_id,:updated_at"),  # its key pages
    ],
)
@pytest.mark.parametrize("fault", ["429", "slow"], ids=["throttled", "held_silent"])
def test_the_time_budget_holds_while_the_source_fails(
    soda: FakeSoda, tmp_path: Path, command: str, match: str, fault: str
) -> None:
    """`--max-seconds` (and the Lambda's deadline) while every page is throttled with a long
    Retry-After, or held by the source without a byte: the run stops at its budget, not after
    the retries' waits nor the read timeout (120 s), and a rerun ends exact."""
    dest = str(tmp_path / "land")
    where = ["--source", soda.url, "--dest", dest]
    if command != "backfill":
        assert cli("backfill", "crashes", *where).code == 0
        soda.insert("h9gi-nx95", 30)
        soda.delete("h9gi-nx95", 10)
    wait = 20.0  # each retry's, or each hold; the run would wait it out at least twice
    if fault == "429":
        soda.add_fault("429", times=2, match=match, retry_after=wait)
    else:
        soda.add_fault("slow", times=2, match=match, seconds=wait)
    budget = 3.0
    started = time.monotonic()
    res = cli(command, "crashes", *where, "--workers", "1", "--max-seconds", str(budget))
    took = time.monotonic() - started
    assert res.code == 3, res.text  # stopped by its budget: resumable
    assert "stopped" in res.out, res.text
    assert soda.stats()["faults"].get(fault), "the failing request was never reached"
    assert took < budget + wait / 2, f"a {budget:.0f} s budget took {took:.1f} s"
    soda.clear_faults()
    assert cli(command, "crashes", *where).code == 0
    for catch_up in ("update", "reconcile"):  # what the source holds now
        assert cli(catch_up, "crashes", *where).code == 0
    exact(soda, dest, "crashes", tmp_path)


def test_an_update_stopped_while_it_waits_to_retry_commits_the_rows_it_landed(
    tmp_path: Path,
) -> None:
    """An update whose budget ends while it waits to retry a throttled page commits the rows of
    the pages before it, as a stop between pages does (they are whole), and goes on from them."""
    with paced_crashes() as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        assert cli("backfill", "crashes", *where).code == 0
        srv.edit("h9gi-nx95", 1200)
        throttle = threading.Timer(
            1.0,
            lambda: srv.add_fault("429", times=5, match=":updated_at,:id", retry_after=20.0),
        )
        throttle.start()
        try:
            res = cli(
                "update", "crashes", *where, "--workers", "1", "--page-size", "20",
                "--file-rows", "100000", "--max-seconds", "2",
            )  # fmt: skip
        finally:
            throttle.cancel()
        assert res.code == 3, res.text
        assert srv.stats()["faults"].get("429"), "the throttle was never reached"
        manifest = json.loads((Path(dest) / "crashes/manifest.json").read_text())
        batches = manifest["batches"]
        assert batches[-1]["kind"] == "update", (
            "the pages landed before the throttle were dropped: " + res.text[-600:]
        )
        srv.clear_faults()
        assert cli("update", "crashes", *where).code == 0
        exact(srv, dest, "crashes", tmp_path)


CRASHES_ONLY = {"h9gi-nx95": 30_000, "f55k-p6yu": 10, "bm4k-52h4": 10}


def _backfill_through_cuts(
    srv: FakeSoda, dest: str, *, times: int | None, page: int, retries: int
) -> Result:
    """A sequential backfill of crashes while `times` bodies (None: every one) are cut (a TCP
    reset) after 5,000 rows, as a proxy with a cap on a response's size does."""
    srv.add_fault("reset", times=times, match="$select=*", after_rows=5_000)
    return cli(
        "backfill", "crashes", "--source", srv.url, "--dest", dest,
        "--page-size", str(page), "--workers", "1", "--retries", str(retries),
    )  # fmt: skip


def test_bodies_cut_one_after_another_are_paged_through_while_each_lands_rows(
    tmp_path: Path,
) -> None:
    """Six long bodies in a row cut (TCP reset) after 5,000 rows, as a proxy with a cap on a
    response's size does, against four attempts a page: each attempt lands rows and the retry
    asks for what follows them, so the page goes on instead of giving up after four."""
    with FakeSoda(sizes=CRASHES_ONLY, seed=21) as srv:
        dest = str(tmp_path / "land")
        res = _backfill_through_cuts(srv, dest, times=6, page=30_000, retries=4)
        assert res.code == 0, res.text
        assert srv.stats()["faults"]["reset"] == 6
        exact(srv, dest, "crashes", tmp_path)


def test_a_source_cutting_every_body_after_a_few_rows_is_given_up_on(tmp_path: Path) -> None:
    """Each attempt lands a piece before the cut, but a source that cuts every body that soon is
    not crawled through: a request gets ten times its attempts in all, then one line."""
    with FakeSoda(sizes={**CRASHES_ONLY, "h9gi-nx95": 200_000}, seed=24) as srv:
        dest = str(tmp_path / "land")
        res = _backfill_through_cuts(srv, dest, times=None, page=200_000, retries=2)
        assert res.code == 1, res.text
        assert len(res.err.strip().splitlines()) == 1, res.err
        assert "gave up after 20 attempts" in res.err
        assert srv.stats()["faults"]["reset"] == 20


def test_a_request_given_up_on_for_its_silence_keeps_its_slot_while_the_source_serves_it(
    tmp_path: Path,
) -> None:
    """`--workers 1`: a page the source holds silent past `--timeout` is sent again, but the
    source may still be serving the first: its slot stays counted as long again as it was
    silent, so the source never gets two requests at once from a sequential run."""
    with FakeSoda(sizes={**CRASHES_ONLY, "h9gi-nx95": 3_000}, seed=22) as srv:
        srv.add_fault("stall", match="$select=*", seconds=1.6)
        dest = str(tmp_path / "land")
        res = cli(
            "backfill", "crashes", "--source", srv.url, "--dest", dest,
            "--workers", "1", "--timeout", "1",
        )  # fmt: skip
        assert res.code == 0, res.text
        assert srv.stats()["peak_in_flight"] == 1
        exact(srv, dest, "crashes", tmp_path)


def test_a_throttle_that_says_retry_after_0_is_waited_out(tmp_path: Path) -> None:
    """A source throttling for a second with `Retry-After: 0` (a window that resets within the
    second, rounded down): the wait is never shorter than half the backoff, so the attempts
    are not all spent within milliseconds."""
    with FakeSoda(sizes={**CRASHES_ONLY, "h9gi-nx95": 3_000}, seed=23) as srv:
        srv.add_fault("429", times=None, match="$select=*", retry_after=0)
        clear = threading.Timer(1.0, srv.clear_faults)
        clear.start()
        try:
            dest = str(tmp_path / "land")
            res = cli("backfill", "crashes", "--source", srv.url, "--dest", dest)
        finally:
            clear.cancel()
        assert res.code == 0, res.text
        exact(srv, dest, "crashes", tmp_path)


def test_max_seconds_holds_while_a_retry_waits_for_a_lingering_slot(tmp_path: Path) -> None:
    """`--workers 1 --timeout 6 --max-seconds 8`: the first page is held silent and given up
    on at ~6 s, and its slot stays counted 6 s more; the retry's wait for it ends with the time
    budget (it had waited the whole linger, past the budget)."""
    import time

    with FakeSoda(sizes={**CRASHES_ONLY, "h9gi-nx95": 3_000}, seed=31) as srv:
        srv.add_fault("stall", match="$select=*", seconds=30)
        dest = str(tmp_path / "land")
        started = time.monotonic()
        res = cli(
            "backfill", "crashes", "--source", srv.url, "--dest", dest,
            "--workers", "1", "--timeout", "6", "--max-seconds", "8",
        )  # fmt: skip
        took = time.monotonic() - started
        assert res.code == 3, res.text
        assert took < 10.5, f"stopped {took:.1f}s after it started, against --max-seconds 8"


def test_a_timed_out_page_lingers_as_long_as_it_was_silent_not_as_long_as_it_streamed() -> None:
    """A page streams for ~3 s, then goes silent; `--timeout 1` gives up on it: its slot stays
    counted as long again as it was silent (~1 s), not as long as it streamed too (~4 s)."""
    import socket
    import threading
    import time

    from nyc_collisions.socrata.client import SodaClient
    from nyc_collisions.socrata.setup import RetryPolicy

    marks: dict[str, float] = {}
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    conns: list[socket.socket] = []

    def serve() -> None:
        n = 0
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            conn.recv(65536)
            n += 1
            if n == 1:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n["
                )
                for _ in range(10):  # streams for 3 s, then nothing more
                    time.sleep(0.3)
                    conn.sendall(b" ")
                marks["last_byte"] = time.monotonic()
            else:
                marks["retry"] = time.monotonic()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n[]"
                )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = SodaClient(
        f"http://127.0.0.1:{port}", concurrency=1, adaptive=False, timeout=1.0,
        retry=RetryPolicy(attempts=3, base=0.01),
    )  # fmt: skip
    try:
        assert client.get_json("/resource/x.json") == []
    finally:
        client.close()
        srv.close()
        for c in conns:
            c.close()
    waited = marks["retry"] - marks["last_byte"]
    # silent 1 s (the timeout), then the slot lingers ~1 s: the retry comes ~2 s after
    assert waited < 3.0, f"the retry came {waited:.1f}s after the last byte"


def test_max_seconds_holds_while_a_first_request_waits_for_a_lingering_slot(
    tmp_path: Path,
) -> None:
    """`update --workers 1 --timeout 6 --max-seconds 8`: an update asks its latest
    `:updated_at` beside the metadata; the first of the two is held silent and given up on at
    ~6 s, its slot lingering 6 s more. The other, a first attempt (not a retry), waits for that
    slot past the budget: the run stops ~12 s in, not at ~8 s."""
    import time

    with FakeSoda(sizes={"h9gi-nx95": 3_000, "f55k-p6yu": 10, "bm4k-52h4": 10}, seed=31) as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        assert cli("backfill", "crashes", *where).code == 0
        srv.edit("h9gi-nx95", 10)
        srv.add_fault("stall", times=1, seconds=30)  # whichever of the two goes first
        started = time.monotonic()
        res = cli(
            "update", "crashes", *where,
            "--workers", "1", "--timeout", "6", "--max-seconds", "8",
        )  # fmt: skip
        took = time.monotonic() - started
        assert res.code == 3, res.text
        assert took < 10.5, f"stopped {took:.1f}s after it started, against --max-seconds 8"


def test_a_page_dropped_for_a_bad_row_mid_body_keeps_its_slot_while_the_source_sends_it(
    tmp_path: Path,
) -> None:
    """`--workers 1`: a page whose 10th row is broken is dropped at once, but the source goes
    on sending the rest of it until it sees the connection closed; the retry (base 0, as
    `NYC_COLLISIONS_RETRY_BASE=0` allows) must not make two requests at the source, as a
    cancelled page's slot lingers (`CANCEL_LINGER`)."""
    with FakeSoda(sizes={"h9gi-nx95": 60_000, "f55k-p6yu": 10, "bm4k-52h4": 10}, seed=5) as srv:
        srv.add_fault("bad_row", times=3, match="$select=*", after_rows=10, pad=3_000_000)
        dest = str(tmp_path / "land")
        res = cli(
            "backfill", "crashes", "--source", srv.url, "--dest", dest,
            "--workers", "1", "--page-size", "50000",
            env={"NYC_COLLISIONS_RETRY_BASE": "0"},
        )  # fmt: skip
        assert res.code == 0, res.text
        assert srv.stats()["faults"]["bad_row"] == 3
        exact(srv, dest, "crashes", tmp_path)
        assert srv.stats()["peak_in_flight"] == 1


def test_a_backfill_that_got_every_row_as_its_budget_ran_out_is_committed(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every partition landed; `--max-seconds` runs out just then, while a request the run
    dropped still lingers in its slot: the commit's own request waits for a slot and is sent
    (it was refused, and the whole snapshot left uncommitted, exit 3)."""
    from nyc_collisions import snapshot
    from nyc_collisions.job import RunOptions

    late = False
    real = snapshot._Snapshot._commit

    def commit_as_time_runs_out(self: Any, *args: Any) -> Any:
        nonlocal late
        late = True
        limit = self.job.client.limit
        with limit.request() as ticket:  # --workers 1: one slot, a dropped request lingering
            ticket.linger(0.5)
        return real(self, *args)

    monkeypatch.setattr(snapshot._Snapshot, "_commit", commit_as_time_runs_out)
    monkeypatch.setattr(RunOptions, "out_of_time", lambda self: late)
    dest = str(tmp_path / "land")
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", dest, "--workers", "1",
              "--max-seconds", "600")  # fmt: skip
    assert res.code == 0, res.text
    assert (Path(dest) / "crashes/manifest.json").exists()
