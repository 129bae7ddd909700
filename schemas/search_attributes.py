"""Temporal search attributes set on every run, so runs can be filtered in the Temporal UI
and with `temporal workflow list --query "LocknState='training'"`."""

from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

from schemas.run_state import RunStatus

KIND = SearchAttributeKey.for_keyword("LocknKind")
PROJECT = SearchAttributeKey.for_keyword("LocknProject")
BASE_MODEL = SearchAttributeKey.for_keyword("LocknBaseModel")
STATE = SearchAttributeKey.for_keyword("LocknState")

ALL = (KIND, PROJECT, BASE_MODEL, STATE)


def from_status(status: RunStatus) -> list[SearchAttributeUpdate]:
    """The search attributes a run's status sets."""
    return [STATE.value_set(status.state.value)]


def dev_server_flags() -> list[str]:
    """`temporal server start-dev` flags that register the attributes."""
    flags: list[str] = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}=Keyword"]
    return flags
