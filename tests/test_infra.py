"""infra/cloudformation/hpsweep.yaml: the stack is created against moto's CloudFormation and
the resources it made are read back through the AWS APIs. Where moto does not implement a
resource type (bucket policies, secrets, ECS capacity providers, security-group egress rules)
the template itself is checked.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest
import yaml

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

# moto warns about each resource type its CloudFormation does not implement; the tests read those from the template
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "cloudformation" / "hpsweep.yaml"
REGION = "us-east-1"


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Ref, !Sub, ...) as their long-form dicts."""


def _short_form(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        return {name: value.split(".", 1) if suffix == "GetAtt" else value}
    if isinstance(node, yaml.SequenceNode):
        return {name: loader.construct_sequence(node, deep=True)}
    return {name: loader.construct_mapping(node, deep=True)}


_CfnLoader.add_multi_constructor("!", _short_form)


@pytest.fixture(scope="module", autouse=True)
def moto_parameter_group_ref():
    """moto 5.2 returns its DBParameterGroup object, not the group's name, for a !Ref; real
    CloudFormation returns the name. Give moto's model the name so the stack can be created."""
    from moto.rds.models import DBParameterGroup

    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(DBParameterGroup, "physical_resource_id"):
            mp.setattr(DBParameterGroup, "physical_resource_id", property(lambda self: self.name), raising=False)
        yield


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # noqa: S506 (a SafeLoader subclass)


def resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


# ---------------------------------------------------------------- the stack in moto

def create_stack(quota: str, instance_type: str, name: str = "hpsweep") -> dict:
    """Create the stack in the active moto mock; return its parameters and outputs."""
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{'ab'[i % 2]}")
               ["Subnet"]["SubnetId"] for i in range(4)]
    cert = boto3.client("acm", region_name=REGION).request_certificate(DomainName="mlflow.example.com")
    params = {
        "VpcId": vpc, "PrivateSubnetIds": ",".join(subnets[:2]), "LoadBalancerSubnetIds": ",".join(subnets[2:]),
        "CertificateArn": cert["CertificateArn"], "MlflowDomainName": "mlflow.example.com",
        "MlflowImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/hpsweep-mlflow:3.17.2-1",
        "GpuQuota": quota, "GpuInstanceType": instance_type,
    }
    cf = boto3.client("cloudformation", region_name=REGION)
    cf.create_stack(StackName=name, TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    return {"params": params, "outputs": outputs, "private": subnets[:2]}


@pytest.fixture(scope="module")
def stack():
    with moto.mock_aws():
        yield create_stack("10", "g5.12xlarge")


@pytest.mark.slow
@pytest.mark.parametrize(("quota", "instance_type", "instances"),
                         [("8", "g5.xlarge", 8), ("10", "g5.12xlarge", 3), ("3", "p4d.24xlarge", 1),
                          ("200", "g6.48xlarge", 25)])
def test_gpu_group_max_size_is_the_quota_in_instances(quota, instance_type, instances):
    with moto.mock_aws():
        create_stack(quota, instance_type)
        groups = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups()["AutoScalingGroups"]
    assert [(g["MinSize"], g["MaxSize"]) for g in groups] == [(0, instances)]


def test_quota_table_is_the_ceiling_of_the_division(template):
    table = template["Mappings"]["InstancesForQuota"]
    assert len(table) == 200 and template["Parameters"]["GpuQuota"]["AllowedPattern"]
    pattern = re.compile(template["Parameters"]["GpuQuota"]["AllowedPattern"])
    assert all(pattern.match(str(q)) for q in range(1, 201)) and not any(pattern.match(v) for v in ("0", "201", "8.5"))
    for q, row in table.items():
        assert row == {"G1": int(q), "G4": math.ceil(int(q) / 4), "G8": math.ceil(int(q) / 8)}


def test_buckets_are_encrypted_with_the_stack_key(stack):
    s3 = boto3.client("s3", region_name=REGION)
    (key,) = boto3.client("kms", region_name=REGION).list_keys()["Keys"]
    for bucket in (stack["outputs"]["DataBucketName"], stack["outputs"]["ArtifactBucketName"]):
        rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
        assert rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] == key["KeyArn"]


