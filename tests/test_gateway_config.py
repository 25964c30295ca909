"""The gateway's config rendering in-process: weights, pools and replica addresses as nginx gets them."""
from __future__ import annotations

import re
import sys

import pytest

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
import gateway  # noqa: E402
from gateway import Gateway, GatewayConfigError, Pool, pools_from_env, render  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving.protocol import MAX_BODY_BYTES  # noqa: E402

CANARY_ENV = {"UPSTREAM_BLUE": "s-serving-blue-0:8080,s-serving-blue-1:8080", "UPSTREAM_GREEN": "s-serving-green-0:8080",
              "WEIGHT_BLUE": "80", "WEIGHT_GREEN": "20"}


def test_pools_come_from_the_environment_the_component_sets():
    assert pools_from_env(CANARY_ENV) == [
        Pool("blue", 80, ("s-serving-blue-0:8080", "s-serving-blue-1:8080")),
        Pool("green", 20, ("s-serving-green-0:8080",)),
    ]


@pytest.mark.parametrize("change, error", [
    ({"WEIGHT_GREEN": "30"}, "WEIGHT_BLUE + WEIGHT_GREEN must add up to 100, got 80 + 30"),
    ({"UPSTREAM_GREEN": ""}, "WEIGHT_GREEN is 20 but UPSTREAM_GREEN lists no replica"),
    ({"WEIGHT_BLUE": "eighty"}, "WEIGHT_BLUE must be an integer 0..100, got 'eighty'"),
    ({"UPSTREAM_BLUE": "s-serving-blue-0"}, "UPSTREAM_BLUE entry 's-serving-blue-0' is not host:port"),
])
def test_inconsistent_environments_are_refused_with_the_reason(change, error):
    with pytest.raises(GatewayConfigError) as refused:
        pools_from_env({**CANARY_ENV, **change})
    assert str(refused.value) == error


def test_render_splits_by_weight_and_lists_resolved_replicas_by_address():
    config = render(pools_from_env(CANARY_ENV), {"s-serving-blue-0:8080": ("172.20.0.5:8080",),
                                                 "s-serving-green-0:8080": ("172.20.0.7:8080",)})
    assert "@@UPSTREAMS@@" not in config and "@@SPLIT@@" not in config
    assert "        80% blue;\n        * green;\n" in config
    blue = config.split("upstream blue {")[1].split("}")[0]
    assert "server 172.20.0.5:8080 max_fails=1 fail_timeout=5s;" in blue
    assert "s-serving-blue-1" not in config, "an unresolved replica would stop nginx from starting"
    assert "keepalive 64;" in blue
    assert "proxy_next_upstream error timeout http_500 http_502 http_503 non_idempotent;" in config


def test_bodies_stay_in_memory_and_the_gateway_refuses_what_the_replicas_would():
    config = render(pools_from_env(CANARY_ENV), {})
    assert "client_max_body_size 1m;" in config and "client_body_buffer_size 1m;" in config
    assert MAX_BODY_BYTES == 1024 * 1024
    assert "proxy_max_temp_file_size 0;" in config


def test_only_the_v2_api_is_routed():
    api = re.search(r"location ~ (\S+) \{", render(pools_from_env(CANARY_ENV), {}))[1]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/iris", "/v2/models/iris/ready",
                 "/v2/models/iris/infer", "/v2/models/iris/versions/3", "/v2/models/iris/versions/3/infer"):
        assert re.match(api, path), path
    for path in ("/metrics", "/v2/repository/models/iris/unload", "/v2/models/iris/docs", "/v2/docs", "/docs",
                 "/v2/models/iris/infer_stream", "/v2/health/live/x"):
        assert not re.match(api, path), path


def test_a_pool_with_no_resolved_replica_answers_502_instead_of_failing_to_start():
    config = render(pools_from_env({"UPSTREAM_BLUE": "s-serving-blue-0:8080", "WEIGHT_BLUE": "100"}), {})
    assert "upstream blue {\n        server 127.0.0.1:9 down;" in config
    assert "        * blue;\n" in config and "% blue" not in config


def test_nginx_is_reloaded_only_when_a_replica_first_resolves_or_moves(monkeypatch, tmp_path):
    dns = {"s-serving-blue-0:8080": ("172.20.0.5:8080",)}
    monkeypatch.setattr(gateway, "resolve", dns.get)
    running = Gateway(pools_from_env(CANARY_ENV), runtime_dir=tmp_path)
    assert running.refresh_addresses() is True
    assert running.refresh_addresses() is False
    dns["s-serving-blue-1:8080"] = ("172.20.0.6:8080",)
    assert running.refresh_addresses() is True
    del dns["s-serving-blue-0:8080"]  # stopped: nginx's failure handling skips it, no reload needed
    assert running.refresh_addresses() is False
    assert running.addresses["s-serving-blue-0:8080"] == ("172.20.0.5:8080",)
    dns["s-serving-blue-0:8080"] = ("172.20.0.9:8080",)  # replaced at a new address
    assert running.refresh_addresses() is True
    running.write_config()
    assert "server 172.20.0.9:8080" in (tmp_path / "nginx.conf").read_text()


def test_a_swarm_task_set_follows_its_tasks_as_they_come_and_go(monkeypatch, tmp_path):
    tasks = "tasks.s-serving-blue:8080"
    dns = {tasks: ("10.0.1.5:8080", "10.0.1.6:8080")}
    monkeypatch.setattr(gateway, "resolve", dns.get)
    running = Gateway(pools_from_env({"UPSTREAM_BLUE": tasks, "WEIGHT_BLUE": "100"}), runtime_dir=tmp_path)
    assert running.refresh_addresses() is True
    running.write_config()
    blue = (tmp_path / "nginx.conf").read_text().split("upstream blue {")[1].split("}")[0]
    assert "server 10.0.1.5:8080 " in blue and "server 10.0.1.6:8080 " in blue
    dns[tasks] = ("10.0.1.6:8080", "10.0.1.9:8080")  # a task rescheduled onto another node
    assert running.refresh_addresses() is True
    running.write_config()
    blue = (tmp_path / "nginx.conf").read_text().split("upstream blue {")[1].split("}")[0]
    assert "10.0.1.5:8080" not in blue and "server 10.0.1.9:8080 " in blue
    assert running.refresh_addresses() is False


def test_resolve_returns_every_address_of_a_name(monkeypatch):
    answers = [(2, 1, 6, "", ("10.0.1.7", 8080)), (2, 1, 6, "", ("10.0.1.5", 8080)), (2, 1, 6, "", ("10.0.1.7", 8080))]
    monkeypatch.setattr(gateway.socket, "getaddrinfo", lambda *args: answers)
    assert gateway.resolve("tasks.s-serving-blue:8080") == ("10.0.1.5:8080", "10.0.1.7:8080")
