"""Admin: what operators run: status, retry/resend, retention, the conformance statement, offline standardize."""
