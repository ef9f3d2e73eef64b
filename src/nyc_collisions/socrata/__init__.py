"""Talking to Socrata: pure SoQL builders (`soql`), the HTTP client (`client`) and how many
requests it keeps in flight (`concurrency`). Bytes and JSON only: pages are parsed into rows,
and datasets are read, in `source.py` above it; it knows nothing of what is landed."""
