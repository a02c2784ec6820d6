"""The ECS GPU work pool's base job template (infra/ecs/base-job-template.json).

1. The file is a valid base job template: Prefect's own server-side check, a JSON schema for
   the variables, a variable behind every {{ placeholder }}, defaults that satisfy their schema,
   and it still carries everything prefect-aws's default ECS template has.
2. Rendered by prefect-aws's ECS worker for one trial (the same calls the worker makes for a
   flow run), the task definition and the run-task request carry the GPU requirement, the
   image, the EC2 capacity provider strategy and the trial's environment.
3. The worker registers that task definition and runs the task against moto's ECS API in
   server mode on loopback; what ECS then holds (describe_task_definition, describe_tasks) is
   checked. No AWS account, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import socket
import uuid
from pathlib import Path

import pytest

pytest.importorskip("prefect_aws", reason="prefect-aws is needed to render the ECS job template")
pytest.importorskip("moto.server", reason="moto[server] is needed for the local ECS API")

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from prefect.client.orchestration import PrefectClient  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool  # noqa: E402
from prefect.client.schemas.responses import DeploymentResponse  # noqa: E402
from prefect.server.schemas.actions import validate_base_job_template  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate  # noqa: E402
from prefect.utilities.templating import find_placeholders  # noqa: E402
from prefect_aws.workers.ecs_worker import (  # noqa: E402
    _TASK_DEFINITION_CACHE,
    ECSJobConfiguration,
    ECSWorker,
)

REPO = Path(__file__).resolve().parent.parent
ECS_DIR = REPO / "infra" / "ecs"
TEMPLATE_PATH = ECS_DIR / "base-job-template.json"

POOL = "hpsweep-gpu"
REGION = "us-east-1"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/hpsweep-trainer:3f2a1c9"
TRACKING_URI = "https://mlflow.hpsweep.internal"
DATA_REMOTE = "s3://hpsweep-data/dvc"
WORKER_API_URL = "http://prefect.hpsweep.internal:4200/api"


def _template() -> dict:
    return json.loads(TEMPLATE_PATH.read_text())


def _gpu(container: dict) -> list[dict]:
    return [r for r in container.get("resourceRequirements", []) if r["type"] == "GPU"]


def _env(items: list[dict]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in items}


# --------------------------------------------------------------------------- 1. validity


def test_template_is_a_valid_base_job_template():
    template = _template()
    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # the check `prefect work-pool create` gets server-side
    WorkPoolCreate(name=POOL, type="ecs", base_job_template=template)  # and client-side

    variables = template["variables"]
    assert variables["type"] == "object"
    is_valid_schema(variables, preprocess=False)  # a JSON schema (raises otherwise)

    placeholders = {p.name for p in find_placeholders(template["job_configuration"])}
    assert placeholders <= set(variables["properties"]), placeholders - set(variables["properties"])
    for name in ("gpus", "capacity_provider", "image", "mlflow_tracking_uri", "data_remote",
                 "data_cache_dir", "data_cache_host_path"):
        assert name in placeholders, f"variable {name} is declared but not used"

    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=False)
    assert defaults["gpus"] == "1"
    assert defaults["capacity_provider"] == "hpsweep-gpu"
    assert defaults["image"].startswith("hpsweep-trainer")


def test_template_keeps_everything_prefect_aws_has():
    """Derived from prefect-aws's default ECS template: same job configuration fields, same
    variables except the two launch options replaced by the EC2 capacity provider."""
    ours, default = _template(), ECSWorker.get_default_base_job_template()
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    replaced = {"launch_type", "capacity_provider_strategy"}
    assert set(default["variables"]["properties"]) - replaced <= set(ours["variables"]["properties"])
    for name in set(default["variables"]["properties"]) - replaced:
        assert ours["variables"]["properties"][name].get("type") == \
            default["variables"]["properties"][name].get("type"), name


@pytest.mark.parametrize("gpus, ok", [("1", True), ("4", True), ("0", False), ("two", False), (2, False)])
def test_gpus_job_variable_is_checked_like_the_server_does(gpus, ok):
    """The server validates a flow run's job variables against the pool's schema (required
    fields included) before the run is created; a bad GPU count never reaches a worker. It is
    a string because the ECS API's resourceRequirements value is one (see the moto test)."""
    variables = _template()["variables"]
    job_variables = {"gpus": gpus, "mlflow_tracking_uri": TRACKING_URI}
    if ok:
        validate(job_variables, variables, raise_on_error=True, preprocess=True,
                 ignore_required=False, allow_none_with_default=True)
    else:
        with pytest.raises(ValidationError):
            validate(job_variables, variables, raise_on_error=True, preprocess=True,
                     ignore_required=False, allow_none_with_default=True)


