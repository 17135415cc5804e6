"""Readers for benchmark datasets as their publishers distribute them (one module per layout).

Each reader finds the rows that have both metadata and pixels and hands them to
``common.write_dataset_manifest``, which writes the manifest (rows may point into
shards: ``geo.pipeline.shards``) and ``<out>.skipped.csv`` with every row or image
left out and why. Layouts: ../shared/BENCHMARKS.md.

- ``places365``: ``IMG_ID,AUTHOR,LAT,LON,...`` CSVs (MP-16, Im2GPS, Im2GPS3k, YFCC4k,
  YFCC26k) with a folder of images or of MessagePack shards (``msgpack_shards``);
- ``yfcc100m``: YFCC4k / YFCC26k as raw YFCC100M metadata rows (tab-separated, 25 or
  23 fields) with a folder of JPEGs named by photo id or hash;
- ``osv5m``: OSV-5M's ``<split>.csv`` and ``images/<split>/NN.zip`` (or extracted folders);
- ``webdataset``: tar shards of ``<key>.jpg`` + ``<key>.json``.
"""
