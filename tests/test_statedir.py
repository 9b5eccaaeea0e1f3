"""The local state directory's format: the files the supervisor, the local actuator,
`spotmesh preempt` and `spotmesh status` share, written by one module and pinned here."""

from __future__ import annotations

import json
import stat

from spotmesh.statedir import (
    AutoscalerRecord,
    ManagedReplica,
    MeshState,
    ProcessInfo,
    Ready,
    StateDir,
    read_dev_key,
    state_dir,
)


def test_the_layout_is_the_documented_one(tmp_path):
    sd = StateDir(tmp_path)
    assert sd.mesh_file == tmp_path / "mesh.json"
    assert sd.keys_file == tmp_path / "keys.toml"
    assert sd.replicas_file == tmp_path / "replicas.json"
    assert sd.ready_file("od-0") == tmp_path / "run" / "od-0.json"
    assert sd.log_file("gateway") == tmp_path / "logs" / "gateway.log"
    assert sd.instances_file == tmp_path / "autoscaler" / "instances.json"
    assert sd.market_file == tmp_path / "autoscaler" / "market.json"
    assert sd.semantic_cache_uri == str(tmp_path / "cache" / "milvus.db")


def test_where_the_state_directory_is(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTMESH_STATE_DIR", str(tmp_path / "a"))
    assert state_dir() == tmp_path / "a"
    assert state_dir(str(tmp_path / "b")) == tmp_path / "b"
    monkeypatch.delenv("SPOTMESH_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state_dir() == tmp_path / "x" / "spotmesh" / "default"


def test_mesh_state_round_trips_and_clears(tmp_path):
    sd = StateDir(tmp_path)
    assert sd.load_mesh() is None
    state = MeshState(supervisor_pid=42, api_keys="k.toml", processes=[
        ProcessInfo("gateway", "", 7, "127.0.0.1:1", "", metrics="127.0.0.1:2")])
    sd.save_mesh(state)
    assert sd.load_mesh() == state
    assert sd.load_mesh().gateway().address == "127.0.0.1:1"
    assert json.loads(sd.mesh_file.read_text())["processes"][0]["role"] == "gateway"
    sd.publish_replicas(["a:1"])
    sd.clear_mesh()
    assert not sd.mesh_file.exists() and not sd.replicas_file.exists()


def test_replicas_are_a_json_list_rewritten_only_when_they_change(tmp_path):
    sd = StateDir(tmp_path)
    assert sd.replicas() == []
    assert sd.publish_replicas(["127.0.0.1:5", "127.0.0.1:6"]) is True
    assert json.loads(sd.replicas_file.read_text()) == ["127.0.0.1:5", "127.0.0.1:6"]
    assert sd.publish_replicas(["127.0.0.1:5", "127.0.0.1:6"]) is False
    assert sd.replicas() == ["127.0.0.1:5", "127.0.0.1:6"]


def test_ready_files_carry_address_metrics_and_pid(tmp_path):
    path = tmp_path / "run" / "x.json"
    assert Ready.read(path) is None
    Ready("127.0.0.1:9", "127.0.0.1:10", 123, 5.0).write(path)
    assert json.loads(path.read_text()) == {"address": "127.0.0.1:9",
                                            "metrics": "127.0.0.1:10", "pid": 123,
                                            "started_at": 5.0}
    path.write_text(json.dumps({"address": "h:1"}))  # what an older writer left
    assert Ready.read(path) == Ready("h:1")


def test_dev_keys_are_private_and_readable_back(tmp_path):
    sd = StateDir(tmp_path)
    key = sd.write_dev_keys()
    assert key.startswith("sk-dev-") and read_dev_key(sd.keys_file) == key
    assert stat.S_IMODE(sd.keys_file.stat().st_mode) == 0o600


def test_cache_tokens_are_made_once_and_kept(tmp_path):
    sd = StateDir(tmp_path)
    first = sd.cache_tokens()
    assert first == StateDir(tmp_path).cache_tokens() and first[0] != first[1]
    assert stat.S_IMODE(sd.cache_tokens_file.stat().st_mode) == 0o600


def test_the_autoscaler_record_round_trips(tmp_path):
    sd = StateDir(tmp_path)
    assert sd.load_autoscaler() is None
    record = AutoscalerRecord(
        instances=[ManagedReplica("spot-0", "spot", 1.0, pid=5, draining=True)],
        desired={"spot": 1}, next_index=1, preemptions=2, last_preemption_at=3.0)
    sd.save_autoscaler(record)
    assert sd.load_autoscaler() == record
    doc = json.loads(sd.instances_file.read_text())
    assert set(doc) == {"instances", "desired", "next_index", "preemptions",
                        "last_preemption_at"}
    sd.clear_autoscaler()
    assert sd.load_autoscaler() is None


def test_the_market_and_reclaim_notices(tmp_path):
    sd = StateDir(tmp_path)
    assert sd.spot_unavailable_until() == 0.0
    sd.make_spot_unavailable(1e12)
    assert json.loads(sd.market_file.read_text()) == {"unavailable_until": 1e12}
    assert sd.spot_unavailable_until() == 1e12
    assert not sd.has_notice("spot-1")
    sd.post_notice("spot-1", 7.0)
    assert sd.has_notice("spot-1")
    assert json.loads((sd.notices_dir / "spot-1").read_text()) == {"at": 7.0}
    sd.clear_notice("spot-1")
    assert not sd.has_notice("spot-1")
