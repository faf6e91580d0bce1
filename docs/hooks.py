"""MkDocs hook: the configuration reference, generated at build time from the code, so it cannot drift.

One page per config group (``reference/<group>.md``, ``reference/config.md`` for the root): each option
file under ``conf/<group>/`` (its leading comment, the schema or option it builds on, the file itself),
then each schema that ``ctxdistill.config.register_schemas()`` puts in Hydra's ConfigStore for that
group: every field with its type, its default and the comment written beside it in the dataclass.
Nothing here names a schema or a group: a schema moved to another module, or a new group, shows up on
its own. The pages join the nav section that holds ``reference/index.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import html
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SRC = ROOT / "src"
INDEX = "reference/index.md"
ROOT_PAGE = "config"  # the root config: conf/config.yaml and the schema stored outside any group
# Groups in this order first (the order of a run: method x model x dataset + trainer, logger), then the rest.
ORDER = ["config", "method", "model", "dataset", "ood", "trainer", "logger", "experiment", "hydra"]

_pages: dict[str, str] = {}  # page name -> markdown, built once per build


# ---------------------------------------------------------------- the schemas
def registered_schemas() -> dict[str, dict[str, Any]]:
    """{group path ("" for the root, "trainer/distributed" for a subgroup): {schema name: ConfigNode}} for
    every node of ctxdistill's, as register_schemas() leaves the ConfigStore (Hydra's own are left out)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))  # the checkout's code, installed or not
    from hydra.core.config_store import ConfigStore

    from ctxdistill.config import register_schemas

    register_schemas()
    found: dict[str, dict[str, Any]] = {}

    def walk(tree: dict, group: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{group}/{key}" if group else key)
                continue
            schema = OmegaConf.get_type(value.node)
            if dataclasses.is_dataclass(schema) and schema.__module__.split(".")[0] == "ctxdistill":
                found.setdefault(group, {})[key.removesuffix(".yaml")] = value

    walk(ConfigStore.instance().repo, "")
    if not found:
        raise RuntimeError("register_schemas() stored no ctxdistill schema in the ConfigStore")
    return found


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field written in ``cls``'s body: the comment lines just above it and the one at its
    end. Empty when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        body = ast.parse(source).body[0].body
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError, AttributeError):
        return {}
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokens
        if t.type == tokenize.COMMENT and not re.match(r"#\s*(type:|noqa)", t.string)
    }
    lines = source.splitlines()
    result = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        end = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        text = " ".join(part for part in above + end if part)
        if text:
            result[node.target.id] = text
    return result


def comment_of(cls: type, name: str) -> str:
    """A field's comment where it is written: the class itself, or the first base class that has one."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            text = field_comments(klass).get(name)
            if text:
                return text
    return ""


def docstring(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclass() writes the signature when none


def type_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(typing|[a-z_]+(\.[a-z_]+)*)\.", "", str(annotation))


def named_types(cls: type, annotation: Any) -> list[type]:
    """The classes a field's type names (``Optional[ModelConfig]``, ``list[EvalSetConfig]``, an enum ...)."""
    if isinstance(annotation, str):  # postponed annotations: look the names up where the class is defined
        namespace = vars(sys.modules.get(cls.__module__, object()))
        found = [namespace.get(name) for name in re.findall(r"[A-Za-z_]\w*", annotation)]
        return [t for t in dict.fromkeys(found) if isinstance(t, type)]
    if isinstance(annotation, type) and not get_args(annotation):
        return [annotation]
    return [t for arg in get_args(annotation) for t in named_types(cls, arg)]


