"""clipmill: raw video in, text-to-video training data out.

Subpackages (each a top-level folder of the repository):
  clipmill.pipeline  recipe model, Ray runner, ledger/resume, CLI
  clipmill.stages    one module per stage family (probe, split, transcode, frames, quality, filter)
  clipmill.storage   the Arrow schema, atomic shard writer/reader, DuckDB query layer
  clipmill.recaption VLM captions and LLM prompt expansion (later)
  clipmill.dit       the bundled spacetime DiT trainer and sampler (later)
"""

__version__ = "0.1.0"
