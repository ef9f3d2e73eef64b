"""Where rows land: storage (a local folder or S3), file formats (CSV, Parquet) and files of
about `file_rows` rows (`files`). It takes text tables and `rows.CsvRows`, whoever made them:
it knows neither the source nor the page parsers."""
