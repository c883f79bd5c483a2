"""deploy/: the image, the KubeRay RayCluster and RayJob, and the AWS cluster-launcher YAML are checked offline: they
parse, agree with each other and with pyproject.toml (Ray version, image tag), the cluster-launcher YAML passes Ray's
own config validation, and the RayJob's entrypoint is a `lifelong run` of a pipeline that exists and validates."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from orchestrator.cli import app
from orchestrator.plan import Resources, check_workers
from orchestrator.spec import bind, load_pipeline

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def ray_pin() -> str:
    """The x.y.z of the `ray[...]==x.y.z` dependency."""
    pins = [m.group(1) for d in project()["dependencies"] if (m := re.fullmatch(r"ray\[[^\]]*\]==([\d.]+)", d))]
    assert len(pins) == 1, project()["dependencies"]
    return pins[0]


def dockerfile() -> dict[str, Any]:
    """FROM image, WORKDIR and COPY sources of deploy/Dockerfile."""
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    out: dict[str, Any] = {"copies": []}
    for line in lines:
        op, _, rest = line.partition(" ")
        if op == "FROM":
            out["from"] = rest.split()[0]
        elif op == "WORKDIR":
            out["workdir"] = rest.strip()
        elif op == "COPY":
            out["copies"] += [a for a in rest.split()[:-1] if not a.startswith("--")]
    return out


def kube(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kuberay" / name).read_text())


def test_image_is_built_on_the_pinned_ray_from_files_that_exist() -> None:
    image = dockerfile()
    assert image["from"].startswith(f"rayproject/ray:{ray_pin()}-"), image["from"]
    assert image["copies"], "the Dockerfile copies nothing"
    for src in image["copies"]:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert {"orchestrator/", "strategies/", "pipelines/", "pyproject.toml"} <= set(image["copies"])


def test_raycluster_has_a_cpu_head_and_a_gpu_worker_group_on_the_lifelong_image() -> None:
    cluster = kube("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray_pin()
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    workers = spec["workerGroupSpecs"]
    gpu = [g for g in workers if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    images = {head["image"], *(g["template"]["spec"]["containers"][0]["image"] for g in workers)}
    assert images == {f"lifelong:{project()['version']}"}, images


def test_rayjob_runs_a_pipeline_that_exists_and_validates() -> None:
    job, cluster = kube("rayjob.yaml"), kube("raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["lifelong", "run"], argv
    # The options parse as `lifelong run`'s own (click raises on an unknown one).
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    params = run.make_context("run", argv[2:]).params
    in_image = Path(params["pipeline"])
    workdir = Path(dockerfile()["workdir"])
    assert in_image.is_relative_to(workdir), f"{in_image} is not under the image's WORKDIR {workdir}"
    path = REPO / in_image.relative_to(workdir)
    assert path.exists(), f"{path} does not exist"
    pipeline = load_pipeline(path, [])
    bind(pipeline, str(path))
    assert pipeline.training.use_gpu and all(d.uri and d.uri.startswith("s3://") for d in pipeline.domains)
    # The RayCluster's GPU workers, as kept up, hold the pipeline's workers and evaluation actors.
    held = {"CPU": 0.0, "GPU": 0.0}
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        held["CPU"] += group["minReplicas"] * float(limits["cpu"])
        held["GPU"] += group["minReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    t = pipeline.training
    check_workers(Resources(t.num_workers, t.cpus_per_worker, t.use_gpu, 1), held, pipeline)


def validate_launcher(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_yaml_passes_rays_validation() -> None:
    config = yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())
    validate_launcher(config)
    assert config["docker"]["image"].endswith(f"/lifelong:{project()['version']}")
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"][0] in "gp" for t in workers), "no GPU instance type (g*, p*)"
    broken = {**config, "available_node_types": {**config["available_node_types"], "head": {"resources": {}}}}
    with pytest.raises(Exception, match="node_config"):  # the same check refuses a node type without one
        validate_launcher(broken)


def test_deploy_readme_walks_through_both_paths() -> None:
    text = (DEPLOY / "README.md").read_text()
    for fragment in ("kubectl apply -f deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob.yaml",
                     "ray up deploy/cluster-launcher/aws.yaml", "docker build -f deploy/Dockerfile"):
        assert fragment in text, fragment
    assert len(text.splitlines()) <= 60, "deploy/README.md should stay under a page"
