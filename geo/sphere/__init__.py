"""The sphere's discretisation, shared by heads, training, reports and inference.

- ``s2cells.py``: vectorised S2 cell ids, levels, children, centres and areas (bit-exact with s2sphere);
- ``partition.py``: the PlaNet adaptive partition built from training locations.
"""
