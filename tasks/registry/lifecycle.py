"""Promotion, rollback and lineage: which version serves, and which one a night builds on.

Rollbacks stick. Rolling the champion back marks every version whose edits leave service
(``patchflow.rolled_back_at`` / ``rollback_reason``) and retires every version that descends from
one of them (``patchflow.retired=<reason>``, the ``challenger`` alias removed), so that neither
the next night (:func:`night_base`) nor a plain :func:`promote` brings those edits back. Every
champion move is recorded in the registered model's ``patchflow.champion_history`` tag (JSON,
newest last, trimmed to fit MLflow's tag size).
"""

from __future__ import annotations

import json
from pydantic import BaseModel, ConfigDict

from tasks.registry.client import RegistryClient, utc_iso
from tasks.registry.versions import (CHALLENGER, CHAMPION, MAX_TAG_VALUE, TAG_HISTORY, TAG_PREVIOUS_CHAMPION,
                                     TAG_PROMOTED_AT, TAG_PROMOTION_REASON, TAG_RETIRED, TAG_RETIRED_AT,
                                     TAG_ROLLBACK_REASON, TAG_ROLLED_BACK_AT, ModelVersionInfo, RegistryError)


class RollbackResult(BaseModel):
    """What a rollback did: the champion now, the versions taken out of service, those retired."""

    model_config = ConfigDict(frozen=True)

    champion: ModelVersionInfo
    rolled_back: tuple[str, ...]
    retired: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.champion.version

    @property
    def message(self) -> str:
        text = (f"model {self.champion.name!r}: version {self.champion.version} is champion again; "
                f"rolled back: {', '.join(self.rolled_back)}")
        if self.retired:
            text += f"; retired (descend from a rolled-back version): {', '.join(self.retired)}"
        return text


# ----------------------------------------------------------------------------- history


def champion_history(reg: RegistryClient, name: str) -> list[dict]:
    raw = (reg.registered_model(name).tags or {}).get(TAG_HISTORY)
    try:
        return list(json.loads(raw)) if raw else []
    except (TypeError, ValueError):
        return []


def append_history(reg: RegistryClient, name: str, entry: dict) -> None:
    history = champion_history(reg, name) + [entry]
    blob = "[]"
    while history:
        blob = json.dumps(history, separators=(",", ":"))
        if len(blob) <= MAX_TAG_VALUE:
            break
        history = history[1:]
    reg.call(reg.client.set_registered_model_tag, name, TAG_HISTORY, blob)


def move_champion(reg: RegistryClient, name: str, version: str, *, action: str, reason: str) -> None:
    """Point ``champion`` at ``version``, recording the previous one on the version and in history;
    a challenger that the new champion is or descends from is consumed (its alias removed)."""
    current = reg.alias_version(name, CHAMPION)
    previous = str(current.version) if current is not None else ""
    if previous == str(version):
        return
    at, reason = utc_iso(), reason or "(no reason given)"
    for key, value in ((TAG_PREVIOUS_CHAMPION, previous), (TAG_PROMOTED_AT, at), (TAG_PROMOTION_REASON, reason)):
        reg.set_version_tag(name, str(version), key, value)
    reg.call(reg.client.set_registered_model_alias, name, CHAMPION, str(version))
    append_history(reg, name, {"at": at, "action": action, "from": previous, "to": str(version),
                               "reason": reason[:500]})
    versions = reg.all_infos(name)  # a challenger whose edits the champion now holds is consumed
    challenger = next((v for v in versions.values() if CHALLENGER in v.aliases), None)
    if challenger is not None and challenger.version in {v.version for v in lineage(versions, str(version))}:
        reg.call(reg.client.delete_registered_model_alias, name, CHALLENGER)


# ----------------------------------------------------------------------------- lineage


def lineage(versions: dict[str, ModelVersionInfo], version: str) -> list[ModelVersionInfo]:
    """``version``, its parent, ... down to the base (from the ``parent_version`` tags)."""
    out: list[ModelVersionInfo] = []
    seen: set[str] = set()
    current = str(version)
    while current and current in versions and current not in seen:
        seen.add(current)
        out.append(versions[current])
        current = versions[current].parent_version
    return out


def _challenger_problem(versions: dict[str, ModelVersionInfo], champion: ModelVersionInfo,
                        challenger: ModelVersionInfo) -> str | None:
    """Why ``challenger`` may not extend ``champion`` (None when it may)."""
    if not challenger.complete:
        return "it is incomplete"
    if challenger.version == champion.version:
        return "it is the champion"
    path = lineage(versions, challenger.version)
    ids = [v.version for v in path]
    if champion.version not in ids:
        return f"it does not descend from champion version {champion.version} (lineage {' <- '.join(ids)})"
    for v in path[: ids.index(champion.version)]:
        if v.rolled_back:
            return f"its lineage contains version {v.version}, rolled back: {v.tags.get(TAG_ROLLBACK_REASON, '')}"
        if v.retired:
            return f"version {v.version} in its lineage is retired: {v.tags.get(TAG_RETIRED, '')}"
    return None


