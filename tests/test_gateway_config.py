"""The gateway's config rendering in-process: models, their pools, weights and replica addresses as nginx gets
them, and the environment it refuses."""
from __future__ import annotations

import json
import re
import sys

import pytest

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
import gateway  # noqa: E402
from gateway import Gateway, GatewayConfigError, Pool, ServedModel, models_from_env, render  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving.protocol import MAX_BODY_BYTES  # noqa: E402

IRIS = {"name": "iris", "blue": ["s-serving-blue-0:8080", "s-serving-blue-1:8080"], "green": ["s-serving-green-0:8080"],
        "weights": {"blue": 80, "green": 20}}
DIABETES = {"name": "diabetes", "blue": ["s-diabetes-blue-0:8080"], "green": [], "weights": {"blue": 100, "green": 0}}


def gateway_env(*models: dict) -> dict[str, str]:
    return {"GATEWAY_MODELS": json.dumps(list(models))}


TWO_MODELS = gateway_env(IRIS, DIABETES)


def block(config: str, opening: str) -> str:
    """The body of the block `opening {` of `config`."""
    return config.split(f"{opening} {{\n")[1].split("}")[0]


def test_models_and_their_pools_come_from_the_environment_the_component_sets():
    assert models_from_env(TWO_MODELS) == [
        ServedModel("iris", (Pool("blue", 80, ("s-serving-blue-0:8080", "s-serving-blue-1:8080")),
                             Pool("green", 20, ("s-serving-green-0:8080",)))),
        ServedModel("diabetes", (Pool("blue", 100, ("s-diabetes-blue-0:8080",)), Pool("green", 0, ()))),
    ]


@pytest.mark.parametrize("env, error", [
    (gateway_env({**IRIS, "weights": {"blue": 80, "green": 30}}),
     "GATEWAY_MODELS model iris: the blue and green weights must add up to 100, got 80 + 30"),
    (gateway_env({**IRIS, "green": []}), "GATEWAY_MODELS model iris: the green weight is 20 but green lists no replica"),
    (gateway_env({**IRIS, "weights": {"blue": "eighty", "green": 20}}),
     "GATEWAY_MODELS model iris: the blue weight must be an integer 0..100, got 'eighty'"),
    (gateway_env({**IRIS, "blue": ["s-serving-blue-0"]}),
     "GATEWAY_MODELS model iris: blue replica 's-serving-blue-0' is not host:port"),
    (gateway_env({**IRIS, "name": "iris classifier"}),
     "GATEWAY_MODELS: 'iris classifier' is not a model name (a letter, then at most 63 letters, digits, '_', '.' or '-')"),
    (gateway_env(IRIS, {**DIABETES, "name": "iris"}), "GATEWAY_MODELS lists a model twice: iris, iris"),
    (gateway_env({**IRIS, "weight_green": 20}), "GATEWAY_MODELS model iris must have exactly the keys blue, green, name, "
                                                "rollout, weights (rollout optional), got blue, green, name, weight_green, weights"),
    (gateway_env({**DIABETES, "rollout": {"policy": {}, "green_release": "diabetes:2:"}}),
     "GATEWAY_MODELS model diabetes: a rollout needs green replicas, and green lists none"),
    (gateway_env({**IRIS, "rollout": {"policy": {"steps": [10]}, "green_release": "iris:2:"}}),
     "GATEWAY_MODELS model iris: not a rollout policy: Policy.__init__() missing 5 required positional arguments: "
     "'bake_time_s', 'max_error_rate_increase', 'max_p99_latency_ratio', 'min_requests', and 'check_interval_s'"),
    (gateway_env(), "GATEWAY_MODELS must be a non-empty JSON list of models, got []"),
    ({"GATEWAY_MODELS": "iris"}, "GATEWAY_MODELS is not JSON: Expecting value: line 1 column 1 (char 0)"),
    ({"UPSTREAM_BLUE": "s-serving-blue-0:8080"},
     "GATEWAY_MODELS is not set: it lists, as JSON, the models the gateway routes"),
])
def test_inconsistent_environments_are_refused_with_the_reason(env, error):
    with pytest.raises((GatewayConfigError, gateway.PolicyError)) as refused:
        models_from_env(env)
    assert str(refused.value) == error