def test_buckets_block_public_access_and_keep_versions(template):
    # moto's CloudFormation applies neither PublicAccessBlockConfiguration nor versioning: read the template
    for name, bucket in resources_of(template, "AWS::S3::Bucket").items():
        assert bucket["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}, name
        rules = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
        assert any("NoncurrentVersionExpiration" in r for r in rules), name  # old versions do not pile up
        block = bucket["Properties"]["PublicAccessBlockConfiguration"]
        assert block == {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
                         "RestrictPublicBuckets": True}, name
        assert bucket["Properties"]["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]


def test_every_bucket_refuses_plain_http(template):
    buckets = resources_of(template, "AWS::S3::Bucket")
    policies = resources_of(template, "AWS::S3::BucketPolicy").values()
    covered = set()
    for policy in policies:
        for st in policy["Properties"]["PolicyDocument"]["Statement"]:
            if st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}:
                assert st["Principal"] == "*" and st["Action"] == "s3:*"
                covered.add(policy["Properties"]["Bucket"]["Ref"])
    assert covered == set(buckets)


def test_database_is_private_encrypted_multi_az(stack):
    rds = boto3.client("rds", region_name=REGION)
    (db,) = rds.describe_db_instances()["DBInstances"]
    assert db["Engine"] == "postgres" and db["StorageEncrypted"] and not db["PubliclyAccessible"] and db["MultiAZ"]
    assert {s["SubnetIdentifier"] for s in db["DBSubnetGroup"]["Subnets"]} == set(stack["private"])


def test_database_credentials_live_in_secrets_manager(template):
    props = template["Resources"]["Database"]["Properties"]
    for key in ("MasterUsername", "MasterUserPassword"):
        assert props[key]["Fn::Sub"].startswith("{{resolve:secretsmanager:${DbSecret}")
    for name, secret in resources_of(template, "AWS::SecretsManager::Secret").items():
        assert "GenerateSecretString" in secret["Properties"] and "SecretString" not in secret["Properties"], name
        assert secret["Properties"]["KmsKeyId"] == {"Ref": "Key"}
    assert props["DeletionProtection"] is True and props["BackupRetentionPeriod"] >= 7
    assert props["DBParameterGroupName"] == {"Ref": "DbParameterGroup"}
    assert template["Resources"]["DbParameterGroup"]["Properties"]["Parameters"]["rds.force_ssl"] == "1"


def test_mlflow_runs_behind_https_only(stack):
    elb = boto3.client("elbv2", region_name=REGION)
    (lb,) = elb.describe_load_balancers()["LoadBalancers"]
    assert lb["Scheme"] == "internal"
    listeners = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    assert [(x["Protocol"], x["Port"]) for x in listeners] == [("HTTPS", 443)]
    assert listeners[0]["Certificates"][0]["CertificateArn"] == stack["params"]["CertificateArn"]
    assert listeners[0]["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    (tg,) = elb.describe_target_groups()["TargetGroups"]
    assert (tg["HealthCheckPath"], tg["Port"], tg["TargetType"]) == ("/health", 5000, "ip")


def test_mlflow_service_gets_secrets_by_reference_only(stack):
    ecs = boto3.client("ecs", region_name=REGION)
    cluster = stack["outputs"]["ClusterName"]
    assert ecs.describe_clusters(clusters=[cluster])["clusters"][0]["clusterName"] == "hpsweep"
    (arn,) = ecs.list_services(cluster=cluster)["serviceArns"]
    (service,) = ecs.describe_services(cluster=cluster, services=[arn])["services"]
    assert service["desiredCount"] == 2
    (container,) = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"][
        "containerDefinitions"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow@")
    assert ":" not in env["MLFLOW_BACKEND_STORE_URI"].split("//")[1].split("@")[0]  # no password in the URI
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{stack['outputs']['ArtifactBucketName']}/mlflow"
    assert {s["name"] for s in container["secrets"]} == {"PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                                         "HPSWEEP_TRAINER_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert not any("PASSWORD" in name or "SECRET" in name for name in env)
    assert container["readonlyRootFilesystem"] is True


def test_mlflow_service_is_private_behind_the_load_balancer(template):
    # moto keeps neither the launch type nor the network and load-balancer settings of a service
    svc = template["Resources"]["MlflowService"]["Properties"]
    assert svc["LaunchType"] == "FARGATE"
    net = svc["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert net["AssignPublicIp"] == "DISABLED" and net["Subnets"] == {"Ref": "PrivateSubnetIds"}
    assert svc["LoadBalancers"] == [{"ContainerName": "mlflow", "ContainerPort": 5000,
                                     "TargetGroupArn": {"Ref": "MlflowTargetGroup"}}]


def _policy(doc) -> dict:
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(doc)
    except json.JSONDecodeError:  # moto stores CloudFormation-made inline policies as a Python repr
        return ast.literal_eval(doc)


def test_trial_task_role_reads_the_data_bucket_and_nothing_else(stack):
    iam = boto3.client("iam", region_name=REGION)
    role = stack["outputs"]["TrialTaskRoleArn"].rsplit("/", 1)[1]
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    statements = []
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        statements += _policy(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])["Statement"]
    bucket = f"arn:aws:s3:::{stack['outputs']['DataBucketName']}"
    granted = {(s["Action"], s["Resource"] if isinstance(s["Resource"], str) else tuple(s["Resource"]))
               for s in statements}
    assert ("s3:ListBucket", bucket) in granted and ("s3:GetObject", f"{bucket}/*") in granted
    kms = [s for s in statements if s["Action"] == "kms:Decrypt"]
    assert len(kms) == 1 and kms[0]["Condition"]["StringEquals"]["kms:ViaService"] == "s3.us-east-1.amazonaws.com"
    assert len(statements) == 3 and all(s["Effect"] == "Allow" for s in statements)
    assert not any("*" in s["Action"] for s in statements)


def test_network_is_closed_by_default(template):
    sgs = resources_of(template, "AWS::EC2::SecurityGroup")
    assert "SecurityGroupIngress" not in sgs["GpuInstanceSecurityGroup"]["Properties"]
    (db_in,) = sgs["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert (db_in["FromPort"], db_in["SourceSecurityGroupId"]) == (5432, {"Ref": "MlflowSecurityGroup"})
    (mlflow_in,) = sgs["MlflowSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert mlflow_in["SourceSecurityGroupId"] == {"Ref": "LoadBalancerSecurityGroup"}
    lb_in = sgs["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [(r["FromPort"], r["CidrIp"]) for r in lb_in] == [(443, {"Ref": "ClientCidr"})]
    for sg in sgs.values():
        for rule in sg["Properties"].get("SecurityGroupIngress", []):
            assert rule.get("CidrIp") != "0.0.0.0/0"
    db = template["Resources"]["Database"]["Properties"]
    assert db["PubliclyAccessible"] is False and db["DBSubnetGroupName"] == {"Ref": "DbSubnetGroup"}


def test_gpu_fleet_is_an_ecs_capacity_provider_with_managed_scaling(template):
    cp = template["Resources"]["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert cp["AutoScalingGroupArn"] == {"Ref": "GpuAutoScalingGroup"}
    assert cp["ManagedTerminationProtection"] == "ENABLED" and cp["ManagedScaling"]["Status"] == "ENABLED"
    asg = template["Resources"]["GpuAutoScalingGroup"]["Properties"]
    assert asg["NewInstancesProtectedFromScaleIn"] is True and asg["VPCZoneIdentifier"] == {"Ref": "PrivateSubnetIds"}
    lt = template["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert lt["MetadataOptions"]["HttpTokens"] == "required" and lt["BlockDeviceMappings"][0]["Ebs"]["Encrypted"]
    assert "ECS_ENABLE_GPU_SUPPORT=true" in lt["UserData"]["Fn::Base64"]["Fn::Sub"]


def test_log_groups_are_encrypted_with_retention(stack, template):
    logs = boto3.client("logs", region_name=REGION)
    groups = {g["logGroupName"]: g for g in logs.describe_log_groups(logGroupNamePrefix="/hpsweep/")["logGroups"]}
    assert set(groups) == {"/hpsweep/hpsweep/mlflow", "/hpsweep/hpsweep/trials"}
    assert all(g.get("retentionInDays") == 365 for g in groups.values())
    for group in resources_of(template, "AWS::Logs::LogGroup").values():
        assert group["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["Key", "Arn"]}


def test_no_secret_is_written_in_the_template():
    text = TEMPLATE.read_text()
    literal = re.compile(r"(?im)^\s*-?\s*\{?\s*(\w*password\w*|\w*secret\w*)\s*:[ \t]*['\"]?[A-Za-z0-9+/=_-]{8,}['\"]?\s*$")
    assert not literal.search(text)
    assert "AKIA" not in text