def base_problem(versions: dict[str, ModelVersionInfo], version: str) -> str | None:
    """Why a night may not build on ``version`` (None when it is the champion or extends it)."""
    champion = next((v for v in versions.values() if CHAMPION in v.aliases), None)
    target = versions.get(str(version))
    if champion is None or target is None:
        return "it is not registered" if target is None else "the model has no champion"
    if target.version == champion.version:
        return None
    return _challenger_problem(versions, champion, target)


def night_base(reg: RegistryClient, name: str) -> ModelVersionInfo:
    """The version a night builds on: the champion, or the challenger when it extends the champion
    and nothing in between was rolled back or retired (edits awaiting promotion are kept)."""
    versions = reg.all_infos(name)
    champion = next((v for v in versions.values() if CHAMPION in v.aliases), None)
    if champion is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION!r} alias; register a base first")
    challenger = next((v for v in versions.values() if CHALLENGER in v.aliases), None)
    if challenger is not None and _challenger_problem(versions, champion, challenger) is None:
        return challenger
    return champion


# ----------------------------------------------------------------------------- promote / rollback


def promote(reg: RegistryClient, name: str, version: str | None = None, reason: str = "") -> ModelVersionInfo:
    """Move ``champion`` to ``version``; without one, to the challenger, which must extend the
    champion with nothing rolled back or retired in between. The ``challenger`` alias is removed
    when the new champion is, or descends from, the challenger."""
    versions = reg.all_infos(name)
    if version is None:
        challenger = next((v for v in versions.values() if CHALLENGER in v.aliases), None)
        if challenger is None:
            raise RegistryError(f"model {name!r} has no {CHALLENGER!r} alias to promote")
        champion = next((v for v in versions.values() if CHAMPION in v.aliases), None)
        problem = champion and _challenger_problem(versions, champion, challenger)
        if problem:
            raise RegistryError(f"model {name!r}: not promoting challenger version {challenger.version}: {problem}; "
                                "name a version to promote it anyway")
        target = challenger
    else:
        target = versions.get(str(version))
        if target is None:
            raise RegistryError(f"model {name!r} has no version {version!r}")
    if not target.complete:
        raise RegistryError(f"model {name!r} version {target.version} is incomplete; not promoting")
    move_champion(reg, name, target.version, action="promote", reason=reason)
    return reg.info(name, target.version)


def rollback(reg: RegistryClient, name: str, reason: str, to_version: str | None = None) -> RollbackResult:
    """Send ``champion`` back to the version it replaced (or ``to_version``), saying why.

    Rolled back: the champion and its ancestors that are not ancestors of the target (their
    edits leave service). Retired: every other version descending from a rolled-back one, the
    ``challenger`` among them (its alias is removed)."""
    versions = reg.all_infos(name)
    current = next((v for v in versions.values() if CHAMPION in v.aliases), None)
    if current is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION!r} alias to roll back")
    if to_version is None:
        to_version = current.tags.get(TAG_PREVIOUS_CHAMPION, "")
        if not to_version:
            raise RegistryError(f"model {name!r}: champion version {current.version} has no previous champion "
                                "recorded; pass to_version")
    target = versions.get(str(to_version))
    if target is None:
        raise RegistryError(f"model {name!r} has no version {to_version!r}")
    if not target.complete:
        raise RegistryError(f"model {name!r} version {target.version} is incomplete")
    if target.version == current.version:
        raise RegistryError(f"model {name!r}: version {target.version} is already champion")
    at, reason = utc_iso(), reason or "(no reason given)"
    kept = {v.version for v in lineage(versions, target.version)}
    rolled_back = [v.version for v in lineage(versions, current.version) if v.version not in kept]
    for version in rolled_back:
        reg.set_version_tag(name, version, TAG_ROLLED_BACK_AT, at)
        reg.set_version_tag(name, version, TAG_ROLLBACK_REASON, reason)
    reg.call(reg.client.set_registered_model_alias, name, CHAMPION, target.version)
    retired = []
    gone = set(rolled_back)
    for v in versions.values():
        if v.version in gone or v.version in kept or v.retired:
            continue
        ancestors = {a.version for a in lineage(versions, v.version)}
        if ancestors & gone:
            why = f"descends from rolled-back version {', '.join(sorted(ancestors & gone, key=int))}: {reason}"
            reg.set_version_tag(name, v.version, TAG_RETIRED, why)
            reg.set_version_tag(name, v.version, TAG_RETIRED_AT, at)
            if CHALLENGER in v.aliases:
                reg.call(reg.client.delete_registered_model_alias, name, CHALLENGER)
            retired.append(v.version)
    append_history(reg, name, {"at": at, "action": "rollback", "from": current.version, "to": target.version,
                               "reason": reason[:500], "rolled_back": rolled_back, "retired": retired})
    return RollbackResult(champion=reg.info(name, target.version), rolled_back=tuple(rolled_back),
                          retired=tuple(retired))
