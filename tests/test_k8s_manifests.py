"""Every manifest in k8s/ validates strictly against the KubeRay v1.7.0 CRDs, plus the operator's own rules.

Strict means what `kubectl apply` (server-side field validation) does on a live cluster: an unknown or
misspelled field is an error, not silently dropped. The CRD schemas never forbid unknown fields, so each
schema node that declares `properties` gets `additionalProperties: false`; `x-kubernetes-int-or-string`,
`nullable`, schema defaults (applied before validating, as the API server does) and list-type map/set
uniqueness are honoured. CEL rules (`x-kubernetes-validations`) are not evaluated; none of them concern
fields these manifests use. Rules that only the KubeRay operator (or pod admission) enforces are checked
by `operator_errors`. The CRDs live in ../shared/kuberay-crds (see its PROVENANCE.md); without them the
tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
from decimal import Decimal
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

K8S_DIR = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
# PROVENANCE.md: release tag v1.7.0, byte-identical to the kuberay-operator 1.7.0 Helm chart CRDs.
CRD_SHA256 = {
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
}
IMAGE_ROOT = "/home/ray/synthray"  # where the Dockerfile puts the project
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
MAX_NAME = {"RayJob": 47, "RayCluster": 53, "RayService": 47}  # KubeRay: room for generated suffixes
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {  # the top-level `metadata` (the CRDs leave it as a bare object; the API server does not)
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


# --------------------------------------------------------------------------- the strict validator


class StrictLoader(yaml.SafeLoader):
    """YAML with duplicate keys rejected (the API server's strict decoding does the same)."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate field {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_manifests(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=StrictLoader) if doc is not None]


def strict(schema: dict) -> dict:
    """A CRD's structural schema made strict (a deep copy)."""
    node = {k: v for k, v in schema.items() if k != "x-kubernetes-validations"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    return node


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `map` items are unique by their keys, `set` items are unique."""
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        identities = [
            tuple(item.get(k) for k in keys) if isinstance(item, dict) else item for item in instance
        ]
    elif list_type == "set":
        identities = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        return
    seen = set()
    for identity in identities:
        if identity in seen:
            yield jsonschema.ValidationError(f"duplicate entry {identity!r} in a list of type {list_type}")
        seen.add(identity)


StructuralValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


def apply_defaults(value, schema: dict) -> None:
    """Fill absent fields that carry a schema default, as the API server does before validating."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                apply_defaults(item, props[name])
            elif isinstance(extra, dict):
                apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, for every served version of the KubeRay CRDs."""
    schemas = {}
    for name in CRD_SHA256:
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = OBJECT_META
                schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
                schemas[(f"{group}/{version['name']}", kind)] = schema
    # Core kinds the manifests ship: PersistentVolumeClaim's spec schema is embedded in every pod template
    # (volumes[].ephemeral.volumeClaimTemplate.spec) of the CRDs, from the same Kubernetes API definition.
    pod = schemas[("ray.io/v1", "RayCluster")]["properties"]["spec"]["properties"]["headGroupSpec"]
    volume = pod["properties"]["template"]["properties"]["spec"]["properties"]["volumes"]["items"]
    claim_spec = volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    schemas[("v1", "PersistentVolumeClaim")] = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": OBJECT_META,
            "spec": claim_spec,
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
    }
    return schemas


def validate(doc: dict) -> list[str]:
    """Every error `kubectl apply` plus the KubeRay operator would report for one manifest ([] if none)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = crd_schemas().get(key)
    if schema is None:
        known = ", ".join(f"{v} {k}" for v, k in sorted(crd_schemas()))
        return [f"no schema for apiVersion={key[0]!r} kind={key[1]!r} (known: {known})"]
    doc = copy.deepcopy(doc)
    apply_defaults(doc, schema)
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in StructuralValidator(schema, format_checker=FORMATS).iter_errors(doc)
    ]
    # The API server rejects a manifest before the operator ever sees it.
    return sorted(errors) or operator_errors(doc)


# --------------------------------------------------------------------------- rules outside the schema


QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1)}
SUFFIX |= {s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")}
SUFFIX |= {f"{s}i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}


def quantity(value) -> Decimal:
    """A Kubernetes resource quantity ("500m", "16Gi", 2, "1e3") as a number."""
    match = QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * SUFFIX[suffix]


def pod_specs(node, path: str = ""):
    """(path, pod spec) for every pod template in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{path}[{i}]")


def resource_errors(resources: dict, where: str) -> list[str]:
    """Pod admission: requests within limits; extended resources (GPUs) need requests equal to limits."""
    errors = []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for name, amount in requests.items():
        extended = name not in ("cpu", "memory", "ephemeral-storage") and not name.startswith("hugepages-")
        if extended and name not in limits:
            errors.append(f"{where}: request of {name} needs a limit equal to it (extended resource)")
        elif extended and quantity(amount) != quantity(limits[name]):
            errors.append(f"{where}: {name} request {amount} must equal its limit {limits[name]}")
        elif name in limits and quantity(amount) > quantity(limits[name]):
            errors.append(f"{where}: {name} request {amount} exceeds its limit {limits[name]}")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """Rules enforced by the KubeRay operator at reconcile time, or by pod admission when it creates pods."""
    errors = []
    kind, name, spec = doc["kind"], doc["metadata"].get("name", ""), doc.get("spec") or {}
    if kind in MAX_NAME:
        if len(name) > MAX_NAME[kind]:
            errors.append(f"metadata.name: {kind} names are at most {MAX_NAME[kind]} characters ({name!r})")
        if not DNS1035.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    elif not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for key, value in (doc["metadata"].get("labels") or {}).items():
        if not LABEL_KEY.match(key) or not LABEL_VALUE.match(str(value)):
            errors.append(f"metadata.labels: invalid label {key}={value}")

    cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    if kind == "RayJob":
        mode = spec.get("submissionMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if mode != "InteractiveMode" and not spec.get("entrypoint"):
            errors.append("spec.entrypoint: required unless submissionMode is InteractiveMode")
        if bool(cluster) == bool(spec.get("clusterSelector")):
            errors.append("spec: exactly one of rayClusterSpec and clusterSelector must be set")
        if spec.get("shutdownAfterJobFinishes") and not cluster:
            errors.append("spec.shutdownAfterJobFinishes: needs rayClusterSpec (not clusterSelector)")
        if spec.get("ttlSecondsAfterFinished", 0) and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        for field in ("ttlSecondsAfterFinished", "backoffLimit"):
            if spec.get(field, 0) < 0:
                errors.append(f"spec.{field}: must not be negative")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("spec.activeDeadlineSeconds: must be positive")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.suspend: a RayJob can be suspended only with shutdownAfterJobFinishes: true")
        if "runtimeEnvYAML" in spec:
            try:
                runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as err:
                runtime_env = err
            if not isinstance(runtime_env, dict):
                errors.append(f"spec.runtimeEnvYAML: not a YAML mapping ({runtime_env!r})")
    if cluster:
        groups = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
        if len(groups) != len(set(groups)):
            errors.append(f"workerGroupSpecs: group names must be unique ({groups})")
        for group in cluster.get("workerGroupSpecs") or []:
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            if low > high:
                errors.append(
                    f"worker group {group.get('groupName')}: minReplicas {low} > maxReplicas {high}"
                )
            if "replicas" in group and not low <= group["replicas"] <= high:
                errors.append(
                    f"worker group {group.get('groupName')}: replicas outside [minReplicas, maxReplicas]"
                )
        if "resources" in (cluster.get("autoscalerOptions") or {}):
            errors += resource_errors(cluster["autoscalerOptions"]["resources"], "autoscalerOptions")
    for path, pod in pod_specs(spec, "spec"):
        volumes = {v.get("name") for v in pod.get("volumes") or []}
        for container in (pod.get("initContainers") or []) + pod["containers"]:
            where = f"{path}.containers[{container.get('name')}]"
            errors += resource_errors(container.get("resources") or {}, where)
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    errors.append(f"{where}: volumeMount {mount.get('name')!r} names no volume of the pod")
        if not pod["containers"]:
            errors.append(f"{path}: a pod needs at least one container")
    return errors


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crds() -> dict:
    missing = [name for name in CRD_SHA256 if not (CRD_DIR / name).exists()]
    if missing:
        message = f"KubeRay CRDs missing under {CRD_DIR}: {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return crd_schemas()


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def all_manifests() -> list[tuple[str, dict]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in manifest_files()
        for doc in load_manifests(path)
    ]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in all_manifests() if doc["kind"] == kind]


def generate_job() -> dict:
    (job,) = [doc for doc in by_kind("RayJob") if "jobs.generate" in doc["spec"]["entrypoint"]]
    return job


def ray_clusters() -> list[tuple[str, dict]]:
    """(name, cluster spec) of every RayCluster and every RayJob's cluster."""
    return [(d["metadata"]["name"], d["spec"]) for d in by_kind("RayCluster")] + [
        (d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")
    ]


def containers(cluster: dict) -> list[dict]:
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    return [c for pod in pods for c in pod["containers"]]


# --------------------------------------------------------------------------- the validator itself


def test_crds_are_kuberay_v1_7_0(crds):
    for name, digest in CRD_SHA256.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, name
    assert {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCluster"), ("v1", "PersistentVolumeClaim")} <= set(
        crds
    )


def test_k8s_dir_has_the_manifests():
    kinds = sorted(doc["kind"] for _, doc in all_manifests())
    assert kinds.count("RayJob") == 2 and kinds.count("RayCluster") == 1 and "PersistentVolumeClaim" in kinds


@pytest.mark.parametrize("name,doc", all_manifests(), ids=[n for n, _ in all_manifests()])
def test_manifest_validates_strictly(crds, name, doc):
    assert validate(doc) == []


def test_misspelled_fields_are_errors(crds):
    job = generate_job()
    top = copy.deepcopy(job)
    top["spec"]["shutdownAfterJobFinish"] = top["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish'" in e and "not allowed" in e for e in validate(top)), validate(top)

    nested = copy.deepcopy(job)
    worker = nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    errors = validate(nested)
    assert any("containers.0" in e and "'resource'" in e for e in errors), errors

    meta = copy.deepcopy(job)
    meta["metadata"]["label"] = meta["metadata"].pop("labels")
    assert any(e.startswith("metadata:") and "'label'" in e for e in validate(meta))

    claim = copy.deepcopy(by_kind("PersistentVolumeClaim")[0])
    claim["spec"]["accessMode"] = claim["spec"].pop("accessModes")
    assert any("'accessMode'" in e for e in validate(claim))


def test_wrong_types_and_duplicates_are_errors(crds, tmp_path):
    job = copy.deepcopy(generate_job())
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    job["spec"]["activeDeadlineSeconds"] = "2d"
    errors = validate(job)
    assert any("num-gpus" in e and "not of type 'string'" in e for e in errors), errors
    assert any("activeDeadlineSeconds" in e for e in errors), errors

    ports = copy.deepcopy(generate_job())
    head = ports["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append({"containerPort": 8265, "name": "dashboard-again"})
    assert any("duplicate entry (8265, 'TCP')" in e for e in validate(ports))

    text = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: a}\nmetadata: {name: b}\nspec: {}\n"
    (tmp_path / "dup.yaml").write_text(text)
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate field 'metadata'"):
        load_manifests(tmp_path / "dup.yaml")


def test_gpu_request_without_matching_limit_is_an_error(crds):
    def gpu_container(doc):
        group = next(g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
        return group["template"]["spec"]["containers"][0]

    no_limit = copy.deepcopy(generate_job())
    del gpu_container(no_limit)["resources"]["limits"]["nvidia.com/gpu"]
    assert any("request of nvidia.com/gpu needs a limit" in e for e in validate(no_limit)), validate(no_limit)

    unequal = copy.deepcopy(generate_job())
    gpu_container(unequal)["resources"]["limits"]["nvidia.com/gpu"] = 2
    assert any("nvidia.com/gpu request 1 must equal its limit 2" in e for e in validate(unequal))

    over = copy.deepcopy(generate_job())
    gpu_container(over)["resources"]["requests"]["memory"] = "200Gi"
    assert any("memory request 200Gi exceeds its limit 96Gi" in e for e in validate(over))


def test_operator_rules_are_checked(crds):
    def broken(change) -> list[str]:
        doc = copy.deepcopy(generate_job())
        change(doc)
        return validate(doc)

    assert any(
        "needs shutdownAfterJobFinishes" in e
        for e in broken(lambda d: d["spec"].update(shutdownAfterJobFinishes=False))
    )
    assert any("submissionMode" in e for e in broken(lambda d: d["spec"].update(submissionMode="K8sMode")))
    assert any("at most 47" in e for e in broken(lambda d: d["metadata"].update(name="x" * 48)))
    assert any("DNS-1035" in e for e in broken(lambda d: d["metadata"].update(name="Synthray_job")))
    assert any(
        "activeDeadlineSeconds" in e for e in broken(lambda d: d["spec"].update(activeDeadlineSeconds=0))
    )
    assert any("runtimeEnvYAML" in e for e in broken(lambda d: d["spec"].update(runtimeEnvYAML="[unclosed")))

    def swap_replicas(d):
        d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=1, replicas=2)

    assert any("minReplicas 3 > maxReplicas 1" in e for e in broken(swap_replicas))

    def drop_volume(d):
        d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"].pop(0)

    assert any("names no volume" in e for e in broken(drop_volume))
    assert quantity("500m") == Decimal("0.5") and quantity("16Gi") == 16 * 2**30 and quantity(2) == 2


# --------------------------------------------------------------------------- what these manifests promise


def test_jobs_clean_up_after_themselves():
    for job in by_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, job["metadata"]["name"]
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert spec["submissionMode"] == "K8sJobMode"


def test_cpu_head_and_gpu_workers_autoscaled_from_zero():
    for name, cluster in ray_clusters():
        assert cluster["enableInTreeAutoscaling"] is True, name
        assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", name
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert not any("gpu" in r for r in head["resources"].get("limits", {})), name
        (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0 and gpu["maxReplicas"] >= 1, name
        pod = gpu["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
        resources = pod["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], name


def test_model_cache_volume_and_hf_token_secret():
    claims = {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}
    for name, cluster in ray_clusters():
        pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]
        ]
        for pod in pods:
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in pod["containers"]:
                env = {e["name"]: e for e in container["env"]}
                hf_home = env["HF_HOME"]["value"]
                (mount,) = [m for m in container["volumeMounts"] if hf_home.startswith(m["mountPath"] + "/")]
                claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
                assert claim in claims, (name, claim)
                if "nvidia.com/gpu" in container["resources"]["limits"] or "head" in container["name"]:
                    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], name


def test_image_is_built_from_the_pinned_ray_version():
    import ray

    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311", dockerfile, re.M)
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)
    assert ray_version == ray.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', pyproject).group(1)
    assert ray_version.startswith(pin.rstrip("*").rstrip(".")), (ray_version, pin)
    images = set()
    for name, cluster in ray_clusters():
        assert cluster["rayVersion"] == ray_version, name
        images |= {c["image"] for c in containers(cluster)}
    assert len(images) == 1, images


def entrypoint_config(job: dict, module: str) -> tuple[Path, list[str]]:
    """The config file (mapped from the image into this checkout) and --set overrides of a job's command."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", module], argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith(IMAGE_ROOT + "/"), config
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    return ROOT / config.removeprefix(IMAGE_ROOT + "/"), overrides


def test_generate_job_runs_a_valid_config_on_an_autoscaling_cluster():
    from engine.config import GenerateConfig, load_config

    path, overrides = entrypoint_config(generate_job(), "jobs.generate")
    config = load_config(GenerateConfig, path, overrides)
    # The GPU group starts at 0 replicas: the up-front resource check would fail before the autoscaler acts.
    assert config.ray.check_resources is False
    stages = [s for s in (config.segment, config.prompt, config.background, config.composite) if s]
    gpus = sum(s.stage.num_gpus * s.stage.concurrency for s in stages)
    (gpu,) = [
        g for g in generate_job()["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"
    ]
    per_pod = quantity(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus <= gpu["maxReplicas"] * per_pod, (gpus, gpu["maxReplicas"])


def test_train_job_runs_a_valid_config():
    from engine.config import load_config
    from engine.train.config import TrainConfig

    (job,) = [doc for doc in by_kind("RayJob") if "jobs.train" in doc["spec"]["entrypoint"]]
    path, overrides = entrypoint_config(job, "jobs.train")
    config = load_config(TrainConfig, path, overrides)
    assert config.scaling.use_gpu
    (gpu,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert (
        config.scaling.num_workers * config.scaling.resources_per_worker.get("GPU", 1) <= gpu["maxReplicas"]
    )
