"""infra/cloudformation/hpsweep.yaml: the stack is created against moto's CloudFormation and
the resources it made are read back through the AWS APIs. Where moto does not implement a
resource type (bucket policies, secrets, ECS capacity providers, security-group egress rules)
the template itself is checked.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

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

def create_stack(quota: str, instance_type: str, name: str = "hpsweep", **extra: str) -> dict:
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
        "GpuQuota": quota, "GpuInstanceType": instance_type, "S3PrefixListId": "pl-63a5400a", **extra,
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
    assert (tg["HealthCheckPath"], tg["Port"], tg["TargetType"]) == ("/health", 5443, "ip")
    # TLS again from the load balancer to the task: credentials never cross the VPC in clear
    assert (tg["Protocol"], tg["HealthCheckProtocol"]) == ("HTTPS", "HTTPS")


def test_mlflow_service_gets_secrets_by_reference_only(stack):
    ecs = boto3.client("ecs", region_name=REGION)
    cluster = stack["outputs"]["ClusterName"]
    assert ecs.describe_clusters(clusters=[cluster])["clusters"][0]["clusterName"] == "hpsweep"
    (arn,) = ecs.list_services(cluster=cluster)["serviceArns"]
    (service,) = ecs.describe_services(cluster=cluster, services=[arn])["services"]
    assert service["desiredCount"] == 2
    containers = {c["name"]: c for c in ecs.describe_task_definition(taskDefinition=service["taskDefinition"])[
        "taskDefinition"]["containerDefinitions"]}
    assert set(containers) == {"db-bootstrap", "tls", "mlflow"}
    container = containers["mlflow"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    # the server's own database user, not the master ("mlflow", DbSecret), and the server's certificate checked
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow_server@")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow?sslmode=verify-full&sslrootcert=/etc/ssl/rds/global-bundle.pem")
    assert ":" not in env["MLFLOW_BACKEND_STORE_URI"].split("//")[1].split("@")[0]  # no password in the URI
    assert env["MLFLOW_HOST"] == "127.0.0.1"  # reachable only through the task's tls container
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{stack['outputs']['ArtifactBucketName']}/mlflow"
    assert {s["name"] for s in container["secrets"]} == {"PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                                         "HPSWEEP_TRAINER_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                                         "MLFLOW_CRYPTO_KEK_PASSPHRASE", "HPSWEEP_SWEEP_PASSWORD"}
    assert not any("PASSWORD" in name or "SECRET" in name for name in env)
    assert all(c["readonlyRootFilesystem"] is True for c in containers.values())


def test_only_the_bootstrap_container_gets_the_database_master(template):
    task = template["Resources"]["MlflowTaskDefinition"]["Properties"]
    containers = {c["Name"]: c for c in task["ContainerDefinitions"]}
    secrets = {name: {s["Name"]: s["ValueFrom"]["Fn::Sub"] if isinstance(s["ValueFrom"], dict) and "Fn::Sub" in
                      s["ValueFrom"] else s["ValueFrom"] for s in c.get("Secrets", [])} for name, c in containers.items()}
    master = [name for name, s in secrets.items() if any("${DbSecret}" in str(v) for v in s.values())]
    assert master == ["db-bootstrap"]
    assert secrets["mlflow"]["PGPASSWORD"] == "${DbAppSecret}:password::"
    assert containers["db-bootstrap"]["Essential"] is False
    assert containers["mlflow"]["DependsOn"] == [{"ContainerName": "db-bootstrap", "Condition": "SUCCESS"}]
    bootstrap_env = {e["Name"]: e["Value"] for e in containers["db-bootstrap"]["Environment"]}
    assert bootstrap_env["PGSSLMODE"] == "verify-full"
    assert bootstrap_env["PGSSLROOTCERT"] == "/etc/ssl/rds/global-bundle.pem"
    assert template["Resources"]["Database"]["Properties"]["CACertificateIdentifier"] == "rds-ca-rsa2048-g1"
    app_user = json.loads(template["Resources"]["DbAppSecret"]["Properties"]["GenerateSecretString"]
                          ["SecretStringTemplate"])["username"]
    assert app_user == bootstrap_env["MLFLOW_DB_USER"] == "mlflow_server"


def test_the_image_carries_the_rds_ca_bundle_and_the_tls_proxy():
    dockerfile = (TEMPLATE.parents[2] / "mlflow_server" / "Dockerfile").read_text()
    assert "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem" in dockerfile
    assert "/etc/ssl/rds/global-bundle.pem" in dockerfile
    assert "stunnel4" in dockerfile and "openssl" in dockerfile


def test_tls_ends_in_the_task(template):
    task = template["Resources"]["MlflowTaskDefinition"]["Properties"]
    tls = next(c for c in task["ContainerDefinitions"] if c["Name"] == "tls")
    assert tls["PortMappings"] == [{"ContainerPort": 5443, "Protocol": "tcp"}] and tls["Essential"] is True
    script = tls["Command"][0]
    assert "accept = 0.0.0.0:5443" in script and "connect = 127.0.0.1:5000" in script
    assert "sslVersionMin = TLSv1.2" in script
    mlflow = next(c for c in task["ContainerDefinitions"] if c["Name"] == "mlflow")
    assert "PortMappings" not in mlflow  # the server's plain port is not published


def test_mlflow_service_is_private_behind_the_load_balancer(template):
    # moto keeps neither the launch type nor the network and load-balancer settings of a service
    svc = template["Resources"]["MlflowService"]["Properties"]
    assert svc["LaunchType"] == "FARGATE"
    net = svc["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert net["AssignPublicIp"] == "DISABLED" and net["Subnets"] == {"Ref": "PrivateSubnetIds"}
    assert svc["LoadBalancers"] == [{"ContainerName": "tls", "ContainerPort": 5443,
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
    assert (mlflow_in["FromPort"], mlflow_in["ToPort"]) == (5443, 5443)
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


def test_trial_containers_cannot_reach_the_instance_role(stack, template):
    """Trials run with bridge networking: IMDSv2 with hop limit 1 means the token's answer dies at
    the docker bridge, and the user data drops bridge traffic to the metadata address; trials get
    only the task role, from the ECS agent's endpoint. (That the packets really die needs AWS.)"""
    ec2 = boto3.client("ec2", region_name=REGION)
    (lt,) = ec2.describe_launch_templates()["LaunchTemplates"]
    (version,) = ec2.describe_launch_template_versions(LaunchTemplateId=lt["LaunchTemplateId"])[
        "LaunchTemplateVersions"]
    options = version["LaunchTemplateData"]["MetadataOptions"]
    assert (options["HttpTokens"], options["HttpPutResponseHopLimit"]) == ("required", 1)
    user_data = template["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"][
        "Fn::Base64"]["Fn::Sub"]
    assert "iptables -t raw -I PREROUTING -i docker+ -d 169.254.169.254/32 -j DROP" in user_data
    assert "ECS_ENABLE_TASK_IAM_ROLE=true" in user_data


