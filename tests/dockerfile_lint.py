"""A small Dockerfile checker: the hadolint-style rules our image must follow.

CI has no Docker engine, so the image is never built there; these rules catch what a build
would not anyway (floating base images, root at run time, shell-form entrypoints that swallow
SIGTERM, secrets baked into layers, apt caches left in the image).

Usage: python tests/dockerfile_lint.py [Dockerfile]   (exit 1 and one line per finding)
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REQUIRED_OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.licenses",
)
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL)", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), raw arguments and first line."""

    keyword: str
    args: str
    line: int


@dataclass(frozen=True)
class Finding:
    """A rule violation, with the rule id and the line it was found on."""

    rule: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.rule}: {self.message}"


@dataclass
class Stage:
    """The instructions from one FROM to the next."""

    image: str
    alias: str | None
    line: int
    instructions: list[Instruction]


def parse(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, continuation lines joined)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are ignored by Docker too
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if buf:
        joined = " ".join(buf)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Group instructions by build stage. ARGs before the first FROM are the global build
    arguments: a FROM that names one (`FROM ${BASE_IMAGE}`) gets its default, the image a plain
    `docker build` uses; one without a default stays a variable (and DF001 flags it)."""
    result: list[Stage] = []
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            image = _VARIABLE.sub(
                lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), words[0]
            )
            result.append(Stage(image, alias, ins.line, []))
        elif result:
            result[-1].instructions.append(ins)
        elif ins.keyword == "ARG":
            name, sep, value = ins.args.partition("=")
            if sep:
                defaults[name.strip()] = value.strip().strip('"')
    return result


def _exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _key_values(args: str) -> dict[str, str]:
    """`LABEL`/`ENV` arguments as a mapping (the modern `k=v k2="v 2"` form and `ENV k v`)."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


def _split_healthcheck(args: str) -> tuple[list[str], str]:
    """HEALTHCHECK options (--interval=...) and what follows them (CMD ... or NONE)."""
    opts: list[str] = []
    rest = args
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        opts.append(opt)
        rest = rest.lstrip()
    return opts, rest


def healthcheck_command(text: str) -> list[str] | None:
    """The exec-form command of the final stage's HEALTHCHECK, if it has one."""
    all_stages = stages(parse(text))
    if not all_stages:
        return None
    for ins in reversed(all_stages[-1].instructions):
        if ins.keyword == "HEALTHCHECK":
            _, rest = _split_healthcheck(ins.args)
            if rest.upper().startswith("CMD "):
                return _exec_form(rest[4:].strip())
            return None
    return None