def test_dockerfile_copies_paths_that_exist():
    dockerfile = (ECS_DIR / "Dockerfile").read_text()
    sources = []
    for line in dockerfile.splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(?:--\S+\s+)*(.+)", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY lines found"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert re.search(r"^FROM\s+\S*cuda", dockerfile, re.M) or "CUDA_IMAGE" in dockerfile
    assert "pip install" in dockerfile and "nvidia-ml-py" in dockerfile


# --------------------------------------------------------------------------- 2. rendering


def _flow_run_objects():
    flow = Flow(id=uuid.uuid4(), name="train-trial")
    deployment = DeploymentResponse(id=uuid.uuid4(), name="ecs", flow_id=flow.id)
    flow_run = FlowRun(id=uuid.uuid4(), name="trial-lr-0-01", flow_id=flow.id,
                       deployment_id=deployment.id)
    work_pool = WorkPool(id=uuid.uuid4(), name=POOL, type="ecs",
                         base_job_template=_template())
    return flow, deployment, flow_run, work_pool


def _render(job_variables: dict) -> tuple[ECSJobConfiguration, FlowRun]:
    """What the ECS worker does for a flow run: pool template + the run's job variables →
    job configuration, then the flow run's Prefect env, labels and command."""
    flow, deployment, flow_run, work_pool = _flow_run_objects()
    # A client that would fail if used: rendering needs no API (no block or variable refs).
    unused = PrefectClient(api="http://127.0.0.1:9/api")
    with temporary_settings({PREFECT_API_URL: WORKER_API_URL}):
        config = asyncio.run(ECSJobConfiguration.from_template_and_values(
            base_job_template=_template(), values=job_variables, client=unused))
        config.prepare_for_flow_run(flow_run, deployment=deployment, flow=flow,
                                    work_pool=work_pool, worker_name="ecs-worker-1")
    return config, flow_run


TRIAL_VARIABLES = {
    "image": IMAGE,
    "gpus": "2",
    "mlflow_tracking_uri": TRACKING_URI,
    "data_remote": DATA_REMOTE,
    "env": {"HPSWEEP_EXTRA": "yes"},
}


