"""The HDF5 feature cache (schema ``geo-feature-cache/1``)."""
