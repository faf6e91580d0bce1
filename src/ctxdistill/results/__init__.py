"""Results as data: run records in, tables and scorecards out."""
