"""Reading deploy/template.yaml: CloudFormation short tags (!Ref, !Sub, !GetAtt...) as long form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "template.yaml"


class _CfnLoader(yaml.SafeLoader):
    """A YAML loader that reads CloudFormation short tags as their long form."""


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


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_CfnLoader)  # noqa: S506
    assert isinstance(doc, dict)
    return doc


NO_VALUE = {"Ref": "AWS::NoValue"}
_DROP = object()


class Resolver:
    """Evaluates the template's conditions and intrinsic functions for one set of parameter
    values (their defaults unless given); pseudo parameters and !Sub strings stay symbolic."""

    def __init__(self, template: dict[str, Any], **params: Any) -> None:
        self.template = template
        self.params = {
            name: spec.get("Default") for name, spec in template.get("Parameters", {}).items()
        }
        self.params.update(params)

    def condition(self, name: str) -> bool:
        return bool(self.value(self.template["Conditions"][name]))

    def value(self, node: Any) -> Any:
        out = self._value(node)
        return None if out is _DROP else out

    def _value(self, node: Any) -> Any:
        if isinstance(node, list):
            items = [self._value(v) for v in node]
            return [v for v in items if v is not _DROP]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                if arg == "AWS::NoValue":
                    return _DROP
                return self.params.get(arg, node)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::If":
                cond, then, otherwise = arg
                return self._value(then if self.condition(cond) else otherwise)
            if key == "Fn::Equals":
                left, right = (self._value(v) for v in arg)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self._value(arg[0])
            if key == "Fn::Or":
                return any(self._value(v) for v in arg)
            if key == "Fn::And":
                return all(self._value(v) for v in arg)
        return {k: v for k, v in ((k, self._value(v)) for k, v in node.items()) if v is not _DROP}

    def rules_hold(self) -> bool:
        """Whether every assertion of the template's Rules holds for these parameters."""
        return all(
            self.value(a["Assert"])
            for rule in self.template.get("Rules", {}).values()
            for a in rule["Assertions"]
        )
