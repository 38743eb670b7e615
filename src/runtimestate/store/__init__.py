"""The declared-state store: one interface, SQLite and PostgreSQL implementations."""
