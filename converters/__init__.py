"""Converters between the adapterkit format and foreign adapter formats, one module per format.

Installed as ``adapterkit.converters``. Each module offers ``detect(path) -> bool``, ``read(path) -> Adapter``
and ``write(adapter, path)``.
"""
