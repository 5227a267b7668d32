"""Kubernetes packaging, rendered and validated for real (run by `.ci/test` with pytest).

The chart is linted and rendered with Helm's own SDK (helm-python-sdk), the plain manifests are
built with `kubectl kustomize`, every object is validated against the Kubernetes schemas
(kubernetes-validate), the config each one carries passes `tollgate check`, and the alert rules
pass `promtool check rules`.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tollgate"
KUBE_VERSION = "1.30.0"
TOLLGATE = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "debug" / "tollgate"))
# kubectl is installed beside the Python running the tests (.ci/test: .venv/bin).
BIN = pathlib.Path(os.environ["VIRTUAL_ENV"]) / "bin" if "VIRTUAL_ENV" in os.environ else pathlib.Path(sys.executable).parent

VARIANT = {
    "sidecar": {"native": True},
    "tollgate": {
        "tls": {"enabled": True, "secretName": "tollgate-tls"},
        "upstreamApiKey": {"existingSecret": "model-key", "key": "token"},
        "config": {"routes": "rest", "tiers": {"gold": {"requests_per_second": 5, "burst": 10}}},
    },
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
}

# Fleet mode (SPEC §11): many replicas on one PostgreSQL key store.
FLEET = {
    "replicaCount": 3,
    "tollgate": {"store": {"postgres": {"enabled": True, "existingSecret": "tollgate-postgres"}}},
}
FLEET_HPA = {**FLEET, "autoscaling": {"enabled": True}, "podDisruptionBudget": {"enabled": True}}
# ... and one set of rate limits in Redis, with the user's own rate_limits fields beside it.
FLEET_REDIS = {
    "replicaCount": 3,
    "tollgate": {
        "store": {"postgres": {"enabled": True, "existingSecret": "tollgate-postgres"}},
        "rateLimits": {"redis": {"enabled": True, "existingSecret": "tollgate-redis"}},
        "config": {
            "rate_limits": {"per": "key", "overrides": {"orgs": {"acme": {"requests_per_second": 500, "burst": 2000}}}},
            "tiers": {
                "audit": {"requests_per_second": 50, "burst": 200, "daily_requests": 100000, "on_store_error": "closed"},
                "enterprise": {"requests_per_second": 1000, "burst": 4000},
            },
        },
    },
}

ALL_VALUES = [None, VARIANT, FLEET, FLEET_HPA, FLEET_REDIS]
ALL_IDS = ["defaults", "native-sidecar-tls-monitors", "fleet-postgres", "fleet-postgres-hpa", "fleet-redis"]


def render_files(values=None):
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    return chart.render(values, name="demo", namespace="ml", is_install=True)


def render(values=None):
    out = render_files(values)
    objects = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        objects.extend(o for o in yaml.safe_load_all(text) if o)
    return objects


def by_kind(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} rendered"
    return found


def validate_all(objects):
    for o in objects:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            # Prometheus Operator CRDs are not in the Kubernetes schemas; checked by shape below.
            assert o["spec"]["selector"]["matchLabels"]
            continue
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)


def tollgate_container(deployment):
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    return next(c for c in containers if c["name"] == "tollgate"), spec


def check_config(text):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        out = subprocess.run([TOLLGATE, "check", "--config", f.name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_chart_lints_clean():
    for values in ALL_VALUES:
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        # `icon is recommended` is informational (severity 1) and allowed.
        assert not errors, errors


@pytest.mark.parametrize("values", ALL_VALUES, ids=ALL_IDS)
def test_every_rendered_object_validates(values):
    validate_all(render(values))


@pytest.mark.parametrize("values", ALL_VALUES, ids=ALL_IDS)
def test_security_probes_and_shutdown(values):
    objects = render(values)
    (deployment,) = by_kind(objects, "Deployment")
    c, spec = tollgate_container(deployment)
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    # The grace period covers preStop + drain_delay + shutdown.timeout.
    config = yaml.safe_load(by_kind(objects, "ConfigMap", "demo-tollgate")[0]["data"]["config.yaml"])
    seconds = lambda d: int(d.rstrip("s"))
    needed = pre_stop + seconds(config["shutdown"]["drain_delay"]) + seconds(config["shutdown"]["timeout"])
    assert spec["terminationGracePeriodSeconds"] > needed
    # The Service targets tollgate, never the model server.
    (service,) = by_kind(objects, "Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "admin"}
    model = next(x for x in spec["containers"] if x["name"] == "model-server")
    assert "127.0.0.1" in model["args"], "the model server must not listen on the pod IP"
    # A config change rolls the pod.
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_native_sidecar_and_variant_objects():
    objects = render(VARIANT)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["name"] == "tollgate" and init["restartPolicy"] == "Always"
    assert all(c["name"] != "tollgate" for c in spec["containers"])
    for kind in ("ServiceMonitor", "PodMonitor", "PodDisruptionBudget"):
        by_kind(objects, kind)
    env = {e["name"]: e for e in init["env"]}
    assert env["TOLLGATE_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "model-key", "key": "token"}
    config = yaml.safe_load(by_kind(objects, "ConfigMap", "demo-tollgate")[0]["data"]["config.yaml"])
    assert config["tls"] == {"cert": "/etc/tollgate/tls/tls.crt", "key": "/etc/tollgate/tls/tls.key"}
    assert config["upstream"]["api_key_env"] == "TOLLGATE_UPSTREAM_API_KEY"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "tollgate-tls"


@pytest.mark.parametrize(
    "values",
    [None, VARIANT, FLEET, FLEET_REDIS],
    ids=["defaults", "native-sidecar-tls-monitors", "fleet-postgres", "fleet-redis"],
)
def test_rendered_config_passes_tollgate_check(values):
    objects = render(values)
    for cm in by_kind(objects, "ConfigMap"):
        check_config(cm["data"]["config.yaml"])
    (job,) = by_kind(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "check"


def rendered_config(objects, name="demo-tollgate"):
    return yaml.safe_load(by_kind(objects, "ConfigMap", name)[0]["data"]["config.yaml"])


def test_fleet_postgres_store():
    objects = render(FLEET)
    validate_all(objects)
    # Both configs (the server's and the check Job's) name the variable, never hold the URL.
    for name in ("demo-tollgate", "demo-tollgate-check"):
        config = rendered_config(objects, name)
        assert config["store"] == {
            "postgres": {
                "url_env": "TOLLGATE_POSTGRES_URL",
                "pool_size": 8,
                "connect_timeout": "2s",
                "statement_timeout": "2s",
            }
        }
    for cm in by_kind(objects, "ConfigMap"):
        assert "postgres://" not in cm["data"]["config.yaml"] and "sqlite" not in cm["data"]["config.yaml"]
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert "strategy" not in deployment["spec"], "no single-writer volume: the default rolling update"
    c, spec = tollgate_container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_POSTGRES_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tollgate-postgres", "key": "url"}
    # The check Job runs with the same variable set.
    (job,) = by_kind(objects, "Job")
    job_env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env["TOLLGATE_POSTGRES_URL"] == env["TOLLGATE_POSTGRES_URL"]
    # No store volume, no mount, no PVC.
    assert [v["name"] for v in spec["volumes"]] == ["config"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/etc/tollgate/conf"]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]


def test_fleet_postgres_values_reach_the_config():
    values = {
        "replicaCount": 2,
        "tollgate": {
            "store": {
                "postgres": {
                    "enabled": True,
                    "existingSecret": "pg",
                    "key": "dsn",
                    "poolSize": 16,
                    "connectTimeout": "500ms",
                    "statementTimeout": "5s",
                },
                # Ignored with PostgreSQL: no PVC, not even an existing one mounted.
                "persistence": {"enabled": True, "existingClaim": "old-sqlite"},
            },
            "config": {"auth": {"cache_ttl": "5m", "stale_if_unavailable": "1h"}},
        },
    }
    objects = render(values)
    validate_all(objects)
    config = rendered_config(objects)
    assert config["store"]["postgres"] == {
        "url_env": "TOLLGATE_POSTGRES_URL",
        "pool_size": 16,
        "connect_timeout": "500ms",
        "statement_timeout": "5s",
    }
    assert config["auth"]["stale_if_unavailable"] == "1h"
    (deployment,) = by_kind(objects, "Deployment")
    c, spec = tollgate_container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_POSTGRES_URL"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "dsn"}
    assert [v["name"] for v in spec["volumes"]] == ["config"]


def test_fleet_postgres_with_autoscaling():
    objects = render(FLEET_HPA)
    (deployment,) = by_kind(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    by_kind(objects, "PodDisruptionBudget")


def test_fleet_redis_rate_limits():
    objects = render(FLEET_REDIS)
    validate_all(objects)
    # Both configs name the variable, never hold the URL; the user's rate_limits fields survive.
    for name in ("demo-tollgate", "demo-tollgate-check"):
        config = rendered_config(objects, name)
        assert config["rate_limits"] == {
            "backend": "redis",
            "redis": {"url_env": "TOLLGATE_REDIS_URL", "key_prefix": "tollgate:", "timeout": "20ms", "on_error": "local", "concurrency_lease": "30s", "debit_requests": 0, "debit_within": "5ms"},
            "per": "key",
            "overrides": {"orgs": {"acme": {"requests_per_second": 500, "burst": 2000}}},
        }
        assert config["tiers"]["audit"]["on_store_error"] == "closed"
        assert config["store"]["postgres"]["url_env"] == "TOLLGATE_POSTGRES_URL"
    for cm in by_kind(objects, "ConfigMap"):
        assert "redis://" not in cm["data"]["config.yaml"]
    (deployment,) = by_kind(objects, "Deployment")
    c, _ = tollgate_container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_REDIS_URL"] == {
        "name": "TOLLGATE_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "tollgate-redis", "key": "url"}},
    }
    assert env["TOLLGATE_POSTGRES_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tollgate-postgres", "key": "url"}
    # The check Job runs with the same variables set.
    (job,) = by_kind(objects, "Job")
    job_env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env == {k: env[k] for k in ("TOLLGATE_POSTGRES_URL", "TOLLGATE_REDIS_URL")}


def test_redis_values_reach_the_config():
    # Redis without PostgreSQL (one replica, SQLite) and with a native sidecar: the same variable.
    values = {
        "sidecar": {"native": True},
        "tollgate": {
            "rateLimits": {
                "redis": {
                    "enabled": True,
                    "existingSecret": "cache",
                    "key": "redis-url",
                    "keyPrefix": "tg-prod:",
                    "timeout": "50ms",
                    "onError": "closed",
                    "concurrencyLease": "5s",
                    "debitRequests": 64,
                    "debitWithin": "10ms",
                }
            },
            "config": {"rate_limits": {"per": "key"}},
        },
    }
    objects = render(values)
    validate_all(objects)
    config = rendered_config(objects)
    assert config["rate_limits"] == {
        "per": "key",
        "backend": "redis",
        "redis": {"url_env": "TOLLGATE_REDIS_URL", "key_prefix": "tg-prod:", "timeout": "50ms", "on_error": "closed", "concurrency_lease": "5s", "debit_requests": 64, "debit_within": "10ms"},
    }
    assert config["store"] == {"sqlite": "/var/lib/tollgate/tollgate.db"}
    check_config(by_kind(objects, "ConfigMap", "demo-tollgate")[0]["data"]["config.yaml"])
    (deployment,) = by_kind(objects, "Deployment")
    c, _ = tollgate_container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "cache", "key": "redis-url"}
    assert "TOLLGATE_POSTGRES_URL" not in env
    (job,) = by_kind(objects, "Job")
    job_env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert job_env == [env["TOLLGATE_REDIS_URL"]]


def test_without_redis_the_config_keeps_local_limits():
    for values in (None, FLEET):
        objects = render(values)
        config = rendered_config(objects)
        assert config["rate_limits"] == {"per": "org"}, "backend local (the default), no redis section"
        (deployment,) = by_kind(objects, "Deployment")
        c, _ = tollgate_container(deployment)
        assert "TOLLGATE_REDIS_URL" not in {e["name"] for e in c["env"]}


def test_redis_without_secret_fails_to_render():
    with pytest.raises(helm.HelmError, match=r"tollgate\.rateLimits\.redis\.existingSecret"):
        render({"tollgate": {"rateLimits": {"redis": {"enabled": True}}}})


def notes(values):
    return render_files(values)["tollgate/templates/NOTES.txt"]


def test_notes_warn_of_per_replica_limits_without_redis():
    # Many replicas without Redis: allowed (it renders), and NOTES says what it means.
    text = notes(FLEET)
    assert "WARNING: rate limits are per replica" in text
    assert "up to 3 times a tier's limits" in text and "tollgate.rateLimits.redis" in text
    assert "up to 8 times" in notes(FLEET_HPA), "the HPA's maxReplicas"
    for values in (None, FLEET_REDIS, {**FLEET_HPA, "tollgate": FLEET_REDIS["tollgate"]}):
        assert "WARNING" not in notes(values)


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 2},
        {"autoscaling": {"enabled": True}},
        # A ReadWriteMany claim does not make one SQLite file safe for many pods.
        {"replicaCount": 3, "tollgate": {"store": {"persistence": {"existingClaim": "shared-rwx"}}}},
    ],
    ids=["replicas-2", "hpa", "replicas-3-existing-claim"],
)
def test_many_replicas_on_sqlite_fail_to_render(values):
    with pytest.raises(helm.HelmError, match=r"Configure tollgate\.store\.postgres"):
        render(values)


def test_postgres_without_secret_fails_to_render():
    with pytest.raises(helm.HelmError, match=r"tollgate\.store\.postgres\.existingSecret"):
        render({"tollgate": {"store": {"postgres": {"enabled": True}}}})


def test_schema_rejects_bad_values():
    chart = helm.Chart.load(str(CHART))
    for bad in (
        {"tollgate": {"shutdown": {"timeoutSeconds": 0}}},
        {"tollgate": {"tls": {"enabled": True, "secretName": ""}}},
        {"tollgate": {"config": {"listen": "0.0.0.0:1"}}},
        {"tollgate": {"config": {"tiers": {"gold": {"requests_per_second": "fast"}}}}},
        {"modelServer": {"port": 8080}},
        {"tollgate": {"store": {"postgres": {"poolSize": 0}}}},
        {"tollgate": {"store": {"postgres": {"connectTimeout": "fast"}}}},
        # The URL belongs in the Secret, never in values (nor the ConfigMap).
        {"tollgate": {"store": {"postgres": {"url": "postgres://u:p@db:5432/t"}}}},
        {"tollgate": {"rateLimits": {"redis": {"onError": "maybe"}}}},
        {"tollgate": {"rateLimits": {"redis": {"timeout": "fast"}}}},
        {"tollgate": {"rateLimits": {"redis": {"timeout": "0ms"}}}},
        {"tollgate": {"rateLimits": {"redis": {"keyPrefix": "{tg}:"}}}},
        {"tollgate": {"rateLimits": {"redis": {"url": "redis://:p@redis:6379"}}}},
        {"tollgate": {"config": {"tiers": {"gold": {"requests_per_second": 1, "on_store_error": "maybe"}}}}},
        # backend and redis are the chart's (from tollgate.rateLimits.redis, with the Secret).
        {"tollgate": {"config": {"rate_limits": {"backend": "redis"}}}},
        {"tollgate": {"config": {"rate_limits": {"redis": {"url_env": "X"}}}}},
    ):
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def kustomize(overlay):
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


@pytest.mark.parametrize("overlay", ["deploy/kubernetes", "deploy/kubernetes/add-to-existing", "deploy/kubernetes/fleet-postgres"])
def test_plain_manifests_build_and_validate(overlay):
    objects = kustomize(overlay)
    validate_all(objects)
    deployment = by_kind(objects, "Deployment")[0]
    c, spec = tollgate_container(deployment)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The generated ConfigMap name is what the pod mounts.
    (cm,) = by_kind(objects, "ConfigMap")
    assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in spec["volumes"])


@pytest.mark.parametrize(
    "overlay",
    [
        "deploy/kubernetes",
        "deploy/kubernetes/add-to-existing",
        "deploy/kubernetes/fleet-postgres",
    ],
)
def test_plain_manifest_config_passes_tollgate_check(overlay):
    (cm,) = by_kind(kustomize(overlay), "ConfigMap")
    check_config(cm["data"]["config.yaml"])


def test_fleet_manifest_shares_postgres():
    objects = kustomize("deploy/kubernetes/fleet-postgres")
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    c, spec = tollgate_container(deployment)
    env = {e["name"]: e for e in c["env"]}
    assert env["TOLLGATE_POSTGRES_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tollgate-postgres", "key": "url"}
    assert env["TOLLGATE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tollgate-redis", "key": "url"}
    (cm,) = by_kind(objects, "ConfigMap")
    text = cm["data"]["config.yaml"]
    config = yaml.safe_load(text)
    assert config["store"] == {
        "postgres": {"url_env": "TOLLGATE_POSTGRES_URL", "pool_size": 8, "connect_timeout": "2s", "statement_timeout": "2s"}
    }
    # One limit for the fleet, not one per replica.
    assert config["rate_limits"]["backend"] == "redis"
    assert config["rate_limits"]["redis"]["url_env"] == "TOLLGATE_REDIS_URL"
    assert "postgres://" not in text and "redis://" not in text
    # The kustomization's instructions create exactly the Secrets the pod reads.
    comment = (ROOT / "deploy/kubernetes/fleet-postgres/kustomization.yaml").read_text()
    for e in (env["TOLLGATE_POSTGRES_URL"], env["TOLLGATE_REDIS_URL"]):
        ref = e["valueFrom"]["secretKeyRef"]
        assert f"kubectl create secret generic {ref['name']}" in comment and f"--from-literal={ref['key']}=" in comment
    assert not [o for o in objects if o["kind"] in ("PersistentVolumeClaim", "Secret")]
    assert [v["name"] for v in spec["volumes"]] == ["config"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/etc/tollgate/conf"]


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    # Missing, the test fails (in CI and out of it): it never passes by skipping.
    assert promtool is not None, "promtool is missing: `bash .ci/test` installs Debian's prometheus"
    out = subprocess.run([promtool, "check", "rules", str(ROOT / "deploy/prometheus/alerts.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_is_valid_json_with_queries():
    dashboard = json.loads((ROOT / "deploy/grafana/tollgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and all("tollgate_" in e for e in exprs)
