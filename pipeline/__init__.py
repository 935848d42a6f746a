"""Shared machinery of kdpipe, one concern a module.

Data flow: corpus (text -> packed token ids) -> masking (masked batch) -> teacher (top-k,
log-partition, projected hidden) -> shards (Parquet + manifest) -> student/losses/checkpoint
(training) -> metrics/report (evaluation). `cli` wires the stages in `kdpipe.stages` to click.
"""