def test_rendered_task_definition_and_run_request_for_a_trial():
    _TASK_DEFINITION_CACHE.clear()
    config, flow_run = _render(TRIAL_VARIABLES)
    worker = ECSWorker(work_pool_name=POOL)
    taskdef = worker._prepare_task_definition(config, region=REGION, flow_run=flow_run)
    worker._validate_task_definition(taskdef, config)
    arn = f"arn:aws:ecs:{REGION}:123456789012:task-definition/hpsweep:1"
    request = worker._prepare_task_run_request(config, taskdef, arn, True)

    # Task definition: EC2 only, the trainer image, 2 GPUs, the shared data cache.
    assert taskdef["requiresCompatibilities"] == ["EC2"]
    assert taskdef["networkMode"] == "bridge"
    [container] = taskdef["containerDefinitions"]
    assert container["image"] == IMAGE
    assert _gpu(container) == [{"type": "GPU", "value": "2"}]
    assert (container["cpu"], container["memory"]) == (4096, 14336)
    assert (taskdef["cpu"], taskdef["memory"]) == ("4096", "14336")
    assert _env(container["environment"]) == {"HPSWEEP_DATA_CACHE": "/var/cache/hpsweep"}
    assert container["mountPoints"] == [{"sourceVolume": "hpsweep-data-cache",
                                         "containerPath": "/var/cache/hpsweep", "readOnly": False}]
    assert taskdef["volumes"] == [{"name": "hpsweep-data-cache",
                                   "host": {"sourcePath": "/var/cache/hpsweep"}}]
    assert container["linuxParameters"] == {"sharedMemorySize": 2048}

    # Run-task request: the GPU capacity provider (so no launchType), same GPUs, the trial env.
    assert request["capacityProviderStrategy"] == [
        {"capacityProvider": "hpsweep-gpu", "weight": 1, "base": 0}]
    assert "launchType" not in request
    assert request["cluster"] == "hpsweep"
    assert request["taskDefinition"] == arn
    [override] = request["overrides"]["containerOverrides"]
    assert override["name"] == container["name"] == "prefect"
    assert _gpu(override) == [{"type": "GPU", "value": "2"}]
    assert (override["cpu"], override["memory"]) == (4096, 14336)
    assert override["command"] == ["prefect", "flow-run", "execute"]
    env = _env(override["environment"])
    assert env["MLFLOW_TRACKING_URI"] == TRACKING_URI
    assert env["HPSWEEP_DATA_REMOTE"] == DATA_REMOTE
    assert env["HPSWEEP_EXTRA"] == "yes"  # a deployment's own env is merged, not replacing ours
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_API_URL"] == WORKER_API_URL
    tags = {t["key"]: t["value"] for t in request["tags"]}
    assert tags["prefect.io/flow-run-id"] == str(flow_run.id)
    assert tags["prefect.io/work-pool-name"] == POOL


def test_pool_defaults_alone_render_a_one_gpu_trial_without_empty_env():
    """With nothing but the pool's defaults (no tracking URI set yet) nothing is rendered as
    an empty or null value: unset variables are dropped, not sent to AWS."""
    _TASK_DEFINITION_CACHE.clear()
    config, flow_run = _render({})
    worker = ECSWorker(work_pool_name=POOL)
    taskdef = worker._prepare_task_definition(config, region=REGION, flow_run=flow_run)
    request = worker._prepare_task_run_request(config, taskdef, "arn:td", True)
    [container] = taskdef["containerDefinitions"]
    assert container["image"] == "hpsweep-trainer:latest"
    assert _gpu(container) == [{"type": "GPU", "value": "1"}]
    env = _env(request["overrides"]["containerOverrides"][0]["environment"])
    assert "MLFLOW_TRACKING_URI" not in env and "HPSWEEP_DATA_REMOTE" not in env
    assert all(isinstance(v, str) for v in env.values())


