"""``cavmae prepare`` on Apache Beam: the same clip processing, shards and reports as the local
process pool, on any Beam runner (the DirectRunner on one machine; Dataflow, Flink or Spark on
a cluster).

Clips are decoded in parallel (``_work``, the local path's worker function), grouped by shard
and each shard is written, with its report, by one worker in clip-list order: the same bytes as
the local path. A clip that fails travels as its record into its shard's report, from which
``failures.jsonl`` is merged on the launching machine. Shards already reported are not in the
job list, so a rerun finishes an interrupted one. Output paths may be ``gs://`` (the workers
write through the same path layer).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions


class _WriteShard(beam.DoFn):
    def __init__(self, make_writer):
        self.make_writer = make_writer

    def setup(self):
        self.write = self.make_writer()

    def process(self, element):
        shard, results = element
        self.write(
            shard, [(example, record) for _, example, record in sorted(results, key=lambda r: r[0])]
        )
        yield shard


def run(jobs: list, decode, make_writer, shard_size: int, runner: str, args) -> None:
    """Process ``jobs`` (``(position, clip, options)``) with ``decode`` (-> ``(position,
    example, record)``) and write each shard with ``make_writer()(shard, done)``. ``runner``:
    ``beam`` for the DirectRunner, or a Beam runner's name; ``args``: Beam pipeline options
    (e.g. ``--direct_num_workers=2 --direct_running_mode=multi_processing``, or Dataflow's
    ``--project --region --temp_location``)."""
    if not jobs:
        return
    name = "DirectRunner" if runner == "beam" else runner
    with beam.Pipeline(options=PipelineOptions([f"--runner={name}", *args])) as pipeline:
        _ = (
            pipeline
            | "clips" >> beam.Create(jobs, reshuffle=True)
            | "decode" >> beam.Map(decode)
            | "by shard" >> beam.Map(lambda result: (result[0] // shard_size, result))
            | "group" >> beam.GroupByKey()
            | "write" >> beam.ParDo(_WriteShard(make_writer))
        )
