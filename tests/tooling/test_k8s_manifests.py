"""The sidecar example's deployment files, checked without a cluster or an engine.

``deploy/sidecar/pod.yaml`` is validated against the Kubernetes schema (kubernetes-validate, whose
JSON schemas ship inside the package: no network), strictly, so a misspelt field fails as it would
under ``kubectl apply --validate=strict``. The checks after it are the ones a schema cannot make: the
ConfigMaps hold exactly the files beside the manifest (the ones the compose example and its test
use), the proxy's config loads, no secret value is in the file, every mount names a volume, and the
pod runs as the image's non-root user with nothing to escalate to. ``compose.yaml`` is checked with
docker-compose itself when it is installed.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from qpher_proxy.config import config_from_dict, load_config
from qpher_proxy.policy.loader import load_policy_dir

REPO = Path(__file__).resolve().parents[2]
SIDECAR = REPO / "deploy" / "sidecar"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes still supported upstream when this was written
IMAGE_UID = 10001  # the Dockerfile's user

Doc = dict[str, Any]


def _docs() -> list[Doc]:
    docs = [d for d in yaml.safe_load_all((SIDECAR / "pod.yaml").read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _one(kind: str, name: str | None = None) -> Doc:
    found = [d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in pod.yaml, found {len(found)}"
    return found[0]


def _pod_spec() -> Doc:
    spec = _one("Pod")["spec"]
    assert isinstance(spec, dict)
    return spec


def _containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _container(name: str) -> Doc:
    found: list[Doc] = [c for c in _pod_spec()["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


# ---- the schema -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_every_document_validates_against_the_kubernetes_schema(version: str) -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Pod", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_what_kubernetes_would() -> None:
    # The validator is not a no-op: an unknown field and a wrong type both fail, so the test above
    # would notice a manifest that a cluster refuses.
    pod = _one("Pod")
    misspelt = copy.deepcopy(pod)
    misspelt["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(pod)
    wrong_type["spec"]["securityContext"]["runAsUser"] = "qpher"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


# ---- what the ConfigMaps carry ---------------------------------------------------------------

def test_configmaps_hold_exactly_the_files_beside_the_manifest() -> None:
    # The compose example and its test run config.yaml, policies/ and app.py; the pod must run the
    # same. After editing one of them, paste it into pod.yaml's ConfigMap (a `|` block, 4 spaces).
    config = _one("ConfigMap", "qpher-sidecar-config")["data"]
    policies = sorted((SIDECAR / "policies").glob("*.yaml"))
    assert policies
    assert set(config) == {"config.yaml", *(p.name for p in policies)}
    assert config["config.yaml"] == (SIDECAR / "config.yaml").read_text()
    for p in policies:
        assert config[p.name] == p.read_text(), p.name
    app = _one("ConfigMap", "qpher-sidecar-app")["data"]
    assert app == {"app.py": (SIDECAR / "app.py").read_text()}
    # ... and the config volume puts each key where config.yaml's policy.dir expects it.
    volume = next(v for v in _pod_spec()["volumes"] if v["name"] == "config")
    items = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert items == {"config.yaml": "config.yaml", **{p.name: f"policies/{p.name}" for p in policies}}


def test_the_config_loads_and_points_where_the_pod_mounts() -> None:
    text = _one("ConfigMap", "qpher-sidecar-config")["data"]["config.yaml"]
    cfg = config_from_dict(yaml.safe_load(text), "/etc/qpher", "pod.yaml:config.yaml", check_files=False)
    same = load_config(SIDECAR / "config.yaml", check_files=False)
    assert cfg == same
    proxy = _container("qpher-proxy")
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["QPHER_CONFIG"] == "/etc/qpher/config.yaml"
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    assert cfg.policy.dir == "/etc/qpher/policies" and "/etc/qpher" in mounts
    for secret_file in (cfg.tls.cert_file, cfg.tls.key_file, cfg.kms.kek.file, cfg.auth.pepper_file):
        assert str(secret_file).startswith("/run/secrets/qpher/"), secret_file
    assert mounts["/run/secrets/qpher"]["readOnly"] is True
    for state in (cfg.kms.dir, cfg.auth.db, cfg.audit.file):
        assert str(state).startswith("/var/lib/qpher/"), state
    assert mounts["/var/lib/qpher"]["name"] == "state"
    # One uid in the container: nothing to drop to.
    assert cfg.server.user is None and cfg.kms.user is None
    # The proxy listens on the port the container declares and the probes use; the app on the
    # upstream's port.
    port = next(p for p in proxy["ports"] if p["name"] == "https")["containerPort"]
    assert cfg.server.listen == (f"0.0.0.0:{port}",)
    app_env = {e["name"]: e["value"] for e in _container("app")["env"]}
    assert cfg.upstream.url == f"http://127.0.0.1:{app_env['PORT']}"


def test_the_policy_lets_its_plan_reach_the_app() -> None:
    # The compose test's key has plan "app"; without `forward` every request would get 403.
    policy = load_policy_dir(SIDECAR / "policies")
    assert "forward" in policy.plans["app"].operations


def test_check_config_accepts_the_sidecar_config() -> None:
    proc = subprocess.run([sys.executable, "-m", "qpher_proxy", "check-config", "--no-files", "-c",
                           str(SIDECAR / "config.yaml")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- secrets, volumes, privileges ------------------------------------------------------------

def test_no_secret_value_is_in_the_manifest() -> None:
    # The Secret is referenced, never defined here (README.md shows `kubectl create secret`), and no
    # container gets a KEK, pepper or key through its environment or a literal.
    text = (SIDECAR / "pod.yaml").read_text()
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    docs = _docs()
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert all("binaryData" not in d and "stringData" not in d for d in docs)
    for c in _containers(_pod_spec()):
        for e in c.get("env", []):
            assert "valueFrom" not in e and not {"QPHER_KEK", "KEK", "PEPPER"} & {e["name"].upper()}, e
    volume = next(v for v in _pod_spec()["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "qpher-sidecar-secrets"


def test_every_mount_names_a_declared_volume_and_every_volume_is_used() -> None:
    spec = _pod_spec()
    declared = [v["name"] for v in spec["volumes"]]
    assert len(declared) == len(set(declared))
    used = set()
    for c in _containers(spec):
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert len(paths) == len(set(paths)), c["name"]
        for m in c.get("volumeMounts", []):
            assert m["name"] in declared, (c["name"], m["name"])
            used.add(m["name"])
    assert used == set(declared)


def test_the_secrets_reach_the_proxy_as_its_own_0400_files_in_memory() -> None:
    # Kubernetes mounts a Secret root-owned and, with fsGroup, group-readable: the KEK and pepper
    # loaders refuse both. An init container (the image's uid) copies them with mode 0400 into a
    # memory-backed emptyDir, which the proxy mounts read-only; the Secret itself only the init
    # container sees.
    spec = _pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    (init,) = spec["initContainers"]
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    source = next(name for name, v in volumes.items() if "secret" in v)
    target = init_mounts.keys() - {source}
    assert len(target) == 1
    (copies,) = target
    assert volumes[copies]["emptyDir"]["medium"] == "Memory"
    assert init_mounts[source]["readOnly"] is True
    command = init["command"]
    assert command[:3] == ["install", "-m", "0400"]
    assert command[-1].rstrip("/") == init_mounts[copies]["mountPath"] == "/run/secrets/qpher"
    cfg = load_config(SIDECAR / "config.yaml", check_files=False)
    wanted = {os.path.basename(str(p)) for p in (cfg.tls.cert_file, cfg.tls.key_file, cfg.kms.kek.file,
                                                   cfg.auth.pepper_file)}
    assert {os.path.basename(a) for a in command[3:-1]} == wanted
    assert all(a.startswith(init_mounts[source]["mountPath"] + "/") for a in command[3:-1])
    for c in spec["containers"]:
        assert source not in {m["name"] for m in c.get("volumeMounts", [])}, c["name"]
    proxy_mounts = {m["name"]: m for m in _container("qpher-proxy")["volumeMounts"]}
    assert proxy_mounts[copies]["readOnly"] is True
    assert copies not in {m["name"] for m in _container("app").get("volumeMounts", [])}


def test_the_pod_runs_as_the_image_user_with_nothing_to_escalate_to() -> None:
    spec = _pod_spec()
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == IMAGE_UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec and "hostPID" not in spec
    for c in _containers(spec):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert "privileged" not in sc and "runAsUser" not in sc, c["name"]
        assert "limits" in c["resources"], c["name"]
    # The shutdown drain fits in the grace period.
    cfg = load_config(SIDECAR / "config.yaml", check_files=False)
    assert spec["terminationGracePeriodSeconds"] > cfg.server.shutdown_grace


def test_probes_use_the_healthcheck_and_readyz() -> None:
    proxy = _container("qpher-proxy")
    assert proxy["livenessProbe"]["exec"]["command"][:2] == ["qpher-proxy", "healthcheck"]
    ready = proxy["readinessProbe"]["httpGet"]
    assert ready["scheme"] == "HTTPS" and ready["path"] == "/readyz"
    assert ready["port"] in ("https", 8443)
    service = _one("Service")
    assert service["spec"]["selector"].items() <= _one("Pod")["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]


# ---- compose -------------------------------------------------------------------------------

def test_compose_file_is_accepted_by_docker_compose() -> None:
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("docker-compose is not installed (CI installs it: Debian package docker-compose)")
        pytest.skip("docker-compose is not installed")
    # `config` resolves the file (interpolation, secrets' file paths) without an engine.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    proc = subprocess.run(["docker-compose", "-f", str(SIDECAR / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


def test_compose_file_keeps_the_example_s_promises() -> None:
    compose = yaml.safe_load((SIDECAR / "compose.yaml").read_text())
    services = compose["services"]
    assert services["proxy"]["network_mode"] == "service:app"
    # Every container on host or none networking (the test machines' rule) or the app's namespace.
    assert services["app"]["network_mode"] in ("host", "none")
    proxy = services["proxy"]
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in proxy["security_opt"]
    targets = {s["target"] for s in proxy["secrets"]}
    cfg = load_config(SIDECAR / "config.yaml", check_files=False)
    assert targets == {str(p) for p in (cfg.tls.cert_file, cfg.tls.key_file, cfg.kms.kek.file,
                                         cfg.auth.pepper_file)}
    assert {s["file"] for s in compose["secrets"].values()} == {
        f"./secrets/{os.path.basename(t)}" for t in targets}
    grace = proxy["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > cfg.server.shutdown_grace
    assert proxy["environment"]["QPHER_CONFIG"] == "/etc/qpher/config.yaml"
    assert "./config.yaml:/etc/qpher/config.yaml:ro" in proxy["volumes"]
    assert "./policies:/etc/qpher/policies:ro" in proxy["volumes"]
    assert any(v.startswith("qpher-state:/var/lib/qpher") for v in proxy["volumes"])
