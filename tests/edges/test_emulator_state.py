"""The emulator's state machines on a manual clock (no threads, no hosts), and the in-process
``Emulator`` with its ``Control``."""

from __future__ import annotations

import pytest
from fake_gcp import create_node, delete_node, make_tpu_client, node_spec, wait_hosts
from google.cloud.tpu_v2.types import cloud_tpu

from fray_tpu.emulator import Emulator, EmulatorTimings
from fray_tpu.emulator.state import IpAllocator, Stockout, World
from fray_tpu.emulator.validation import ApiError

PARENT = "projects/p/locations/us-west4-a"
TIMINGS = EmulatorTimings(
    create_delay=10, delete_delay=5, operation_lag=3, qr_wait_delay=20, qr_provision_delay=30, stockout_delay=7
)


class ManualClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def world(clock) -> World:
    return World(TIMINGS, IpAllocator(42), clock=clock, wall_clock=lambda: 1_700_000_000.0)


def node(accelerator_type: str = "v5litepod-16"):
    return cloud_tpu.Node.pb()(accelerator_type=accelerator_type, runtime_version="v2-alpha-tpuv5-lite")


def at(world: World, clock: ManualClock, seconds: float):
    clock.now += seconds
    return world.advance()


def test_node_becomes_ready_at_create_delay_and_operation_lags(world, clock):
    operation = world.create_node(PARENT, "n", node())
    assert world.next_due() == clock.now + 10
    assert at(world, clock, 9.9) == [] and world.get_node(f"{PARENT}/nodes/n").state == "CREATING"
    [boot] = at(world, clock, 0.1)
    record = world.get_node(f"{PARENT}/nodes/n")
    assert record.state == "READY" and boot.kind == "boot" and boot.boot.ips == record.ips
    assert [ip.split(".")[:2] for ip in record.ips] == [["127", "42"]] * 4 and len(set(record.ips)) == 4
    assert not operation.done
    at(world, clock, 3)
    assert operation.done and operation.error is None and operation.response.state == cloud_tpu.Node.State.READY
    assert world.next_due() is None


def test_delete_kills_hosts_then_node_is_gone_after_delete_delay(world, clock):
    world.create_node(PARENT, "n", node())
    at(world, clock, 10)
    delete = world.delete_node(f"{PARENT}/nodes/n")
    [kill] = world.advance()
    assert kill.kind == "kill" and world.get_node(f"{PARENT}/nodes/n").state == "DELETING"
    at(world, clock, 5)
    assert delete.done and f"{PARENT}/nodes/n" not in world.nodes


def test_stockout_fails_operation_with_code_8_after_its_delay(world, clock):
    world.stockouts["us-west4-a"] = Stockout(remaining=None, delay=None)
    operation = world.create_node(PARENT, "n", node())
    at(world, clock, 7)
    assert operation.done and operation.error[0] == 8 and "no more capacity" in operation.error[1]
    assert world.nodes == {}


def test_preemption_flags_hosts_before_killing_them(world, clock):
    world.timings = world.timings.replaced(preempt_notice=2)
    world.create_node(PARENT, "n", node())
    at(world, clock, 10)
    world.preempt_node("n")
    assert [e.kind for e in world.advance()] == ["preempt_flag"]
    assert [e.kind for e in at(world, clock, 2)] == ["kill"]
    assert world.get_node(f"{PARENT}/nodes/n").state == "PREEMPTED"


def test_queued_resource_walks_waiting_provisioning_active(world, clock):
    queued = cloud_tpu.QueuedResource.pb()()
    spec = queued.tpu.node_spec.add(parent=PARENT, node=node("v5litepod-8"))
    spec.multislice_params.node_count = 2
    world.create_queued_resource(PARENT, "qr", queued)
    name = f"{PARENT}/queuedResources/qr"
    assert world.get_queued_resource(name).state == "WAITING_FOR_RESOURCES"
    at(world, clock, 20)
    assert world.get_queued_resource(name).state == "PROVISIONING"
    assert sorted(n.node_id for n in world.nodes.values()) == ["qr-0", "qr-1"]
    at(world, clock, 30)
    assert world.get_queued_resource(name).state == "ACTIVE"
    with pytest.raises(ApiError) as refused:
        world.delete_queued_resource(name, force=False)
    assert refused.value.code_name == "FAILED_PRECONDITION"


def test_hold_stops_the_clock_for_matching_resources_only(world, clock):
    world.holds.add("held")
    world.create_node(PARENT, "held-1", node())
    world.create_node(PARENT, "free-1", node())
    at(world, clock, 100)
    assert world.get_node(f"{PARENT}/nodes/held-1").state == "CREATING"
    assert world.get_node(f"{PARENT}/nodes/free-1").state == "READY"
    world.holds.clear()
    at(world, clock, 0)
    assert world.get_node(f"{PARENT}/nodes/held-1").state == "READY"


def test_in_process_emulator_with_control(tmp_path):
    with Emulator(timings=EmulatorTimings.zero(), root=tmp_path) as emulator:
        client = make_tpu_client(emulator.endpoint)
        created = create_node(client, PARENT, "inproc", node_spec("v5litepod-8", "sleep 300"))
        [host] = wait_hosts(emulator.control, created.name, lambda hs: all(h["alive"] for h in hs), "alive")
        assert host["ip"] == created.network_endpoints[0].ip_address
        assert emulator.control.counters()["CreateNode"] == 1
        delete_node(client, created.name)
        assert emulator.control.leaks() == {"nodes": [], "queued_resources": []}
        client.transport.close()
