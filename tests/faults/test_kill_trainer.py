"""Fault scenarios 2-4 with real processes on loopback: a private `redis-server` (AOF, fsync every second),
`treepo serve --engine scripted` and `treepo train` subprocesses with a tiny byte-vocabulary model.

2. `kill -9` of the trainer between checkpoint and commit, then mid-step (claimed, not trained); `--resume`
   with the default max_staleness: every published tree is trained, none twice.
3. Two trainers in one group (take-overs forced by a 1 s claim idle time): no tree trained twice.
4. `kill -9` of Redis mid-run, restart from its AOF: the service and the trainer carry on by themselves.

"Trained" is read twice: the group's ledger (tree id -> done) and metrics.jsonl (trees_trained of the last
record of every step: a step redone after a crash logs again, and its first training never reached a
checkpoint). Equal counts mean no tree entered two checkpointed steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from tiny_models import byte_model  # tests/ is on sys.path (pytest rootdir imports)

from treepo.client.constants import trained_ledger, trees_stream

pytestmark = pytest.mark.slow

PREFIX = "fault-train"
GROUP = "job"
HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def _wait(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEPO_") and k != "REDIS_URL"}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


class Service:
    """`treepo serve --engine scripted` (the model does not matter here)."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.weights_dir = workdir / "weights"
        self.weights_dir.mkdir(exist_ok=True)
        self.log = (workdir / "serve.log").open("ab")
        env = _env(
            TREEPO_REDIS_URL=redis_url, TREEPO_KEY_PREFIX=PREFIX, TREEPO_WEIGHTS_DIR=str(self.weights_dir)
        )
        command = [str(BIN / "treepo"), "serve", "--engine", "scripted", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--log-level", "warning"], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        _wait(self.ready, "treepo serve to be ready", timeout_s=60)

    def ready(self) -> bool:
        assert self.process.poll() is None, f"treepo serve exited: see {self.log.name}"
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_trainer():
    """A failed test leaves no trainer behind (frozen or running)."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


class Trainer:
    """One `treepo train` process; `fault` = "<point>:<step>" makes it kill -9 itself there (":stop":
    freeze)."""

    def __init__(self, service: Service, redis_url: str, run_dir: Path, model: Path, *options: str,
                 fault: str | None = None, resume: bool = False) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.log_path = run_dir.with_suffix(".log")
        args = {
            "--model-path": model, "--service-url": service.url, "--redis-url": redis_url,
            "--key-prefix": PREFIX, "--group": GROUP, "--output-dir": run_dir,
            "--weights-dir": service.weights_dir, "--torch-threads": 1, "--lr": 1e-3, "--warmup-steps": 0,
            "--prompts-per-step": 2, "--mini-batch-prompts": 2, "--width": 4, "--branch": 2,
            "--segment-tokens": 6, "--max-depth": 3, "--reward": "fault_rewards:coin_reward",
            "--checkpoint-every": 1,
        }  # fmt: skip
        command = [str(BIN / "treepo"), "train", *(str(x) for kv in args.items() for x in kv), *options]
        extra = {"PYTHONPATH": str(HERE)}
        if fault:
            extra["TREEPO_TRAINER_FAULT"] = fault
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command + (["--resume"] if resume else []), env=_env(**extra),
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _STARTED.append(self.process)

    def wait(self, timeout_s: float = 240) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"treepo train did not finish; see {self.log_path}") from None

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:]


@pytest.fixture
def model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 over the scripted service's byte vocabulary."""
    return byte_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def db(private_redis):
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def service(private_redis, tmp_path):
    started = Service(private_redis.url, tmp_path)
    yield started
    started.stop()


def _final_steps(*runs: list[dict]) -> tuple[int, int]:
    """(trees trained in checkpointed steps, trees trained in steps a crash made redo) of one lineage."""
    last: dict[int, dict] = {}
    redone = 0
    for records in runs:
        for record in records:
            if record["step"] in last:
                redone += last[record["step"]]["trees_trained"]
            last[record["step"]] = record
    return sum(r["trees_trained"] for r in last.values()), redone


def _ledger_done(db: redis.Redis) -> int:
    return sum(state == "done" for state in db.hvals(trained_ledger(GROUP, PREFIX)))


def _group(db: redis.Redis) -> dict:
    return next(g for g in db.xinfo_groups(trees_stream(PREFIX)) if g["name"] == GROUP)


def _published(db: redis.Redis) -> int:
    return int(db.xinfo_stream(trees_stream(PREFIX))["entries-added"])


LOCKSTEP = ("--deterministic", "--no-dynamic-filter")  # every published tree is meant to be trained


def test_kill_9_of_the_trainer_then_resume_trains_every_tree_once(
    service, private_redis, db, model, tmp_path
):
    url, run = private_redis.url, tmp_path / "run"

    def train(fault: str | None, resume: bool = True) -> Trainer:
        trainer = Trainer(service, url, run, model, "--steps", "6", *LOCKSTEP, fault=fault, resume=resume)
        assert trainer.wait() == (0 if fault is None else -signal.SIGKILL), trainer.tail()
        return trainer

    train("commit:2", resume=False)  # between checkpoint and commit (XACK)
    assert _ledger_done(db) == 2, "step 2 was checkpointed, not committed"
    train("train:4")  # mid-step: step 4's trees claimed in the ledger, not trained
    assert db.xpending(trees_stream(PREFIX), GROUP)["pending"] == 2, "step 4's trees wait for the resume"
    train("checkpoint:5")  # mid-step: step 5 trained and logged, its checkpoint not written
    last = train(None)

    records = last.records()  # every process appended to the run directory's metrics.jsonl
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6], "only step 5 was trained twice..."
    trained, redone = _final_steps(records)
    published = _published(db)
    assert trained == 12 and redone == 2, "...and its first training never reached a checkpoint"
    assert _ledger_done(db) == trained == published, "every published tree trained, none twice"
    assert db.xpending(trees_stream(PREFIX), GROUP)["pending"] == 0
    assert _group(db)["lag"] == 0
    assert sum(r["stale_trees"] + r["duplicate_trees"] for r in records) == 0, "none dropped as stale"
    print(f"scenario 2: published {published}, trained {trained}, twice 0, redone {redone}")


