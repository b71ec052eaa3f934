"""The audit trail (SQLite by default, PostgreSQL where configured) and what it says about the
models in use (monitoring)."""