def test_an_inconsistent_environment_stops_the_gateway_with_one_line_and_exit_2(monkeypatch, caplog):
    monkeypatch.setattr(gateway.os, "environ", gateway_env({**IRIS, "green": []}))
    with pytest.raises(SystemExit) as stopped:
        gateway.main()
    assert stopped.value.code == 2
    assert [record.getMessage() for record in caplog.records] == [
        "GATEWAY_MODELS model iris: the green weight is 20 but green lists no replica"]


def test_each_model_gets_its_own_pools_split_by_its_own_weights():
    config = render(models_from_env(TWO_MODELS), {"s-serving-blue-0:8080": ("172.20.0.5:8080",),
                                                  "s-serving-green-0:8080": ("172.20.0.7:8080",),
                                                  "s-diabetes-blue-0:8080": ("172.20.0.9:8080",)})
    assert re.search("@@[A-Z_]+@@", config) is None, "a placeholder left"
    iris_blue = block(config, "upstream iris-blue")
    assert "server 172.20.0.5:8080 max_fails=1 fail_timeout=5s;" in iris_blue and "keepalive 64;" in iris_blue
    assert "s-serving-blue-1" not in config, "an unresolved replica would stop nginx from starting"
    assert "server 172.20.0.7:8080 " in block(config, "upstream iris-green")
    assert "server 172.20.0.9:8080 " in block(config, "upstream diabetes-blue")
    assert "server 127.0.0.1:9 down;" in block(config, "upstream diabetes-green")
    assert block(config, 'split_clients "${request_id}" $slot_0') == "        80% blue;\n        * green;\n    "
    assert block(config, 'split_clients "${request_id}" $slot_1') == "        * blue;\n    "
    assert block(config, "map $model $pool") == ('        "~^iris$" $slot_0;\n        "~^diabetes$" $slot_1;\n'
                                                 '        default "";\n    ')
    assert "proxy_pass http://$model-$pool;" in config
    assert "proxy_next_upstream error timeout http_500 http_502 http_503 non_idempotent;" in config


def test_an_unknown_model_is_a_404_from_the_gateway_naming_the_models_it_serves():
    config = render(models_from_env(TWO_MODELS), {})
    location = re.search(r'location ~ "(\S+)" \{\n(.*?)\n        \}', config, re.S)
    assert location[2].strip().startswith('default_type application/json;\n            if ($pool = "") {\n                return 404 \'{"error": "model $model is '
                                          'not served here; models: iris, diabetes"}\';')
    # A model name with characters of a regex matches itself only.
    dotted = render([ServedModel("iris.v2", (Pool("blue", 100, ("s-blue-0:8080",)), Pool("green", 0, ())))], {})
    assert '"~^iris\\.v2$" $slot_0;' in dotted


def test_bodies_stay_in_memory_and_the_gateway_refuses_what_the_replicas_would():
    config = render(models_from_env(TWO_MODELS), {})
    assert "client_max_body_size 1m;" in config and "client_body_buffer_size 1m;" in config
    assert MAX_BODY_BYTES == 1024 * 1024
    assert "proxy_max_temp_file_size 0;" in config
    proxied = config.split("location ~ ")[1].split("location / {")[0]
    for limit in ("limit_conn requests_per_client 32;", "limit_conn requests 256;", "limit_conn large_bodies 32;",
                  "proxy_next_upstream_tries 3;", "error_page 502 @no_replica;", "error_page 413 @too_large;",
                  "error_page 429 @too_many;"):
        assert limit in proxied, limit