def lint(text: str) -> list[Finding]:
    """Every rule violation in a Dockerfile's text."""
    findings: list[Finding] = []
    instructions = parse(text)
    all_stages = stages(instructions)
    if not all_stages:
        return [Finding("DF000", 1, "no FROM instruction")]
    aliases = {s.alias for s in all_stages if s.alias}

    for stage in all_stages:
        image = stage.image
        if image in aliases or image == "scratch":
            continue
        if "$" in image:
            findings.append(Finding("DF001", stage.line, f"base image {image!r} is a variable"))
            continue
        name_part = image.split("@", 1)[0]
        tag = name_part.rsplit(":", 1)[1] if ":" in name_part.rsplit("/", 1)[-1] else None
        if "@sha256:" not in image and tag is None:
            findings.append(Finding("DF001", stage.line, f"base image {image!r} has no tag"))
        elif tag == "latest":
            findings.append(Finding("DF001", stage.line, f"base image {image!r} uses :latest"))

    for ins in instructions:
        if ins.keyword == "ADD":
            srcs = [w for w in ins.args.split() if not w.startswith("--")][:-1]
            if any(re.match(r"^(https?|git)://|^git@", s) for s in srcs):
                findings.append(
                    Finding("DF010", ins.line, "ADD of a URL: download in RUN with a checksum")
                )
            else:
                findings.append(Finding("DF011", ins.line, "use COPY for local files, not ADD"))
        elif ins.keyword == "MAINTAINER":
            findings.append(Finding("DF012", ins.line, "MAINTAINER is deprecated: use a LABEL"))
        elif ins.keyword == "RUN":
            findings.extend(_lint_run(ins))
        elif ins.keyword == "ENV":
            for key, value in _key_values(ins.args).items():
                if SECRET_NAME.search(key) and value:
                    findings.append(
                        Finding(
                            "DF030",
                            ins.line,
                            f"ENV {key} bakes a secret-looking value into the image",
                        )
                    )
        elif ins.keyword == "ARG":
            key, sep, value = ins.args.partition("=")
            if SECRET_NAME.search(key) and sep and value:
                findings.append(
                    Finding(
                        "DF031",
                        ins.line,
                        f"ARG {key} has a secret-looking default (kept in history)",
                    )
                )
        elif ins.keyword == "WORKDIR" and not ins.args.startswith(("/", "$")):
            findings.append(Finding("DF013", ins.line, f"WORKDIR {ins.args!r} is relative"))
        elif ins.keyword == "COPY":
            m = re.search(r"--from=(\S+)", ins.args)
            if (
                m
                and m.group(1) not in aliases
                and not m.group(1).isdigit()
                and ":" not in m.group(1)
            ):
                findings.append(
                    Finding("DF014", ins.line, f"COPY --from={m.group(1)}: no such stage")
                )

    final = all_stages[-1]
    by_kw: dict[str, list[Instruction]] = {}
    for ins in final.instructions:
        by_kw.setdefault(ins.keyword, []).append(ins)

    users = by_kw.get("USER", [])
    if not users:
        findings.append(
            Finding("DF020", final.line, "final stage has no USER: it would run as root")
        )
    else:
        user = users[-1].args.split(":", 1)[0]
        if not user.isdigit():
            findings.append(
                Finding(
                    "DF021",
                    users[-1].line,
                    f"USER {user!r}: use a numeric UID (runAsNonRoot needs it)",
                )
            )
        elif int(user) == 0:
            findings.append(Finding("DF020", users[-1].line, "final stage runs as root (USER 0)"))

    for kw in ("ENTRYPOINT", "CMD"):
        items = by_kw.get(kw, [])
        if kw == "ENTRYPOINT" and not items:
            findings.append(Finding("DF022", final.line, "final stage has no ENTRYPOINT"))
        for ins in items:
            if _exec_form(ins.args) is None:
                findings.append(
                    Finding(
                        "DF023",
                        ins.line,
                        f"{kw} in shell form: signals go to /bin/sh, not the process",
                    )
                )

    checks = by_kw.get("HEALTHCHECK", [])
    if not checks:
        findings.append(Finding("DF024", final.line, "final stage has no HEALTHCHECK"))
    else:
        _, rest = _split_healthcheck(checks[-1].args)
        if rest.upper() == "NONE":
            findings.append(Finding("DF024", checks[-1].line, "HEALTHCHECK NONE"))
        elif not rest.upper().startswith("CMD ") or _exec_form(rest[4:].strip()) is None:
            findings.append(
                Finding(
                    "DF025",
                    checks[-1].line,
                    "HEALTHCHECK CMD in shell form needs a shell at run time",
                )
            )

    labels: dict[str, str] = {}
    for ins in by_kw.get("LABEL", []):
        labels.update(_key_values(ins.args))
    for key in REQUIRED_OCI_LABELS:
        if not labels.get(key):
            findings.append(Finding("DF040", final.line, f"missing OCI label {key}"))
    return findings


def _lint_run(ins: Instruction) -> list[Finding]:
    findings: list[Finding] = []
    cmd = ins.args
    if re.search(r"\bapt-get\s+(-\S+\s+)*install\b", cmd):
        if "--no-install-recommends" not in cmd:
            findings.append(
                Finding("DF050", ins.line, "apt-get install without --no-install-recommends")
            )
        if not re.search(r"\s(-y|--yes|-qq?y|--assume-yes)\b", cmd):
            findings.append(Finding("DF051", ins.line, "apt-get install without -y"))
        if "apt-get update" not in cmd:
            findings.append(
                Finding("DF052", ins.line, "apt-get install without apt-get update in the same RUN")
            )
        if "rm -rf /var/lib/apt/lists" not in cmd:
            findings.append(
                Finding("DF053", ins.line, "apt lists not removed (rm -rf /var/lib/apt/lists/*)")
            )
    if re.search(r"\bapt\s+install\b", cmd):
        findings.append(Finding("DF054", ins.line, "use apt-get, not apt, in scripts"))
    if re.search(r"\bpip3?\s+install\b", cmd) and "--no-cache-dir" not in cmd:
        findings.append(Finding("DF055", ins.line, "pip install without --no-cache-dir"))
    if re.search(r"\bsudo\b", cmd):
        findings.append(Finding("DF056", ins.line, "sudo in RUN"))
    if re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(ba)?sh\b", cmd):
        findings.append(Finding("DF057", ins.line, "piping a download into a shell"))
    return findings


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "Dockerfile")
    findings = lint(path.read_text())
    for finding in findings:
        print(f"{path}:{finding}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
