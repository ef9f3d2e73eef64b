"""Talking to Socrata: pure SoQL builders (`soql`) and the HTTP client (`client`)."""