def _egress(template: dict, group: str) -> list[dict]:
    inline = template["Resources"][group]["Properties"].get("SecurityGroupEgress", [])
    separate = [r["Properties"] for r in resources_of(template, "AWS::EC2::SecurityGroupEgress").values()
                if r["Properties"]["GroupId"] == {"Ref": group}]
    return inline + separate


def test_egress_goes_to_vpc_endpoints_not_the_internet(template):
    endpoint_sg = {"Fn::If": ["CreateVpcEndpoints", {"Ref": "VpcEndpointSecurityGroup"},
                              {"Ref": "VpcEndpointSecurityGroupId"}]}
    for group in ("MlflowSecurityGroup", "GpuInstanceSecurityGroup"):
        rules = _egress(template, group)
        assert not any(r.get("CidrIp") == "0.0.0.0/0" for r in rules), group
        targets = [r.get("DestinationPrefixListId") or r.get("DestinationSecurityGroupId") or r.get("CidrIp")
                   for r in rules if r["FromPort"] == 443]
        assert {"Ref": "S3PrefixListId"} in targets and endpoint_sg in targets, group
    gpu = [r.get("DestinationSecurityGroupId") or r.get("CidrIp") for r in _egress(template, "GpuInstanceSecurityGroup")]
    assert {"Ref": "LoadBalancerSecurityGroup"} in gpu and {"Ref": "PrefectApiCidr"} in gpu
    prefect = template["Resources"]["GpuInstancesToPrefectApi"]
    assert prefect["Condition"] == "PrefectApiEgress"  # none unless a Prefect API range is given
    services = {r["Properties"]["ServiceName"]["Fn::Sub"].rsplit(".", 1)[-1] if "ecr." not in
                r["Properties"]["ServiceName"]["Fn::Sub"] else r["Properties"]["ServiceName"]["Fn::Sub"].split("}.")[1]
                for r in resources_of(template, "AWS::EC2::VPCEndpoint").values()}
    assert {"ecr.api", "ecr.dkr", "secretsmanager", "logs", "ecs", "ecs-agent", "ecs-telemetry"} <= services
    for endpoint in resources_of(template, "AWS::EC2::VPCEndpoint").values():
        assert endpoint["Condition"] == "CreateVpcEndpoints"
        assert endpoint["Properties"]["SecurityGroupIds"] == [{"Ref": "VpcEndpointSecurityGroup"}]
        assert endpoint["Properties"]["PrivateDnsEnabled"] is True