def test_only_the_v2_api_is_routed_and_the_server_endpoints_answer_for_the_stage(tmp_path):
    config = render(models_from_env(TWO_MODELS), {}, runtime_dir=tmp_path)
    # PCRE's named groups `(?<name>...)` are Python's `(?P<name>...)`.
    models = re.search(r'location ~ "(\S+)" \{', config)[1].replace("(?<", "(?P<")
    for path in ("/v2/models/iris", "/v2/models/iris/ready", "/v2/models/iris/infer", "/v2/models/iris/versions/3",
                 "/v2/models/iris/versions/3/infer", "/v2/models/unknown/infer"):
        assert re.match(models, path), path
    for path in ("/metrics", "/v2/repository/models/iris/unload", "/v2/models/iris/docs", "/v2/docs", "/docs",
                 "/v2/models/iris/infer_stream", "/v2/health/live/x", '/v2/models/"quoted"/infer'):
        assert not re.match(models, path), path
    assert "location = /v2/health/live {\n            default_type application/json;\n            return 200 '{\"live\": true}';" in config
    assert (f"location = /v2/health/ready {{\n            default_type application/json;\n            if (-f {tmp_path}/ready) "
            f"{{\n                return 200 '{{\"ready\": true}}';\n            }}\n            return 503 ") in config
    metadata = re.search(r"location = /v2 \{.*?return 200 '(.*?)';", config, re.S)[1]
    assert json.loads(metadata) == {"name": "mlops-gateway", "version": "1", "extensions": ["binary_tensor_data"]}


def test_the_stage_is_ready_while_every_model_has_a_ready_replica_in_each_pool_with_traffic(tmp_path):
    running = Gateway(models_from_env(TWO_MODELS), runtime_dir=tmp_path)
    running.addresses = {"s-serving-blue-0:8080": ("172.20.0.5:8080",), "s-serving-green-0:8080": ("172.20.0.7:8080",),
                         "s-diabetes-blue-0:8080": ("172.20.0.9:8080",)}
    ready = {("172.20.0.5:8080", "iris"), ("172.20.0.9:8080", "diabetes")}
    running.probe_readiness(lambda address, model: (address, model) in ready)
    assert not (tmp_path / "ready").exists() and running.unready == {"iris"}, "iris's green gets 20% and is not ready"
    ready.add(("172.20.0.7:8080", "iris"))
    running.probe_readiness(lambda address, model: (address, model) in ready)
    assert (tmp_path / "ready").exists() and running.unready == set()
    ready.discard(("172.20.0.9:8080", "diabetes"))
    running.probe_readiness(lambda address, model: (address, model) in ready)
    assert not (tmp_path / "ready").exists() and running.unready == {"diabetes"}


def test_a_pool_with_no_resolved_replica_answers_502_instead_of_failing_to_start():
    config = render(models_from_env(gateway_env(DIABETES)), {})
    assert "upstream diabetes-blue {\n        server 127.0.0.1:9 down;" in config
    assert "        * blue;\n" in config and "% blue" not in config


def test_nginx_is_reloaded_only_when_a_replica_first_resolves_or_moves(monkeypatch, tmp_path):
    dns = {"s-serving-blue-0:8080": ("172.20.0.5:8080",)}
    monkeypatch.setattr(gateway, "resolve", dns.get)
    running = Gateway(models_from_env(TWO_MODELS), runtime_dir=tmp_path)
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
    running = Gateway(models_from_env(gateway_env({**DIABETES, "blue": [tasks]})), runtime_dir=tmp_path)
    assert running.refresh_addresses() is True
    running.write_config()
    blue = block((tmp_path / "nginx.conf").read_text(), "upstream diabetes-blue")
    assert "server 10.0.1.5:8080 " in blue and "server 10.0.1.6:8080 " in blue
    dns[tasks] = ("10.0.1.6:8080", "10.0.1.9:8080")  # a task rescheduled onto another node
    assert running.refresh_addresses() is True
    running.write_config()
    blue = block((tmp_path / "nginx.conf").read_text(), "upstream diabetes-blue")
    assert "10.0.1.5:8080" not in blue and "server 10.0.1.9:8080 " in blue
    assert running.refresh_addresses() is False


def test_resolve_returns_every_address_of_a_name(monkeypatch):
    answers = [(2, 1, 6, "", ("10.0.1.7", 8080)), (2, 1, 6, "", ("10.0.1.5", 8080)), (2, 1, 6, "", ("10.0.1.7", 8080))]
    monkeypatch.setattr(gateway.socket, "getaddrinfo", lambda *args: answers)
    assert gateway.resolve("tasks.s-serving-blue:8080") == ("10.0.1.5:8080", "10.0.1.7:8080")
