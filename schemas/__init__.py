"""Versioned on-disk formats: the shard Arrow schema and the manifest, checkpoint and report formats."""