def test_stack_makes_the_interface_endpoints(stack):
    ec2 = boto3.client("ec2", region_name=REGION)
    names = {e["ServiceName"] for e in ec2.describe_vpc_endpoints()["VpcEndpoints"]}
    assert {f"com.amazonaws.{REGION}.{s}" for s in ("ecr.api", "ecr.dkr", "secretsmanager", "logs")} <= names


def test_internet_clients_need_allow_internet(template):
    pattern = re.compile(template["Parameters"]["ClientCidr"]["AllowedPattern"])
    assert all(pattern.match(c) for c in ("10.0.0.0/8", "192.168.4.0/24", "203.0.113.7/32", "0.0.0.0/0"))
    assert not any(pattern.match(c) for c in ("0.0.0.0/1", "128.0.0.0/2", "10.0.0.0/7", "1.2.3.4/0"))
    (rule,) = template["Rules"].values()
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "AllowInternet"}, "false"]}
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ClientCidr"}, "0.0.0.0/0"]}]}
    assert template["Parameters"]["AllowInternet"]["Default"] == "false"


def test_internet_clients_get_a_waf_with_a_rate_limit(template):
    assert template["Conditions"]["InternetClients"] == {"Fn::Equals": [{"Ref": "AllowInternet"}, "true"]}
    for name in ("WebAcl", "WebAclAssociation", "WafLogging", "WafLogGroup"):
        assert template["Resources"][name]["Condition"] == "InternetClients", name
    acl = template["Resources"]["WebAcl"]["Properties"]
    (rate,) = [r for r in acl["Rules"] if "RateBasedStatement" in r["Statement"]]
    assert rate["Action"] == {"Block": {}}
    assert rate["Statement"]["RateBasedStatement"] == {"Limit": {"Ref": "WafRateLimit"}, "EvaluationWindowSec": 300,
                                                      "AggregateKeyType": "IP"}
    association = template["Resources"]["WebAclAssociation"]["Properties"]
    assert association == {"ResourceArn": {"Ref": "LoadBalancer"}, "WebACLArn": {"Fn::GetAtt": ["WebAcl", "Arn"]}}
    logging = template["Resources"]["WafLogging"]["Properties"]
    assert logging["RedactedFields"] == [{"SingleHeader": {"Name": "authorization"}}]


def test_internet_stack_is_created_with_its_waf():
    # moto's CloudFormation neither evaluates Rules nor makes WAFv2 resources: this shows that the
    # conditional resources resolve and appear only when asked for; their properties are checked above
    with moto.mock_aws():
        cf = boto3.client("cloudformation", region_name="eu-west-1")
        for name, extra in (("open", {"ClientCidr": "0.0.0.0/0", "AllowInternet": "true"}), ("closed", {})):
            cf.create_stack(StackName=name, TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in extra.items()]
                            + _required_parameters("eu-west-1"))
        listed = {name: {r["LogicalResourceId"] for r in cf.list_stack_resources(StackName=name)
                         ["StackResourceSummaries"]} for name in ("open", "closed")}
    # moto lists only what it made: of the InternetClients resources, the WAF's log group
    assert "WafLogGroup" in listed["open"] and "WafLogGroup" not in listed["closed"]


def _required_parameters(region: str) -> list[dict]:
    ec2 = boto3.client("ec2", region_name=region)
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.30.{i}.0/24", AvailabilityZone=f"{region}{'ab'[i]}")
               ["Subnet"]["SubnetId"] for i in range(2)]
    cert = boto3.client("acm", region_name=region).request_certificate(DomainName="mlflow.example.com")
    params = {"VpcId": vpc, "PrivateSubnetIds": ",".join(subnets), "LoadBalancerSubnetIds": ",".join(subnets),
              "CertificateArn": cert["CertificateArn"], "MlflowDomainName": "mlflow.example.com",
              "MlflowImage": "mlflow:1", "S3PrefixListId": "pl-6da54004"}
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()]


