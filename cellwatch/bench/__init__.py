"""``cellwatch bench``: how fast and how lean the whole pipeline is on this machine.

One run measures, on the machine it runs on:

* end-to-end throughput (megapixels per second) of ``process_images``, the daemon's path,
  for one large 16-bit image and for a burst of small images; the time of each stage as a
  share of wall time; and the share left to everything but the network: one minus the
  time the run's batches take the network alone, over the wall time
  (:mod:`~cellwatch.bench.workloads`);
* the same workloads with the ``seed`` architecture and with naive one-tile-at-a-time
  inference, as ratios to the default;
* the network's FLOPs (convolutions, counted from the layer shapes) and the rate it
  reaches, against the best rate this TensorFlow reaches on a plain convolution and a
  plain matrix product (:mod:`~cellwatch.bench.network`);
* peak memory (VmHWM, in a fresh process) for one very large image, at scale 1 and under
  the default settings (automatic scale, what users run), and resident memory along a
  backlog of small images (with a stub network: the network's memory does not depend on
  the backlog, and the stub keeps the run short) (:mod:`~cellwatch.bench.memory`).

It prints a table and writes JSON (:mod:`~cellwatch.bench.report`); ``--compare
OLD.json`` prints new/old ratios of the headline figures so regressions show. Images are
16-bit mosaics of 256×256 crops of the nucleus images in ``--data`` or, without them,
synthetic discs (:mod:`~cellwatch.bench.inputs`, which the scripts in ``benchmarks/``
use too). Every workload uses ``scale.scale: 1`` so the work is fixed, except the
default-settings memory run, which zooms the image as users' runs do.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]

from cellwatch.bench.command import add_arguments, run