# --------------------------------------------------------------------------- 3. moto ECS API


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ecs_api():
    """moto's ECS API in server mode on loopback, with the cluster, capacity provider and one
    registered container instance a trial needs to be placed."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    ecs = boto3.client("ecs", region_name=REGION, endpoint_url=url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    asg = (f"arn:aws:autoscaling:{REGION}:123456789012:autoScalingGroup:"
           f"{uuid.uuid4()}:autoScalingGroupName/hpsweep-gpu")
    ecs.create_cluster(clusterName="hpsweep")
    ecs.create_capacity_provider(name="hpsweep-gpu", autoScalingGroupProvider={
        "autoScalingGroupArn": asg, "managedTerminationProtection": "DISABLED",
        "managedScaling": {"status": "ENABLED", "targetCapacity": 100}})
    ecs.put_cluster_capacity_providers(
        cluster="hpsweep", capacityProviders=["hpsweep-gpu"],
        defaultCapacityProviderStrategy=[{"capacityProvider": "hpsweep-gpu", "weight": 1}])
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    instance = ec2.run_instances(ImageId="ami-12345678", InstanceType="g5.xlarge", MinCount=1,
                                 MaxCount=1)["Instances"][0]
    ecs.register_container_instance(cluster="hpsweep", instanceIdentityDocument=json.dumps(
        {"instanceId": instance["InstanceId"], "region": REGION, "instanceType": "g5.xlarge"}))
    try:
        yield url, ecs
    finally:
        server.stop()


def test_worker_registers_and_runs_the_trial_on_the_ecs_api(ecs_api):
    url, ecs = ecs_api
    _TASK_DEFINITION_CACHE.clear()
    variables = {
        **TRIAL_VARIABLES,
        # moto's container instances have a fixed 4096 CPU units / 7482 MiB; fit in them.
        "memory": 6144,
        "aws_credentials": {
            "region_name": REGION, "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_client_parameters": {"endpoint_url": url},
        },
    }
    config, flow_run = _render(variables)
    client = config.aws_credentials.get_client("ecs")
    assert client.meta.endpoint_url == url  # never real AWS

    sent: dict[str, dict] = {}

    def record(params, model, **_):
        sent[model.name] = copy.deepcopy(params)

    client.meta.events.register("provide-client-params.ecs.*", record)
    worker = ECSWorker(work_pool_name=POOL)
    task_arn, cluster_arn = worker._prepare_and_create_task(
        logging.getLogger("test_ecs_template"), client, config, flow_run)
    client.meta.events.unregister("provide-client-params.ecs.*", record)

    # What the worker sent: RegisterTaskDefinition then RunTask, as asserted offline above.
    assert set(sent) == {"RegisterTaskDefinition", "RunTask"}
    assert _gpu(sent["RegisterTaskDefinition"]["containerDefinitions"][0]) == [
        {"type": "GPU", "value": "2"}]
    assert sent["RunTask"]["capacityProviderStrategy"] == [
        {"capacityProvider": "hpsweep-gpu", "weight": 1, "base": 0}]
    assert "launchType" not in sent["RunTask"]

    # What ECS holds: the task definition ...
    taskdef = ecs.describe_task_definition(
        taskDefinition=sent["RunTask"]["taskDefinition"])["taskDefinition"]
    [container] = taskdef["containerDefinitions"]
    assert container["image"] == IMAGE
    assert _gpu(container) == [{"type": "GPU", "value": "2"}]
    assert _env(container["environment"])["HPSWEEP_DATA_CACHE"] == "/var/cache/hpsweep"
    assert container["mountPoints"][0]["containerPath"] == "/var/cache/hpsweep"
    assert taskdef["volumes"][0]["host"]["sourcePath"] == "/var/cache/hpsweep"
    assert taskdef["requiresCompatibilities"] == ["EC2"]
    assert taskdef["networkMode"] == "bridge"

    # ... and the running task: on the GPU capacity provider, with the trial's overrides.
    [task] = ecs.describe_tasks(cluster="hpsweep", tasks=[task_arn], include=["TAGS"])["tasks"]
    assert task["clusterArn"] == cluster_arn and cluster_arn.endswith("cluster/hpsweep")
    assert task["capacityProviderName"] == "hpsweep-gpu"
    assert task["containerInstanceArn"]  # placed on the (GPU) container instance
    [override] = task["overrides"]["containerOverrides"]
    assert _gpu(override) == [{"type": "GPU", "value": "2"}]
    env = _env(override["environment"])
    assert env["MLFLOW_TRACKING_URI"] == TRACKING_URI
    assert env["HPSWEEP_DATA_REMOTE"] == DATA_REMOTE
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert override["command"] == ["prefect", "flow-run", "execute"]
    tags = {t["key"]: t["value"] for t in task["tags"]}
    assert tags["prefect.io/flow-run-id"] == str(flow_run.id)


def test_an_integer_gpu_count_is_refused_by_the_ecs_api_client(ecs_api):
    """Why `gpus` is a string variable: Prefect substitutes a lone {{ placeholder }} with the
    value's own type, and the ECS API's resourceRequirements value must be a string."""
    _, ecs = ecs_api
    with pytest.raises(botocore.exceptions.ParamValidationError, match="resourceRequirements"):
        ecs.register_task_definition(family="int-gpus", containerDefinitions=[{
            "name": "prefect", "image": IMAGE, "memory": 512,
            "resourceRequirements": [{"type": "GPU", "value": 1}]}])
