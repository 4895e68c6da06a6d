"""Stores: the review queue, the audit log and reviewer sessions, in SQLite or a shared PostgreSQL."""
