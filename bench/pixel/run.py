"""Pixel throughput and latency: OpenTrack against a static file and a bare Flask app.

One wrk load (same machine, loopback, N connections, D seconds) against each of:

  a  nginx serving a static 1x1 GIF (own temporary config, pid and logs)
  b  a bare Flask app returning the same GIF and headers, under gunicorn, 2 sync workers
  c  OpenTrack's pixel (valid token) under `opentrack web`, publishing to a live local broker
  d  the same with the broker stopped (events wait in the disk spool and the producer)
  e  the bare Flask app under `opentrack web`'s own Granian settings (workers, threads)

Rounds are interleaved (a b c d e, a b c d e, ...) so that drift of the machine hits every
target alike; the table shows medians over the rounds. After (c) the events in `opens.raw`
are counted against the requests; after (d) the broker is started again and the count is
taken once the spool has drained. Only the broker and `opentrack web` are started for c/d
(no stream worker or loader), so the numbers are the edge's alone.

    .venv/bin/python bench/pixel/run.py [--runs 3] [--duration 10] [--connections 32]

Besides req/s, p50 and p99, the table gives the servers' CPU time per request (the broker's
too, for c) and the load of processes it did not start: on a small shared machine req/s and
latency move with that load, CPU per request much less. wrk runs flat out unless --rate
paces it: p99 at saturation is mostly queueing, --rate shows latency below it.

Needs wrk and nginx (apt-get install -y wrk nginx-light) and gunicorn in the venv.
Every process it starts is stopped at the end, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from ingest.pixel import GIF  # noqa: E402
from opentrack.events import TOPIC_OPENS_RAW  # noqa: E402
from opentrack.kafka_local import LocalKafka, free_port  # noqa: E402
from opentrack.processes import stop_process_group  # noqa: E402
from opentrack.topics import ensure_topics  # noqa: E402

API_KEY = "bench-pixel-api-key-0123456789"
SECRET = "bench-pixel-secret-0123456789"
NGINX_WORKERS = 2
GUNICORN_WORKERS = 2
TARGETS = {
    "a": "nginx static GIF",
    "b": "bare Flask, gunicorn 2 sync",
    "c": "OpenTrack pixel, Kafka up",
    "d": "OpenTrack pixel, Kafka down",
    "e": "bare Flask, opentrack web",
}
MIN_RATIO = {"c/e": 0.9, "c/a": 0.15}
MAX_P99_MS = 20.0


class Interrupted(Exception):
    """SIGTERM turned into an exception, so that the `finally` clean-up runs as on Ctrl-C."""


# -- processes ---------------------------------------------------------------------------------
class Processes:
    """Every server this run started, each in its own session, stopped by process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.running[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 20.0) -> None:
        stop_process_group(self.running.pop(name, None), timeout)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_http(url: str, proc: subprocess.Popen[bytes], procs: Processes, name: str,
              timeout: float = 60.0) -> None:
    """Servers bind a little after they start; load before that would measure refusals."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not answer {url} in {timeout:.0f}s:\n{procs.log_tail(name)}")


# -- CPU accounting ----------------------------------------------------------------------------
def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all processes, all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this script's descendants, alive or reaped: subtracted from the machine's
    busy time, it leaves the load of other processes, which skews a 2-CPU benchmark."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat[1])
        # utime stime cutime cstime: reaped children (granian, nginx workers) count too
        times[pid] = sum(int(x) for x in stat[11:15]) / tick
    me = os.getpid()
    total = 0.0
    for pid, seconds in times.items():
        p = pid
        while p > 1 and p != me:
            p = parents.get(p, 0)
        if p == me and pid != me:
            total += seconds
    usage = os.times()
    return total + usage.children_user + usage.children_system


# -- wrk ---------------------------------------------------------------------------------------
@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    non2xx: int
    other_load: float = 0.0  # CPUs' worth of other processes' work during the run
    server_cpu_us: float = 0.0  # CPU per request of the servers (and broker), wrk excluded

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, args: argparse.Namespace, seconds: float, log: Path) -> Result:
    cmd = ["wrk", "-t", str(min(args.threads, args.connections)), "-c", str(args.connections),
           "-d", f"{seconds:g}s", "--timeout", "5s", "--latency",
           "-s", str(HERE / "wrk_report.lua"), url]
    busy, own, started = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    reaped = os.times()
    env = dict(os.environ)
    if args.rate:  # each connection waits so that all of them together make about --rate
        env["WRK_DELAY_MS"] = f"{args.connections * 1000 / args.rate:.3f}"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
    elapsed = time.monotonic() - started
    after = os.times()
    wrk_cpu = (after.children_user + after.children_system
               - reaped.children_user - reaped.children_system)
    own = own_cpu_seconds() - own
    other = (busy_cpu_seconds() - busy) - own
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}\n")
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return Result(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        non2xx=data["status"],
        other_load=max(0.0, other / elapsed),
        server_cpu_us=(own - wrk_cpu) / max(1, data["requests"]) * 1e6,
    )


# -- the servers -------------------------------------------------------------------------------
def start_nginx(procs: Processes, tmp: Path) -> str:
    base = tmp / "nginx"
    (base / "www").mkdir(parents=True, exist_ok=True)
    (base / "www" / "pixel.gif").write_bytes(GIF)
    for path in (tmp, base, base / "www", base / "www" / "pixel.gif"):
        path.chmod(0o755)  # nginx workers run as an unprivileged user when started as root
    port = free_port()
    conf = (HERE / "nginx.conf.tmpl").read_text()
    for key, value in {"__DIR__": str(base), "__PORT__": str(port),
                       "__WORKERS__": str(NGINX_WORKERS)}.items():
        conf = conf.replace(key, value)
    (base / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = procs.start("nginx", [nginx, "-p", str(base), "-e", str(base / "error.log"),
                                 "-c", str(base / "nginx.conf")])
    url = f"http://127.0.0.1:{port}/o/bench.gif"
    wait_http(url, proc, procs, "nginx")
    return url


def start_gunicorn(procs: Processes) -> str:
    port = free_port()
    proc = procs.start("gunicorn", [
        sys.executable, "-m", "gunicorn", "--workers", str(GUNICORN_WORKERS),
        "--worker-class", "sync", "--bind", f"127.0.0.1:{port}", "--chdir", str(HERE),
        "bare_app:app",
    ], env=python_env())
    url = f"http://127.0.0.1:{port}/o/bench.gif"
    wait_http(url, proc, procs, "gunicorn")
    return url


def python_env(**extra: str) -> dict[str, str]:
    """The caller's environment without OPENTRACK_* settings (but the web's workers and
    threads, which apply to c, d and e alike), so the defaults are what is measured."""
    keep = ("OPENTRACK_WEB_WORKERS", "OPENTRACK_WEB_THREADS", "OPENTRACK_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_") or k in keep}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)])
    env.update(extra)
    return env


def web_env(data_dir: Path, port: int, bootstrap: str) -> dict[str, str]:
    return python_env(
        OPENTRACK_DATA_DIR=str(data_dir),
        OPENTRACK_LISTEN=f"127.0.0.1:{port}",
        OPENTRACK_API_KEY=API_KEY,
        OPENTRACK_SECRET=SECRET,
        OPENTRACK_KAFKA_BOOTSTRAP=bootstrap,
    )


def start_bare_granian(procs: Processes, tmp: Path, bootstrap: str) -> str:
    port = free_port()
    env = web_env(tmp / "bare-granian", port, bootstrap)
    proc = procs.start("bare-granian", [sys.executable, str(HERE / "bare_app.py")],
                       env=env, cwd=HERE)
    url = f"http://127.0.0.1:{port}/o/bench.gif"
    wait_http(url, proc, procs, "bare-granian")
    return url


@dataclass
class Web:
    """`opentrack web` as production runs it, and the little API the checks need."""

    base: str
    data_dir: Path

    def register(self, email_id: str) -> str:
        body = {"email_id": email_id, "profile_id": "p1", "person_type": "candidate",
                "person_id": "c1", "template_id": "t1", "subject": "Hello",
                "sent_at": "2026-01-05T09:00:00Z"}
        request = urllib.request.Request(
            f"{self.base}/v1/emails", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["pixel_url"])

    def counted(self) -> int | None:
        """Pixel loads the server recorded (all workers), to tell a lost event from a request
        wrk gave up on at the end of its run."""
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith('opentrack_pixel_loads_total{outcome="counted"}'):
                return int(float(line.split()[-1]))
        return 0

    def spool_files(self) -> list[Path]:
        return sorted((self.data_dir / "spool").glob("*.jsonl"))


def start_web(procs: Processes, data_dir: Path, bootstrap: str) -> Web:
    port = free_port()
    env = web_env(data_dir, port, bootstrap)
    # cwd: `-m` puts it first on sys.path, so it decides which checkout's code runs
    proc = procs.start("opentrack-web", [sys.executable, "-m", "opentrack.cli", "web"], env=env,
                       cwd=ROOT)
    web = Web(f"http://127.0.0.1:{port}", data_dir)
    wait_http(f"{web.base}/livez", proc, procs, "opentrack-web")
    return web


# -- counting what reached Kafka ---------------------------------------------------------------
def end_offsets(bootstrap: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(TOPIC_OPENS_RAW) or set()
        ends = consumer.end_offsets([TopicPartition(TOPIC_OPENS_RAW, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        consumer.close()


@dataclass
class Delivery:
    """The open events of one email found in `opens.raw` after given offsets."""

    records: int = 0
    event_ids: set[str] = field(default_factory=set)


def count_delivered(bootstrap: str, email_id: str, start: dict[int, int]) -> Delivery:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, max_partition_fetch_bytes=8 << 20)
    found = Delivery()
    try:
        parts = [TopicPartition(TOPIC_OPENS_RAW, p)
                 for p in sorted(consumer.partitions_for_topic(TOPIC_OPENS_RAW) or ())]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        for tp in parts:
            consumer.seek(tp, start.get(tp.partition, 0))
        deadline = time.monotonic() + 120
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise RuntimeError("reading opens.raw took more than 120 s")
            for records in consumer.poll(timeout_ms=1000, max_records=50000).values():
                for record in records:
                    if record.offset >= ends[TopicPartition(record.topic, record.partition)]:
                        continue
                    event = json.loads(record.value)
                    if event.get("email_id") == email_id:
                        found.records += 1
                        found.event_ids.add(event["event_id"])
    finally:
        consumer.close()
    return found


def verify(label: str, web: Web, bootstrap: str, email_id: str, start: dict[int, int],
           wrk_total: int, counted_before: int | None, timeout: float) -> str:
    """Wait until the spool is empty and every event the server accepted is in Kafka."""
    deadline = time.monotonic() + timeout
    while True:
        counted = web.counted()
        accepted = None if counted is None or counted_before is None else counted - counted_before
        spool = web.spool_files()
        found = count_delivered(bootstrap, email_id, start)
        want = accepted if accepted is not None else wrk_total
        if (not spool and len(found.event_ids) >= want) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    delivered = len(found.event_ids)
    extra = []
    if accepted is not None:
        extra.append(f"server accepted {accepted}")
    if found.records > delivered:
        extra.append(f"{found.records - delivered} duplicate records")
    if spool:
        extra.append(f"{len(spool)} spool files left after {timeout:.0f}s")
    lost = max(0, (accepted if accepted is not None else wrk_total) - delivered)
    verdict = "OK" if lost == 0 and delivered >= wrk_total else f"LOST {lost}"
    return f"({label}) delivered {delivered} of {wrk_total} ({'; '.join(extra)}) {verdict}"


# -- one round ---------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    procs: Processes
    broker: LocalKafka | None = None
    results: dict[str, list[Result]] = field(default_factory=dict)
    deliveries: list[str] = field(default_factory=list)

    def measure(self, key: str, url: str, round_no: int) -> Result:
        if self.args.warmup > 0:
            wrk(url, self.args, self.args.warmup, self.tmp / "logs" / "wrk.log")
        return self.run_wrk(key, url, round_no)

    def run_wrk(self, key: str, url: str, round_no: int) -> Result:
        result = wrk(url, self.args, self.args.duration, self.tmp / "logs" / "wrk.log")
        self.results.setdefault(key, []).append(result)
        flags = ""
        if result.errors or result.non2xx:
            flags = f"  socket errors {result.errors}, non-2xx {result.non2xx}"
        print(f"  round {round_no} {key} {TARGETS[key]:<30} {result.rps:>9,.0f} req/s  "
              f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
              f"server CPU {result.server_cpu_us:4.0f} us/req  "
              f"other load {result.other_load:4.2f} CPU{flags}", flush=True)
        return result

    def nginx(self, round_no: int) -> None:
        try:
            self.measure("a", start_nginx(self.procs, self.tmp), round_no)
        finally:
            self.procs.stop("nginx")

    def gunicorn(self, round_no: int) -> None:
        try:
            self.measure("b", start_gunicorn(self.procs), round_no)
        finally:
            self.procs.stop("gunicorn")

    def bare_granian(self, round_no: int) -> None:
        try:
            self.measure("e", start_bare_granian(self.procs, self.tmp, self.bootstrap), round_no)
        finally:
            self.procs.stop("bare-granian")

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap if self.broker else "127.0.0.1:9"

    def start_broker(self) -> None:
        if self.broker is None:
            self.broker = LocalKafka(self.tmp / "kafka", partitions=4)
        self.broker.start()
        ensure_topics(self.broker.bootstrap, 4)

    def opentrack(self, round_no: int, targets: str) -> None:
        """c then d on one web process: d needs the producer c connected, as in production
        when the broker goes away under a running server."""
        assert self.broker is not None
        if self.broker.process is None:
            self.start_broker()
        web = start_web(self.procs, self.tmp / "opentrack", self.broker.bootstrap)
        try:
            tag = uuid.uuid4().hex[:8]
            warm_url = web.register(f"bench-warm-{tag}")
            if self.args.warmup > 0:
                wrk(warm_url, self.args, self.args.warmup, self.tmp / "logs" / "wrk.log")
            # The first events of a new process are spooled before its producer connects and
            # sent again as a whole segment: let that finish so (c) measures the steady state.
            deadline = time.monotonic() + 30
            while web.spool_files() and time.monotonic() < deadline:
                time.sleep(0.2)
            if "c" in targets:
                self.pixel_phase("c", web, f"bench-c-{round_no}-{tag}", round_no)
            if "d" in targets:
                self.pixel_phase("d", web, f"bench-d-{round_no}-{tag}", round_no)
        finally:
            self.procs.stop("opentrack-web")

    def pixel_phase(self, key: str, web: Web, email_id: str, round_no: int) -> None:
        assert self.broker is not None
        url = web.register(email_id)
        start = end_offsets(self.broker.bootstrap)
        time.sleep(0.5)  # let the warm-up's last requests be counted before the baseline
        before = web.counted()
        if key == "d":
            self.broker.stop()
        result = self.run_wrk(key, url, round_no)
        if key == "d":
            time.sleep(0.5)
            spool = web.spool_files()
            size = sum(p.stat().st_size for p in spool if p.exists())
            print(f"    spool while the broker is down: {len(spool)} files, {size:,} bytes; "
                  "starting the broker again", flush=True)
            self.start_broker()
        line = verify(f"{key}, round {round_no}", web, self.broker.bootstrap, email_id, start,
                      result.requests, before, self.args.drain_timeout)
        self.deliveries.append(line)
        print(f"    {line}", flush=True)


# -- report ------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(bench: Bench) -> None:
    res = bench.results
    runs = max((len(v) for v in res.values()), default=0)
    pace = f", paced to ~{bench.args.rate:g} req/s" if bench.args.rate else ""
    print(f"\nMedians over {runs} run(s); wrk {bench.args.connections} connections, "
          f"{bench.args.threads} threads, {bench.args.duration:g} s{pace}, loopback, "
          f"{os.cpu_count()} CPUs shared by wrk and the servers\n")
    print(f"{'':2}{'target':<32}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'us/req':>8}"
          f"{'other':>7}   req/s per run")
    for key, name in TARGETS.items():
        if key not in res:
            continue
        rs = res[key]
        per_run = " ".join(f"{r.rps:,.0f}" for r in rs)
        errors = sum(r.errors + r.non2xx for r in rs)
        note = f"  ({errors} errors/non-2xx)" if errors else ""
        print(f"{key:<2}{name:<32}{median([r.rps for r in rs]):>10,.0f}"
              f"{median([r.p50_ms for r in rs]):>9.2f}{median([r.p99_ms for r in rs]):>9.2f}"
              f"{median([r.server_cpu_us for r in rs]):>8.0f}"
              f"{median([r.other_load for r in rs]):>7.2f}   {per_run}{note}")
    print("us/req: CPU time of the server processes (the broker too, for c) per request, wrk"
          " excluded;\nother: CPUs' worth of work by processes this benchmark did not start"
          " during the load\n(above ~0.2 req/s and latencies are skewed; us/req much less so)\n")
    for num, den in (("c", "a"), ("c", "b"), ("c", "e")):
        if bench.args.rate:
            print("throughput ratios: not with --rate (every target gets the same paced load)")
            break
        if num in res and den in res:
            ratio = median([r.rps for r in res[num]]) / median([r.rps for r in res[den]])
            target = MIN_RATIO.get(f"{num}/{den}")
            verdict = (f"target >= {target:.2f}  {'PASS' if ratio >= target else 'FAIL'}"
                       if target is not None else "")
            print(f"{num}/{den} = {ratio:5.2f}   {verdict}")
    for key in ("c", "d"):
        if key in res:
            p99 = median([r.p99_ms for r in res[key]])
            print(f"p99({key}) = {p99:.2f} ms   target < {MAX_P99_MS:.0f} ms  "
                  f"{'PASS' if p99 < MAX_P99_MS else 'FAIL'}")
    if bench.deliveries:
        print()
        for line in bench.deliveries:
            print(line)


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds of a..e (default 3)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per load (default 10)")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--warmup", type=float, default=2,
                        help="seconds of unmeasured load before each target (default 2; 0: none)")
    parser.add_argument("--rate", type=float, default=0,
                        help="pace wrk to about this many req/s in total (default 0: as fast as "
                             "the server goes); for latency below saturation")
    parser.add_argument("--targets", default="abcde",
                        help="which of a b c d e to run, e.g. 'ce' (default abcde)")
    parser.add_argument("--drain-timeout", type=float, default=120,
                        help="seconds to wait for Kafka to hold every event (default 120)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (logs, broker data) and print its path")
    args = parser.parse_args(argv)
    if set(args.targets) - set(TARGETS) or not args.targets:
        parser.error(f"--targets takes letters of {''.join(TARGETS)}")
    if args.runs < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1:
        parser.error("--runs, --duration, --connections and --threads must be positive")
    if args.rate < 0:
        parser.error("--rate must be positive (or 0 for no pacing)")
    return args


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    def raise_(*_: object) -> None:
        raise Interrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, raise_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_tools(targets: str) -> None:
    missing = [tool for tool in ("wrk",) if shutil.which(tool) is None]
    if "a" in targets and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        missing.append("nginx (nginx-light)")
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; apt-get install -y wrk nginx-light")
    if "b" in targets:
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            sys.exit(f"gunicorn is missing: {sys.executable} -m pip install gunicorn")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args.targets)
    tmp = Path(tempfile.mkdtemp(prefix="opentrack-bench-pixel-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    bench = Bench(args, tmp, procs)
    ok = False
    print(f"temporary folder: {tmp}", flush=True)
    try:
        with sigterm_as_exception():
            if set(args.targets) & set("cd"):
                print("starting the local Kafka broker…", flush=True)
                bench.start_broker()
            for round_no in range(1, args.runs + 1):
                print(f"round {round_no} of {args.runs}", flush=True)
                if "a" in args.targets:
                    bench.nginx(round_no)
                if "b" in args.targets:
                    bench.gunicorn(round_no)
                if set(args.targets) & set("cd"):
                    bench.opentrack(round_no, args.targets)
                if "e" in args.targets:
                    bench.bare_granian(round_no)
            report(bench)
            ok = True
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; stopping everything", file=sys.stderr)
        if bench.results:
            report(bench)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip clean-up
        procs.stop_all()
        if bench.broker is not None:
            bench.broker.stop()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and data kept in {tmp}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
