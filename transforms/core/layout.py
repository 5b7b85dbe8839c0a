"""Where a run keeps its work: the one rule for the work dir, shared by the graph and the stages that build on it."""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems


def work_dir_of(opts) -> str:
  """`--work_dir`, else `<output>/_work`."""
  return opts.work_dir or FileSystems.join(opts.output, '_work')
