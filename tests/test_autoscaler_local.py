"""The local-process actuator without vLLM: adoption after a restart, level-triggered scaling,
drain order, spot launches that stay pending while the local market has no spot capacity, and
losses counted as preemptions. Stand-in replicas are `sleep` processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest

from services.autoscaler.local import LocalActuator
from spotmesh.processes import pid_alive
from spotmesh.statedir import ManagedReplica


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def sleepers():
    procs = []

    def make() -> subprocess.Popen:
        p = subprocess.Popen(["sleep", "600"], start_new_session=True)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def seed(tmp_path, *instances: ManagedReplica, desired=None) -> None:
    from dataclasses import asdict

    (tmp_path / "autoscaler").mkdir(parents=True, exist_ok=True)
    (tmp_path / "autoscaler" / "instances.json").write_text(json.dumps({
        "instances": [asdict(m) for m in instances], "desired": desired or {},
        "next_index": len(instances)}))


def ready(tmp_path, m: ManagedReplica) -> ManagedReplica:
    f = tmp_path / f"{m.name}.ready"
    f.write_text(json.dumps({"address": f"127.0.0.1:{1000 + m.pid % 1000}"}))
    m.ready_file = str(f)
    return m


def test_a_restarted_actuator_adopts_live_replicas_and_publishes_them(tmp_path, sleepers):
    a, b = sleepers(), sleepers()
    seed(tmp_path, ready(tmp_path, ManagedReplica("od-0", "on-demand", 1.0, pid=a.pid)),
         ready(tmp_path, ManagedReplica("spot-1", "spot", 2.0, pid=b.pid)),
         desired={"on-demand": 1, "spot": 1})
    act = LocalActuator(tmp_path, [])
    obs = run(act.observe())
    assert {(i.name, i.state) for i in obs.instances} == {("od-0", "ready"), ("spot-1", "ready")}
    assert obs.desired == {"on-demand": 1, "spot": 1}
    assert len(json.loads((tmp_path / "replicas.json").read_text())) == 2
    # The same desired state again: nothing starts, nothing stops.
    run(act.apply({"on-demand": 1, "spot": 1}, []))
    assert pid_alive(a.pid) and pid_alive(b.pid)


def test_shrinking_drains_the_named_replica_first(tmp_path, sleepers):
    procs = [sleepers() for _ in range(3)]
    seed(tmp_path, *(ready(tmp_path, ManagedReplica(f"spot-{i}", "spot", float(i), pid=p.pid))
                     for i, p in enumerate(procs)))
    act = LocalActuator(tmp_path, [])
    run(act.observe())
    run(act.apply({"spot": 2}, ["spot-0"]))
    procs[0].wait(10)
    assert procs[0].returncode == -signal.SIGTERM  # drained, not killed
    assert procs[1].poll() is None and procs[2].poll() is None
    obs = run(act.observe())
    assert {i.name for i in obs.instances} == {"spot-1", "spot-2"}
    assert obs.preemptions == 0  # it went because it was asked to


def test_spot_launches_stay_pending_while_the_market_has_none(tmp_path):
    (tmp_path / "autoscaler").mkdir()
    (tmp_path / "autoscaler" / "market.json").write_text(json.dumps({"unavailable_until": 1e12}))
    act = LocalActuator(tmp_path, [])
    run(act.apply({"spot": 1}, []))
    obs = run(act.observe())
    assert [(i.pool, i.state) for i in obs.instances] == [("spot", "pending")]
    assert obs.spot_available is False
    assert act.instances[obs.instances[0].name].pid == 0  # nothing launched
    # Giving up on it removes the open request.
    run(act.apply({"spot": 0}, [obs.instances[0].name]))
    assert run(act.observe()).instances == []


def test_a_replica_that_dies_unasked_is_a_preemption_and_a_notice_counts_once(tmp_path,
                                                                              sleepers):
    a, b = sleepers(), sleepers()
    seed(tmp_path, ready(tmp_path, ManagedReplica("spot-0", "spot", 1.0, pid=a.pid)),
         ready(tmp_path, ManagedReplica("spot-1", "spot", 2.0, pid=b.pid)))
    act = LocalActuator(tmp_path, [])
    run(act.observe())
    (tmp_path / "autoscaler" / "notices").mkdir()
    (tmp_path / "autoscaler" / "notices" / "spot-0").write_text("{}")
    obs = run(act.observe())
    assert obs.preemptions == 1
    assert next(i for i in obs.instances if i.name == "spot-0").state == "draining"
    a.kill()
    a.wait()
    b.kill()
    b.wait()
    obs = run(act.observe())
    assert obs.preemptions == 2  # spot-0 once (its notice), spot-1 on dying
    assert obs.instances == []


@pytest.mark.parametrize("argv, field", [
    (["--spot-min", "3", "--spot-max", "1"], "min_replicas"),
    (["--on-demand-floor", "5", "--on-demand-max", "2"], "on_demand_floor"),
    (["--spot-max", "0", "--on-demand-max", "0", "--on-demand-floor", "0"], "max_replicas"),
    (["--interval-seconds", "0"], "--interval-seconds"),
    (["--spot-usd-per-hour", "-1"], "spot_usd_per_hour"),
])
def test_contradictory_config_is_refused_naming_the_field(argv, field, capsys, tmp_path):
    from services.autoscaler.config import parse

    with pytest.raises(SystemExit):
        parse(["--state-dir", str(tmp_path), *argv])
    assert field in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--notice", "-1"], "--notice and --spot-unavailable-for must be >= 0"),
    (["--notice", "10", "--admit-seconds", "11"], "--admit-seconds must be in [0, --notice (10)]"),
    (["--notice", "10", "--admit-seconds", "-1"], "--admit-seconds must be in"),
    ([], "no running replica 'spot-9'"),
])
def test_preempt_refuses_bad_flags_and_unknown_replicas(argv, message, capsys, tmp_path):
    from cli.main import main

    assert main(["--state-dir", str(tmp_path), "preempt", "spot-9", *argv]) == 2
    assert message in capsys.readouterr().err
