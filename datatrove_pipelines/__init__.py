"""datatrove pipeline steps for code curation."""