# ---------------------------------------------------------------- markdown
def plain(text: str) -> str:
    """Text shown as it is written: no markup, no HTML, no table-cell break."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def default_text(node: Any, name: str) -> str:
    if OmegaConf.is_missing(node, name):
        return "required"
    if OmegaConf.is_interpolation(node, name):
        return code(str(node._get_node(name)._value()))
    value = node[name]
    if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
        return "its fields"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return code(json.dumps(value, ensure_ascii=False, default=lambda v: v.name if isinstance(v, Enum) else str(v)))


class Page:
    """One reference page; schemas it shows are anchored by name, the nested ones it meets are added once."""

    def __init__(self, name: str, anchors: dict[type, str]):
        self.name, self.anchors, self.lines = name, anchors, []
        self.nested: list[type] = []

    def link(self, cls: type) -> str:
        target = self.anchors.get(cls)
        if target is None:  # a dataclass only used inside others: its own table on this page
            if cls not in self.nested:
                self.nested.append(cls)
            target = f"#{cls.__name__}"
        elif target.startswith(f"{self.name}.md#"):
            target = target[len(self.name) + 3 :]
        return f"[{cls.__name__}]({target})"

    def fields_table(self, cls: type, node: Any) -> None:
        self.lines += ["| field | type | default | what |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            what = plain(comment_of(cls, f.name))
            types = named_types(cls, f.type)
            for enum in (t for t in types if issubclass(t, Enum)):
                values = ", ".join(f"`{member.name}`" for member in enum)
                what = f"{what} (one of {values})" if what else f"One of {values}."
            links = [self.link(t) for t in types if dataclasses.is_dataclass(t)]
            if links:
                what = f"{what} (see {', '.join(links)})" if what else f"see {', '.join(links)}"
            self.lines.append(f"| `{f.name}` | {code(type_text(f.type))} | {default_text(node, f.name)} | {what} |")
        self.lines.append("")

    def schema(self, title: str, anchor: str, cls: type, node: Any, note: str = "") -> None:
        self.lines += [f"### {title} {{#{anchor}}}", ""]
        doc = docstring(cls)
        if doc:
            self.lines += [plain(doc), ""]
        self.lines += [f"Dataclass `{cls.__module__}.{cls.__qualname__}`{note}.", ""]
        self.fields_table(cls, node)

    def nested_tables(self) -> None:
        done: list[type] = []
        while len(done) < len(self.nested):  # tables may name further dataclasses
            cls = next(c for c in self.nested if c not in done)
            done.append(cls)
            if len(done) == 1:
                self.lines += ["## Nested settings", "", "Dataclasses the schemas above hold as fields.", ""]
            self.schema(f"`{cls.__name__}`", cls.__name__, cls, OmegaConf.structured(cls))


# ---------------------------------------------------------------- the option files
def leading_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        line = line.lstrip("#").strip()
        if line.startswith("@package"):
            continue
        if not line:
            if lines and lines[-1]:
                lines.append("")
            continue
        lines.append(line)
    paragraphs = " ".join(line if line else "\n\n" for line in lines).replace(" \n\n ", "\n\n")
    return paragraphs.strip()


def option_files(group: str) -> list[Path]:
    if group == ROOT_PAGE:
        return sorted(CONF.glob("*.yaml"))
    base = CONF / group
    return sorted(base.rglob("*.yaml"), key=lambda p: (len(p.relative_to(base).parts), p.parent.as_posix(), p.stem))


def selector(path: Path, text: str, group: str) -> str:
    """How a file is chosen on the command line: a global experiment by its path under the group
    (``experiment=li2024/wn18rr``), an option of a subgroup by its name (``trainer/distributed=fsdp``)."""
    from ctxdistill.cli import is_base

    if group == ROOT_PAGE:
        return path.relative_to(ROOT).as_posix()
    relative = path.relative_to(CONF).with_suffix("")
    if is_base(path.stem):  # no option: its path, which the options' defaults lists name
        return f"{relative.as_posix()} (a base, not an option)"
    if text.lstrip().startswith("# @package _global_"):
        return f"{group}={relative.relative_to(group).as_posix()}"
    return f"{relative.parent.as_posix()}={relative.name}"


def first_sentence(text: str, limit: int = 200) -> str:
    text = text.split("\n\n")[0]
    found = re.match(r"(.+?(?<! al)(?<! eq)(?<! vs)(?<!e\.g)(?<!i\.e)\.)(\s+(?=[A-Z])|$)", text)  # not "et al."
    text = found.group(1) if found else text
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def options_section(page: Page, group: str, schemas: dict[str, dict[str, Any]]) -> None:
    files = option_files(group)
    if not files:
        return
    ids = {
        path: "opt-" + re.sub(r"[^A-Za-z0-9_-]+", "-", str(path.relative_to(CONF).with_suffix(""))) for path in files
    }

    def option(path: Path, entry: str) -> Path | None:
        """The option file a defaults entry names: a sibling, or a path under the group or conf/."""
        for candidate in (path.parent / entry, CONF / group / entry, CONF / entry.lstrip("/")):
            if candidate.with_suffix(".yaml") in ids:
                return candidate.with_suffix(".yaml")
        return None

    summary = ["| option | builds on | what |", "|---|---|---|"]
    details = []
    for path in files:
        text = path.read_text()
        try:
            defaults = (yaml.safe_load(text) or {}).get("defaults") or []
        except yaml.YAMLError:
            defaults = []
        group_path = path.parent.relative_to(CONF).as_posix() if group != ROOT_PAGE else ""
        builds_on = []
        for entry in defaults:
            if not isinstance(entry, str) or entry == "_self_":
                continue
            if entry in schemas.get(group_path, {}):
                builds_on.append(f"[`{entry}`](#{entry})")
            elif option(path, entry) is not None:
                builds_on.append(f"[`{entry}`](#{ids[option(path, entry)]})")
            else:
                builds_on.append(f"`{entry}`")
        relative = path.relative_to(ROOT).as_posix()
        name = selector(path, text, group)
        comment = leading_comment(text)
        summary.append(f"| [`{name}`](#{ids[path]}) | {', '.join(builds_on)} | {plain(first_sentence(comment))} |")
        details += [f"### `{name}` {{#{ids[path]}}}", ""]
        if comment:
            details += [plain(comment), ""]
        details += [f"File `{relative}`" + (f", builds on {', '.join(builds_on)}." if builds_on else "."), ""]
        details += [f'??? example "{relative}"', "", "    ```yaml"]
        details += [f"    {line}" if line else "" for line in text.rstrip("\n").splitlines()]
        details += ["    ```", ""]
    page.lines += ["## Options", "", *summary, "", *details]


# ---------------------------------------------------------------- the pages
def group_names(schemas: dict[str, dict[str, Any]]) -> list[str]:
    found = {p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    found |= {group.split("/")[0] for group in schemas if group}
    found.add(ROOT_PAGE)
    return sorted(found, key=lambda g: (ORDER.index(g) if g in ORDER else len(ORDER), g))


def build_pages() -> dict[str, str]:
    schemas = registered_schemas()
    names = group_names(schemas)
    anchors: dict[type, str] = {}
    for group, nodes in schemas.items():
        for name, node in nodes.items():
            anchors.setdefault(OmegaConf.get_type(node.node), f"{group.split('/')[0] or ROOT_PAGE}.md#{name}")
    pages = {}
    for group in names:
        page = Page(group, anchors)
        title = "The root config" if group == ROOT_PAGE else f"`{group}`"
        page.lines += [f"# {title}", ""]
        page.lines += [
            "Generated when the site is built, from the files under `conf/` and the schemas that "
            "`ctxdistill.config.register_schemas()` stores in Hydra's ConfigStore. "
            "See [the configuration reference](index.md) for how to read it.",
            "",
        ]
        options_section(page, group, schemas)
        mine = sorted(
            (g, name, node)
            for g, nodes in schemas.items()
            for name, node in nodes.items()
            if (g.split("/")[0] or ROOT_PAGE) == group
        )
        if mine:
            page.lines += ["## Schemas", ""]
            for g, name, node in mine:
                stored = f"{g}/{name}" if g else name
                note = f", stored in the ConfigStore as `{stored}`"
                page.schema(f"`{name}`", name, OmegaConf.get_type(node.node), node.node, note)
        page.nested_tables()
        pages[group] = "\n".join(page.lines) + "\n"
    return pages


def pages() -> dict[str, str]:
    if not _pages:
        _pages.update(build_pages())
    return _pages


# ---------------------------------------------------------------- MkDocs events
def on_startup(command, dirty) -> None:  # noqa: ARG001 - MkDocs' signature
    _pages.clear()


def on_config(config):
    """The generated pages join the nav section that holds the reference's index page."""
    _pages.clear()
    entries = [{"root config" if name == ROOT_PAGE else name: f"reference/{name}.md"} for name in pages()]

    def extend(items) -> bool:
        for item in items or []:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if value == INDEX or (isinstance(value, list) and INDEX in value):
                if isinstance(value, list):
                    value += [e for e in entries if e not in value]
                    return True
            if isinstance(value, list) and extend(value):
                return True
        return False

    if config.nav and not extend(config.nav):
        raise RuntimeError(f"mkdocs.yml: put {INDEX} in a nav section of its own; the generated pages join it")
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for name, text in pages().items():
        files.append(File.generated(config, f"reference/{name}.md", content=text))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - MkDocs' signature
    """The reference's index lists the generated pages (on GitHub, where nothing is generated, it does not)."""
    if page.file.src_uri != INDEX:
        return markdown
    rows = ["| page | options | schemas |", "|---|---|---|"]
    schemas = registered_schemas()
    for name in pages():
        count = len(option_files(name))
        stored = sum(len(n) for g, n in schemas.items() if (g.split("/")[0] or ROOT_PAGE) == name)
        rows.append(f"| [{name}]({name}.md) | {count} | {stored} |")
    return markdown + "\n" + "\n".join(rows) + "\n"