def test_two_trainers_in_one_group_never_train_a_tree_twice(service, private_redis, db, model, tmp_path):
    # Trainer a freezes (SIGSTOP) holding trees it read but has not claimed; after claim_idle_s the live
    # trainer b takes them over (XAUTOCLAIM) and trains them; a, thawed, must be fenced out of them.
    # No weight pushes: two trainers of one job would not both push to one service.
    options = ("--max-staleness", "100", "--claim-idle-s", "1", "--inflight-batches", "1",
               "--push-every", "0")  # fmt: skip
    a = Trainer(service, private_redis.url, tmp_path / "a", model, "--consumer", "a", "--steps", "4", *options,
                fault="claim:2:stop")  # fmt: skip
    stream = trees_stream(PREFIX)

    def held_by_a() -> int:
        return sum(c["pending"] for c in db.xinfo_consumers(stream, GROUP) if c["name"] == "a")

    try:
        _wait(lambda: _state(a.process.pid) == "T", "trainer a to freeze before its claim", timeout_s=120)
        assert held_by_a() > 0
        b = Trainer(
            service, private_redis.url, tmp_path / "b", model, "--consumer", "b", "--steps", "6", *options
        )
        _wait(lambda: held_by_a() == 0 or b.process.poll() is not None, "b to take a's trees", timeout_s=120)
        assert held_by_a() == 0, "b ended before it took a's trees over: " + b.tail()
    finally:
        a.process.send_signal(signal.SIGCONT)
    for trainer in (a, b):
        assert trainer.wait() == 0, trainer.tail()
    runs = [a.records(), b.records()]
    assert [[r["step"] for r in records] for records in runs] == [list(range(1, 5)), list(range(1, 7))]
    trained = sum(_final_steps(records)[0] for records in runs)
    fenced = sum(r["fenced_trees"] for r in runs[0])
    assert trained == 20
    assert fenced > 0, "a lost the trees it held while frozen"
    assert _ledger_done(db) == trained, "a tree counted by both trainers appears once in the ledger"
    print(f"scenario 3: published {_published(db)}, trained {trained}, twice 0, fenced out of a {fenced}")


def _state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped...) from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_kill_9_of_redis_mid_run_is_survived(service, private_redis, db, model, tmp_path):
    options = ("--steps", "8", *LOCKSTEP, "--lost-after-s", "3")
    trainer = Trainer(service, private_redis.url, tmp_path / "run", model, *options)
    _wait(lambda: len(trainer.records()) >= 3 or trainer.process.poll() is not None, "step 3", timeout_s=120)
    assert trainer.process.poll() is None, trainer.tail()
    private_redis.kill()
    time.sleep(1.5)  # trainer and service both see Redis gone
    private_redis.start()  # same port and directory: the AOF is replayed
    assert trainer.wait() == 0, trainer.tail()
    _wait(service.ready, "the service to be ready again", timeout_s=30)

    records = trainer.records()
    assert [r["step"] for r in records] == list(range(1, 9)), "no step redone, none skipped"
    trained, redone = _final_steps(records)
    assert _ledger_done(db) == trained == 16, "none twice: commits lost with the AOF's last second redone"
    assert db.xpending(trees_stream(PREFIX), GROUP)["pending"] == 0
    group = _group(db)
    unread = db.xrange(trees_stream(PREFIX), f"({group['last-delivered-id']}", "+")
    assert group["entries-read"] is not None and group["lag"] == len(unread), "lag right after the AOF reload"
    ledger = db.hgetall(trained_ledger(GROUP, PREFIX))
    unread_ids = [json.loads(fields["tree"])["tree_id"] for _, fields in unread]
    published = _published(db)
    print(f"scenario 4: published {published}, trained {trained}, twice 0, redone {redone}, "
          f"unread after the run {len(unread)} (of them already trained: "
          f"{sum(ledger.get(t) == 'done' for t in unread_ids)})")  # fmt: skip
