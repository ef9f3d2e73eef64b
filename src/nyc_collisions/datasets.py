"""The registry of datasets: the three NYC collision datasets by name, or any Socrata dataset id."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import UsageError

DATASET_ID_RE = re.compile(r"^[a-z0-9]{4}-[a-z0-9]{4}$")
FIELD_NAME_RE = re.compile(r"^:?[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Dataset:
    """A dataset to land: where it lives on the source, its unique key and its folder name."""

    name: str
    dataset_id: str
    key: str
    integer_fields: frozenset[str] = field(default_factory=frozenset)
    key_given: bool = False  # the user named the key (`--key`); else it is the default

    @property
    def key_column(self) -> str:
        """The key's column name in landed files (system fields are renamed)."""
        return landed_name(self.key)

    @property
    def key_is_the_sources(self) -> bool:
        """`:id`, or a known dataset's own key (DATASETS.md): in every row, once. Any other
        key is the user's word, and is checked (`DatasetSource.check_key`)."""
        known = KNOWN.get(self.name)
        own = known is not None and known.dataset_id == self.dataset_id and known.key == self.key
        return self.key == ":id" or own

    @property
    def text_fields(self) -> frozenset[str]:
        """Fields landed as text in Parquet whatever their type: a key the user chose, which
        must read back as the source wrote it (a number through float64 need not)."""
        return frozenset() if self.key_is_the_sources else frozenset({self.key})

    def keyed_as_landed(self, key: str, where: str) -> Dataset:
        """This dataset keyed as it was landed (`key`, from its manifest or unfinished plan).

        What is landed decides the key: a default key gives way to it, and a `--key` that
        names another field is refused, since the current state was merged by `key`.
        """
        if key == self.key:
            return self
        if self.key_given:
            raise UsageError(
                f"{self.name}: --key {self.key} contradicts the key {key} it was landed with "
                f"at {where}; drop --key (or pass --key {key}), or land it in another --dest"
            )
        return replace(self, key=key)


_COUNTS = frozenset(
    f"number_of_{who}_{what}"
    for who in ("persons", "pedestrians", "cyclist", "motorist")
    for what in ("injured", "killed")
)

KNOWN: dict[str, Dataset] = {
    "crashes": Dataset(
        "crashes", "h9gi-nx95", "collision_id", frozenset({"collision_id"}) | _COUNTS
    ),
    "persons": Dataset(
        "persons",
        "f55k-p6yu",
        "unique_id",
        frozenset({"unique_id", "collision_id", "vehicle_id", "person_age"}),
    ),
    "vehicles": Dataset(
        "vehicles",
        "bm4k-52h4",
        "unique_id",
        frozenset({"unique_id", "collision_id", "vehicle_year", "vehicle_occupants"}),
    ),
}
DEFAULT_DATASETS = ("crashes", "persons", "vehicles")

# System fields we land, and the names they get in files (no colon: SQL engines read them unquoted).
SYSTEM_FIELDS = (":id", ":created_at", ":updated_at")


def landed_name(field_name: str) -> str:
    """The column name of a source field in landed files: `:id` -> `socrata_id`."""
    return "socrata_" + field_name[1:] if field_name.startswith(":") else field_name


def resolve(name_or_id: str, key: str | None = None) -> Dataset:
    """Find a dataset by name (`crashes`) or id (`h9gi-nx95`); any other id lands keyed by `key`."""
    text = name_or_id.strip()
    if text in KNOWN:
        ds = KNOWN[text]
    else:
        by_id = {d.dataset_id: d for d in KNOWN.values()}
        if text in by_id:
            ds = by_id[text]
        elif DATASET_ID_RE.match(text):
            ds = Dataset(text, text, key or ":id")
        else:
            raise UsageError(
                f"unknown dataset {name_or_id!r}: use crashes, persons, vehicles "
                "or a Socrata dataset id like h9gi-nx95"
            )
    if key is not None and not FIELD_NAME_RE.match(key):
        raise UsageError(f"--key {key!r} is not a field name")
    if key is not None and key != ds.key:
        ds = Dataset(ds.name, ds.dataset_id, key, ds.integer_fields)
    if key is not None:
        ds = replace(ds, key_given=True)
    return ds


def resolve_many(names: tuple[str, ...] | list[str], key: str | None = None) -> list[Dataset]:
    """Resolve the datasets a command names (all three by default), without repeats."""
    chosen = [resolve(n, key) for n in (names or DEFAULT_DATASETS)]
    seen: set[str] = set()
    out = []
    for ds in chosen:
        if ds.dataset_id not in seen:
            seen.add(ds.dataset_id)
            out.append(ds)
    return out
