"""Where rows land: storage (a local folder or S3) and file formats (CSV, Parquet)."""
