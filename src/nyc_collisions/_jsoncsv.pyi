from _typeshed import ReadableBuffer

def convert(
    rows: ReadableBuffer,
    fields: tuple[str, ...],
    kinds: bytes,
    skip: tuple[str, ...],
    id_index: int,
    updated_index: int,
    /,
) -> tuple[bytes, int, str | None, str] | None: ...
