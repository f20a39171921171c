"""YAML configuration loaded into typed dataclasses, with `--section.key value` command-line overrides.

Every script declares its configuration as a dataclass whose fields are section dataclasses, then calls
`parse_config`. The YAML file and the overrides are checked against the declared fields and types, so a typo or a
wrong type is reported with the key's name and the valid keys instead of surfacing later as a strange failure.
"""

import argparse
import dataclasses
import functools
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml


class InputError(ValueError):
    """Bad input from the user (config, command line, data file, checkpoint): reported as one line, exit code 2."""


def exit_on_input_error(main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a script's main so that an InputError ends the process with `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper():
        try:
            return main()
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation (int, float, bool, str, list[...], X | None), converting only where
    no information is lost (int -> float, a single string -> a one-element list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except InputError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise InputError(f"{key} must be a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config type {annotation!r} for {key}")
    raise InputError(f"{key} must be {_type_name(annotation)}, got {value!r}")


def _field_types(dataclass_type: type) -> dict[str, Any]:
    hints = typing.get_type_hints(dataclass_type)
    return {field.name: hints[field.name] for field in dataclasses.fields(dataclass_type)}


def build_config(schema: type, values: dict[str, Any]) -> Any:
    """Build `schema` (a dataclass of section dataclasses) from a nested dict, checking every key and type."""
    if not isinstance(values, dict):
        raise InputError(f"the configuration must be a mapping of sections, got {type(values).__name__}")
    sections = _field_types(schema)
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise InputError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(sections)}")
    built = {}
    for section_name, section_type in sections.items():
        section_values = values.get(section_name) or {}
        if not isinstance(section_values, dict):
            raise InputError(f"section '{section_name}' must be a mapping, got {section_values!r}")
        fields = _field_types(section_type)
        unknown = sorted(set(section_values) - set(fields))
        if unknown:
            raise InputError(f"unknown key '{section_name}.{unknown[0]}'; valid keys in {section_name}: "
                             f"{', '.join(fields)}")
        checked = {name: _coerce(value, fields[name], f"{section_name}.{name}") for name, value in section_values.items()}
        try:
            built[section_name] = section_type(**checked)
        except (TypeError, ValueError) as error:
            raise InputError(f"section '{section_name}': {error}") from None
    return schema(**built)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML (written whole to a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
    temporary.replace(path)


def _describe_keys(schema: type) -> str:
    lines = ["configuration keys (override any with --section.key VALUE; values are YAML scalars):"]
    for section_name, section_type in _field_types(schema).items():
        for field in dataclasses.fields(section_type):
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else "required")
            annotation = _field_types(section_type)[field.name]
            lines.append(f"  --{section_name}.{field.name} ({_type_name(annotation)}, default: {default!r})")
    return "\n".join(lines)


def parse_config(schema: type, default_config: str | None, description: str, argv: list[str] | None = None,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> tuple[Any, argparse.Namespace]:
    """Parse `--config FILE` and `--section.key value` overrides into a checked `schema` instance.

    Returns the configuration and the parsed script arguments: `--config` plus whatever `add_arguments` declares
    (for example `--resume`). Raises InputError for a missing file, bad YAML, an unknown key or a wrong type.
    """
    parser = argparse.ArgumentParser(description=description, epilog=_describe_keys(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=default_config, help=f"YAML file (default: {default_config})")
    if add_arguments is not None:
        add_arguments(parser)
    arguments, rest = parser.parse_known_args(argv)

    values: dict[str, Any] = {}
    if arguments.config is not None:
        path = Path(arguments.config)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise InputError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: the configuration must be a mapping of sections")

    index = 0
    while index < len(rest):
        option = rest[index]
        if not option.startswith("--") or "." not in option:
            raise InputError(f"unexpected argument '{option}'; overrides look like --section.key VALUE (see --help)")
        key, has_value, value_text = option[2:].partition("=")
        if not has_value:
            if index + 1 >= len(rest):
                raise InputError(f"missing value for --{key}")
            index += 1
            value_text = rest[index]
        section_name, _, field_name = key.partition(".")
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            value = value_text
        section = values.setdefault(section_name, {})
        if not isinstance(section, dict):
            raise InputError(f"section '{section_name}' must be a mapping")
        section[field_name] = value
        index += 1
    return build_config(schema, values), arguments
