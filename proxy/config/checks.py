"""Checks that touch the file system: do the files the settings name exist and can we read them?"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from ..errors import ConfigProblem
from .model import Settings, env_var, example_of


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an input file, or None when it is a readable file."""
    try:
        if not path.exists():
            return f"{path} does not exist"
        if not path.is_file():
            return f"{path} is not a regular file"
    except (OSError, ValueError) as exc:
        return f"{path} cannot be checked ({exc})"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user (uid {os.getuid()})"
    return None


def file_problems(settings: Settings, bad: Collection[str] = ()) -> list[ConfigProblem]:
    """Problems with the files the identity source reads (variables in `bad` are skipped).

    Only existence and readability: what is inside the files is the material loader's job.
    """
    if settings.identity_source == "files":
        names = ["cert_file", "key_file", "trust_bundle_file", "crl_file"]
    elif settings.identity_source == "spiffe":
        names = []
    else:
        names = ["ca_token_file"]
    problems: list[ConfigProblem] = []
    if env_var("federated_bundles") not in bad:
        for td, source in settings.federated_bundles:
            if "://" in source:
                continue
            if (problem := file_problem(Path(source))) is not None:
                problems.append(
                    ConfigProblem(
                        env_var("federated_bundles"),
                        f"bundle of {td}: {problem}",
                        example_of("federated_bundles"),
                    )
                )
    names.append("policy_file")
    for name in names:
        path: Path | None = getattr(settings, name)
        if env_var(name) in bad or path is None:
            continue
        if (problem := file_problem(path)) is not None:
            problems.append(ConfigProblem(env_var(name), problem, example_of(name)))
    return problems
