"""Schemas of the datasets the fake SODA server knows: field names, order and types.

The three NYC Motor Vehicle Collisions datasets carry the real field names, order and SODA2 types
(see shared/reference/DATASETS.md); `test-0001` is a small generic dataset with the column types the
collision datasets lack (checkbox, point), for "any Socrata dataset id" support.

Types are the SODA2 names of the `X-SODA2-Types` header; metadata (`/api/views/{id}.json`) calls a
floating timestamp `calendar_date`. System fields (`:id`, ...) are in every dataset but are not
listed among the metadata columns.
"""

from __future__ import annotations

from dataclasses import dataclass

CRASHES = "h9gi-nx95"
PERSONS = "f55k-p6yu"
VEHICLES = "bm4k-52h4"
GENERIC = "test-0001"

NUMBER = "number"
TEXT = "text"
FLOATING = "floating_timestamp"
FIXED = "fixed_timestamp"
LOCATION = "location"
CHECKBOX = "checkbox"
POINT = "point"
ROW_ID = "row_identifier"
ROW_VERSION = "row_version"

_METADATA_TYPE = {FLOATING: "calendar_date"}


@dataclass(frozen=True)
class Column:
    """One column: API field name, display name and SODA2 type."""

    field: str
    name: str
    soda_type: str

    @property
    def metadata_type(self) -> str:
        """`dataTypeName` of the metadata endpoint."""
        return _METADATA_TYPE.get(self.soda_type, self.soda_type)


SYSTEM_COLUMNS: tuple[Column, ...] = (
    Column(":id", ":id", ROW_ID),
    Column(":created_at", ":created_at", FIXED),
    Column(":updated_at", ":updated_at", FIXED),
    Column(":version", ":version", ROW_VERSION),
)
SYSTEM_FIELDS: tuple[str, ...] = tuple(c.field for c in SYSTEM_COLUMNS)


@dataclass(frozen=True)
class Schema:
    """A dataset: id, display name, unique numeric key, columns in API order, sizes."""

    dataset_id: str
    name: str
    key: str
    columns: tuple[Column, ...]
    full_size: int
    default_size: int

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(c.field for c in self.columns)

    def column(self, field: str) -> Column | None:
        """The data or system column called `field`, or None."""
        for c in self.columns + SYSTEM_COLUMNS:
            if c.field == field:
                return c
        return None


def _columns(spec: str, display: str) -> tuple[Column, ...]:
    """Columns from 'field:type ...' lines; display 'spaces' (crashes) or 'underscores'."""
    out = []
    for item in spec.split():
        field, _, soda_type = item.partition(":")
        name = field.upper()
        if display == "spaces" and field != "collision_id":
            name = name.replace("_", " ")
            if field.startswith("vehicle_type_code") and name[-1].isdigit() and name[-2] != " ":
                name = f"{name[:-1]} {name[-1]}"
        out.append(Column(field, name, soda_type or TEXT))
    return tuple(out)


_CRASH_COLUMNS = _columns(
    """crash_date:floating_timestamp crash_time borough zip_code latitude:number longitude:number
    location:location on_street_name off_street_name cross_street_name
    number_of_persons_injured:number number_of_persons_killed:number
    number_of_pedestrians_injured:number number_of_pedestrians_killed:number
    number_of_cyclist_injured:number number_of_cyclist_killed:number
    number_of_motorist_injured:number number_of_motorist_killed:number
    contributing_factor_vehicle_1 contributing_factor_vehicle_2 contributing_factor_vehicle_3
    contributing_factor_vehicle_4 contributing_factor_vehicle_5 collision_id:number
    vehicle_type_code1 vehicle_type_code2 vehicle_type_code_3 vehicle_type_code_4
    vehicle_type_code_5""",
    "spaces",
)
_PERSON_COLUMNS = _columns(
    """unique_id:number collision_id:number crash_date:floating_timestamp crash_time person_id
    person_type person_injury vehicle_id:number person_age:number ejection emotional_status
    bodily_injury position_in_vehicle safety_equipment ped_location ped_action complaint ped_role
    contributing_factor_1 contributing_factor_2 person_sex""",
    "underscores",
)
_VEHICLE_COLUMNS = _columns(
    """unique_id:number collision_id:number crash_date:floating_timestamp crash_time vehicle_id
    state_registration vehicle_type vehicle_make vehicle_model vehicle_year:number
    travel_direction vehicle_occupants:number driver_sex driver_license_status
    driver_license_jurisdiction pre_crash point_of_impact vehicle_damage vehicle_damage_1
    vehicle_damage_2 vehicle_damage_3 public_property_damage public_property_damage_type
    contributing_factor_1 contributing_factor_2""",
    "underscores",
)
_GENERIC_COLUMNS = _columns(
    "id:number name amount:number active:checkbox observed_at:floating_timestamp site:point",
    "spaces",
)

SCHEMAS: dict[str, Schema] = {
    s.dataset_id: s
    for s in (
        Schema(
            CRASHES,
            "Motor Vehicle Collisions - Crashes",
            "collision_id",
            _CRASH_COLUMNS,
            2_300_000,
            1_000,
        ),
        Schema(
            PERSONS,
            "Motor Vehicle Collisions - Person",
            "unique_id",
            _PERSON_COLUMNS,
            6_000_000,
            2_600,
        ),
        Schema(
            VEHICLES,
            "Motor Vehicle Collisions - Vehicles",
            "unique_id",
            _VEHICLE_COLUMNS,
            4_600_000,
            2_000,
        ),
        Schema(GENERIC, "Fake generic test dataset", "id", _GENERIC_COLUMNS, 200, 200),
    )
}
"""Every dataset the server serves, by id, in generation order (crashes before their children)."""