def test_alb_log_delivery_is_for_this_account_only(template):
    statements = template["Resources"]["AccessLogsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    (alb,) = [s for s in statements if s["Principal"] == {"Service": "logdelivery.elasticloadbalancing.amazonaws.com"}]
    assert alb["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


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


# ---------------------------------------------------------------- the db-bootstrap container, on a real PostgreSQL

@pytest.fixture
def scratch_names():
    """A user and two databases of its own on the test PostgreSQL (PG_DSN, as a superuser standing in
    for the RDS master); all dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    from tests.conftest import PG_DSN

    prefix = f"hpsweep_boot_{uuid.uuid4().hex[:8]}"
    names = {"user": prefix, "databases": [f"{prefix}_mlflow", f"{prefix}_auth"], "dsn": PG_DSN}
    try:
        admin = psycopg.connect(f"{PG_DSN}/postgres", autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"no test PostgreSQL: {e}")
    try:
        yield names
    finally:
        for db in names["databases"]:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{names["user"]}"')
        admin.close()


def _bootstrap(template: dict, names: dict, password: str) -> None:
    (container,) = [c for c in template["Resources"]["MlflowTaskDefinition"]["Properties"]["ContainerDefinitions"]
                    if c["Name"] == "db-bootstrap"]
    master = urlsplit(names["dsn"])
    env = {**os.environ, "PGHOST": master.hostname, "PGPORT": str(master.port or 5432), "PGUSER": master.username,
           "PGPASSWORD": master.password or "", "MLFLOW_DB_USER": names["user"], "MLFLOW_DB_PASSWORD": password,
           "MLFLOW_DATABASES": ",".join(names["databases"])}
    subprocess.run([sys.executable, "-c", container["Command"][0]], env=env, check=True, capture_output=True)


def test_bootstrap_gives_the_server_its_own_user_and_only_its_databases(template, scratch_names):
    import psycopg

    names, (main_db, auth_db) = scratch_names, scratch_names["databases"]
    # a stack from before: the master owns the main database and its tables
    with psycopg.connect(f"{names['dsn']}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{main_db}"')
    with psycopg.connect(f"{names['dsn']}/{main_db}", autocommit=True) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id serial PRIMARY KEY, name text)")

    verifiers = []
    for password in ("first-app-password-1", "second-app-password-2"):  # every task start: idempotent
        _bootstrap(template, names, password)
        with psycopg.connect(f"{names['dsn']}/postgres") as conn:
            verifiers += conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [names["user"]]).fetchone()
    # hashed before it left the container; the new password replaced the old one
    assert all(v.startswith("SCRAM-SHA-256$") for v in verifiers) and verifiers[0] != verifiers[1]

    master = urlsplit(names["dsn"])
    app = {"host": master.hostname, "port": master.port or 5432, "user": names["user"],
           "password": "second-app-password-2"}
    with psycopg.connect(dbname=main_db, autocommit=True, **app) as conn:
        row = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                           "FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False, False, False, False, False)
        owners = dict(conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datdba = "
                                   "(SELECT oid FROM pg_roles WHERE rolname = current_user)").fetchall())
        assert owners == {main_db: names["user"], auth_db: names["user"]}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f'CREATE DATABASE "{names["user"]}_other"')
        conn.execute("ALTER TABLE experiments ADD COLUMN lifecycle_stage text")  # the old table is its own now
        assert conn.execute("SELECT nextval('experiments_experiment_id_seq')").fetchone() == (1,)
    for db in names["databases"]:  # what MLflow's migrations and the tag index need
        with psycopg.connect(dbname=db, autocommit=True, **app) as conn:
            conn.execute("CREATE TABLE probe (id int)")
            conn.execute("CREATE INDEX CONCURRENTLY probe_id ON probe USING hash (id)")
        # nobody else may connect (CONNECT revoked from PUBLIC)
        with psycopg.connect(f"{names['dsn']}/postgres", autocommit=True) as conn:
            assert conn.execute("SELECT has_database_privilege('public', %s, 'CONNECT')", [db]).fetchone() == (False,)
