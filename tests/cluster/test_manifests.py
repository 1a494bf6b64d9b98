"""The KubeRay manifests in cluster/ checked offline against the KubeRay CRD schemas, plus submit.sh.

The API server rejects unknown fields (kubectl's default field validation is strict), but the
CRD schemas only say so implicitly: plain JSON-schema validation would let a misspelt field
through. `strict_schema` closes every object schema so that a typo fails here instead of at
deploy time. Not checked: the CEL rules (`x-kubernetes-validations`) and defaulting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = Path(__file__).resolve().parents[3] / "shared" / "kuberay"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
CONFIG_SECTIONS = {"run", "data", "model", "peft", "algorithm", "scoring", "train", "rounds", "eval"}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are 1-2 MB


def strict_schema(node: dict) -> dict:
    """A copy of a Kubernetes structural schema that rejects unknown properties.

    Object schemas with `properties` and neither `additionalProperties` (maps) nor
    `x-kubernetes-preserve-unknown-fields` get `additionalProperties: false`;
    `x-kubernetes-int-or-string` becomes an explicit integer-or-string type where the schema
    does not spell it out; `nullable` admits null.
    """
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items share their key fields (e.g. two volumes named alike)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate item with {dict(zip(keys, (item.get(k) for k in keys)))}")
            seen.add(key)


_KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


def _int_in_range(lo: int, hi: int):
    return lambda v: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi


_formats = jsonschema.FormatChecker()
for name, (lo, hi) in INT_RANGES.items():
    _formats.checks(name)(_int_in_range(lo, hi))


def need_kuberay() -> Path:
    if not (KUBERAY / "ray.io_rayjobs.yaml").is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY} (they ship beside the repo, not in it)")
    return KUBERAY


@lru_cache(maxsize=None)
def crd_validators() -> dict:
    """kind → (apiVersion, validator of `spec`) for every CRD in the KubeRay folder, version v1."""
    out = {}
    for path in sorted(need_kuberay().glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        spec_schema = strict_schema(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
        out[kind] = (f"{group}/v1", _KubeValidator(spec_schema, format_checker=_formats))
    return out


def load_manifest(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object per manifest file, found {len(docs)}"
    return docs[0]


def spec_errors(manifest: dict) -> list[str]:
    validators = crd_validators()
    kind = manifest.get("kind")
    assert kind in validators, f"kind {kind!r} has no CRD in {KUBERAY} (known: {sorted(validators)})"
    api_version, validator = validators[kind]
    assert manifest.get("apiVersion") == api_version
    errors = validator.iter_errors(manifest["spec"])
    return [f"{'.'.join(['spec', *map(str, e.absolute_path)])}: {e.message}" for e in errors]


def rayjob() -> dict:
    (path,) = [p for p in MANIFESTS if load_manifest(p)["kind"] == "RayJob"]
    return load_manifest(path)


def test_both_kinds_have_a_manifest():
    assert {load_manifest(p)["kind"] for p in MANIFESTS} >= {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd_schema(path):
    manifest = load_manifest(path)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    assert spec_errors(manifest) == []


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda m: m["spec"].update(shutdownAfterJobFinish=m["spec"].pop("shutdownAfterJobFinishes")),
         "'shutdownAfterJobFinish' was unexpected"),
        (lambda m: _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
         .update(limit={"cpu": "1"}), "'limit' was unexpected"),
        (lambda m: _cluster_spec(m)["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda m: _cluster_spec(m)["workerGroupSpecs"][0].update(maxReplicas=2**31), "is not a 'int32'"),
        (lambda m: _cluster_spec(m)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
         "0 is not of type 'string'"),
        (lambda m: _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
         ["limits"].update(cpu=[8]), "[8] is not valid under any of the given schemas"),
        (lambda m: _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
            {"name": "shared", "emptyDir": {}}), "duplicate item with {'name': 'shared'}"),
    ],
    ids=["typo-top-level", "typo-nested", "wrong-type", "int32-overflow", "start-param-not-string",
         "quantity-not-int-or-string", "duplicate-volume"],
)
def test_broken_rayjob_is_rejected(mutate, expected):
    manifest = copy.deepcopy(rayjob())
    mutate(manifest)
    errors = spec_errors(manifest)
    assert any(expected in e for e in errors), errors


def test_quantities_accept_int_or_string():
    manifest = copy.deepcopy(rayjob())
    limits = _cluster_spec(manifest)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits.update(cpu=8, memory="48Gi")
    assert spec_errors(manifest) == []


def entrypoint_overrides() -> tuple[str, list[str]]:
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["loft-dist", "run"], argv
    config, overrides = argv[2], argv[3:]
    assert config.endswith((".yaml", ".yml")), f"expected a config file after 'loft-dist run', got {config!r}"
    return config, overrides


def test_rayjob_entrypoint_uses_known_config_sections():
    _, overrides = entrypoint_overrides()
    assert overrides
    for item in overrides:
        key, sep, _ = item.partition("=")
        assert sep and "." in key, f"{item!r} is not section.key=value"
        assert key.split(".")[0] in CONFIG_SECTIONS, f"{item!r}: unknown section (known: {sorted(CONFIG_SECTIONS)})"


def test_rayjob_entrypoint_loads_as_a_config():
    """The config file exists in the repo and, with the overrides, passes loft_dist's own validation."""
    from loft_dist.config import load_config

    config, overrides = entrypoint_overrides()
    assert (REPO / config).is_file(), f"the RayJob entrypoint names {config}, which is not in the repository"
    cfg = load_config(str(REPO / config), overrides)
    assert cfg.run.storage_path.startswith("/mnt/shared/"), "the run dir must be on the volume every pod mounts"


def _gpus(group: dict) -> float:
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    return float(limits.get("nvidia.com/gpu", 0))


def test_rayjob_resources_fit_the_worker_groups():
    """Training and the scoring pool each fit in the GPUs the autoscaler may start, else the job waits forever."""
    from loft_dist.config import Config
    from omegaconf import OmegaConf

    _, overrides = entrypoint_overrides()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides)))
    groups = _cluster_spec(rayjob())["workerGroupSpecs"]
    max_gpus = sum(_gpus(g) * g["maxReplicas"] for g in groups)
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    if cfg.train.use_gpu:
        assert cfg.train.num_workers <= max_gpus and any(_gpus(g) >= 1 for g in groups)
    assert cfg.scoring.max_actors * cfg.scoring.gpus_per_actor <= max_gpus


def test_manifests_pin_the_ray_version_of_the_image():
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base, "cluster/Dockerfile: expected ARG BASE_IMAGE=rayproject/ray:<version>-..."
    for path in MANIFESTS:
        manifest = load_manifest(path)
        assert _cluster_spec(manifest)["rayVersion"] == base.group(1), path.name


def test_submit_script_parses_and_explains_itself():
    script = CLUSTER / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage:" in usage.stderr


def test_config_sections_match_loft_dist():
    from loft_dist.config import Config

    assert {f.name for f in dataclasses.fields(Config)} == CONFIG_SECTIONS
