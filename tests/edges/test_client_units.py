"""Fast checks of the Client API's pure parts: request translation and the actor server's guards."""

from __future__ import annotations

import pytest

from fray_tpu.actors import link as links
from fray_tpu.actors.rpc import ClusterCredentials, RpcClient
from fray_tpu.actors.serving import ActorServer
from fray_tpu.client_api import ActorUnavailableError, Entrypoint, JobRequest, ResourceConfig
from fray_tpu.client_requests import TASK_MAIN, placement, translate
from fray_tpu.contract import ACTOR_PORTS, HOST_IP_ENV, RUNNER_TASK_MAIN_ENV
from fray_tpu.errors import ConfigError


class Seconds:
    """Anything with to_seconds(), as Marin's Duration."""

    def to_seconds(self) -> float:
        return 3.0


def request(**fields) -> JobRequest:
    return JobRequest(name="units", entrypoint=Entrypoint.from_callable(print), **fields)


def test_with_tpu_slices_become_the_controllers_replicas():
    """with_tpu('v5litepod-16', slice_count=3) is 12 tasks = 3 slices; the callable is wrapped."""
    translated = translate(request(resources=ResourceConfig.with_tpu("v5litepod-16", slice_count=3)), {"A": "1"})
    assert translated.tasks == 12 and translated.tpu_type == "v5litepod-16"
    assert translated.request.resources.replicas == 3
    assert translated.request.environment.env_vars["A"] == "1"
    assert translated.request.environment.env_vars[RUNNER_TASK_MAIN_ENV] == TASK_MAIN


def test_request_replicas_win_over_the_resources():
    translated = translate(request(resources=ResourceConfig.with_tpu("v5litepod-16"), replicas=8), {})
    assert translated.request.resources.replicas == 2


def test_timeout_accepts_seconds_and_durations():
    assert translate(request(timeout=Seconds()), {}).timeout == 3.0
    assert translate(request(timeout=2), {}).timeout == 2.0
    with pytest.raises(ValueError, match="timeout"):
        translate(request(timeout="soon"), {})


def test_placement_of_regions_and_zone():
    assert placement(ResourceConfig(regions=["*"])) is None
    assert placement(ResourceConfig(regions=["us-central2"], zone="us-central2-b")) == ["us-central2-b"]
    assert placement(ResourceConfig(zone="europe-west4-a")) == ["europe-west4-a"]
    with pytest.raises(ConfigError, match="regions must be a list"):
        placement(ResourceConfig(regions="us-central2"))


def test_the_controllers_variables_override_the_users():
    """The task env the controller adds (FRAY_BACKEND, its address) wins; other user variables stay."""
    from fray_tpu.client_api import create_environment

    env = create_environment(env_vars={"FRAY_BACKEND": "mine", "X": "y"})
    translated = translate(request(environment=env), {"FRAY_BACKEND": "tpu"})
    assert translated.request.environment.env_vars["FRAY_BACKEND"] == "tpu"
    assert translated.request.environment.env_vars["X"] == "y"


class Target:
    def ping(self) -> str:
        return "pong"


def test_actor_server_refuses_calls_meant_for_another_endpoint():
    """A stale address that now serves another actor answers ActorUnavailableError, not that actor."""
    credentials = ClusterCredentials.create()
    server = ActorServer(Target(), "group/target-0", credentials, "127.0.0.1", 1)
    try:
        rpc = RpcClient(server.address, credentials)
        assert rpc.invoke("group/target-0", ("ping",), {}, timeout=10) == "pong"
        with pytest.raises(ActorUnavailableError, match="not served here"):
            rpc.invoke("group/other-0", ("ping",), {}, timeout=10)
        with pytest.raises(AttributeError, match="private"):
            rpc.invoke("group/target-0", ("__class__",), {}, timeout=10)
    finally:
        server.stop()


def test_max_concurrency_must_be_positive():
    with pytest.raises(ValueError, match="max_concurrency"):
        ActorServer(Target(), "g/t-0", ClusterCredentials.create(), "127.0.0.1", 0)


def test_actor_servers_on_a_tpu_vm_take_the_fixed_actor_ports_first(monkeypatch):
    """On a TPU VM an actor server listens at the first free actor port (a firewall can open
    them to a driver outside the VPC), then at any port once they are all taken; elsewhere at
    any port. A port freed is taken again."""
    host = "127.203.0.1"
    credentials = ClusterCredentials.create()
    assert links.listen_ports() == (0,)
    monkeypatch.setenv(HOST_IP_ENV, host)
    servers = [ActorServer(Target(), f"g/t-{i}", credentials, links.advertise_host(), 1, ports=links.listen_ports())
               for i in range(len(ACTOR_PORTS) + 1)]
    try:
        ports = [int(server.address.rsplit(":", 1)[1]) for server in servers]
        assert all(server.address.startswith(f"{host}:") for server in servers)
        assert ports[:-1] == list(ACTOR_PORTS) and ports[-1] not in ACTOR_PORTS
        servers.pop(1).stop()
        again = ActorServer(Target(), "g/again", credentials, host, 1, ports=links.listen_ports())
        servers.append(again)
        assert again.address == f"{host}:{ACTOR_PORTS[1]}"
        assert RpcClient(again.address, credentials).invoke("g/again", ("ping",), {}, timeout=10) == "pong"
    finally:
        for server in servers:
            server.stop()
